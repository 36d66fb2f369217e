"""Pointwise: a 1x1, stride-1, unpadded convolution is one matrix product of the pixels
with the weights, with no gather and no scatter."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from capsnet import backend
from capsnet.layers.convolution.algorithm import Algorithm
from capsnet.layers.convolution.geometry import ConvGeometry
from capsnet.parallel import run_shards

__all__ = ["Pointwise", "PointwiseSaved"]


class PointwiseSaved(NamedTuple):
    """What the 1x1 product's backward needs from its forward."""

    x: Any  # the input (B, H, W, C), or (B, C, H, W) with channels_first
    channels_first: bool = False  # saved by forward_channels_first


class Pointwise(Algorithm):
    """y (B*H*W, O) = x (B*H*W, C) @ w (O, C)^T; ungrouped 1x1 stride-1 geometries only."""

    name = "pointwise"
    scope = "ungrouped 1x1 stride-1 unpadded"

    def supports(self, g: ConvGeometry) -> bool:
        return g.is_pointwise and g.groups == 1

    def forward(self, g: ConvGeometry, x_nhwc: Any, w: Any, b: Any | None, training: bool = True
                ) -> tuple[Any, PointwiseSaved]:
        y = x_nhwc.reshape(-1, g.in_channels) @ w.reshape(g.out_channels, -1).T
        if b is not None:
            y += b
        return y.reshape(g.batch, g.height, g.width, g.out_channels), PointwiseSaved(x_nhwc)

    def save(self, g: ConvGeometry, x_nhwc: Any, w: Any) -> PointwiseSaved:
        return PointwiseSaved(x_nhwc)

    def weight_grad(self, g: ConvGeometry, grad_y: Any, saved: PointwiseSaved, w: Any) -> Any:
        g2 = grad_y.reshape(-1, g.out_channels)
        return (g2.T @ saved.x.reshape(-1, g.in_channels)).reshape(w.shape)

    def input_grad(self, g: ConvGeometry, grad_y: Any, saved: Any, w: Any) -> Any:
        gx = grad_y.reshape(-1, g.out_channels) @ w.reshape(g.out_channels, -1)
        return gx.reshape(g.batch, g.height, g.width, g.in_channels)

    def channels_first(self, g: ConvGeometry) -> bool:
        return self.supports(g)

    def forward_channels_first(self, g: ConvGeometry, x_nchw: Any, w: Any, b: Any | None
                               ) -> tuple[Any, PointwiseSaved]:
        """y (B, O, H, W) from x (B, C, H, W) in channels-first memory, as a caller of
        ``Conv2d.forward`` with its own NCHW arrays passes it: one product per image,
        w (O, C) times x_b (C, H W), with no channels-last copy of the input, and the output
        in the same memory order. (A 256->64 1x1 on 32 x 32 at batch 32, one core, ad hoc:
        18.7 ms, where the channels-last copy and one product took 65.8.)"""
        xp = backend.get_array_module(x_nchw, w)
        hw = g.height * g.width
        w2, x3 = w.reshape(g.out_channels, g.in_channels), x_nchw.reshape(g.batch, g.in_channels, hw)
        if xp is np:  # a share of the images per host thread (run_shards), each one product
            y = np.empty((g.batch, g.out_channels, hw), dtype=x_nchw.dtype)

            def images(lo: int, hi: int) -> None:
                np.matmul(w2, x3[lo:hi], out=y[lo:hi])
                if b is not None:
                    y[lo:hi] += b.reshape(-1, 1)

            run_shards(g.batch, images)
        else:
            y = xp.matmul(w2, x3)
            if b is not None:
                y += b.reshape(-1, 1)
        return y.reshape(g.batch, g.out_channels, g.height, g.width), PointwiseSaved(x_nchw, True)

    def backward_channels_first(self, g: ConvGeometry, grad_y_nchw: Any, saved: PointwiseSaved, w: Any,
                                need_input_grad: bool = True) -> tuple[Any | None, Any, Any]:
        """(grad_x (B, C, H, W) or None, grad_w, grad_b) of :meth:`forward_channels_first`, from
        grad_y (B, O, H, W): per-image products, the weight and bias gradients summed over the
        images."""
        xp = backend.get_array_module(grad_y_nchw, w)
        hw = g.height * g.width
        g3 = xp.ascontiguousarray(grad_y_nchw).reshape(g.batch, g.out_channels, hw)
        x3 = saved.x.reshape(g.batch, g.in_channels, hw)
        wt = w.reshape(g.out_channels, g.in_channels).T
        gx = xp.empty((g.batch, g.in_channels, hw), dtype=g3.dtype) if need_input_grad else None

        def images(lo: int, hi: int) -> tuple[Any, Any]:  # (O, C) and (O,) of these images, summed
            if need_input_grad:
                xp.matmul(wt, g3[lo:hi], out=gx[lo:hi])
            return xp.matmul(g3[lo:hi], x3[lo:hi].transpose(0, 2, 1)).sum(axis=0), g3[lo:hi].sum(axis=2).sum(axis=0)

        # on NumPy a share of the images per host thread, the shares' sums added in order
        parts = run_shards(g.batch, images) if xp is np else [images(0, g.batch)]
        gw, gb = parts[0]
        for part_w, part_b in parts[1:]:
            gw, gb = gw + part_w, gb + part_b
        return None if gx is None else gx.reshape(g.batch, g.in_channels, g.height, g.width), gw.reshape(w.shape), gb
