"""Shared fixtures: the backends, seeded host data, and the real MNIST files."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from capsnet import backend
from capsnet.data.mnist import SAMPLE_DIR


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


MNIST_SUBSET = SAMPLE_DIR  # the sample installed with the package: capsnet/data/mnist_sample


def _has_mnist(path: Path) -> bool:
    return (path / "train-images-idx3-ubyte.gz").exists() or (path / "train-images-idx3-ubyte").exists()


def mnist_path() -> Path:
    """$CAPSNET_DATA_DIR when set (the full MNIST), else the sample installed with the package."""
    env = os.environ.get("CAPSNET_DATA_DIR")
    return Path(env) if env else MNIST_SUBSET


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder with the real MNIST files the tests read: $CAPSNET_DATA_DIR, else the
    5,000 + 1,000 image sample installed with the package, capsnet/data/mnist_sample (so a
    fresh clone needs no setup)."""
    path = mnist_path()
    if not _has_mnist(path):
        pytest.fail(f"CAPSNET_DATA_DIR={path} holds no MNIST files (train-images-idx3-ubyte.gz, ...): "
                    "point it at a folder with the four standard files, or unset it to use the shipped subset")
    return path


@pytest.fixture(scope="session")
def mnist_facts(mnist_dir) -> dict:
    """What the tests may expect of the files in mnist_dir: image counts and the sha256 of
    each decompressed file (the library's table for the full set, the subset's README
    table for the subset)."""
    from capsnet.data.mnist import SHA256

    if mnist_dir.resolve() != MNIST_SUBSET.resolve():
        return {"subset": False, "train": 60000, "test": 10000, "sha256": dict(SHA256)}
    rows = re.findall(r"\|\s*([a-z0-9-]+-ubyte)\s*\|\s*(\d+)\s*\|\s*([0-9a-f]{64})\s*\|",
                      (MNIST_SUBSET / "README.md").read_text())
    counts = {name.split("-")[0]: int(n) for name, n, _ in rows}
    return {"subset": True, "train": counts["train"], "test": counts["t10k"],
            "sha256": {name: digest for name, _, digest in rows}}


@pytest.fixture
def emulated_cupy(monkeypatch):
    """The cupy backend as the emulated device (capsnet.testing.emulation) for one test,
    whatever this process has: for the tests that count what the device does."""
    from capsnet.testing import emulation

    from capsnet import checks

    monkeypatch.setattr(backend, "_cupy", emulation.module())
    monkeypatch.setattr(backend, "_emulated", True)
    monkeypatch.setattr(backend, "_cupy_checked", True)
    try:
        with backend.use("cupy") as module:
            yield module
    finally:
        checks.clear()  # label checks left on this device stay with it, not with the next test


@pytest.fixture
def torch():
    """PyTorch, for the parity tests of single layers; they are skipped without it."""
    return pytest.importorskip("torch", reason="the PyTorch parity tests need torch")


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No $CAPSNET_DATA_DIR, a throwaway per-user cache, and no proxy (the tests' HTTP servers
    listen on 127.0.0.1): what the dataset readers' download and offline tests run in."""
    monkeypatch.delenv("CAPSNET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return tmp_path
