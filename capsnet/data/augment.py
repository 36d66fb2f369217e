"""Image preparation for training: scale to floats, random shifts, crops and flips, downsampling, mini-batches.

The paper trains on MNIST "shifted by up to 2 pixels in each direction with
zero padding" (Sabour et al. 2017, section 5); :func:`random_shift` does that
for a whole batch at once, on NumPy or CuPy, with the random offsets drawn on
the host so both backends give identical results for the same generator.
"""
from __future__ import annotations

import operator
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy

from capsnet import backend
from capsnet.backend import get_array_module, to_numpy

__all__ = ["center_crop", "downsample", "iterate_batches", "random_crop", "random_shift", "shift_by", "to_float"]


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
