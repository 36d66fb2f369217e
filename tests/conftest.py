"""Shared fixtures: the backends, seeded host data, and the real MNIST files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from capsnet import backend

REPO = Path(__file__).resolve().parents[1]


def _backend_params():
    return [
        pytest.param("numpy", id="numpy"),
        pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
    ]


@pytest.fixture(params=_backend_params())
def xp(request):
    """The array module of each backend; the cupy case is skipped without a GPU."""
    name = request.param
    if name == "cupy" and not backend.cupy_available():
        pytest.skip("the cupy backend needs CuPy and a CUDA device")
    with backend.use(name) as module:
        yield module


@pytest.fixture
def host_rng():
    """Seeded NumPy generator: inputs are drawn on the host, then moved, so both
    backends see identical data."""
    return np.random.default_rng(1234)


def mnist_path() -> Path | None:
    env = os.environ.get("CAPSNET_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "mnist")
    for path in candidates:
        if (path / "train-images-idx3-ubyte.gz").exists() or (path / "train-images-idx3-ubyte").exists():
            return path
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder with the real MNIST files ($CAPSNET_DATA_DIR, else ../shared/data/mnist)."""
    path = mnist_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must set CAPSNET_DATA_DIR to the folder holding the MNIST files")
        pytest.skip("real MNIST files not found: set CAPSNET_DATA_DIR")
    return path
