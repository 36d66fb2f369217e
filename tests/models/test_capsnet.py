"""capsnet.models.capsnet: the CapsNet's parameter names, dtypes and errors, predict in eval
mode, the deconvolution decoder, and the two-digit CapsNet of MultiMNIST (section 6): the
decoder once per digit masked by that digit's capsule, its loss gradient, its FLOP count."""
from __future__ import annotations

import re

import numpy as np
import pytest

from capsnet import backend
from capsnet.gradcheck import check_module
from capsnet.layers import Module
from capsnet.models import CapsNet, CapsNetConfig, CapsNetLoss, CapsNetTask

from tests.helpers import dev, host, reference, rel_error


F64 = "float64"


def small_capsnet(**overrides):
    kwargs = dict(input_shape=(1, 12, 12), conv_channels=4, conv_kernel=5, primary_types=2, primary_dim=4,
                  primary_kernel=5, primary_stride=2, digit_dim=4, n_classes=3, routing_iterations=3,
                  decoder_hidden=(6, 7), dtype=F64, seed=0)
    kwargs.update(overrides)
    return CapsNet(**kwargs)


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


def test_capsnet_wrong_dtype_input_is_refused():
    model = small_capsnet(dtype="float32")
    with pytest.raises(TypeError, match="float32.*float64"):
        model.forward(np.zeros((2, 1, 12, 12)))
    with pytest.raises(ValueError, match=re.escape("got (2, 1, 28, 28)")):
        model.forward(np.zeros((2, 1, 28, 28), np.float32))


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


F64 = "float64"


def test_gradcheck_capsnet_with_the_deconv_decoder(xp, host_rng):
    model = CapsNet(input_shape=(1, 12, 12), conv_channels=4, conv_kernel=5, primary_types=2, primary_dim=4,
                    primary_kernel=5, primary_stride=2, digit_dim=4, n_classes=3, decoder="deconv", dtype=F64,
                    digit_init_std=0.3, input_grad=True, seed=0)
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    check_module(model, x, forward_kwargs={"labels": dev(np.array([0, 2]))}, n_directions=8)


def test_capsnet_with_the_deconv_decoder_matches_the_pytorch_reference(torch, host_rng):
    TorchCapsNet = reference("torch_capsnet").TorchCapsNet
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
    assert rel_error(recon, t_recon.detach().numpy()) < 1e-12 and rel_error(lengths, t_lengths.detach().numpy()) < 1e-12
    g_recon = host_rng.standard_normal(recon.shape)
    (t_recon * torch.tensor(g_recon)).sum().backward()
    ours.zero_grad()
    ours.backward(None, g_recon)
    torch_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith("decoder."):
            assert rel_error(p.grad, torch_params[name].grad.numpy()) < 1e-6, name


PAIRS = np.array([[1, 0], [2, 1]])


def two_digit_capsnet(**overrides):
    kwargs = dict(input_shape=(1, 12, 12), conv_channels=4, conv_kernel=5, primary_types=2, primary_dim=4,
                  primary_kernel=5, primary_stride=2, digit_dim=4, n_classes=3, routing_iterations=3,
                  decoder_hidden=(6,), digit_init_std=5.0, input_grad=True, dtype="float64", seed=4, digits=2)
    kwargs.update(overrides)
    return CapsNet(**kwargs)


class TwoDigitLoss(Module):
    """forward(x) -> CapsNetLoss with fixed pairs, each digit's target fixed; backward -> dL/dx."""

    def __init__(self, model, labels, targets):
        super().__init__()
        self.model, self.labels, self.targets = model, labels, targets
        self.criterion = CapsNetLoss(recon_weight=0.05)

    def forward(self, x):
        lengths, recon = self.model.forward(x, self.labels)
        return self.criterion(lengths, recon, self.labels, self.targets)

    def backward(self, grad_out):
        return self.model.backward(*self.criterion.backward(grad_out))


def test_two_digit_total_loss_gradient(xp, host_rng):
    model = two_digit_capsnet()
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    labels = dev(PAIRS)
    targets = dev(host_rng.uniform(0, 1, (2, 2, 1, 12, 12)))
    lengths = host(model.forward(x, labels)[0])
    assert np.all(np.abs(lengths - 0.9) > 0.02) and np.all(np.abs(lengths - 0.1) > 0.02), lengths
    results = check_module(TwoDigitLoss(model, labels, targets), x, n_directions=12)
    assert len(results) == 1 + len(list(model.parameters()))


