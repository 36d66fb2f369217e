"""The runs of ``python -m capsnet.train``: a :class:`TrainConfig`, and :class:`RunTrainer`,
which builds a run from it and trains it with the general loop (:class:`capsnet.training.Trainer`).

A run is one of the architectures of :data:`ARCHS` (the paper's CapsNet, its baseline CNN,
Efficient-CapsNet, the EM-routing network) on one of the registered datasets
(:mod:`capsnet.training.datasets`: MNIST, expanded MNIST, MultiMNIST, the packaged sample,
all made from MNIST, or one you register). Also here: building the model, task and
optimizer of a configuration (:func:`build_model`, :func:`build_task`,
:func:`build_optimizer`), evaluating a classifier (:func:`evaluate_classifier`), and reading a
checkpoint back as a model (:func:`load_model`, :func:`load_weights`,
:func:`train_config_of`). Run folders written by capsnet 0.1 (before the general loop)
resume too: their checkpoint header is brought to the new form on reading.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from capsnet import backend
from capsnet.data import ArrayDataset
from capsnet.layers.base import Module
from capsnet.layers.loss import CrossEntropyLoss
from capsnet.models.baseline import BaselineCNN, BaselineCNNConfig
from capsnet.models.capsnet import CapsNet, CapsNetConfig
from capsnet.models.config import DictConfig
from capsnet.models.efficient_capsnet import EfficientCapsNet, EfficientCapsNetConfig
from capsnet.models.matrix_capsnet import MatrixCapsNet, MatrixCapsNetConfig, SpreadTask
from capsnet.optim import SGD, Adam, ExponentialLR
from capsnet.replicas import replica_kind
from capsnet.training.checkpoint import CheckpointError, config_differences, load_checkpoint
from capsnet.models.capsnet import CapsNetTask
from capsnet.training.datasets import DATASETS, EXPANDED_PAD, dataset, expand, pair_errors  # noqa: F401 - re-exported
from capsnet.training.evaluation import confusion_counts, count_correct, evaluate
from capsnet.training.tasks import SupervisedTask
from capsnet.training.tensorboard import summary_writer_class
from capsnet.training.trainer import LOOP_VERSION, Trainer

__all__ = ["ARCHS", "RunTrainer", "TrainConfig", "build_model", "build_optimizer", "build_task", "data_sources",
           "describe_dataset", "evaluate_classifier", "load_data", "load_model", "load_weights", "run_metrics",
           "train_config_of"]


@dataclass
class TrainConfig(DictConfig):
    """Everything a run depends on. ``arch`` is "capsnet" (the paper's CapsNet), "cnn" (its
    baseline CNN), "efficient" (Efficient-CapsNet) or "em" (matrix capsules with EM routing);
    ``model`` holds the fields of that architecture's configuration (None: its defaults, with
    the input size ``dataset`` needs). ``lr_min``: the floor of the learning rate's decay.
    ``augment``: "shift" (random shifts of up to ``max_shift`` px) or "efficient"
    (Efficient-CapsNet's rotation, shift within the margins, squish and erase,
    :func:`capsnet.data.augment.efficient_augment`; one-digit datasets).

    ``dataset``: a name in :data:`capsnet.training.datasets.DATASETS`, which says what
    it is: "mnist" (28x28, training shifts of up to ``max_shift`` = 2 px), "expanded"
    (expanded MNIST, the paper's training set for affine robustness: each digit placed at
    random on a 40x40 canvas, shifts of up to 6 px from the centre; test digits centred)
    or "multimnist" (two overlapping digits on 36x36, shifts of up to 4 px,
    ``test_pairs`` fixed pairs per test image; CapsNet only), or "mnist-sample" (as
    "mnist", on the 5,000 + 1,000 image sample installed with the package: no download,
    for a first run; not MNIST), or one you :func:`~capsnet.training.datasets.register`.
    ``max_shift`` None takes the dataset's value."""

    _what = "training option"

    backend: str = "numpy"
    dtype: str = "float32"
    epochs: int = 10
    batch_size: int = 100
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_decay: float = 0.9
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    recon_weight: float = 0.0005
    max_shift: int | None = None
    augment: str = "shift"
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    data_dir: str | None = None
    log_every: int = 10
    replicas: str | None = None
    arch: str = "capsnet"
    model: dict[str, Any] | None = None
    dataset: str = "mnist"
    test_pairs: int = 1

    # What a resumed run must share with its checkpoint (the rest may change:
    # more epochs, another data folder, another backend).
    FIXED = ("dtype", "batch_size", "optimizer", "lr", "lr_decay", "lr_min", "momentum", "weight_decay",
             "recon_weight", "max_shift", "augment", "seed", "train_limit", "arch", "model", "dataset")

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        spec = dataset(self.dataset)
        spec.check_arch(self.arch)
        if self.max_shift is None:
            self.max_shift = spec.max_shift
        defaults = spec.model_defaults(self.arch)
        if self.model is None:
            self.model = ARCHS[self.arch](**defaults).as_dict()
        else:
            self.model = {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, **self.model}

    def model_config(self) -> CapsNetConfig | BaselineCNNConfig:
        """The model's configuration object (CapsNetConfig or BaselineCNNConfig)."""
        return ARCHS[self.arch].from_dict(self.model)

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
        for name in ("lr", "lr_decay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("recon_weight", "max_shift"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if not self.lr_min >= 0:
            raise ValueError(f"lr_min must be >= 0, got {self.lr_min}")
        if self.replicas is not None:
            replica_kind(self.replicas)  # refuses a kind not in capsnet.replicas.KINDS
        if self.test_pairs < 1:
            raise ValueError(f"test_pairs must be at least 1, got {self.test_pairs}")
        for name, value in self.model.items():  # sizes, counts and iterations: positive integers
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values):
                raise ValueError(f"{name} must be at least 1, got {value}")
        spec = dataset(self.dataset)
        shape = tuple(spec.input_shape)
        model = self.model_config()
        if tuple(model.input_shape) != shape:
            raise ValueError(f"the {self.dataset} dataset has inputs of shape {shape}, but the model is configured "
                             f"for {tuple(model.input_shape)}")
        if model.n_classes != spec.n_classes:
            raise ValueError(f"the {self.dataset} dataset has {spec.n_classes} classes, but the model is configured "
                             f"for n_classes={model.n_classes}")
        if getattr(model, "digits", 1) != spec.digits:
            raise ValueError(f"the {self.dataset} dataset has {spec.digits} digit(s) per image, but the CapsNet is "
                             f"configured for digits={model.digits}")
        spec.check_shift(self.max_shift)
        return self

    def fixed_items(self) -> dict[str, Any]:
        """The FIXED settings, with the model's fields spelled out one by one."""
        out = {k: getattr(self, k) for k in self.FIXED if k != "model"}
        out.update(self.model_config().as_dict())
        return out


