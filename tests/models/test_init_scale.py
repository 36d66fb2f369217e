"""The DigitCaps weight scale decides whether training starts at all.

Too small for plain SGD, every |v_j| starts near 0 where squash is flat (v ~ |s| s),
so the margin loss's gradient vanishes before it reaches the convolutions; a scale
that starts the lengths in squash's responsive range trains. (With Adam, which
rescales gradients, the default 0.01 trains: see tests/training/test_run.py.)
"""
import numpy as np
import pytest

from capsnet.data import load_mnist, to_float
from capsnet.models import CapsNet, CapsNetLoss

SMALL = dict(conv_channels=16, primary_types=4, digit_dim=8, decoder_hidden=(32, 64))


@pytest.fixture(scope="module")
def batch(mnist_dir):
    data = load_mnist(mnist_dir)
    return to_float(data.train_images[:200], "float32"), data.train_labels[:200]


def first_step(init_std, batch):
    x, y = batch
    model = CapsNet(seed=0, digit_init_std=init_std, **SMALL)
    crit = CapsNetLoss(recon_weight=0.0)
    lengths, recon = model(x, y)
    crit(lengths, recon, y, x)
    model.backward(*crit.backward())
    return model, lengths


RESPONSIVE = 0.5  # starts |s_j| near 1 for this small model's 144 primary capsules


def test_responsive_scale_starts_lengths_in_squash_range_and_tiny_scale_does_not(batch):
    _, lengths = first_step(RESPONSIVE, batch)
    assert 0.05 < float(lengths.mean()) < 0.95
    _, tiny = first_step(1e-4, batch)
    assert float(tiny.max()) < 1e-3


def test_tiny_scale_starves_the_convolutions_of_gradient(batch):
    default, _ = first_step(RESPONSIVE, batch)
    tiny, _ = first_step(1e-4, batch)
    g_default = np.linalg.norm(default.conv1.weight.grad)
    g_tiny = np.linalg.norm(tiny.conv1.weight.grad)
    assert g_default > 1e3 * g_tiny
