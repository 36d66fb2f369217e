"""A public gradient checker: analytic gradients against central differences.

    >>> from capsnet.gradcheck import check_module
    >>> check_module(layer.astype("float64"), x)        # raises GradcheckError on a mismatch

Small arrays are checked element by element; larger ones along random unit
directions d, comparing (f(x + eps d) - f(x - eps d)) / 2 eps with <grad, d>.
Run it in float64: float32 central differences are too noisy to mean much.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from capsnet import backend


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with the numerical one."""


@dataclass
class GradcheckResult:
    """What one check covered: the array's name, ``mode`` ("elements" or "directions"), how many
    were checked, and the largest absolute and relative errors found."""

    name: str
    mode: str  # "elements" or "directions"
    checked: int
    max_abs_error: float
    max_rel_error: float


def _scalar(value: Any) -> float:
    return float(backend.to_numpy(value))


def check_gradient(
    f: Callable[[], Any],
    array: Any,
    grad: Any,
    *,
    name: str = "x",
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    max_elements: int = 64,
    n_directions: int = 8,
    seed: int = 0,
) -> GradcheckResult:
    """Compare ``grad`` (the analytic dL/d``array``) with central differences of ``f``.

    ``f()`` recomputes the scalar loss from the current contents of ``array``,
    which is perturbed in place and restored. Passes when for each check
    |numeric - analytic| <= atol + rtol * max(|numeric|, |analytic|, scale), where
    scale is the gradient's largest magnitude (for element checks) or norm (for
    directions), so tiny components are judged against the gradient as a whole.
    """
    if array.dtype != np.float64:
        raise TypeError(f"gradcheck needs float64 arrays (float32 differences are noise), got {array.dtype} for {name}")
    if tuple(grad.shape) != tuple(array.shape):
        raise ValueError(f"gradient of {name} has shape {tuple(grad.shape)}, expected {tuple(array.shape)}")
    xp = backend.get_array_module(array)
    g = backend.to_numpy(grad).astype(np.float64)
    if not np.all(np.isfinite(g)):
        raise GradcheckError(f"analytic gradient of {name} is not finite")
    rng = np.random.default_rng(seed)
    numeric, analytic, labels = [], [], []
    if array.size <= max_elements:
        mode = "elements"
        for idx in np.ndindex(*array.shape):
            orig = array[idx].copy()
            array[idx] = orig + eps
            plus = _scalar(f())
            array[idx] = orig - eps
            minus = _scalar(f())
            array[idx] = orig
            numeric.append((plus - minus) / (2 * eps))
            analytic.append(g[idx])
            labels.append(f"element {idx}")
        scale = float(np.abs(g).max()) if g.size else 0.0
    else:
        mode = "directions"
        original = array.copy()
        for k in range(n_directions):
            d = rng.standard_normal(array.shape)
            d /= np.linalg.norm(d)
            d_dev = xp.asarray(d) if xp is not np else d
            array[...] = original + eps * d_dev
            plus = _scalar(f())
            array[...] = original - eps * d_dev
            minus = _scalar(f())
            array[...] = original
            numeric.append((plus - minus) / (2 * eps))
            analytic.append(float((g * d).sum()))
            labels.append(f"random direction {k}")
        scale = float(np.linalg.norm(g))
    numeric_a, analytic_a = np.array(numeric), np.array(analytic)
    err = np.abs(numeric_a - analytic_a)
    bound = atol + rtol * np.maximum(np.maximum(np.abs(numeric_a), np.abs(analytic_a)), scale)
    worst = int(np.argmax(err / bound))
    rel = err / np.maximum(np.maximum(np.abs(numeric_a), np.abs(analytic_a)), 1e-300)
    if not np.all(np.isfinite(numeric_a)) or err[worst] > bound[worst]:
        raise GradcheckError(
            f"gradient of {name} is wrong at {labels[worst]} ({mode}, {len(numeric)} checked): "
            f"numeric {numeric_a[worst]:.10g}, analytic {analytic_a[worst]:.10g}, "
            f"abs error {err[worst]:.3g} > allowed {bound[worst]:.3g} "
            f"(eps={eps}, rtol={rtol}, atol={atol}, gradient scale {scale:.3g})"
        )
    return GradcheckResult(name, mode, len(numeric), float(err.max()), float(rel.max()))


def _weighted_sum(outputs: Any, weights: Sequence[Any]) -> Any:
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum((o * w).sum() for o, w in zip(outputs, weights))


def check_module(
    module: Any,
    *inputs: Any,
    forward_kwargs: dict | None = None,
    grad_out: Any = None,
    check_input: bool = True,
    seed: int = 0,
    **tolerances: Any,
) -> list[GradcheckResult]:
    """Gradient-check a Module: its input gradient (first input) and every parameter.

    The scalar is L = sum(out * R) for fixed random R (``grad_out``, drawn if not
    given; one per output when forward returns a tuple), so backward(R) must
    return dL/d(input) and accumulate dL/d(param). Inputs and parameters must be
    float64. Returns one result per checked array; raises GradcheckError.
    """
    forward_kwargs = forward_kwargs or {}
    backend.get_array_module(*inputs)  # refuses mixed backends up front
    module.train()
    out = module.forward(*inputs, **forward_kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    if grad_out is None:
        rng = np.random.default_rng(seed)
        grad_out = tuple(backend.to_device(rng.standard_normal(o.shape), backend.backend_of(o)) for o in outs)
    weights = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    module.zero_grad()
    grad_in = module.backward(*weights) if isinstance(out, tuple) else module.backward(weights[0])
    analytic_params = [(name, p.grad.copy()) for name, p in module.named_parameters()]

    def f() -> Any:
        module.train()
        value = _weighted_sum(module.forward(*inputs, **forward_kwargs), weights)
        module.release()
        return value

    results = []
    if check_input and grad_in is not None:
        results.append(check_gradient(f, inputs[0], grad_in, name="input", seed=seed, **tolerances))
    params = dict(module.named_parameters())
    for name, grad in analytic_params:
        results.append(check_gradient(f, params[name].data, grad, name=name, seed=seed, **tolerances))
    return results


__all__ = ["GradcheckError", "GradcheckResult", "check_gradient", "check_module"]