AUGMENTS = ("shift", "efficient")
"""The training augmentations a run can name (TrainConfig.augment, --augment)."""

ARCHS: dict[str, Any] = {"capsnet": CapsNetConfig, "cnn": BaselineCNNConfig, "efficient": EfficientCapsNetConfig,
                         "em": MatrixCapsNetConfig}
MODELS: dict[str, Any] = {"capsnet": CapsNet, "cnn": BaselineCNN, "efficient": EfficientCapsNet, "em": MatrixCapsNet}
# Training defaults of an architecture where they are not the CapsNet paper's: Efficient-CapsNet's
# authors train with Adam 5e-4 decayed by 0.97 per epoch down to 5e-5 on batches of 16 (their
# config.json); the EM paper's networks with Adam 3e-3 (decay and batch size are not stated: 0.96
# and 32 here).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "efficient": {"lr": 5e-4, "lr_decay": 0.97, "lr_min": 5e-5, "batch_size": 16},
    "em": {"lr": 3e-3, "lr_decay": 0.96, "batch_size": 32}}


def describe_dataset(cfg: TrainConfig) -> str:
    """One line saying what ``cfg`` trains on, e.g. that it is the packaged sample, not MNIST."""
    return f"{cfg.dataset}: {dataset(cfg.dataset).description}"


def load_data(cfg: TrainConfig, data_dir: str | None = None, *, progress: bool = True) -> Any:
    """The MNIST splits ``cfg.dataset`` is made from (its entry's ``load``): the sample
    installed with the package for ``mnist-sample`` (never a download), else MNIST found
    by :func:`capsnet.data.load_mnist` from ``data_dir`` (downloaded when missing)."""
    return dataset(cfg.dataset).load(data_dir, progress)


