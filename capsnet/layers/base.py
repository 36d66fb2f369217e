"""Parameter, Buffer, Module and Sequential: the state and bookkeeping every layer shares
(train/eval mode, caches, state dicts, dtype and device), and the helpers layers are built
with: input checks (check_input, check_batch), conv_output_size, resolve_dtype and
seeded initialisation (as_rng, init_param)."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from capsnet import backend


class _Held:
    """An array a module holds in ``.data``: its shape, dtype and a repr naming its backend."""

    __slots__ = ("data",)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, backend={backend.backend_of(self.data)!r})"


class Parameter(_Held):
    """A trainable array and the gradient accumulated into it (same shape, dtype, device)."""

    __slots__ = ("grad",)

    def __init__(self, data: Any):
        xp = backend.get_array_module(data)
        self.data = data
        self.grad = xp.zeros_like(data)


class Buffer(_Held):
    """State a module keeps that is not trained: BatchNorm's running statistics, a
    dropout layer's draw counter. Saved in ``state_dict`` and moved by ``to()`` with
    the parameters (unless ``host``: kept on the host, for counters read every step);
    no gradient, and optimizers never see it."""

    __slots__ = ("host",)

    def __init__(self, data: Any, host: bool = False):
        self.data = data
        self.host = host


def _nbytes(value: Any) -> int:
    """Bytes of the arrays in a cache: an array, or tuples, lists and dicts of them
    (a workspace in a cache is skipped: the arrays taken from it are counted)."""
    if value is None:
        return 0
    if hasattr(value, "nbytes") and hasattr(value, "shape"):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis: (size + 2 padding - kernel) // stride + 1."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(
            f"convolution output would be empty: input {size} px, kernel {kernel}, "
            f"stride {stride}, padding {padding}"
        )
    return out


def resolve_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as a NumPy dtype, float32 or float64; any other raises TypeError."""
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"capsnet works in float32 or float64, got dtype {dt}")
    return dt


