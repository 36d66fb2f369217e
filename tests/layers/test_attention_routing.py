"""Self-attention routing (capsnet.layers.attention_routing) and grouped/depthwise Conv2d:
float64 gradient checks on every backend, slow obvious oracles (loop convolution per group,
the I x I attention per example), the squash variant at its limits, errors, and float64
parity with the PyTorch reference (scripts/torch_efficient_capsnet.py) when torch is installed."""
from __future__ import annotations

import math

import numpy as np
import pytest

from capsnet import backend
from capsnet.gradcheck import check_module
from capsnet.layers import (
    Conv2d,
    DepthwisePrimaryCaps,
    EfficientSquash,
    FCCaps,
    efficient_squash,
    efficient_squash_backward,
    self_attention_routing,
    self_attention_routing_backward,
)

from tests.helpers import dev, host, reference


F64 = "float64"


# -- the squash variant ---------------------------------------------------------------------
def test_efficient_squash_matches_its_equation(xp, host_rng):
    s = host_rng.standard_normal((3, 5, 8)) * host_rng.uniform(0.01, 20, (3, 5, 1))
    n = np.linalg.norm(s, axis=-1, keepdims=True)
    np.testing.assert_allclose(host(efficient_squash(dev(s))), (1 - np.exp(-n)) * s / n, rtol=1e-12)


def test_gradcheck_efficient_squash(xp, host_rng):
    check_module(EfficientSquash(), dev(host_rng.standard_normal((2, 3, 4)) * 2))


def test_gradcheck_efficient_squash_near_zero_length(xp, host_rng):
    s = host_rng.standard_normal((2, 3, 4))
    s *= host_rng.uniform(0.5e-3, 2e-3, (2, 3, 1)) / np.linalg.norm(s, axis=-1, keepdims=True)
    assert check_module(EfficientSquash(), dev(s))[0].mode == "elements"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_efficient_squash_limits_are_finite(xp, dtype):
    """0 maps to 0 with gradient identity; tiny and huge lengths stay finite, without warnings."""
    tiny = np.finfo(dtype).tiny
    s = np.array([[0.0, 0.0, 0.0], [tiny, 0.0, 0.0], [1e-30, -1e-30, 0.0], [1e38, -1e38, 0.0]], dtype)  # |s| = 1.4e38 still fits float32
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        v = host(efficient_squash(dev(s)))
        g = host(efficient_squash_backward(dev(np.ones_like(s)), dev(s)))
    assert v.dtype == g.dtype == np.dtype(dtype)
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(g))
    np.testing.assert_array_equal(v[0], 0)
    np.testing.assert_array_equal(g[0], 1)  # at s = 0 the squash variant is the identity to first order
    np.testing.assert_allclose(np.linalg.norm(v[3]), 1, rtol=1e-6)


# -- self-attention routing ---------------------------------------------------------------------
def attention_one_example(u_hat, prior):
    """The paper's equations literally, for one example: u_hat (I, J, D), prior (I, J)."""
    n_in, n_out, d = u_hat.shape
    v = np.zeros((n_out, d))
    c = np.zeros((n_in, n_out))
    logits = np.zeros((n_in, n_out))
    for i in range(n_in):
        for j in range(n_out):
            logits[i, j] = sum(float(u_hat[i, j] @ u_hat[k, j]) for k in range(n_in)) / math.sqrt(d)
    for i in range(n_in):
        e = [math.exp(logits[i, j] - logits[i].max()) for j in range(n_out)]
        c[i] = [x / sum(e) for x in e]
    for j in range(n_out):
        s = sum((c[i, j] + prior[i, j]) * u_hat[i, j] for i in range(n_in))
        n = float(np.sqrt(s @ s))
        v[j] = (1 - math.exp(-n)) * s / n
    return v, c


