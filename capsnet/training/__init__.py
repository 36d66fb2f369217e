"""Training, evaluation and checkpoints."""
from capsnet.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from capsnet.training.trainer import Trainer, TrainConfig, evaluate, load_model, load_weights

__all__ = ["CheckpointError", "TrainConfig", "Trainer", "evaluate", "load_checkpoint", "load_model",
           "load_weights", "save_checkpoint"]
