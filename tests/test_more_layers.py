"""MaxPool2d, Dropout, BatchNorm1d/2d, ConvTranspose2d, CrossEntropyLoss, Reshape and the
baseline CNN: float64 gradient checks on every backend, slow loop oracles, PyTorch parity
(skipped without torch) and clear errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from capsnet import checks
from capsnet import train as train_cli
from capsnet.gradcheck import check_module
from capsnet.layers import (
    BatchNorm1d,
    BatchNorm2d,
    ConvTranspose2d,
    CrossEntropyLoss,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    Module,
    Reshape,
    Sequential,
)
from capsnet.models import BaselineCNN, BaselineCNNConfig, CapsNet, CapsNetConfig, n_parameters

from test_layers import dev, host

F64 = "float64"


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


@pytest.mark.parametrize("s,p,op", [(1, 0, 0), (2, 1, 1), (2, 0, 0), (3, 1, 2)])
def test_conv_transpose_matches_the_loop_oracle(xp, host_rng, s, p, op):
    layer = ConvTranspose2d(3, 2, 4, s, p, op, dtype=F64, seed=0)
    x = host_rng.standard_normal((2, 3, 4, 5))
    y = host(layer(dev(x)))
    np.testing.assert_allclose(y, naive_conv_transpose(x, host(layer.weight.data), host(layer.bias.data), s, p, op),
                               rtol=1e-12, atol=1e-12)


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


def test_cross_entropy_matches_the_formula(xp, host_rng):
    logits = host_rng.standard_normal((4, 5)) * 10
    labels = np.array([0, 4, 2, 2])
    loss = CrossEntropyLoss(label_smoothing=0.2)
    value = float(host(loss(dev(logits), dev(labels))))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    t = np.full((4, 5), 0.2 / 5)
    t[np.arange(4), labels] += 0.8
    assert value == pytest.approx(-(t * logp).sum(axis=1).mean(), rel=1e-12)
    big = float(host(CrossEntropyLoss()(dev(np.array([[1000.0, 0.0]])), dev(np.array([1])))))
    assert big == pytest.approx(1000.0)  # log-sum-exp: no overflow


# -- float64 gradient checks -----------------------------------------------------------------
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
@pytest.mark.parametrize("batch", [1, 3])
def test_gradcheck_max_pool(xp, host_rng, k, s, p, batch):
    x = host_rng.permutation(batch * 2 * 7 * 7).reshape(batch, 2, 7, 7) * 0.1  # distinct: no ties nearby
    check_module(MaxPool2d(k, s, p), dev(x.astype(np.float64)))


@pytest.mark.parametrize("s,p,op", [(1, 0, 0), (2, 1, 1), (2, 0, 0), (3, 2, 1)])
@pytest.mark.parametrize("batch", [1, 2])
def test_gradcheck_conv_transpose(xp, host_rng, s, p, op, batch):
    check_module(ConvTranspose2d(3, 2, 3, s, p, op, dtype=F64, seed=1), dev(host_rng.standard_normal((batch, 3, 4, 3))))


@pytest.mark.parametrize("shape", [(4, 3), (3, 3, 5)])
def test_gradcheck_batch_norm_1d(xp, host_rng, shape):
    layer = BatchNorm1d(3, dtype=F64)
    layer.weight.data[...] = dev(host_rng.uniform(0.5, 2, 3))
    layer.bias.data[...] = dev(host_rng.standard_normal(3))
    check_module(layer, dev(host_rng.standard_normal(shape)))


@pytest.mark.parametrize("batch", [1, 3])
def test_gradcheck_batch_norm_2d(xp, host_rng, batch):
    layer = BatchNorm2d(2, dtype=F64)
    layer.weight.data[...] = dev(host_rng.uniform(0.5, 2, 2))
    check_module(layer, dev(host_rng.standard_normal((batch, 2, 3, 3))))


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


def test_gradcheck_dropout(xp, host_rng):
    class Replay(Module):
        """Dropout drawing the same mask every call, so the function is fixed."""

        def __init__(self):
            super().__init__()
            self.drop = Dropout(0.3, seed=5)

        def forward(self, x):
            self.drop.state.data[1] = 0
            return self.drop(x)

        def backward(self, g):
            return self.drop.backward(g)

    check_module(Replay(), dev(host_rng.standard_normal((3, 4, 5))))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("batch", [1, 4])
def test_gradcheck_cross_entropy(xp, host_rng, smoothing, batch):
    labels = host_rng.integers(0, 5, batch)
    check_module(CrossEntropyLoss(smoothing), dev(host_rng.standard_normal((batch, 5))), dev(labels))


def test_gradcheck_reshape(xp, host_rng):
    check_module(Sequential(Linear(6, 12, dtype=F64, seed=0), Reshape(3, 2, 2), Flatten()),
                 dev(host_rng.standard_normal((2, 6))))


def test_gradcheck_baseline_cnn_small(xp, host_rng):
    model = BaselineCNN(BaselineCNNConfig(input_shape=(1, 6, 6), n_classes=3, channels=(2, 3), kernel=3, fc=(4,),
                                          dropout=0.0), dtype=F64, seed=0)
    x = dev(host_rng.standard_normal((2, 1, 6, 6)))
    check_module(model, x, check_input=False, n_directions=8)


def test_gradcheck_capsnet_with_the_deconv_decoder(xp, host_rng):
    model = CapsNet(input_shape=(1, 12, 12), conv_channels=4, conv_kernel=5, primary_types=2, primary_dim=4,
                    primary_kernel=5, primary_stride=2, digit_dim=4, n_classes=3, decoder="deconv", dtype=F64,
                    digit_init_std=0.3, input_grad=True, seed=0)
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    check_module(model, x, forward_kwargs={"labels": dev(np.array([0, 2]))}, n_directions=8)


# -- behaviour -------------------------------------------------------------------------------
def test_dropout_is_inverted_seeded_and_the_identity_in_eval(xp):
    x = dev(np.ones((200, 50)))
    a, b = Dropout(0.25, seed=3), Dropout(0.25, seed=3)
    ya = host(a(x))
    assert set(np.unique(ya)) == {0.0, 1 / 0.75}
    assert abs((ya == 0).mean() - 0.25) < 0.02
    np.testing.assert_array_equal(ya, host(b(x)))  # same seed, same masks
    assert not np.array_equal(ya, host(a(x)))  # the next draw differs
    a.eval()
    assert a(x) is x
    state = a.state_dict()
    c = Dropout(0.25, seed=99)
    c.load_state_dict(state)  # the seed and the draw count travel in state_dict
    b(x)
    np.testing.assert_array_equal(host(c.train()(x)), host(b(x)))


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


def test_bad_inputs_are_refused_with_clear_errors(xp, host_rng):
    with pytest.raises(ValueError, match="output_padding must be smaller than the stride"):
        ConvTranspose2d(2, 2, 3, stride=2, output_padding=2)
    with pytest.raises(ValueError, match=r"ConvTranspose2d expected input of shape \(batch, 2, any, any\)"):
        ConvTranspose2d(2, 2, 3, dtype=F64)(dev(np.zeros((1, 3, 4, 4))))
    with pytest.raises(ValueError, match="MaxPool2d expected input of shape"):
        MaxPool2d(2)(dev(np.zeros((4, 4))))
    with pytest.raises(ValueError, match="padding must be at most half the kernel"):
        MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="BatchNorm1d expected input of shape"):
        BatchNorm1d(3, dtype=F64)(dev(np.zeros((2, 4))))
    with pytest.raises(ValueError, match="BatchNorm2d expected input of shape"):
        BatchNorm2d(3, dtype=F64)(dev(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNorm1d(3, dtype=F64)(dev(np.zeros((1, 3))))
    with pytest.raises(ValueError, match=r"labels in \[0, 5\)"):
        CrossEntropyLoss()(dev(np.zeros((2, 5))), dev(np.array([1, 5])))
        checks.raise_pending()  # on CuPy the count of bad labels waits on the device until a flush
    with pytest.raises(ValueError, match=r"labels of shape \(2,\)"):
        CrossEntropyLoss()(dev(np.zeros((2, 5))), dev(np.array([1])))
    with pytest.raises(ValueError, match="Dropout p must be in"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="BaselineCNN expected input of shape"):
        BaselineCNN(BaselineCNNConfig(channels=(2,), fc=(3,)))(dev(np.zeros((1, 1, 20, 20), np.float32)))
    with pytest.raises(ValueError, match="deconv decoder needs an input height and width divisible by 4"):
        CapsNetConfig(input_shape=(1, 30, 30), decoder="deconv")


def test_the_baseline_has_the_papers_parameter_count():
    cnn, caps = BaselineCNN(), CapsNet()
    assert n_parameters(cnn) == 35_445_522  # the paper: 35.4M
    assert n_parameters(caps) == 8_215_568  # the paper: 8.2M
    assert BaselineCNN(pool=True).config.feature_size == (7, 7)


# -- PyTorch parity, float64 -------------------------------------------------------------------
def _rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="the PyTorch parity tests need torch")


def _parity(torch, ours, ref, x, targets=None, loss=False):
    """Outputs, input gradient and parameter gradients of ours against the torch module ref."""
    ref.zero_grad(set_to_none=True)
    xt = torch.tensor(x, requires_grad=True)
    if loss:
        yt = ref(xt, torch.tensor(targets))
        y = ours(x, targets)
        yt.backward()
        g = ours.backward()
        assert _rel(y, yt.detach().numpy()) < 1e-12
        assert _rel(g, xt.grad.numpy()) < 1e-6
        return
    y = ours(x)
    yt = ref(xt)
    assert _rel(y, yt.detach().numpy()) < 1e-12
    g = np.random.default_rng(0).standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    ours.zero_grad()
    assert _rel(ours.backward(g), xt.grad.numpy()) < 1e-6
    torch_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert _rel(p.grad, torch_params[name].grad.numpy()) < 1e-6, name


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
@pytest.mark.parametrize("batch", [1, 3])
def test_max_pool_parity_with_pytorch(torch, host_rng, k, s, p, batch):
    x = np.round(host_rng.standard_normal((batch, 2, 7, 8)) * 2) / 2  # with ties
    _parity(torch, MaxPool2d(k, s, p), torch.nn.MaxPool2d(k, s, p), x)


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


@pytest.mark.parametrize("s,p,op", [(1, 0, 0), (2, 1, 1), (2, 0, 0), (3, 2, 1)])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv_transpose_parity_with_pytorch(torch, host_rng, s, p, op, batch):
    ours = ConvTranspose2d(3, 4, 4, s, p, op, dtype=F64, seed=0)
    ref = torch.nn.ConvTranspose2d(3, 4, 4, s, p, op).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(ours.weight.data))
        ref.bias.copy_(torch.tensor(ours.bias.data))
    _parity(torch, ours, ref, host_rng.standard_normal((batch, 3, 5, 4)))


@pytest.mark.parametrize("kind,shape", [("1d", (5, 3)), ("1d", (4, 3, 6)), ("2d", (1, 3, 4, 4)), ("2d", (4, 3, 2, 5))])
def test_batch_norm_parity_with_pytorch_training_and_eval(torch, host_rng, kind, shape):
    ours = (BatchNorm1d if kind == "1d" else BatchNorm2d)(3, momentum=0.2, dtype=F64)
    ref = (torch.nn.BatchNorm1d if kind == "1d" else torch.nn.BatchNorm2d)(3, momentum=0.2).double()
    w = host_rng.uniform(0.5, 2, 3)
    ours.weight.data[...] = w
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
    for _ in range(2):
        _parity(torch, ours, ref, host_rng.standard_normal(shape) * 3 + 1)
    assert _rel(ours.running_mean.data, ref.running_mean.numpy()) < 1e-12
    assert _rel(ours.running_var.data, ref.running_var.numpy()) < 1e-12
    ours.eval()
    ref.eval()
    x = host_rng.standard_normal(shape)
    assert _rel(ours(x), ref(torch.tensor(x)).detach().numpy()) < 1e-12


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("batch", [1, 6])
def test_cross_entropy_parity_with_pytorch(torch, host_rng, smoothing, batch):
    logits = host_rng.standard_normal((batch, 7)) * 4
    labels = host_rng.integers(0, 7, batch)
    _parity(torch, CrossEntropyLoss(smoothing), torch.nn.CrossEntropyLoss(label_smoothing=smoothing), logits,
            labels, loss=True)


def test_dropout_parity_with_pytorch_given_the_same_mask(torch, host_rng):
    layer = Dropout(0.4, seed=1)
    x = host_rng.standard_normal((6, 5))
    y = layer(x)
    mask = layer._cache[0]  # the mask this forward drew
    xt = torch.tensor(x, requires_grad=True)
    yt = xt * torch.tensor(mask)  # inverted dropout with that mask: torch's formula
    assert _rel(y, yt.detach().numpy()) < 1e-15
    g = host_rng.standard_normal(x.shape)
    yt.backward(torch.tensor(g))
    assert _rel(layer.backward(g), xt.grad.numpy()) < 1e-15
    kept = mask[mask > 0]
    assert np.allclose(kept, 1 / 0.6)


# -- the baseline on real MNIST ----------------------------------------------------------------
SMALL_CNN = ["--model", "cnn", "--cnn-channels", "32", "32", "16", "--pool"]


@pytest.mark.slow
def test_small_baseline_cnn_reaches_95_percent_on_real_mnist(mnist_dir, tmp_path, capsys):
    """A narrow baseline (32, 32, 16 channels, 2x2 pooling, the paper's fully connected sizes
    and dropout, 2 px shifts) on 5,000 real images for 6 epochs (0.969 on the shipped subset
    with NumPy 2.4)."""
    out = tmp_path / "cnn"
    args = ["--data-dir", str(mnist_dir), "--epochs", "6", "--batch-size", "50", "--train-limit", "5000",
            "--test-limit", "1000", *SMALL_CNN, "--out", str(out), "--no-progress"]
    assert train_cli.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("BaselineCNN: ")
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_accuracy"] >= 0.95, records
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_cnn_command_line_resume_and_refusals(mnist_dir, tmp_path, capsys):
    out = tmp_path / "cnn"
    base = ["--data-dir", str(mnist_dir), "--batch-size", "50", "--train-limit", "200", "--test-limit", "100",
            *SMALL_CNN, "--no-progress"]
    assert train_cli.main([*base, "--epochs", "1", "--out", str(out)]) == 0
    assert train_cli.main(["--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert train_cli.main([*base, "--epochs", "1", "--out", str(tmp_path / "x"), "--routing", "2"]) == 2
    assert "--routing-iterations does not apply to --model cnn" in capsys.readouterr().err
    assert train_cli.main(["--data-dir", str(mnist_dir), "--dropout", "0.3", "--out", str(tmp_path / "y")]) == 2
    assert "--dropout does not apply to --model capsnet" in capsys.readouterr().err


def test_a_baseline_with_dropout_resumes_bit_exactly(mnist_dir, tmp_path):
    from capsnet.training import MNISTTrainer, TrainConfig

    cfg = TrainConfig(data_dir=str(mnist_dir), epochs=2, batch_size=50, train_limit=200, test_limit=100, arch="cnn",
                      model={**BaselineCNNConfig().as_dict(), "channels": [4, 4, 2], "fc": [16, 8], "pool": True})

    def stop(trainer, epoch, step):
        if (epoch, step) == (0, 1):
            raise KeyboardInterrupt

    straight = MNISTTrainer(cfg, tmp_path / "a", progress=False, log=False)
    straight.fit()
    with pytest.raises(KeyboardInterrupt):
        MNISTTrainer(cfg, tmp_path / "b", progress=False, log=False, on_step=stop).fit()
    resumed = MNISTTrainer(cfg, tmp_path / "b", progress=False, log=False)
    resumed.fit(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any("state" in name for name in a)  # the dropout draw counter is saved
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_capsnet_with_the_deconv_decoder_matches_the_pytorch_reference(torch, host_rng):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from torch_capsnet import TorchCapsNet
    finally:
        sys.path.pop(0)
    cfg = CapsNetConfig(conv_channels=16, primary_types=4, digit_dim=8, decoder="deconv", digit_init_std=0.1)
    ours = CapsNet(cfg, dtype=F64, seed=0)
    ref = TorchCapsNet(**cfg.__dict__, dtype=torch.float64)
    ref.load_from_capsnet(ours.state_dict())
    x = host_rng.uniform(0, 1, (3, 1, 28, 28))
    y = np.array([3, 1, 4])
    ours.train()
    ref.train()
    lengths, recon = ours(x, y)
    t_lengths, t_recon = ref(torch.tensor(x), torch.tensor(y))
    assert _rel(recon, t_recon.detach().numpy()) < 1e-12 and _rel(lengths, t_lengths.detach().numpy()) < 1e-12
    g_recon = host_rng.standard_normal(recon.shape)
    (t_recon * torch.tensor(g_recon)).sum().backward()
    ours.zero_grad()
    ours.backward(None, g_recon)
    torch_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith("decoder."):
            assert _rel(p.grad, torch_params[name].grad.numpy()) < 1e-6, name
