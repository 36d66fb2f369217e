"""Image preparation for training: scale to floats, random shifts, crops and flips, downsampling,
Efficient-CapsNet's augmentation, mini-batches.

The paper trains on MNIST "shifted by up to 2 pixels in each direction with
zero padding" (Sabour et al. 2017, section 5); :func:`random_shift` does that
for a whole batch at once, on NumPy or CuPy, with the random offsets drawn on
the host so both backends give identical results for the same generator.

Efficient-CapsNet (Mazzia et al. 2021) trains on MNIST with four random
transformations, in this order (:func:`efficient_augment`): a rotation of up to
30 degrees on about half the images (:func:`random_rotate`), a shift that keeps
the digit on the canvas (:func:`random_shift_within`), a horizontal squish
(:func:`random_squish`) and a 4x4 patch erased (:func:`random_erase`). Each is
vectorised over the batch and the pixels on the images' backend, with every
random number drawn on the host from the generator given, in a fixed order, so
a resumed run replays the same augmentation and both backends agree.
"""
from __future__ import annotations

import operator
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy

from capsnet import backend
from capsnet.backend import get_array_module, to_numpy

__all__ = ["center_crop", "downsample", "efficient_augment", "iterate_batches", "random_crop", "random_erase",
           "random_rotate", "random_shift", "random_shift_within", "random_squish", "sample_affine", "shift_by",
           "to_float"]


def _int_at_least(name: str, value: Any, minimum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def _check_generator(name: str, rng: Any) -> None:
    if not isinstance(rng, numpy.random.Generator):
        raise TypeError(
            f"{name} must be a host numpy.random.Generator "
            f"(e.g. numpy.random.default_rng(0)), got {type(rng).__name__}"
        )


def to_float(images: Any, dtype: Any = "float32", xp: ModuleType | None = None) -> Any:
    """uint8 images (N, H, W) or (N, C, H, W) -> floats (N, C, H, W) in [0, 1].

    A channel axis of 1 is added to (N, H, W) input (MNIST: (N, 1, 28, 28)).
    The result lives on ``xp`` (default: the current backend); the uint8 data
    is moved first, so only a quarter of the bytes cross to the GPU.
    """
    dtype = numpy.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"to_float dtype must be a floating type (float32, float64), got {dtype}")
    if getattr(images, "dtype", None) != numpy.uint8:
        kind = getattr(images, "dtype", type(images).__name__)
        raise TypeError(f"to_float expected uint8 images with values 0..255, got {kind}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim != 4:
        raise ValueError(
            f"to_float expected images of shape (N, H, W) or (N, C, H, W), got {tuple(images.shape)}"
        )
    module = backend.xp() if xp is None else xp
    moved = to_numpy(images) if module is numpy else module.asarray(images)
    out = moved.astype(dtype)
    out /= dtype.type(255)
    return out


def random_shift(images: Any, max_shift: int, rng: numpy.random.Generator) -> Any:
    """Shift each image (N, C, H, W) by its own integer offset, with zero fill.

    Row and column offsets are drawn independently and uniformly from
    ``-max_shift..max_shift`` with the host generator ``rng``; all channels of
    an image move together. Pixels moved out are lost, those moved in are 0.
    Returns a new array of the same dtype on the input's backend.
    """
    if getattr(images, "ndim", None) != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"random_shift expected images of shape (N, C, H, W), got {shape}")
    shift = _int_at_least("random_shift max_shift", max_shift, 0)
    _check_generator("random_shift rng", rng)
    if shift == 0:
        return images.copy()
    xp = get_array_module(images)
    return shift_by(images, xp.asarray(rng.integers(-shift, shift + 1, size=(images.shape[0], 2))), shift)


