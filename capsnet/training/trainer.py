"""The training loop behind ``python -m capsnet.train``.

One run lives in one folder: ``checkpoint.npz`` (the latest state, written after
every epoch and on Ctrl-C), ``best.npz`` (the best test accuracy so far),
``metrics.jsonl`` (one line per epoch) and ``config.json``. A resumed run replays
the data order and shifts exactly, so on the CPU it ends with the same weights as
a run that never stopped.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from capsnet import backend
from capsnet.data import iterate_batches, load_mnist, random_shift, to_float
from capsnet.models.capsnet import CapsNet, CapsNetConfig, CapsNetLoss
from capsnet.optim import SGD, Adam, ExponentialLR
from capsnet.training.checkpoint import CheckpointError, config_differences, load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    """Everything a run depends on. ``model`` holds CapsNetConfig's fields."""

    backend: str = "numpy"
    dtype: str = "float32"
    epochs: int = 10
    batch_size: int = 100
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_decay: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 0.0
    recon_weight: float = 0.0005
    max_shift: int = 2
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    data_dir: str | None = None
    log_every: int = 10
    model: dict[str, Any] = field(default_factory=lambda: CapsNetConfig().as_dict())

    # What a resumed run must share with its checkpoint (the rest may change:
    # more epochs, another data folder, another backend).
    FIXED = ("dtype", "batch_size", "optimizer", "lr", "lr_decay", "momentum", "weight_decay",
             "recon_weight", "max_shift", "seed", "train_limit", "model")

    def validate(self) -> "TrainConfig":
        if self.backend not in backend.BACKENDS:
            raise backend.BackendError(f"unknown backend {self.backend!r}: expected one of {backend.BACKENDS}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not (self.lr > 0 and self.lr_decay > 0 and self.recon_weight >= 0 and self.max_shift >= 0):
            raise ValueError("lr and lr_decay must be > 0, recon_weight and max_shift >= 0")
        CapsNetConfig.from_dict(self.model)
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fixed_items(self) -> dict[str, Any]:
        """The FIXED settings, with the model's fields spelled out one by one."""
        out = {k: getattr(self, k) for k in self.FIXED if k != "model"}
        out.update(CapsNetConfig.from_dict(self.model).as_dict())
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}")
        return cls(**d)


def build_optimizer(cfg: TrainConfig, model: CapsNet):
    if cfg.optimizer == "adam":
        return Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def evaluate(model: CapsNet, images: Any, labels: Any, *, batch_size: int = 100,
             recon_weight: float = 0.0005, progress: bool = False, desc: str = "test") -> dict[str, Any]:
    """Accuracy, mean total loss and the confusion matrix (rows: true class) on a
    dataset already on the model's device. The test set is never augmented; the
    decoder sees the longest capsule, as at test time."""
    xp = backend.get_array_module(images)
    model.eval()
    criterion = CapsNetLoss(recon_weight)
    n = images.shape[0]
    k = model.config.n_classes
    correct = xp.zeros((), dtype=xp.int64)
    loss_sum = xp.zeros((), dtype=images.dtype)
    confusion = xp.zeros((k, k), dtype=xp.int64)
    for idx in tqdm(list(iterate_batches(n, batch_size, shuffle=False)), desc=desc, leave=False,
                    disable=not progress, unit="batch"):
        x, y = images[idx[0]:idx[-1] + 1], labels[idx[0]:idx[-1] + 1]
        lengths, recon = model(x)
        loss_sum += criterion(lengths, recon, y, x) * x.shape[0]
        pred = lengths.argmax(axis=1)
        correct += (pred == y).sum()
        confusion += xp.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    model.train()
    conf = backend.to_numpy(confusion)
    per_class = conf.diagonal() / np.maximum(conf.sum(axis=1), 1)
    return {"accuracy": float(backend.to_numpy(correct)) / n, "loss": float(backend.to_numpy(loss_sum)) / n,
            "per_class_accuracy": per_class.tolist(), "confusion": conf.tolist(), "n": n}


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def _set_rng_state(state: dict[str, Any]) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


