"""Affine transformations of digit images, for the robustness experiment of section 5.2.

The paper trains on expanded MNIST (digits placed at random on a 40x40 canvas) and tests
on affNIST, MNIST test digits under random small affine transformations. This module
gives both halves on the host, in NumPy:

- :func:`affine_matrix`: the 2x3 matrix of a rotation, an (anisotropic) scaling and a
  shear about the canvas centre, then a translation.
- :func:`warp`: images (N, H, W) resampled through one matrix per image (bilinear,
  zeros outside), vectorised over the batch and the pixels.
- :func:`sweep`: a whole test set under one transformation of one strength (the curves
  of ``python -m capsnet.robustness``).
- :func:`random_affine`: a mixed set in the spirit of affNIST, its ranges options.
- :func:`read_affnist`: the real affNIST ``.mat`` files (``scipy``, the ``affnist`` extra).

Coordinates are (x, y) = (column, row), y pointing down, measured from the canvas centre
((W - 1) / 2, (H - 1) / 2). A matrix A = [M | t] sends the input pixel at p to the output
position M p + t: a positive rotation turns the digit counter-clockwise as it is seen on
the screen, a shear k moves each row sideways by k times its height above the centre
(x' = x - k y: positive k slants the digit to the right, as italics), and a scale above
1 enlarges it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from capsnet.data.augment import shift_by

__all__ = ["AFFNIST_RANGES", "TRANSFORMS", "affine_matrix", "bounding_boxes", "random_affine", "read_affnist",
           "sweep", "translate", "warp"]

# The mixed set's defaults: what the affNIST page describes (rotation within 20 degrees,
# shear within 0.2, each axis scaled by 0.8 to 1.2, then a translation that keeps the digit
# on the 40x40 canvas); each is an option of random_affine and of capsnet.robustness.
AFFNIST_RANGES = {"rotation": 20.0, "shear": 0.2, "scale": (0.8, 1.2)}
"""The mixed set's ranges: rotation within 20 degrees, shear within 0.2, each axis scaled by 0.8 to 1.2."""

# The single-transformation sweeps: name -> (keyword of affine_matrix, strengths).
TRANSFORMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "rotation": ("rotation", (0.0, 10.0, 20.0, 30.0, 45.0, 60.0)),
    "scale": ("scale", (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)),
    "shear": ("shear", (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)),
}
"""The sweeps of capsnet.robustness: name -> (keyword of :func:`affine_matrix`, strengths)."""


def affine_matrix(rotation: Any = 0.0, scale: Any = 1.0, shear: Any = 0.0, translation: Any = (0.0, 0.0), *,
                  scale_y: Any = None) -> np.ndarray:
    """The 2x3 matrices [M | t] of: a scaling by ``scale`` (horizontally, and vertically
    too unless ``scale_y`` is given), then a shear, then a rotation by ``rotation``
    degrees (counter-clockwise on screen), all about the canvas centre, then a shift by
    ``translation`` = (tx, ty) px (right, down).

    Scalars give one (2, 3) matrix; arrays of N values (broadcast together; a translation
    (N, 2)) give (N, 2, 3).
    """
    rot = np.deg2rad(np.asarray(rotation, dtype=np.float64))
    sx = np.asarray(scale, dtype=np.float64)
    sy = sx if scale_y is None else np.asarray(scale_y, dtype=np.float64)
    k = np.asarray(shear, dtype=np.float64)
    translation = np.asarray(translation, dtype=np.float64)
    if translation.shape[-1:] != (2,):
        raise ValueError(f"translation must be (tx, ty) or (N, 2), got shape {translation.shape}")
    tx, ty = translation[..., 0], translation[..., 1]
    rot, sx, sy, k, tx, ty = np.broadcast_arrays(rot, sx, sy, k, tx, ty)
    c, s = np.cos(rot), np.sin(rot)
    # y points down: a counter-clockwise turn on screen is x' = c x + s y, y' = -s x + c y
    rotate = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)
    one, zero = np.ones_like(k), np.zeros_like(k)
    shear_m = np.stack([np.stack([one, -k], -1), np.stack([zero, one], -1)], -2)
    scale_m = np.stack([np.stack([sx, zero], -1), np.stack([zero, sy], -1)], -2)
    m = rotate @ shear_m @ scale_m
    return np.concatenate([m, np.stack([tx, ty], -1)[..., None]], axis=-1)