def data_sources(cfg: TrainConfig, data: Any, xp: Any, train: bool = True) -> tuple[Any, Any]:
    """(training source, test source) of ``cfg.dataset`` from the MNIST splits in ``data``,
    on the backend ``xp``; the test source is never augmented. ``train=False``: (None,
    test source), without building the training set."""
    spec = dataset(cfg.dataset)
    ntr = min(cfg.train_limit or len(data.train_labels), len(data.train_labels))
    nte = min(cfg.test_limit or len(data.test_labels), len(data.test_labels))
    training = spec.train_source(data.train_images[:ntr], data.train_labels[:ntr], cfg, xp) if train else None
    return training, spec.test_source(data.test_images[:nte], data.test_labels[:nte], cfg, xp)


def run_metrics(cfg: TrainConfig) -> dict[str, Any]:
    """The metrics a run of ``cfg`` reports (its dataset's): accuracy, and for MultiMNIST
    the pair error."""
    return dict(dataset(cfg.dataset).metrics)


def build_model(cfg: TrainConfig) -> CapsNet | BaselineCNN:
    """The model ``cfg`` describes, seeded with ``cfg.seed``, on the current backend."""
    return MODELS[cfg.arch](cfg.model_config(), dtype=cfg.dtype, seed=cfg.seed)


def build_task(cfg: TrainConfig) -> CapsNetTask | SupervisedTask | SpreadTask:
    """The paper's objective for the architecture: margin plus reconstruction loss for the
    CapsNet and Efficient-CapsNet, the spread loss for EM routing (its margin set by the
    trainer's clock, see RunTrainer), softmax cross-entropy for the baseline."""
    return task_for(cfg.arch, cfg.recon_weight)


def task_for(arch: str, recon_weight: float = 0.0005) -> CapsNetTask | SupervisedTask | SpreadTask:
    if arch in ("capsnet", "efficient"):
        return CapsNetTask(recon_weight)
    if arch == "em":
        return SpreadTask()
    return SupervisedTask(CrossEntropyLoss())


def build_optimizer(cfg: TrainConfig, model: Module):
    """Adam or SGD (``cfg.optimizer``) over the model's parameters, with ``cfg``'s settings."""
    if cfg.optimizer == "adam":
        return Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def evaluate_classifier(model: CapsNet | BaselineCNN, images: Any, labels: Any, *, batch_size: int = 100,
                        recon_weight: float = 0.0005, task: Any = None, progress: bool = False,
                        desc: str = "test") -> dict[str, Any]:
    """Accuracy, mean loss, per-class accuracy and the confusion matrix (rows: true class)
    of a classifier on images already on its device. The test set is never augmented; a
    CapsNet's decoder sees the longest capsule, as at test time. ``task`` defaults to the
    model's objective (CapsNetTask(recon_weight), or cross-entropy for the baseline)."""
    k = model.config.n_classes
    if task is None:
        arch = next((a for a, cls in MODELS.items() if type(model) is cls), "cnn")
        task = task_for(arch, recon_weight)
    result = evaluate(model, task, ArrayDataset(images, labels), batch_size=batch_size,
                      metrics={"accuracy": count_correct, "confusion": confusion_counts(k)}, progress=progress,
                      desc=desc)
    conf = np.rint(np.asarray(result["totals"]["confusion"])).astype(np.int64)
    per_class = conf.diagonal() / np.maximum(conf.sum(axis=1), 1)
    return {"accuracy": result["accuracy"], "loss": result["loss"], "per_class_accuracy": per_class.tolist(),
            "confusion": conf.tolist(), "n": result["n"]}


