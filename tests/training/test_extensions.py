"""capsnet.training.extensions and strategy: research code extends the loop without
subclassing it; one process is the single-process strategy."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from capsnet.training import (Extension, SingleProcess, TerminateOnNaN, TrainingDiverged, load_checkpoint,
                              strategy_for)


# -- extensions, without subclassing ------------------------------------------------
class StepCounter(Extension):
    """Counts steps, through resumes (its count is in the checkpoint), and writes a file
    each epoch (what a custom figure per epoch would do)."""

    writer_only = True

    def __init__(self):
        self.steps = 0
        self.events = []

    def start(self, trainer):
        self.events.append(("start", trainer.epoch, trainer.step_in_epoch))

    def step(self, trainer):
        self.steps += 1

    def epoch_end(self, trainer, record):
        record_file = trainer.run_dir / f"figure-{record['epoch']}.txt"
        record_file.write_text(f"{record['test_accuracy']:.4f}\n")

    def state_dict(self):
        return {"counted_steps": self.steps}

    def load_state_dict(self, header):
        self.steps = header.get("counted_steps", 0)


def test_an_extension_keeps_its_state_through_a_resume_and_runs_on_every_epoch(make_trainer, tmp_path):
    def stop(trainer, epoch, step):
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    first = StepCounter()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run", extensions=[first], on_step=stop).fit()
    assert first.steps == 4 + 2
    second = StepCounter()
    make_trainer(tmp_path / "run", extensions=[second]).fit(resume=True)
    assert second.events == [("start", 1, 2)] and second.steps == 3 * 4
    assert sorted(p.name for p in (tmp_path / "run").glob("figure-*.txt")) == [f"figure-{e}.txt" for e in (1, 2, 3)]


def test_extend_refuses_what_is_not_an_extension(make_trainer, tmp_path):
    with pytest.raises(TypeError, match="needs a capsnet.training.Extension, got function"):
        make_trainer(tmp_path / "run").extend(lambda trainer: None)


def test_one_process_is_the_single_process_strategy_whose_hooks_change_nothing():
    strategy = strategy_for(None)
    assert isinstance(strategy, SingleProcess) and strategy.writes and strategy.size == 1
    batch = (np.arange(6), np.arange(6))
    rows, _ = strategy.local(batch)
    assert rows is batch and strategy.shard(7) == (0, 7) and strategy.gather(3) == [3]
    assert strategy.reduce_gradients(1.0, True) is True and strategy.agree(False) is False
    assert strategy.on_writer(lambda: 42) == 42


class EpochCounter(Extension):
    """State changed in epoch_end, at the default priority."""

    def __init__(self):
        self.epochs = 0

    def epoch_end(self, trainer, record):
        self.epochs += 1

    def state_dict(self):
        return {"counted_epochs": self.epochs}

    def load_state_dict(self, header):
        self.epochs = header.get("counted_epochs", 0)


def test_state_an_extension_changes_at_an_epochs_end_is_in_that_epochs_checkpoint(make_trainer, tmp_path):
    make_trainer(tmp_path / "run", epochs=2, extensions=[EpochCounter()]).fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz")[0]["counted_epochs"] == 2
    assert load_checkpoint(tmp_path / "run" / "best.npz")[0]["counted_epochs"] in (1, 2)
    resumed = EpochCounter()
    make_trainer(tmp_path / "run", epochs=3, extensions=[resumed]).fit(resume=True)
    assert resumed.epochs == 3  # as in a run that never stopped


class WriterStop(Extension):
    writer_only = True

    def step(self, trainer):
        if (trainer.epoch, trainer.step_in_epoch) == (0, 2):
            raise KeyboardInterrupt


def test_a_keyboard_interrupt_from_a_writer_only_extension_is_a_stop_request(make_trainer, tmp_path):
    """It runs on one process, so it cannot stop the others by raising: the processes agree
    on the request in the next step, and the run stops, saved, after it."""
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run", extensions=[WriterStop()]).fit()
    header = load_checkpoint(tmp_path / "run" / "checkpoint.npz")[0]
    assert (header["epoch"], header["step_in_epoch"]) == (0, 3)


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_terminate_on_nan_stops_on_every_loss_that_is_not_finite(tmp_path, loss):
    """An infinite loss is as diverged as a NaN one: training on would write inf or NaN weights."""
    folder = SimpleNamespace(checkpoint=tmp_path / "checkpoint.npz")
    trainer = SimpleNamespace(folder=folder, epoch=1, step_in_epoch=3, running={"loss": loss * 4, "seen": 4})
    stop = TerminateOnNaN()
    with pytest.raises(TrainingDiverged, match=f"the running training loss is {loss} at epoch 2, step 3"):
        stop.interval(trainer, {"loss": loss})
    with pytest.raises(TrainingDiverged, match="nothing was saved"):
        stop.interrupted(trainer)
    stop.interval(trainer, {"loss": 1e30})  # large but finite: trains on
