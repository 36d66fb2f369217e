"""capsnet.models.baseline: the baseline CNN's float64 gradient check, the paper's parameter
count, a resume with dropout that is bit-exact, and a small baseline reaching 95% on real MNIST."""
from __future__ import annotations

import json

import numpy as np
import pytest

from capsnet import train as train_cli
from capsnet.gradcheck import check_module
from capsnet.models import BaselineCNN, BaselineCNNConfig, CapsNet, n_parameters

from tests.helpers import dev


F64 = "float64"


def test_gradcheck_baseline_cnn_small(xp, host_rng):
    model = BaselineCNN(BaselineCNNConfig(input_shape=(1, 6, 6), n_classes=3, channels=(2, 3), kernel=3, fc=(4,),
                                          dropout=0.0), dtype=F64, seed=0)
    x = dev(host_rng.standard_normal((2, 1, 6, 6)))
    check_module(model, x, check_input=False, n_directions=8)


def test_the_baseline_has_the_papers_parameter_count():
    cnn, caps = BaselineCNN(), CapsNet()
    assert n_parameters(cnn) == 35_445_522  # the paper: 35.4M
    assert n_parameters(caps) == 8_215_568  # the paper: 8.2M
    assert BaselineCNN(pool=True).config.feature_size == (7, 7)


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


def test_a_baseline_with_dropout_resumes_bit_exactly(mnist_dir, tmp_path):
    from capsnet.training import RunTrainer, TrainConfig

    cfg = TrainConfig(data_dir=str(mnist_dir), epochs=2, batch_size=50, train_limit=200, test_limit=100, arch="cnn",
                      model={**BaselineCNNConfig().as_dict(), "channels": [4, 4, 2], "fc": [16, 8], "pool": True})

    def stop(trainer, epoch, step):
        if (epoch, step) == (0, 1):
            raise KeyboardInterrupt

    straight = RunTrainer(cfg, tmp_path / "a", progress=False, log=False)
    straight.fit()
    with pytest.raises(KeyboardInterrupt):
        RunTrainer(cfg, tmp_path / "b", progress=False, log=False, on_step=stop).fit()
    resumed = RunTrainer(cfg, tmp_path / "b", progress=False, log=False)
    resumed.fit(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any("state" in name for name in a)  # the dropout draw counter is saved
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
