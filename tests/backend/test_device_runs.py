"""End to end on the cupy backend: the training command and its resume, the tools that read
a checkpoint written on the device, MultiMNIST, the baseline CNN and a custom model.

These run wherever the cupy backend does: on a CUDA device, or on the emulated one
(``CAPSNET_EMULATE_CUPY=1``, a step of .ci/run), and skip elsewhere.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from capsnet import backend, evaluate as evaluate_cli, train as train_cli
from capsnet.data import ArrayDataset, load_mnist, random_shift, to_float
from capsnet.layers import Conv2d, Flatten, Linear, MarginLoss, ReLU, Sequential, Sigmoid
from capsnet.optim import Adam
from capsnet.training import RunTrainer, TrainConfig, Trainer, load_checkpoint, load_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.cupy_available(),
                                 reason="the cupy backend needs CuPy and a CUDA device, or CAPSNET_EMULATE_CUPY=1")]

TINY = ["--conv-channels", "8", "--primary-types", "2", "--primary-dim", "4", "--digit-dim", "4",
        "--decoder-hidden", "16", "32", "--digit-init-std", "0.05"]


def cli_args(mnist_dir, out, *extra):
    return ["--backend", "cupy", "--data-dir", str(mnist_dir), "--epochs", "2", "--batch-size", "50",
            "--train-limit", "200", "--test-limit", "100", "--log-every", "2", *TINY, "--out", str(out),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def device_run(mnist_dir, tmp_path_factory):
    """A tiny CapsNet trained two epochs by ``python -m capsnet.train --backend cupy``."""
    out = tmp_path_factory.mktemp("device") / "run"
    assert train_cli.main(cli_args(mnist_dir, out)) == 0
    return out


def test_the_command_line_trains_on_the_device_and_says_which(device_run, mnist_dir, tmp_path, capsys):
    config = json.loads((device_run / "config.json").read_text())
    assert config["backend"] == "cupy" and config["device"] == backend.describe_device("cupy")
    header, state, _ = load_checkpoint(device_run / "checkpoint.npz")
    assert header["epoch"] == 2 and all(isinstance(a, np.ndarray) and np.isfinite(a).all() for a in state.values())
    records = [json.loads(line) for line in (device_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["test_accuracy"] > 0.1
    capsys.readouterr()
    assert train_cli.main(cli_args(mnist_dir, tmp_path / "again", "--epochs", "1")) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"device: {backend.describe_device('cupy')}" in first
    if backend.is_emulated():
        assert "EMULATED" in first


@pytest.mark.parametrize("stop_at", [(0, 1), (1, 2)])
def test_an_interrupted_device_run_resumes_to_the_same_weights(device_run, mnist_dir, tmp_path, stop_at):
    cfg = train_cli.config_from_args(train_cli.build_parser().parse_args(cli_args(mnist_dir, tmp_path / "cut")),
                                     TrainConfig())

    def interrupt(trainer, epoch, step):
        if (epoch, step) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RunTrainer(cfg, tmp_path / "cut", progress=False, log=False, on_step=interrupt).fit()
    assert train_cli.main(cli_args(mnist_dir, tmp_path / "cut", "--resume")) == 0
    straight = load_checkpoint(device_run / "checkpoint.npz")[1]
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoint.npz")[1]
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)


def test_evaluate_export_visualize_and_robustness_read_a_device_checkpoint(device_run, mnist_dir, tmp_path):
    checkpoint = str(device_run / "checkpoint.npz")
    for where in ("cupy", "numpy"):
        out = tmp_path / f"eval-{where}.json"
        assert evaluate_cli.main([checkpoint, "--backend", where, "--data-dir", str(mnist_dir), "--test-limit", "100",
                                  "--json", str(out), "--no-progress"]) == 0
        result = json.loads(out.read_text())
        assert result["n"] == 100
    on_device = json.loads((tmp_path / "eval-cupy.json").read_text())
    on_host = json.loads((tmp_path / "eval-numpy.json").read_text())
    assert on_device["accuracy"] == pytest.approx(on_host["accuracy"], abs=0.011)  # one image's rounding at most
    model, _ = load_model(checkpoint, "cupy")
    assert backend.backend_of(model.conv1.weight.data) == "cupy"

    if importlib.util.find_spec("safetensors") is not None:
        from capsnet import export  # noqa: PLC0415
        from capsnet.models import CapsNet  # noqa: PLC0415

        assert export.main([checkpoint, str(tmp_path / "w.safetensors")]) == 0
        back = CapsNet.from_safetensors(tmp_path / "w.safetensors")
        np.testing.assert_array_equal(backend.to_numpy(back.digit.weight.data),
                                      load_checkpoint(checkpoint)[1]["digit.weight"])
    if importlib.util.find_spec("matplotlib") is not None:
        from capsnet import robustness, visualize  # noqa: PLC0415

        for figure in ("reconstructions", "perturbation", "routing", "confusion"):
            png = tmp_path / f"{figure}.png"
            assert visualize.main([figure, checkpoint, "--backend", "cupy", "--data-dir", str(mnist_dir),
                                   "--out", str(png)]) == 0, figure
            assert png.stat().st_size > 1000
        assert robustness.main([checkpoint, "--backend", "cupy", "--out", str(tmp_path / "rob"), "--data-dir",
                                str(mnist_dir), "--test-limit", "50", "--no-progress"]) == 0
        table = json.loads((tmp_path / "rob" / "robustness.json").read_text())
        assert 0 <= table["runs"][0]["mixed"] <= 1


def test_multimnist_and_the_baseline_cnn_train_on_the_device(mnist_dir, tmp_path):
    common = dict(data_dir=str(mnist_dir), backend="cupy", epochs=1, batch_size=50, test_limit=60)
    multi = RunTrainer(TrainConfig(dataset="multimnist", train_limit=150, test_pairs=1,
                                     model={"conv_channels": 8, "primary_types": 2, "decoder_hidden": [16, 32]},
                                     **common), tmp_path / "multi", progress=False, log=False).fit()
    assert np.isfinite(multi[-1]["train_loss"]) and 0 <= multi[-1]["test_error"] <= 1
    cnn = RunTrainer(TrainConfig(arch="cnn", train_limit=150, model={"channels": [4, 4, 2], "fc": [16, 8],
                                                                       "pool": True}, **common),
                       tmp_path / "cnn", progress=False, log=False).fit()
    assert np.isfinite(cnn[-1]["train_loss"]) and 0 <= cnn[-1]["test_accuracy"] <= 1


def test_a_custom_model_trains_through_the_trainer_on_the_device(mnist_dir, tmp_path):
    data = load_mnist(mnist_dir, download=False, progress=False)
    with backend.use("cupy") as cp:
        rng = np.random.default_rng(0)
        model = Sequential(Conv2d(1, 8, 5, stride=3, seed=rng), ReLU(), Flatten(), Linear(8 * 8 * 8, 10, seed=rng),
                           Sigmoid())
        train = ArrayDataset(cp.asarray(to_float(data.train_images[:300])), cp.asarray(data.train_labels[:300]),
                             augment=lambda x, g: random_shift(x, 2, g))
        test = ArrayDataset(cp.asarray(to_float(data.test_images[:100])), cp.asarray(data.test_labels[:100]))
    optimizer = Adam(model.parameters(), lr=3e-3)
    history = Trainer(model, MarginLoss(), optimizer, train, tmp_path / "run", epochs=2, batch_size=50,
                      eval_data=test, progress=False, log=False).fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert backend.backend_of(model.parameters()[0].data) == "cupy"
