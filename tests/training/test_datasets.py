"""The dataset registry (capsnet.training.datasets): the built-in entries say what the
old switchboard said, and a fourth dataset registered in one place trains, resumes its
checks and evaluates through ``python -m capsnet.train``, ``capsnet.evaluate`` and
RunTrainer with nothing else changed."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from functools import partial

import numpy as np
import pytest

from capsnet import backend
from capsnet import evaluate as evaluate_cli, train as train_cli
from capsnet.data import both_right, load_mnist_sample
from capsnet.training import RunTrainer, TrainConfig, count_correct, load_checkpoint, train_config_of
from capsnet.training import datasets
from capsnet.training.datasets import DATASETS, DatasetSpec, dataset, digit_source, pair_errors, register, unregister
from capsnet.training.run import data_sources, describe_dataset, load_data, run_metrics

TINY = ["--epochs", "1", "--train-limit", "200", "--test-limit", "100", "--batch-size", "50",
        "--conv-channels", "8", "--primary-types", "2", "--digit-dim", "4", "--decoder-hidden", "16", "32",
        "--no-progress"]


def test_the_built_in_datasets_are_what_the_switchboard_said():
    table = {name: (spec.input_shape, spec.max_shift, spec.shift_limit, spec.digits, spec.archs, spec.test_pairs)
             for name, spec in DATASETS.items()}
    assert table == {"mnist": ((1, 28, 28), 2, None, 1, None, False),
                     "expanded": ((1, 40, 40), 6, 6, 1, None, False),
                     "multimnist": ((1, 36, 36), 4, 4, 2, ("capsnet",), True),
                     "mnist-sample": ((1, 28, 28), 2, None, 1, None, False),
                     "fashion-mnist": ((1, 28, 28), 2, None, 1, None, False),
                     "cifar10": ((3, 24, 24), 0, 0, 1, None, False),
                     "svhn": ((3, 32, 32), 2, None, 1, None, False),
                     "smallnorb": ((2, 32, 32), 0, 0, 1, None, False)}
    assert run_metrics(TrainConfig()) == {"accuracy": count_correct}
    assert run_metrics(TrainConfig(dataset="multimnist")) == {"accuracy": both_right, "error": pair_errors}
    assert describe_dataset(TrainConfig(dataset="expanded")) == "expanded: expanded MNIST (40x40)"
    with pytest.raises(ValueError, match=r"the mnist dataset trains only 'cnn'; got arch 'capsnet'"):
        DatasetSpec(**{**vars(dataset("mnist")), "archs": ("cnn",)}).check_arch("capsnet")


def test_the_registry_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match=r"dataset must be one of \['cifar10', 'expanded', 'fashion-mnist', 'mnist', "
                                         r"'mnist-sample', 'multimnist', 'smallnorb', 'svhn'\], got 'mnits'"):
        dataset("mnits")
    with pytest.raises(ValueError, match="'mnist' is already registered"):
        register(dataset("mnist"))
    with pytest.raises(TypeError, match="expected a DatasetSpec, got dict"):
        register({"name": "x"})
    with pytest.raises(TypeError):
        DATASETS["x"] = dataset("mnist")  # read-only: register() is the way in
    with pytest.raises(ValueError, match="dataset must be one of"):
        unregister("mnits")


# -- a fourth dataset, described here and nowhere else ---------------------------------------
PAD = 2  # the packaged sample's digits centred on 32x32


@pytest.fixture
def sample32(monkeypatch, tmp_path):
    """The MNIST sample on a 32x32 canvas, shifts of up to 2 px, CapsNet only, registered
    for the test and unregistered after it. No network: a download attempt fails the test."""
    def refuse(request, *args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("CAPSNET_DATA_DIR", str(tmp_path / "no-mnist"))
    spec = register(DatasetSpec(
        name="sample32", description="the MNIST sample on a 32x32 canvas (a test dataset)", help="32x32 sample",
        input_shape=(1, 32, 32), max_shift=1, load=lambda data_dir, progress: load_mnist_sample(),
        train_source=partial(digit_source, train=True, pad=PAD), test_source=partial(digit_source, train=False,
                                                                                        pad=PAD),
        shift_limit=PAD, archs=("capsnet",), archs_words="the CapsNet only (a test)"))
    try:
        yield spec
    finally:
        unregister(spec.name)
    assert "sample32" not in DATASETS


def test_a_fourth_dataset_needs_only_its_entry(sample32):
    cfg = TrainConfig(dataset="sample32")
    assert cfg.max_shift == 1 and cfg.model["input_shape"] == [1, 32, 32]
    with pytest.raises(ValueError, match="the sample32 dataset trains the CapsNet only \\(a test\\); got arch 'cnn'"):
        TrainConfig(dataset="sample32", arch="cnn")
    with pytest.raises(ValueError, match="sample32 shifts digits by at most 2 px, got max_shift 3"):
        TrainConfig(dataset="sample32", max_shift=3).validate()
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 32, 32\), but the model is configured for "
                                         r"\(1, 28, 28\)"):
        TrainConfig(dataset="sample32", model={"input_shape": [1, 28, 28]}).validate()
    cfg.train_limit, cfg.test_limit = 8, 4
    with backend.use("numpy") as xp:
        train, test = data_sources(cfg, load_data(cfg), xp)
        x, y = test.batch(np.arange(4))
    assert x.shape == (4, 1, 32, 32) and len(train) == 8
    digits = load_mnist_sample().test_images[:4] / 255.0
    np.testing.assert_allclose(x[:, 0, PAD:-PAD, PAD:-PAD], digits, rtol=1e-6)  # centred, unshifted
    assert x[:, 0, :PAD].max() == 0 and x[:, 0, -PAD:].max() == 0


def test_a_fourth_dataset_trains_and_evaluates_from_the_command_line(sample32, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(["--dataset", "sample32", "--out", str(out), *TINY]) == 0
    log = capsys.readouterr().out
    assert "data sample32: the MNIST sample on a 32x32 canvas (a test dataset)" in log.splitlines()[0]
    assert json.loads((out / "config.json").read_text())["dataset"] == "sample32"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and 0.0 <= record["test_accuracy"] <= 1.0
    assert evaluate_cli.main([str(out / "best.npz"), "--test-limit", "100", "--no-progress"]) == 0
    assert "100 sample32 test images" in capsys.readouterr().out
    # the trainer itself, resuming the run for a second epoch
    cfg = train_config_of(load_checkpoint(out / "checkpoint.npz")[0], out / "checkpoint.npz")
    cfg.epochs = 2
    history = RunTrainer(cfg, out, progress=False, log=False).fit(resume=True)
    assert [r["epoch"] for r in history] == [2] and 0.0 <= history[0]["test_accuracy"] <= 1.0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_the_registry_is_one_file():
    """Nothing outside capsnet/training/datasets.py names a dataset to decide what to do."""
    from pathlib import Path  # noqa: PLC0415

    root = Path(datasets.__file__).resolve().parents[1]
    found = []
    for path in root.rglob("*.py"):
        if path.name == "datasets.py" and path.parent.name == "training":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(s in line for s in ('dataset ==', 'dataset !=', '== "multimnist"', '== "expanded"',
                                       '== "mnist-sample"')):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert found == []


def test_augment_efficient_gives_one_digit_training_sources_efficient_capsnets_augmentation():
    from types import SimpleNamespace

    from capsnet.data.augment import efficient_augment

    cfg = TrainConfig(dataset="mnist-sample", augment="efficient", train_limit=8, test_limit=8).validate()
    train, test = data_sources(cfg, load_data(cfg, progress=False), np)
    assert train.augment is efficient_augment and test.augment is None
    x, _ = train.batch(np.arange(8), np.random.default_rng(0))
    assert x.shape == (8, 1, 28, 28) and not np.array_equal(x, train.arrays[0][:8])
    assert "augment" in cfg.fixed_items()  # a resume with another augmentation is refused
    with pytest.raises(ValueError, match=r"augment must be one of \('shift', 'efficient'\), got 'flip'"):
        TrainConfig(augment="flip").validate()
    settings = SimpleNamespace(max_shift=4, dtype="float32", test_pairs=1, augment="efficient")
    sample = load_mnist_sample()
    with pytest.raises(ValueError, match="MultiMNIST makes its own shifted pairs; augment 'efficient' applies to "
                                         r"one-digit datasets only \(drop --augment\)"):
        datasets.multimnist_source(sample.train_images[:20], sample.train_labels[:20], settings, np, train=True)