class Module:
    """Base of every layer.

    ``forward`` computes the output and, in training mode only, caches what
    ``backward`` needs. ``backward(grad_out)`` returns the gradient of the
    (first) input, adds (``+=``) parameter gradients into ``p.grad`` and frees
    the cache. Parameters and sub-modules are found from the attributes, in the
    order they were set.
    """

    def __init__(self) -> None:
        self.training = True
        self._cache: Any = None

    # -- calling ---------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, grad_out: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def folded_with(self, following: "Module") -> Any:
        """In evaluation, a function computing ``following(self(x))`` in one step, or None
        (the default) when this module cannot fold ``following`` into itself. A convolution
        folds the batch norm after it into its weights (:meth:`capsnet.layers.Conv2d.folded_with`);
        :class:`Sequential` asks each child about the next one in evaluation."""
        return None

    def _save(self, *values: Any) -> None:
        """Cache values for backward, in training mode only."""
        self._cache = values if self.training else None

    def _pop(self) -> tuple:
        if self._cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a cached forward pass: "
                "call forward in training mode (module.train()) before each backward"
            )
        values, self._cache = self._cache, None
        return values

    # -- structure -------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Buffer]]:
        for name, value in vars(self).items():
            if isinstance(value, Buffer):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_buffers(prefix + name + ".")

    def _named_state(self) -> list[tuple[str, Any]]:
        """Parameters, then buffers: everything state_dict saves."""
        return [*self.named_parameters(), *self.named_buffers()]

    def modules(self) -> Iterator["Module"]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def train(self, mode: bool = True) -> "Module":
        """Training (True) or evaluation mode for the whole tree; leaving training
        mode drops the cached forward passes (a backward needs training mode)."""
        for m in self.modules():
            m.training = mode
            if not mode:
                m._cache = None
        return self

    def release(self) -> "Module":
        """Drop, in the whole tree, every cached forward pass and every scratch buffer
        kept between calls (the Fourier convolution's workspace and spectra).

        Nothing is lost but speed: the next call allocates afresh. A backward needs
        a new forward after this."""
        for m in self.modules():
            m._cache = None
            m._release_scratch()
        return self

    def _release_scratch(self) -> None:
        """Free this module's own memory kept between calls; layers that keep some override it."""

    def _scratch_nbytes(self) -> int:
        return 0

    def held_nbytes(self) -> int:
        """Bytes the tree holds besides its parameters and gradients: cached forward
        passes awaiting a backward, and scratch kept between calls."""
        return sum(_nbytes(m._cache) + m._scratch_nbytes() for m in self.modules())

    def eval(self) -> "Module":
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator["Module"]:
        """``with model.evaluating():`` runs the block in evaluation mode, then puts the
        tree back in the mode ``self`` had (``self.train(was_training)``), also when the
        block raises. Entering drops the cached forward passes, as :meth:`eval` does."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad[...] = 0

    # -- dtype and device ---------------------------------------------------
    @property
    def dtype(self) -> np.dtype | None:
        params = self.parameters()
        return params[0].dtype if params else None

    def astype(self, dtype: Any) -> "Module":
        """Cast every parameter (and zero its gradient) and every floating buffer to
        float32 or float64."""
        dt = resolve_dtype(dtype)
        for p in self.parameters():
            p.data = p.data.astype(dt)
            p.grad = p.grad.astype(dt)
        for _, b in self.named_buffers():
            if b.data.dtype.kind == "f":
                b.data = b.data.astype(dt)
        return self

    def to(self, backend_name: str) -> "Module":
        """Move every parameter and buffer to 'numpy' or 'cupy'."""
        self.release()
        for p in self.parameters():
            p.data = backend.to_device(p.data, backend_name)
            p.grad = backend.to_device(p.grad, backend_name)
        for _, b in self.named_buffers():
            if not b.host:
                b.data = backend.to_device(b.data, backend_name)
        return self

    # -- checkpoints -------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Copies of the parameters, then the buffers, as host NumPy arrays, by dotted name."""
        return OrderedDict((name, backend.to_numpy(p.data).copy()) for name, p in self._named_state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load parameters and buffers by name; every name must match, with its shape.

        Values are cast to each parameter's dtype and moved to its device.
        """
        params = dict(self._named_state())
        missing = [n for n in params if n not in state]
        unexpected = [n for n in state if n not in params]
        if missing or unexpected:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: names do not match; "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        wrong = [
            f"{n}: expected {params[n].shape}, got {tuple(np.shape(state[n]))}"
            for n in params
            if tuple(np.shape(state[n])) != params[n].shape
        ]
        if wrong:
            raise ValueError(f"{type(self).__name__}.load_state_dict: wrong shapes: " + "; ".join(wrong))
        for name, p in params.items():
            value = backend.to_device(backend.to_numpy(state[name]), backend.backend_of(p.data))
            p.data[...] = value.astype(p.dtype, copy=False)

    def __repr__(self) -> str:
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in children]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"

    def extra_repr(self) -> str:
        return ""


class Sequential(Module):
    """Modules applied in order; children are named '0', '1', ..."""

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Modules, got {type(layer).__name__} at position {i}")
            setattr(self, str(i), layer)
        self._n = len(layers)

    def __getitem__(self, i: int) -> Module:
        return getattr(self, str(range(self._n)[i]))

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Module]:
        return (self[i] for i in range(self._n))

    def forward(self, x: Any) -> Any:
        """The children in order; in evaluation a child that can fold the next one into itself
        (:meth:`Module.folded_with`: a convolution and the batch norm after it) runs both at once."""
        layers, i = list(self), 0
        while i < len(layers):
            both = layers[i].folded_with(layers[i + 1]) if not self.training and i + 1 < len(layers) else None
            x = layers[i](x) if both is None else both(x)
            i += 1 if both is None else 2
        return x

    def backward(self, grad_out: Any) -> Any:
        for layer in reversed(list(self)):
            grad_out = layer.backward(grad_out)
        return grad_out


def check_input(module: str, x: Any, expected: tuple, dtype: Any, what: str = "input") -> Any:
    """Validate an input's type, shape and dtype; return its array module.

    ``expected`` holds ints for fixed sizes and None for free ones (the batch first).
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{module} expected an array as {what}, got {type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        want = "(" + ", ".join(
            ("batch" if k == 0 else "any") if e is None else str(e) for k, e in enumerate(expected)
        ) + ")"
        raise ValueError(f"{module} expected {what} of shape {want}, got {shape}")
    if expected and expected[0] is None and shape[0] == 0:
        check_batch(module, shape)
    if dtype is not None and x.dtype != dtype:
        want = np.dtype(dtype)
        hint = f"cast the input with .astype('{want}')"
        if np.dtype(x.dtype) in (np.float32, np.float64):
            hint += f" or the module with .astype('{x.dtype}')"
        elif np.dtype(x.dtype) == np.uint8:
            hint += f" (uint8 images: capsnet.data.to_float(images, '{want}') also scales them to [0, 1])"
        raise TypeError(f"{module} expected {what} of dtype {want} (its parameters' dtype), got {x.dtype}; {hint}")
    return backend.get_array_module(x)


def check_batch(module: str, shape: tuple) -> None:
    """Refuse an empty batch with a message, rather than a reshape error deep inside."""
    if not shape or shape[0] == 0:
        raise ValueError(f"{module} got an empty batch (shape {tuple(shape)}): give it at least one example")


def as_rng(seed: Any) -> np.random.Generator:
    """A host generator from a seed, or the generator itself."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def init_param(shape: tuple[int, ...], scale: float, dtype: Any, seed: Any, kind: str = "uniform") -> Parameter:
    """A parameter drawn on the host with a seeded generator, cast, then moved to
    the current backend: the same seed gives the same weights on every backend."""
    rng = as_rng(seed)
    dt = resolve_dtype(dtype)
    if kind == "uniform":
        host = rng.uniform(-scale, scale, size=shape)
    elif kind == "normal":
        host = rng.standard_normal(size=shape) * scale
    elif kind == "zeros":
        host = np.zeros(shape)
    else:
        raise ValueError(f"unknown initialisation {kind!r}")
    return Parameter(backend.to_device(host.astype(dt)))
