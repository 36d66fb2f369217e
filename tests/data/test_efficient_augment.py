"""capsnet.data.augment: Efficient-CapsNet's augmentation (rotation, shift within the margins,
squish, erase), each against a slow per-image reference, on every backend."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet.backend import get_array_module, to_numpy
from capsnet.data.affine import affine_matrix, warp
from capsnet.data.augment import (efficient_augment, random_erase, random_rotate, random_shift_within,
                                  random_squish)


def digits(rng: np.random.Generator, n: int = 6, size: int = 28, dtype=np.float32) -> np.ndarray:
    """Blobs of random values placed at random, some near an edge, one image empty."""
    out = np.zeros((n, 1, size, size), dtype)
    for i in range(1, n):
        top, left = rng.integers(0, size - 8, 2)
        out[i, 0, top:top + 8, left:left + 6] = rng.uniform(0.2, 1.0, (8, 6))
    return out


def bilinear_reference(image: np.ndarray, source_of) -> np.ndarray:
    """The slow obvious resampling of one image (H, W): each output pixel read at
    source_of(x, y) from its four neighbours, zero outside."""
    h, w = image.shape
    out = np.zeros_like(image, dtype=np.float64)
    for y in range(h):
        for x in range(w):
            sx, sy = source_of(x, y)
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            fx, fy = sx - x0, sy - y0
            for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)),
                                   (1, 1, fy * fx)):
                if 0 <= y0 + dy < h and 0 <= x0 + dx < w:
                    out[y, x] += weight * image[y0 + dy, x0 + dx]
    return out


def test_random_rotate_matches_the_affine_warp(xp):
    images = digits(np.random.default_rng(0))
    out = to_numpy(random_rotate(xp.asarray(images), 30.0, np.random.default_rng(1), p=1.0))
    replay = np.random.default_rng(1)
    degrees = 30.0 * np.clip(replay.normal(0.0, 0.33, len(images)), -0.9999, 0.9999)
    expected = warp(images, affine_matrix(rotation=degrees))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out.dtype == np.float32


def test_random_rotate_by_a_quarter_turn_is_rot90_and_half_the_images_turn(xp):
    images = digits(np.random.default_rng(2), size=9)
    turned = to_numpy(random_rotate(xp.asarray(images), 90.0 / 0.9999, _FixedNormal(0.9999), p=1.0))
    np.testing.assert_allclose(turned, np.rot90(images, k=1, axes=(2, 3)), atol=1e-5)
    many = np.ones((2000, 1, 5, 5), np.float32)
    many[:, :, 2, :] = 0.5  # a horizontal bar: any turn changes the image
    out = to_numpy(random_rotate(xp.asarray(many), 30.0, np.random.default_rng(3)))
    changed = np.abs(out - many).max(axis=(1, 2, 3)) > 1e-3
    assert 0.45 < changed.mean() < 0.55
    assert to_numpy(random_rotate(xp.asarray(many[:4]), 30.0, np.random.default_rng(3), p=0.0)).tolist() == \
        many[:4].tolist()


class _FixedNormal:
    """A generator whose normal draws are all ``value`` and whose uniform draws are 0 (every coin: yes)."""

    def __init__(self, value: float):
        self.value = value

    def normal(self, loc, scale, size):
        return np.full(size, self.value)

    def random(self, size):
        return np.zeros(size)


@pytest.fixture(autouse=True)
def _accept_fixed_generators(monkeypatch):
    """The fixed generator above stands in for numpy's where a test asks for exact draws."""
    import capsnet.data.augment as augment
    check = augment._check_generator
    monkeypatch.setattr(augment, "_check_generator",
                        lambda name, rng: None if isinstance(rng, _FixedNormal) else check(name, rng))


