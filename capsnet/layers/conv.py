"""2-D convolution as im2col plus one matrix product.

Internally the convolution works channels-last: the patch matrix has rows
(batch, out_y, out_x) and columns (kernel_y, kernel_x, channel), so every copy
in im2col/col2im moves whole contiguous channel vectors. The public functions
take and return NCHW arrays like every other image API here.
"""
from __future__ import annotations

import math
from typing import Any

from capsnet import backend
from capsnet.layers.base import Module, as_rng, check_input, init_param


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(
            f"convolution output would be empty: input {size} px, kernel {kernel}, "
            f"stride {stride}, padding {padding}"
        )
    return out


def im2col(x_nhwc: Any, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    """Patches of a channels-last batch.

    x_nhwc: (B, H, W, C) -> col: (B * OH * OW, KH * KW * C), ordered (b, oy, ox) by
    (ky, kx, c). A Python loop runs over the KH*KW kernel offsets only.
    """
    xp = backend.get_array_module(x_nhwc)
    b, h, w, c = x_nhwc.shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    if padding:
        x_nhwc = xp.pad(x_nhwc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    col = xp.empty((b, oh, ow, kh, kw, c), dtype=x_nhwc.dtype)
    for ky in range(kh):
        ys = slice(ky, ky + stride * oh, stride)
        for kx in range(kw):
            col[:, :, :, ky, kx, :] = x_nhwc[:, ys, kx : kx + stride * ow : stride, :]
    return col.reshape(b * oh * ow, kh * kw * c)


def col2im(col: Any, x_shape_nhwc: tuple, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    """Adjoint of :func:`im2col`: scatter-add patches back to (B, H, W, C)."""
    xp = backend.get_array_module(col)
    b, h, w, c = x_shape_nhwc
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    col6 = col.reshape(b, oh, ow, kh, kw, c)
    out = xp.zeros((b, h + 2 * padding, w + 2 * padding, c), dtype=col.dtype)
    for ky in range(kh):
        ys = slice(ky, ky + stride * oh, stride)
        for kx in range(kw):
            out[:, ys, kx : kx + stride * ow : stride, :] += col6[:, :, :, ky, kx, :]
    if padding:
        out = out[:, padding:-padding, padding:-padding, :]
    return out


def _weight_matrix(w: Any) -> Any:
    """(O, C, KH, KW) -> (KH*KW*C, O), matching im2col's column order."""
    o = w.shape[0]
    return w.transpose(2, 3, 1, 0).reshape(-1, o)


def conv2d_nhwc(x_nhwc: Any, w: Any, b: Any | None, stride: int = 1, padding: int = 0) -> tuple[Any, Any]:
    """Channels-last convolution; returns (y (B, OH, OW, O), col) so a caller can
    keep the patch matrix for the backward pass."""
    xp = backend.get_array_module(x_nhwc, w)
    o, c, kh, kw = w.shape
    col = im2col(x_nhwc, kh, kw, stride, padding)
    bsz, h, wd, _ = x_nhwc.shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(wd, kw, stride, padding)
    y = col @ _weight_matrix(w)
    if b is not None:
        y += b
    return y.reshape(bsz, oh, ow, o), col


def conv2d_nhwc_backward(
    grad_y_nhwc: Any,
    col: Any,
    x_shape_nhwc: tuple,
    w: Any,
    stride: int = 1,
    padding: int = 0,
    need_input_grad: bool = True,
) -> tuple[Any | None, Any, Any]:
    """Gradients of :func:`conv2d_nhwc`: (grad_x_nhwc or None, grad_w, grad_b).

    ``col`` is the patch matrix from the forward pass; it is overwritten by the
    input gradient's patches to save memory.
    """
    xp = backend.get_array_module(grad_y_nhwc, w)
    o, c, kh, kw = w.shape
    g2 = grad_y_nhwc.reshape(-1, o)
    grad_w = (col.T @ g2).reshape(kh, kw, c, o).transpose(3, 2, 0, 1)
    grad_b = g2.sum(axis=0)
    grad_x = None
    if need_input_grad:
        xp.matmul(g2, _weight_matrix(w).T, out=col)
        grad_x = col2im(col, x_shape_nhwc, kh, kw, stride, padding)
    return grad_x, grad_w, grad_b


def conv2d(x: Any, w: Any, b: Any | None = None, stride: int = 1, padding: int = 0) -> Any:
    """2-D cross-correlation. x: (B, C, H, W), w: (O, C, KH, KW), b: (O,) -> (B, O, OH, OW)."""
    y, _ = conv2d_nhwc(x.transpose(0, 2, 3, 1), w, b, stride, padding)
    return y.transpose(0, 3, 1, 2)


def conv2d_backward(
    grad_out: Any, x: Any, w: Any, stride: int = 1, padding: int = 0
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`conv2d` w.r.t. (x, w, b); grad_out: (B, O, OH, OW)."""
    o, c, kh, kw = w.shape
    x_nhwc = x.transpose(0, 2, 3, 1)
    col = im2col(x_nhwc, kh, kw, stride, padding)
    gx, gw, gb = conv2d_nhwc_backward(
        grad_out.transpose(0, 2, 3, 1), col, x_nhwc.shape, w, stride, padding
    )
    return gx.transpose(0, 3, 1, 2), gw, gb


class Conv2d(Module):
    """Convolution layer. Input (B, C, H, W) -> output (B, O, OH, OW).

    Weights (O, C, KH, KW) and bias (O,) start uniform in +-1/sqrt(C*KH*KW), as in
    PyTorch. ``input_grad=False`` skips the input gradient (a network's first layer).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        *,
        input_grad: bool = True,
        dtype: Any = "float32",
        seed: Any = None,
    ):
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("kernel_size", kernel_size, 1),
            ("stride", stride, 1),
            ("padding", padding, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"Conv2d {name} must be an integer >= {low}, got {value!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.input_grad = input_grad
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        rng = as_rng(seed)
        self.weight = init_param((out_channels, in_channels, kernel_size, kernel_size), bound, dtype, rng)
        self.bias = init_param((out_channels,), bound, dtype, rng) if bias else None

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )

    def forward_nhwc(self, x_nhwc: Any) -> Any:
        """(B, H, W, C) -> (B, OH, OW, O), for layers that stay channels-last."""
        check_input(type(self).__name__, x_nhwc, (None, None, None, self.in_channels), self.weight.dtype,
                    "channels-last input")
        b = self.bias.data if self.bias is not None else None
        y, col = conv2d_nhwc(x_nhwc, self.weight.data, b, self.stride, self.padding)
        self._save(col, x_nhwc.shape)
        return y

    def backward_nhwc(self, grad_y: Any) -> Any:
        col, x_shape = self._pop()
        gx, gw, gb = conv2d_nhwc_backward(
            grad_y, col, x_shape, self.weight.data, self.stride, self.padding, self.input_grad
        )
        self.weight.grad += gw
        if self.bias is not None:
            self.bias.grad += gb
        return gx

    def forward(self, x: Any) -> Any:
        check_input(type(self).__name__, x, (None, self.in_channels, None, None), self.weight.dtype)
        xp = backend.get_array_module(x, self.weight.data)
        return self.forward_nhwc(xp.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        xp = backend.get_array_module(grad_out)
        gx = self.backward_nhwc(xp.ascontiguousarray(grad_out.transpose(0, 2, 3, 1)))
        return None if gx is None else gx.transpose(0, 3, 1, 2)


__all__ = [
    "Conv2d",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "conv2d_nhwc",
    "conv2d_nhwc_backward",
    "conv_output_size",
    "im2col",
]
