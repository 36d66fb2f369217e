"""capsnet.layers.norm: BatchNorm1d/2d against the formula, float64 gradient checks in
training and eval mode, running statistics, PyTorch parity."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet.gradcheck import check_module
from capsnet.layers import BatchNorm1d, BatchNorm2d

from tests.helpers import dev, host, rel_error, torch_parity


F64 = "float64"


def test_batch_norm_matches_the_formula(xp, host_rng):
    x = host_rng.standard_normal((5, 3, 4, 2)) * 3 + 1
    layer = BatchNorm2d(3, dtype=F64)
    layer.weight.data[...] = dev(np.array([1.5, -0.5, 2.0]))
    y = host(layer(dev(x)))
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * np.array([1.5, -0.5, 2.0])[None, :, None, None],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(layer.running_mean.data), 0.1 * mean.ravel(), rtol=1e-12)
    n = 5 * 4 * 2
    np.testing.assert_allclose(host(layer.running_var.data), 0.9 + 0.1 * var.ravel() * n / (n - 1), rtol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3), (3, 3, 5)])
def test_gradcheck_batch_norm_1d(xp, host_rng, shape):
    layer = BatchNorm1d(3, dtype=F64)
    layer.weight.data[...] = dev(host_rng.uniform(0.5, 2, 3))
    layer.bias.data[...] = dev(host_rng.standard_normal(3))
    check_module(layer, dev(host_rng.standard_normal(shape)))


def _in_layout(x: np.ndarray, layout: str):
    """x (B, C, H, W) on the device, in NCHW memory or as the NCHW view of channels-last
    memory that the convolutions return (BatchNorm2d's row path)."""
    if layout == "nchw":
        return dev(x)
    return dev(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gradcheck_batch_norm_2d(xp, host_rng, batch, layout):
    layer = BatchNorm2d(2, dtype=F64)
    layer.weight.data[...] = dev(host_rng.uniform(0.5, 2, 2))
    check_module(layer, _in_layout(host_rng.standard_normal((batch, 2, 3, 3)), layout))


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_input_gives_the_nchw_result_and_stays_channels_last(xp, host_rng, training):
    """The row path for channels-last memory (the convolutions' output) computes what the
    generic path computes, in both modes, and returns channels-last arrays."""
    from capsnet.layers.norm import batch_norm, batch_norm_backward

    x = host_rng.standard_normal((3, 4, 5, 2)) * 2 + 1
    g = host_rng.standard_normal((3, 4, 5, 2))
    w, b = dev(host_rng.uniform(0.5, 2, 4)), dev(host_rng.standard_normal(4))
    stats = (None, None) if training else (dev(host_rng.standard_normal(4)), dev(host_rng.uniform(0.5, 2, 4)))
    results = []
    for layout in ("nchw", "channels_last"):
        y, saved = batch_norm(_in_layout(x, layout), w, b, 1e-5, *stats)
        grads = batch_norm_backward(_in_layout(g, layout), saved, w, batch_statistics=training)
        results.append((y, *saved[:2], *grads))
        if layout == "channels_last":
            assert y.transpose(0, 2, 3, 1).flags.c_contiguous
            assert grads[0].transpose(0, 2, 3, 1).flags.c_contiguous
    for generic, rows in zip(*results):
        np.testing.assert_allclose(host(rows), host(generic), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_forward_is_the_folded_affine_map_of_the_formula(xp, host_rng, layout):
    """Evaluation runs batch_norm_inference (x scale + shift): the formula's values in
    float64, within float32 rounding of them in float32, in the input's layout, with
    nothing kept for a backward (which then refuses)."""
    from capsnet.layers.norm import batch_norm

    x = host_rng.standard_normal((3, 4, 5, 2)) * 2 + 1
    layer = BatchNorm2d(4, dtype=F64)
    layer.weight.data[...] = dev(host_rng.uniform(-2, 2, 4))
    layer.bias.data[...] = dev(host_rng.standard_normal(4))
    layer.running_mean.data[...] = dev(host_rng.standard_normal(4))
    layer.running_var.data[...] = dev(host_rng.uniform(0.5, 2, 4))
    layer.eval()
    y = layer(_in_layout(x, layout))
    stats = (layer.running_mean.data, layer.running_var.data)
    expected = host(batch_norm(dev(x), layer.weight.data, layer.bias.data, 1e-5, *stats)[0])
    np.testing.assert_allclose(host(y), expected, rtol=1e-12, atol=1e-12)
    assert (y.transpose(0, 2, 3, 1) if layout == "channels_last" else y).flags.c_contiguous
    with pytest.raises(RuntimeError, match="without a cached forward"):
        layer.backward(y)
    single = BatchNorm2d(4, dtype="float32")
    single.load_state_dict({k: host(v).astype(np.float32) for k, v in layer.state_dict().items()})
    single.eval()
    y32 = host(single(_in_layout(x.astype(np.float32), layout)))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, expected, rtol=1e-5, atol=1e-5)


def test_per_channel_operations_are_numpys_broadcasting_bit_for_bit(xp, host_rng):
    """_per_channel reshapes k rows into one long row against the vector tiled k times (NumPy)
    and leaves a tail of rows to plain broadcasting: the same bits as rows op vector."""
    from capsnet.layers.norm import _ROW_BLOCK, _per_channel

    for n, c in ((3 * _ROW_BLOCK // 64 + 5, 64), (2 * _ROW_BLOCK // 32, 32), (7, 5), (40_000, 3)):
        rows = dev(host_rng.standard_normal((n, c)).astype(np.float32))
        vector = dev(host_rng.standard_normal(c).astype(np.float32))
        for op in (xp.add, xp.subtract, xp.multiply):
            np.testing.assert_array_equal(host(_per_channel(op, rows, vector)), host(op(rows, vector)))
        held = rows.copy()
        assert _per_channel(xp.multiply, held, vector, out=held) is held
        np.testing.assert_array_equal(host(held), host(rows * vector))


@pytest.mark.parametrize("training", [True, False])
def test_large_channels_last_batches_give_the_generic_results(xp, host_rng, training):
    """Batches large enough for the blocked per-channel operations and the BLAS column sums:
    forward and backward equal the generic NCHW path's in float64."""
    from capsnet.layers.norm import batch_norm, batch_norm_backward

    x = host_rng.standard_normal((12, 16, 15, 13)) * 3 + 2  # 2,340 rows of 16: blocks of 1,024 and a tail
    g = host_rng.standard_normal(x.shape)
    w, b = dev(host_rng.uniform(0.5, 2, 16)), dev(host_rng.standard_normal(16))
    stats = (None, None) if training else (dev(host_rng.standard_normal(16)), dev(host_rng.uniform(0.5, 2, 16)))
    results = []
    for layout in ("nchw", "channels_last"):
        y, saved = batch_norm(_in_layout(x, layout), w, b, 1e-5, *stats)
        results.append((y, *saved, *batch_norm_backward(_in_layout(g, layout), saved, w, batch_statistics=training)))
    for generic, rows in zip(*results):
        np.testing.assert_allclose(host(rows), host(generic), rtol=1e-11, atol=1e-11)


def test_channels_last_statistics_keep_float32_accuracy(xp, host_rng):
    """Sums over a large float32 batch (per image, then over the batch) stay within a few
    float32 ulps of the float64 statistics, for values far from zero mean."""
    from capsnet.layers.norm import batch_norm

    x = (host_rng.standard_normal((64, 3, 24, 24)) * 0.1 + 100).astype(np.float32)
    one, zero = dev(np.ones(3, np.float32)), dev(np.zeros(3, np.float32))
    _, saved = batch_norm(_in_layout(x, "channels_last"), one, zero)
    np.testing.assert_allclose(host(saved[2]), x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(host(saved[3]), x.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-3)


def test_gradcheck_batch_norm_in_eval_mode(xp, host_rng):
    """With the running statistics (eval), the mean and variance are constants."""
    from capsnet.gradcheck import check_gradient
    from capsnet.layers.norm import batch_norm, batch_norm_backward

    layer = BatchNorm2d(2, dtype=F64)
    layer(dev(host_rng.standard_normal((4, 2, 3, 3)) + 2))  # some running statistics
    x = dev(host_rng.standard_normal((3, 2, 3, 3)))
    g = dev(host_rng.standard_normal((3, 2, 3, 3)))
    stats = (layer.running_mean.data, layer.running_var.data)

    def f():
        return (batch_norm(x, layer.weight.data, layer.bias.data, 1e-5, *stats)[0] * g).sum()

    _, saved = batch_norm(x, layer.weight.data, layer.bias.data, 1e-5, *stats)
    gx, gw, gb = batch_norm_backward(g, saved, layer.weight.data, batch_statistics=False)
    check_gradient(f, x, gx, name="x")
    check_gradient(f, layer.weight.data, gw, name="weight")
    check_gradient(f, layer.bias.data, gb, name="bias")


def test_batch_norm_eval_uses_running_statistics_and_they_are_in_state_dict(xp, host_rng):
    layer = BatchNorm1d(3, momentum=0.5, dtype=F64)
    for _ in range(3):
        layer(dev(host_rng.standard_normal((8, 3)) * 2 + 5))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var"}
    assert np.all(np.abs(state["running_mean"] - 5) < 2)
    layer.eval()
    x = host_rng.standard_normal((1, 3))  # a batch of one is fine in eval mode
    y = host(layer(dev(x)))
    np.testing.assert_allclose(y, (x - state["running_mean"]) / np.sqrt(state["running_var"] + 1e-5), rtol=1e-12)
    other = BatchNorm1d(3, dtype=F64)
    other.load_state_dict(state)
    other.eval()
    np.testing.assert_array_equal(host(other(dev(x))), y)


@pytest.mark.parametrize("kind,shape", [("1d", (5, 3)), ("1d", (4, 3, 6)), ("2d", (1, 3, 4, 4)), ("2d", (4, 3, 2, 5))])
def test_batch_norm_parity_with_pytorch_training_and_eval(torch, host_rng, kind, shape):
    ours = (BatchNorm1d if kind == "1d" else BatchNorm2d)(3, momentum=0.2, dtype=F64)
    ref = (torch.nn.BatchNorm1d if kind == "1d" else torch.nn.BatchNorm2d)(3, momentum=0.2).double()
    w = host_rng.uniform(0.5, 2, 3)
    ours.weight.data[...] = w
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
    for _ in range(2):
        torch_parity(torch, ours, ref, host_rng.standard_normal(shape) * 3 + 1)
    assert rel_error(ours.running_mean.data, ref.running_mean.numpy()) < 1e-12
    assert rel_error(ours.running_var.data, ref.running_var.numpy()) < 1e-12
    ours.eval()
    ref.eval()
    x = host_rng.standard_normal(shape)
    assert rel_error(ours(x), ref(torch.tensor(x)).detach().numpy()) < 1e-12


@pytest.mark.parametrize("algorithm", ["im2col", "winograd4"])
@pytest.mark.parametrize("bias", [True, False])
def test_evaluation_folds_batch_norm_into_the_convolution_before_it(xp, host_rng, monkeypatch, algorithm, bias):
    """In a Sequential in eval mode, Conv2d -> BatchNorm2d runs as one convolution with
    weights w scale and bias b scale + shift: the layer-by-layer values (float64), without
    calling the batch norm, following every change of the weights or statistics; training
    runs both layers as before."""
    from capsnet.layers import Conv2d, ReLU, Sequential

    conv = Conv2d(3, 4, 3, bias=bias, algorithm=algorithm, dtype=F64, seed=0)
    bn = BatchNorm2d(4, dtype=F64)
    net = Sequential(conv, bn, ReLU())
    x = dev(host_rng.standard_normal((2, 3, 8, 7)))
    net(x)  # training: the batch norm runs and its running statistics move
    assert float(host(bn.running_mean.data).std()) > 0
    bn.weight.data[...] = dev(host_rng.uniform(-2, 2, 4))
    bn.bias.data[...] = dev(host_rng.standard_normal(4))
    net.eval()

    def layer_by_layer():
        h = x
        for layer in net:
            h = layer(h)
        return host(h)

    expected = layer_by_layer()
    calls = []
    monkeypatch.setattr(BatchNorm2d, "forward", lambda self, h: calls.append(h) or 1 / 0)
    np.testing.assert_allclose(host(net(x)), expected, rtol=1e-12, atol=1e-12)
    assert calls == []  # folded: the batch norm's forward never ran
    conv.weight.data[...] *= 0.5  # in place, as an optimizer step: the folded weights follow
    bn.running_var.data[...] = dev(host_rng.uniform(0.5, 2, 4))
    monkeypatch.undo()
    expected = layer_by_layer()
    np.testing.assert_allclose(host(net(x)), expected, rtol=1e-12, atol=1e-12)


def test_a_batch_norm_whose_forward_is_replaced_is_not_folded(xp, host_rng):
    from capsnet.layers import Conv2d, Sequential

    class Shifted(BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1

    conv, bn = Conv2d(2, 3, 3, dtype=F64, seed=0), Shifted(3, dtype=F64)
    net = Sequential(conv, bn).eval()
    assert conv.folded_with(bn) is None
    assert conv.folded_with(BatchNorm2d(4, dtype=F64).eval()) is None  # other channels
    x = dev(host_rng.standard_normal((1, 2, 5, 5)))
    np.testing.assert_allclose(host(net(x)), host(bn(conv(x))), rtol=1e-12)
    conv.train()
    assert conv.folded_with(BatchNorm2d(3, dtype=F64).eval()) is None  # training
