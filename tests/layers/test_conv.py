"""capsnet.layers.conv: Conv2d (both patch layouts, grouped and depthwise) and
ConvTranspose2d against slow loop oracles, float64 gradient checks on every backend,
im2col/col2im adjointness, shape errors, PyTorch parity of the transposed convolution."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet.gradcheck import check_module
from capsnet.layers import Conv2d, ConvTranspose2d, col2im, conv2d, conv2d_backward, im2col
from capsnet.layers.conv import conv2d_nhwc

from tests.helpers import dev, host, naive_conv2d, naive_conv2d_backward, torch_parity


F64 = "float64"


@pytest.mark.parametrize(
    "stride,padding,bias", [(1, 0, True), (2, 1, True), (1, 0, False)], ids=["stride1", "stride2-pad1", "no-bias"]
)
def test_gradcheck_conv2d(xp, host_rng, stride, padding, bias):
    layer = Conv2d(2, 3, 3, stride, padding, bias, dtype=F64, seed=0)
    results = check_module(layer, dev(host_rng.standard_normal((2, 2, 7, 6))))
    assert [r.name for r in results] == ["input", "weight"] + (["bias"] if bias else [])


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


@pytest.mark.parametrize("layout", ["rows", "channels", "taps"])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (3, 2)])
@pytest.mark.parametrize("channels", [3, 1])
def test_every_patch_layout_matches_naive_loops(xp, host_rng, layout, stride, padding, channels):
    from capsnet.layers.conv import conv2d_nhwc, conv2d_nhwc_backward  # noqa: PLC0415

    x = host_rng.standard_normal((2, channels, 8, 7))
    w = host_rng.standard_normal((5, channels, 3, 3))
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


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gradcheck_first_layer_taps_layout(xp, host_rng, bias):
    """One input channel, few outputs: the "taps" layout, whose products carry the bias (a
    column of the weights against a row of ones in the patches) in the forward and give its
    gradient in the backward."""
    from capsnet.layers.convolution import ConvGeometry  # noqa: PLC0415
    from capsnet.layers.convolution.im2col import layout_for  # noqa: PLC0415

    layer = Conv2d(1, 4, 3, stride=2, padding=1, bias=bias, dtype=F64, seed=0, algorithm="im2col")
    assert layout_for(layer.geometry(7, 6, 2)) == "taps"
    x = host_rng.standard_normal((2, 1, 7, 6))
    results = check_module(layer, dev(x))
    assert [r.name for r in results] == ["input", "weight"] + (["bias"] if bias else [])
    layer.zero_grad()
    y = layer.forward(dev(x))
    w = host(layer.weight.data)
    b = host(layer.bias.data) if bias else np.zeros(4)
    np.testing.assert_allclose(host(y), naive_conv2d(x, w, b, 2, 1), rtol=1e-10, atol=1e-12)
    gy = host_rng.standard_normal(y.shape)
    layer.backward(dev(gy))
    ex, ew, eb = naive_conv2d_backward(gy, x, w, 2, 1)
    np.testing.assert_allclose(host(layer.weight.grad), ew, rtol=1e-10, atol=1e-12)
    if bias:
        np.testing.assert_allclose(host(layer.bias.grad), eb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", ["channels-first", "channels-last view"])
def test_first_layer_gradients_from_either_memory_order(xp, host_rng, memory):
    """A first layer (no input gradient, taps layout) takes an NCHW-contiguous output gradient
    as it is (Conv2d.gradients_channels_first) and a channels-last view through the usual path:
    both give the loop oracle's weight and bias gradients."""
    layer = Conv2d(1, 6, 3, stride=2, padding=1, input_grad=False, dtype=F64, seed=0)
    x = host_rng.standard_normal((3, 1, 9, 8))
    y = layer.forward(dev(x))
    gy = host_rng.standard_normal(y.shape)
    given = dev(gy) if memory == "channels-first" else dev(np.ascontiguousarray(gy.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    assert given.flags.c_contiguous == (memory == "channels-first")
    assert layer.backward(given) is None
    _, ew, eb = naive_conv2d_backward(gy, x, host(layer.weight.data), 2, 1)
    np.testing.assert_allclose(host(layer.weight.grad), ew, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(layer.bias.grad), eb, rtol=1e-10, atol=1e-12)
    layer.forward(dev(x))
    layer.backward(given)  # accumulates
    np.testing.assert_allclose(host(layer.weight.grad), 2 * ew, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="without a cached forward"):
        layer.backward(given)


@pytest.mark.parametrize("memory", ["channels-first", "channels-last view"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_pointwise_runs_on_either_memory_order(xp, host_rng, memory, bias):
    """A 1x1 convolution given channels-first memory computes on it as it is (per-image
    products, Pointwise.forward_channels_first) and one given a channels-last view takes the
    usual path: the same values and gradients as the loop oracle, through backward and
    backward_nhwc alike, and a float64 gradient check."""
    layer = Conv2d(3, 5, 1, bias=bias, dtype=F64, seed=0, algorithm="pointwise")
    x = host_rng.standard_normal((2, 3, 4, 6))
    given = dev(x) if memory == "channels-first" else dev(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    w = host(layer.weight.data)
    b = host(layer.bias.data) if bias else np.zeros(5)
    y = layer.forward(given)
    assert getattr(layer._cache[2], "channels_first", False) == (memory == "channels-first")
    assert y.flags.c_contiguous == (memory == "channels-first")
    np.testing.assert_allclose(host(y), naive_conv2d(x, w, b, 1, 0), rtol=1e-10, atol=1e-12)
    gy = host_rng.standard_normal(y.shape)
    ex, ew, eb = naive_conv2d_backward(gy, x, w, 1, 0)
    gx = layer.backward(dev(gy))
    np.testing.assert_allclose(host(gx), ex, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(layer.weight.grad), ew, rtol=1e-10, atol=1e-12)
    if bias:
        np.testing.assert_allclose(host(layer.bias.grad), eb, rtol=1e-10, atol=1e-12)
    layer.zero_grad()
    layer.forward(given)
    gx_nhwc = layer.backward_nhwc(dev(np.ascontiguousarray(gy.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(host(gx_nhwc).transpose(0, 3, 1, 2), ex, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(layer.weight.grad), ew, rtol=1e-10, atol=1e-12)
    layer.zero_grad()
    results = check_module(layer, given)
    assert [r.name for r in results] == ["input", "weight"] + (["bias"] if bias else [])


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_depthwise_runs_on_channels_first_memory(xp, host_rng, stride, padding):
    """A depthwise convolution given channels-first memory: one einsum over a view of it
    (Direct.forward_channels_first), the backward through the channels-last path; values and
    gradients of the loop oracle, and a float64 gradient check."""
    layer = Conv2d(4, 4, 3, stride, padding, groups=4, dtype=F64, seed=0, algorithm="direct")
    x = host_rng.standard_normal((2, 4, 7, 6))
    y = layer.forward(dev(x))
    assert layer._cache[2].channels_first and y.flags.c_contiguous
    w, b = host(layer.weight.data), host(layer.bias.data)
    ref = np.stack([naive_conv2d(x[:, c : c + 1], w[c : c + 1], b[c : c + 1], stride, padding)[:, 0]
                    for c in range(4)], axis=1)
    np.testing.assert_allclose(host(y), ref, rtol=1e-10, atol=1e-12)
    gy = host_rng.standard_normal(y.shape)
    gx = layer.backward(dev(gy))
    for c in range(4):
        ex, ew, eb = naive_conv2d_backward(gy[:, c : c + 1], x[:, c : c + 1], w[c : c + 1], stride, padding)
        np.testing.assert_allclose(host(gx)[:, c : c + 1], ex, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(host(layer.weight.grad)[c : c + 1], ew, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(host(layer.bias.grad)[c : c + 1], eb, rtol=1e-10, atol=1e-12)
    layer.zero_grad()
    results = check_module(layer, dev(x))
    assert [r.name for r in results] == ["input", "weight", "bias"]


def test_gather_taps_appends_a_row_of_ones(xp, host_rng):
    from capsnet.layers.convolution.patches import gather_taps  # noqa: PLC0415

    x = dev(host_rng.standard_normal((2, 6, 5, 2)))
    plain, with_ones = gather_taps(x, 3, 2, 1, 4, 4), gather_taps(x, 3, 2, 1, 4, 4, ones=True)
    assert plain.shape == (12, 32) and with_ones.shape == (13, 32)
    np.testing.assert_array_equal(host(with_ones[:12]), host(plain))
    np.testing.assert_array_equal(host(with_ones[12]), np.ones(32))


@pytest.mark.parametrize("through_blas", [True, False], ids=["ones-product", "reduction"])
def test_sum_rows_and_the_bias_gradient(xp, host_rng, monkeypatch, through_blas):
    """sum_rows: a product with ones while the rows fit the cache budget (NumPy), the
    reduction beyond it; both the float64 sum to float32 rounding, and the bias gradient is it."""
    from capsnet.layers.convolution import algorithm  # noqa: PLC0415

    monkeypatch.setattr(algorithm, "SUM_ROWS_BYTES", 1 << 30 if through_blas else 0)
    rows = host_rng.standard_normal((18432, 32)).astype(np.float32)
    expected = rows.astype(np.float64).sum(axis=0)
    got = host(algorithm.sum_rows(dev(rows)))
    assert got.shape == (32,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(rows).sum(axis=0).max())
    grad_y = rows.reshape(32, 24, 24, 32)
    np.testing.assert_array_equal(host(algorithm.bias_grad(dev(grad_y))), got)
    strided = rows[:, :16]  # not contiguous: the reduction, whatever the budget
    np.testing.assert_allclose(host(algorithm.sum_rows(dev(strided))), expected[:16], rtol=1e-4)


def test_cache_bytes_reads_the_os_or_says_nothing():
    from capsnet.layers.convolution.algorithm import cache_bytes  # noqa: PLC0415

    for level in (1, 2, 3):
        size = cache_bytes(level)
        assert size is None or (isinstance(size, int) and size >= 4096)
    assert cache_bytes(9) is None


def test_small_batches_take_the_channel_major_layout():
    from capsnet.layers.convolution import ConvGeometry  # noqa: PLC0415
    from capsnet.layers.convolution.im2col import layout_for  # noqa: PLC0415

    primary = ConvGeometry(1, 20, 20, 256, 256, 9, 9, 2)  # 36 patch rows at batch 1
    assert layout_for(primary) == "channels"
    assert layout_for(primary.with_batch(7)) == "channels"
    assert layout_for(primary.with_batch(8)) == "rows"
    assert layout_for(ConvGeometry(1, 20, 20, 1, 256, 9, 9)) == "taps"  # one input channel, many outputs
    assert layout_for(ConvGeometry(100, 28, 28, 1, 32, 5, 5)) == "taps"  # one input channel, few outputs
    assert layout_for(ConvGeometry(100, 28, 28, 1, 32, 5, 5), "rows") == "rows"  # pinned
    assert layout_for(ConvGeometry(8, 20, 20, 4, 4, 3, 3, groups=2)) == "channels"  # grouped: per-group products


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


F64 = "float64"


# -- grouped and depthwise convolution --------------------------------------------------------
def naive_grouped_conv2d(x, w, b, stride, padding, groups):
    """Loops over batch, output channels and output pixels; channel o sees its group's inputs."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    og = o // groups
    for bi in range(n):
        for oc in range(o):
            g = oc // og
            for i in range(oh):
                for j in range(ow):
                    patch = xpad[bi, g * cg:(g + 1) * cg, i * stride:i * stride + kh, j * stride:j * stride + kw]
                    y[bi, oc, i, j] = (patch * w[oc]).sum() + b[oc]
    return y


@pytest.mark.parametrize("groups,out,stride,padding", [(2, 4, 1, 0), (3, 6, 2, 1), (6, 6, 2, 1), (6, 12, 1, 1)],
                         ids=["2-groups", "3-groups-stride2", "depthwise-stride2", "depthwise-multiplier2"])
def test_grouped_conv2d_matches_loops_per_group(xp, host_rng, groups, out, stride, padding):
    x = host_rng.standard_normal((2, 6, 7, 6))
    w = host_rng.standard_normal((out, 6 // groups, 3, 3))
    b = host_rng.standard_normal(out)
    y = conv2d(dev(x), dev(w), dev(b), stride, padding, groups=groups)
    np.testing.assert_allclose(host(y), naive_grouped_conv2d(x, w, b, stride, padding, groups), rtol=1e-10,
                               atol=1e-12)
    # the backward against central differences of the oracle's linear map, via gradcheck below, and by
    # adjointness here: <conv(x), gy> = <x, gx> and = <w, gw> + <b, gb>
    gy = host_rng.standard_normal(y.shape)
    gx, gw, gb = conv2d_backward(dev(gy), dev(x), dev(w), stride, padding, groups=groups)
    lhs = (naive_grouped_conv2d(x, w, np.zeros(out), stride, padding, groups) * gy).sum()
    np.testing.assert_allclose((host(gx) * x).sum(), lhs, rtol=1e-10)
    np.testing.assert_allclose((host(gw) * w).sum(), lhs, rtol=1e-10)
    np.testing.assert_allclose(host(gb), gy.sum(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("groups,stride,padding", [(2, 1, 0), (4, 2, 1)], ids=["2-groups", "depthwise-stride2"])
def test_gradcheck_grouped_conv2d(xp, host_rng, groups, stride, padding):
    layer = Conv2d(4, 4, 3, stride, padding, groups=groups, dtype=F64, seed=0)
    assert layer.weight.shape == (4, 4 // groups, 3, 3)
    results = check_module(layer, dev(host_rng.standard_normal((2, 4, 6, 5))))
    assert [r.name for r in results] == ["input", "weight", "bias"]


def test_groups_one_is_the_plain_convolution_bit_for_bit(xp, host_rng):
    """groups=1 (the default) takes the unchanged path: same draws, same result to the bit."""
    layer = Conv2d(3, 5, 3, padding=1, dtype=F64, seed=3)
    explicit = Conv2d(3, 5, 3, padding=1, groups=1, dtype=F64, seed=3)
    np.testing.assert_array_equal(host(layer.weight.data), host(explicit.weight.data))
    x = dev(host_rng.standard_normal((2, 3, 6, 6)))
    y = layer.forward(x)
    direct = conv2d_nhwc(x.transpose(0, 2, 3, 1), layer.weight.data, layer.bias.data, 1, 1,
                         algorithm=layer.algorithm_for(6, 6, 2)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(host(y), host(direct))
    np.testing.assert_array_equal(host(explicit.forward(x)), host(y))


def test_depthwise_conv_keeps_dtype(xp, host_rng):
    layer = Conv2d(4, 4, 3, groups=4, seed=0)
    y = layer.forward(dev(host_rng.standard_normal((2, 4, 5, 5)).astype("float32")))
    assert y.dtype == np.float32
    g = layer.backward(dev(np.ones(y.shape, "float32")))
    assert g.dtype == layer.weight.grad.dtype == np.float32


def test_groups_errors():
    with pytest.raises(ValueError, match=r"groups=3 must divide both the input channels \(4\) and the output"):
        Conv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="groups must be an integer >= 1, got 0"):
        Conv2d(4, 4, 3, groups=0)
    assert "groups=4" in repr(Conv2d(4, 4, 3, groups=4))


F64 = "float64"


def naive_conv_transpose(x, w, b, s, p, op):
    """Every input pixel scatters its kernel-weighted values into the output."""
    n, cin, h, wd = x.shape
    _, cout, k, _ = w.shape
    ho, wo = (h - 1) * s - 2 * p + k + op, (wd - 1) * s - 2 * p + k + op
    full = np.zeros((n, cout, ho + 2 * p + k, wo + 2 * p + k))
    for bi in range(n):
        for ci in range(cin):
            for i in range(h):
                for j in range(wd):
                    full[bi, :, i * s:i * s + k, j * s:j * s + k] += x[bi, ci, i, j] * w[ci]
    y = full[:, :, p:p + ho, p:p + wo]
    return y + b[None, :, None, None]


@pytest.mark.parametrize("s,p,op", [(1, 0, 0), (2, 1, 1), (2, 0, 0), (3, 1, 2)])
def test_conv_transpose_matches_the_loop_oracle(xp, host_rng, s, p, op):
    layer = ConvTranspose2d(3, 2, 4, s, p, op, dtype=F64, seed=0)
    x = host_rng.standard_normal((2, 3, 4, 5))
    y = host(layer(dev(x)))
    np.testing.assert_allclose(y, naive_conv_transpose(x, host(layer.weight.data), host(layer.bias.data), s, p, op),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("s,p,op", [(1, 0, 0), (2, 1, 1), (2, 0, 0), (3, 2, 1)])
@pytest.mark.parametrize("batch", [1, 2])
def test_gradcheck_conv_transpose(xp, host_rng, s, p, op, batch):
    check_module(ConvTranspose2d(3, 2, 3, s, p, op, dtype=F64, seed=1), dev(host_rng.standard_normal((batch, 3, 4, 3))))


@pytest.mark.parametrize("s,p,op", [(1, 0, 0), (2, 1, 1), (2, 0, 0), (3, 2, 1)])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv_transpose_parity_with_pytorch(torch, host_rng, s, p, op, batch):
    ours = ConvTranspose2d(3, 4, 4, s, p, op, dtype=F64, seed=0)
    ref = torch.nn.ConvTranspose2d(3, 4, 4, s, p, op).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(ours.weight.data))
        ref.bias.copy_(torch.tensor(ours.bias.data))
    torch_parity(torch, ours, ref, host_rng.standard_normal((batch, 3, 5, 4)))
