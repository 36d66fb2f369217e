"""Algorithm: what every convolution algorithm provides (forward, input gradient, weight
gradient over one ConvGeometry), and the bias gradient they share."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from capsnet import backend
from capsnet.layers.convolution.geometry import ConvGeometry

__all__ = ["SUM_ROWS_BYTES", "Algorithm", "WeightCache", "bias_grad", "cache_bytes", "sum_rows"]


class WeightCache:
    """What an algorithm makes from the weights alone (the Fourier method's weight spectrum,
    Winograd's transformed kernel), kept while the weights keep their values: for inference,
    where the same weights meet batch after batch.

    The weights are compared value by value with a copy taken when the value was made (a read
    of twice their size), so any change, in place or not, is seen (array_equal compares
    values: -0.0 counts as 0.0, and weights holding NaN are transformed every call). On CuPy
    the comparison waits for the device."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._weights: Any = None
        self._key: tuple | None = None
        self._value: Any = None

    def get(self, w: Any, key: tuple, make: Callable[[], Any]) -> Any:
        """The value for weights ``w`` and the caller's ``key`` (what else it depends on):
        kept, or ``make()`` when either changed."""
        xp = backend.get_array_module(w)
        key = (*key, w.shape, w.dtype, *backend.device_key(w))
        if key != self._key or not bool(xp.array_equal(self._weights, w)):
            self.clear()
            self._value = make()
            self._weights, self._key = w.copy(), key
        return self._value

    @property
    def nbytes(self) -> int:
        """Bytes held: the value and the copy of the weights it was made from."""
        return sum(a.nbytes for a in (self._value, self._weights) if a is not None)


def cache_bytes(level: int) -> int | None:
    """The size of one CPU's level-``level`` data (or unified) cache as the OS reports it: Linux's
    ``/sys/devices/system/cpu/cpu0/cache``, else ``os.sysconf``; None where neither says."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (int((index / "level").read_text()) == level
                    and (index / "type").read_text().strip() in ("Data", "Unified")):
                size = (index / "size").read_text().strip().upper()
                unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
                return int(size.rstrip("KMG")) * unit
        except (OSError, ValueError):
            continue
    name = f"SC_LEVEL{level}_{'D' if level == 1 else ''}CACHE_SIZE"
    try:
        value = os.sysconf(name)
    except (AttributeError, ValueError, OSError):
        return None
    return value if value > 0 else None


SUM_ROWS_BYTES = (cache_bytes(3) or 16 << 20) // 2
"""On NumPy, :func:`sum_rows` sums rows of at most this many bytes (half the last-level cache the
OS reports, 8 MiB where it says nothing) as one product with a vector of ones."""


def sum_rows(rows: Any) -> Any:
    """rows (N, C) -> (C,), the sum over the rows.

    NumPy's ``sum(axis=0)`` runs its inner loop once per row of C values. On NumPy, while the
    rows fit in half the last-level cache (:data:`SUM_ROWS_BYTES`), a BLAS product with a
    vector of ones sums them instead: for 18,432 rows of 32 (the output gradient of
    Efficient-CapsNet's first layer at batch 32) 0.03 against 0.31 ms on one core of the
    project's AMD EPYC, and at least as accurate. Beyond the cache that product read its rows
    more slowly than the reduction did (40 MB: 2.7 against 1.9 ms), so there the reduction runs.
    Figures from ad-hoc timing in one process, recorded in NOTES.md."""
    xp = backend.get_array_module(rows)
    if xp is np and rows.ndim == 2 and rows.flags.c_contiguous and rows.nbytes <= SUM_ROWS_BYTES:
        return xp.ones(rows.shape[0], dtype=rows.dtype) @ rows
    return rows.sum(axis=0)


def bias_grad(grad_y: Any) -> Any:
    """Gradient of the bias: grad_y (B, OH, OW, O) summed over the pixels -> (O,) (:func:`sum_rows`)."""
    return sum_rows(grad_y.reshape(-1, grad_y.shape[-1]))


class Algorithm:
    """One way of computing the convolution a :class:`ConvGeometry` describes.

    All arrays are channels-last: x (B, H, W, C), w (O, C / groups, KH, KW), y (B, OH, OW, O).
    ``forward`` returns (y, saved): ``saved`` is the algorithm's own named object holding what
    its gradients need. An instance may keep memory between calls (the Fourier method's
    spectra), which :meth:`release` frees; layers hold one instance per algorithm.
    """

    name: ClassVar[str]
    scope: ClassVar[str] = "any"  # the geometries it supports, in words for errors

    def supports(self, g: ConvGeometry) -> bool:
        return True

    def forward(self, g: ConvGeometry, x_nhwc: Any, w: Any, b: Any | None, training: bool = True
                ) -> tuple[Any, Any]:
        raise NotImplementedError

    def save(self, g: ConvGeometry, x_nhwc: Any, w: Any) -> Any:
        """What the gradients need, without the forward (the pure ``conv2d_backward``)."""
        return self.forward(g, x_nhwc, w, None, True)[1]

    def input_grad(self, g: ConvGeometry, grad_y: Any, saved: Any, w: Any) -> Any:
        """Gradient of the input (B, H, W, C) from grad_y (B, OH, OW, O)."""
        raise NotImplementedError

    def weight_grad(self, g: ConvGeometry, grad_y: Any, saved: Any, w: Any) -> Any:
        """Gradient of the weights (O, C / groups, KH, KW) from grad_y (B, OH, OW, O)."""
        raise NotImplementedError

    def backward(self, g: ConvGeometry, grad_y: Any, saved: Any, w: Any, need_input_grad: bool = True
                 ) -> tuple[Any | None, Any, Any]:
        """(grad_x or None, grad_w, grad_b)."""
        gx = self.input_grad(g, grad_y, saved, w) if need_input_grad else None
        return gx, self.weight_grad(g, grad_y, saved, w), bias_grad(grad_y)

    def channels_first(self, g: ConvGeometry) -> bool:
        """Whether this algorithm also runs ``g`` on channels-first memory as it is:
        ``forward_channels_first(g, x (B, C, H, W), w, b) -> (y (B, O, OH, OW), saved)`` and
        ``backward_channels_first(g, grad_y (B, O, OH, OW), saved, w, need_input_grad)``, which
        ``Conv2d.forward`` takes when given such memory (a user's NCHW arrays)."""
        return False

    def release(self) -> None:
        """Free memory kept between calls."""

    @property
    def nbytes(self) -> int:
        """Bytes kept between calls."""
        return 0
