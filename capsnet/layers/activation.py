"""Element-wise activations: ``relu`` / ``relu_backward`` with ``ReLU``, ``sigmoid`` /
``sigmoid_backward`` with ``Sigmoid``. Any shape in, the same shape out."""
from __future__ import annotations

from typing import Any

from capsnet import backend
from capsnet.layers.base import Module


def relu(x: Any) -> Any:
    """max(x, 0), any shape."""
    xp = backend.get_array_module(x)
    return xp.maximum(x, 0)


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
            y = backend.get_array_module(x).maximum(x, 0, out=x)
        else:
            y = relu(x)
        self._save(y > 0)
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
