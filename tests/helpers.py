"""Helpers the test modules share (not a test module): moving arrays between the host and
the current backend, the loop-convolution oracle, the PyTorch references of scripts/ and the
parity of one layer, and a small convolutional classifier. Fixtures live in the conftest.py files."""
from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from capsnet import backend
from capsnet.layers import Conv2d, Flatten, Linear, Module, ReLU, Sequential, Sigmoid

REPO = Path(__file__).resolve().parents[1]  # the repository root


def reference(name: str):
    """The PyTorch reference module ``scripts/<name>.py`` (torch_capsnet, torch_efficient_capsnet,
    torch_matrix_capsnet). Ask for the ``torch`` fixture first: it skips the test without torch."""
    scripts = str(REPO / "scripts")
    sys.path.insert(0, scripts)
    environ = dict(os.environ)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(scripts)
        # a script that sets its thread variables at import (profile_efficient_layers.py) must not
        # set them for the tests after it
        os.environ.clear()
        os.environ.update(environ)


def dev(array):
    """Host array -> the current backend (set by the ``xp`` fixture)."""
    return backend.to_device(array)


def host(array):
    """An array of the current backend -> a NumPy array."""
    return backend.to_numpy(array)


def conv_net(seed=0, dtype="float32"):
    """A plain convolutional classifier: (B, 1, 28, 28) -> (B, 10) scores in (0, 1)."""
    rng = np.random.default_rng(seed)
    return Sequential(Conv2d(1, 8, 5, stride=3, dtype=dtype, seed=rng), ReLU(), Flatten(),
                      Linear(8 * 8 * 8, 10, dtype=dtype, seed=rng), Sigmoid())


# -- convolution oracles ------------------------------------------------------------------
def naive_conv2d(x, w, b, stride, padding):
    """Loops over batch, output channels and output pixels."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    for bi in range(n):
        for oc in range(o):
            for i in range(oh):
                for j in range(ow):
                    patch = xpad[bi, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                    y[bi, oc, i, j] = (patch * w[oc]).sum() + (0 if b is None else b[oc])
    return y


def naive_conv2d_backward(gy, x, w, stride, padding):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    gxpad = np.zeros_like(xpad)
    gw = np.zeros_like(w)
    _, _, oh, ow = gy.shape
    for bi in range(n):
        for oc in range(o):
            for i in range(oh):
                for j in range(ow):
                    ys, xs = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
                    gxpad[bi, :, ys, xs] += gy[bi, oc, i, j] * w[oc]
                    gw[oc] += gy[bi, oc, i, j] * xpad[bi, :, ys, xs]
    gx = gxpad[:, :, padding:padding + h, padding:padding + wd]
    return gx, gw, gy.sum(axis=(0, 2, 3))


# -- PyTorch parity of one layer (the ``torch`` fixture of tests/conftest.py) -------
def rel_error(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def torch_parity(torch, ours, ref, x, targets=None, loss=False):
    """Outputs, input gradient and parameter gradients of ours against the torch module ref."""
    ref.zero_grad(set_to_none=True)
    xt = torch.tensor(x, requires_grad=True)
    if loss:
        yt = ref(xt, torch.tensor(targets))
        y = ours(x, targets)
        yt.backward()
        g = ours.backward()
        assert rel_error(y, yt.detach().numpy()) < 1e-12
        assert rel_error(g, xt.grad.numpy()) < 1e-6
        return
    y = ours(x)
    yt = ref(xt)
    assert rel_error(y, yt.detach().numpy()) < 1e-12
    g = np.random.default_rng(0).standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    ours.zero_grad()
    assert rel_error(ours.backward(g), xt.grad.numpy()) < 1e-6
    torch_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_error(p.grad, torch_params[name].grad.numpy()) < 1e-6, name


# -- bad labels: (labels for a batch of 2 with 3 classes, the error, its message after "<Layer> expected ")
LABEL_ERRORS = [
    (np.array([0, 3]), ValueError, r"labels in \[0, 3\), got values from 0 to 3"),
    (np.array([-1, 0]), ValueError, r"labels in \[0, 3\), got values from -1 to 0"),
    (np.array([[0], [1]]), ValueError, re.escape("labels of shape (2,), got (2, 1)")),
    (np.array([0, 1, 2]), ValueError, re.escape("labels of shape (2,), got (3,)")),
    (np.array([0.0, 1.0]), TypeError, "integer labels, got float64"),
]


class FailsOnMarkedRows(Module):
    """Raises on a slice whose first row starts with 999: a replica failing mid-step
    (tests/training/test_replicas.py and test_processes.py; importable by a worker process)."""

    def forward(self, x):
        if x[0, 0] == 999:
            raise ValueError("marked row")
        return x

    def backward(self, grad_out):
        return grad_out


def assert_records_match(got, expected, rel):
    """Assert two lists of metric records agree: same keys, numbers to ``rel``, the rest exactly.

    ``pytest.approx`` of a whole dict refuses values that are not numbers (pytest 9.2 raises
    TypeError on a string such as ``"replicas": "threads"``), so each value is compared alone.
    """
    assert len(got) == len(expected), (len(got), len(expected))
    for i, (g, e) in enumerate(zip(got, expected)):
        assert sorted(g) == sorted(e), f"record {i}: keys {sorted(g)} != {sorted(e)}"
        for key, value in e.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert g[key] == pytest.approx(value, rel=rel), f"record {i}, {key}"
            else:
                assert g[key] == value, f"record {i}, {key}"
