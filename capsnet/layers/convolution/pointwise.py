"""Pointwise: a 1x1, stride-1, unpadded convolution is one matrix product of the pixels
with the weights, with no gather and no scatter."""
from __future__ import annotations

from typing import Any, NamedTuple

from capsnet.layers.convolution.algorithm import Algorithm
from capsnet.layers.convolution.geometry import ConvGeometry

__all__ = ["Pointwise", "PointwiseSaved"]


class PointwiseSaved(NamedTuple):
    """What the 1x1 product's backward needs from its forward."""

    x: Any  # the input (B, H, W, C)


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
