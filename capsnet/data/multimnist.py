"""MultiMNIST (Sabour et al. 2017, section 6): pairs of overlapping MNIST digits on a 36x36 canvas.

Each digit is placed on the canvas with its own random shift of up to ``max_shift`` (4) px
in each direction and overlaid on a digit of a different class from the same split; the
pixel values merge with a saturating sum (``min(a + b, 255)``). Training pairs are drawn
afresh every epoch from the loop's seeded host generator, so a resumed run replays them;
the test set is fixed by its own seed, with ``pairs_per_image`` partners for every test
image. Both sources follow the :class:`~capsnet.data.DataSource` protocol and give
batches ``(images, labels, first, second)``: images (B, 1, 36, 36) in [0, 1], labels
(B, 2) (the first and the second digit's class), and each digit alone on its canvas
(B, 1, 36, 36), the targets of a decoder that reconstructs one digit at a time.

:func:`both_right` is the paper's metric: a pair counts as right only when the two
largest scores are the two digits' classes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from capsnet import backend
from capsnet.data.augment import to_float
from capsnet.layers.capsule import longest_capsules

__all__ = ["MultiMNIST", "both_right", "different_class_partners", "overlay", "place"]

DIGIT = 28


def place(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, canvas: int = 36) -> np.ndarray:
    """uint8 digits (N, 28, 28) -> (N, canvas, canvas): each digit centred, then moved by
    (dy[i], dx[i]) px (positive: down, right). The shifts must keep it on the canvas."""
    n = images.shape[0]
    margin = (canvas - DIGIT) // 2
    if np.any(np.abs(dy) > margin) or np.any(np.abs(dx) > margin):
        raise ValueError(f"shifts must be at most {margin} px on a {canvas}x{canvas} canvas")
    out = np.zeros((n, canvas, canvas), dtype=images.dtype)
    rows = (margin + dy)[:, None] + np.arange(DIGIT)[None, :]  # (N, 28)
    cols = (margin + dx)[:, None] + np.arange(DIGIT)[None, :]
    out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = images
    return out


def overlay(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The saturating sum of two uint8 canvases: min(a + b, 255)."""
    return np.minimum(a.astype(np.uint16) + b, 255).astype(np.uint8)


def different_class_partners(labels: np.ndarray, first: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each index in ``first``, a partner index drawn uniformly among all examples of
    another class (rejection: redraw the partners that came out of the same class)."""
    partner = rng.integers(0, len(labels), size=len(first))
    same = labels[partner] == labels[first]
    while same.any():  # each round redraws only the clashes; about a tenth of them stay
        partner[same] = rng.integers(0, len(labels), size=int(same.sum()))
        same = labels[partner] == labels[first]
    return partner


class MultiMNIST:
    """MultiMNIST pairs from one MNIST split (uint8 images (N, 28, 28), labels (N,)).

    ``train=True``: ``len`` is N (one pair per image per epoch); each batch draws its
    partners and the four shifts from the loop's generator. ``train=False``: a fixed set of
    N * ``pairs_per_image`` pairs drawn once from ``seed``; evaluation draws nothing.
    Batches are (images, labels (B, 2), first, second), floats of ``dtype`` on the current
    backend.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, train: bool, max_shift: int = 4,
                 pairs_per_image: int = 1, seed: int = 0, canvas: int = 36, dtype: Any = "float32"):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (DIGIT, DIGIT):
            raise ValueError(f"MultiMNIST expected uint8 digits of shape (N, 28, 28), got {images.dtype} "
                             f"{images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"MultiMNIST expected labels of shape ({images.shape[0]},), got {labels.shape}")
        if len(np.unique(labels)) < 2:
            raise ValueError("MultiMNIST needs digits of at least two classes")
        if not 0 <= max_shift <= (canvas - DIGIT) // 2:
            raise ValueError(f"max_shift must be in [0, {(canvas - DIGIT) // 2}] for a {canvas}px canvas, "
                             f"got {max_shift}")
        if pairs_per_image < 1:
            raise ValueError(f"pairs_per_image must be at least 1, got {pairs_per_image}")
        self.images, self.labels = images, labels.astype(np.int64)
        self.train, self.max_shift, self.canvas, self.dtype = train, max_shift, canvas, np.dtype(dtype)
        self._fixed = None
        if not train:
            rng = np.random.default_rng(seed)
            first = np.repeat(np.arange(len(labels)), pairs_per_image)
            self._fixed = (first, *self._draw(first, rng))

    def __len__(self) -> int:
        return len(self.labels) if self.train else len(self._fixed[0])

    def __repr__(self) -> str:
        kind = "training" if self.train else f"test, {len(self)} fixed pairs"
        return f"MultiMNIST({len(self.labels)} digits, {kind}, shifts up to {self.max_shift} px)"

    def _draw(self, first: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(partners (B,), shifts (B, 4): dy, dx of the first digit, then of the second)."""
        partner = different_class_partners(self.labels, first, rng)
        shifts = rng.integers(-self.max_shift, self.max_shift + 1, size=(len(first), 4))
        return partner, shifts

    def order(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self)).astype(np.int64, copy=False)

    def pairs(self, indices: np.ndarray, rng: np.random.Generator | None) -> tuple[np.ndarray, ...]:
        """(first, partner, shifts) of the pairs at ``indices``: drawn from ``rng`` in
        training, looked up in the fixed set otherwise."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.train:
            if rng is None:
                raise ValueError("MultiMNIST(train=True).batch needs the loop's generator: the pairs are drawn "
                                 "afresh every epoch (use train=False for a fixed evaluation set)")
            return (indices, *self._draw(indices, rng))
        first, partner, shifts = self._fixed
        return first[indices], partner[indices], shifts[indices]

    def batch(self, indices: np.ndarray, rng: np.random.Generator | None = None) -> tuple[Any, ...]:
        first, partner, shifts = self.pairs(indices, rng)
        a = place(self.images[first], shifts[:, 0], shifts[:, 1], self.canvas)
        b = place(self.images[partner], shifts[:, 2], shifts[:, 3], self.canvas)
        xp = backend.xp()
        labels = xp.asarray(np.stack([self.labels[first], self.labels[partner]], axis=1))
        return (to_float(overlay(a, b), self.dtype, xp), labels, to_float(a, self.dtype, xp),
                to_float(b, self.dtype, xp))


def both_right(outputs: Any, batch: tuple) -> Any:
    """How many pairs of the batch have their two largest scores at their two labels
    (``batch[1]``, (B, 2)): the paper's MultiMNIST accuracy, as a count. The two largest
    are :func:`~capsnet.layers.longest_capsules` (its tie rule)."""
    scores = outputs[0] if isinstance(outputs, tuple) else outputs  # CapsNet: (lengths, reconstructions)
    xp = backend.get_array_module(scores)
    labels = xp.sort(batch[1], axis=1)
    return (longest_capsules(scores, labels.shape[1]) == labels).all(axis=1).sum()
