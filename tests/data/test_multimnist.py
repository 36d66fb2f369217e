"""MultiMNIST: shift range, partners of another class, the saturating overlay, pairs that a
resume replays, a test set fixed by its seed, and the both-digits-right metric."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet.data import MultiMNIST, both_right, load_mnist
from capsnet.data.multimnist import different_class_partners, overlay, place

from tests.helpers import dev, host


@pytest.fixture(scope="module")
def digits(mnist_dir):
    data = load_mnist(mnist_dir, download=False, progress=False)
    return data.train_images[:600], data.train_labels[:600]


def test_place_moves_each_digit_by_its_own_shift():
    dot = np.zeros((3, 28, 28), np.uint8)
    dot[:, 0, 0] = 255  # the digit's top-left pixel
    out = place(dot, np.array([-4, 0, 4]), np.array([4, 0, -4]))
    assert out.shape == (3, 36, 36)
    assert [tuple(np.argwhere(o)[0]) for o in out] == [(0, 8), (4, 4), (8, 0)]
    with pytest.raises(ValueError, match="at most 4 px"):
        place(dot, np.array([5, 0, 0]), np.zeros(3, int))


def test_overlay_saturates():
    a = np.array([[200, 10, 0]], np.uint8)
    b = np.array([[100, 20, 255]], np.uint8)
    np.testing.assert_array_equal(overlay(a, b), [[255, 30, 255]])


def test_partners_are_of_another_class_and_cover_them(digits):
    _, labels = digits
    rng = np.random.default_rng(0)
    first = np.arange(len(labels))
    partner = different_class_partners(labels, first, rng)
    assert np.all(labels[partner] != labels[first])
    assert len(np.unique(labels[partner[labels[first] == 3]])) == 9  # every other class turns up


def test_training_pairs_shifts_and_composition(digits, xp):
    images, labels = digits
    data = MultiMNIST(images, labels, train=True)
    rng = np.random.default_rng(1)
    first, partner, shifts = data.pairs(np.arange(600), rng)
    assert shifts.min() == -4 and shifts.max() == 4
    assert set(np.unique(shifts).tolist()) == set(range(-4, 5))
    x, y, a, b = data.batch(np.arange(8), np.random.default_rng(2))
    assert x.shape == a.shape == b.shape == (8, 1, 36, 36) and y.shape == (8, 2)
    x, a, b = host(x), host(a), host(b)
    np.testing.assert_allclose(x, np.minimum(a + b, 1.0), atol=1e-6)  # saturating sum, in [0, 1]
    assert np.all(host(y)[:, 0] != host(y)[:, 1])
    np.testing.assert_array_equal(host(y)[:, 0], labels[:8])
    for k in range(8):  # each digit alone, on its own shift: its ink is the digit's
        assert a[k].sum() == pytest.approx(images[k].sum() / 255, rel=1e-5)


def test_training_pairs_are_drawn_afresh_each_epoch_and_replayed_from_the_generator_state(digits):
    images, labels = digits
    data = MultiMNIST(images, labels, train=True)
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    epoch1 = data.pairs(np.arange(50), rng)
    epoch2 = data.pairs(np.arange(50), rng)
    assert not np.array_equal(epoch1[1], epoch2[1])  # new partners next epoch
    replay = np.random.default_rng()
    replay.bit_generator.state = state  # what a resumed run restores
    for got, want in zip(data.pairs(np.arange(50), replay), epoch1):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="needs the loop's generator"):
        data.batch(np.arange(3), None)


def test_the_test_set_is_fixed_by_its_seed(digits):
    images, labels = digits
    a = MultiMNIST(images, labels, train=False, pairs_per_image=3, seed=7)
    b = MultiMNIST(images, labels, train=False, pairs_per_image=3, seed=7)
    c = MultiMNIST(images, labels, train=False, pairs_per_image=3, seed=8)
    assert len(a) == 1800
    idx = np.arange(0, 1800, 7)
    for u, v in zip(a.pairs(idx, None), b.pairs(idx, None)):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.pairs(idx, None)[1], c.pairs(idx, None)[1])
    first = a.pairs(np.arange(6), None)[0]
    np.testing.assert_array_equal(first, [0, 0, 0, 1, 1, 1])  # pairs_per_image partners per test digit
    np.testing.assert_array_equal(host(a.batch(idx[:5])[0]), host(b.batch(idx[:5])[0]))


def test_both_right_on_hand_made_cases(xp):
    scores = np.array([
        [0.9, 0.8, 0.1, 0.0],  # top two 0, 1: labels (1, 0) -> right, order does not matter
        [0.9, 0.1, 0.8, 0.0],  # top two 0, 2: labels (0, 1) -> one wrong
        [0.1, 0.2, 0.3, 0.4],  # top two 2, 3: labels (3, 2) -> right
        [0.5, 0.1, 0.2, 0.6],  # top two 0, 3: labels (1, 2) -> both wrong
    ])
    labels = np.array([[1, 0], [0, 1], [3, 2], [1, 2]])
    assert int(host(both_right(dev(scores), (None, dev(labels))))) == 2
    assert int(host(both_right((dev(scores), None), (None, dev(labels))))) == 2  # a CapsNet's tuple


def test_bad_arguments_are_refused(digits):
    images, labels = digits
    with pytest.raises(ValueError, match="uint8 digits"):
        MultiMNIST(images.astype(np.float32), labels, train=True)
    with pytest.raises(ValueError, match="max_shift must be in"):
        MultiMNIST(images, labels, train=True, max_shift=5)
    with pytest.raises(ValueError, match="two classes"):
        MultiMNIST(images[:3], np.zeros(3, int), train=True)
