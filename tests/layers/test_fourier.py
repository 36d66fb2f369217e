"""The Fourier-domain convolution (capsnet.layers.convolution.fourier): against the loop oracle
and im2col on awkward geometries, float64 gradient checks, float32 accuracy at
PrimaryCaps' size, the DFT tables, and how Conv2d chooses between the methods.
"""
from __future__ import annotations

import numpy as np
import pytest

from capsnet import backend
from capsnet.gradcheck import check_module
from capsnet.layers import Conv2d
from capsnet.layers.conv import conv2d_nhwc, conv2d_nhwc_backward
from capsnet.layers.convolution.fourier import (
    Workspace,
    _frequencies,
    _tables,
    conv2d_fourier_nhwc,
    conv2d_fourier_nhwc_backward,
    fourier_flops,
    fourier_geometry,
)
from tests.helpers import dev, host, naive_conv2d, naive_conv2d_backward

# (batch, height, width, in, out, kernel, stride, padding): odd and even grids,
# kernels that stride does not divide, a cropped last row, a 1x1 output
GEOMETRIES = [
    (2, 20, 20, 3, 4, 9, 2, 0),  # PrimaryCaps' shape, few channels
    (2, 13, 11, 3, 4, 5, 2, 1),
    (2, 9, 10, 2, 3, 3, 1, 0),
    (2, 12, 12, 3, 2, 4, 3, 2),
    (3, 7, 7, 2, 2, 7, 1, 0),
    (1, 8, 9, 2, 5, 2, 2, 0),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "b{}-{}x{}-c{}-o{}-k{}-s{}-p{}".format(*g))
