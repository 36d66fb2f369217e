"""``python -m capsnet.train --dataset fashion-mnist|cifar10|svhn|smallnorb`` on folders of
files in each true format (a few records): one step and an evaluation with every
architecture; resume, evaluate, export and reconstructions in colour on a CIFAR-10 run; the
offline error; smallNORB on two MPI ranks; and a dataset that research code registers training
with the same command line."""
from __future__ import annotations

import dataclasses
import json
import socket

import numpy as np
import pytest

from capsnet import evaluate as evaluate_cli, train as train_cli
from capsnet.data import ArrayDataset, cifar10, load_cifar10, to_float
from capsnet.training import TrainConfig, load_checkpoint, load_model
from capsnet.training.datasets import DatasetSpec, dataset, register, unregister
from tests.data.dataset_files import WRITERS
from tests.training.mpi import needs_mpi, run as mpi_run

# the smallest networks of each architecture, so each run is one quick step
TINY = {
    "capsnet": ["--conv-channels", "8", "--primary-types", "2", "--primary-dim", "4", "--digit-dim", "4",
                "--decoder-hidden", "8", "8", "--routing", "2"],
    "efficient": ["--decoder-hidden", "8", "8"],
    "em": ["--conv-channels", "8", "--primary-types", "2", "--caps1", "2", "--caps2", "2", "--routing", "2"],
    "cnn": ["--cnn-channels", "4", "4", "4", "--cnn-fc", "8", "8"],
}
SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 24, 24), "svhn": (3, 32, 32), "smallnorb": (2, 32, 32)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder of real-format files per dataset."""
    root = tmp_path_factory.mktemp("datasets")
    made = {}
    for name, write in WRITERS.items():
        if name == "svhn" and not _has_scipy():
            continue
        write(root / name)
        made[name] = root / name
    return made


def _has_scipy() -> bool:
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        return False
    return True


def run_args(folder, out, arch, name):
    return ["--dataset", name, "--data-dir", str(folder), "--model", arch, *TINY[arch], "--epochs", "1",
            "--batch-size", "2", "--train-limit", "2", "--test-limit", "3", "--out", str(out), "--no-progress"]


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_architecture_trains_and_evaluates_on_each_dataset(folders, tmp_path, capsys, name, arch):
    if name not in folders:
        pytest.skip("SVHN's .mat files need scipy")
    out = tmp_path / "run"
    assert train_cli.main(run_args(folders[name], out, arch, name)) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert f"data {name}: {dataset(name).description}" in text
    last = json.loads(text.strip().splitlines()[-1])
    assert last["epoch"] == 1 and np.isfinite(last["train_loss"]) and 0 <= last["test_accuracy"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == name and tuple(config["model"]["input_shape"]) == SHAPES[name]
    assert config["model"].get("n_classes", 10) == (5 if name == "smallnorb" else 10)


def test_the_papers_networks_for_each_dataset():
    """CIFAR-10: three channels, 64 primary capsule types; SVHN: the smaller network of the
    paper; smallNORB: two channels (the stereo pair), five classes."""
    cifar = TrainConfig(dataset="cifar10").model_config()
    assert cifar.input_shape == (3, 24, 24) and cifar.primary_types == 64 and cifar.conv_channels == 256
    assert cifar.n_primary_caps == 64 * 4 * 4
    svhn = TrainConfig(dataset="svhn").model_config()
    assert (svhn.conv_channels, svhn.primary_types, svhn.primary_dim, svhn.digit_dim) == (64, 16, 6, 8)
    norb = TrainConfig(dataset="smallnorb", arch="em").model_config()
    assert norb.input_shape == (2, 32, 32) and norb.n_classes == 5
    assert TrainConfig(dataset="cifar10", arch="cnn").model_config().input_shape == (3, 24, 24)
    with pytest.raises(ValueError, match=r"CIFAR-10 is augmented by random 24x24 crops and flips, not shifted, "
                                         r"got max_shift 2"):
        TrainConfig(dataset="cifar10", max_shift=2).validate()
    with pytest.raises(ValueError, match=r"smallnorb dataset has 5 classes, but the model is configured for "
                                         r"n_classes=10"):
        TrainConfig(dataset="smallnorb", model={"n_classes": 10}).validate()


def test_smallnorb_is_downsampled_then_cropped(folders):
    data = dataset("smallnorb").load(str(folders["smallnorb"]), False)
    assert data.train_images.shape == (6, 2, 48, 48) and data.test_images.shape == (4, 2, 48, 48)
    cfg = TrainConfig(dataset="smallnorb")
    train = dataset("smallnorb").train_source(data.train_images, data.train_labels, cfg, np)
    test = dataset("smallnorb").test_source(data.test_images, data.test_labels, cfg, np)
    x, _ = train.batch(np.arange(3), np.random.default_rng(0))
    assert x.shape == (3, 2, 32, 32)
    np.testing.assert_array_equal(test.batch(np.arange(4))[0], to_float(data.test_images, xp=np)[:, :, 8:40, 8:40])


def test_evaluate_and_resume_on_a_cifar10_run(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(run_args(folders["cifar10"], out, "capsnet", "cifar10")) == 0
    assert train_cli.main(["--out", str(out), "--resume", "--epochs", "2", "--no-progress",
                           "--data-dir", str(folders["cifar10"])]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert evaluate_cli.main([str(out / "best.npz"), "--data-dir", str(folders["cifar10"]), "--no-progress",
                              "--json", str(tmp_path / "e.json")]) == 0
    assert "3 cifar10 test images" in capsys.readouterr().out
    assert np.array(json.loads((tmp_path / "e.json").read_text())["confusion"]).sum() == 3
    model, _ = load_model(out / "best.npz")
    assert model.config.input_shape == (3, 24, 24)
    pytest.importorskip("safetensors")
    from capsnet import export as export_cli  # noqa: PLC0415
    from capsnet.models import CapsNet  # noqa: PLC0415

    assert export_cli.main([str(out / "best.npz"), str(tmp_path / "m.safetensors")]) == 0
    exported = CapsNet.from_safetensors(tmp_path / "m.safetensors")
    assert exported.config == model.config and exported.config.primary_types == 2


def test_cifar10_reconstructions_are_drawn_in_colour(folders, tmp_path):
    pytest.importorskip("matplotlib")
    from capsnet import visualize  # noqa: PLC0415

    out = tmp_path / "run"
    assert train_cli.main(run_args(folders["cifar10"], out, "capsnet", "cifar10")) == 0
    model, _ = load_model(out / "best.npz")
    x = to_float(load_cifar10(folders["cifar10"], download=False).test_images[:, :, 4:28, 4:28], xp=np)
    recon = visualize.reconstructions(model, x, tmp_path / "r.png")
    assert recon.shape == (3, 24, 24, 3) and 0 <= recon.min() and recon.max() <= 1
    assert visualize.main(["reconstructions", str(out / "best.npz"), "--out", str(tmp_path / "cli.png"), "-n", "3",
                           "--data-dir", str(folders["cifar10"])]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 0


def test_a_missing_dataset_is_one_error_naming_the_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CAPSNET_DATA_DIR", str(tmp_path / "env"))
    # no mirror can be reached from here: the download fails and says how to work offline
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(cifar10, "FILES", dataclasses.replace(cifar10.FILES, mirrors=(f"http://127.0.0.1:{port}/",)))
    assert train_cli.main(["--dataset", "cifar10", "--model", "cnn", "--out", str(tmp_path / "r"),
                           "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download cifar-10-binary.tar.gz") and "Traceback" not in err
    assert "cifar-10-binary.tar.gz" in err and str(tmp_path / "env" / "cifar10") in err


def test_a_dataset_registered_by_research_code_trains_with_the_command_line(tmp_path, capsys):
    """Stripes: 12x12 images with a bright row (class 0) or column (class 1); defined here,
    registered, then trained and evaluated by the same command line with the same flags."""
    def load(data_dir, progress):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 40, (10, 1, 12, 12)).astype(np.uint8)
        labels = np.arange(10) % 2
        where = rng.integers(0, 12, 10)
        images[labels == 0, 0, where[labels == 0], :] = 255
        images[labels == 1, 0, :, where[labels == 1]] = 255
        return type("Stripes", (), {"train_images": images[:6], "train_labels": labels[:6],
                                    "test_images": images[6:], "test_labels": labels[6:]})()

    def source(images, labels, settings, xp, train=False):
        return ArrayDataset(to_float(images, settings.dtype, xp), xp.asarray(labels))

    register(DatasetSpec(name="stripes", description="stripes (research code's own)", help="12x12 stripes",
                         input_shape=(1, 12, 12), max_shift=0, load=load, train_source=source, test_source=source,
                         n_classes=2, model={"capsnet": {"conv_kernel": 3, "primary_kernel": 3}}))
    try:
        out = tmp_path / "run"
        args = ["--dataset", "stripes", "--epochs", "1", "--batch-size", "3", "--conv-channels", "8",
                "--primary-types", "2", "--primary-dim", "4", "--digit-dim", "4", "--decoder-hidden", "8", "8",
                "--out", str(out), "--no-progress"]
        assert train_cli.main(args) == 0, capsys.readouterr().err
        assert "data stripes: stripes (research code's own)" in capsys.readouterr().out
        config = json.loads((out / "config.json").read_text())
        assert config["model"]["n_classes"] == 2 and config["model"]["conv_kernel"] == 3
        assert evaluate_cli.main([str(out / "best.npz"), "--no-progress"]) == 0
        assert "4 stripes test images" in capsys.readouterr().out
    finally:
        unregister("stripes")


@needs_mpi
def test_smallnorb_on_two_ranks_ends_with_the_weights_of_one_process(folders, tmp_path):
    """The random crops are drawn the same on every rank: two ranks sharing each batch end
    where one process does."""
    def args(out):
        return ["--", "--dataset", "smallnorb", "--data-dir", str(folders["smallnorb"]), "--dtype", "float64",
                "--epochs", "1", "--batch-size", "4", "--train-limit", "6", "--test-limit", "2", *TINY["capsnet"],
                "--out", str(out), "--no-progress"]

    one, two = mpi_run(0, args(tmp_path / "one")), mpi_run(2, args(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "parameters on 2 MPI ranks" in two.stdout
    a = load_checkpoint(tmp_path / "one" / "checkpoint.npz")[1]
    b = load_checkpoint(tmp_path / "two" / "checkpoint.npz")[1]
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-9, atol=1e-12, err_msg=name)
