"""Training: a small loop, its step, distribution strategies, extensions and run folders.

- :class:`Trainer` (:mod:`~capsnet.training.trainer`) keeps the clock and takes steps for
  any model; :class:`Updater` (:mod:`~capsnet.training.updater`) owns a step.
- :mod:`~capsnet.training.strategy`: one process (:class:`SingleProcess`) or MPI data
  parallelism (:class:`DataParallel`, over :mod:`~capsnet.training.distributed`).
- :mod:`~capsnet.training.extensions`: evaluation, checkpoints, the best model, the metrics
  log, progress bars, the log line, TensorBoard, the stop on divergence, and your own.
- :mod:`~capsnet.training.run_folder`: the files of a run, held by one process.
- :mod:`~capsnet.training.evaluation`: metrics and :func:`evaluate`;
  :mod:`~capsnet.training.tasks`: :class:`SupervisedTask`;
  :mod:`~capsnet.training.checkpoint`: the checkpoint file.
- :mod:`~capsnet.training.run`: the paper's runs (what ``python -m capsnet.train``
  runs): :class:`TrainConfig` and :class:`RunTrainer`.
"""
from capsnet.models.capsnet import CapsNetTask
from capsnet.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from capsnet.training.evaluation import (  # noqa: F401 - Metric is documented in capsnet.training.evaluation
    Metric,
    confusion_counts,
    count_correct,
    evaluate,
    scores_of,
)
from capsnet.training.extensions import (
    BestModel,
    Checkpoint,
    Evaluate,
    Extension,
    LogLine,
    MetricsLog,
    OnStep,
    ProgressBar,
    TensorBoard,
    TerminateOnNaN,
    TrainingDiverged,
)
from capsnet.training.run import (
    RunTrainer,
    TrainConfig,
    build_model,
    build_optimizer,
    build_task,
    evaluate_classifier,
    load_model,
    load_weights,
    train_config_of,
)
from capsnet.training.run_folder import RunFolder, RunFolderError
from capsnet.training.strategy import DataParallel, SingleProcess, strategy_for
from capsnet.training.tasks import SupervisedTask
from capsnet.training.trainer import Trainer
from capsnet.training.updater import Updater

__all__ = [
    "BestModel",
    "CapsNetTask",
    "Checkpoint",
    "CheckpointError",
    "DataParallel",
    "Evaluate",
    "Extension",
    "LogLine",
    "MetricsLog",
    "OnStep",
    "ProgressBar",
    "RunFolder",
    "RunFolderError",
    "RunTrainer",
    "SingleProcess",
    "SupervisedTask",
    "TensorBoard",
    "TerminateOnNaN",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "Updater",
    "build_model",
    "build_optimizer",
    "build_task",
    "confusion_counts",
    "count_correct",
    "evaluate",
    "evaluate_classifier",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "save_checkpoint",
    "scores_of",
    "strategy_for",
    "train_config_of",
]
