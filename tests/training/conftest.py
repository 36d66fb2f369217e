"""Fixtures of the training tests."""
from __future__ import annotations

import pytest

from capsnet.data import load_mnist, to_float


@pytest.fixture(scope="module")
def mnist_slice(mnist_dir):
    """400 training and 200 test images of mnist_dir, as floats, with their labels."""
    data = load_mnist(mnist_dir, download=False, progress=False)
    return (to_float(data.train_images[:400]), data.train_labels[:400],
            to_float(data.test_images[:200]), data.test_labels[:200])
