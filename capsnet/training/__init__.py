"""Training, evaluation and checkpoints.

:mod:`capsnet.training.loop` is the general loop (:class:`Trainer`, :func:`evaluate`,
tasks and metrics); :mod:`capsnet.training.mnist_run` is the paper's CapsNet and its
baseline CNN on MNIST built on it (what ``python -m capsnet.train`` runs).
"""
from capsnet.training.mnist_run import (
    MNISTTrainer,
    TrainConfig,
    build_model,
    build_optimizer,
    build_task,
    evaluate_mnist,
    load_model,
    load_weights,
    train_config_of,
)
from capsnet.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from capsnet.training.loop import (
    CapsNetTask,
    SupervisedTask,
    Trainer,
    confusion_counts,
    count_correct,
    evaluate,
    scores_of,
)

__all__ = [
    "CapsNetTask",
    "CheckpointError",
    "MNISTTrainer",
    "SupervisedTask",
    "TrainConfig",
    "Trainer",
    "build_model",
    "build_optimizer",
    "build_task",
    "confusion_counts",
    "count_correct",
    "evaluate",
    "evaluate_mnist",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "save_checkpoint",
    "scores_of",
    "train_config_of",
]
