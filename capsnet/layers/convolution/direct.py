"""Direct: the convolution as a sum over kernel offsets of shifted element-wise products,
for depthwise and grouped convolutions with few channels per group (no tiny matrix products).

    forward        y[p]    = sum_k x[s p + k] * w[k]            (per group and channel)
    weight grad    dw[k]   = sum_{b, p} x[s p + k] * dy[p]
    input grad     dx[s p + k] += dy[p] * w[k], the adjoint, as the patch-gradient gather

The shifted inputs x[s p + k] of a block of kernel rows are one strided view of the padded
input (no copy); their products with the weights of those offsets are one broadcast
multiply and one sum, so a block of offsets costs two launches. Blocks are as many kernel
rows as keep the product under BLOCK_VALUES values (a memory bound, not a timing).

A depthwise convolution (one input and one output channel per group, Efficient-CapsNet's
primary capsules) forms no product array at all: its forward and weight gradient are one
``einsum`` each over the same view, a sum of products with no temporary (its forward at batch
32 and 100: 1.7x to 2.1x faster than the broadcast product on the project's EPYC, quiet,
``scripts/bench_conv.py --shapes efficient.primary``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from capsnet import backend
from capsnet.layers.convolution.algorithm import Algorithm
from capsnet.layers.convolution.geometry import ConvGeometry
from capsnet.layers.convolution.patches import crop, pad, patch_gradient_buffer, patch_gradient_sum, patch_view

__all__ = ["BLOCK_VALUES", "Direct", "DirectSaved"]

BLOCK_VALUES = 1 << 23  # 32 MB of float32 per product block
"""The most products one block of kernel rows forms at once (the direct method's temporary)."""


class DirectSaved(NamedTuple):
    """What the direct method's backward needs from its forward."""

    x_pad: Any  # the padded input (B, Hp, Wp, C); with channels_first the input (B, C, H, W)
    channels_first: bool = False  # saved by forward_channels_first


def _blocks(g: ConvGeometry) -> list[range]:
    per_row = g.rows * g.kernel_w * g.in_channels * (g.out_channels // g.groups)
    n = max(1, min(g.kernel_h, BLOCK_VALUES // max(per_row, 1)))
    return [range(start, min(start + n, g.kernel_h)) for start in range(0, g.kernel_h, n)]


def _weights(w: Any, g: ConvGeometry) -> Any:
    """w (O, Cg, KH, KW) as (KH, KW, G, O/G, Cg)."""
    gs = g.groups
    return w.reshape(gs, g.out_channels // gs, g.in_channels // gs, g.kernel_h, g.kernel_w).transpose(3, 4, 0, 1, 2)


def _depthwise(g: ConvGeometry) -> bool:
    """One input and one output channel per group."""
    return g.groups == g.in_channels == g.out_channels


def _depthwise_weights(w: Any, g: ConvGeometry) -> Any:
    """w (C, 1, KH, KW) as (KH, KW, C), contiguous (einsum is several times slower on the strided view)."""
    xp = backend.get_array_module(w)
    return xp.ascontiguousarray(w.reshape(g.out_channels, g.kernel_h, g.kernel_w).transpose(1, 2, 0))


class Direct(Algorithm):
    """Shifted element-wise products; worth it where each output sums few input channels."""

    name = "direct"
    scope = "grouped (groups > 1)"

    def supports(self, g: ConvGeometry) -> bool:
        return g.groups > 1  # ungrouped, every output sums all C inputs: a GEMM's work

    def forward(self, g: ConvGeometry, x_nhwc: Any, w: Any, b: Any | None, training: bool = True
                ) -> tuple[Any, DirectSaved]:
        xp = backend.get_array_module(x_nhwc, w)
        x_pad = pad(x_nhwc, g.padding)
        gs, cg = g.groups, g.in_channels // g.groups
        if _depthwise(g):
            v = patch_view(x_pad, range(g.kernel_h), g.kernel_w, g.stride, g.out_h, g.out_w)  # (B, OH, OW, KH, KW, C)
            y = xp.einsum("bhwrkc,rkc->bhwc", v, _depthwise_weights(w, g))
            if b is not None:
                y += b
            return y, DirectSaved(x_pad)
        wt = _weights(w, g)
        y = None
        for rows in _blocks(g):  # a loop over blocks of kernel offsets
            v = patch_view(x_pad, rows, g.kernel_w, g.stride, g.out_h, g.out_w)  # (B, OH, OW, r, KW, C)
            v = v.reshape(*v.shape[:5], gs, 1, cg)
            part = (v * wt[rows.start : rows.stop]).sum(axis=(3, 4, 7))  # (B, OH, OW, G, O/G)
            if y is None:
                y = part
            else:
                y += part
        y = y.reshape(g.batch, g.out_h, g.out_w, g.out_channels)
        if b is not None:
            y += b
        return xp.ascontiguousarray(y), DirectSaved(x_pad)

    def save(self, g: ConvGeometry, x_nhwc: Any, w: Any) -> DirectSaved:
        return DirectSaved(pad(x_nhwc, g.padding))

    def channels_first(self, g: ConvGeometry) -> bool:
        return _depthwise(g)

    def forward_channels_first(self, g: ConvGeometry, x_nchw: Any, w: Any, b: Any | None
                               ) -> tuple[Any, DirectSaved]:
        """A depthwise y (B, C, OH, OW) from x (B, C, H, W) in channels-first memory, as a caller
        of ``Conv2d.forward`` with its own NCHW arrays passes it: one ``einsum`` over a strided
        view of it, no channels-last copy (Efficient-CapsNet's 9x9 depthwise on 9 x 9 at batch
        100, one core: 1.16 ms through the copy, 0.29 in PyTorch, see docs/performance.md for
        this path). The backward converts to channels-last and takes the usual path."""
        xp = backend.get_array_module(x_nchw, w)
        p, s = g.padding, g.stride
        x_pad = xp.pad(x_nchw, ((0, 0), (0, 0), (p, p), (p, p))) if p else x_nchw
        sb, sc, sh, sw = x_pad.strides
        view = xp.lib.stride_tricks.as_strided(
            x_pad, shape=(g.batch, g.in_channels, g.out_h, g.out_w, g.kernel_h, g.kernel_w),
            strides=(sb, sc, s * sh, s * sw, sh, sw))
        y = xp.einsum("bchwrk,crk->bchw", view, xp.ascontiguousarray(w.reshape(g.out_channels, g.kernel_h, g.kernel_w)))
        if b is not None:
            y += b.reshape(-1, 1, 1)
        return y, DirectSaved(x_nchw, True)

    def backward_channels_first(self, g: ConvGeometry, grad_y_nchw: Any, saved: DirectSaved, w: Any,
                                need_input_grad: bool = True) -> tuple[Any | None, Any, Any]:
        """Gradients of :meth:`forward_channels_first`: the channels-last backward on channels-last
        copies of the saved input and of grad_y (the copies the forward did not make); grad_x
        (B, C, H, W) a view."""
        xp = backend.get_array_module(grad_y_nchw, w)
        x_nhwc = xp.ascontiguousarray(saved.x_pad.transpose(0, 2, 3, 1))
        gy = xp.ascontiguousarray(grad_y_nchw.transpose(0, 2, 3, 1))
        gx, gw, gb = self.backward(g, gy, self.save(g, x_nhwc, w), w, need_input_grad)
        return None if gx is None else gx.transpose(0, 3, 1, 2), gw, gb

    def weight_grad(self, g: ConvGeometry, grad_y: Any, saved: DirectSaved, w: Any) -> Any:
        xp = backend.get_array_module(grad_y, w)
        if _depthwise(g):
            v = patch_view(saved.x_pad, range(g.kernel_h), g.kernel_w, g.stride, g.out_h, g.out_w)
            gw = xp.einsum("bhwrkc,bhwc->crk", v, grad_y)  # (C, KH, KW)
            return xp.ascontiguousarray(gw).reshape(w.shape)
        gs, og, cg = g.groups, g.out_channels // g.groups, g.in_channels // g.groups
        gy = grad_y.reshape(g.batch, g.out_h, g.out_w, 1, 1, gs, og, 1)
        gw = xp.empty((g.kernel_h, g.kernel_w, gs, og, cg), dtype=w.dtype)
        for rows in _blocks(g):
            v = patch_view(saved.x_pad, rows, g.kernel_w, g.stride, g.out_h, g.out_w)
            v = v.reshape(*v.shape[:5], gs, 1, cg)
            gw[rows.start : rows.stop] = (v * gy).sum(axis=(0, 1, 2))
        return gw.transpose(2, 3, 4, 0, 1).reshape(w.shape)

    def input_grad(self, g: ConvGeometry, grad_y: Any, saved: Any, w: Any) -> Any:
        xp = backend.get_array_module(grad_y, w)
        gs, og, cg = g.groups, g.out_channels // g.groups, g.in_channels // g.groups
        kh, kw, c = g.kernel_h, g.kernel_w, g.in_channels
        buf, gcol = patch_gradient_buffer(xp, g.rows, kh * kw * c, c, w.dtype)
        gcol = gcol.reshape(g.batch, g.out_h, g.out_w, kh, kw, gs, cg)
        gy = grad_y.reshape(g.batch, g.out_h, g.out_w, 1, 1, gs, og, 1)
        wt = _weights(w, g)
        if og == 1:
            xp.multiply(gy.reshape(*gy.shape[:6], 1), wt.reshape(kh, kw, gs, cg), out=gcol)
        else:
            gcol[...] = (gy * wt).sum(axis=6)
        shape_pad = (g.batch, g.padded_h, g.padded_w, c)
        return crop(patch_gradient_sum(buf, shape_pad, g.out_h, g.out_w, range(kh), kw, g.stride), g.padding)
