"""Affine transformations against hand-computed pixel positions, a transform and its
inverse, the affNIST-style mixed set, the affNIST file reader (on a file written here in
the layout of the real files) and ``python -m capsnet.robustness``."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet.data.affine import (
    AFFNIST_RANGES,
    affine_matrix,
    bounding_boxes,
    random_affine,
    read_affnist,
    sweep,
    translate,
    warp,
)


def dot(h=9, w=9, y=1, x=4):
    img = np.zeros((1, h, w), np.float32)
    img[0, y, x] = 1
    return img


def where(img):
    return [tuple(p) for p in np.argwhere(img[0] > 0.5)]


def test_rotation_turns_counter_clockwise_about_the_centre():
    # (row 1, col 4) is 3 px above the centre (4, 4)
    assert where(warp(dot(), affine_matrix(rotation=90))) == [(4, 1)]  # to the left
    assert where(warp(dot(), affine_matrix(rotation=-90))) == [(4, 7)]  # to the right
    assert where(warp(dot(), affine_matrix(rotation=180))) == [(7, 4)]
    out = warp(dot(), affine_matrix(rotation=45))
    # 3 px up, turned 45 degrees to the left: (-3 sin 45, -3 cos 45) = (-2.12, -2.12) from the centre
    r, c = np.unravel_index(out[0].argmax(), out[0].shape)
    assert (r, c) == (2, 2)
    # output pixel (2, 2), at (-2, -2) from the centre, reads the input at (0, -2 sqrt 2): 0.17 px from the dot
    assert out[0, 2, 2] == pytest.approx(2 * np.sqrt(2) - 2, rel=1e-5)


def test_scale_shear_and_translation_move_pixels_where_computed():
    big = warp(dot(y=3, x=4), affine_matrix(scale=2.0))  # 1 px above the centre -> 2 px above
    assert np.unravel_index(big[0].argmax(), big[0].shape) == (2, 4)
    wide = warp(dot(y=4, x=5), affine_matrix(scale=3.0, scale_y=1.0))  # 1 px right -> 3 px right
    assert np.unravel_index(wide[0].argmax(), wide[0].shape) == (4, 7)
    # shear 1: a pixel 3 rows above the centre moves 3 px to the right (x' = x - k y)
    assert where(warp(dot(), affine_matrix(shear=1.0))) == [(1, 7)]
    assert where(warp(dot(), affine_matrix(translation=(2, -1)))) == [(0, 6)]  # right 2, up 1
    # the order: scale, then shear, then rotation, then translation
    m = affine_matrix(rotation=30, scale=1.5, shear=0.2, translation=(1, 2))
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    expected = np.array([[c, s], [-s, c]]) @ np.array([[1, -0.2], [0, 1]]) @ np.diag([1.5, 1.5])
    np.testing.assert_allclose(m[:, :2], expected, rtol=1e-12)
    np.testing.assert_allclose(m[:, 2], [1, 2])


def test_batched_matrices_and_one_matrix_per_image():
    m = affine_matrix(rotation=[0, 90, 180], scale=[1, 1, 1])
    assert m.shape == (3, 2, 3)
    out = warp(np.repeat(dot(), 3, axis=0), m)
    assert [where(o[None]) for o in out] == [[(1, 4)], [(4, 1)], [(7, 4)]]
    with pytest.raises(ValueError, match=r"one 2x3 matrix or \(3, 2, 3\)"):
        warp(np.repeat(dot(), 3, axis=0), m[:2])
    with pytest.raises(ValueError, match="translation must be"):
        affine_matrix(translation=(1, 2, 3))


def test_a_transform_and_its_inverse_restore_the_image(mnist_dir):
    from capsnet.data import load_mnist  # noqa: PLC0415

    digits = load_mnist(mnist_dir, download=False, progress=False).test_images[:20].astype(np.float32) / 255
    canvas = np.pad(digits, ((0, 0), (6, 6), (6, 6)))
    m = affine_matrix(rotation=25, scale=1.1, scale_y=0.9, shear=0.15, translation=(1.5, -2))
    full = np.concatenate([m, [[0, 0, 1]]])
    inverse = np.linalg.inv(full)[:2]
    back = warp(warp(canvas, m), inverse)
    err = np.abs(back - canvas)
    assert err.mean() < 0.03 and np.percentile(err, 99) < 0.35  # bilinear interpolation, twice
    assert np.abs(warp(canvas, affine_matrix()) - canvas).max() < 1e-6  # the identity is exact


def test_sweep_and_mixed_set(mnist_dir):
    from capsnet.data import load_mnist  # noqa: PLC0415

    data = load_mnist(mnist_dir, download=False, progress=False)
    digits = data.test_images[:200].astype(np.float32) / 255
    centred = sweep(digits, "rotation", 0.0, canvas=40)
    assert centred.shape == (200, 1, 40, 40)
    np.testing.assert_allclose(centred[:, 0, 6:34, 6:34], digits, atol=1e-6)
    with pytest.raises(ValueError, match="transform must be one of"):
        sweep(digits, "twist", 1.0)
    rng = np.random.default_rng(0)
    images, matrices = random_affine(digits, rng)
    assert images.shape == (200, 1, 40, 40) and matrices.shape == (200, 2, 3)
    lin = matrices[:, :, :2]
    # each matrix is rotation @ shear @ scale: recover the parameters and check their ranges
    det = np.linalg.det(lin)
    assert np.all((det > 0.8 ** 2 - 1e-9) & (det < 1.2 ** 2 + 1e-9))
    box = bounding_boxes(images[:, 0])
    assert box.min() >= 0 and box[:, 1].max() <= 39 and box[:, 3].max() <= 39
    # digits end up all over the canvas, not only near the centre
    centres = (box[:, 0] + box[:, 1]) / 2
    assert centres.min() < 14 and centres.max() > 25
    # the matrices describe the images: applying them to the centred digits gives the same pixels
    again = warp(np.pad(digits, ((0, 0), (6, 6), (6, 6))), matrices)
    assert np.abs(again - images[:, 0]).mean() < 0.01
    same, _ = random_affine(digits, np.random.default_rng(0))
    np.testing.assert_array_equal(same, images)  # fixed by its seed
    assert AFFNIST_RANGES == {"rotation": 20.0, "shear": 0.2, "scale": (0.8, 1.2)}


def test_translate_and_bounding_boxes():
    img = np.zeros((2, 6, 6), np.float32)
    img[:, 2:4, 1:3] = 1
    np.testing.assert_array_equal(bounding_boxes(img), [[2, 3, 1, 2]] * 2)
    moved = translate(img, np.array([2, -2]), np.array([3, -1]))
    np.testing.assert_array_equal(bounding_boxes(moved), [[4, 5, 4, 5], [0, 1, 0, 1]])
    np.testing.assert_array_equal(bounding_boxes(np.zeros((1, 4, 5))), [[0, 3, 0, 4]])


def test_read_affnist_file_in_the_real_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 40), dtype=np.uint8)
    labels = np.array([7, 0, 3])
    # as the real files: a struct affNISTdata, image (1600, N) one image per column, label_int (N,)
    struct = {"image": images.reshape(3, 1600).T, "label_int": labels.astype(np.uint8),
              "label_one_of_n": np.eye(10, dtype=np.uint8)[labels].T}
    scipy_io.savemat(tmp_path / "test.mat", {"affNISTdata": struct})
    got_images, got_labels = read_affnist(tmp_path / "test.mat")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    scipy_io.savemat(tmp_path / "other.mat", {"something": np.zeros(3)})
    with pytest.raises(ValueError, match="no affNISTdata struct"):
        read_affnist(tmp_path / "other.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="not a readable .mat file"):
        read_affnist(tmp_path / "junk.mat")
    with pytest.raises(FileNotFoundError):
        read_affnist(tmp_path / "missing.mat")
