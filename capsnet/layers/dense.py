"""The fully connected layer (``linear`` / ``linear_backward`` and ``Linear``) and ``Flatten``."""
from __future__ import annotations

import math
from typing import Any

from capsnet import backend
from capsnet.layers.base import Module, as_rng, check_input, init_param


def linear(x: Any, w: Any, b: Any | None = None) -> Any:
    """y = x W^T + b. x: (B, in), w: (out, in), b: (out,) -> (B, out)."""
    y = x @ w.T
    if b is not None:
        y += b
    return y


def linear_backward(grad_out: Any, x: Any, w: Any) -> tuple[Any, Any, Any]:
    """Gradients of :func:`linear` w.r.t. (x, w, b); grad_out: (B, out)."""
    return grad_out @ w, grad_out.T @ x, grad_out.sum(axis=0)


class Linear(Module):
    """(B, in_features) -> (B, out_features); weights uniform in +-1/sqrt(in), as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: Any = "float32", seed: Any = None):
        super().__init__()
        if not isinstance(in_features, int) or not isinstance(out_features, int) or min(in_features, out_features) < 1:
            raise ValueError(f"Linear sizes must be positive integers, got {in_features!r} and {out_features!r}")
        self.in_features, self.out_features = in_features, out_features
        rng = as_rng(seed)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = init_param((out_features, in_features), bound, dtype, rng)
        self.bias = init_param((out_features,), bound, dtype, rng) if bias else None

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}"

    def forward(self, x: Any) -> Any:
        check_input("Linear", x, (None, self.in_features), self.weight.dtype)
        backend.get_array_module(x, self.weight.data)
        self._save(x)
        return linear(x, self.weight.data, None if self.bias is None else self.bias.data)

    def backward(self, grad_out: Any) -> Any:
        (x,) = self._pop()
        gx, gw, gb = linear_backward(grad_out, x, self.weight.data)
        self.weight.grad += gw
        if self.bias is not None:
            self.bias.grad += gb
        return gx




class Flatten(Module):
    """(B, d1, d2, ...) -> (B, d1 * d2 * ...): the bridge from images to Linear layers.

    backward reshapes the gradient back to the input's shape.
    """

    def forward(self, x: Any) -> Any:
        if not hasattr(x, "shape") or len(x.shape) < 1:
            raise ValueError(f"Flatten expected an array with a batch axis, got {getattr(x, 'shape', type(x))}")
        self._save(tuple(x.shape))
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: an empty batch keeps its width

    def backward(self, grad_out: Any) -> Any:
        (shape,) = self._pop()
        return grad_out.reshape(shape)



class Reshape(Module):
    """(B, ...) -> (B, *shape): the bridge from Linear layers back to images (a
    deconvolution decoder). backward reshapes the gradient back."""

    def __init__(self, *shape: int):
        super().__init__()
        if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"Reshape expects positive sizes, e.g. Reshape(16, 7, 7), got {shape}")
        self.shape = shape

    def extra_repr(self) -> str:
        return ", ".join(map(str, self.shape))

    def forward(self, x: Any) -> Any:
        size = math.prod(x.shape[1:]) if hasattr(x, "shape") and len(x.shape) > 1 else None
        if size != math.prod(self.shape):
            raise ValueError(f"Reshape{self.shape} expected input of shape (batch, ...) with "
                             f"{math.prod(self.shape)} values per example, got {tuple(getattr(x, 'shape', ()))}")
        self._save(tuple(x.shape))
        return x.reshape(x.shape[0], *self.shape)

    def backward(self, grad_out: Any) -> Any:
        (shape,) = self._pop()
        return grad_out.reshape(shape)


__all__ = ["Flatten", "Linear", "Reshape", "linear", "linear_backward"]
