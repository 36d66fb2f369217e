"""capsnet.data.augment: to_float, random shifts and crops against loop references, downsampling, and batches."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet.backend import get_array_module, to_numpy
from capsnet.data import MNIST, iterate_batches, load_mnist, random_shift, to_float
from capsnet.data import center_crop, downsample, random_crop


# --------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def mnist(mnist_dir) -> MNIST:
    return load_mnist(mnist_dir, download=False, progress=False)


# ------------------------------------------------------------------ to_float


def test_to_float_scales_to_unit_range_on_the_current_backend(xp, host_rng):
    images = host_rng.integers(0, 256, (5, 28, 28)).astype(np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    out = to_float(images)
    assert get_array_module(out) is xp
    assert out.shape == (5, 1, 28, 28) and out.dtype == np.float32
    host = to_numpy(out)
    assert host[0, 0, 0, 0] == 0.0 and host[0, 0, 0, 1] == 1.0
    np.testing.assert_allclose(host[:, 0], images / 255.0, rtol=1e-6)

    as64 = to_float(images[:, None], dtype="float64", xp=np)
    assert isinstance(as64, np.ndarray) and as64.dtype == np.float64
    np.testing.assert_array_equal(as64[:, 0], images / 255.0)


def test_to_float_errors():
    with pytest.raises(TypeError, match=r"expected uint8 images .*got float32"):
        to_float(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, C, H, W\), got \(28, 28\)"):
        to_float(np.zeros((28, 28), np.uint8))
    with pytest.raises(TypeError, match=r"floating type .*got int32"):
        to_float(np.zeros((2, 28, 28), np.uint8), dtype="int32")


# -------------------------------------------------------------- random_shift


def shift_reference(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The slow obvious version: move (C, H, W) down dy and right dx, zero fill."""
    channels, height, width = image.shape
    out = np.zeros_like(image)
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                if 0 <= y - dy < height and 0 <= x - dx < width:
                    out[c, y, x] = image[c, y - dy, x - dx]
    return out


OFFSETS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_random_shift_matches_the_loop_reference(xp, host_rng, dtype):
    images = (host_rng.integers(1, 200, (40, 2, 9, 11))).astype(dtype)  # nonzero everywhere
    out = random_shift(xp.asarray(images), 2, np.random.default_rng(7))
    assert get_array_module(out) is xp and out.dtype == images.dtype and out.shape == images.shape
    out = to_numpy(out)
    for i in range(len(images)):
        matches = [s for s in OFFSETS if np.array_equal(out[i], shift_reference(images[i], *s))]
        assert len(matches) == 1, f"image {i} is not a shift of its input by one (dy, dx) in [-2, 2]^2"
    # The same generator state gives the same shifts on every backend.
    np.testing.assert_array_equal(out, random_shift(images, 2, np.random.default_rng(7)))


def test_random_shift_covers_all_25_offsets(xp):
    n = 5000
    images = np.zeros((n, 1, 9, 9), np.float32)
    images[:, 0, 4, 4] = 1.0  # a single dot: where it lands is the shift
    out = to_numpy(random_shift(xp.asarray(images), 2, np.random.default_rng(0)))
    assert np.all(out.sum(axis=(1, 2, 3)) == 1.0)
    where = out.reshape(n, -1).argmax(axis=1)
    dy, dx = where // 9 - 4, where % 9 - 4
    counts = np.zeros((5, 5), int)
    np.add.at(counts, (dy + 2, dx + 2), 1)
    assert counts.sum() == n
    assert counts.min() > 120 and counts.max() < 290, counts  # 200 expected each


def test_random_shift_conserves_mass_of_mnist_digits(xp, mnist):
    digits = mnist.train_images[:2000]
    border = np.ones((28, 28), bool)
    border[2:-2, 2:-2] = False
    empty = ~(digits[:, border] > 0).any(axis=1)
    assert empty.mean() > 0.85  # about 88% of MNIST digits keep 2 px clear of the edge
    images = to_float(digits, dtype="float64")
    before = to_numpy(images.sum(axis=(1, 2, 3)))
    out = random_shift(images, 2, np.random.default_rng(3))
    after = to_numpy(out.sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(after[empty], before[empty], rtol=1e-12)
    assert np.all(after <= before + 1e-9)  # a digit at the edge can only lose ink
    assert not np.array_equal(to_numpy(out), to_numpy(images))


def test_random_shift_is_reproducible_and_leaves_the_input_alone(xp, host_rng):
    images = xp.asarray(host_rng.random((64, 1, 28, 28)).astype(np.float32))
    before = to_numpy(images).copy()
    first = to_numpy(random_shift(images, 2, np.random.default_rng(11)))
    again = to_numpy(random_shift(images, 2, np.random.default_rng(11)))
    other = to_numpy(random_shift(images, 2, np.random.default_rng(12)))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(to_numpy(images), before)

    same = random_shift(images, 0, np.random.default_rng(0))
    assert same is not images
    np.testing.assert_array_equal(to_numpy(same), before)


def test_random_shift_errors():
    images = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\), got \(2, 28, 28\)"):
        random_shift(images[:, 0], 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"max_shift must be an integer >= 0, got -1"):
        random_shift(images, -1, np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"max_shift must be an integer >= 0, got 1.5"):
        random_shift(images, 1.5, np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"numpy.random.Generator .*got int"):
        random_shift(images, 2, 0)


