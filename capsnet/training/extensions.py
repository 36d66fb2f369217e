"""Extensions: what happens around the training steps, fired on the loop's events.

The loop (:class:`~capsnet.training.Trainer`) only takes steps and keeps the clock;
everything else is an :class:`Extension`, called on these events, in order of
``priority`` (higher first), then of registration:

======================  ===============================================================
``start(trainer)``      the run's state is restored (fresh or resumed), before any step
``epoch_start(trainer)``  before an epoch's first step
``step(trainer)``       after every optimizer step (``trainer.step_in_epoch`` counts it)
``interval(trainer, values)``  after each host read (every ``log_every`` steps and at the
                        epoch's end): the epoch's running mean loss and scalar metrics
``observe(trainer, record)``  at the epoch's end, to add entries to its record (evaluation)
``epoch_end(trainer, record)``  the record is complete and the clock advanced: log it, save
``interrupted(trainer)``  Ctrl-C (or a KeyboardInterrupt from an extension) between two steps
``saved(trainer, path)``  a checkpoint (``checkpoint.npz``, ``best.npz``) was written to ``path``
``finish(trainer)``     the run ends, whatever the reason
======================  ===============================================================

An extension with state that must survive a resume returns it from ``state_dict()``
(JSON-able entries of the checkpoint header) and reads it back in ``load_state_dict``.
At the default priority (0) its ``epoch_end`` and ``interrupted`` run before the best
model and the checkpoint are written, so the state they change is saved with them;
entries it adds to the record belong in ``observe`` (the metrics log is written first).
Under MPI, extensions with ``writer_only = True`` (files, bars, log lines) run on the
process that writes (rank 0) only. Setting ``trainer.stop_requested = True`` stops the
run as Ctrl-C does (state saved, resumable), after the current step, or at the epoch's
end; every process agrees on it. Raising ``KeyboardInterrupt`` from ``step`` stops after
this step; from a writer-only extension it is taken as ``stop_requested``, since one
process alone cannot stop the others.

The loop's own: :class:`Evaluate`, :class:`TerminateOnNaN` (on by default),
:class:`BestModel`, :class:`MetricsLog`, :class:`Checkpoint`, :class:`ProgressBar`,
:class:`LogLine`, :class:`TensorBoard`, and :class:`OnStep` (a plain function after
every step). Research code adds its own (early stopping, a figure each epoch) with
``Trainer(extensions=[...])`` or :meth:`Trainer.extend`, without subclassing.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
from tqdm.auto import tqdm

from capsnet import backend
from capsnet.layers.base import Module
from capsnet.training.evaluation import evaluate
from capsnet.training.run_folder import RunFolder
from capsnet.training.tensorboard import TensorBoardLog, summary_writer_class

__all__ = ["BestModel", "Checkpoint", "Evaluate", "Extension", "LogLine", "MetricsLog", "OnStep", "ProgressBar",
           "TensorBoard", "TerminateOnNaN", "TrainingDiverged"]


class TrainerView(Protocol):
    """What an extension may read from the trainer it is handed (and ``stop_requested``, which
    it may set). :class:`~capsnet.training.Trainer` is one; this module does not import it,
    so the loop and its extensions do not import each other."""

    model: Module
    task: Any
    optimizer: Any
    updater: Any
    strategy: Any
    folder: RunFolder
    metrics: Mapping[str, Any]
    backend_name: str
    epochs: int
    batch_size: int
    progress: bool
    epoch: int
    step_in_epoch: int
    running: dict[str, Any]
    stop_requested: bool

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def global_step(self) -> int: ...

    def save(self, path: str | Path) -> None: ...


class Extension:
    """Does nothing on every event; subclasses override the events they need."""

    priority = 0
    writer_only = False

    def start(self, trainer: TrainerView) -> None: ...

    def epoch_start(self, trainer: TrainerView) -> None: ...

    def step(self, trainer: TrainerView) -> None: ...

    def interval(self, trainer: TrainerView, values: dict[str, float]) -> None: ...

    def observe(self, trainer: TrainerView, record: dict[str, Any]) -> None: ...

    def epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None: ...

    def interrupted(self, trainer: TrainerView) -> None: ...

    def saved(self, trainer: TrainerView, path: Path) -> None: ...

    def finish(self, trainer: TrainerView) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, header: dict[str, Any]) -> None: ...


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite; the run stopped before writing anything."""