def test_fourier_matches_the_loop_oracle(xp, host_rng, geometry):
    b, h, w, c, o, k, s, p = geometry
    x = host_rng.standard_normal((b, c, h, w))
    wt = host_rng.standard_normal((o, c, k, k))
    bias = host_rng.standard_normal(o)
    y, cache = conv2d_fourier_nhwc(dev(x.transpose(0, 2, 3, 1)), dev(wt), dev(bias), s, p)
    expected = naive_conv2d(x, wt, bias, s, p)
    np.testing.assert_allclose(host(y).transpose(0, 3, 1, 2), expected, rtol=1e-10, atol=1e-11)

    gy = host_rng.standard_normal(expected.shape)
    gx, gw, gb = conv2d_fourier_nhwc_backward(dev(gy.transpose(0, 2, 3, 1)), cache, dev(wt), s, p)
    ex, ew, eb = naive_conv2d_backward(gy, x, wt, s, p)
    np.testing.assert_allclose(host(gx).transpose(0, 3, 1, 2), ex, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(host(gw), ew, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(host(gb), eb, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("per_block", [1, 2], ids=["one-channel", "uneven-blocks"])
def test_weight_gradient_by_blocks_of_channels_matches_the_loop_oracle(xp, host_rng, monkeypatch, per_block):
    """The weight gradient's spectrum is made a block of input channels at a time: one channel
    per block, and blocks of 2 with a shorter last one (5 channels), give the oracle's grad_w."""
    import capsnet.layers.convolution.fourier as fourier

    b, h, w, c, o, k, s = 2, 11, 11, 5, 4, 5, 2
    f = fourier_geometry(h, w, k, k, s)["bins"]
    # the limit counts elements of the (F, 2, channels, O) block: 5 blocks of 1, or 2 + 2 + 1
    monkeypatch.setattr(fourier, "WEIGHT_GRAD_BLOCK", 2 * f * o * per_block)
    x = host_rng.standard_normal((b, c, h, w))
    wt = host_rng.standard_normal((o, c, k, k))
    y, cache = conv2d_fourier_nhwc(dev(x.transpose(0, 2, 3, 1)), dev(wt), None, s)
    gy = host_rng.standard_normal(host(y).transpose(0, 3, 1, 2).shape)
    _, gw, _ = conv2d_fourier_nhwc_backward(dev(gy.transpose(0, 2, 3, 1)), cache, dev(wt), s, need_input_grad=False)
    np.testing.assert_allclose(host(gw), naive_conv2d_backward(gy, x, wt, s, 0)[1], rtol=1e-10, atol=1e-11)


def test_fourier_without_input_gradient(xp, host_rng):
    x = dev(host_rng.standard_normal((2, 9, 9, 3)))
    wt = dev(host_rng.standard_normal((4, 3, 5, 5)))
    y, cache = conv2d_fourier_nhwc(x, wt, None, 2)
    gx, gw, _ = conv2d_fourier_nhwc_backward(dev(host_rng.standard_normal(y.shape)), cache, wt, 2,
                                             need_input_grad=False)
    assert gx is None and gw.shape == wt.shape


@pytest.mark.parametrize("stride,padding,bias", [(1, 0, True), (2, 1, True), (3, 0, False)])
def test_gradcheck_fourier_conv2d(xp, host_rng, stride, padding, bias):
    layer = Conv2d(2, 3, 4, stride, padding, bias, algorithm="fourier", dtype="float64", seed=0)
    results = check_module(layer, dev(host_rng.standard_normal((2, 2, 9, 8))))
    assert [r.name for r in results] == ["input", "weight"] + (["bias"] if bias else [])


def test_float32_fourier_is_as_accurate_as_im2col_at_primarycaps_size(xp, host_rng):
    """Against a float64 reference, the float32 Fourier result stays within a few
    times im2col's own float32 rounding error, forward and both gradients."""
    x = np.maximum(host_rng.standard_normal((4, 20, 20, 64)), 0)
    wt = host_rng.standard_normal((32, 64, 9, 9)) * 0.02
    gy = host_rng.standard_normal((4, 6, 6, 32))
    y64 = conv2d_nhwc(dev(x), dev(wt), None, 2)
    g64 = conv2d_nhwc_backward(dev(gy), dev(x), dev(wt), 2)
    x32, w32, gy32 = (dev(a.astype(np.float32)) for a in (x, wt, gy))
    y_direct = conv2d_nhwc(x32, w32, None, 2)
    g_direct = conv2d_nhwc_backward(gy32, x32, w32, 2)
    y_fourier, cache = conv2d_fourier_nhwc(x32, w32, None, 2)
    g_fourier = conv2d_fourier_nhwc_backward(gy32, cache, w32, 2)
    assert y_fourier.dtype == np.float32 and g_fourier[1].dtype == np.float32

    def rel(a, ref):
        return float(np.abs(host(a) - host(ref)).max() / np.abs(host(ref)).max())

    for name, fourier, direct, ref in [("output", y_fourier, y_direct, y64),
                                       ("input gradient", g_fourier[0], g_direct[0], g64[0]),
                                       ("weight gradient", g_fourier[1], g_direct[1], g64[1])]:
        assert rel(fourier, ref) < max(10 * rel(direct, ref), 1e-6), name
        assert rel(fourier, ref) < 1e-5, name


@pytest.mark.parametrize("ny,nx", [(10, 10), (7, 5), (4, 9), (1, 1)])
def test_dft_tables_invert_each_other(ny, nx):
    fwd, inv = _tables(ny, nx, "float64")
    fy, fx, copies = _frequencies(ny, nx)
    assert fwd.shape == (2 * len(fy), ny * nx) and inv.shape == fwd.shape[::-1]
    assert copies.sum() == ny * nx  # every frequency of the full spectrum stood for exactly once
    np.testing.assert_allclose(inv @ fwd, np.eye(ny * nx), atol=1e-12)
    grid = np.random.default_rng(0).standard_normal((ny, nx))
    spectrum = np.fft.fft2(grid)[fy, fx]
    np.testing.assert_allclose(fwd @ grid.ravel(), np.stack([spectrum.real, spectrum.imag], -1).ravel(),
                               atol=1e-12)


def test_geometry_and_flops_of_primarycaps():
    g = fourier_geometry(20, 20, 9, 9, 2)
    assert (g["oh"], g["ow"], g["ny"], g["nx"], g["bins"]) == (6, 6, 10, 10, 52)
    direct, fourier = fourier_flops(20, 20, 256, 256, 9, 9, 2)
    assert direct == 2 * 36 * 81 * 256 * 256
    assert 0.3 < fourier / direct < 0.4


def test_fourier_rejects_an_empty_output():
    with pytest.raises(ValueError, match="output would be empty"):
        conv2d_fourier_nhwc(np.zeros((1, 4, 4, 1)), np.zeros((1, 1, 5, 5)), None)


def test_conv2d_algorithm_choice():
    """"auto" takes the cheapest candidate by the engine's cost model, per mode and batch."""
    from capsnet.layers import convolution as engine  # noqa: PLC0415
    from capsnet.parallel import blas_limit  # noqa: PLC0415

    primary = Conv2d(256, 256, 9, 2)
    for training in (True, False):
        primary.train(training)
        for batch in (1, 4, 100):
            g = primary.geometry(20, 20, batch)
            costs = {n: engine.predicted_seconds(n, g, training) for n in engine.candidates(g)}
            assert primary.algorithm_for(20, 20, batch) == min(costs, key=costs.get)
    primary.train()
    with blas_limit(1):  # as in a replica: the shipped sweep measured 6.2 s against im2col's 14.4 s at batch 100
        assert primary.algorithm_for(20, 20, 100) == "fourier"
    assert Conv2d(1, 256, 9).algorithm_for(28, 28, 100) == "im2col"  # one input channel
    forced = Conv2d(1, 256, 9, algorithm="fourier")
    assert forced.algorithm_for(28, 28, 1) == "fourier"
    assert "algorithm='fourier'" in repr(forced)
    with pytest.raises(ValueError, match="algorithm must be one of .* got 'fft'"):
        Conv2d(1, 2, 3, algorithm="fft")


def test_conv2d_methods_agree_and_may_switch_between_forward_and_backward(xp, host_rng):
    """The backward uses the method its forward used, whatever the attribute says by then."""
    x = dev(host_rng.standard_normal((3, 4, 11, 11)))
    gy = host_rng.standard_normal((3, 5, 4, 4))
    results = {}
    for forward_with, backward_with in [("im2col", "fourier"), ("fourier", "im2col")]:
        layer = Conv2d(4, 5, 5, stride=2, dtype="float64", seed=1, algorithm=forward_with)
        y = layer.forward(x)
        layer.algorithm = backward_with
        gx = layer.backward(dev(gy))
        results[forward_with] = [host(a) for a in (y, gx, layer.weight.grad, layer.bias.grad)]
    for direct, fourier in zip(results["im2col"], results["fourier"]):
        np.testing.assert_allclose(fourier, direct, rtol=1e-10, atol=1e-12)


def test_workspace_reuses_and_grows(xp):
    work = Workspace()
    a = work.get(xp, "a", (4, 5), "float32")
    b = work.get(xp, "a", (2, 3), "float32")
    assert b.shape == (2, 3) and b.dtype == np.float32
    assert backend.get_array_module(b) is xp
    assert work.nbytes == 4 * 5 * 4  # the smaller request reused the first buffer
    work.get(xp, "a", (10, 10), "float32")
    assert work.nbytes == 100 * 4
    work.get(xp, "a", (10, 10), "float64")  # a new dtype replaces it
    assert work.nbytes == 100 * 8
    del a
    work.clear()
    assert work.nbytes == 0


@pytest.mark.parametrize("batch,size", [(1, 11), (2, 5)], ids=["batch1", "1x1-output"])
def test_inference_outputs_are_not_overwritten_by_the_next_call(xp, host_rng, batch, size):
    """Where the output would already be contiguous (one image, or a 1x1 output) it is
    still a fresh array, not the layer's scratch."""
    layer = Conv2d(3, 4, 5, stride=2, algorithm="fourier", dtype="float64", seed=0)
    layer.eval()
    x1, x2 = (dev(host_rng.standard_normal((batch, 3, size, size))) for _ in range(2))
    y1 = layer.forward(x1)
    kept = host(y1).copy()
    layer.forward(x2)
    np.testing.assert_array_equal(host(y1), kept)


def test_conv2d_inference_workspace_is_reused_and_released(xp, host_rng):
    layer = Conv2d(3, 4, 5, stride=2, algorithm="fourier", dtype="float64", seed=0)
    xs = [host_rng.standard_normal((2, 3, 11, 11)) for _ in range(2)]
    layer.eval()
    outs = [host(layer.forward(dev(x))) for x in xs]  # the second call reuses the first call's arrays
    held = layer.held_nbytes()
    assert held > 0
    w, b = host(layer.weight.data), host(layer.bias.data)
    for x, y in zip(xs, outs):
        np.testing.assert_allclose(y, naive_conv2d(x, w, b, 2, 0), rtol=1e-10, atol=1e-12)
    layer.forward(dev(xs[0]))
    assert layer.held_nbytes() == held
    layer.train()
    layer.forward(dev(xs[0]))  # a training forward gives the memory back
    assert layer._instance("fourier").memory.nbytes == 0  # a training forward's own state is in its cache


def test_training_steps_reuse_the_spectra_arrays_correctly(xp, host_rng):
    """Consecutive training steps (the second reuses the first's spectra arrays) and a
    forward repeated before its backward match im2col step for step."""
    fourier = Conv2d(3, 4, 5, stride=2, algorithm="fourier", dtype="float64", seed=2)
    direct = Conv2d(3, 4, 5, stride=2, algorithm="im2col", dtype="float64", seed=2)
    for forwards in (1, 1, 2, 1):
        for layer in (fourier, direct):
            layer.zero_grad()
        for _ in range(forwards):
            x = dev(host_rng.standard_normal((2, 3, 11, 11)))
            y_f, y_d = fourier.forward(x), direct.forward(x)
        np.testing.assert_allclose(host(y_f), host(y_d), rtol=1e-10, atol=1e-12)
        gy = dev(host_rng.standard_normal(y_d.shape))
        np.testing.assert_allclose(host(fourier.backward(gy)), host(direct.backward(gy)), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(host(fourier.weight.grad), host(direct.weight.grad), rtol=1e-10, atol=1e-12)
    assert fourier._instance("fourier").memory.holds_spare


def test_flops_per_image_with_the_fourier_primary_conv():
    from capsnet.models.capsnet import CapsNetConfig, flops_per_image

    cfg = CapsNetConfig()
    direct, fourier = fourier_flops(20, 20, 256, 256, 9, 9, 2)
    direct_b, fourier_b = fourier_flops(20, 20, 256, 256, 9, 9, 2, backward=True)
    assert direct_b == 2 * direct
    # backward: one output-gradient DFT, two sets of products, one inverse DFT of the input grid
    assert fourier < fourier_b < 2 * fourier
    assert fourier_flops(20, 20, 256, 256, 9, 9, 2, backward=True, input_grad=False)[1] < fourier
    assert (flops_per_image(cfg) - flops_per_image(cfg, primary_algorithm="fourier")
            == direct + direct_b - fourier - fourier_b)
    assert (flops_per_image(cfg, training=False) - flops_per_image(cfg, training=False, primary_algorithm="fourier")
            == direct - fourier)
    with pytest.raises(ValueError, match="primary_algorithm"):
        flops_per_image(cfg, primary_algorithm="fft")


def test_inference_weight_spectrum_follows_every_weight_change(xp, host_rng):
    layer = Conv2d(3, 4, 5, stride=2, algorithm="fourier", dtype="float64", seed=0)
    layer.eval()
    x = host_rng.standard_normal((2, 3, 11, 11))

    def check():
        w, b = host(layer.weight.data), host(layer.bias.data)
        np.testing.assert_allclose(host(layer.forward(dev(x))), naive_conv2d(x, w, b, 2, 0), rtol=1e-10, atol=1e-12)

    check()
    check()  # reused
    layer.weight.data[0, 0, 0, 0] += 1.0  # in place
    check()
    layer.weight.data = layer.weight.data * 0.5  # a new array
    check()
    layer.astype("float32")
    y32 = layer.forward(dev(x.astype(np.float32)))
    assert y32.dtype == np.float32
    layer.astype("float64")
    check()
    layer.train()
    layer.forward(dev(x))
    assert not layer._instance("fourier").memory.holds_weight_spectrum  # a training forward drops it