# ------------------------------------------------------------ iterate_batches


def test_iterate_batches_covers_every_index_once():
    for shuffle in (False, True):
        batches = list(iterate_batches(10, 3, shuffle=shuffle, rng=np.random.default_rng(0)))
        assert [len(b) for b in batches] == [3, 3, 3, 1]
        assert all(b.dtype == np.int64 for b in batches)
        joined = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(joined), np.arange(10))
        assert np.array_equal(joined, np.arange(10)) is not shuffle
    assert list(iterate_batches(0, 4, shuffle=False)) == []


def test_iterate_batches_seeded_shuffle_is_reproducible():
    def epoch(seed):
        return np.concatenate(list(iterate_batches(1000, 64, shuffle=True, rng=np.random.default_rng(seed))))

    np.testing.assert_array_equal(epoch(5), epoch(5))
    assert not np.array_equal(epoch(5), epoch(6))
    rng = np.random.default_rng(5)
    first = np.concatenate(list(iterate_batches(1000, 64, shuffle=True, rng=rng)))
    second = np.concatenate(list(iterate_batches(1000, 64, shuffle=True, rng=rng)))
    assert not np.array_equal(first, second)  # each epoch draws a new order


def test_iterate_batches_drop_last():
    batches = list(iterate_batches(10, 3, shuffle=True, rng=np.random.default_rng(1), drop_last=True))
    assert [len(b) for b in batches] == [3, 3, 3]
    assert len(np.unique(np.concatenate(batches))) == 9
    assert [len(b) for b in iterate_batches(9, 3, shuffle=False, drop_last=True)] == [3, 3, 3]
    assert list(iterate_batches(2, 3, shuffle=False, drop_last=True)) == []


def test_iterate_batches_errors():
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        iterate_batches(10, 0, shuffle=False)
    with pytest.raises(TypeError, match=r"batch_size must be an integer >= 1, got 2.5"):
        iterate_batches(10, 2.5, shuffle=False)
    with pytest.raises(ValueError, match=r"n must be an integer >= 0, got -3"):
        iterate_batches(-3, 2, shuffle=False)
    with pytest.raises(ValueError, match=r"shuffle=True\) needs rng"):
        iterate_batches(10, 2, shuffle=True)
    with pytest.raises(TypeError, match=r"numpy.random.Generator .*got RandomState"):
        iterate_batches(10, 2, shuffle=True, rng=np.random.RandomState(0))


# ------------------------------------------------- crops, flips and downsampling


def _crop_reference(images: np.ndarray, size: int, rng: np.random.Generator, flip: bool) -> np.ndarray:
    """The loop version of random_crop, drawing from ``rng`` in the same order."""
    n, _, height, width = images.shape
    corners = rng.integers(0, [height - size + 1, width - size + 1], size=(n, 2))
    mirrored = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    out = []
    for i in range(n):
        top, left = corners[i]
        crop = images[i, :, top:top + size, left:left + size]
        out.append(crop[:, :, ::-1] if mirrored[i] else crop)
    return np.stack(out)


@pytest.mark.parametrize("flip", [False, True])
def test_random_crop_matches_a_loop_reference(xp, host_rng, flip):
    images = host_rng.integers(0, 256, (7, 3, 10, 9)).astype(np.float32)
    got = random_crop(xp.asarray(images), 6, np.random.default_rng(5), flip=flip)
    assert get_array_module(got) is xp and got.shape == (7, 3, 6, 6) and got.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(got), _crop_reference(images, 6, np.random.default_rng(5), flip))
    if flip:  # some crops are mirrored, some are not
        plain = _crop_reference(images, 6, np.random.default_rng(5), False)
        mirrored = [not np.array_equal(to_numpy(got)[i], plain[i]) for i in range(7)]
        assert any(mirrored) and not all(mirrored)


def test_center_crop_and_its_errors(xp):
    images = xp.arange(2 * 1 * 5 * 6, dtype=xp.float32).reshape(2, 1, 5, 6)
    got = to_numpy(center_crop(images, 3))
    np.testing.assert_array_equal(got, to_numpy(images)[:, :, 1:4, 1:4])
    with pytest.raises(ValueError, match=r"at most the image size 5x6, got 6"):
        center_crop(images, 6)
    with pytest.raises(ValueError, match=r"at most the image size 5x6, got 7"):
        random_crop(images, 7, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\), got \(5, 6\)"):
        random_crop(images[0, 0], 2, np.random.default_rng(0))


def test_downsample_averages_blocks(xp):
    images = np.array([[[0, 2, 10, 10], [4, 255, 20, 21], [1, 1, 1, 1], [1, 1, 1, 2]]], np.uint8)
    got = to_numpy(downsample(xp.asarray(images), 2))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, [[[65, 15], [1, 1]]])  # 261/4 = 65.25, 61/4 = 15.25, 5/4 = 1.25
    with pytest.raises(ValueError, match=r"divisible by 3, got 4x4"):
        downsample(images, 3)
