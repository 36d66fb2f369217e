"""Inverted dropout: ``dropout`` / ``dropout_backward`` and ``Dropout``.

In training each value is zeroed with probability p and the others scaled by
1 / (1 - p), so nothing changes in expectation and eval mode is the identity. The
mask is drawn on the host from a generator seeded by (seed, draw number), so both
backends drop the same values, and the draw number is a buffer in ``state_dict``:
a resumed run draws the masks it would have drawn.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import numpy as np

from capsnet import backend
from capsnet.layers.base import Buffer, Module

__all__ = ["Dropout", "batch_slice", "current_batch_slice", "dropout", "dropout_backward"]

_slice = threading.local()


@contextlib.contextmanager
def batch_slice(total: int, lo: int, hi: int) -> Iterator[None]:
    """Inside the block, the batches the layers see are rows [lo, hi) of a batch of ``total``
    (a data-parallel rank's share of the global batch). Dropout then draws the mask of the
    whole batch and keeps those rows, so its masks do not depend on the number of ranks."""
    previous = getattr(_slice, "rows", None)
    _slice.rows = (total, lo, hi)
    try:
        yield
    finally:
        _slice.rows = previous


def current_batch_slice() -> tuple[int, int, int] | None:
    """(total, lo, hi) of the enclosing :func:`batch_slice` block on this thread, or None."""
    return getattr(_slice, "rows", None)


def dropout(x: Any, p: float, rng: np.random.Generator, rows: tuple[int, int, int] | None = None) -> tuple[Any, Any]:
    """x (any shape) -> (x * mask, mask), mask 0 with probability p, else 1 / (1 - p),
    drawn on the host with ``rng`` and moved to x's device. With ``rows`` = (total, lo,
    hi), x is rows [lo, hi) of a batch of ``total``: the whole batch's mask is drawn and
    those rows kept."""
    if rows is not None and rows[2] - rows[1] == x.shape[0]:
        keep = (rng.random((rows[0], *x.shape[1:])) >= p)[rows[1]:rows[2]]
    else:
        keep = rng.random(x.shape) >= p
    mask = (keep / (1 - p)).astype(x.dtype)
    mask = backend.to_device(mask, backend.backend_of(x))
    return x * mask, mask


def dropout_backward(grad_out: Any, mask: Any) -> Any:
    """Gradient of :func:`dropout` w.r.t. x."""
    return grad_out * mask


class Dropout(Module):
    """Inverted dropout with probability ``p`` (identity in eval mode); any input shape.

    ``seed`` (an int; None draws one) fixes the sequence of masks; the ``state`` buffer
    holds (seed, draws so far)."""

    def __init__(self, p: float = 0.5, seed: int | None = None):
        super().__init__()
        if not (isinstance(p, (int, float)) and 0 <= p < 1):
            raise ValueError(f"Dropout p must be in [0, 1), got {p!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"Dropout seed must be a non-negative integer or None, got {seed!r}")
        self.p = float(p)
        self.state = Buffer(np.array([seed, 0], dtype=np.int64), host=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Any) -> Any:
        if not self.training or self.p == 0:
            self._save(None)
            return x
        seed, draws = (int(v) for v in self.state.data)
        self.state.data[1] = draws + 1
        y, mask = dropout(x, self.p, np.random.default_rng([seed, draws]), getattr(_slice, "rows", None))
        self._save(mask)
        return y

    def advance(self) -> None:
        """Count a draw for a forward this process does not run (a data-parallel rank left
        without examples in a short last batch), so the ranks' draw counters stay equal."""
        if self.training and self.p > 0:
            self.state.data[1] += 1

    def backward(self, grad_out: Any) -> Any:
        (mask,) = self._pop()
        return grad_out if mask is None else dropout_backward(grad_out, mask)