class TerminateOnNaN(Extension):
    """Stops the run at the first host read that sees a non-finite running loss, naming the
    epoch and step, before anything is written: the checkpoint and the best model on disk
    stay the last finite ones. It reads the values the loop already brought to the host,
    so it costs no synchronisation. On by default (``Trainer(stop_on_nan=False)`` leaves
    it out)."""

    priority = 1000  # before anything reads or writes the values

    def interval(self, trainer: TrainerView, values: dict[str, float]) -> None:
        self._check(trainer, values["loss"])

    def interrupted(self, trainer: TrainerView) -> None:  # a Ctrl-C must not save diverged weights either
        seen = trainer.running["seen"]
        if seen:
            self._check(trainer, trainer.running["loss"] / seen)

    @staticmethod
    def _check(trainer: TrainerView, loss: float) -> None:
        if math.isfinite(loss):
            return
        kept = (f"{trainer.folder.checkpoint} still holds the state it had before (resume from it with a "
                "smaller learning rate)" if trainer.folder.checkpoint.exists() else "nothing was saved")
        raise TrainingDiverged(f"training diverged: the running training loss is {loss} at epoch "
                               f"{trainer.epoch + 1}, step {trainer.step_in_epoch}; stopped without writing the "
                               f"weights: {kept}")


