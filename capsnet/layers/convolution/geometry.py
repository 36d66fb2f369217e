"""ConvGeometry: what a convolution is (shapes, kernel, stride, padding, groups, dtype,
backend), described once and shared by every algorithm that can carry it out."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from capsnet import backend
from capsnet.layers.base import conv_output_size

__all__ = ["ConvGeometry", "check_groups"]


def check_groups(groups: int, channels: int, out_channels: int, who: str = "convolution") -> None:
    """Refuse a group count that is not a positive integer dividing both channel counts."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{who} groups must be an integer >= 1, got {groups!r}")
    if channels % groups or out_channels % groups:
        raise ValueError(f"{who} groups={groups} must divide both the input channels ({channels}) and the output "
                         f"channels ({out_channels}); pick a common divisor (groups=channels is depthwise)")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """One 2-D cross-correlation: x (batch, height, width, in_channels) channels-last,
    w (out_channels, in_channels / groups, kernel_h, kernel_w), zero ``padding`` on every
    side, ``stride`` in both directions. Hashable: it keys plans, caches and choices."""

    batch: int
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    dtype: str = "float32"
    backend: str = "numpy"

    def __post_init__(self) -> None:
        check_groups(self.groups, self.in_channels, self.out_channels)
        self.out_h, self.out_w  # refuses an empty output here, not inside an algorithm

    @classmethod
    def of(cls, x_nhwc: Any, w: Any, stride: int = 1, padding: int = 0, groups: int = 1) -> "ConvGeometry":
        """The geometry of convolving x (B, H, W, C) with w (O, C / groups, KH, KW)."""
        b, h, wd, c = x_nhwc.shape
        o, cg, kh, kw = w.shape
        check_groups(groups, c, o)
        if cg * groups != c:
            expected = f"{c} input channels" if groups == 1 else f"{c} input channels in {groups} groups"
            raise ValueError(f"convolution expected weights of shape ({o}, {c // groups}, KH, KW) for {expected}, "
                             f"got {tuple(w.shape)}: the input has {c} channels, the weights expect {cg * groups}")
        name = ":".join(str(part) for part in backend.device_key(w))
        return cls(int(b), int(h), int(wd), int(c), int(o), int(kh), int(kw), int(stride), int(padding),
                   int(groups), np.dtype(w.dtype).name, name)

    def with_batch(self, batch: int) -> "ConvGeometry":
        return dataclasses.replace(self, batch=batch)

    @property
    def out_h(self) -> int:
        return conv_output_size(self.height, self.kernel_h, self.stride, self.padding)

    @property
    def out_w(self) -> int:
        return conv_output_size(self.width, self.kernel_w, self.stride, self.padding)

    @property
    def padded_h(self) -> int:
        return self.height + 2 * self.padding

    @property
    def padded_w(self) -> int:
        return self.width + 2 * self.padding

    @property
    def rows(self) -> int:
        """Output pixels over the batch: the rows of the patch matrix."""
        return self.batch * self.out_h * self.out_w

    @property
    def depth(self) -> int:
        """Inputs each output value sums: (C / groups) * KH * KW."""
        return self.in_channels // self.groups * self.kernel_h * self.kernel_w

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: the convolution is one matrix product of the pixels."""
        return self.kernel_h == self.kernel_w == 1 and self.stride == 1 and self.padding == 0

    def flops(self) -> int:
        """2 per multiply-add of the forward (each gradient costs the same)."""
        return 2 * self.rows * self.depth * self.out_channels

    def describe(self) -> str:
        g = f" groups {self.groups}" if self.groups != 1 else ""
        return (f"b{self.batch} {self.height}x{self.width}x{self.in_channels} -> {self.out_channels} "
                f"k{self.kernel_h}x{self.kernel_w} s{self.stride} p{self.padding}{g} {self.dtype} {self.backend}")
