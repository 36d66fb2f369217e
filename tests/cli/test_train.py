"""``python -m capsnet.train`` and ``python -m capsnet.evaluate``: the command lines, their
help and refusals, and the baseline CNN's command line with resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from capsnet import backend, evaluate as evaluate_cli, train as train_cli
from capsnet.training import load_model


def test_unknown_backend_and_bad_options_are_refused(mnist_dir, tmp_path, capsys):
    with pytest.raises(backend.BackendError, match="'numpy', 'cupy'"):
        backend.set_backend("tpu")
    with pytest.raises(SystemExit):
        train_cli.main(["--backend", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    assert train_cli.main(["--data-dir", str(mnist_dir), "--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "epochs must be at least 1" in capsys.readouterr().err


def test_train_and_evaluate_command_lines(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data-dir", str(mnist_dir), "--epochs", "1", "--batch-size", "50", "--train-limit", "200",
            "--test-limit", "100", "--conv-channels", "16", "--primary-types", "4", "--digit-dim", "8",
            "--decoder-hidden", "32", "64", "--out", str(out), "--no-progress"]
    assert train_cli.main(args) == 0
    assert {p.name for p in out.iterdir()} >= {"checkpoint.npz", "best.npz", "metrics.jsonl", "config.json"}
    # --resume with no options takes the checkpoint's configuration; more epochs continue it
    assert train_cli.main(["--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert evaluate_cli.main([str(out / "best.npz"), "--data-dir", str(mnist_dir), "--test-limit", "100",
                              "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "confusion matrix" in text
    result = json.loads((tmp_path / "e.json").read_text())
    assert np.array(result["confusion"]).sum() == 100
    model, header = load_model(out / "checkpoint.npz")
    assert model.config.conv_channels == 16 and header["epoch"] == 2


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--backend", "--epochs", "--batch-size", "--lr", "--lr-decay", "--optimizer", "--routing",
                 "--recon-weight", "--data-dir", "--out", "--seed", "--dtype", "--resume", "--train-limit",
                 "--test-limit"):
        assert flag in text


# -- the baseline on real MNIST ----------------------------------------------------------------
SMALL_CNN = ["--model", "cnn", "--cnn-channels", "32", "32", "16", "--pool"]


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


def test_a_disk_that_fills_up_in_epoch_2_ends_the_run_with_one_line_and_the_resume_logs_each_epoch_once(
        mnist_dir, tmp_path, capsys, monkeypatch):
    from capsnet.training import load_checkpoint, trainer as trainer_module

    real_save = trainer_module.save_checkpoint

    def disk_full_in_epoch_2(path, **kw):
        if kw["header"]["epoch"] == 2:
            raise OSError(28, "No space left on device", str(path))
        return real_save(path, **kw)

    out = tmp_path / "run"
    args = ["--out", str(out), "--data-dir", str(mnist_dir), "--train-limit", "100", "--test-limit", "50",
            *SMALL_CNN, "--epochs", "3", "--no-progress"]
    monkeypatch.setattr(trainer_module, "save_checkpoint", disk_full_in_epoch_2)
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: [Errno 28] No space left on device")
    assert load_checkpoint(out / "checkpoint.npz")[0]["epoch"] == 1  # the loadable epoch-1 state
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    assert train_cli.main([*args, "--resume"]) == 0
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
