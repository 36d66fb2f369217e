"""The training package's guarantees around failure: a diverged run stops without
overwriting anything, and the metrics log agrees with the checkpoint after any failure."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import capsnet.train as train_cli
from capsnet.optim import SGD
from capsnet.training import Extension, RunFolder, TrainingDiverged, load_checkpoint, trainer as trainer_module


def epochs_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoint.npz")[1]


# -- a diverged run stops; nothing good is overwritten ------------------------------
class RaiseLearningRate(Extension):
    """From the second epoch on, a learning rate that makes SGD diverge."""

    def epoch_start(self, trainer):
        if trainer.epoch == 1:
            trainer.optimizer.lr = 1e30


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_a_diverged_run_stops_at_the_first_read_and_keeps_the_last_finite_state(make_trainer, tmp_path, capsys):
    run = tmp_path / "run"
    sgd = lambda model: SGD(model.parameters(), lr=0.05)  # noqa: E731
    with pytest.raises(TrainingDiverged) as info:
        make_trainer(run, optimizer=sgd, extensions=[RaiseLearningRate()]).fit()
    message = str(info.value)
    assert "loss is nan at epoch 2, step 3" in message  # the first read of epoch 2: log_every=3
    assert str(run / "checkpoint.npz") in message
    # epoch 1's state, untouched: the checkpoint, the best model and the log
    header, weights, _ = load_checkpoint(run / "checkpoint.npz")
    assert header["epoch"] == 1 and header["step_in_epoch"] == 0
    assert all(np.isfinite(w).all() for w in weights.values())
    assert load_checkpoint(run / "best.npz")[0]["epoch"] == 1
    assert epochs_logged(run) == [1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_run_that_diverges_in_its_first_epoch_writes_nothing_and_the_cli_says_so(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_cli.main(["--out", str(out), "--data-dir", str(mnist_dir), "--train-limit", "100", "--test-limit",
                           "50", "--batch-size", "25", "--optimizer", "sgd", "--lr", "1e30", "--model", "cnn",
                           "--cnn-channels", "4", "4", "--cnn-fc", "16", "--log-every", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: training diverged") and "nothing was saved" in err
    assert not (out / "checkpoint.npz").exists() and not (out / "best.npz").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_stop_on_divergence_can_be_turned_off(make_trainer, tmp_path):
    history = make_trainer(tmp_path / "run", epochs=2, optimizer=lambda m: SGD(m.parameters(), lr=1e30),
                      stop_on_nan=False).fit()
    assert [np.isnan(r["train_loss"]) for r in history] == [True, True]


# -- the metrics log and the checkpoint agree after any failure --------------------
def test_a_disk_full_during_a_checkpoint_leaves_a_log_that_agrees_after_the_resume(make_trainer, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    make_trainer(straight).fit()
    run = tmp_path / "run"
    real_save = trainer_module.save_checkpoint

    def disk_full_in_epoch_2(path, **kw):
        if kw["header"]["epoch"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(path, **kw)

    monkeypatch.setattr(trainer_module, "save_checkpoint", disk_full_in_epoch_2)
    with pytest.raises(OSError, match="No space left"):
        make_trainer(run).fit()
    assert load_checkpoint(run / "checkpoint.npz")[0]["epoch"] == 1  # the loadable epoch-1 state
    assert epochs_logged(run) == [1, 2]  # epoch 2's line came first: the checkpoint is the commit point
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    make_trainer(run).fit(resume=True)
    assert epochs_logged(run) == [1, 2, 3]  # epoch 2 once: the resume dropped the line the checkpoint lacked
    for name, value in final_weights(straight).items():
        np.testing.assert_array_equal(final_weights(run)[name], value, err_msg=name)  # same machine: bit for bit


def test_a_log_line_cut_short_or_ahead_of_the_checkpoint_is_dropped_on_resume(tmp_path):
    folder = RunFolder(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    folder.metrics.write_text('{"epoch": 1, "x": 1}\n{"epoch": 2, "x": 2}\n{"epoch": 3, "x"')
    assert folder.trim_metrics(2) == 1
    assert folder.metrics.read_text() == '{"epoch": 1, "x": 1}\n{"epoch": 2, "x": 2}\n'
    assert folder.trim_metrics(1) == 1 and epochs_logged(tmp_path) == [1]
    assert folder.trim_metrics(1) == 0


def test_a_checkpoint_header_without_its_clock_is_refused_and_the_log_is_left_alone(make_trainer, tmp_path):
    from capsnet.training import CheckpointError, save_checkpoint

    run = tmp_path / "run"
    make_trainer(run, epochs=2).fit()
    header, weights, optim = load_checkpoint(run / "checkpoint.npz")
    del header["epoch"]
    save_checkpoint(run / "checkpoint.npz", model_state=weights, optimizer_state=optim, header=header)
    log = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="does not fit this model, optimizer or loop: 'epoch'"):
        make_trainer(run, epochs=3).fit(resume=True)
    assert (run / "metrics.jsonl").read_text() == log