class Trainer:
    """Runs (or resumes) a training run in ``run_dir``.

    ``on_step(trainer, epoch, step)`` is called after every optimizer step; raise
    KeyboardInterrupt from it to simulate Ctrl-C (the tests do).
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, progress: bool = True,
                 on_step: Callable[["Trainer", int, int], None] | None = None):
        self.cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.on_step = on_step
        self.checkpoint_path = self.run_dir / "checkpoint.npz"
        self.best_path = self.run_dir / "best.npz"
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # -- setup ---------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        data = load_mnist(cfg.data_dir, progress=self.progress)
        ntr = min(cfg.train_limit or len(data.train_labels), len(data.train_labels))
        nte = min(cfg.test_limit or len(data.test_labels), len(data.test_labels))
        xp = backend.xp()
        self.train_x = to_float(data.train_images[:ntr], cfg.dtype, xp)
        self.train_y = xp.asarray(data.train_labels[:ntr])
        self.test_x = to_float(data.test_images[:nte], cfg.dtype, xp)
        self.test_y = xp.asarray(data.test_labels[:nte])

    def _fresh(self) -> None:
        cfg = self.cfg
        self.model = CapsNet(CapsNetConfig.from_dict(cfg.model), dtype=cfg.dtype, seed=cfg.seed)
        self.optimizer = build_optimizer(cfg, self.model)
        self.schedule = ExponentialLR(self.optimizer, cfg.lr_decay)
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.epoch, self.step_in_epoch = 0, 0
        self.epoch_rng_state = None
        self.running = {"loss": 0.0, "correct": 0, "seen": 0}
        self.best_accuracy = -1.0

    def _resume(self, path: Path) -> None:
        header, model_state, optim_state = load_checkpoint(path)
        saved = TrainConfig.from_dict(header["train_config"])
        diffs = config_differences(saved.fixed_items(), self.cfg.fixed_items())
        if diffs:
            raise CheckpointError(
                f"{path} comes from a different configuration: " + "; ".join(diffs)
                + ". Resume with the checkpoint's settings, or start a new run folder."
            )
        self._fresh()
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optim_state)
        self.schedule.load_state_dict(header["schedule"])
        self.rng = _set_rng_state(header["rng_state"])
        self.epoch, self.step_in_epoch = header["epoch"], header["step_in_epoch"]
        self.epoch_rng_state = header.get("epoch_rng_state")
        self.running = header["running"]
        self.best_accuracy = header["best_accuracy"]

    def _save(self, path: Path) -> None:
        save_checkpoint(path, model_state=self.model.state_dict(), optimizer_state=self.optimizer.state_dict(),
                        header={"train_config": self.cfg.as_dict(), "epoch": self.epoch,
                                "step_in_epoch": self.step_in_epoch, "rng_state": _rng_state(self.rng),
                                "epoch_rng_state": self.epoch_rng_state, "schedule": self.schedule.state_dict(),
                                "running": self.running, "best_accuracy": self.best_accuracy})

    # -- the loop --------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train until ``cfg.epochs``; returns the metrics of the epochs run now."""
        cfg = self.cfg
        backend.set_backend(cfg.backend)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            if not self.checkpoint_path.exists():
                raise CheckpointError(f"--resume: no checkpoint in {self.run_dir} (expected {self.checkpoint_path.name})")
            self._resume(self.checkpoint_path)
        else:
            if self.checkpoint_path.exists():
                raise CheckpointError(
                    f"{self.run_dir} already holds a run: pass --resume to continue it, or choose another --out"
                )
            self._fresh()
            self.metrics_path.unlink(missing_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(cfg.as_dict(), indent=2) + "\n")
        self._load_data()
        history = []
        try:
            while self.epoch < cfg.epochs:
                history.append(self._run_epoch())
        except KeyboardInterrupt:
            self._save(self.checkpoint_path)
            print(f"\ninterrupted: state saved to {self.checkpoint_path}; continue with --resume")
            raise
        return history

    def _run_epoch(self) -> dict[str, Any]:
        cfg, model, xp = self.cfg, self.model, backend.xp()
        n = self.train_x.shape[0]
        if self.step_in_epoch == 0:
            self.epoch_rng_state = _rng_state(self.rng)
            order_rng = self.rng
        else:  # resuming mid-epoch: redraw this epoch's order, then continue the stream
            current = _rng_state(self.rng)
            order_rng = _set_rng_state(self.epoch_rng_state)
        batches = list(iterate_batches(n, cfg.batch_size, shuffle=True, rng=order_rng))
        if self.step_in_epoch:
            self.rng = _set_rng_state(current)
        criterion = CapsNetLoss(cfg.recon_weight)
        model.train()
        start = time.perf_counter()
        images_done = 0
        bar = tqdm(total=len(batches), initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   unit="batch", disable=not self.progress, leave=False)
        loss_acc = xp.zeros((), dtype=xp.float64)
        correct_acc = xp.zeros((), dtype=xp.int64)
        seen_acc = 0
        def flush() -> None:
            # the only host synchronisation of the loop: every log_every steps
            nonlocal seen_acc
            self.running["loss"] += float(backend.to_numpy(loss_acc))
            self.running["correct"] += int(backend.to_numpy(correct_acc))
            self.running["seen"] += seen_acc
            loss_acc[...] = 0
            correct_acc[...] = 0
            seen_acc = 0

        try:
            for step in range(self.step_in_epoch, len(batches)):
                idx = batches[step]
                index = xp.asarray(idx)
                x = random_shift(self.train_x[index], cfg.max_shift, self.rng)
                y = self.train_y[index]
                lengths, recon = model(x, y)
                loss = criterion(lengths, recon, y, x)
                self.optimizer.zero_grad()
                model.backward(*criterion.backward())
                self.optimizer.step()
                loss_acc += loss * len(idx)
                correct_acc += (lengths.argmax(axis=1) == y).sum()
                seen_acc += len(idx)
                images_done += len(idx)
                self.step_in_epoch = step + 1
                if self.step_in_epoch % cfg.log_every == 0 or self.step_in_epoch == len(batches):
                    flush()
                    seen = max(self.running["seen"], 1)
                    bar.set_postfix(loss=f"{self.running['loss'] / seen:.4f}",
                                    acc=f"{self.running['correct'] / seen:.4f}", refresh=False)
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(self, self.epoch, step)
        except KeyboardInterrupt:
            flush()
            bar.close()
            raise
        bar.close()
        train_seconds = time.perf_counter() - start
        test = evaluate(model, self.test_x, self.test_y, batch_size=cfg.batch_size,
                        recon_weight=cfg.recon_weight, progress=self.progress)
        seen = max(self.running["seen"], 1)
        record = {
            "epoch": self.epoch + 1,
            "lr": self.optimizer.lr,
            "train_loss": self.running["loss"] / seen,
            "train_accuracy": self.running["correct"] / seen,
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "train_seconds": train_seconds,
            "train_images_per_second": images_done / train_seconds if train_seconds > 0 else math.nan,
            "epoch_seconds": time.perf_counter() - start,
        }
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_rng_state = None
        self.running = {"loss": 0.0, "correct": 0, "seen": 0}
        self.schedule.step()
        improved = test["accuracy"] > self.best_accuracy
        if improved:
            self.best_accuracy = test["accuracy"]
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._save(self.checkpoint_path)
        if improved:
            self._save(self.best_path)
        if self.progress:
            tqdm.write(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}"
                       f" | test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
                       f" | {record['epoch_seconds']:.0f} s")
        return record


def load_model(path: str | Path, backend_name: str | None = None) -> tuple[CapsNet, dict[str, Any]]:
    """A CapsNet rebuilt from a checkpoint's configuration, with its weights."""
    header, model_state, _ = load_checkpoint(path)
    cfg = TrainConfig.from_dict(header["train_config"])
    with backend.use(backend_name or backend.get_backend()):
        model = CapsNet(CapsNetConfig.from_dict(cfg.model), dtype=cfg.dtype)
    model.load_state_dict(model_state)
    return model, header


def load_weights(model: CapsNet, path: str | Path) -> None:
    """Load a checkpoint's weights into ``model``; the configurations must match."""
    header, model_state, _ = load_checkpoint(path)
    saved = TrainConfig.from_dict(header["train_config"]).model
    diffs = config_differences(saved, model.config.as_dict())
    if diffs:
        raise CheckpointError(f"{path} was trained with a different model configuration: " + "; ".join(diffs))
    model.load_state_dict(model_state)
