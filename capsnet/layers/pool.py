"""2-D max pooling: ``max_pool2d`` / ``max_pool2d_backward`` and ``MaxPool2d``.

Built from strided views, one per kernel offset (a loop over the kernel, never over
pixels). Ties: when several inputs of a window hold its maximum, the first in
row-major order within the window (smallest ky, then smallest kx) takes it and
receives the whole gradient, as in PyTorch's CPU kernel; a NaN wins its window, as
there. Padded positions never win, even against -inf.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from capsnet import backend
from capsnet.layers.base import Module, check_input, conv_output_size

__all__ = ["MaxPool2d", "max_pool2d", "max_pool2d_backward"]


def _geometry(shape: tuple, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    if padding > kernel // 2:
        raise ValueError(f"max pooling padding must be at most half the kernel ({kernel // 2}), got {padding}")
    return (conv_output_size(shape[2], kernel, stride, padding), conv_output_size(shape[3], kernel, stride, padding))


def _windows(x_pad: Any, kernel: int, stride: int, oh: int, ow: int):
    """Yield (offset index ky * kernel + kx, the (B, C, OH, OW) view of that offset)."""
    for ky in range(kernel):
        for kx in range(kernel):
            yield ky * kernel + kx, (slice(None), slice(None), slice(ky, ky + stride * oh, stride),
                                     slice(kx, kx + stride * ow, stride))


def _in_bounds(xp: Any, size: int, out: int, offset: int, stride: int, padding: int) -> Any:
    """Which of the ``out`` window positions of kernel offset ``offset`` fall inside the input."""
    pos = offset + stride * np.arange(out)
    return xp.asarray((pos >= padding) & (pos < padding + size))


def max_pool2d(x: Any, kernel: int, stride: int | None = None, padding: int = 0) -> tuple[Any, Any]:
    """x (B, C, H, W) -> (y (B, C, OH, OW), argmax (B, C, OH, OW)): the maximum of each
    kernel x kernel window and which offset of the window (ky * kernel + kx) held it.
    A NaN in a window wins it (as in PyTorch); padded positions never do."""
    xp = backend.get_array_module(x)
    stride = kernel if stride is None else stride
    oh, ow = _geometry(tuple(x.shape), kernel, stride, padding)
    x_pad = x
    if padding:
        pads = ((0, 0), (0, 0), (padding, padding), (padding, padding))
        x_pad = xp.pad(x, pads, constant_values=-xp.inf)
    y = arg = on_pad = None
    for index, where in _windows(x_pad, kernel, stride, oh, ow):
        window = x_pad[where]
        inside = None
        if padding:
            ky, kx = divmod(index, kernel)
            inside = (_in_bounds(xp, x.shape[2], oh, ky, stride, padding)[:, None]
                      & _in_bounds(xp, x.shape[3], ow, kx, stride, padding)[None, :])
        if y is None:
            y = window.copy()
            arg = xp.zeros(y.shape, dtype=xp.int32)
            # where the best so far is a padded cell (only with padding)
            on_pad = None if inside is None else xp.broadcast_to(~inside, y.shape).copy()
            continue
        # strict: an equal value later in the window does not take over; a NaN does
        better = (window > y) | xp.isnan(window)
        if on_pad is not None:  # a real cell beats a padded best; a padded cell never wins
            better = (better | on_pad) & inside
            on_pad &= ~better
        xp.copyto(y, window, where=better)
        arg = xp.where(better, xp.int32(index), arg)  # not arg[better] = ...: no host sync on CuPy
    return y, arg


def max_pool2d_backward(grad_out: Any, argmax: Any, x_shape: tuple, kernel: int, stride: int | None = None,
                        padding: int = 0) -> Any:
    """Gradient of :func:`max_pool2d` w.r.t. x: each output's gradient goes to its argmax."""
    xp = backend.get_array_module(grad_out, argmax)
    stride = kernel if stride is None else stride
    b, c, h, w = x_shape
    oh, ow = _geometry(tuple(x_shape), kernel, stride, padding)
    g_pad = xp.zeros((b, c, h + 2 * padding, w + 2 * padding), dtype=grad_out.dtype)
    for index, where in _windows(g_pad, kernel, stride, oh, ow):
        g_pad[where] += xp.where(argmax == index, grad_out, 0)
    return g_pad[:, :, padding:h + padding, padding:w + padding] if padding else g_pad


class MaxPool2d(Module):
    """Max pooling. Input (B, C, H, W) -> (B, C, OH, OW); ``stride`` defaults to the kernel.
    Ties go to the first maximum of the window in row-major order (see the module docstring)."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        super().__init__()
        stride = kernel_size if stride is None else stride
        for name, value, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MaxPool2d {name} must be an integer >= {low}, got {value!r}")
        if padding > kernel_size // 2:
            raise ValueError(f"MaxPool2d padding must be at most half the kernel ({kernel_size // 2}), got {padding}")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x: Any) -> Any:
        check_input("MaxPool2d", x, (None, None, None, None), None)
        if x.dtype.kind != "f":
            raise TypeError(f"MaxPool2d expected a floating input, got {x.dtype}")
        y, arg = max_pool2d(x, self.kernel_size, self.stride, self.padding)
        self._save(arg, tuple(x.shape))
        return y

    def backward(self, grad_out: Any) -> Any:
        arg, shape = self._pop()
        return max_pool2d_backward(grad_out, arg, shape, self.kernel_size, self.stride, self.padding)
