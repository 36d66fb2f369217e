"""Choosing the algorithm: a cost model fitted from a sweep (shipped defaults in
cost_model.json, refitted by ``scripts/fit_conv_cost.py``), or, on request, cuDNN-style
benchmark mode, which times each candidate once per geometry on first use. Every choice
made is recorded and listed by :func:`choices` (a training run writes it to config.json).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from capsnet import backend, parallel
from capsnet.layers.convolution.algorithm import Algorithm
from capsnet.layers.convolution.direct import Direct
from capsnet.layers.convolution.fourier import Fourier, fourier_flops, fourier_geometry
from capsnet.layers.convolution.geometry import ConvGeometry
from capsnet.layers.convolution.im2col import Im2col, layout_for
from capsnet.layers.convolution.patches import row_groups
from capsnet.layers.convolution.pointwise import Pointwise
from capsnet.layers.convolution.winograd import Winograd, Winograd4, winograd_blocks, winograd_flops

__all__ = [
    "ALGORITHMS",
    "BENCHMARK_ENV",
    "COST_MODEL_PATH",
    "benchmark_enabled",
    "candidates",
    "choices",
    "choose",
    "clear_choices",
    "cost_features",
    "load_cost_model",
    "make",
    "predicted_seconds",
    "set_benchmark",
    "set_cost_model",
]

ALGORITHMS: dict[str, type[Algorithm]] = {"im2col": Im2col, "fourier": Fourier, "direct": Direct,
                                          "pointwise": Pointwise, "winograd": Winograd, "winograd4": Winograd4}
"""The algorithms by name, each an :class:`~capsnet.layers.convolution.algorithm.Algorithm` class."""
BENCHMARK_ENV = "CAPSNET_CONV_BENCHMARK"
"""The environment variable that turns benchmark mode on (``1``)."""
COST_MODEL_PATH = Path(__file__).with_name("cost_model.json")
"""The shipped cost model, fitted by ``scripts/fit_conv_cost.py``."""
FEATURES = ("calls", "gemm_flops", "elementwise_flops", "values_moved", "weight_values")


def make(name: str) -> Algorithm:
    """A fresh instance of the algorithm called ``name``."""
    if name not in ALGORITHMS:
        raise ValueError(f"convolution algorithm must be one of {('auto', *ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name]()


def _passes(training: bool, input_grad: bool) -> int:
    return 1 + (1 + int(input_grad) if training else 0)


def cost_features(name: str, g: ConvGeometry, training: bool, input_grad: bool = True) -> np.ndarray:
    """What algorithm ``name`` does for one call on ``g`` (a training call: forward and
    gradients), as the features of the cost model (FEATURES): array calls, matrix-product
    flops, element-wise flops, values moved by gathers and layout changes (these grow with
    the batch), and weight-sized values moved (these do not: the weights' reordering, the
    Fourier method's weight spectrum)."""
    passes = _passes(training, input_grad)
    c, o, kh, kw = g.in_channels, g.out_channels, g.kernel_h, g.kernel_w
    weights = o * g.depth
    patch_values = g.rows * kh * kw * c
    # the input gradient's patch-gradient sum (patches.sum_method): on a GPU an index gather of
    # ceil(K/s)^2 slots (at most the outputs) per padded pixel; on NumPy a slice addition per offset
    sum_calls, sum_values = 0, 0
    if training and input_grad:
        if g.backend == "numpy":
            sum_calls, sum_values = kh * kw, patch_values
        else:
            taps = min(-(-kh // g.stride), g.out_h) * min(-(-kw // g.stride), g.out_w)
            sum_values = 2 * g.batch * g.padded_h * g.padded_w * c * taps
    if name == "pointwise":
        return np.array([2 * passes, passes * g.flops(), 0, g.rows * (c + o) * passes, 0], dtype=float)
    if name == "im2col":
        rows_layout = layout_for(g) == "rows"
        groups = len(row_groups(kh, kw, c)) if rows_layout else 1
        return np.array([groups * (2 * passes + 1) + sum_calls, passes * g.flops(), 0, passes * patch_values + sum_values,
                         passes * weights if rows_layout else 0], dtype=float)
    if name == "direct":
        products = g.rows * kh * kw * c * (o // g.groups)
        blocks = max(1, min(kh, -(-products // (1 << 23))))
        return np.array([3 * passes * blocks + sum_calls, 0, passes * g.flops(), passes * products + sum_values, weights],
                        dtype=float)
    if name == "fourier":
        args = (g.padded_h, g.padded_w, c, o, kh, kw, g.stride)
        spectral = g.batch * fourier_flops(*args)[1]  # fourier_flops counts one image
        if training:
            spectral += g.batch * fourier_flops(*args, backward=True, input_grad=input_grad)[1]
        grid = fourier_geometry(*args[:2], kh, kw, g.stride)
        spectrum = 2 * grid["bins"] * g.stride ** 2 * c * o
        grids = g.batch * grid["ny"] * grid["nx"] * g.stride ** 2 * c * passes
        # training transforms the weights there and back every call; inference compares them with a copy
        return np.array([12 * passes, spectral, 0, grids, 2 * spectrum if training else 2 * weights], dtype=float)
    if name in ("winograd", "winograd4"):
        m = ALGORITHMS[name].m
        e = (m + 2) ** 2  # tile entries
        th, tw = -(-g.out_h // m), -(-g.out_w // m)
        tiles = g.batch * th * tw
        # forward: padded input, tiles (e T C), their transform, products (e T O) and the
        # output tiles; backward: output-gradient tiles and their adjoint transform (dM, shared),
        # and for the input gradient dV (e T C), its adjoint transform and the tiles' sum
        padded = g.batch * (m * th + 2) * (m * tw + 2) * c
        moved = padded + 2 * e * tiles * c + e * tiles * o + 2 * g.rows * o
        blocks = winograd_blocks(g, m)  # on NumPy, each block of images is a pass of its own
        calls = 2 + 8 * blocks
        if training:
            moved += 2 * e * tiles * o + e * tiles * c
            calls += 4 + 6 * blocks
            if input_grad:
                moved += 4 * e * tiles * c + 2 * padded
                calls += 10 * blocks
        return np.array([calls, winograd_flops(g, training, input_grad, m), 0, moved, 3 * passes * weights],
                        dtype=float)
    raise ValueError(f"no cost features for algorithm {name!r}")


_lock = threading.RLock()
_model: dict | None = None
_benchmark: bool | None = None
_choices: dict[tuple, dict] = {}
_timed: dict[tuple, str] = {}


def load_cost_model(path: str | os.PathLike | None = None) -> dict:
    """The coefficients of the cost model: {"threads": {"1": {algorithm: [coefficients of FEATURES]}}, ...}."""
    with open(path or COST_MODEL_PATH) as f:
        model = {key: value for key, value in json.load(f).items() if key != "timings"}  # those are the fit's
    for threads, table in model["threads"].items():
        for name, coef in table.items():
            if name not in ALGORITHMS or len(coef) != len(FEATURES):
                raise ValueError(f"cost model {path or COST_MODEL_PATH}: threads {threads}, expected {len(FEATURES)} "
                                 f"coefficients for one of {tuple(ALGORITHMS)}, got {name!r}: {coef!r}; rerun "
                                 "scripts/fit_conv_cost.py to refit it")
    return model


def set_cost_model(model: dict | None) -> None:
    """Use ``model`` (as :func:`load_cost_model` returns) for "auto"; None: the shipped one.
    Forgets the choices made so far."""
    global _model
    with _lock:
        _model = model
        _choices.clear()


def _coefficients(threads: int) -> dict:
    global _model
    with _lock:
        if _model is None:
            _model = load_cost_model()
        table = _model["threads"]
        nearest = min(table, key=lambda t: (abs(int(t) - threads), int(t)))
        return table[nearest]


def predicted_seconds(name: str, g: ConvGeometry, training: bool, input_grad: bool = True,
                      threads: int | None = None) -> float:
    """The cost model's time for one call of algorithm ``name`` on ``g``."""
    coef = _coefficients(_threads() if threads is None else threads)[name]
    return float(cost_features(name, g, training, input_grad) @ np.asarray(coef, dtype=float))


def set_benchmark(on: bool | None) -> None:
    """cuDNN-style benchmark mode for "auto": time each candidate once per geometry, thread
    count and device on first use and keep the fastest. None: follow CAPSNET_CONV_BENCHMARK=1."""
    global _benchmark
    with _lock:
        _benchmark = on
        _choices.clear()


def benchmark_enabled() -> bool:
    """Whether "auto" times the candidates (set_benchmark, else CAPSNET_CONV_BENCHMARK=1)."""
    if _benchmark is not None:
        return _benchmark
    return os.environ.get(BENCHMARK_ENV) == "1"


def _threads() -> int:
    return parallel.blas_threads() or 1


def candidates(g: ConvGeometry) -> list[str]:
    """The names of the algorithms that can carry out ``g``."""
    return [name for name, cls in ALGORITHMS.items() if cls().supports(g)]


def _time_once(name: str, g: ConvGeometry, training: bool, input_grad: bool, xp: Any) -> float:
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((g.batch, g.height, g.width, g.in_channels)).astype(g.dtype))
    w = xp.asarray(rng.standard_normal((g.out_channels, g.in_channels // g.groups, g.kernel_h,
                                        g.kernel_w)).astype(g.dtype))
    gy = xp.asarray(rng.standard_normal((g.batch, g.out_h, g.out_w, g.out_channels)).astype(g.dtype))
    alg = make(name)
    best = float("inf")
    for _ in range(2):  # the first call pays plans and page faults: keep the faster of two
        start = time.perf_counter()
        y, saved = alg.forward(g, x, w, None, training)
        if training:
            alg.backward(g, gy, saved, w, input_grad)
        backend.synchronize(y)
        best = min(best, time.perf_counter() - start)
    alg.release()
    return best


def choose(g: ConvGeometry, training: bool, input_grad: bool = True, algorithm: str = "auto",
           xp: Any = None) -> str:
    """The algorithm that runs ``g``: ``algorithm`` itself when pinned (refused if it cannot
    carry out ``g``), else the fastest candidate by the cost model or, in benchmark mode, by
    timing each once. The choice is recorded for :func:`choices`, and a geometry decided
    before is answered from that record."""
    threads = _threads()
    key = (g, training, input_grad, threads)
    known = _choices.get(key)
    if known is not None and algorithm in ("auto", known["algorithm"]) and \
            (algorithm == "auto") == (known["chosen_by"] != "pinned"):
        return known["algorithm"]  # decided already: a dictionary lookup per call
    names = candidates(g)
    if algorithm != "auto":
        make(algorithm)  # refuses an unknown name
        if algorithm not in names:
            raise ValueError(f"convolution algorithm {algorithm!r} cannot run {g.describe()}: it takes "
                             f"{ALGORITHMS[algorithm].scope} convolutions only. Use one of {names} or 'auto'")
        name, how = algorithm, "pinned"
    elif len(names) == 1:
        name, how = names[0], "only candidate"
    elif benchmark_enabled():
        with _lock:  # replicas asking at once time the candidates once
            name = _timed.get(key)
            if name is None:
                times = {n: _time_once(n, g, training, input_grad, xp or backend.get_array_module()) for n in names}
                name = _timed[key] = min(times, key=times.get)
        how = "benchmark"
    else:
        fitted = _coefficients(threads)  # a model fitted before an algorithm existed does not propose it
        costs = {n: predicted_seconds(n, g, training, input_grad, threads) for n in names if n in fitted}
        name, how = min(costs, key=costs.get), "cost model"
    if key not in _choices or _choices[key]["algorithm"] != name:
        with _lock:
            _choices[key] = {**dataclasses.asdict(g), "training": training, "input_grad": input_grad,
                             "threads": threads, "algorithm": name, "chosen_by": how}
    return name


def choices() -> list[dict]:
    """Every convolution choice made in this process: the geometry, training or not, the
    thread count, the algorithm and how it was chosen ("pinned", "cost model", "benchmark",
    "only candidate")."""
    with _lock:
        return [dict(entry) for entry in _choices.values()]


def clear_choices() -> None:
    """Forget the recorded choices and the benchmark timings."""
    with _lock:
        _choices.clear()
        _timed.clear()
