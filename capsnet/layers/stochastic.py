"""Inverted dropout: ``dropout`` / ``dropout_backward`` and ``Dropout``.

In training each value is zeroed with probability p and the others scaled by
1 / (1 - p), so nothing changes in expectation and eval mode is the identity. The
mask is drawn on the host from a generator seeded by (seed, draw number), so both
backends drop the same values, and the draw number is a buffer in ``state_dict``:
a resumed run draws the masks it would have drawn.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from capsnet import backend
from capsnet.layers.base import Buffer, Module

__all__ = ["Dropout", "dropout", "dropout_backward"]


def dropout(x: Any, p: float, rng: np.random.Generator) -> tuple[Any, Any]:
    """x (any shape) -> (x * mask, mask), mask 0 with probability p, else 1 / (1 - p),
    drawn on the host with ``rng`` and moved to x's device."""
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
        y, mask = dropout(x, self.p, np.random.default_rng([seed, draws]))
        self._save(mask)
        return y

    def backward(self, grad_out: Any) -> Any:
        (mask,) = self._pop()
        return grad_out if mask is None else dropout_backward(grad_out, mask)
