"""The convolution engine: a ConvGeometry says what a convolution is; an algorithm
(im2col, fourier, direct, pointwise, winograd and winograd4; one file each but the two Winograds) carries it out over the shared patch
layout of :mod:`.patches`; :func:`choose` picks one by a fitted cost model or by timing
(benchmark mode), and :func:`choices` lists what was picked.

The layers (:class:`~capsnet.layers.conv.Conv2d` and the capsule layers built on it) and
the pure functions of :mod:`capsnet.layers.conv` go through here.
"""
from __future__ import annotations

from capsnet.layers.convolution.algorithm import Algorithm, WeightCache, bias_grad
from capsnet.layers.convolution.direct import Direct, DirectSaved
from capsnet.layers.convolution.fourier import Fourier, FourierSaved
from capsnet.layers.convolution.geometry import ConvGeometry, check_groups
from capsnet.layers.convolution.im2col import Im2col, Im2colSaved
from capsnet.layers.convolution.patches import col2im, im2col
from capsnet.layers.convolution.pointwise import Pointwise, PointwiseSaved
from capsnet.layers.convolution.winograd import Winograd, Winograd4, WinogradSaved
from capsnet.layers.convolution.select import (
    ALGORITHMS,
    BENCHMARK_ENV,
    benchmark_enabled,
    candidates,
    choices,
    choose,
    clear_choices,
    cost_features,
    load_cost_model,
    make,
    predicted_seconds,
    set_benchmark,
    set_cost_model,
)

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "BENCHMARK_ENV",
    "ConvGeometry",
    "Direct",
    "DirectSaved",
    "Fourier",
    "FourierSaved",
    "Im2col",
    "Im2colSaved",
    "Pointwise",
    "PointwiseSaved",
    "WeightCache",
    "Winograd",
    "Winograd4",
    "WinogradSaved",
    "benchmark_enabled",
    "bias_grad",
    "candidates",
    "check_groups",
    "choices",
    "choose",
    "clear_choices",
    "col2im",
    "cost_features",
    "im2col",
    "load_cost_model",
    "make",
    "predicted_seconds",
    "set_benchmark",
    "set_cost_model",
]
