"""A first run with no download: the MNIST sample installed with the package, and the
offline error that points to it."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from capsnet import evaluate as evaluate_cli, train as train_cli

TINY = ["--epochs", "1", "--train-limit", "200", "--test-limit", "100", "--batch-size", "50",
        "--conv-channels", "8", "--primary-types", "2", "--digit-dim", "4", "--decoder-hidden", "16", "32",
        "--no-progress"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no MNIST anywhere: an empty $CAPSNET_DATA_DIR and an empty cache."""
    calls = []

    def refuse(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("CAPSNET_DATA_DIR", str(tmp_path / "no-mnist"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return calls


def test_the_sample_trains_offline_and_says_it_is_not_mnist(offline, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(["--dataset", "mnist-sample", "--out", str(out), *TINY]) == 0
    log = capsys.readouterr().out
    assert "data mnist-sample: the MNIST sample installed with capsnet" in log
    assert "not the full MNIST" in log.splitlines()[0]
    assert offline == []  # not one download attempted
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "mnist-sample"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and 0.0 <= record["test_accuracy"] <= 1.0
    # the checkpoint evaluates on the sample too, still offline
    assert evaluate_cli.main([str(out / "best.npz"), "--no-progress"]) == 0
    assert "1000 mnist-sample test images" in capsys.readouterr().out
    assert offline == []


def test_offline_without_mnist_nothing_trains_and_the_error_suggests_the_sample(offline, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(["--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert offline, "the default dataset should have tried to download MNIST"
    assert "could not download" in err and "To work offline" in err
    assert "python -m capsnet.train --dataset mnist-sample" in err
    assert not (out / "checkpoint.npz").exists()


def test_the_sample_is_its_own_dataset_on_resume(offline, tmp_path, capsys):
    """A run on the sample cannot be resumed as MNIST: the dataset is part of what must match."""
    out = tmp_path / "run"
    assert train_cli.main(["--dataset", "mnist-sample", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert train_cli.main(["--dataset", "mnist", "--out", str(out), "--resume", "--epochs", "2"]) == 2
    assert "dataset" in capsys.readouterr().err