def test_random_shift_within_matches_a_loop_and_keeps_every_pixel(xp):
    images = digits(np.random.default_rng(4), n=8)
    out = to_numpy(random_shift_within(xp.asarray(images), np.random.default_rng(5)))
    replay = np.random.default_rng(5)
    towards_end = replay.random((len(images), 2)) < 0.5
    amount = np.minimum(np.abs(replay.normal(0.0, 0.33, (len(images), 2))), 0.9999)
    for i, image in enumerate(images[:, 0]):
        rows, cols = np.nonzero(image)
        if rows.size == 0:
            np.testing.assert_array_equal(out[i, 0], image)
            continue
        margins = {"top": rows.min(), "bottom": 27 - rows.max(), "left": cols.min(), "right": 27 - cols.max()}
        dy = np.floor(amount[i, 0] * (margins["bottom"] + 1)) if towards_end[i, 0] else -np.floor(amount[i, 0] * margins["top"])
        dx = np.floor(amount[i, 1] * (margins["right"] + 1)) if towards_end[i, 1] else -np.floor(amount[i, 1] * margins["left"])
        expected = np.zeros_like(image)
        for y, x in zip(rows, cols):
            expected[y + int(dy), x + int(dx)] = image[y, x]
        np.testing.assert_array_equal(out[i, 0], expected)
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), images.sum(axis=(1, 2, 3)), rtol=1e-6)


def test_random_squish_matches_a_loop(xp):
    images = digits(np.random.default_rng(6))
    out = to_numpy(random_squish(xp.asarray(images), np.random.default_rng(7)))
    replay = np.random.default_rng(7)
    draws = np.minimum(np.abs(replay.normal(0.0, 0.33, (len(images), 2))), 0.9999)
    for i, image in enumerate(images[:, 0]):
        narrowing = np.floor(draws[i, 0] * 7) + 1
        offset = narrowing // 2 + np.floor(draws[i, 1] * 2)
        scale = (28 - narrowing) / 28
        expected = bilinear_reference(image, lambda x, y: ((x - offset + 0.5) / scale - 0.5, y))
        np.testing.assert_allclose(out[i, 0], expected, atol=1e-5)
    assert (out[1:].sum(axis=(1, 2, 3)) < images[1:].sum(axis=(1, 2, 3))).all()  # every digit narrower


def test_random_erase_zeros_one_patch_inside_the_margin(xp):
    images = np.ones((500, 1, 28, 28), np.float32)
    out = to_numpy(random_erase(xp.asarray(images), np.random.default_rng(8)))
    replay = np.random.default_rng(8)
    corners = np.floor(replay.random((500, 2)) * 19).astype(int) + 4
    for i in range(0, 500, 50):
        expected = np.ones((28, 28), np.float32)
        expected[corners[i, 0]:corners[i, 0] + 4, corners[i, 1]:corners[i, 1] + 4] = 0
        np.testing.assert_array_equal(out[i, 0], expected)
    assert ((out == 0).sum(axis=(1, 2, 3)) == 16).all()
    zeros = np.argwhere(out[:, 0] == 0)[:, 1:]
    assert zeros.min() == 4 and zeros.max() == 25  # corners 4..22, patches to 25
    with pytest.raises(ValueError, match=r"at least 2 \* size \+ 2 = 10 px .*got 8x8; pass a smaller size"):
        random_erase(xp.zeros((1, 1, 8, 8), dtype=xp.float32), np.random.default_rng(0))


def test_efficient_augment_is_seeded_keeps_dtype_and_agrees_with_numpy(xp):
    images = digits(np.random.default_rng(9), n=16, dtype=np.float64)
    first = efficient_augment(xp.asarray(images), np.random.default_rng(10))
    assert get_array_module(first) is xp and first.dtype == np.float64 and first.shape == images.shape
    again = efficient_augment(xp.asarray(images), np.random.default_rng(10))
    np.testing.assert_array_equal(to_numpy(first), to_numpy(again))
    on_host = efficient_augment(images, np.random.default_rng(10))
    np.testing.assert_allclose(to_numpy(first), on_host, atol=1e-12)
    other = efficient_augment(xp.asarray(images), np.random.default_rng(11))
    assert not np.array_equal(to_numpy(first), to_numpy(other))


def test_augmentations_refuse_bad_inputs(xp):
    with pytest.raises(ValueError, match=r"random_rotate expected images of shape \(N, C, H, W\), got \(28, 28\)"):
        random_rotate(xp.zeros((28, 28), dtype=xp.float32), 30.0, np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"random_squish rng must be a host numpy.random.Generator"):
        random_squish(xp.zeros((1, 1, 28, 28), dtype=xp.float32), 0)
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2"):
        random_rotate(xp.zeros((1, 1, 28, 28), dtype=xp.float32), 30.0, np.random.default_rng(0), p=2)