def test_decoder_runs_once_per_digit_masked_by_its_capsule(xp, host_rng):
    model = two_digit_capsnet()
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    model.eval()
    v = host(model.capsules(x))
    model.train()
    _, recon = model.forward(x, dev(PAIRS))
    assert recon.shape == (2, 2, 1, 12, 12)
    for t in range(2):
        keep = (np.arange(3)[None, :] == PAIRS[:, t][:, None])[..., None]
        expected = host(model.decode(dev(v * keep)))
        np.testing.assert_allclose(host(recon[:, t]), expected, rtol=1e-12, atol=1e-14)
    # test time: the two longest capsules, in increasing class order, whatever the labels
    model.eval()
    order = np.sort(np.argsort(np.linalg.norm(v, axis=-1), axis=1)[:, -2:], axis=1)
    _, recon_eval = model.forward(x, dev(PAIRS))
    for t in range(2):
        keep = (np.arange(3)[None, :] == order[:, t][:, None])[..., None]
        np.testing.assert_allclose(host(recon_eval[:, t]), host(model.decode(dev(v * keep))), rtol=1e-12, atol=1e-14)


def test_task_orders_the_targets_as_the_decoder_runs(xp, host_rng):
    model = two_digit_capsnet()
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    a, b = dev(host_rng.uniform(0, 1, (2, 1, 12, 12))), dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    labels = dev(np.array([[2, 0], [0, 1]]))
    model.train()
    np.testing.assert_array_equal(host(CapsNetTask.targets(model, (x, labels, a, b))), host(xp.stack([a, b], 1)))
    model.eval()
    t = host(CapsNetTask.targets(model, (x, labels, a, b)))
    np.testing.assert_array_equal(t[0], host(xp.stack([b[0], a[0]])))  # labels 2, 0: the digit of class 0 first
    np.testing.assert_array_equal(t[1], host(xp.stack([a[1], b[1]])))
    with pytest.raises(ValueError, match="then the 2 digits alone"):
        CapsNetTask().forward(model, (x, labels, a))


def test_routing_coefficients_sum_to_one_over_classes(xp, host_rng):
    model = two_digit_capsnet(digits=1)
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    v, c = model.routing(x)
    assert c.shape == (2, model.config.n_primary_caps, 3)
    np.testing.assert_allclose(host(c).sum(axis=-1), 1, rtol=1e-12)
    model.eval()
    np.testing.assert_allclose(host(v), host(model.capsules(x)), rtol=1e-12)


def test_config_refuses_more_digits_than_classes():
    with pytest.raises(ValueError, match="digits must be an integer in"):
        CapsNet(n_classes=3, digits=4)


def test_dataset_option_checks_the_model_input():
    from capsnet.training import TrainConfig  # noqa: PLC0415

    cfg = TrainConfig(dataset="multimnist")
    assert cfg.max_shift == 4 and cfg.model["input_shape"] == [1, 36, 36] and cfg.model["digits"] == 2
    assert TrainConfig(dataset="expanded").max_shift == 6
    with pytest.raises(ValueError, match="CapsNet only"):
        TrainConfig(dataset="multimnist", arch="cnn")
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 40, 40\), but the model is configured for \(1, 28, 28\)"):
        TrainConfig(dataset="expanded", model={"input_shape": [1, 28, 28]}).validate()
    with pytest.raises(ValueError, match="at most 6 px"):
        TrainConfig(dataset="expanded", max_shift=7).validate()


def test_flop_count_runs_the_decoder_once_per_digit():
    from capsnet.models import CapsNetConfig  # noqa: PLC0415
    from capsnet.models.capsnet import flops_per_image  # noqa: PLC0415

    one, two = CapsNetConfig(input_shape=(1, 36, 36)), CapsNetConfig(input_shape=(1, 36, 36), digits=2)
    decoder = 160 * 512 + 512 * 1024 + 1024 * 36 * 36  # multiply-adds of one run
    # forward once, then the weight and input gradients: 3 products, 2 flops per multiply-add
    assert flops_per_image(two) - flops_per_image(one) == 2 * 3 * decoder
    assert flops_per_image(two, training=False) - flops_per_image(one, training=False) == 2 * decoder
