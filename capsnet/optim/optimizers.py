"""Optimizers: SGD (with momentum, Nesterov, weight decay) and Adam.

An optimizer holds a list of :class:`~capsnet.layers.base.Parameter` and
updates each ``p.data`` in place from ``p.grad``. Per-parameter state (momentum
buffers, Adam's moments) is keyed by the parameter object and allocated lazily
at the first :meth:`Optimizer.step`, on the parameter's own device and in its
dtype, so a float32 model stays float32 and a CuPy model never touches the host.

``lr`` is a plain attribute: the schedules in :mod:`capsnet.optim.schedules`
set it between steps.

Checkpoints: :meth:`Optimizer.state_dict` gives a flat dict of host NumPy
arrays and Python scalars (safe for ``numpy.savez`` and pickle), with the
per-parameter state under ``"state.<position>.<name>"``;
:meth:`Optimizer.load_state_dict` checks it against the parameters and puts it
back on their devices, so training resumes bit for bit.

Speed on the CPU: the updates are element-wise passes over parameter-sized arrays,
bound by memory, and one NumPy call runs on one core. On the NumPy backend each
parameter is cut into chunks of ``CHUNK`` elements (the arrays of one chunk stay
in cache between the passes of its update), and the chunks are shared among
:func:`host_threads` threads; NumPy's element-wise calls release the GIL. Nothing
is reduced across elements, so the result is the same bit for bit whatever the
chunking. On CuPy one call per array is what the GPU wants, and Adam's update of a
parameter is one fused kernel (:func:`capsnet.backend.fused`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import numpy as np

from capsnet import backend
from capsnet.layers.base import Parameter
from capsnet.parallel import host_threads, run_all as _run_all

__all__ = ["CHUNK", "Adam", "Optimizer", "SGD", "host_threads"]

CHUNK = 1 << 18  # elements per chunk of an update on the CPU: 1 MB of float32 per array

def _chunks(arrays: list[Any], numpy_backend: bool) -> list[list[Any]]:
    """The arrays (one parameter's data, grad and state, all of one shape) as lists of
    flat views of CHUNK elements each; the whole arrays when not on NumPy or not all
    contiguous."""
    if not numpy_backend or not all(a.flags.c_contiguous for a in arrays):
        return [arrays]
    flat = [a.reshape(-1) for a in arrays]
    n = flat[0].size
    return [[f[start:start + CHUNK] for f in flat] for start in range(0, n, CHUNK)] or [flat]


def _real(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{owner}: {name} must be finite, got {out}")
    return out


def _non_negative(owner: str, name: str, value: Any) -> float:
    out = _real(owner, name, value)
    if out < 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {out}")
    return out


def _item(value: Any) -> Any:
    """A Python scalar from a number or a 0-d array (what numpy.load gives back)."""
    return value.item() if isinstance(value, (np.ndarray, np.generic)) else value


class Optimizer:
    """Base of the optimizers: parameter bookkeeping, lazy state, checkpoints.

    Subclasses define ``_validate`` (clean hyper-parameters), ``hyperparams``,
    ``_state_names`` (the per-parameter arrays for given hyper-parameters) and
    ``_update`` (one parameter's step).
    """

    def __init__(self, params: Iterable[Parameter], lr: float):
        name = type(self).__name__
        if isinstance(params, Parameter):
            raise TypeError(f"{name} expected a list of Parameters, got a single Parameter; pass [param]")
        try:
            params = list(params)
        except TypeError:
            raise TypeError(
                f"{name} expected a list of Parameters (e.g. model.parameters()), "
                f"got {type(params).__name__}"
            ) from None
        if not params:
            raise ValueError(
                f"{name} got an empty parameter list: expected at least one Parameter; "
                "check that the model has parameters (model.parameters())"
            )
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{name} expected Parameters, got {type(p).__name__} at position {i}")
            if id(p) in seen:
                raise ValueError(
                    f"{name} got the same Parameter twice (positions {seen[id(p)]} and {i}): "
                    "each parameter must appear once, or it would be updated twice per step"
                )
            seen[id(p)] = i
            if np.dtype(p.data.dtype).kind != "f":
                raise TypeError(
                    f"{name} expected floating-point parameters, got dtype {p.data.dtype} at position {i}"
                )
        self.params: list[Parameter] = params
        self.lr = _non_negative(name, "lr", lr)
        self.steps = 0
        self.state: dict[Parameter, dict[str, Any]] = {}

    # -- what subclasses define ------------------------------------------------
    @classmethod
    def _validate(cls, **hyper: Any) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def hyperparams(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _state_names(cls, hyper: dict[str, Any]) -> tuple[str, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, data: Any, grad: Any, state: dict[str, Any], fresh: bool) -> None:  # pragma: no cover
        """One step for one parameter, or one chunk of it: ``data``, ``grad`` and the
        ``state`` arrays have one shape and are updated in place."""
        raise NotImplementedError

    def _apply(self, hyper: dict[str, Any]) -> None:
        for key, value in hyper.items():
            setattr(self, key, value)

    # -- training --------------------------------------------------------------
    def zero_grad(self) -> None:
        """Set every parameter's gradient to zero (in place)."""
        tasks = []
        for p in self.params:
            for (g,) in _chunks([p.grad], backend.backend_of(p.grad) == "numpy"):
                tasks.append(lambda g=g: g.fill(0))
        self._run(tasks)

    def step(self) -> None:
        """Update every ``p.data`` in place from ``p.grad``."""
        self._apply(self._validate(**self.hyperparams()))  # catches a bad lr set by hand
        self.steps += 1
        names = self._state_names(self.hyperparams())
        tasks = []
        for i, p in enumerate(self.params):
            self._check_param(i, p)
            state = self.state.get(p)
            fresh = state is None
            if fresh:
                xp = backend.get_array_module(p.data)
                state = self.state[p] = {n: xp.zeros_like(p.data) for n in names}
            else:
                self._check_state(i, p, state)
            keys = list(state)
            for data, grad, *values in _chunks([p.data, p.grad, *state.values()],
                                               backend.backend_of(p.data) == "numpy"):
                tasks.append(lambda d=data, g=grad, v=values, f=fresh, k=keys: self._update(d, g, dict(zip(k, v)), f))
        self._run(tasks)

    def _run(self, tasks: list) -> None:
        """The update tasks on the host threads when every parameter is on NumPy; here, in
        order, otherwise (CuPy's current device and stream belong to the calling thread)."""
        if all(backend.backend_of(p.data) == "numpy" for p in self.params):
            _run_all(tasks)
        else:
            for task in tasks:
                task()

    def _check_param(self, i: int, p: Parameter) -> None:
        if tuple(p.grad.shape) != tuple(p.data.shape) or p.grad.dtype != p.data.dtype:
            raise ValueError(
                f"{type(self).__name__}: parameter {i} has data {tuple(p.data.shape)} {p.data.dtype} "
                f"but grad {tuple(p.grad.shape)} {p.grad.dtype}; they must match in shape and dtype"
            )
        if backend.backend_of(p.grad) != backend.backend_of(p.data):
            raise ValueError(
                f"{type(self).__name__}: parameter {i} has data on {backend.backend_of(p.data)} "
                f"but grad on {backend.backend_of(p.grad)}; move both with Module.to"
            )

    def _check_state(self, i: int, p: Parameter, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if (
                tuple(value.shape) != tuple(p.data.shape)
                or value.dtype != p.data.dtype
                or backend.backend_of(value) != backend.backend_of(p.data)
            ):
                raise RuntimeError(
                    f"{type(self).__name__}: parameter {i} is now {tuple(p.data.shape)} {p.data.dtype} on "
                    f"{backend.backend_of(p.data)}, but its {name} is {tuple(value.shape)} {value.dtype} on "
                    f"{backend.backend_of(value)}; create the optimizer after casting or moving the model"
                )

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A flat dict of host NumPy arrays and Python scalars (copies).

        Keys: ``"optimizer"`` (the class name), the hyper-parameters, ``"steps"``,
        ``"num_params"`` and ``"state.<i>.<name>"`` for the i-th parameter's state.
        """
        out: dict[str, Any] = {"optimizer": type(self).__name__}
        out.update(self.hyperparams())
        out["steps"] = self.steps
        out["num_params"] = len(self.params)
        for i, p in enumerate(self.params):
            for name, value in self.state.get(p, {}).items():
                out[f"state.{i}.{name}"] = backend.to_numpy(value).copy()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore hyper-parameters, step count and per-parameter state.

        Everything is checked before anything changes: the optimizer's class, the
        number of parameters, and each array's shape against its parameter. Arrays
        are cast to each parameter's dtype and copied onto its device.
        """
        name = type(self).__name__
        where = f"{name}.load_state_dict"
        if not isinstance(state, dict) and not hasattr(state, "keys"):
            raise TypeError(f"{where} expected a dict from state_dict(), got {type(state).__name__}")
        state = {k: state[k] for k in state.keys()}
        saved_by = _item(state.get("optimizer"))
        if saved_by != name:
            raise ValueError(f"{where} expected a state dict saved by {name}, got one from {saved_by!r}")
        hyper_keys = tuple(self.hyperparams())
        missing = [k for k in (*hyper_keys, "steps", "num_params") if k not in state]
        if missing:
            raise KeyError(f"{where}: the state dict lacks {missing}")
        n = _item(state["num_params"])
        if n != len(self.params):
            raise ValueError(
                f"{where}: expected state for {len(self.params)} parameters (this optimizer's), "
                f"got state for {n}; build the optimizer over the same parameters, in the same order"
            )
        steps = _item(state["steps"])
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{where}: expected 'steps' to be an integer >= 0, got {steps!r}")
        hyper = self._validate(**{k: _item(state[k]) for k in hyper_keys})
        names = self._state_names(hyper)

        per_param: list[dict[str, np.ndarray]] = [{} for _ in self.params]
        known = {"optimizer", "steps", "num_params", *hyper_keys}
        for key, value in state.items():
            if key in known:
                continue
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or parts[2] not in names:
                raise KeyError(
                    f"{where}: unexpected key {key!r}; expected 'state.<i>.<name>' with i < {n} "
                    f"and name in {list(names)}"
                )
            i = int(parts[1])
            if i >= n:
                raise KeyError(f"{where}: key {key!r} names parameter {i}, but there are only {n}")
            per_param[i][parts[2]] = value

        wrong = []
        for i, (p, arrays) in enumerate(zip(self.params, per_param)):
            if arrays and set(arrays) != set(names):
                raise KeyError(
                    f"{where}: parameter {i} has state {sorted(arrays)}, expected all of {list(names)}"
                )
            if steps > 0 and names and not arrays:
                raise KeyError(f"{where}: {steps} steps were taken but parameter {i} has no {list(names)}")
            for key, value in arrays.items():
                shape = tuple(np.shape(value))
                if shape != p.shape:
                    wrong.append(f"state.{i}.{key}: expected {p.shape}, got {shape}")
        if wrong:
            raise ValueError(f"{where}: wrong shapes: " + "; ".join(wrong))

        self._apply(hyper)
        self.steps = steps
        self.state = {}
        for p, arrays in zip(self.params, per_param):
            if arrays:
                device = backend.backend_of(p.data)
                self.state[p] = {
                    key: backend.to_device(np.array(backend.to_numpy(value), dtype=p.dtype, copy=True), device)
                    for key, value in arrays.items()
                }

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({len(self.params)} parameters, {hyper})"


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and L2 weight decay (PyTorch's form).

    ``g = grad + weight_decay * p``; ``buf = momentum * buf + g`` (``buf = g`` at
    the first step); the update is ``g + momentum * buf`` with Nesterov, else
    ``buf``; ``p -= lr * update``. Without momentum, ``p -= lr * g``.
    """

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lr)
        self._apply(self._validate(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    @classmethod
    def _validate(cls, lr: Any, momentum: Any, nesterov: Any, weight_decay: Any) -> dict[str, Any]:
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"SGD: nesterov must be True or False, got {nesterov!r}")
        hyper = {
            "lr": _non_negative("SGD", "lr", lr),
            "momentum": _non_negative("SGD", "momentum", momentum),
            "nesterov": bool(nesterov),
            "weight_decay": _non_negative("SGD", "weight_decay", weight_decay),
        }
        if hyper["nesterov"] and hyper["momentum"] <= 0:
            raise ValueError(
                f"SGD: nesterov=True needs momentum > 0, got momentum={hyper['momentum']}; "
                "set momentum (e.g. 0.9) or nesterov=False"
            )
        return hyper

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    @classmethod
    def _state_names(cls, hyper: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if hyper["momentum"] > 0 else ()

    def _update(self, data: Any, grad: Any, state: dict[str, Any], fresh: bool) -> None:
        xp = backend.get_array_module(data, grad)
        g = grad
        if self.weight_decay:
            g = xp.multiply(data, self.weight_decay)
            g += grad
        if self.momentum:
            buf = state["momentum_buffer"]
            if fresh:
                buf[...] = g
            else:
                buf *= self.momentum
                buf += g
            if self.nesterov:
                update = xp.multiply(buf, self.momentum)
                update += g
            else:
                update = buf
        else:
            update = g
        delta = xp.multiply(update, self.lr)
        data -= delta


def _adam_kernel(xp: Any) -> Any:
    """Adam's update of one parameter as one element-wise function (one fused kernel on
    CuPy); the operations in the order of :meth:`Adam._update`, so the numbers agree."""

    def adam_update(p, g, m, v, b1, one_b1, b2, one_b2, bias2, eps, step_size):  # noqa: PLR0913
        m *= b1
        m += g * one_b1
        v *= b2
        v += g * g * one_b2
        p -= m / (xp.sqrt(v / bias2) + eps) * step_size

    return adam_update


def _adam_decay_kernel(xp: Any) -> Any:
    """:func:`_adam_kernel` with L2 weight decay, g + weight_decay * p, in the same kernel."""

    def adam_update_decayed(p, g, m, v, b1, one_b1, b2, one_b2, bias2, eps, step_size, decay):  # noqa: PLR0913
        gd = p * decay + g
        m *= b1
        m += gd * one_b1
        v *= b2
        v += gd * gd * one_b2
        p -= m / (xp.sqrt(v / bias2) + eps) * step_size

    return adam_update_decayed


_adam_fused = backend.fused(_adam_kernel)
_adam_decay_fused = backend.fused(_adam_decay_kernel)


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015, Algorithm 1) with bias correction.

    ``g = grad + weight_decay * p`` (L2 decay as in PyTorch's Adam, not AdamW);
    ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g**2``;
    ``p -= lr * (m / (1-b1**t)) / (sqrt(v / (1-b2**t)) + eps)``.
    ``m`` and ``v`` are kept across steps, one pair per parameter, in its dtype.
    Each step allocates one parameter-sized work array (two with weight decay).
    """

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"Adam: betas must be a pair (beta1, beta2), got {betas!r}")
        self._apply(self._validate(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay))

    @classmethod
    def _validate(cls, lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any) -> dict[str, Any]:
        hyper = {
            "lr": _non_negative("Adam", "lr", lr),
            "beta1": _real("Adam", "beta1", beta1),
            "beta2": _real("Adam", "beta2", beta2),
            "eps": _non_negative("Adam", "eps", eps),
            "weight_decay": _non_negative("Adam", "weight_decay", weight_decay),
        }
        for key in ("beta1", "beta2"):
            if not 0.0 <= hyper[key] < 1.0:
                raise ValueError(f"Adam: {key} must be in [0, 1), got {hyper[key]}")
        return hyper

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def hyperparams(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    @classmethod
    def _state_names(cls, hyper: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, data: Any, grad: Any, state: dict[str, Any], fresh: bool) -> None:
        xp = backend.get_array_module(data, grad)
        b1, b2, t = self.beta1, self.beta2, self.steps
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if xp is not np:  # on the GPU: one kernel per parameter instead of thirteen
            scalars = (b1, 1.0 - b1, b2, 1.0 - b2, 1.0 - b2**t, self.eps, self.lr / (1.0 - b1**t))
            if self.weight_decay:
                _adam_decay_fused(data, grad, m, v, *scalars, self.weight_decay)
            else:
                _adam_fused(data, grad, m, v, *scalars)
            return
        g = grad
        if self.weight_decay:
            g = xp.multiply(data, self.weight_decay)
            g += grad
        work = xp.empty_like(data)
        m *= b1
        xp.multiply(g, 1.0 - b1, out=work)
        m += work
        v *= b2
        xp.multiply(g, g, out=work)
        work *= 1.0 - b2
        v += work
        # work <- sqrt(v_hat) + eps, then the step lr * m_hat / work
        xp.divide(v, 1.0 - b2**t, out=work)
        xp.sqrt(work, out=work)
        work += self.eps
        xp.divide(m, work, out=work)
        work *= self.lr / (1.0 - b1**t)
        data -= work
