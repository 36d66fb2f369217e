"""``python -m capsnet.robustness``: the table and the plot of accuracy under affine
transformations, for runs trained on expanded MNIST."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def expanded_runs(mnist_dir, tmp_path_factory):
    """A small CapsNet and a small baseline CNN, each two epochs on 1,000 digits of the 40x40
    canvas (shifts of up to 2 px, so that so short a run learns)."""
    from capsnet.training import RunTrainer, TrainConfig  # noqa: PLC0415

    root = tmp_path_factory.mktemp("expanded")
    common = dict(data_dir=str(mnist_dir), dataset="expanded", epochs=2, batch_size=50, train_limit=1000,
                  test_limit=100, max_shift=2)
    RunTrainer(TrainConfig(model={"conv_channels": 32, "primary_types": 8, "decoder_hidden": [64, 128]}, **common),
                 root / "capsnet", progress=False, log=False).fit()
    RunTrainer(TrainConfig(arch="cnn", model={"channels": [16, 16, 8], "fc": [32, 32], "pool": True}, **common),
                 root / "cnn", progress=False, log=False).fit()
    return root


def test_robustness_command_writes_the_table_and_the_plot(expanded_runs, mnist_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from capsnet.robustness import main  # noqa: PLC0415

    out = tmp_path / "rob"
    args = [str(expanded_runs / "capsnet" / "best.npz"), str(expanded_runs / "cnn" / "best.npz"), "--out", str(out),
            "--data-dir", str(mnist_dir), "--test-limit", "100", "--no-progress"]
    assert main(args) == 0
    table = json.loads((out / "robustness.json").read_text())
    assert [r["arch"] for r in table["runs"]] == ["capsnet", "cnn"]
    for run in table["runs"]:
        assert set(run["sweeps"]) == {"rotation", "scale", "shear"}
        rotation = [p["accuracy"] for p in run["sweeps"]["rotation"]]
        assert rotation[0] > 0.25, run  # trained: above chance (0.1) on centred digits
        assert rotation[-1] < rotation[0] - 0.1, run  # and 60 degrees hurts
        assert 0 <= run["mixed"] <= 1
    from matplotlib.image import imread  # noqa: PLC0415

    png = imread(out / "robustness.png")
    assert png.shape[0] > 200 and png.shape[1] > 600 and png[..., :3].std() > 0.05
    capsys.readouterr()
    assert main([str(expanded_runs / "capsnet" / "missing.npz"), "--out", str(out), "--no-progress"]) == 2
    assert "missing.npz" in capsys.readouterr().err


TINY = {"conv_channels": 8, "primary_types": 2, "primary_dim": 4, "digit_dim": 4, "decoder_hidden": [16, 32]}


@pytest.fixture(scope="module")
def small_runs(mnist_dir, tmp_path_factory):
    """A tiny CapsNet trained one short epoch on the packaged sample, and one on MNIST (28x28)."""
    from capsnet.training import RunTrainer, TrainConfig  # noqa: PLC0415

    root = tmp_path_factory.mktemp("small")
    common = dict(epochs=1, batch_size=50, train_limit=100, test_limit=50, model=TINY)
    RunTrainer(TrainConfig(dataset="mnist-sample", **common), root / "sample", progress=False, log=False).fit()
    RunTrainer(TrainConfig(dataset="mnist", data_dir=str(mnist_dir), **common), root / "mnist", progress=False,
                 log=False).fit()
    return root


@pytest.fixture
def no_download(monkeypatch):
    """MNIST cannot be downloaded: a command that asks for a file it lacks says so."""
    from capsnet.data import MNISTDownloadError, mnist  # noqa: PLC0415

    def refuse(dest, *, names=(), **kw):
        raise MNISTDownloadError(f"could not download {', '.join(names)} (no network in this test)")

    monkeypatch.setattr(mnist, "download_mnist", refuse)


def test_a_checkpoint_of_the_sample_is_evaluated_on_the_sample_with_no_mnist_files(small_runs, tmp_path,
                                                                                   monkeypatch, no_download, capsys):
    from capsnet.robustness import main  # noqa: PLC0415

    monkeypatch.setenv("CAPSNET_DATA_DIR", str(tmp_path / "empty"))
    out = tmp_path / "rob"
    assert main([str(small_runs / "sample" / "best.npz"), "--out", str(out), "--test-limit", "40", "--no-plot",
                 "--no-progress"]) == 0, capsys.readouterr().err
    run = json.loads((out / "robustness.json").read_text())["runs"][0]
    assert run["dataset"] == "mnist-sample" and run["test_digits"] == 40


def test_an_mnist_checkpoint_needs_only_the_test_files(small_runs, mnist_dir, tmp_path, no_download, capsys):
    import shutil  # noqa: PLC0415

    from capsnet.robustness import main  # noqa: PLC0415

    test_only = tmp_path / "t10k"
    test_only.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        found = next(mnist_dir.glob(name + "*"))
        shutil.copy(found, test_only / found.name)
    out = tmp_path / "rob"
    assert main([str(small_runs / "mnist" / "best.npz"), "--data-dir", str(test_only), "--out", str(out),
                 "--test-limit", "40", "--no-plot", "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((out / "robustness.json").read_text())["runs"][0]["dataset"] == "mnist"


def test_affnist_with_a_28x28_model_is_refused_before_any_work(small_runs, tmp_path, monkeypatch, capsys):
    pytest.importorskip("scipy", reason="without scipy, --affnist is refused for that first (tested below)")
    import capsnet.robustness as robustness  # noqa: PLC0415

    work = []
    monkeypatch.setattr(robustness, "read_affnist", lambda path: work.append("read affNIST"))
    monkeypatch.setattr(robustness, "test_digits", lambda *a, **k: work.append("read the test digits"))
    monkeypatch.setattr(robustness, "accuracy", lambda *a, **k: work.append("evaluated") or 0.5)
    code = robustness.main([str(small_runs / "sample" / "best.npz"), "--affnist", str(tmp_path / "test.mat"),
                            "--out", str(tmp_path / "rob"), "--no-plot", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and work == []
    assert "--affnist images are 40x40, the model takes 28x28" in err and "--dataset expanded" in err


@pytest.mark.parametrize("missing,args,words", [
    ("matplotlib", [], ["pip install 'capsnet[viz]'", "--no-plot"]),
    ("scipy", ["--affnist", "test.mat", "--no-plot"], ["--affnist", "pip install 'capsnet[affnist]'"]),
])
def test_a_missing_extra_is_named_before_any_work(tmp_path, monkeypatch, capsys, missing, args, words):
    import sys  # noqa: PLC0415

    import capsnet.robustness as robustness  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, missing, None)  # importing it now fails
    for name in [m for m in sys.modules if m.startswith(missing + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(robustness, "load_model", lambda *a, **k: pytest.fail("a checkpoint was read first"))
    checkpoint = tmp_path / "best.npz"
    checkpoint.write_bytes(b"")
    assert robustness.main([str(checkpoint), *args, "--out", str(tmp_path / "rob"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