class Evaluate(Extension):
    """Evaluates the model on ``data`` at every epoch's end (unaugmented, in eval mode),
    adding ``{name}_loss`` and ``{name}_{metric}`` to the record. Every process takes part
    (under MPI each evaluates its share)."""

    priority = 100

    def __init__(self, data: Any, name: str = "test", batch_size: int | None = None):
        self.data, self.name, self.batch_size = data, name, batch_size

    def observe(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        result = evaluate(trainer.updater.runner, trainer.task, self.data,
                          batch_size=self.batch_size or trainer.batch_size, metrics=trainer.metrics,
                          progress=trainer.progress, desc=self.name, strategy=trainer.strategy)
        record[f"{self.name}_loss"] = result["loss"]
        for name in trainer.metrics:
            record[f"{self.name}_{name}"] = result[name]


def lower_is_better(key: str) -> bool:
    """Record entries ending in "loss" or "error" are better lower; the rest higher."""
    return key.endswith(("loss", "error"))


class BestModel(Extension):
    """Writes ``best.npz`` (the whole resumable state) after each epoch whose record entry
    ``key`` beats every earlier one; ``lower`` says which way is better (default: by the
    key's name, see :func:`lower_is_better`). The best value so far is kept in the
    checkpoint (``best``, ``best_key``)."""

    priority = -10  # after other extensions' epoch_end (their state is saved), before the checkpoint
    writer_only = True

    def __init__(self, key: str, lower: bool | None = None):
        self.key = key
        self.lower = lower_is_better(key) if lower is None else lower
        self.value: float | None = None

    def improved(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` beats the best so far (which it then becomes)."""
        value = record.get(self.key)
        if not isinstance(value, (int, float)):
            return False
        if self.value is None or (value < self.value if self.lower else value > self.value):
            self.value = value
            return True
        return False

    def epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        if self.improved(record):
            trainer.save(trainer.folder.best)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.value, "best_key": self.key}

    def load_state_dict(self, header: dict[str, Any]) -> None:
        self.value = header.get("best")


class MetricsLog(Extension):
    """Appends each epoch's record to ``metrics.jsonl`` (flushed to the disk) before the
    checkpoint is written; a resume trims the lines the checkpoint does not hold
    (:meth:`capsnet.training.RunFolder.trim_metrics`)."""

    priority = 300
    writer_only = True

    def epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        trainer.folder.append_metrics(record)


class Checkpoint(Extension):
    """Writes ``checkpoint.npz`` atomically after every epoch, the last of the epoch's
    writes, and on Ctrl-C between two steps (then says where, and ``resume_hint``)."""

    priority = -20  # the last write: after every extension's epoch_end, so their state is in it
    writer_only = True

    def __init__(self, resume_hint: str = "fit(resume=True)"):
        self.resume_hint = resume_hint

    def epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        trainer.save(trainer.folder.checkpoint)

    def interrupted(self, trainer: TrainerView) -> None:
        trainer.save(trainer.folder.checkpoint)
        print(f"\ninterrupted: state saved to {trainer.folder.checkpoint}; continue with {self.resume_hint}")


class ProgressBar(Extension):
    """A tqdm bar per epoch with the running loss and metrics, shown only when the output
    is a terminal (tqdm's ``disable=None``)."""

    priority = 500  # closed before the evaluation's bar and the lines printed after it
    writer_only = True

    def __init__(self) -> None:
        self.bar: Any = None

    def epoch_start(self, trainer: TrainerView) -> None:
        self.bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.step_in_epoch,
                        desc=f"epoch {trainer.epoch + 1}/{trainer.epochs}", unit="batch", disable=None, leave=False)

    def interval(self, trainer: TrainerView, values: dict[str, float]) -> None:
        self.bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()}, refresh=False)

    def step(self, trainer: TrainerView) -> None:
        self.bar.update(1)

    def _close(self, *args: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    observe = epoch_end = interrupted = finish = _close


class LogLine(Extension):
    """One line per epoch on stdout, flushed (a log file sees each epoch as it ends): epoch,
    the losses and metrics of each ``prefixes`` ("train", the evaluation's name), seconds
    and images per second. Also says at the start when the device is emulated."""

    priority = -100
    writer_only = True

    def __init__(self, prefixes: tuple[str, ...] = ("train", "test")):
        self.prefixes = prefixes

    def start(self, trainer: TrainerView) -> None:
        if backend.is_emulated() and trainer.backend_name == "cupy":
            print(f"device: {backend.describe_device(trainer.backend_name)}", flush=True)

    def epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        tqdm.write(self.summary(record, trainer.epochs))
        sys.stdout.flush()

    def summary(self, record: dict[str, Any], epochs: int) -> str:
        parts = [f"epoch {record['epoch']}/{epochs}"]
        for prefix in self.prefixes:
            values = [f"{key[len(prefix) + 1:]} {value:.4f}" for key, value in record.items()
                      if key.startswith(prefix + "_") and isinstance(value, float) and "second" not in key]
            if values:
                parts.append(prefix + " " + " ".join(values))
        parts.append(f"{record['epoch_seconds']:.1f} s, {record['train_images_per_second']:.1f} img/s")
        return " | ".join(parts)


class TensorBoard(Extension):
    """TensorBoard event files in ``logdir`` (the ``tensorboard`` extra, tensorboardX; refused
    at construction without it): the running loss and metrics and the learning rate at
    every host read, each epoch's record, and, when the task has ``images(model, batch)``
    (:class:`capsnet.models.CapsNetTask`), reconstructions of the first 8 examples of
    ``images_from`` each epoch. Written before the checkpoint; a resume drops what the
    stopped run wrote after its checkpoint. See :mod:`capsnet.training.tensorboard`."""

    priority = 400
    writer_only = True

    def __init__(self, logdir: str | Path, images_from: Any = None):
        summary_writer_class()  # a missing extra fails at once (on every process)
        self.logdir, self.images_from = Path(logdir), images_from
        self.log: TensorBoardLog | None = None

    def start(self, trainer: TrainerView) -> None:
        step = trainer.global_step
        self.log = TensorBoardLog(self.logdir, purge_step=step + 1 if step else None)

    def interval(self, trainer: TrainerView, values: dict[str, float]) -> None:
        self.log.interval(trainer.global_step, values, trainer.optimizer.lr)

    def epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        self.log.epoch(trainer.global_step, record)
        if self.images_from is not None and hasattr(trainer.task, "images"):
            shown = np.arange(min(8, len(self.images_from)), dtype=np.int64)
            self.log.images(trainer.global_step, trainer.task.images(trainer.model,
                                                                     self.images_from.batch(shown, None)))
            trainer.model.release()
        self.log.flush()

    def finish(self, trainer: TrainerView) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class OnStep(Extension):
    """Calls ``fn(trainer, epoch, step)`` after every optimizer step (``epoch`` the epochs
    done before this one, ``step`` the step's index in its epoch); raising
    KeyboardInterrupt there acts as Ctrl-C."""

    def __init__(self, fn: Callable[[TrainerView, int, int], None]):
        self.fn = fn

    def step(self, trainer: TrainerView) -> None:
        self.fn(trainer, trainer.epoch, trainer.step_in_epoch - 1)
