"""capsnet.layers.pool: MaxPool2d against a loop oracle (ties at the first maximum), its
float64 gradient check on every backend, PyTorch parity (NaN and -inf included)."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet.gradcheck import check_module
from capsnet.layers import MaxPool2d

from tests.helpers import dev, host, torch_parity


# -- slow, obvious oracles -----------------------------------------------------------------
def naive_max_pool(x, k, s, p):
    n, c, h, w = x.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    y = np.zeros((n, c, oh, ow))
    g_index = np.zeros((n, c, oh, ow, 2), dtype=int)
    for b in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    win = xpad[b, ch, i * s:i * s + k, j * s:j * s + k]
                    flat = int(np.argmax(win))  # the first maximum in row-major order
                    y[b, ch, i, j] = win.flat[flat]
                    g_index[b, ch, i, j] = (i * s + flat // k - p, j * s + flat % k - p)
    return y, g_index


def test_max_pool_matches_the_loop_oracle_and_breaks_ties_at_the_first_maximum(xp, host_rng):
    for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)]:
        x = np.round(host_rng.standard_normal((2, 3, 7, 6)) * 2) / 2  # many ties
        layer = MaxPool2d(k, s, p)
        y = layer(dev(x))
        ref, where = naive_max_pool(x, k, s, p)
        np.testing.assert_array_equal(host(y), ref)
        g = host_rng.standard_normal(ref.shape)
        gx = host(layer.backward(dev(g)))
        expected = np.zeros_like(x)
        for idx in np.ndindex(ref.shape):
            expected[idx[0], idx[1], where[idx][0], where[idx][1]] += g[idx]
        np.testing.assert_allclose(gx, expected, rtol=1e-12, atol=1e-12)


# -- float64 gradient checks -----------------------------------------------------------------
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
@pytest.mark.parametrize("batch", [1, 3])
def test_gradcheck_max_pool(xp, host_rng, k, s, p, batch):
    x = host_rng.permutation(batch * 2 * 7 * 7).reshape(batch, 2, 7, 7) * 0.1  # distinct: no ties nearby
    check_module(MaxPool2d(k, s, p), dev(x.astype(np.float64)))


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
@pytest.mark.parametrize("batch", [1, 3])
def test_max_pool_parity_with_pytorch(torch, host_rng, k, s, p, batch):
    x = np.round(host_rng.standard_normal((batch, 2, 7, 8)) * 2) / 2  # with ties
    torch_parity(torch, MaxPool2d(k, s, p), torch.nn.MaxPool2d(k, s, p), x)


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_pool_matches_pytorch_on_nan_and_minus_infinity(torch, host_rng, k, s, p):
    """A NaN wins its window; windows of -inf next to the padding keep their gradient."""
    x = np.round(host_rng.standard_normal((2, 2, 7, 8)) * 2) / 2
    x[0, 0, 0, 1] = x[0, 1, 3, 3] = np.nan
    x[1, 1] = -np.inf
    layer = MaxPool2d(k, s, p)
    y = layer(x)
    g = host_rng.standard_normal(y.shape)
    gx = layer.backward(g)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, k, s, p)
    yt.backward(torch.tensor(g))
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-12, atol=0)
