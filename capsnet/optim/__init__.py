"""Optimizers (SGD, Adam) and learning-rate schedules (ExponentialLR, StepLR)."""
from capsnet.optim.optimizers import SGD, Adam, Optimizer, host_threads
from capsnet.optim.schedules import ExponentialLR, LRSchedule, StepLR

__all__ = ["SGD", "Adam", "ExponentialLR", "LRSchedule", "Optimizer", "StepLR", "host_threads"]
