"""capsnet.layers.dense and capsnet.layers.activation: Linear, Flatten, Reshape, ReLU and
Sigmoid, float64 gradient checks on every backend, the pure functions against the modules."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet.gradcheck import check_module
from capsnet.layers import (
    Flatten,
    Linear,
    ReLU,
    Reshape,
    Sequential,
    Sigmoid,
    linear_backward,
    relu,
    relu_backward,
    sigmoid,
    sigmoid_backward,
)

from tests.helpers import dev, host


F64 = "float64"


def away_from_zero(rng, shape, low=0.1, high=2.0):
    """Values with |x| in [low, high] and random signs: no ReLU kinks nearby."""
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


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
    # and both agree with the formulas, not only with each other (the module calls the function)
    np.testing.assert_array_equal(host(relu(x)), np.maximum(host(x), 0))
    np.testing.assert_array_equal(host(relu_backward(g, x)), host(g) * (host(x) > 0))
    sig = Sigmoid()
    y = sig.forward(x)
    np.testing.assert_array_equal(host(sigmoid(x)), host(y))
    np.testing.assert_allclose(host(sigmoid_backward(g, y)), host(sig.backward(g)), rtol=1e-15)
    np.testing.assert_allclose(host(y), 1 / (1 + np.exp(-host(x))), rtol=1e-14)
    np.testing.assert_allclose(host(sigmoid_backward(g, y)), host(g) * host(y) * (1 - host(y)), rtol=1e-14)
    layer = Linear(4, 2, dtype=F64, seed=0)
    out = layer.forward(x)
    np.testing.assert_allclose(host(out), host(x) @ host(layer.weight.data).T + host(layer.bias.data), rtol=1e-13)
    gy = dev(host_rng.standard_normal((3, 2)))
    gx, gw, gb = linear_backward(gy, x, layer.weight.data)
    np.testing.assert_allclose(host(layer.backward(gy)), host(gx), rtol=1e-15)
    np.testing.assert_allclose(host(layer.weight.grad), host(gw), rtol=1e-15)
    np.testing.assert_allclose(host(layer.bias.grad), host(gb), rtol=1e-15)
    np.testing.assert_allclose(host(gx), host(gy) @ host(layer.weight.data), rtol=1e-13)
    np.testing.assert_allclose(host(gw), host(gy).T @ host(x), rtol=1e-13)
    np.testing.assert_allclose(host(gb), host(gy).sum(axis=0), rtol=1e-13)


def test_sigmoid_saturates_without_warnings(xp):
    x = dev(np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0]))
    y = host(sigmoid(x))
    assert np.all(np.isfinite(y)) and y[0] == 0 and y[2] == 0.5 and y[-1] == 1


def test_gradcheck_sigmoid(xp, host_rng):
    check_module(Sigmoid(), dev(3 * host_rng.standard_normal((3, 4, 5))))


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


def test_gradcheck_flatten(xp, host_rng):
    check_module(Sequential(Flatten(), Linear(12, 3, dtype="float64", seed=0)),
                 dev(host_rng.standard_normal((2, 3, 2, 2))))


F64 = "float64"


def test_gradcheck_reshape(xp, host_rng):
    check_module(Sequential(Linear(6, 12, dtype=F64, seed=0), Reshape(3, 2, 2), Flatten()),
                 dev(host_rng.standard_normal((2, 6))))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_of_large_arrays_is_numpys_maximum_bit_for_bit(xp, host_rng, dtype):
    """Above a few thousand elements the NumPy path compares blocks of memory with a block of
    zeros (capsnet.layers.activation): the values, signs of zero, NaN and infinities of
    max(x, 0), for contiguous arrays, channels-last views (in the input's layout) and strided
    views (the plain path), in place and not, with sizes that end in a partial block."""
    x = host_rng.standard_normal((3, 70001)).astype(dtype)
    x[0, :4] = [-0.0, np.nan, np.inf, -np.inf]
    nhwc = host_rng.standard_normal((4, 23, 21, 64)).astype(dtype)
    for a in (x, nhwc.transpose(0, 3, 1, 2), x[:, ::3]):
        expected = np.maximum(a, 0)
        y = host(relu(dev(a)))
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(np.signbit(y), np.signbit(expected))
        held = dev(np.array(a, order="K") if a.base is nhwc else np.ascontiguousarray(a))
        out = ReLU(inplace=True).forward(held)
        np.testing.assert_array_equal(host(held), expected)
        np.testing.assert_array_equal(host(out), expected)
    y = relu(dev(nhwc.transpose(0, 3, 1, 2)))
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous  # the layout of its input, channels-last
