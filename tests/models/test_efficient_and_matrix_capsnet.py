"""EfficientCapsNet and MatrixCapsNet: sizes, whole-model float64 gradient checks, float64 parity
with the PyTorch references (outputs, losses, every gradient), and the command lines
(``--model efficient|em``: training, resume, evaluate) on real MNIST images."""
from __future__ import annotations

import json

import numpy as np
import pytest

from capsnet import backend, evaluate as evaluate_cli, train as train_cli
from capsnet.data import load_mnist, to_float
from capsnet.gradcheck import check_module
from capsnet.models import (
    CapsNetLoss,
    EfficientCapsNet,
    EfficientCapsNetConfig,
    MatrixCapsNet,
    MatrixCapsNetConfig,
    n_parameters,
)
from capsnet.training import load_model
from capsnet.training.run import TrainConfig

from tests.helpers import dev, reference


F64 = "float64"


TINY_EFFICIENT = dict(input_shape=(1, 12, 12), conv_channels=(4, 6, 8), conv_kernels=(3, 3, 3),
                      conv_strides=(1, 1, 2), primary_caps=4, primary_dim=2, digit_dim=3, n_classes=3,
                      decoder_hidden=(5,))


TINY_EM = dict(input_shape=(1, 14, 14), conv_channels=4, primary_types=2, caps1=2, caps2=3, n_classes=3,
               kernel_size=2, inverse_temperature=0.1)


@pytest.fixture(scope="module")
def images(mnist_dir):
    data = load_mnist(mnist_dir, download=False, progress=False)
    return to_float(data.train_images[:4], F64, xp=np), data.train_labels[:4].astype(np.int64)


def test_sizes():
    assert n_parameters(EfficientCapsNet()) - n_parameters(EfficientCapsNet().decoder) == 161_824  # the paper's 161K
    assert EfficientCapsNetConfig().feature_size == (9, 9)
    assert MatrixCapsNetConfig().feature_sizes == ((12, 12), (5, 5), (3, 3))
    paper = MatrixCapsNetConfig.paper_small()
    assert (paper.conv_channels, paper.primary_types, paper.caps1, paper.caps2) == (64, 8, 16, 16)
    assert n_parameters(MatrixCapsNet(MatrixCapsNetConfig.paper())) == 318_964  # A = B = C = D = 32, the paper's ~310K
    with pytest.raises(ValueError, match="primary_caps \\* primary_dim must equal the last convolution's channels"):
        EfficientCapsNetConfig(primary_caps=10)


def test_gradcheck_efficient_capsnet(xp, host_rng):
    model = EfficientCapsNet(dtype=F64, seed=0, **TINY_EFFICIENT)
    x = dev(host_rng.uniform(0, 1, (3, 1, 12, 12)))
    labels = dev(np.array([0, 2, 1]))
    results = check_module(model, x, forward_kwargs={"labels": labels}, check_input=False, n_directions=6)
    assert {r.name for r in results} == {n for n, _ in model.named_parameters()}


def test_gradcheck_matrix_capsnet(xp, host_rng):
    model = MatrixCapsNet(dtype=F64, seed=0, **TINY_EM)
    x = dev(host_rng.uniform(0, 1, (2, 1, 14, 14)))
    results = check_module(model, x, check_input=False, n_directions=6)
    assert {r.name for r in results} == {n for n, _ in model.named_parameters()}


@pytest.fixture
def torch_refs(torch):
    return torch, reference("torch_efficient_capsnet"), reference("torch_matrix_capsnet")


def _close(ours, theirs, what):
    t = theirs.detach().numpy()
    np.testing.assert_allclose(backend.to_numpy(ours), t, rtol=1e-7, atol=1e-10 * max(1.0, float(np.abs(t).max())),
                               err_msg=what)