def test_attention_routing_matches_per_example_oracle(xp, host_rng):
    u_hat = host_rng.standard_normal((3, 5, 4, 6)) * 0.5
    prior = host_rng.standard_normal((5, 4)) * 0.1
    v, state = self_attention_routing(dev(u_hat), dev(prior))
    assert v.shape == (3, 4, 6) and state.c.shape == (3, 5, 4)
    for example in range(3):
        ev, ec = attention_one_example(u_hat[example], prior)
        np.testing.assert_allclose(host(v)[example], ev, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(host(state.c)[example], ec, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(host(state.c).sum(axis=2), 1, rtol=1e-12)


def test_gradcheck_self_attention_routing_function(xp, host_rng):
    """Both gradients of the pure pair, u_hat and the prior, against central differences."""
    from capsnet.gradcheck import check_gradient  # noqa: PLC0415

    u_hat = dev(host_rng.standard_normal((2, 5, 3, 4)) * 0.7)
    prior = dev(host_rng.standard_normal((5, 3)) * 0.2)
    gv = dev(host_rng.standard_normal((2, 3, 4)))
    _, state = self_attention_routing(u_hat, prior)
    g_hat, g_prior = self_attention_routing_backward(gv, u_hat, prior, state)

    def loss():
        return (self_attention_routing(u_hat, prior)[0] * gv).sum()

    check_gradient(loss, u_hat, g_hat, name="u_hat", n_directions=16)
    check_gradient(loss, prior, g_prior, name="prior")


def test_gradcheck_fccaps(xp, host_rng):
    layer = FCCaps(6, 4, 3, 5, dtype=F64, seed=0)
    layer.prior.data[...] = dev(host_rng.standard_normal((6, 3)) * 0.3)  # a non-zero prior
    results = check_module(layer, dev(host_rng.standard_normal((2, 6, 4)) * 0.5), n_directions=16)
    assert [r.name for r in results] == ["input", "weight", "prior"]


def test_gradcheck_fccaps_single_input_capsule(xp, host_rng):
    """One child: A_1j = |u_hat_{j|1}|^2 / sqrt(D), its attention only with itself."""
    check_module(FCCaps(1, 3, 4, 2, dtype=F64, seed=1), dev(host_rng.standard_normal((3, 1, 3))))


def test_gradcheck_depthwise_primary_caps(xp, host_rng):
    layer = DepthwisePrimaryCaps(n_caps=3, dim=2, kernel_size=4, dtype=F64, seed=0)
    results = check_module(layer, dev(host_rng.standard_normal((2, 6, 4, 4))))
    assert [r.name for r in results] == ["input", "conv.weight", "conv.bias"]


def test_fccaps_is_vectorised_over_the_batch(xp, host_rng):
    """Each example is routed alone exactly as inside the batch."""
    layer = FCCaps(5, 4, 3, 6, dtype=F64, seed=2)
    u = host_rng.standard_normal((4, 5, 4))
    v = host(layer.forward(dev(u)))
    for example in range(4):
        np.testing.assert_allclose(host(layer.forward(dev(u[example:example + 1])))[0], v[example], rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fccaps_keeps_dtype_and_extreme_inputs_stay_finite(xp, host_rng, dtype):
    layer = FCCaps(4, 3, 2, 5, dtype=dtype, seed=0)
    for scale in (0.0, 1e-20, 1.0, 1e6):
        u = dev((host_rng.standard_normal((2, 4, 3)) * scale).astype(dtype))
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            v = layer.forward(u)
            g = layer.backward(dev(np.ones(v.shape, dtype)))
        assert v.dtype == g.dtype == layer.weight.grad.dtype == np.dtype(dtype)
        for a in (v, g, layer.weight.grad, layer.prior.grad):
            assert np.all(np.isfinite(host(a))), scale
        layer.zero_grad()


def test_fccaps_and_routing_errors():
    layer = FCCaps(16, 8, 10, 16)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros((2, 16, 4), np.float32))
    assert str(info.value) == "FCCaps expected input of shape (batch, 16, 8), got (2, 16, 4)"
    with pytest.raises(ValueError, match=r"expected a prior of shape \(in_caps, out_caps\) = \(5, 3\), got \(3, 5\)"):
        self_attention_routing(np.zeros((1, 5, 3, 2)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"expected votes of shape \(batch, in_caps, out_caps, dim\), got \(5, 3, 2\)"):
        self_attention_routing(np.zeros((5, 3, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="FCCaps out_dim must be an integer >= 1, got 0"):
        FCCaps(4, 4, 4, 0)
    with pytest.raises(ValueError, match=r"DepthwisePrimaryCaps expected input of shape \(batch, 128, 9, 9\)"):
        DepthwisePrimaryCaps().forward(np.zeros((2, 128, 8, 8), np.float32))


# -- float64 parity with PyTorch ------------------------------------------------------------------
@pytest.fixture
def torch_ref(torch):
    return torch, reference("torch_efficient_capsnet")


def test_torch_parity_fccaps(torch_ref, host_rng):
    torch, ref = torch_ref
    with backend.use("numpy"):
        layer = FCCaps(16, 8, 10, 16, dtype=F64, seed=0)
        layer.prior.data[...] = host_rng.standard_normal((16, 10)) * 0.1
        u = host_rng.standard_normal((4, 16, 8)) * 0.3
        gv = host_rng.standard_normal((4, 10, 16))
        v = layer.forward(u)
        gu = layer.backward(gv)
    t = ref.FCCaps(16, 8, 10, 16).double()
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(layer.weight.data))
        t.prior.copy_(torch.from_numpy(layer.prior.data))
    tu = torch.from_numpy(u).requires_grad_()
    tv = t(tu)
    (tv * torch.from_numpy(gv)).sum().backward()
    for ours, theirs, what in ((v, tv, "v"), (gu, tu.grad, "input gradient"),
                               (layer.weight.grad, t.weight.grad, "weight gradient"),
                               (layer.prior.grad, t.prior.grad, "prior gradient")):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=what)


def test_torch_parity_depthwise_conv(torch_ref, host_rng):
    torch, _ = torch_ref
    with backend.use("numpy"):
        layer = Conv2d(6, 12, 3, stride=2, padding=1, groups=6, dtype=F64, seed=0)
        x = host_rng.standard_normal((3, 6, 9, 8))
        y = layer.forward(x)
        gy = host_rng.standard_normal(y.shape)
        gx = layer.backward(gy)
    tw = torch.from_numpy(layer.weight.data.copy()).requires_grad_()
    tb = torch.from_numpy(layer.bias.data.copy()).requires_grad_()
    tx = torch.from_numpy(x).requires_grad_()
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride=2, padding=1, groups=6)
    (ty * torch.from_numpy(gy)).sum().backward()
    for ours, theirs, what in ((y, ty, "output"), (gx, tx.grad, "input gradient"),
                               (layer.weight.grad, tw.grad, "weight gradient"),
                               (layer.bias.grad, tb.grad, "bias gradient")):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=what)
