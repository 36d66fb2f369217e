"""Fixtures of the training tests."""
from __future__ import annotations

import pytest

from capsnet.data import ArrayDataset, load_mnist, random_shift, to_float
from capsnet.layers import MarginLoss
from capsnet.optim import Adam
from capsnet.training import Trainer
from tests.helpers import conv_net


@pytest.fixture(scope="module")
def mnist_slice(mnist_dir):
    """400 training and 200 test images of mnist_dir, as floats, with their labels."""
    data = load_mnist(mnist_dir, download=False, progress=False)
    return (to_float(data.train_images[:400]), data.train_labels[:400],
            to_float(data.test_images[:200]), data.test_labels[:200])


@pytest.fixture(scope="module")
def small_sources(mnist_dir):
    """(training source of 200 images, shifted by up to 2 px; test source of 100 images)."""
    data = load_mnist(mnist_dir, download=False, progress=False)
    x, y = to_float(data.train_images[:200]), data.train_labels[:200]
    return (ArrayDataset(x, y, augment=lambda images, rng: random_shift(images, 2, rng)),
            ArrayDataset(to_float(data.test_images[:100]), data.test_labels[:100]))


@pytest.fixture
def make_trainer(small_sources):
    """``make_trainer(run_dir, epochs=3, optimizer=None, **trainer_args)``: a Trainer of a small
    convolutional classifier on small_sources (4 steps an epoch, a host read every 3 steps);
    ``optimizer(model)`` builds the optimizer (default Adam 3e-3)."""
    def make(run_dir, *, epochs=3, optimizer=None, **kw):
        model = conv_net()
        opt = optimizer(model) if optimizer is not None else Adam(model.parameters(), lr=3e-3)
        train, test = small_sources
        return Trainer(model, MarginLoss(), opt, train, run_dir, epochs=epochs, batch_size=50, eval_data=test,
                       seed=3, log_every=3, progress=False, log=False, **kw)
    return make
