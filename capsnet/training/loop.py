"""A training loop for any model built from :mod:`capsnet.layers`.

:class:`Trainer` trains a model, with a task (its loss), on a data source, in a run
folder: ``checkpoint.npz`` (written atomically after every epoch and on Ctrl-C,
mid-epoch included), ``best.npz`` (the best evaluation so far), ``metrics.jsonl``
(one JSON line per epoch) and ``config.json``. ``fit(resume=True)`` continues
from the checkpoint and replays the data order and augmentation exactly, so on
the CPU a resumed run ends with the same weights, bit for bit, as one that never
stopped. The protocols it asks for:

- **model**: a :class:`~capsnet.layers.Module` (``forward``, ``backward``,
  ``parameters``, ``state_dict``/``load_state_dict``, ``train``/``eval``, ``release``).
- **task**: ``task.forward(model, batch) -> (loss, outputs)``, with ``loss`` a 0-d
  array, caching what the backward needs only when the model is in training
  mode; ``task.backward(model)`` backpropagates that loss into the parameters'
  gradients. :class:`SupervisedTask` makes one from any loss module
  (``loss(outputs, targets)``, ``loss.backward()``), :class:`CapsNetTask` is the
  paper's (margin plus reconstruction loss, decoder masked by the label).
- **data**: a :class:`~capsnet.data.DataSource` (``len``, ``order(rng)``,
  ``batch(indices, rng)``), batches ``(inputs, targets, ...)`` on the model's device.
- **metrics**: ``{name: fn}``, with ``fn(outputs, batch)`` the *sum* over the
  batch's examples of the quantity (a 0-d array, or any shape: a confusion matrix
  of counts), computed on the device; the loop reports the mean per example as
  ``train_<name>`` and ``test_<name>``. :func:`count_correct` gives accuracy.

The loop's only host synchronisation is every ``log_every`` steps, when the
running loss, the metric sums and the pending input checks (:mod:`capsnet.checks`)
are brought to the host in one transfer. ``tensorboard=DIR`` writes TensorBoard
curves of those values (:mod:`capsnet.training.tensorboard`).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from capsnet import backend, checks
from capsnet.layers.base import Module
from capsnet.training.checkpoint import CheckpointError, config_differences, load_checkpoint, save_checkpoint
from capsnet.layers.stochastic import batch_slice
from capsnet.replicas import replicate
from capsnet.training.distributed import GradientBuffer, LocalComm, fail, shard
from capsnet.training.tensorboard import TensorBoardLog, summary_writer_class

__all__ = [
    "CapsNetTask",
    "Metric",
    "SupervisedTask",
    "Trainer",
    "confusion_counts",
    "count_correct",
    "evaluate",
    "scores_of",
]

Metric = Callable[[Any, tuple], Any]

# Written into every checkpoint the loop saves; a checkpoint without it is from
# capsnet 0.1's MNIST-only trainer (see Trainer.upgrade_header).
LOOP_VERSION = 2


def scores_of(outputs: Any) -> Any:
    """The class scores in a model's outputs: the outputs, or the first of a tuple
    (CapsNet gives (lengths, reconstructions))."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


def count_correct(outputs: Any, batch: tuple) -> Any:
    """How many examples of the batch have their largest score at the label (``batch[1]``)."""
    return (scores_of(outputs).argmax(axis=1) == batch[1]).sum()


