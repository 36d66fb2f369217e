"""capsnet.layers.loss: the margin loss (one or two positives), the reconstruction loss and
the cross-entropy by hand and against formulas, float64 gradient checks on every backend,
label and shape errors, PyTorch parity of the cross-entropy."""
from __future__ import annotations

import re

import numpy as np
import pytest

from capsnet.gradcheck import check_module
from capsnet.layers import (
    CrossEntropyLoss,
    MarginLoss,
    Mask,
    ReconstructionLoss,
    margin_loss,
    margin_loss_backward,
    reconstruction_loss,
    reconstruction_loss_backward,
)

from tests.helpers import LABEL_ERRORS, dev, host, torch_parity


def test_gradcheck_margin_loss(xp, host_rng):
    lengths = host_rng.uniform(0.0, 1.0, (6, 4))
    near_hinge = (np.abs(lengths - 0.9) < 0.02) | (np.abs(lengths - 0.1) < 0.02)
    lengths[near_hinge] = 0.5
    labels = np.array([0, 1, 2, 3, 0, 1])
    lengths[0, 0], lengths[1, 1] = 0.95, 0.05  # one satisfied and one violated present hinge...
    lengths[0, 1], lengths[1, 2] = 0.05, 0.6  # ...and the same for the absent hinge
    check_module(MarginLoss(), dev(lengths), dev(labels))


def test_gradcheck_reconstruction_loss(xp, host_rng):
    recon = host_rng.uniform(0, 1, (3, 1, 4, 4))
    target = host_rng.uniform(0, 1, (3, 1, 4, 4))
    check_module(ReconstructionLoss(), dev(recon), dev(target))


