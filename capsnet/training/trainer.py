"""The training loop for any model built from :mod:`capsnet.layers`: :class:`Trainer`.

The loop keeps the clock (epoch, step, the host generator of the data order and
augmentation) and takes steps; the rest is delegated:

- one :class:`~capsnet.training.Updater` owns the step: forward, backward, the
  gradients reduced, the optimizer step, and the running sums on the device;
- one distribution **strategy** (:mod:`capsnet.training.strategy`) owns every MPI concern,
  so the loop reads the same on one process as on many;
- **extensions** (:mod:`capsnet.training.extensions`) fired on events own evaluation, the
  metrics log, the best model, checkpoints, progress bars, the log line, TensorBoard and
  the stop on divergence;
- the :class:`~capsnet.training.RunFolder` owns the files and their rules (one process
  holds a folder; the metrics log agrees with the checkpoint).

A resumed run replays the data order and augmentation exactly, so on one machine it ends
with the same weights, bit for bit, as one that never stopped. The protocols it asks for:

- **model**: a :class:`~capsnet.layers.Module`.
- **task**: ``task.forward(model, batch) -> (loss, outputs)`` and ``task.backward(model)``
  (:mod:`capsnet.training.tasks`); a loss module is wrapped in :class:`SupervisedTask`.
- **data**: a :class:`~capsnet.data.DataSource` (``len``, ``order(rng)``, ``batch(indices, rng)``).
- **metrics**: ``{name: fn}``, each the sum over a batch (:mod:`capsnet.training.evaluation`);
  reported as means per example, ``train_<name>`` and ``test_<name>``.

The loop's only host synchronisation is every ``log_every`` steps, when the running sums
and the pending input checks (:mod:`capsnet.checks`) come to the host in one transfer.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from capsnet import backend
from capsnet.layers.base import Module
from capsnet.layers.convolution import choices as convolution_choices
from capsnet.replicas import replica_kind
from capsnet.training import extensions as ext
from capsnet.training.checkpoint import CheckpointError, config_differences, load_checkpoint, save_checkpoint
from capsnet.training.evaluation import Metric, add, count_correct, mean
from capsnet.training.run_folder import RunFolder
from capsnet.training.strategy import strategy_for
from capsnet.training.tasks import SupervisedTask
from capsnet.training.updater import Updater

__all__ = ["LOOP_VERSION", "Trainer"]

# Written into every checkpoint the loop saves; a checkpoint without it is from
# capsnet 0.1's MNIST-only trainer (see Trainer.upgrade_header).
LOOP_VERSION = 2


class Trainer:
    """Trains ``model`` with ``task`` on ``train_data`` for ``epochs``, in ``run_dir``.

    - ``task``: a task, or a loss module (wrapped in :class:`SupervisedTask`).
    - ``optimizer``: a :class:`capsnet.optim.Optimizer` over the model's parameters;
      ``schedule``: an :class:`capsnet.optim.LRSchedule` stepped after every epoch.
    - ``eval_data``: evaluated after every epoch (:class:`~capsnet.training.Evaluate`,
      ``eval_name`` in place of "test"); ``best`` names the record entry that picks
      ``best.npz`` (default ``test_accuracy`` when there is an accuracy metric, else
      ``test_loss``; see :class:`~capsnet.training.BestModel`).
    - ``seed``: seeds the host generator of the data order and augmentation.
    - ``config``: a JSON-able description of the run, written to ``config.json`` (with
      ``"device"``) and the checkpoint; ``must_match`` (default: ``config``): what a resumed
      run must share with its checkpoint, else the resume is refused with the differences.
    - ``progress``: tqdm bars (on a terminal only); ``log``: one summary line per epoch on stdout.
    - ``comm`` (an MPI communicator, :func:`capsnet.training.distributed.world`) or
      ``strategy`` (:mod:`capsnet.training.strategy`): how processes share the work;
      default one process. Only the writing process (rank 0) writes files and logs.
    - ``tensorboard``: a folder for TensorBoard event files (:class:`~capsnet.training.TensorBoard`).
    - ``stop_on_nan``: stop at the first non-finite training loss, writing nothing
      (:class:`~capsnet.training.TerminateOnNaN`; default True).
    - ``on_step(trainer, epoch, step)``: called after every optimizer step (:class:`~capsnet.training.OnStep`).
    - ``extensions``: more :class:`~capsnet.training.Extension` objects (also :meth:`extend`).
    - ``replicas``: where the model's replicas run on the host's cores, ``"threads"`` or
      ``"processes"`` (default: :func:`capsnet.replicas.replica_kind`, the model's choice);
      both compute the same bits, so a run may resume with the other.

    ``fit(resume=False)`` returns the metrics records of the epochs it ran. The backend
    is the model's (scoped with ``backend.use`` while fitting).
    """

    def __init__(self, model: Module, task: Any, optimizer: Any, train_data: Any, run_dir: str | Path, *,
                 epochs: int, batch_size: int, eval_data: Any = None, schedule: Any = None,
                 metrics: Mapping[str, Metric] | None = None, seed: int = 0, log_every: int = 10,
                 config: dict[str, Any] | None = None, must_match: dict[str, Any] | None = None,
                 best: str | None = None, eval_name: str = "test", progress: bool = True, log: bool = True,
                 on_step: Callable[["Trainer", int, int], None] | None = None, comm: Any = None,
                 strategy: Any = None, tensorboard: str | Path | None = None, stop_on_nan: bool = True,
                 extensions: Iterable[ext.Extension] = (), replicas: str | None = None):
        replica_kind(replicas)  # an unknown kind fails here, not at the first step
        task = _check_arguments(model, task, train_data, eval_data, epochs=epochs, batch_size=batch_size,
                                log_every=log_every)
        self.model, self.task, self.optimizer, self.schedule = model, task, optimizer, schedule
        self.train_data, self.eval_data = train_data, eval_data
        self.epochs, self.batch_size, self.log_every, self.seed = epochs, batch_size, log_every, seed
        self.metrics = dict(metrics if metrics is not None else {"accuracy": count_correct})
        self.config = config
        self.must_match = must_match if must_match is not None else config
        self.strategy = strategy if strategy is not None else strategy_for(comm)
        if self.strategy.size > batch_size:
            raise ValueError(f"Trainer batch_size ({batch_size}) must be at least the number of processes "
                             f"({self.strategy.size}): each takes a slice of every batch")
        self.progress = progress and self.strategy.writes
        self.folder = RunFolder(run_dir)
        params = model.parameters()
        self.backend_name = backend.backend_of(params[0].data) if params else backend.get_backend()
        self.updater = Updater(model, task, optimizer, self.metrics, self.strategy, replicas=replicas)
        self.checkpointer = ext.Checkpoint()
        self.best = ext.BestModel(best or (f"{eval_name}_accuracy" if "accuracy" in self.metrics
                                           else f"{eval_name}_loss"))
        self.extensions: list[ext.Extension] = []
        defaults = [self.best, ext.MetricsLog(), self.checkpointer]
        defaults += [ext.TerminateOnNaN()] if stop_on_nan else []
        defaults += [ext.Evaluate(eval_data, eval_name)] if eval_data is not None else []
        defaults += [ext.ProgressBar()] if progress else []
        defaults += [ext.LogLine(("train", eval_name))] if log else []
        defaults += [ext.TensorBoard(tensorboard, eval_data)] if tensorboard is not None else []
        defaults += [ext.OnStep(on_step)] if on_step is not None else []
        for extension in [*defaults, *extensions]:
            self.extend(extension)
        self.stop_requested = False
        self._fresh()

    def extend(self, extension: ext.Extension) -> "Trainer":
        """Add an extension (see :mod:`capsnet.training.extensions`); returns the trainer."""
        if not isinstance(extension, ext.Extension):
            raise TypeError(f"Trainer.extend needs a capsnet.training.Extension, got {type(extension).__name__}")
        self.extensions.append(extension)
        self.extensions.sort(key=lambda e: -e.priority)  # stable: registration order within a priority
        return self

    def _fire(self, event: str, *args: Any) -> None:
        """Call ``event`` on every extension (the writer-only ones on the writing process only).
        A KeyboardInterrupt from one (a stop asked after this step) is raised after the
        others have seen the event, so that every extension's state counts the same steps;
        from a writer-only one, which runs on one process, it becomes ``stop_requested``,
        which every process agrees on."""
        interrupt = None
        for extension in self.extensions:
            if self.strategy.writes or not extension.writer_only:
                try:
                    getattr(extension, event)(self, *args)
                except KeyboardInterrupt as exc:
                    if extension.writer_only:  # one process alone cannot stop the others: they agree
                        self.stop_requested = True  # after the next step, or at the epoch's end
                    else:
                        interrupt = exc
        if interrupt is not None:
            raise interrupt

    # -- the loop ---------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train until ``epochs`` (continuing from the checkpoint with ``resume``); returns
        the metrics records of the epochs run now."""
        history: list[dict[str, Any]] = []
        with backend.use(self.backend_name), self._holding_folder(), self._noting_ctrl_c():
            self._start(resume)
            self.updater.start()
            try:
                self._fire("start")
                while self.epoch < self.epochs:
                    history.append(self._run_epoch())
                    self._record_convolutions()
                    if self.epoch < self.epochs and self.strategy.agree(self.stop_requested):
                        raise KeyboardInterrupt  # noted during the evaluation at the epoch's end
            except KeyboardInterrupt:
                self.strategy.sync_buffers(self.model)
                self._fire("interrupted")
                raise
            except ext.TrainingDiverged:
                raise  # every process read the same sums: they all stop here
            except Exception as exc:
                self.strategy.fail(exc)  # under MPI: end every process, never leave them waiting
                raise
            finally:
                self._fire("finish")
                self.updater.close()
        return history

    def _run_epoch(self) -> dict[str, Any]:
        batches = self._epoch_batches()
        self.model.train()
        # an epoch resumed after a stop counts the seconds and images before it (self.running,
        # kept in the checkpoint), so its record gives the epoch's whole time and rate
        start, images = time.perf_counter() - self.running.get("seconds", 0.0), self.running.get("images", 0)
        self._fire("epoch_start")
        try:
            for idx in batches[self.step_in_epoch:]:
                stop = self.updater.update(self.train_data.batch(idx, self.rng), self.stop_requested)
                images += len(idx)
                self.step_in_epoch += 1
                if self.step_in_epoch % self.log_every == 0 or self.step_in_epoch == len(batches):
                    self._fire("interval", self._read())
                self._fire("step")
                if stop:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self._read()  # the steps taken count in the checkpoint's running sums
            self.running.update(seconds=time.perf_counter() - start, images=images)
            raise
        train_seconds = time.perf_counter() - start
        seen = self.running["seen"]
        record: dict[str, Any] = {"epoch": self.epoch + 1, "lr": self.optimizer.lr,
                                  "train_loss": self.running["loss"] / max(seen, 1)}
        record.update({f"train_{name}": mean(self.running["metrics"].get(name, 0.0), seen) for name in self.metrics})
        self.strategy.sync_buffers(self.model)
        self._fire("observe", record)
        record.update(train_seconds=train_seconds,
                      train_images_per_second=images / train_seconds if train_seconds > 0 else math.nan,
                      epoch_seconds=time.perf_counter() - start, world_size=self.strategy.size,
                      host_threads=self.updater.threads, replicas=self.updater.kind)
        self.epoch, self.step_in_epoch, self.epoch_rng_state = self.epoch + 1, 0, None
        self.running = {"loss": 0.0, "seen": 0, "metrics": {}}
        if self.schedule is not None:
            self.schedule.step()
        self._fire("epoch_end", record)
        return record

    def _read(self) -> dict[str, float]:
        """Bring the steps' sums to the host (the loop's one synchronisation) and return the
        epoch's running mean loss and scalar metrics."""
        loss, seen, sums = self.updater.read()
        self.running["loss"] += loss
        self.running["seen"] += seen
        for name, value in sums.items():
            self.running["metrics"][name] = add(self.running["metrics"].get(name), value)
        n = max(self.running["seen"], 1)
        out = {"loss": self.running["loss"] / n}
        out.update({name: total / n for name, total in self.running["metrics"].items() if not isinstance(total, list)})
        return out

    def _epoch_batches(self) -> list[np.ndarray]:
        """This epoch's batches of indices; on a mid-epoch resume the order is redrawn
        from the generator state saved at the epoch's start, and the stream goes on
        from where the checkpoint left it."""
        if self.step_in_epoch == 0:
            self.epoch_rng_state = self.rng.bit_generator.state
            order = self.train_data.order(self.rng)
        else:
            replay = np.random.default_rng()
            replay.bit_generator.state = self.epoch_rng_state
            order = self.train_data.order(replay)
        order = np.asarray(order)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (the last batch may be short)."""
        return -(-len(self.train_data) // self.batch_size)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken since the run began (restored on a resume)."""
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def checkpoint_path(self) -> Path:
        return self.folder.checkpoint

    # -- the run folder, Ctrl-C ----------------------------------------------------
    @contextlib.contextmanager
    def _holding_folder(self) -> Iterator[None]:
        """The writing process holds the run folder's lock for the whole fit."""
        try:
            yield
        finally:
            self.folder.unlock()

    @contextlib.contextmanager
    def _noting_ctrl_c(self) -> Iterator[None]:
        """A Ctrl-C is only noted: the step under way finishes (every process agrees to stop
        after the same step), so the checkpoint holds the state between two steps and the
        resume is exact. A second Ctrl-C stops at once. Only where Ctrl-C would raise
        KeyboardInterrupt (not where it is ignored, as for a shell's background job, nor
        off the main thread, where handlers cannot be set)."""
        self.stop_requested = False
        previous = signal.getsignal(signal.SIGINT)
        noting = threading.current_thread() is threading.main_thread() and previous is signal.default_int_handler

        def note(signum: int, frame: Any) -> None:
            self.stop_requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        if noting:
            signal.signal(signal.SIGINT, note)
        try:
            yield
        finally:
            if noting:
                signal.signal(signal.SIGINT, previous)

    # -- state: fresh, read from a checkpoint, saved --------------------------------
    def _fresh(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.epoch, self.step_in_epoch = 0, 0
        self.epoch_rng_state: dict | None = None
        self.running: dict[str, Any] = {"loss": 0.0, "seen": 0, "metrics": {}}
        for extension in self.extensions:
            extension.load_state_dict({})

    def _start(self, resume: bool) -> None:
        """The writing process takes the run folder, checks it and reads the checkpoint;
        every process then starts from its state (its weights shared on a fresh start).
        Only then does the writer touch the folder: the metrics log trimmed to the
        checkpoint (or cleared), config.json written."""
        def read() -> tuple:
            self.folder.check_start(resume)  # a refusal leaves no folder and no lock file behind
            self.folder.lock()
            self.folder.check_start(resume)  # again, now that no other process can change it
            return ("resume", *self._read_checkpoint(self.folder.checkpoint)) if resume else ("fresh",)

        payload = self.strategy.on_writer(read)
        if payload[0] == "resume":
            self._apply(*payload[1:])
        else:
            self._fresh()
            self.strategy.share_weights(self.model)
        if self.strategy.writes:
            if resume:
                self.folder.trim_metrics(self.epoch)
            else:
                self.folder.clear_metrics()
            self._written_convolutions: list | None = None
            self._write_config()

    def _write_config(self, convolutions: list | None = None) -> None:
        if self.config is None:
            return
        record = {**self.config, "device": backend.describe_device(self.backend_name)}
        if convolutions:
            record["convolution_algorithms"] = convolutions  # what "auto" chose (capsnet.layers.convolution)
        self.folder.write_config(record)

    def _record_convolutions(self) -> None:
        """Add the convolution algorithms chosen so far to config.json once they are known
        (after the first epoch) and whenever they change."""
        if not self.strategy.writes:
            return
        chosen = convolution_choices()
        if chosen != getattr(self, "_written_convolutions", None):
            self._written_convolutions = chosen
            self._write_config(chosen)

    def upgrade_header(self, header: dict[str, Any], path: Path) -> dict[str, Any]:
        """Bring a checkpoint header written by an older version to this loop's form,
        or raise CheckpointError saying why it cannot be resumed. Subclasses that
        know older formats (the MNIST trainer does) override it."""
        version = header.get("loop_version")
        if version != LOOP_VERSION:
            raise CheckpointError(f"{path} was written by a training loop this version cannot resume "
                                  f"(loop_version {version!r}, expected {LOOP_VERSION}); start a new run folder")
        return header

    def _read_checkpoint(self, path: Path) -> tuple[dict, dict, dict]:
        """(header, model_state, optimizer_state) of the checkpoint, refused with the
        differences when it comes from another configuration."""
        header, model_state, optim_state = load_checkpoint(path)
        header = self.upgrade_header(header, path)
        wanted = json.loads(json.dumps(self.must_match)) if self.must_match is not None else None
        saved = header.get("must_match")
        if isinstance(saved, dict) and isinstance(wanted, dict):
            diffs = config_differences(saved, wanted)
        else:
            diffs = [] if saved == wanted else [f"configuration: checkpoint has {saved!r}, asked for {wanted!r}"]
        if diffs:
            raise CheckpointError(f"{path} comes from a different configuration: " + "; ".join(diffs)
                                  + ". Resume with the checkpoint's settings, or start a new run folder.")
        return header, model_state, optim_state

    def _apply(self, header: dict, model_state: dict, optim_state: dict) -> None:
        self._fresh()
        try:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optim_state)
            if self.schedule is not None:
                self.schedule.load_state_dict(header["schedule"])
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = header["rng_state"]
            self.epoch, self.step_in_epoch = header["epoch"], header["step_in_epoch"]
            self.epoch_rng_state = header.get("epoch_rng_state")
            self.running = header["running"]
            for extension in self.extensions:
                extension.load_state_dict(header)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.folder.checkpoint} does not fit this model, optimizer or loop: "
                                  f"{exc}") from exc

    def save(self, path: str | Path) -> None:
        """Write the whole resumable state (weights, optimizer, clock, generator, running
        sums, the extensions' state) to ``path``, atomically."""
        header = {"loop_version": LOOP_VERSION, "config": self.config, "must_match": self.must_match,
                  "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                  "rng_state": self.rng.bit_generator.state, "epoch_rng_state": self.epoch_rng_state,
                  "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                  "running": self.running}
        for extension in self.extensions:
            header.update(extension.state_dict())
        header.update(world_size=self.strategy.size, host_threads=self.updater.threads)
        save_checkpoint(path, model_state=self.model.state_dict(), optimizer_state=self.optimizer.state_dict(),
                        header=header)
        self._fire("saved", Path(path))


def _check_arguments(model: Any, task: Any, train_data: Any, eval_data: Any, **counts: Any) -> Any:
    """The task (a loss module wrapped in SupervisedTask), after checking every argument
    against its protocol; the errors name the argument and what came."""
    if not isinstance(model, Module):
        raise TypeError(f"Trainer needs a capsnet Module as model, got {type(model).__name__}")
    if isinstance(task, Module):  # a loss module: loss(outputs, targets)
        task = SupervisedTask(task)
    elif not (hasattr(task, "forward") and hasattr(task, "backward")):
        raise TypeError("Trainer needs a task with forward(model, batch) and backward(model), or a loss "
                        f"module; got {type(task).__name__}")
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Trainer {name} must be an integer >= 1, got {value!r}")
    for name, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is not None and not all(hasattr(data, a) for a in ("__len__", "order", "batch")):
            raise TypeError(f"Trainer {name} must be a data source with __len__, order(rng) and "
                            f"batch(indices, rng) (see capsnet.data.DataSource), got {type(data).__name__}")
    if len(train_data) < 1:
        raise ValueError("Trainer train_data is empty")
    return task