def test_torch_parity_efficient_capsnet(torch_refs, images):
    """The paper-sized network on real MNIST images: lengths, reconstructions, both losses, every gradient."""
    torch, ref_mod, _ = torch_refs
    x, y = images
    with backend.use("numpy"):
        ours = EfficientCapsNet(dtype=F64, seed=0)
        ref = ref_mod.TorchEfficientCapsNet(dtype=torch.float64)
        ref.load_from_capsnet(ours.state_dict())
        crit = CapsNetLoss()
        lengths, recon = ours(x, y)
        loss = crit(lengths, recon, y, x)
        ours.backward(*crit.backward())
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    t_lengths, t_recon = ref(tx, ty)
    t_loss = reference("torch_capsnet").total_loss(t_lengths, t_recon, ty, tx)  # CapsNetLoss's reference
    t_loss.backward()
    _close(lengths, t_lengths, "lengths")
    _close(recon, t_recon, "reconstructions")
    _close(loss, t_loss, "loss")
    t_params = ref._names()
    for name, p in ours.named_parameters():
        _close(p.grad, t_params[name].grad, f"gradient of {name}")
    for name, b in ours.named_buffers():  # the batch statistics moved the running ones alike
        _close(b.data, t_params[name], name)


def test_torch_parity_matrix_capsnet(torch_refs, images):
    """The default (small) network on real MNIST images: class activations, spread loss, every gradient."""
    torch, _, ref_mod = torch_refs
    from capsnet.layers import SpreadLoss  # noqa: PLC0415

    x, y = images
    with backend.use("numpy"):
        ours = MatrixCapsNet(dtype=F64, seed=0)
        ref = ref_mod.TorchMatrixCapsNet(dtype=torch.float64)
        ref.load_from_capsnet(ours.state_dict())
        crit = SpreadLoss(0.5)
        a = ours(x)
        loss = crit(a, y)
        ours.backward(crit.backward())
    t_a = ref(torch.from_numpy(x))
    t_loss = ref_mod.spread_loss(t_a, torch.from_numpy(y), 0.5)
    t_loss.backward()
    assert float(loss) > 0
    _close(a, t_a, "class activations")
    _close(loss, t_loss, "spread loss")
    t_params = dict(ref.named_parameters())
    renamed = {"primary.conv.weight": "primary.weight", "primary.conv.bias": "primary.bias",
               "classes.weight": "classes.weight"}
    for name, p in ours.named_parameters():
        _close(p.grad, t_params[renamed.get(name, name)].grad, f"gradient of {name}")


# -- the command lines ------------------------------------------------------------------------------------
def test_arch_defaults_and_flags():
    args = train_cli.build_parser().parse_args(["--model", "em", "--caps1", "4"])
    cfg = train_cli.config_from_args(args, TrainConfig())
    assert (cfg.arch, cfg.lr, cfg.batch_size, cfg.model["caps1"]) == ("em", 3e-3, 32, 4)
    args = train_cli.build_parser().parse_args(["--model", "efficient", "--lr", "1e-3"])
    cfg = train_cli.config_from_args(args, TrainConfig())
    assert (cfg.lr, cfg.lr_decay, cfg.lr_min, cfg.batch_size) == (1e-3, 0.97, 5e-5, 16)  # the authors' config.json
    with pytest.raises(ValueError, match="--caps1 does not apply to --model capsnet"):
        train_cli.config_from_args(train_cli.build_parser().parse_args(["--caps1", "4"]), TrainConfig())
    with pytest.raises(ValueError, match="--digit-dim does not apply to --model em"):
        train_cli.config_from_args(train_cli.build_parser().parse_args(["--model", "em", "--digit-dim", "4"]),
                                   TrainConfig())


@pytest.mark.parametrize("model_args", [["--model", "em", "--conv-channels", "8", "--primary-types", "4",
                                         "--caps1", "4", "--caps2", "4"],
                                        ["--model", "efficient", "--decoder-hidden", "16"]], ids=["em", "efficient"])
def test_train_resume_and_evaluate_command_lines(mnist_dir, tmp_path, capsys, model_args):
    out = tmp_path / "run"
    args = ["--data-dir", str(mnist_dir), "--epochs", "1", "--batch-size", "32", "--train-limit", "64",
            "--test-limit", "32", "--out", str(out), "--no-progress", *model_args]
    assert train_cli.main(args) == 0
    assert train_cli.main(["--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert evaluate_cli.main([str(out / "best.npz"), "--data-dir", str(mnist_dir), "--test-limit", "32",
                              "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    assert np.array(json.loads((tmp_path / "e.json").read_text())["confusion"]).sum() == 32
    model, header = load_model(out / "checkpoint.npz")
    assert type(model) is (MatrixCapsNet if "em" in model_args else EfficientCapsNet) and header["epoch"] == 2