def confusion_counts(n_classes: int) -> Metric:
    """A metric summing the (n_classes, n_classes) confusion counts, rows the true class."""
    def confusion(outputs: Any, batch: tuple) -> Any:
        xp = backend.get_array_module(batch[1])
        pred = scores_of(outputs).argmax(axis=1)
        cells = batch[1].astype(xp.int64) * n_classes + pred  # int64: small label types would wrap
        return xp.bincount(cells, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    return confusion


def _backward(model: Module, grad: Any) -> None:
    if isinstance(grad, tuple):
        model.backward(*grad)
    else:
        model.backward(grad)


class SupervisedTask:
    """A task from a loss module: ``outputs = model(batch[0])``, loss ``loss(outputs, batch[1])``.

    ``loss.backward()`` gives the gradient of the outputs, passed on to
    ``model.backward`` (unpacked when it is a tuple). The loss caches its inputs
    only while the model is in training mode.
    """

    def __init__(self, loss: Module):
        if not (hasattr(loss, "forward") and hasattr(loss, "backward")):
            raise TypeError(f"SupervisedTask needs a loss with forward and backward, got {type(loss).__name__}")
        self.loss = loss

    def forward(self, model: Module, batch: tuple) -> tuple[Any, Any]:
        if isinstance(self.loss, Module):
            self.loss.train(model.training)
        outputs = model(batch[0])
        return self.loss(outputs, batch[1]), outputs

    def backward(self, model: Module) -> None:
        _backward(model, self.loss.backward())


class CapsNetTask:
    """The paper's objective for a :class:`~capsnet.models.CapsNet`: margin loss on the
    capsule lengths plus ``recon_weight`` times the reconstruction loss. The decoder
    sees the capsule of the label in training and the longest one in evaluation.

    For a CapsNet with ``digits=T`` > 1 (MultiMNIST), batches are ``(images, labels
    (B, T), digit_1, ..., digit_T)``, each digit alone on its canvas: every digit is a
    positive of the margin loss and the reconstruction loss sums the T digits' squared
    errors, each against the decoder's run for that digit. In evaluation the decoder
    sees the T longest capsules in increasing class order, so the targets are put in
    increasing label order too.
    """

    def __init__(self, recon_weight: float = 0.0005):
        from capsnet.models.capsnet import CapsNetLoss  # noqa: PLC0415 - models import training's protocols

        self.criterion = CapsNetLoss(recon_weight)

    def forward(self, model: Module, batch: tuple) -> tuple[Any, Any]:
        x, y = batch[0], batch[1]
        self.criterion.train(model.training)
        lengths, recon = model(x, y)
        return self.criterion(lengths, recon, y, self.targets(model, batch)), (lengths, recon)

    @staticmethod
    def targets(model: Module, batch: tuple) -> Any:
        """What the reconstructions are compared with: the images, or (B, T, C, H, W)."""
        x, y = batch[0], batch[1]
        if getattr(y, "ndim", 1) == 1:
            return x
        t = y.shape[1]
        if len(batch) != 2 + t:
            raise ValueError(f"CapsNetTask with labels of shape {tuple(y.shape)} expected batches (images, labels, "
                             f"then the {t} digits alone), got {len(batch)} arrays")
        xp = backend.get_array_module(x)
        digits = xp.stack(batch[2:], axis=1)
        if model.training:
            return digits
        order = xp.argsort(y, axis=1)  # evaluation: the decoder's runs are in increasing class order
        return xp.take_along_axis(digits, order.reshape(*order.shape, *(1,) * (digits.ndim - 2)), axis=1)

    def backward(self, model: Module) -> None:
        model.backward(*self.criterion.backward())

    @staticmethod
    def images(model: Module, batch: tuple) -> dict[str, np.ndarray]:
        """A few inputs and their reconstructions from the longest capsule (the T longest,
        merged, for T digits), host arrays (N, C, H, W): what TensorBoard shows each epoch.
        The model's mode is restored."""
        x = batch[0]
        recon = model.reconstruct(x)
        if recon.ndim == 5:  # (B, T, C, H, W): the T digits' reconstructions on one canvas
            recon = recon.sum(axis=1)
        return {"inputs": backend.to_numpy(x), "reconstructions": backend.to_numpy(recon)}


def _host(arr: np.ndarray) -> float | list:
    """A host sum as a JSON-able value: a float, or nested lists."""
    return float(arr) if arr.ndim == 0 else arr.astype(float).tolist()


def _fetch(values: list[Any]) -> list[np.ndarray]:
    """Device values (0-d or any shape) on the host as float64, in one transfer: the
    values are packed into one device vector first, so the host waits once."""
    device = [v for v in values if backend.is_cupy_array(v)]
    packed = iter(())
    if device:
        xp = backend.get_array_module(*device)
        flat = backend.to_numpy(xp.concatenate([v.reshape(-1) for v in device], dtype=xp.float64))
        sizes = np.cumsum([v.size for v in device])[:-1]
        packed = iter(np.split(flat, sizes))
    return [next(packed).reshape(v.shape) if backend.is_cupy_array(v) else np.asarray(v, dtype=np.float64)
            for v in values]


def _fetch_sums(loss_sum: Any, sums: dict[str, Any]) -> tuple[float, dict[str, float | list]]:
    """The loss and metric sums on the host, with the pending input checks settled (they
    raise if an input failed), all in one transfer."""
    pending = checks.pending()
    host = _fetch([loss_sum, *sums.values(), *pending])
    checks.settle([int(n) for n in host[1 + len(sums):]])
    return float(host[0]), {name: _host(value) for name, value in zip(sums, host[1:1 + len(sums)])}


def _add(total: float | list | None, value: float | list) -> float | list:
    if total is None:
        return value
    if isinstance(value, list):
        return (np.asarray(total) + np.asarray(value)).tolist()
    return total + value


def _mean(total: float | list, n: int) -> float | list:
    if isinstance(total, list):
        return (np.asarray(total) / max(n, 1)).tolist()
    return total / max(n, 1)


def _accumulate(sums: dict[str, Any], metrics: Mapping[str, Metric], outputs: Any, batch: tuple) -> None:
    """Add each metric's sum over this batch into ``sums`` (device arrays: no host sync)."""
    for name, fn in metrics.items():
        value = fn(outputs, batch)
        sums[name] = value if name not in sums else sums[name] + value


def _combine(parts: list) -> Any:
    """Sum per-rank host values (floats, ints or nested lists) in rank order."""
    total = parts[0]
    for part in parts[1:]:
        total = _add(total, part)
    return total


def evaluate(model: Module, task: Any, data: Any, *, batch_size: int = 100,
             metrics: Mapping[str, Metric] | None = None, progress: bool = False,
             desc: str = "test", comm: Any = None) -> dict[str, Any]:
    """Mean loss and metrics of ``model`` on all of ``data``, unaugmented, in eval mode.

    Returns ``{"loss": mean, name: mean per example, ..., "n": examples}`` (a metric of
    any shape comes back as nested lists), and ``"totals"``: each metric's plain sum.
    The model is left as it was found: its mode is restored, and what evaluation
    allocated (the Fourier convolution's scratch and weight spectrum) is released.
    Under MPI (``comm``, see :mod:`capsnet.training.distributed`) each rank evaluates
    its own contiguous share and the sums are combined; every rank gets the result.
    """
    comm = comm if comm is not None else LocalComm()
    metrics = dict(metrics if metrics is not None else {"accuracy": count_correct})
    n = len(data)
    if n < 1:
        raise ValueError("evaluate: the data source is empty")
    lo, hi = shard(n, comm.rank, comm.size)
    was_training = model.training
    model.eval()
    try:
        xp = backend.get_array_module(model.parameters()[0].data) if model.parameters() else np
        loss_sum = xp.zeros((), dtype=xp.float64)
        sums: dict[str, Any] = {}
        starts = range(lo, hi, batch_size)
        for start in tqdm(starts, desc=desc, leave=False, disable=None if progress else True, unit="batch"):
            idx = np.arange(start, min(start + batch_size, hi), dtype=np.int64)
            batch = data.batch(idx, None)
            loss, outputs = task.forward(model, batch)
            loss_sum += loss * len(idx)
            _accumulate(sums, metrics, outputs, batch)
        local = _fetch_sums(loss_sum, sums)
        parts = comm.allgather(local)
        loss_total = _combine([part[0] for part in parts])
        totals = {name: _combine([part[1][name] for part in parts if name in part[1]]) for name in metrics}
        result: dict[str, Any] = {"loss": loss_total / n}
        result.update({name: _mean(total, n) for name, total in totals.items()})
        result["n"] = n
        result["totals"] = totals
        return result
    except Exception as exc:
        fail(comm, exc)  # under MPI: the other ranks would wait in the allgather
        raise
    finally:
        model.train(was_training)
        model.release()


class Trainer:
    """Trains ``model`` with ``task`` on ``train_data`` for ``epochs``, in ``run_dir``.

    Arguments besides the protocols of the module docstring:

    - ``task``: a task, or a loss module, which is wrapped in :class:`SupervisedTask`.
    - ``optimizer``: a :class:`capsnet.optim.Optimizer` over the model's parameters;
      ``schedule``: an :class:`capsnet.optim.LRSchedule` stepped after every epoch.
    - ``eval_data``: evaluated after every epoch (``test_loss``, ``test_<metric>``,
      with ``eval_name`` in place of "test"); ``best`` names the record entry that
      picks ``best.npz`` (default: ``test_accuracy`` when there is an accuracy
      metric, else ``test_loss``; entries ending in "loss" or "error" are better
      lower, the rest higher).
    - ``seed``: seeds the host generator of the data order and augmentation.
    - ``config``: a JSON-able description of the run, written to ``config.json`` (with
      ``"device"``, :func:`capsnet.backend.describe_device`'s line) and
      the checkpoint; ``must_match`` (default: ``config``): what a resumed run must
      share with its checkpoint, else the resume is refused with the differences.
    - ``on_step(trainer, epoch, step)``: called after every optimizer step (raising
      KeyboardInterrupt there acts as Ctrl-C; the tests do).
    - ``progress``: tqdm bars, shown only when the output is a terminal (tqdm's
      ``disable=None``); ``log``: one summary line per epoch on stdout, whatever
      ``progress`` says (epoch, losses, metrics, seconds, images/s), for log files.
    - ``comm``: the MPI communicator for data-parallel training
      (:func:`capsnet.training.distributed.world`); default one process. Each rank
      computes its slice of every batch, gradients are summed with one Allreduce per
      step, evaluation is sharded, and only rank 0 writes files and logs.
    - ``tensorboard``: a folder for TensorBoard event files (the ``tensorboard`` extra,
      tensorboardX; refused at construction without it): the running loss and metrics
      and the learning rate every ``log_every`` steps, each epoch's record, and, when the
      task has ``images(model, batch)`` (:class:`CapsNetTask`), a few reconstructions of
      the evaluation data each epoch. See :mod:`capsnet.training.tensorboard`.

    ``fit(resume=False)`` returns the metrics records of the epochs it ran. The
    backend is the model's (scoped with ``backend.use`` while fitting).
    """

    def __init__(self, model: Module, task: Any, optimizer: Any, train_data: Any, run_dir: str | Path, *,
                 epochs: int, batch_size: int, eval_data: Any = None, schedule: Any = None,
                 metrics: Mapping[str, Metric] | None = None, seed: int = 0, log_every: int = 10,
                 config: dict[str, Any] | None = None, must_match: dict[str, Any] | None = None,
                 best: str | None = None, eval_name: str = "test", progress: bool = True, log: bool = True,
                 on_step: Callable[["Trainer", int, int], None] | None = None, comm: Any = None,
                 tensorboard: str | Path | None = None):
        if not isinstance(model, Module):
            raise TypeError(f"Trainer needs a capsnet Module as model, got {type(model).__name__}")
        if isinstance(task, Module):  # a loss module: loss(outputs, targets)
            task = SupervisedTask(task)
        elif not (hasattr(task, "forward") and hasattr(task, "backward")):
            raise TypeError("Trainer needs a task with forward(model, batch) and backward(model), or a loss "
                            f"module; got {type(task).__name__}")
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("log_every", log_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Trainer {name} must be an integer >= 1, got {value!r}")
        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None and not all(hasattr(data, a) for a in ("__len__", "order", "batch")):
                raise TypeError(f"Trainer {name} must be a data source with __len__, order(rng) and "
                                f"batch(indices, rng) (see capsnet.data.DataSource), got {type(data).__name__}")
        if len(train_data) < 1:
            raise ValueError("Trainer train_data is empty")
        self.model, self.task, self.optimizer, self.schedule = model, task, optimizer, schedule
        self.train_data, self.eval_data = train_data, eval_data
        self.epochs, self.batch_size, self.log_every, self.seed = epochs, batch_size, log_every, seed
        self.metrics = dict(metrics if metrics is not None else {"accuracy": count_correct})
        self.config = config
        self.must_match = must_match if must_match is not None else config
        self.eval_name = eval_name
        if best is None:
            best = f"{eval_name}_accuracy" if "accuracy" in self.metrics else f"{eval_name}_loss"
        self.best_key = best
        self.comm = comm if comm is not None else LocalComm()
        lead = self.comm.rank == 0  # only rank 0 writes files, bars and log lines
        self.progress, self.log, self.on_step = progress and lead, log and lead, on_step
        if self.comm.size > batch_size:
            raise ValueError(f"Trainer batch_size ({batch_size}) must be at least the number of MPI ranks "
                             f"({self.comm.size}): each rank takes a slice of every batch")
        self.run_dir = Path(run_dir)
        self.checkpoint_path = self.run_dir / "checkpoint.npz"
        self.best_path = self.run_dir / "best.npz"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        params = model.parameters()
        self.backend_name = backend.backend_of(params[0].data) if params else backend.get_backend()
        self.tensorboard_dir = Path(tensorboard) if tensorboard is not None else None
        if self.tensorboard_dir is not None:
            summary_writer_class()  # on every rank: a missing extra fails them all, at the start
        self._tb: TensorBoardLog | None = None

    # -- state ------------------------------------------------------------------
    def _fresh(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.epoch, self.step_in_epoch = 0, 0
        self.epoch_rng_state: dict | None = None
        self.running: dict[str, Any] = {"loss": 0.0, "seen": 0, "metrics": {}}
        self.best_value: float | None = None

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
            raise CheckpointError(
                f"{path} comes from a different configuration: " + "; ".join(diffs)
                + ". Resume with the checkpoint's settings, or start a new run folder."
            )
        return header, model_state, optim_state

    def _apply(self, header: dict, model_state: dict, optim_state: dict, path: Path) -> None:
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
            self.best_value = header.get("best")
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path} does not fit this model, optimizer or loop: {exc}") from exc

    def _start(self, resume: bool) -> None:
        """Rank 0 checks the run folder and reads the checkpoint; every rank then starts
        from rank 0's state (its weights broadcast on a fresh start, as on a resume)."""
        payload: tuple = ("fresh",)
        if self.comm.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                if resume:
                    if not self.checkpoint_path.exists():
                        raise CheckpointError(
                            f"--resume: no checkpoint in {self.run_dir} (expected {self.checkpoint_path.name})")
                    payload = ("resume", *self._read_checkpoint(self.checkpoint_path))
                else:
                    if self.checkpoint_path.exists():
                        raise CheckpointError(f"{self.run_dir} already holds a run: pass --resume to continue it, "
                                              "or choose another --out")
                    self.metrics_path.unlink(missing_ok=True)
                    if self.comm.size > 1:
                        payload = ("fresh", self.model.state_dict())
            except CheckpointError as exc:
                payload = ("error", str(exc))
        payload = self.comm.bcast(payload)
        if payload[0] == "error":
            raise CheckpointError(payload[1])
        if payload[0] == "resume":
            self._apply(*payload[1:], self.checkpoint_path)
        else:
            self._fresh()
            if len(payload) > 1:
                self.model.load_state_dict(payload[1])

    def _save(self, path: Path) -> None:
        save_checkpoint(path, model_state=self.model.state_dict(), optimizer_state=self.optimizer.state_dict(),
                        header={"loop_version": LOOP_VERSION, "config": self.config, "must_match": self.must_match,
                                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                                "rng_state": self.rng.bit_generator.state, "epoch_rng_state": self.epoch_rng_state,
                                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                                "running": self.running, "best": self.best_value, "best_key": self.best_key,
                                "world_size": self.comm.size, "host_threads": self._host_threads()})

    # -- the loop ---------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train until ``epochs``; returns the metrics records of the epochs run now."""
        with backend.use(self.backend_name):
            self._start(resume)
            if self.tensorboard_dir is not None and self.comm.rank == 0:
                # on a resume, TensorBoard drops what the stopped run wrote after its checkpoint
                start = self.global_step
                self._tb = TensorBoardLog(self.tensorboard_dir, purge_step=start + 1 if start else None)
            if self.config is not None and self.comm.rank == 0:
                record = {**self.config, "device": backend.describe_device(self.backend_name)}
                (self.run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
            if self.log and backend.is_emulated() and self.backend_name == "cupy":
                print(f"device: {backend.describe_device(self.backend_name)}", flush=True)
            self._grads = GradientBuffer(self.model.parameters(), self.comm) if self.comm.size > 1 else None
            # one model replica per host thread, a slice of each batch each (capsnet.replicas);
            # the model itself with one thread or off NumPy
            self._runner = replicate(self.model)
            self._stop = False
            previous = signal.getsignal(signal.SIGINT)
            # only where Ctrl-C would raise KeyboardInterrupt (not where it is ignored, as for
            # a shell's background job, nor off the main thread, where handlers cannot be set)
            main_thread = (threading.current_thread() is threading.main_thread()
                           and previous is signal.default_int_handler)
            if main_thread:
                # A Ctrl-C is only noted: the step under way finishes (under MPI every rank
                # agrees to stop after the same step), so the checkpoint holds the state
                # between two steps and the resume is exact. A second Ctrl-C stops at once.
                signal.signal(signal.SIGINT, self._request_stop)
            history = []
            try:
                while self.epoch < self.epochs:
                    history.append(self._run_epoch())
                    if self._stop and self.comm.size == 1 and self.epoch < self.epochs:
                        raise KeyboardInterrupt  # noted during the evaluation at the epoch's end
            except KeyboardInterrupt:
                self._sync_buffers()
                if self.comm.rank == 0:
                    self._save(self.checkpoint_path)
                    print(f"\ninterrupted: state saved to {self.checkpoint_path}; continue with --resume")
                raise
            except Exception as exc:
                fail(self.comm, exc)  # under MPI: end every rank, never leave them waiting
                raise
            finally:
                if main_thread:
                    signal.signal(signal.SIGINT, previous)
                if self._tb is not None:
                    self._tb.close()
                    self._tb = None
                self._runner.release()  # no step's cache or spectra outlive the run
            return history

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (the last batch may be short)."""
        return -(-len(self.train_data) // self.batch_size)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken since the run began (restored on a resume)."""
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def _host_threads(self) -> int:
        """The threads that split each batch (a resume is bit-exact with the same count)."""
        return getattr(getattr(self, "_runner", None), "threads", 1)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C raises at once

    def _sync_buffers(self) -> None:
        """Under MPI, average the floating buffers (BatchNorm's running statistics, which
        each rank updates from its own slice) over the ranks, so that evaluation and the
        checkpoint see one set."""
        if self.comm.size == 1:
            return
        for _, buf in self.model.named_buffers():
            if buf.data.dtype.kind != "f" or buf.host:
                continue
            host = np.ascontiguousarray(backend.to_numpy(buf.data), dtype=np.float64)
            self.comm.allreduce_(host)
            host /= self.comm.size
            buf.data[...] = backend.to_device(host.astype(buf.data.dtype), backend.backend_of(buf.data))

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

    def _run_epoch(self) -> dict[str, Any]:
        model = self.model
        xp = backend.xp()
        batches = self._epoch_batches()
        model.train()
        start = time.perf_counter()
        images_done = 0
        bar = tqdm(total=len(batches), initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.epochs}",
                   unit="batch", disable=None if self.progress else True, leave=False)
        loss_acc = xp.zeros((), dtype=xp.float64)
        sums: dict[str, Any] = {}
        seen_acc = 0
        rank, size = self.comm.rank, self.comm.size

        def flush() -> None:
            # the only host synchronisation of the loop: every log_every steps (under MPI,
            # where the ranks' sums are also combined)
            nonlocal loss_acc, sums, seen_acc
            loss_host, sums_host = _fetch_sums(loss_acc, sums)
            local = (loss_host, seen_acc, sums_host)
            parts = self.comm.allgather(local)
            self.running["loss"] += _combine([part[0] for part in parts])
            self.running["seen"] += sum(part[1] for part in parts)
            for name in self.metrics:
                values = [part[2][name] for part in parts if name in part[2]]
                if values:
                    self.running["metrics"][name] = _add(self.running["metrics"].get(name), _combine(values))
            loss_acc = xp.zeros((), dtype=xp.float64)
            sums, seen_acc = {}, 0

        try:
            for step in range(self.step_in_epoch, len(batches)):
                idx = batches[step]
                batch = self.train_data.batch(idx, self.rng)  # the whole global batch: the same draws on every rank
                if size > 1:
                    lo, hi = shard(len(idx), rank, size)
                    batch = tuple(a[lo:hi] for a in batch)
                n_local = len(batch[0])
                if n_local:
                    with batch_slice(len(idx), lo, hi) if size > 1 else contextlib.nullcontext():
                        loss, outputs = self.task.forward(self._runner, batch)
                    self.optimizer.zero_grad()
                    self.task.backward(self._runner)
                else:  # a short last batch leaves this rank nothing: it adds zeros to the sum
                    self.optimizer.zero_grad()
                    for m in model.modules():
                        if hasattr(m, "advance"):  # keep dropout's draw count in step with the others
                            m.advance()
                stop = self._stop
                if self._grads is not None:
                    stop = self._grads.allreduce(n_local / len(idx), self._stop)
                self.optimizer.step()
                if n_local:
                    loss_acc += loss * n_local
                    _accumulate(sums, self.metrics, outputs, batch)
                seen_acc += n_local
                images_done += len(idx)
                self.step_in_epoch = step + 1
                if self.step_in_epoch % self.log_every == 0 or self.step_in_epoch == len(batches):
                    flush()
                    means = self._running_values()
                    bar.set_postfix({name: f"{value:.4f}" for name, value in means.items()}, refresh=False)
                    if self._tb is not None:
                        self._tb.interval(self.global_step, means, self.optimizer.lr)
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(self, self.epoch, step)
                if stop:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            flush()
            bar.close()
            raise
        bar.close()
        train_seconds = time.perf_counter() - start
        seen = self.running["seen"]
        record: dict[str, Any] = {"epoch": self.epoch + 1, "lr": self.optimizer.lr,
                                  "train_loss": self.running["loss"] / max(seen, 1)}
        for name in self.metrics:
            record[f"train_{name}"] = _mean(self.running["metrics"].get(name, 0.0), seen)
        self._sync_buffers()
        if self.eval_data is not None:
            result = evaluate(self._runner, self.task, self.eval_data, batch_size=self.batch_size, metrics=self.metrics,
                              progress=self.progress, desc=self.eval_name, comm=self.comm)
            record[f"{self.eval_name}_loss"] = result["loss"]
            for name in self.metrics:
                record[f"{self.eval_name}_{name}"] = result[name]
        record["train_seconds"] = train_seconds
        record["train_images_per_second"] = images_done / train_seconds if train_seconds > 0 else math.nan
        record["epoch_seconds"] = time.perf_counter() - start
        record["world_size"] = self.comm.size
        record["host_threads"] = self._host_threads()
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_rng_state = None
        self.running = {"loss": 0.0, "seen": 0, "metrics": {}}
        if self.schedule is not None:
            self.schedule.step()
        improved = self._improved(record)
        if self._tb is not None:  # before the checkpoint: a resume from it must not lose these
            self._tb.epoch(self.global_step, record)
            if self.eval_data is not None and hasattr(self.task, "images"):
                shown = np.arange(min(8, len(self.eval_data)), dtype=np.int64)
                self._tb.images(self.global_step, self.task.images(model, self.eval_data.batch(shown, None)))
                model.release()
            self._tb.flush()
        if self.comm.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self._save(self.checkpoint_path)
            if improved:
                self._save(self.best_path)
        if self.log:
            tqdm.write(self._summary(record))
            sys.stdout.flush()  # a log file sees each epoch as it ends
        return record

    def _running_values(self) -> dict[str, float]:
        """The epoch's running mean loss and scalar metrics, from host values."""
        seen = max(self.running["seen"], 1)
        out = {"loss": self.running["loss"] / seen}
        for name, total in self.running["metrics"].items():
            if not isinstance(total, list):
                out[name] = total / seen
        return out

    def _improved(self, record: dict[str, Any]) -> bool:
        value = record.get(self.best_key)
        if not isinstance(value, (int, float)):
            return False
        lower = self.best_key.endswith(("loss", "error"))
        if self.best_value is None or (value < self.best_value if lower else value > self.best_value):
            self.best_value = value
            return True
        return False

    def _summary(self, record: dict[str, Any]) -> str:
        parts = [f"epoch {record['epoch']}/{self.epochs}"]
        for prefix in ("train", self.eval_name):
            values = [f"{key[len(prefix) + 1:]} {value:.4f}" for key, value in record.items()
                      if key.startswith(prefix + "_") and isinstance(value, float) and "second" not in key]
            if values:
                parts.append(prefix + " " + " ".join(values))
        parts.append(f"{record['epoch_seconds']:.1f} s, {record['train_images_per_second']:.1f} img/s")
        return " | ".join(parts)