def shift_by(images: Any, offsets: Any, pad: int) -> Any:
    """Each image (N, C, H, W) moved by its own whole-pixel offset, ``offsets`` (N, 2) =
    (down, right) on the images' backend, each in [-pad, pad]; zero fill."""
    xp = get_array_module(images)
    n, _, height, width = images.shape
    padded = xp.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    # out[i, :, y, x] = images[i, :, y - dy, x - dx] = padded[i, :, y - dy + p, x - dx + p]
    rows = xp.arange(height)[None, :] - offsets[:, :1] + pad  # (N, H)
    cols = xp.arange(width)[None, :] - offsets[:, 1:] + pad  # (N, W)
    batch = xp.arange(n)[:, None, None, None]
    channel = xp.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def iterate_batches(
    n: int,
    batch_size: int,
    *,
    shuffle: bool,
    rng: numpy.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[numpy.ndarray]:
    """Yield host int64 index arrays that cover ``range(n)`` once, ``batch_size`` at a time.

    With ``shuffle`` the order is ``rng.permutation(n)``; ``rng`` is required
    then, so that runs are reproducible. ``drop_last`` skips a final short batch.
    """
    n = _int_at_least("iterate_batches n", n, 0)
    batch_size = _int_at_least("iterate_batches batch_size", batch_size, 1)
    if shuffle:
        if rng is None:
            raise ValueError(
                "iterate_batches(shuffle=True) needs rng, a numpy.random.Generator "
                "(e.g. numpy.random.default_rng(0)), got None"
            )
        _check_generator("iterate_batches rng", rng)
        order = rng.permutation(n).astype(numpy.int64, copy=False)
    else:
        order = numpy.arange(n, dtype=numpy.int64)
    stop = n - n % batch_size if drop_last else n
    # A generator expression, not a generator function: the checks above run
    # at the call, not at the first next().
    return (order[start : start + batch_size] for start in range(0, stop, batch_size))


def _check_images(name: str, images: Any) -> None:
    if getattr(images, "ndim", None) != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{name} expected images of shape (N, C, H, W), got {shape}")


def _half_normal(rng: numpy.random.Generator, size: Any) -> numpy.ndarray:
    """|N(0, 0.33)| capped below 1: the authors' draw of "how far" (most often a third of the way)."""
    return numpy.minimum(numpy.abs(rng.normal(0.0, 0.33, size)), 0.9999)


def sample_affine(images: Any, inverse: Any) -> Any:
    """Images (N, C, H, W) resampled through one affine map per image, bilinear, zero
    outside: out[i, :, y, x] = images[i, :, y', x'] with (x', y') = ``inverse[i]`` @ (x, y, 1)
    in pixel indices (column, row). ``inverse`` (N, 2, 3) is on the images' backend; the
    result has the images' dtype and backend."""
    xp = get_array_module(images)
    n, channels, height, width = images.shape
    pixels = height * width
    ys, xs = xp.divmod(xp.arange(pixels), width)
    source = inverse[:, :, :2] @ xp.stack([xs, ys]).astype(inverse.dtype) + inverse[:, :, 2:]  # (N, 2, P)
    x, y = source[:, 0], source[:, 1]
    x0, y0 = xp.floor(x), xp.floor(y)
    fx, fy = (x - x0).astype(images.dtype), (y - y0).astype(images.dtype)
    x0, y0 = x0.astype(xp.int64), y0.astype(xp.int64)
    indices, weights = [], []
    # the four neighbours of each source point: a loop over offsets, not pixels
    for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)),
                           (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        indices.append(xp.where(inside, yy * width + xx, 0))
        weights.append(weight * inside)
    # one gather from the flat images: image-channel row (i * C + c) * P plus the neighbour's pixel
    rows = (xp.arange(n * channels) * pixels).reshape(n, channels, 1)
    gathered = xp.take(images.reshape(-1), rows[None] + xp.stack(indices)[:, :, None, :])  # (4, N, C, P)
    out = (gathered * xp.stack(weights)[:, :, None, :]).sum(axis=0)
    return out.reshape(images.shape)


def _rotation_inverse(degrees: numpy.ndarray, height: int, width: int) -> numpy.ndarray:
    """(N, 2, 3) maps from an output pixel to its source under a turn about the canvas centre
    by ``degrees`` counter-clockwise on screen (y points down)."""
    theta = numpy.deg2rad(degrees)
    c, s = numpy.cos(theta), numpy.sin(theta)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # forward: x' - cx = c (x - cx) + s (y - cy), y' - cy = -s (x - cx) + c (y - cy); inverse: the transpose
    inverse = numpy.zeros((len(degrees), 2, 3))
    inverse[:, 0, 0], inverse[:, 0, 1], inverse[:, 1, 0], inverse[:, 1, 1] = c, -s, s, c
    inverse[:, 0, 2] = cx - c * cx + s * cy
    inverse[:, 1, 2] = cy - s * cx - c * cy
    return inverse


def random_rotate(images: Any, max_degrees: float, rng: numpy.random.Generator, p: float = 0.5) -> Any:
    """Turn each image (N, C, H, W) about its centre, with probability ``p``, by
    ``max_degrees`` times a draw of N(0, 0.33) clipped to (-1, 1) (Efficient-CapsNet's
    rotation: most turns under 10 degrees, none past ``max_degrees``); bilinear, zero fill.
    Draws two numbers per image from the host generator ``rng``."""
    _check_images("random_rotate", images)
    _check_generator("random_rotate rng", rng)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_rotate p must be a probability in [0, 1], got {p}")
    n = images.shape[0]
    degrees = max_degrees * numpy.clip(rng.normal(0.0, 0.33, n), -0.9999, 0.9999)
    degrees = numpy.where(rng.random(n) < p, degrees, 0.0)
    xp = get_array_module(images)
    inverse = xp.asarray(_rotation_inverse(degrees, images.shape[2], images.shape[3]))
    return sample_affine(images, inverse)


def _margins(images: Any) -> tuple[Any, Any, Any, Any]:
    """Empty rows above and below, columns left and right of each image's nonzero pixels
    (N,) each, on the images' backend; an empty image has margins of 0."""
    xp = get_array_module(images)
    rows = (images != 0).any(axis=(1, 3))  # (N, H)
    cols = (images != 0).any(axis=(1, 2))  # (N, W)
    top, bottom = rows.argmax(axis=1), rows[:, ::-1].argmax(axis=1)
    left, right = cols.argmax(axis=1), cols[:, ::-1].argmax(axis=1)
    empty = ~rows.any(axis=1)
    return tuple(xp.where(empty, 0, m) for m in (top, bottom, left, right))


def random_shift_within(images: Any, rng: numpy.random.Generator) -> Any:
    """Move each image (N, C, H, W) by a whole-pixel offset that keeps its nonzero pixels on
    the canvas (Efficient-CapsNet's shift): for each axis, a direction drawn at random and a
    fraction of the margin on that side drawn from |N(0, 0.33)| capped below 1. The
    fractions come from the host generator ``rng`` (four numbers per image); the margins
    are read on the images' device, with no transfer to the host."""
    _check_images("random_shift_within", images)
    _check_generator("random_shift_within rng", rng)
    xp = get_array_module(images)
    n, _, height, width = images.shape
    towards_end = xp.asarray(rng.random((n, 2)) < 0.5)  # (down, right)
    amount = xp.asarray(_half_normal(rng, (n, 2)))
    top, bottom, left, right = _margins(images)
    down = xp.where(towards_end[:, 0], xp.floor(amount[:, 0] * (bottom + 1)), -xp.floor(amount[:, 0] * top))
    across = xp.where(towards_end[:, 1], xp.floor(amount[:, 1] * (right + 1)), -xp.floor(amount[:, 1] * left))
    offsets = xp.stack([down, across], axis=1).astype(xp.int64)
    return shift_by(images, offsets, max(height, width))


def random_squish(images: Any, rng: numpy.random.Generator) -> Any:
    """Narrow each image (N, C, H, W) horizontally (Efficient-CapsNet's squish): its width
    resized to W - k, k = 1 + floor(u W / 4) with u from |N(0, 0.33)| capped below 1, then
    placed k // 2 (or one more) px from the left edge; bilinear (the authors resize with
    Lanczos), zero fill. Two numbers per image from the host generator ``rng``."""
    _check_images("random_squish", images)
    _check_generator("random_squish rng", rng)
    n, _, _, width = images.shape
    draws = _half_normal(rng, (n, 2))
    narrowing = numpy.floor(draws[:, 0] * (width / 4)) + 1
    offset = narrowing // 2 + numpy.floor(draws[:, 1] * 2)
    scale = (width - narrowing) / width
    # forward (pixel centres): x' = (x + 0.5) scale - 0.5 + offset; y' = y
    inverse = numpy.zeros((n, 2, 3))
    inverse[:, 0, 0] = 1 / scale
    inverse[:, 0, 2] = (0.5 - offset) / scale - 0.5
    inverse[:, 1, 1] = 1.0
    xp = get_array_module(images)
    return sample_affine(images, xp.asarray(inverse))


def random_erase(images: Any, rng: numpy.random.Generator, size: int = 4) -> Any:
    """Zero one ``size`` x ``size`` patch of each image (N, C, H, W), the row and column of its
    top-left corner each drawn uniformly from ``size`` to H - ``size`` - 2 (Efficient-CapsNet's
    erase: 4 to 22 on MNIST). Two numbers per image from the host generator ``rng``."""
    _check_images("random_erase", images)
    _check_generator("random_erase rng", rng)
    size = _int_at_least("random_erase size", size, 1)
    n, _, height, width = images.shape
    if min(height, width) < 2 * size + 2:
        raise ValueError(f"random_erase needs images at least 2 * size + 2 = {2 * size + 2} px wide and high, "
                         f"got {height}x{width}; pass a smaller size")
    spans = numpy.array([height - 2 * size - 1, width - 2 * size - 1])
    corners = numpy.floor(rng.random((n, 2)) * spans).astype(numpy.int64) + size
    xp = get_array_module(images)
    corners = xp.asarray(corners)
    rows = xp.arange(height)[None, :] - corners[:, :1]  # (N, H)
    cols = xp.arange(width)[None, :] - corners[:, 1:]  # (N, W)
    in_rows = (rows >= 0) & (rows < size)
    in_cols = (cols >= 0) & (cols < size)
    patch = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return xp.where(patch, images.dtype.type(0), images)


def efficient_augment(images: Any, rng: numpy.random.Generator, max_degrees: float = 30.0) -> Any:
    """Efficient-CapsNet's MNIST augmentation of a batch (N, C, H, W), in the authors'
    order: :func:`random_rotate` (up to ``max_degrees``, half the images),
    :func:`random_shift_within`, :func:`random_squish`, :func:`random_erase` (4x4).
    Ten numbers per image from the host generator ``rng``, in that order."""
    images = random_rotate(images, max_degrees, rng)
    images = random_shift_within(images, rng)
    images = random_squish(images, rng)
    return random_erase(images, rng)


def random_crop(images: Any, size: int, rng: numpy.random.Generator, *, flip: bool = False) -> Any:
    """A ``size`` x ``size`` window of each image (N, C, H, W) at its own random place, all
    channels together; ``flip``: each crop also mirrored left-right with probability 1/2.

    The corners (and flips) are drawn on the host with ``rng``, so both backends give
    identical results for the same generator. Returns a new array on the input's backend.
    """
    if getattr(images, "ndim", None) != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"random_crop expected images of shape (N, C, H, W), got {shape}")
    size = _int_at_least("random_crop size", size, 1)
    _check_generator("random_crop rng", rng)
    n, c, height, width = images.shape
    if size > min(height, width):
        raise ValueError(f"random_crop size must be at most the image size {height}x{width}, got {size}")
    xp = get_array_module(images)
    corners = rng.integers(0, [height - size + 1, width - size + 1], size=(n, 2))
    steps = numpy.broadcast_to(numpy.arange(size), (n, size))
    if flip:
        mirrored = rng.random(n) < 0.5
        steps = numpy.where(mirrored[:, None], size - 1 - steps, steps)
    rows = xp.asarray(corners[:, :1] + numpy.arange(size))  # (N, size)
    cols = xp.asarray(corners[:, 1:] + steps)  # (N, size)
    batch = xp.arange(n)[:, None, None, None]
    channel = xp.arange(c)[None, :, None, None]
    return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def center_crop(images: Any, size: int) -> Any:
    """The central ``size`` x ``size`` window of each image (N, C, H, W) (a view); where the
    margin is odd, the extra pixel is on the bottom and right."""
    size = _int_at_least("center_crop size", size, 1)
    height, width = images.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"center_crop size must be at most the image size {height}x{width}, got {size}")
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top:top + size, left:left + size]


def downsample(images: numpy.ndarray, factor: int) -> numpy.ndarray:
    """uint8 images (..., H, W) shrunk ``factor`` times on each side by averaging each
    ``factor`` x ``factor`` block (area resampling), rounded to uint8. H and W must be
    multiples of ``factor`` (smallNORB: 96x96 -> 48x48 with factor 2)."""
    factor = _int_at_least("downsample factor", factor, 1)
    height, width = images.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"downsample needs an image size divisible by {factor}, got {height}x{width}")
    xp = get_array_module(images)
    blocks = images.reshape(*images.shape[:-2], height // factor, factor, width // factor, factor)
    mean = blocks.astype(xp.float32).mean(axis=(-3, -1))
    return xp.rint(mean).astype(xp.uint8)
