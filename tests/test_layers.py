"""capsnet.layers: float64 gradient checks on every backend, slow obvious oracles
(loop convolution, per-example routing), hand-computed losses, dtypes, errors
and Module bookkeeping.

Inputs are drawn on the host with the seeded ``host_rng`` and moved with
``backend.to_device``, so the numpy and cupy cases see identical data.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from capsnet import backend
from capsnet.gradcheck import check_gradient, check_module
from capsnet.layers import (
    CapsuleLength,
    Conv2d,
    DigitCaps,
    Flatten,
    Linear,
    Mask,
    MarginLoss,
    PrimaryCaps,
    ReconstructionLoss,
    ReLU,
    Sequential,
    Sigmoid,
    Squash,
    capsule_length,
    capsule_length_backward,
    capsule_predictions,
    col2im,
    conv2d,
    conv2d_backward,
    dynamic_routing,
    dynamic_routing_backward,
    im2col,
    linear_backward,
    margin_loss,
    margin_loss_backward,
    reconstruction_loss,
    reconstruction_loss_backward,
    relu,
    relu_backward,
    sigmoid,
    sigmoid_backward,
    squash,
    squash_backward,
)
from capsnet.models import CapsNet, CapsNetConfig, CapsNetLoss

F64 = "float64"


def dev(array):
    """Host array -> the current backend (set by the ``xp`` fixture)."""
    return backend.to_device(array)


def host(array):
    return backend.to_numpy(array)


def away_from_zero(rng, shape, low=0.1, high=2.0):
    """Values with |x| in [low, high] and random signs: no ReLU kinks nearby."""
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


def small_capsnet(**overrides):
    kwargs = dict(input_shape=(1, 12, 12), conv_channels=4, conv_kernel=5, primary_types=2, primary_dim=4,
                  primary_kernel=5, primary_stride=2, digit_dim=4, n_classes=3, routing_iterations=3,
                  decoder_hidden=(6, 7), dtype=F64, seed=0)
    kwargs.update(overrides)
    return CapsNet(**kwargs)


# -- float64 gradient checks, every backend ------------------------------------------------
def test_gradcheck_linear(xp, host_rng):
    layer = Linear(5, 3, dtype=F64, seed=0)
    check_module(layer, dev(host_rng.standard_normal((4, 5))))


def test_gradcheck_linear_without_bias(xp, host_rng):
    layer = Linear(5, 3, bias=False, dtype=F64, seed=0)
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    check_module(layer, dev(host_rng.standard_normal((4, 5))))


def test_gradcheck_relu(xp, host_rng):
    check_module(ReLU(), dev(away_from_zero(host_rng, (3, 4, 5))))


def test_pure_functions_match_the_modules(xp, host_rng):
    x = host_rng.standard_normal((3, 4))
    x[0, :2] = 0.0  # the ReLU subgradient at exactly 0 is 0
    x, g = dev(x), dev(host_rng.standard_normal((3, 4)))
    relu_module = ReLU()
    np.testing.assert_array_equal(host(relu(x)), host(relu_module.forward(x)))
    np.testing.assert_array_equal(host(relu_backward(g, x)), host(relu_module.backward(g)))
    assert np.all(host(relu_backward(g, x))[0, :2] == 0)
    sig = Sigmoid()
    y = sig.forward(x)
    np.testing.assert_array_equal(host(sigmoid(x)), host(y))
    np.testing.assert_allclose(host(sigmoid_backward(g, y)), host(sig.backward(g)), rtol=1e-15)
    np.testing.assert_allclose(host(y), 1 / (1 + np.exp(-host(x))), rtol=1e-14)
    layer = Linear(4, 2, dtype=F64, seed=0)
    out = layer.forward(x)
    np.testing.assert_allclose(host(out), host(x) @ host(layer.weight.data).T + host(layer.bias.data), rtol=1e-13)
    gy = dev(host_rng.standard_normal((3, 2)))
    gx, gw, gb = linear_backward(gy, x, layer.weight.data)
    np.testing.assert_allclose(host(layer.backward(gy)), host(gx), rtol=1e-15)
    np.testing.assert_allclose(host(layer.weight.grad), host(gw), rtol=1e-15)
    np.testing.assert_allclose(host(layer.bias.grad), host(gb), rtol=1e-15)


def test_sigmoid_saturates_without_warnings(xp):
    x = dev(np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0]))
    y = host(sigmoid(x))
    assert np.all(np.isfinite(y)) and y[0] == 0 and y[2] == 0.5 and y[-1] == 1


def test_gradcheck_sigmoid(xp, host_rng):
    check_module(Sigmoid(), dev(3 * host_rng.standard_normal((3, 4, 5))))


def test_gradcheck_squash(xp, host_rng):
    check_module(Squash(), dev(host_rng.standard_normal((2, 3, 4))))


def test_gradcheck_squash_near_zero_length(xp, host_rng):
    s = host_rng.standard_normal((2, 3, 4))
    s *= host_rng.uniform(0.5e-3, 2e-3, (2, 3, 1)) / np.linalg.norm(s, axis=-1, keepdims=True)
    results = check_module(Squash(), dev(s))
    assert results[0].mode == "elements"


def test_gradcheck_capsule_length(xp, host_rng):
    check_module(CapsuleLength(), dev(host_rng.standard_normal((2, 3, 4))))


@pytest.mark.parametrize(
    "stride,padding,bias", [(1, 0, True), (2, 1, True), (1, 0, False)], ids=["stride1", "stride2-pad1", "no-bias"]
)
def test_gradcheck_conv2d(xp, host_rng, stride, padding, bias):
    layer = Conv2d(2, 3, 3, stride, padding, bias, dtype=F64, seed=0)
    results = check_module(layer, dev(host_rng.standard_normal((2, 2, 7, 6))))
    assert [r.name for r in results] == ["input", "weight"] + (["bias"] if bias else [])


def test_gradcheck_primary_caps(xp, host_rng):
    layer = PrimaryCaps(3, n_types=2, dim=4, kernel_size=3, stride=2, dtype=F64, seed=0)
    results = check_module(layer, dev(host_rng.standard_normal((2, 3, 7, 7))))
    assert [r.name for r in results] == ["input", "conv.weight", "conv.bias"]


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_gradcheck_digit_caps(xp, host_rng, iterations):
    layer = DigitCaps(6, 4, 3, 5, iterations, dtype=F64, seed=0)
    u = squash(host_rng.standard_normal((2, 6, 4)))
    results = check_module(layer, dev(u), n_directions=16)
    assert [r.name for r in results] == ["input", "weight"]


def test_gradcheck_mask_by_labels(xp, host_rng):
    v = host_rng.standard_normal((3, 4, 5))
    labels = dev(np.array([2, 0, 3]))
    check_module(Mask(), dev(v), forward_kwargs={"labels": labels}, check_input=True)


def test_gradcheck_mask_by_longest(xp, host_rng):
    v = host_rng.standard_normal((3, 4, 5))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    v *= np.array([[0.2, 0.5, 0.8, 0.3], [0.9, 0.1, 0.4, 0.6], [0.3, 0.2, 0.1, 0.7]])[..., None]
    check_module(Mask(), dev(v), check_input=True)


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


# -- squash and lengths at zero and tiny lengths ---------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_squash_and_length_at_zero_length(xp, host_rng, dtype):
    s = host_rng.standard_normal((2, 3, 4)).astype(dtype)
    s[0, 1] = 0
    s[1, 2] = 0
    s = dev(s)
    g = dev(host_rng.standard_normal((2, 3, 4)).astype(dtype))

    sq = Squash()
    v = sq.forward(s)
    gs = sq.backward(g)
    length = CapsuleLength()
    n = length.forward(s)
    gn = length.backward(dev(np.ones((2, 3), dtype)))
    for a in (v, gs, n, gn):
        assert a.dtype == np.dtype(dtype)
        assert np.all(np.isfinite(host(a)))
    for b, j in ((0, 1), (1, 2)):
        assert np.all(host(v)[b, j] == 0)
        assert np.all(host(gs)[b, j] == 0)
        assert host(n)[b, j] == 0
        assert np.all(host(gn)[b, j] == 0)
    # the pure functions agree with the modules
    np.testing.assert_array_equal(host(squash(s)), host(v))
    np.testing.assert_array_equal(host(squash_backward(g, s)), host(gs))
    np.testing.assert_array_equal(host(capsule_length(s)), host(n))


@pytest.mark.parametrize("dtype,value", [("float32", 1e-30), ("float64", 1e-30), ("float32", 1e-42)],
                         ids=["float32-1e-30", "float64-1e-30", "float32-subnormal-1e-42"])
def test_squash_and_length_tiny_vectors_are_finite(xp, dtype, value):
    s = np.zeros((2, 3, 4), dtype)
    s[0, 0, 0] = value
    s[1, 2] = value
    assert s[0, 0, 0] != 0  # really tiny, not flushed to zero on the host
    s = dev(s)
    g = dev(np.ones((2, 3, 4), dtype))
    v = squash(s)
    gs = squash_backward(g, s)
    n = capsule_length(s)
    gn = capsule_length_backward(dev(np.ones((2, 3), dtype)), s, n)
    for a in (v, gs, n, gn):
        assert a.dtype == np.dtype(dtype)
        assert np.all(np.isfinite(host(a)))
    # squash shrinks: |v| = |s|^2 / (1 + |s|^2) <= |s|, and lengths never exceed |s|_1
    assert np.all(np.abs(host(v)) <= np.abs(host(s)))
    assert np.all(host(n) <= np.abs(host(s)).sum(axis=-1) * (1 + 1e-6))


def test_squash_matches_equation_1(xp, host_rng):
    s = host_rng.standard_normal((3, 5, 6)) * host_rng.uniform(0.1, 3, (3, 5, 1))
    norm = np.linalg.norm(s, axis=-1, keepdims=True)
    expected = norm**2 / (1 + norm**2) * s / norm
    np.testing.assert_allclose(host(squash(dev(s))), expected, rtol=1e-13)
    np.testing.assert_allclose(host(capsule_length(dev(s))), norm[..., 0], rtol=1e-13)


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


def test_conv2d_matches_naive_loops_stride2_padding1(xp, host_rng):
    # 8 rows with kernel 3, stride 2, padding 1: the last padded row is never used
    x = host_rng.standard_normal((2, 3, 8, 7))
    w = host_rng.standard_normal((4, 3, 3, 3))
    b = host_rng.standard_normal(4)
    y = conv2d(dev(x), dev(w), dev(b), stride=2, padding=1)
    expected = naive_conv2d(x, w, b, 2, 1)
    assert y.shape == expected.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(host(y), expected, rtol=1e-10, atol=1e-12)

    gy = host_rng.standard_normal(expected.shape)
    gx, gw, gb = conv2d_backward(dev(gy), dev(x), dev(w), stride=2, padding=1)
    ex, ew, eb = naive_conv2d_backward(gy, x, w, 2, 1)
    np.testing.assert_allclose(host(gx), ex, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(gw), ew, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(gb), eb, rtol=1e-10, atol=1e-12)


def test_conv2d_module_matches_naive_loops(xp, host_rng):
    layer = Conv2d(3, 4, 3, stride=2, padding=1, dtype=F64, seed=0)
    x = host_rng.standard_normal((2, 3, 7, 8))
    y = layer.forward(dev(x))
    w, b = host(layer.weight.data), host(layer.bias.data)
    np.testing.assert_allclose(host(y), naive_conv2d(x, w, b, 2, 1), rtol=1e-10, atol=1e-12)
    gy = host_rng.standard_normal(y.shape)
    gx = layer.backward(dev(gy))
    ex, ew, eb = naive_conv2d_backward(gy, x, w, 2, 1)
    np.testing.assert_allclose(host(gx), ex, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(layer.weight.grad), ew, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(layer.bias.grad), eb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["rows", "channels"])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (3, 2)])
def test_both_patch_layouts_match_naive_loops(xp, host_rng, layout, stride, padding):
    from capsnet.layers.conv import conv2d_nhwc, conv2d_nhwc_backward  # noqa: PLC0415

    x = host_rng.standard_normal((2, 3, 8, 7))
    w = host_rng.standard_normal((5, 3, 3, 3))
    b = host_rng.standard_normal(5)
    x_nhwc = dev(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    y = host(conv2d_nhwc(x_nhwc, dev(w), dev(b), stride, padding, layout=layout)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(y, naive_conv2d(x, w, b, stride, padding), rtol=1e-10, atol=1e-12)
    gy = host_rng.standard_normal(y.shape)
    gx, gw, gb = conv2d_nhwc_backward(dev(np.ascontiguousarray(gy.transpose(0, 2, 3, 1))), x_nhwc, dev(w), stride,
                                      padding, layout=layout)
    ex, ew, eb = naive_conv2d_backward(gy, x, w, stride, padding)
    np.testing.assert_allclose(host(gx).transpose(0, 3, 1, 2), ex, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(gw), ew, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(gb), eb, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="layout must be one of"):
        conv2d_nhwc(x_nhwc, dev(w), None, layout="cols")


def test_small_batches_take_the_channel_major_layout():
    from capsnet.layers.conv import _layout  # noqa: PLC0415

    assert _layout("auto", 36, 256, 256) == "channels"  # PrimaryCaps, batch 1: 36 patch rows
    assert _layout("auto", 7 * 36, 256, 256) == "channels"
    assert _layout("auto", 8 * 36, 256, 256) == "rows"
    assert _layout("auto", 400, 256, 1) == "rows"  # one input channel: the orders are the same


def test_gradcheck_conv2d_channel_major(xp, host_rng):
    layer = Conv2d(3, 40, 3, stride=2, padding=1, dtype=F64, seed=0)  # batch 1 of 5x5: 9 patch rows <= 40
    results = check_module(layer, dev(host_rng.standard_normal((1, 3, 5, 5))))
    assert [r.name for r in results] == ["input", "weight", "bias"]


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (3, 2)])
def test_im2col_col2im_are_adjoint(xp, host_rng, stride, padding):
    x = host_rng.standard_normal((2, 7, 6, 3))  # NHWC
    col = im2col(dev(x), 3, 2, stride, padding)
    y = host_rng.standard_normal(col.shape)
    back = col2im(dev(y), x.shape, 3, 2, stride, padding)
    assert back.shape == x.shape
    lhs = float((host(col) * y).sum())
    rhs = float((x * host(back)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)


# -- routing oracle ----------------------------------------------------------------------
def routing_one_example(u_hat, iterations):
    """Procedure 1 for one example, u_hat (I, J, D), with explicit loops over i and j.

    Returns v (J, D) and the last iteration's coupling coefficients c (I, J).
    """
    n_in, n_out, dim = u_hat.shape
    b = [[0.0] * n_out for _ in range(n_in)]
    for r in range(iterations):
        c = np.zeros((n_in, n_out))
        for i in range(n_in):
            top = max(b[i])
            e = [math.exp(b[i][j] - top) for j in range(n_out)]
            for j in range(n_out):
                c[i, j] = e[j] / sum(e)
        v = np.zeros((n_out, dim))
        for j in range(n_out):
            s = np.zeros(dim)
            for i in range(n_in):
                s += c[i, j] * u_hat[i, j]
            n2 = float(s @ s)
            v[j] = n2 / (1 + n2) * s / math.sqrt(n2)
        for i in range(n_in):
            for j in range(n_out):
                b[i][j] += float(u_hat[i, j] @ v[j])
    return v, c


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_routing_matches_per_example_oracle(xp, host_rng, iterations):
    u_hat = host_rng.standard_normal((4, 6, 3, 5)) * 0.5
    v, state = dynamic_routing(dev(u_hat), iterations)
    assert v.shape == (4, 3, 5)
    assert len(state.c) == len(state.s) == len(state.v) == iterations
    for example in range(4):
        ev, ec = routing_one_example(u_hat[example], iterations)
        np.testing.assert_allclose(host(v)[example], ev, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(host(state.c[-1])[example].T, ec, rtol=1e-10, atol=1e-13)


def test_routing_keeps_examples_independent(xp, host_rng):
    u_hat = host_rng.standard_normal((5, 6, 3, 4))
    v, _ = dynamic_routing(dev(u_hat), 3)
    changed = u_hat.copy()
    changed[2] = 3 * host_rng.standard_normal((6, 3, 4))
    v2, _ = dynamic_routing(dev(changed), 3)
    others = [0, 1, 3, 4]
    np.testing.assert_allclose(host(v2)[others], host(v)[others], rtol=1e-13, atol=1e-15)
    assert not np.allclose(host(v2)[2], host(v)[2])
    # and each example routes alone exactly as it does inside the batch
    for example in range(5):
        alone, _ = dynamic_routing(dev(changed[example:example + 1]), 3)
        np.testing.assert_allclose(host(alone)[0], host(v2)[example], rtol=1e-12, atol=1e-14)


def test_coupling_coefficients_sum_to_one_over_outputs(xp, host_rng):
    u_hat = host_rng.standard_normal((3, 7, 4, 5)) * 2
    _, state = dynamic_routing(dev(u_hat), 4)
    for r, c in enumerate(state.c):
        c = host(c)
        assert c.shape == (3, 4, 7)
        assert np.all(c > 0)
        np.testing.assert_allclose(c.sum(axis=1), np.ones((3, 7)), rtol=1e-12)
    # the first iteration is uniform, later ones are not
    np.testing.assert_allclose(host(state.c[0]), 0.25)
    assert np.ptp(host(state.c[-1])) > 1e-3


def test_routing_rejects_bad_iterations(xp, host_rng):
    with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 0"):
        dynamic_routing(dev(host_rng.standard_normal((1, 2, 2, 2))), 0)


# -- detach_routing ----------------------------------------------------------------------
def _digit_grads(host_rng, iterations, detach):
    layer = DigitCaps(6, 4, 3, 5, iterations, detach_routing=detach, init_std=0.5, dtype=F64, seed=7)
    u = dev(squash(host_rng.standard_normal((2, 6, 4))))
    grad_out = dev(host_rng.standard_normal((2, 3, 5)))
    layer.forward(u)
    gu = layer.backward(grad_out)
    return layer, u, grad_out, host(gu), host(layer.weight.grad)


def test_detach_routing_with_one_iteration_equals_full_gradient(xp):
    _, _, _, gu_full, gw_full = _digit_grads(np.random.default_rng(5), 1, False)
    _, _, _, gu_det, gw_det = _digit_grads(np.random.default_rng(5), 1, True)
    np.testing.assert_allclose(gu_det, gu_full, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(gw_det, gw_full, rtol=1e-13, atol=1e-15)


def test_detach_routing_with_three_iterations_holds_final_couplings_fixed(xp):
    _, _, _, gu_full, gw_full = _digit_grads(np.random.default_rng(5), 3, False)
    layer, u, grad_out, gu_det, gw_det = _digit_grads(np.random.default_rng(5), 3, True)
    assert not np.allclose(gu_det, gu_full, rtol=1e-3)
    assert not np.allclose(gw_det, gw_full, rtol=1e-3)

    _, state = dynamic_routing(capsule_predictions(u, layer.weight.data), 3)
    c_final = state.c[-1]  # (B, J, I), held fixed below

    def last_iteration_loss():
        u_hat = capsule_predictions(u, layer.weight.data)  # (B, I, J, D)
        s = (c_final.transpose(0, 2, 1)[..., None] * u_hat).sum(axis=1)  # s_j = sum_i c_ij u_hat_j|i
        return (squash(s) * grad_out).sum()

    check_gradient(last_iteration_loss, u, dev(gu_det), name="u")
    check_gradient(last_iteration_loss, layer.weight.data, dev(gw_det), name="weight", n_directions=16)


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


# -- Mask ----------------------------------------------------------------------------------
def test_mask_by_labels_keeps_the_label_capsule(xp, host_rng):
    v = host_rng.standard_normal((3, 4, 5))
    labels = np.array([2, 0, 3])
    mask = Mask()
    out = host(mask.forward(dev(v), dev(labels)))
    assert out.shape == (3, 20)
    out = out.reshape(3, 4, 5)
    for b in range(3):
        for j in range(4):
            expected = v[b, j] if j == labels[b] else np.zeros(5)
            np.testing.assert_array_equal(out[b, j], expected)
    g = host_rng.standard_normal((3, 20))
    gv = host(mask.backward(dev(g))).reshape(3, 4, 5)
    for b in range(3):
        for j in range(4):
            expected = g.reshape(3, 4, 5)[b, j] if j == labels[b] else np.zeros(5)
            np.testing.assert_array_equal(gv[b, j], expected)


def test_mask_by_longest_picks_argmax_length(xp, host_rng):
    v = host_rng.standard_normal((6, 4, 5))
    v[1, 3] *= 10  # make sure not every example picks the same capsule
    longest = np.linalg.norm(v, axis=-1).argmax(axis=1)
    mask = Mask()
    out = host(mask.forward(dev(v))).reshape(6, 4, 5)
    for b in range(6):
        np.testing.assert_array_equal(out[b, longest[b]], v[b, longest[b]])
        others = [j for j in range(4) if j != longest[b]]
        assert np.all(out[b, others] == 0)
    gv = host(mask.backward(dev(np.ones((6, 20))))).reshape(6, 4, 5)
    np.testing.assert_array_equal(np.abs(gv).sum(axis=-1) > 0, np.arange(4)[None, :] == longest[:, None])


# -- PrimaryCaps capsule layout -----------------------------------------------------------------
def test_primary_caps_layout_matches_docstring(xp, host_rng):
    layer = PrimaryCaps(3, n_types=2, dim=4, kernel_size=3, stride=2, dtype=F64, seed=0)
    x = host_rng.standard_normal((2, 3, 7, 7))
    caps = host(layer.forward(dev(x)))
    y = naive_conv2d(x, host(layer.conv.weight.data), host(layer.conv.bias.data), 2, 0)  # (2, 8, 3, 3)
    assert caps.shape == (2, 2 * 3 * 3, 4) and layer.n_capsules(7, 7) == 18
    for t in range(2):
        for oy in range(3):
            for ox in range(3):
                s = y[:, t * 4:(t + 1) * 4, oy, ox]
                n2 = (s * s).sum(axis=1, keepdims=True)
                np.testing.assert_allclose(caps[:, t * 9 + oy * 3 + ox], n2 / (1 + n2) * s / np.sqrt(n2),
                                           rtol=1e-10, atol=1e-13)


# -- dtypes ------------------------------------------------------------------------------------
def _dtype_case(name, dtype, rng):
    """(module, forward inputs) for each module, in ``dtype``."""
    cast = lambda a: dev(np.asarray(a).astype(dtype))  # noqa: E731
    if name == "Linear":
        return Linear(4, 3, dtype=dtype, seed=0), [cast(rng.standard_normal((2, 4)))]
    if name == "ReLU":
        return ReLU(), [cast(rng.standard_normal((2, 4)))]
    if name == "Sigmoid":
        return Sigmoid(), [cast(rng.standard_normal((2, 4)))]
    if name == "Squash":
        return Squash(), [cast(rng.standard_normal((2, 3, 4)))]
    if name == "CapsuleLength":
        return CapsuleLength(), [cast(rng.standard_normal((2, 3, 4)))]
    if name == "Conv2d":
        return Conv2d(2, 3, 3, stride=2, padding=1, dtype=dtype, seed=0), [cast(rng.standard_normal((2, 2, 6, 6)))]
    if name == "PrimaryCaps":
        return PrimaryCaps(2, 2, 4, 3, 2, dtype=dtype, seed=0), [cast(rng.standard_normal((2, 2, 7, 7)))]
    if name == "DigitCaps":
        return DigitCaps(6, 4, 3, 5, 3, dtype=dtype, seed=0), [cast(squash(rng.standard_normal((2, 6, 4))))]
    if name == "Mask":
        return Mask(), [cast(rng.standard_normal((2, 3, 4))), dev(np.array([1, 2]))]
    if name == "MarginLoss":
        return MarginLoss(), [cast(rng.uniform(0, 1, (2, 3))), dev(np.array([1, 2]))]
    if name == "ReconstructionLoss":
        return ReconstructionLoss(), [cast(rng.uniform(0, 1, (2, 5))), cast(rng.uniform(0, 1, (2, 5)))]
    if name == "Sequential":
        return Sequential(Linear(4, 5, dtype=dtype, seed=0), ReLU(), Linear(5, 2, dtype=dtype, seed=1),
                          Sigmoid()), [cast(rng.standard_normal((2, 4)))]
    raise AssertionError(name)


DTYPE_CASES = ["Linear", "ReLU", "Sigmoid", "Squash", "CapsuleLength", "Conv2d", "PrimaryCaps", "DigitCaps",
               "Mask", "MarginLoss", "ReconstructionLoss", "Sequential"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", DTYPE_CASES)
def test_dtype_is_kept_forward_and_backward(xp, host_rng, name, dtype):
    module, inputs = _dtype_case(name, dtype, host_rng)
    out = module.forward(*inputs)
    assert out.dtype == np.dtype(dtype)
    assert backend.backend_of(out) == backend.get_backend()
    grad = module.backward(dev(np.ones(out.shape, dtype)))
    assert grad.dtype == np.dtype(dtype) and grad.shape == inputs[0].shape
    for pname, p in module.named_parameters():
        assert p.data.dtype == p.grad.dtype == np.dtype(dtype), pname
        assert np.any(host(p.grad) != 0), pname
    if name in ("MarginLoss", "ReconstructionLoss"):
        module.forward(*inputs)
        assert module.backward().dtype == np.dtype(dtype)  # the default grad_out = 1.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_capsnet_keeps_dtype(xp, host_rng, dtype):
    model = small_capsnet(dtype=dtype, input_grad=True)
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)).astype(dtype))
    labels = dev(np.array([0, 2]))
    lengths, recon = model.forward(x, labels)
    assert lengths.dtype == recon.dtype == np.dtype(dtype)
    criterion = CapsNetLoss()
    loss = criterion(lengths, recon, labels, x)
    assert loss.dtype == np.dtype(dtype)
    g_lengths, g_recon = criterion.backward()
    assert g_lengths.dtype == g_recon.dtype == np.dtype(dtype)
    gx = model.backward(g_lengths, g_recon)
    assert gx.dtype == np.dtype(dtype) and gx.shape == x.shape
    for name, p in model.named_parameters():
        assert p.grad.dtype == np.dtype(dtype), name


def test_astype_casts_parameters_and_gradients(xp):
    layer = Linear(3, 2, seed=0)
    assert layer.dtype == np.float32
    layer.astype("float64")
    assert layer.weight.data.dtype == layer.weight.grad.dtype == np.float64
    with pytest.raises(TypeError, match="float32 or float64, got dtype int64"):
        layer.astype("int64")


# -- errors -----------------------------------------------------------------------------------
def test_digitcaps_wrong_input_shape_message():
    layer = DigitCaps(in_caps=1152, in_dim=8, out_caps=10, out_dim=16)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros((32, 1152, 16), np.float32))
    assert str(info.value) == "DigitCaps expected input of shape (batch, 1152, 8), got (32, 1152, 16)"


def test_conv2d_wrong_channel_count():
    layer = Conv2d(3, 4, 3)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros((2, 5, 8, 8), np.float32))
    message = str(info.value)
    assert "Conv2d" in message and "3" in message and "(2, 5, 8, 8)" in message


def test_conv2d_wrong_channel_message_names_spatial_dims_correctly():
    with pytest.raises(ValueError) as info:
        Conv2d(3, 4, 3).forward(np.zeros((2, 5, 8, 8), np.float32))
    assert "expected input of shape (batch, 3, any, any), got (2, 5, 8, 8)" in str(info.value)


@pytest.mark.parametrize("module_dtype,input_dtype", [("float32", "float64"), ("float64", "float32")])
@pytest.mark.parametrize("name", ["Linear", "Conv2d", "PrimaryCaps", "DigitCaps"])
def test_wrong_dtype_input_is_refused(name, module_dtype, input_dtype):
    rng = np.random.default_rng(0)
    module, inputs = _dtype_case(name, module_dtype, rng)
    x = inputs[0].astype(input_dtype)
    with pytest.raises(TypeError) as info:
        module.forward(x)
    assert module_dtype in str(info.value) and input_dtype in str(info.value)


def test_capsnet_wrong_dtype_input_is_refused():
    model = small_capsnet(dtype="float32")
    with pytest.raises(TypeError, match="float32.*float64"):
        model.forward(np.zeros((2, 1, 12, 12)))
    with pytest.raises(ValueError, match=re.escape("got (2, 1, 28, 28)")):
        model.forward(np.zeros((2, 1, 28, 28), np.float32))


@pytest.mark.parametrize("name", DTYPE_CASES)
def test_backward_before_forward_raises(name):
    probe, inputs = _dtype_case(name, "float64", np.random.default_rng(0))
    out_shape = probe.forward(*inputs).shape
    module, _ = _dtype_case(name, "float64", np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="without a cached forward pass"):
        module.backward(np.ones(out_shape))


@pytest.mark.parametrize("name", DTYPE_CASES)
def test_backward_twice_after_one_forward_raises(name):
    module, inputs = _dtype_case(name, "float64", np.random.default_rng(0))
    out = module.forward(*inputs)
    module.backward(np.ones(out.shape))
    with pytest.raises(RuntimeError, match="without a cached forward pass"):
        module.backward(np.ones(out.shape))


@pytest.mark.parametrize("name", DTYPE_CASES)
def test_eval_forward_then_backward_raises(name):
    module, inputs = _dtype_case(name, "float64", np.random.default_rng(0))
    module.eval()
    out = module.forward(*inputs)
    with pytest.raises(RuntimeError, match=r"module\.train\(\)"):
        module.backward(np.ones(out.shape))
    module.train()
    out = module.forward(*inputs)
    module.backward(np.ones(out.shape))


def test_capsnet_backward_twice_and_after_eval_raise():
    model = small_capsnet()
    x = np.random.default_rng(0).uniform(0, 1, (2, 1, 12, 12))
    lengths, recon = model.forward(x, np.array([0, 1]))
    model.backward(np.ones(lengths.shape), np.ones(recon.shape))
    with pytest.raises(RuntimeError):
        model.backward(np.ones(lengths.shape), np.ones(recon.shape))
    model.eval()
    lengths, recon = model.forward(x)
    with pytest.raises(RuntimeError):
        model.backward(np.ones(lengths.shape), np.ones(recon.shape))


def test_load_state_dict_errors():
    model = small_capsnet()
    state = model.state_dict()
    missing = dict(state)
    del missing["digit.weight"]
    with pytest.raises(KeyError) as info:
        model.load_state_dict(missing)
    assert "missing ['digit.weight']" in str(info.value) and "unexpected none" in str(info.value)

    extra = dict(state, **{"digit.bias": np.zeros(3)})
    with pytest.raises(KeyError) as info:
        model.load_state_dict(extra)
    assert "unexpected ['digit.bias']" in str(info.value) and "missing none" in str(info.value)

    wrong = dict(state)
    wrong["conv1.bias"] = np.zeros(5)
    with pytest.raises(ValueError) as info:
        model.load_state_dict(wrong)
    assert "conv1.bias: expected (4,), got (5,)" in str(info.value)
    # a refused load changes nothing
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[name])


LABEL_ERRORS = [
    (np.array([0, 3]), ValueError, r"labels in \[0, 3\), got values from 0 to 3"),
    (np.array([-1, 0]), ValueError, r"labels in \[0, 3\), got values from -1 to 0"),
    (np.array([[0], [1]]), ValueError, re.escape("labels of shape (2,), got (2, 1)")),
    (np.array([0, 1, 2]), ValueError, re.escape("labels of shape (2,), got (3,)")),
    (np.array([0.0, 1.0]), TypeError, "integer labels, got float64"),
]


@pytest.mark.parametrize("labels,error,message", LABEL_ERRORS, ids=["too-big", "negative", "2d", "long", "float"])
def test_mask_label_errors(labels, error, message):
    with pytest.raises(error, match="Mask expected " + message):
        Mask().forward(np.zeros((2, 3, 4)), labels)


@pytest.mark.parametrize("labels,error,message", LABEL_ERRORS, ids=["too-big", "negative", "2d", "long", "float"])
def test_margin_loss_label_errors(labels, error, message):
    with pytest.raises(error, match="MarginLoss expected " + message):
        MarginLoss().forward(np.full((2, 3), 0.5), labels)


def test_mask_and_margin_loss_shape_errors():
    with pytest.raises(ValueError, match=re.escape("(batch, n_caps, dim), got (2, 12)")):
        Mask().forward(np.zeros((2, 12)))
    with pytest.raises(ValueError, match=re.escape("(batch, n_classes), got (2, 3, 1)")):
        MarginLoss().forward(np.zeros((2, 3, 1)), np.array([0, 1]))


def test_unknown_backend_name():
    with pytest.raises(backend.BackendError) as info:
        backend.set_backend("tpu")
    message = str(info.value)
    assert "'tpu'" in message and "'numpy'" in message and "'cupy'" in message
    assert backend.get_backend() == "numpy"


@pytest.mark.skipif(backend.cupy_available(), reason="a GPU is present: the cupy backend works here")
def test_cupy_without_gpu_names_the_package():
    with pytest.raises(backend.BackendError, match="cupy-cuda12x"):
        backend.set_backend("cupy")
    with pytest.raises(backend.BackendError, match="cupy-cuda12x"):
        backend.to_device(np.zeros(3), "cupy")
    assert backend.get_backend() == "numpy"
    assert backend.available_backends() == ("numpy",)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cupy_available(), reason="needs CuPy and a CUDA device")
def test_mixing_numpy_and_cupy_arrays_raises():
    on_gpu = backend.to_device(np.zeros(3), "cupy")
    with pytest.raises(backend.BackendError, match="numpy.*cupy|cupy.*numpy"):
        backend.get_array_module(np.zeros(3), on_gpu)
    layer = Linear(3, 2, dtype=F64, seed=0).to("cupy")
    with pytest.raises(backend.BackendError, match="to_device"):
        layer.forward(np.zeros((2, 3)))
    with pytest.raises(backend.BackendError):
        check_module(Linear(3, 2, dtype=F64, seed=0), np.zeros((2, 3)), on_gpu)


# -- Module bookkeeping ------------------------------------------------------------------------
CAPSNET_NAMES = ["conv1.weight", "conv1.bias", "primary.conv.weight", "primary.conv.bias", "digit.weight",
                 "decoder.0.weight", "decoder.0.bias", "decoder.2.weight", "decoder.2.bias",
                 "decoder.4.weight", "decoder.4.bias"]


def test_capsnet_parameter_names(xp):
    model = small_capsnet()
    named = list(model.named_parameters())
    assert [n for n, _ in named] == CAPSNET_NAMES
    assert [id(p) for p in model.parameters()] == [id(p) for _, p in named]
    assert model.digit.weight.shape == (8, 3, 4, 4)
    assert model.decoder[4].bias.shape == (144,)
    assert all(backend.backend_of(p.data) == backend.get_backend() for p in model.parameters())
    assert list(model.state_dict()) == CAPSNET_NAMES


def _capsnet_step(model, x, labels):
    lengths, recon = model.forward(x, labels)
    criterion = CapsNetLoss()
    criterion(lengths, recon, labels, x)
    model.backward(*criterion.backward())


def test_zero_grad_and_accumulation(xp, host_rng):
    model = small_capsnet()
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    labels = dev(np.array([1, 2]))
    _capsnet_step(model, x, labels)
    once = {n: host(p.grad).copy() for n, p in model.named_parameters()}
    assert all(np.any(g != 0) for g in once.values())
    _capsnet_step(model, x, labels)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(host(p.grad), 2 * once[name], rtol=1e-12, atol=1e-15, err_msg=name)
    model.zero_grad()
    assert all(np.all(host(p.grad) == 0) for p in model.parameters())


def test_linear_gradients_accumulate(xp, host_rng):
    layer = Linear(4, 3, dtype=F64, seed=0)
    x, g = dev(host_rng.standard_normal((2, 4))), dev(host_rng.standard_normal((2, 3)))
    layer.forward(x)
    layer.backward(g)
    first = host(layer.weight.grad).copy()
    np.testing.assert_allclose(first, host(g).T @ host(x), rtol=1e-12)
    layer.forward(x)
    layer.backward(g)
    np.testing.assert_allclose(host(layer.weight.grad), 2 * first, rtol=1e-12)


def test_state_dict_round_trip(xp, host_rng):
    a, b = small_capsnet(seed=0), small_capsnet(seed=1)
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    a.eval()
    b.eval()
    assert not np.allclose(host(a.forward(x)[0]), host(b.forward(x)[0]))
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    b.load_state_dict(state)
    for (la, ra), (lb, rb) in [(a.forward(x), b.forward(x))]:
        np.testing.assert_array_equal(host(la), host(lb))
        np.testing.assert_array_equal(host(ra), host(rb))
    # state_dict holds copies, and loading casts to the parameter's dtype
    state["conv1.bias"][...] = 123
    assert not np.any(host(a.conv1.bias.data) == 123)
    c = small_capsnet(dtype="float32", seed=2)
    c.load_state_dict(a.state_dict())
    assert c.conv1.weight.data.dtype == np.float32
    np.testing.assert_allclose(host(c.conv1.weight.data), host(a.conv1.weight.data), rtol=1e-6)


def test_train_eval_recurse():
    model = small_capsnet()
    modules = list(model.modules())
    # the model, conv1, relu, primary and its conv, digit, length, mask, decoder and its 6 layers
    assert len(modules) == 15
    assert all(m.training for m in modules)
    assert model.eval() is model
    assert not any(m.training for m in modules)
    model.train()
    assert all(m.training for m in modules)
    model.train(False)
    assert not any(m.training for m in model.decoder)


def test_evaluating_switches_to_eval_and_restores_the_mode():
    model = small_capsnet()
    modules = list(model.modules())
    with model.evaluating() as inside:
        assert inside is model
        assert not any(m.training for m in modules)
        with model.evaluating():  # nested: still eval inside, and eval again after
            assert not any(m.training for m in modules)
        assert not any(m.training for m in modules)
    assert all(m.training for m in modules)
    model.eval()
    with model.evaluating():
        pass
    assert not any(m.training for m in modules)  # a model in eval mode stays there
    model.train()


def test_evaluating_restores_the_mode_when_the_block_raises():
    model = small_capsnet()
    with pytest.raises(RuntimeError, match="inside"):
        with model.evaluating():
            assert not model.training
            raise RuntimeError("inside")
    assert all(m.training for m in model.modules())


def test_predict_runs_in_eval_mode_and_restores_the_mode(xp, host_rng):
    model = small_capsnet()
    seen = []
    forward = model.capsules

    def spy(x):
        seen.append(model.training)
        return forward(x)

    model.capsules = spy
    x = dev(host_rng.random((2, 1, 12, 12)))
    model.predict(x)
    assert seen == [False] and model.training
    model.eval()
    model.reconstruct(x)
    assert seen == [False, False] and not model.training


def test_inplace_relu_overwrites_and_matches(xp, host_rng):
    x = away_from_zero(host_rng, (3, 4, 5))
    g = host_rng.standard_normal(x.shape)
    plain, inplace = ReLU(), ReLU(inplace=True)
    expected_y = host(plain.forward(dev(x)))
    expected_g = host(plain.backward(dev(g)))
    x_dev, g_dev = dev(x), dev(g)
    y = inplace.forward(x_dev)
    np.testing.assert_array_equal(host(y), expected_y)
    np.testing.assert_array_equal(host(x_dev), expected_y)  # the input was overwritten
    gx = inplace.backward(g_dev)
    np.testing.assert_array_equal(host(gx), expected_g)
    np.testing.assert_array_equal(host(g_dev), expected_g)
    assert repr(inplace) == "ReLU(inplace=True)"


def test_routing_backward_may_overwrite_u_hat_and_predictions_take_out(xp, host_rng):
    u = dev(squash(host_rng.standard_normal((2, 6, 4))))
    w = dev(host_rng.standard_normal((6, 3, 5, 4)) * 0.5)
    u_hat = capsule_predictions(u, w)
    again = capsule_predictions(u, w, out=dev(np.zeros(u_hat.shape)))
    np.testing.assert_array_equal(host(again), host(u_hat))
    v, state = dynamic_routing(u_hat, 3)
    gv = dev(host_rng.standard_normal(v.shape))
    expected = host(dynamic_routing_backward(gv, u_hat, state))
    got = dynamic_routing_backward(gv, u_hat, state, out=u_hat)
    assert got is u_hat
    np.testing.assert_allclose(host(got), expected, rtol=1e-12, atol=1e-14)


# -- empty batches and dtype hints ---------------------------------------------
def _empty_refused():
    small = dict(conv_channels=4, primary_types=2, primary_dim=4, digit_dim=4, decoder_hidden=(8,))
    return [
        ("Conv2d", lambda: Conv2d(1, 2, 3, dtype="float64"), [(0, 1, 5, 5)]),
        ("Linear", lambda: Linear(4, 3, dtype="float64"), [(0, 4)]),
        ("PrimaryCaps", lambda: PrimaryCaps(4, 2, 4, 3, 2, dtype="float64"), [(0, 4, 7, 7)]),
        ("DigitCaps", lambda: DigitCaps(6, 4, 3, 2, dtype="float64"), [(0, 6, 4)]),
        ("Mask", Mask, [(0, 3, 4)]),
        ("MarginLoss", MarginLoss, [(0, 10), "labels"]),
        ("ReconstructionLoss", ReconstructionLoss, [(0, 1, 4, 4), (0, 1, 4, 4)]),
        ("CapsNet", lambda: CapsNet(CapsNetConfig(**small), dtype="float64"), [(0, 1, 28, 28), "labels"]),
    ]


@pytest.mark.parametrize("name,make,shapes", _empty_refused(), ids=[c[0] for c in _empty_refused()])
def test_an_empty_batch_is_refused_with_the_library_message(xp, name, make, shapes):
    args = [dev(np.zeros(0, dtype=np.int64)) if s == "labels" else dev(np.zeros(s)) for s in shapes]
    with pytest.raises(ValueError, match=f"{name} got an empty batch"):
        make()(*args)


@pytest.mark.parametrize("layer,shape", [(ReLU(), (0, 3)), (Sigmoid(), (0, 3)), (Squash(), (0, 5, 4)),
                                         (CapsuleLength(), (0, 5, 4)), (Flatten(), (0, 2, 3))],
                         ids=["ReLU", "Sigmoid", "Squash", "CapsuleLength", "Flatten"])
def test_element_wise_layers_pass_an_empty_batch_through(xp, layer, shape):
    y = layer(dev(np.zeros(shape)))
    assert y.shape[0] == 0
    assert layer.backward(xp.zeros(y.shape)).shape == shape


def test_the_dtype_hint_offers_only_casts_that_work(xp):
    layer = Linear(4, 3)  # float32
    with pytest.raises(TypeError) as exc:
        layer(dev(np.zeros((2, 4), dtype=np.uint8)))
    message = str(exc.value)
    assert ".astype('float32')" in message and "to_float" in message
    assert "module with .astype('uint8')" not in message
    with pytest.raises(TypeError, match=r"or the module with \.astype\('float64'\)"):
        layer(dev(np.zeros((2, 4))))
    with pytest.raises(TypeError) as exc:
        layer(dev(np.zeros((2, 4), dtype=np.int32)))
    assert "module" not in str(exc.value)