def warp(images: np.ndarray, matrices: np.ndarray, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Images (N, H, W) (or (N, 1, H, W)) moved through their matrices (N, 2, 3) (or one
    (2, 3) for all): out(p) = in(M^-1 (p - t)), read with bilinear interpolation, zero
    outside the input. float32 in [0, 1] in, float32 out; ``out_size`` defaults to (H, W),
    both canvases sharing the centre convention."""
    images = np.asarray(images)
    squeeze_channel = images.ndim == 4
    if squeeze_channel:
        if images.shape[1] != 1:
            raise ValueError(f"warp expected one channel, got images of shape {images.shape}")
        images = images[:, 0]
    if images.ndim != 3:
        raise ValueError(f"warp expected images of shape (N, H, W) or (N, 1, H, W), got {images.shape}")
    n, h, w = images.shape
    matrices = np.asarray(matrices, dtype=np.float64)
    if matrices.shape == (2, 3):
        matrices = np.broadcast_to(matrices, (n, 2, 3))
    if matrices.shape != (n, 2, 3):
        raise ValueError(f"warp expected one 2x3 matrix or ({n}, 2, 3), got {matrices.shape}")
    oh, ow = out_size or (h, w)
    inverse = np.linalg.inv(matrices[:, :, :2])  # (N, 2, 2)
    ys, xs = np.mgrid[0:oh, 0:ow]
    out_pts = np.stack([xs.ravel() - (ow - 1) / 2, ys.ravel() - (oh - 1) / 2], 0).astype(np.float64)  # (2, P)
    src = inverse @ (out_pts[None] - matrices[:, :, 2:])  # (N, 2, P), centred input coordinates
    x = src[:, 0] + (w - 1) / 2
    y = src[:, 1] + (h - 1) / 2
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    flat = images.reshape(n, -1).astype(np.float32, copy=False)
    rows = np.arange(n)[:, None]
    out = np.zeros((n, oh * ow), dtype=np.float32)
    for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        index = np.where(inside, yy * w + xx, 0)
        out += np.where(inside, flat[rows, index], 0) * weight
    out = out.reshape(n, oh, ow)
    return out[:, None] if squeeze_channel else out


def bounding_boxes(images: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """(N, 4) int: top, bottom, left, right (inclusive) of the pixels above ``threshold``
    in each image (N, H, W); an empty image gives the whole canvas."""
    on = np.asarray(images) > threshold
    rows, cols = on.any(axis=2), on.any(axis=1)
    h, w = rows.shape[1], cols.shape[1]
    empty = ~rows.any(axis=1)
    top = np.where(empty, 0, rows.argmax(axis=1))
    bottom = np.where(empty, h - 1, h - 1 - rows[:, ::-1].argmax(axis=1))
    left = np.where(empty, 0, cols.argmax(axis=1))
    right = np.where(empty, w - 1, w - 1 - cols[:, ::-1].argmax(axis=1))
    return np.stack([top, bottom, left, right], axis=1)


def translate(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Each image (N, H, W) moved by its own whole-pixel offset (down, right), zero fill."""
    images = np.asarray(images)
    reach = max(images.shape[1:])  # a move of the whole canvas or more leaves nothing
    offsets = np.clip(np.stack([np.asarray(dy), np.asarray(dx)], axis=1), -reach, reach)
    return shift_by(images[:, None], offsets, int(np.abs(offsets).max(initial=0)))[:, 0]


def sweep(images: np.ndarray, transform: str, strength: float, canvas: int | None = None) -> np.ndarray:
    """Digits (N, H, W) floats, centred on a ``canvas``-pixel square (default: their own
    size), under one transformation of one strength: ``rotation`` in degrees, ``scale``
    the factor, ``shear`` the factor (see :data:`TRANSFORMS`). (N, 1, canvas, canvas)."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {sorted(TRANSFORMS)}, got {transform!r}")
    keyword = TRANSFORMS[transform][0]
    size = canvas or images.shape[-1]
    return warp(images, affine_matrix(**{keyword: strength}), out_size=(size, size))[:, None]


def random_affine(images: np.ndarray, rng: np.random.Generator, *, rotation: float = AFFNIST_RANGES["rotation"],
                  shear: float = AFFNIST_RANGES["shear"], scale: tuple[float, float] = AFFNIST_RANGES["scale"],
                  canvas: int = 40, translate_digits: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A mixed set in the spirit of affNIST: each digit (N, H, W) rotated by up to
    ``rotation`` degrees either way, sheared by up to ``shear`` either way, each axis
    scaled by a factor in ``scale``, all drawn uniformly and independently, centred on a
    ``canvas``-pixel square; then, with ``translate_digits``, moved by a whole-pixel offset
    drawn uniformly among those that keep its bounding box on the canvas.

    Returns (images (N, 1, canvas, canvas), matrices (N, 2, 3)) where each matrix is the
    whole transformation, translation included."""
    n = images.shape[0]
    lo, hi = scale
    matrices = affine_matrix(rotation=rng.uniform(-rotation, rotation, n), shear=rng.uniform(-shear, shear, n),
                             scale=rng.uniform(lo, hi, n), scale_y=rng.uniform(lo, hi, n))
    out = warp(images, matrices, out_size=(canvas, canvas))
    if translate_digits:
        top, bottom, left, right = bounding_boxes(out).T
        dy = np.floor(rng.uniform(size=n) * (canvas - bottom + top)).astype(np.int64) - top
        dx = np.floor(rng.uniform(size=n) * (canvas - right + left)).astype(np.int64) - left
        out = translate(out, dy, dx)
        matrices = matrices.copy()
        matrices[:, 0, 2] += dx
        matrices[:, 1, 2] += dy
    return out[:, None], matrices


def read_affnist(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 40, 40) uint8 and labels (N,) int64 from one affNIST ``.mat`` file (for
    instance ``test.mat`` of the transformed set), read with scipy (the ``affnist`` extra).

    The layout, as the public readers of the files use it: a struct ``affNISTdata`` whose
    field ``image`` is (1600, N), one image per column in row-major order, and whose field
    ``label_int`` holds the N class labels."""
    try:
        from scipy.io import loadmat  # noqa: PLC0415 - optional
    except ImportError as exc:
        raise ImportError("reading affNIST .mat files needs scipy: pip install 'capsnet[affnist]' "
                          f"(or pip install scipy); {exc}") from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no affNIST file at {path}")
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=True)
    except Exception as exc:  # scipy raises several types for files that are not .mat
        raise ValueError(f"{path} is not a readable .mat file ({type(exc).__name__}: {exc})") from exc
    if "affNISTdata" not in mat:
        raise ValueError(f"{path} holds no affNISTdata struct (variables: {sorted(k for k in mat if not k.startswith('__'))})")
    data = mat["affNISTdata"]
    names = data.dtype.names or ()
    if "image" not in names or "label_int" not in names:
        raise ValueError(f"{path}: affNISTdata lacks the image or label_int field (fields: {list(names)})")
    image = np.asarray(data["image"].item() if data.shape == () else data["image"])
    labels = np.atleast_1d(np.asarray(data["label_int"].item() if data.shape == () else data["label_int"]))
    if image.ndim == 1:  # a file of one image
        image = image[:, None]
    side = math.isqrt(image.shape[0])
    if image.ndim != 2 or side * side != image.shape[0] or labels.shape != (image.shape[1],):
        raise ValueError(f"{path}: expected image (side * side, N) and label_int (N,), got {image.shape} and "
                         f"{labels.shape}")
    return np.ascontiguousarray(image.T.reshape(-1, side, side)).astype(np.uint8), labels.astype(np.int64)