# -- losses by hand ------------------------------------------------------------------------
def test_margin_loss_by_hand(xp):
    lengths = dev(np.array([[0.95, 0.3, 0.05], [0.5, 0.2, 0.8]]))
    labels = dev(np.array([0, 2]))
    # example 0: present hinge max(0, 0.9-0.95)^2 = 0; absent 0.5*0.2^2 = 0.02; 0.05 < m- gives 0
    # example 1: present max(0, 0.9-0.8)^2 = 0.01; absent 0.5*0.4^2 = 0.08 and 0.5*0.1^2 = 0.005
    expected = (0.02 + (0.01 + 0.08 + 0.005)) / 2
    assert float(host(margin_loss(lengths, labels))) == pytest.approx(expected, rel=1e-12)
    loss = MarginLoss()
    assert float(host(loss.forward(lengths, labels))) == pytest.approx(0.0575, rel=1e-12)
    expected_grad = np.array([[0.0, 0.5 * 2 * 0.2, 0.0], [0.5 * 2 * 0.4, 0.5 * 2 * 0.1, -2 * 0.1]]) / 2
    np.testing.assert_allclose(host(loss.backward()), expected_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(host(margin_loss_backward(lengths, labels, grad_out=3.0)), 3 * expected_grad,
                               rtol=1e-12, atol=1e-15)


def test_margin_loss_parameters_are_used(xp):
    lengths = dev(np.array([[0.5, 0.5]]))
    labels = dev(np.array([0]))
    # m+ = 0.8: (0.8-0.5)^2 = 0.09; m- = 0.2, lam = 2: 2 * 0.3^2 = 0.18
    value = MarginLoss(m_plus=0.8, m_minus=0.2, lam=2.0).forward(lengths, labels)
    assert float(host(value)) == pytest.approx(0.27, rel=1e-12)


def test_reconstruction_loss_by_hand(xp):
    target = np.zeros((2, 1, 2, 2))
    recon = np.array([[0.1, -0.2, 0.3, 0.0], [1.0, 0.0, 0.0, -1.0]]).reshape(2, 1, 2, 2)
    # per image sums of squares: 0.14 and 2; times 0.0005; mean over the batch of 2
    expected = 0.0005 * (0.14 + 2.0) / 2
    assert float(host(reconstruction_loss(dev(recon), dev(target)))) == pytest.approx(expected, rel=1e-12)
    loss = ReconstructionLoss()
    assert float(host(loss.forward(dev(recon), dev(target)))) == pytest.approx(0.000535, rel=1e-12)
    np.testing.assert_allclose(host(loss.backward()), 2 * 0.0005 * recon / 2, rtol=1e-12)
    np.testing.assert_allclose(host(reconstruction_loss_backward(dev(recon), dev(target), 0.01, 2.0)),
                               2 * 0.01 * recon / 2 * 2.0, rtol=1e-12)


def test_reconstruction_loss_rejects_mismatched_shapes(xp):
    with pytest.raises(ValueError, match=re.escape("got (2, 4) and (2, 5)")):
        reconstruction_loss(dev(np.zeros((2, 4))), dev(np.zeros((2, 5))))


@pytest.mark.parametrize("labels,error,message", LABEL_ERRORS, ids=["too-big", "negative", "2d", "long", "float"])
def test_margin_loss_label_errors(labels, error, message):
    with pytest.raises(error, match="MarginLoss expected " + message):
        MarginLoss().forward(np.full((2, 3), 0.5), labels)


def test_mask_and_margin_loss_shape_errors():
    with pytest.raises(ValueError, match=re.escape("(batch, n_caps, dim), got (2, 12)")):
        Mask().forward(np.zeros((2, 12)))
    with pytest.raises(ValueError, match=re.escape("(batch, n_classes), got (2, 3, 1)")):
        MarginLoss().forward(np.zeros((2, 3, 1)), np.array([0, 1]))


def test_cross_entropy_matches_the_formula(xp, host_rng):
    logits = host_rng.standard_normal((4, 5)) * 10
    labels = np.array([0, 4, 2, 2])
    loss = CrossEntropyLoss(label_smoothing=0.2)
    value = float(host(loss(dev(logits), dev(labels))))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    t = np.full((4, 5), 0.2 / 5)
    t[np.arange(4), labels] += 0.8
    assert value == pytest.approx(-(t * logp).sum(axis=1).mean(), rel=1e-12)
    big = float(host(CrossEntropyLoss()(dev(np.array([[1000.0, 0.0]])), dev(np.array([1])))))
    assert big == pytest.approx(1000.0)  # log-sum-exp: no overflow


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("batch", [1, 4])
def test_gradcheck_cross_entropy(xp, host_rng, smoothing, batch):
    labels = host_rng.integers(0, 5, batch)
    check_module(CrossEntropyLoss(smoothing), dev(host_rng.standard_normal((batch, 5))), dev(labels))


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("batch", [1, 6])
def test_cross_entropy_parity_with_pytorch(torch, host_rng, smoothing, batch):
    logits = host_rng.standard_normal((batch, 7)) * 4
    labels = host_rng.integers(0, 7, batch)
    torch_parity(torch, CrossEntropyLoss(smoothing), torch.nn.CrossEntropyLoss(label_smoothing=smoothing), logits,
            labels, loss=True)


PAIRS = np.array([[1, 0], [2, 1]])


def test_margin_loss_with_two_positives(xp, host_rng):
    lengths = host_rng.uniform(0, 1, (2, 3))
    expected = []
    for b in range(2):
        t = np.isin(np.arange(3), PAIRS[b]).astype(float)
        expected.append((t * np.maximum(0.9 - lengths[b], 0) ** 2
                         + 0.5 * (1 - t) * np.maximum(lengths[b] - 0.1, 0) ** 2).sum())
    np.testing.assert_allclose(float(host(margin_loss(dev(lengths), dev(PAIRS)))), np.mean(expected), rtol=1e-12)
    lengths[0] = [0.95, 0.05, 0.5]  # hinges on both sides, none near a corner
    lengths[1] = [0.6, 0.5, 0.3]
    check_module(MarginLoss(), dev(lengths), dev(PAIRS))
    with pytest.raises(ValueError, match=r"labels of shape \(2,\) or \(2, targets\)"):
        margin_loss(dev(lengths), dev(np.zeros((2, 2, 1), int)))
