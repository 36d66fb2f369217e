"""Checkpoints that cannot be read, durable writes, logs in batch jobs, and safetensors export."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from capsnet import backend
from capsnet import evaluate as evaluate_cli
from capsnet import export as export_cli
from capsnet import train as train_cli
from capsnet.models import CapsNet, CapsNetConfig
from capsnet.training import CheckpointError, load_checkpoint, load_model, save_checkpoint

from tests.helpers import host, reference

TINY = ["--conv-channels", "8", "--primary-types", "2", "--primary-dim", "4", "--digit-dim", "4",
        "--decoder-hidden", "16"]


def train_args(mnist_dir, out, epochs=1):
    return ["--data-dir", str(mnist_dir), "--epochs", str(epochs), "--batch-size", "25", "--train-limit", "100",
            "--test-limit", "50", *TINY, "--out", str(out)]


@pytest.fixture(scope="module")
def run_folder(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert train_cli.main(train_args(mnist_dir, out) + ["--no-progress"]) == 0
    return out


def _rewrite(src: Path, dst: Path, change) -> None:
    """Copy the .npz at src to dst, passing each member's bytes through change(name, data)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = change(item.filename, zin.read(item))
            if data is not None:
                zout.writestr(item, data)


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def damage(kind: str, good: Path, bad: Path) -> None:
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "not a zip":
        bad.write_bytes(b"not a zip file, just text\n" * 10)
    elif kind == "a single array":
        with open(bad, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "member missing":
        _rewrite(good, bad, lambda name, data: None if name == "header.npy" else data)
    elif kind == "header not JSON":
        _rewrite(good, bad, lambda name, data: _npy(np.frombuffer(b"{not json", np.uint8))
                 if name == "header.npy" else data)
    elif kind == "wrong shape":
        _rewrite(good, bad, lambda name, data: _npy(np.zeros((3, 3), np.float32))
                 if name == "model/conv1.weight.npy" else data)
    else:
        raise AssertionError(kind)


KINDS = ["truncated", "not a zip", "a single array", "member missing", "header not JSON", "wrong shape"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_unreadable_checkpoint_gives_checkpoint_error_from_every_entry_point(run_folder, mnist_dir, tmp_path,
                                                                                kind, capsys):
    run = tmp_path / "run"
    run.mkdir()
    damage(kind, run_folder / "checkpoint.npz", run / "checkpoint.npz")
    path = run / "checkpoint.npz"
    if kind != "wrong shape":  # the file itself is broken
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)
    capsys.readouterr()
    assert train_cli.main(["--out", str(run), "--resume", "--data-dir", str(mnist_dir), "--epochs", "2",
                           "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "Traceback" not in err
    assert evaluate_cli.main([str(path), "--data-dir", str(mnist_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "c.npz", model_state={"w": np.ones(3)}, header={"epoch": 1})
    assert events == ["fsync file", "rename", "fsync dir"]


def test_a_checkpoint_written_on_one_backend_loads_on_the_other(xp, tmp_path):
    """Weights are saved as host arrays: what a model on either backend wrote loads on both."""
    cfg = CapsNetConfig(conv_channels=8, primary_types=2, primary_dim=4, digit_dim=4, decoder_hidden=(16,))
    model = CapsNet(cfg, seed=3)  # on the fixture's backend
    assert backend.backend_of(model.conv1.weight.data) == xp.__name__
    save_checkpoint(tmp_path / "c.npz", model_state=model.state_dict(), header={"epoch": 0})
    _, state, _ = load_checkpoint(tmp_path / "c.npz")
    for name in backend.available_backends():
        with backend.use(name):
            other = CapsNet(cfg, seed=0)
        other.load_state_dict(state)
        assert backend.backend_of(other.conv1.weight.data) == name
        np.testing.assert_array_equal(host(other.digit.weight.data), host(model.digit.weight.data))


# -- logs ----------------------------------------------------------------------
def test_no_progress_still_prints_one_line_per_epoch_and_the_final_json(mnist_dir, tmp_path, capsys):
    assert train_cli.main(train_args(mnist_dir, tmp_path / "run", epochs=2) + ["--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert lines[0].startswith("CapsNet: ") and "parameters" in lines[0]
    for line in epochs:
        assert "train loss" in line and "test loss" in line and "accuracy" in line and "img/s" in line
    assert json.loads(lines[-1])["epoch"] == 2


def test_progress_bars_stay_off_when_the_output_is_not_a_terminal(mnist_dir, tmp_path, capsys):
    assert train_cli.main(train_args(mnist_dir, tmp_path / "run")) == 0  # progress on, but captured
    captured = capsys.readouterr()
    assert "batch/s" not in captured.err and "it/s" not in captured.err
    assert "epoch 1/1 |" in captured.out


# -- safetensors -------------------------------------------------------------------
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="needs the optional safetensors package (pip install safetensors)")


@needs_safetensors
def test_export_writes_weights_and_configuration_that_load_back(run_folder, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert export_cli.main([str(run_folder / "best.npz"), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model, _ = load_model(run_folder / "best.npz")
    back = CapsNet.from_safetensors(out)
    assert back.config == model.config and back.dtype == model.dtype
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], value)
    from safetensors import safe_open

    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["conv_channels"] == 8 and meta["epoch"] == "1"


@needs_safetensors
def test_the_pytorch_network_reads_the_exported_file_and_agrees(run_folder, mnist_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch")
    TorchCapsNet = reference("torch_capsnet").TorchCapsNet
    from safetensors import safe_open
    from safetensors.torch import load_file

    from capsnet.data import load_mnist, to_float

    out = tmp_path / "model.safetensors"
    assert export_cli.main([str(run_folder / "checkpoint.npz"), str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    config["input_shape"] = tuple(config["input_shape"])
    config["decoder_hidden"] = tuple(config["decoder_hidden"])
    ref = TorchCapsNet(**config)
    ref.load_state_dict(load_file(str(out)))
    ref.eval()
    x = to_float(load_mnist(mnist_dir, download=False, progress=False).test_images[:20], xp=np)
    ours, _ = load_model(run_folder / "checkpoint.npz", "numpy")
    _, lengths = ours.predict(x)
    with torch.no_grad():
        _, ref_lengths = ref.predict(torch.as_tensor(x))
    np.testing.assert_allclose(ref_lengths.numpy(), lengths, rtol=1e-4, atol=1e-6)


def test_a_missing_safetensors_package_is_named_with_the_install_command(run_folder, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now fails
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    assert export_cli.main([str(run_folder / "best.npz"), str(tmp_path / "m.safetensors")]) == 2
    assert "pip install 'capsnet[safetensors]'" in capsys.readouterr().err
    # before any work: the extra is named even where the checkpoint would fail to load
    assert export_cli.main([str(tmp_path / "none.npz"), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'capsnet[safetensors]'" in err and "none.npz" not in err
    with pytest.raises(ImportError, match="capsnet\\[safetensors\\]"):
        CapsNet.from_safetensors(tmp_path / "m.safetensors")


@needs_safetensors
def test_from_safetensors_refuses_a_file_without_a_capsnet_configuration(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no capsnet configuration"):
        CapsNet.from_safetensors(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        CapsNet.from_safetensors(tmp_path / "junk.safetensors")
