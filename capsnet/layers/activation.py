"""Element-wise activations: ``relu`` / ``relu_backward`` with ``ReLU``, ``sigmoid`` /
``sigmoid_backward`` with ``Sigmoid``. Any shape in, the same shape out."""
from __future__ import annotations

from typing import Any

import numpy as np

from capsnet import backend
from capsnet.layers.base import Module


# NumPy's maximum against a scalar runs without its SIMD loop, which it takes only when both
# operands are contiguous arrays: on a (16, 22, 22, 64) float32 activation, one core, max(x, 0)
# took 0.18 ms in place where max(x, zeros) took 0.05 ms and an add 0.03 ms (NumPy 1.26 and
# 2.4 alike; a (1, k) block of zeros broadcast over rows, 0.09 ms, loses it too). So the NumPy
# path compares each 64K-element block of the memory with one block of zeros (NOTES.md).
_BLOCK = 1 << 16
_zero_blocks: dict[Any, Any] = {}


def _flat(a: Any) -> Any:
    """A 1-D view of ``a``'s elements in memory order, or None when they are not one dense
    block (a channels-last view of a convolution's output is one)."""
    if a.flags.c_contiguous:
        return a.reshape(-1)
    t = a.transpose(sorted(range(a.ndim), key=lambda k: a.strides[k], reverse=True))
    return t.reshape(-1) if t.flags.c_contiguous else None


def _relu_to(x: Any, out: Any) -> Any:
    """out = max(x, 0) for ``out`` of x's shape, dtype and strides (x itself: in place)."""
    xp = backend.get_array_module(x)
    if xp is np and x.size >= _BLOCK // 4 and x.strides == out.strides and x.dtype == out.dtype:
        fx, fo = _flat(x), _flat(out)
        if fx is not None and fo is not None:
            zeros = _zero_blocks.get(x.dtype)
            if zeros is None:
                zeros = _zero_blocks.setdefault(x.dtype, np.zeros(_BLOCK, dtype=x.dtype))
            for start in range(0, fx.size, _BLOCK):  # blocks of memory, whatever the shape
                stop = min(start + _BLOCK, fx.size)
                np.maximum(fx[start:stop], zeros[: stop - start], out=fo[start:stop])
            return out
    return xp.maximum(x, 0, out=out)


def relu(x: Any) -> Any:
    """max(x, 0), any shape (the output in x's memory layout)."""
    return _relu_to(x, backend.get_array_module(x).empty_like(x))


def relu_backward(grad_out: Any, x: Any) -> Any:
    """Gradient of :func:`relu` (0 at x == 0)."""
    return grad_out * (x > 0)


class ReLU(Module):
    """max(x, 0), any shape. With ``inplace=True`` the forward overwrites its input
    and the backward its incoming gradient, saving two allocations the size of
    the activation: for a caller that owns both arrays and needs neither again."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""

    def forward(self, x: Any) -> Any:
        if self.inplace:
            y = _relu_to(x, x)
        else:
            y = relu(x)
        if self.training:
            self._save(y > 0)
        else:
            self._save()  # evaluation: no mask, which would be a second pass over the output
        return y

    def backward(self, grad_out: Any) -> Any:
        (mask,) = self._pop()
        if self.inplace:
            grad_out *= mask
            return grad_out
        return grad_out * mask


def sigmoid(x: Any) -> Any:
    """1 / (1 + exp(-x)), computed without overflow for any x."""
    xp = backend.get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1, e) / (1 + e)


def sigmoid_backward(grad_out: Any, y: Any) -> Any:
    """Gradient of :func:`sigmoid`, given its output y."""
    return grad_out * y * (1 - y)


class Sigmoid(Module):
    """Element-wise 1 / (1 + exp(-x)), any shape; caches its output for the backward."""

    def forward(self, x: Any) -> Any:
        y = sigmoid(x)
        self._save(y)
        return y

    def backward(self, grad_out: Any) -> Any:
        (y,) = self._pop()
        return sigmoid_backward(grad_out, y)


__all__ = ["ReLU", "Sigmoid", "relu", "relu_backward", "sigmoid", "sigmoid_backward"]