class RunTrainer(Trainer):
    """Trains (or resumes) the model described by ``cfg`` on the dataset it names, in ``run_dir``.

    The model is seeded with ``cfg.seed``, the data stream (order and shifts) with
    ``cfg.seed + 1``. The other arguments (``on_step``, ``tensorboard``, ``comm``, ``strategy``,
    ``extensions``, ``stop_on_nan``) are the general loop's (:class:`~capsnet.training.Trainer`).
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, progress: bool = True, log: bool = True,
                 on_step: Callable[[Trainer, int, int], None] | None = None, comm: Any = None,
                 tensorboard: str | Path | None = None, extensions: Iterable[Any] = (), stop_on_nan: bool = True,
                 strategy: Any = None):
        self.cfg = cfg = cfg.validate()
        if tensorboard is not None:
            summary_writer_class()  # a missing extra fails before the data is read
        data = load_data(cfg, cfg.data_dir, progress=progress)
        with backend.use(cfg.backend) as xp:
            model = build_model(cfg)
            train, test = data_sources(cfg, data, xp)
        optimizer = build_optimizer(cfg, model)
        schedule = ExponentialLR(optimizer, cfg.lr_decay, min_lr=cfg.lr_min)
        super().__init__(model, build_task(cfg), optimizer, train, run_dir, epochs=cfg.epochs,
                         batch_size=cfg.batch_size, eval_data=test, schedule=schedule,
                         metrics=run_metrics(cfg), seed=cfg.seed + 1, log_every=cfg.log_every,
                         config=cfg.as_dict(), must_match=cfg.fixed_items(), best="test_accuracy",
                         progress=progress, log=log, on_step=on_step, comm=comm, strategy=strategy,
                         tensorboard=tensorboard, extensions=extensions, stop_on_nan=stop_on_nan,
                         replicas=cfg.replicas)
        if isinstance(self.task, SpreadTask):  # the spread loss's margin follows the training clock
            self.task.progress = lambda: (self.epoch + self.step_in_epoch / self.steps_per_epoch) / self.epochs

    def upgrade_header(self, header: dict[str, Any], path: Path) -> dict[str, Any]:
        """Also reads the checkpoints of capsnet 0.1's MNIST trainer (no ``loop_version``)."""
        if "loop_version" not in header and "train_config" in header:
            try:
                return upgrade_v01_header(header)
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path} looks like a capsnet 0.1 checkpoint but its header is damaged "
                                      f"({type(exc).__name__}: {exc}); resume from another checkpoint") from exc
        header = super().upgrade_header(header, path)
        if isinstance(header.get("config"), dict) and isinstance(header.get("must_match"), dict):
            # settings added since the checkpoint was written (dataset, digits) take their defaults
            header = {**header, "must_match": {**train_config_of(header, path).fixed_items(),
                                               **header["must_match"]}}
        return header


def upgrade_v01_header(header: dict[str, Any]) -> dict[str, Any]:
    """A capsnet 0.1 checkpoint header in the general loop's form: the same state,
    renamed (running "correct" becomes the accuracy metric's sum)."""
    old = dict(header)
    cfg = old.pop("train_config")
    running = old.pop("running")
    best = old.pop("best_accuracy")
    return {**old, "loop_version": LOOP_VERSION, "config": cfg,
            "must_match": TrainConfig.from_dict(cfg).fixed_items(),
            "running": {"loss": running["loss"], "seen": running["seen"],
                        "metrics": {"accuracy": float(running["correct"])} if running["seen"] else {}},
            "best": None if best < 0 else best, "best_key": "test_accuracy"}


def train_config_of(header: dict[str, Any], path: str | Path) -> TrainConfig:
    """The TrainConfig in a checkpoint header, from this version or capsnet 0.1."""
    cfg = header.get("config") if "loop_version" in header else header.get("train_config")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{path} was not written by capsnet.train (no CapsNet configuration in its header)")
    try:
        return TrainConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the training configuration in its header is not valid ({exc})") from exc


def load_model(path: str | Path, backend_name: str | None = None) -> tuple[CapsNet | BaselineCNN, dict[str, Any]]:
    """The model (CapsNet or BaselineCNN) rebuilt from a checkpoint's configuration, with its weights."""
    header, model_state, _ = load_checkpoint(path)
    cfg = train_config_of(header, path)
    try:
        with backend.use(backend_name or backend.get_backend()):
            model = build_model(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its model configuration cannot be built ({exc})") from exc
    _load_state(model, model_state, path)
    return model, header


def _load_state(model: Module, state: dict[str, Any], path: str | Path) -> None:
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit the model it describes ({exc}); the file is "
                              "damaged or was edited: use another checkpoint") from exc


def load_weights(model: CapsNet | BaselineCNN, path: str | Path) -> None:
    """Load a checkpoint's weights into ``model``; the configurations must match."""
    header, model_state, _ = load_checkpoint(path)
    saved = train_config_of(header, path).model
    diffs = config_differences(saved, model.config.as_dict())
    if diffs:
        raise CheckpointError(f"{path} was trained with a different model configuration: " + "; ".join(diffs))
    _load_state(model, model_state, path)
