"""Learning-rate schedules: set ``optimizer.lr`` once per epoch.

Each schedule remembers the optimizer's ``lr`` at construction as ``base_lr``
and computes the rate for an epoch in closed form (``base_lr * gamma ** k``),
so resuming from a checkpoint gives exactly the rate an unbroken run would.

    >>> sched = ExponentialLR(opt, gamma=0.9)
    >>> for epoch in range(epochs):
    ...     train_one_epoch(opt)
    ...     sched.step()
"""
from __future__ import annotations

import math
import numbers
from typing import Any

from capsnet.optim.optimizers import Optimizer, _item

__all__ = ["ExponentialLR", "LRSchedule", "StepLR"]


def _gamma(owner: str, gamma: Any) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"{owner}: gamma must be a real number, got {gamma!r} ({type(gamma).__name__})")
    out = float(gamma)
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{owner}: gamma must be a finite number > 0, got {out}")
    return out


def _min_lr(owner: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: min_lr must be a finite number >= 0, got {value!r}")
    return float(value)


def _count(owner: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{owner}: {name} must be >= {low}, got {value}")
    return int(value)


class LRSchedule:
    """Base of the schedules: ``lr = base_lr * factor(last_epoch)``.

    ``last_epoch`` counts the calls to :meth:`step` (plus the starting value);
    the optimizer's ``lr`` is set for it at construction and after every step.
    """

    # settings added after state dicts were first saved, and their values for those older states
    _defaults: dict[str, Any] = {}

    def __init__(self, optimizer: Optimizer, last_epoch: int = 0):
        name = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{name} expected an Optimizer (SGD, Adam), got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.last_epoch = _count(name, "last_epoch", last_epoch, 0)

    def factor(self, epoch: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_lr(self) -> float:
        """The learning rate for the current epoch."""
        return self.base_lr * self.factor(self.last_epoch)

    def _set_lr(self) -> None:
        self.optimizer.lr = self.get_lr()

    def step(self) -> None:
        """Advance one epoch and set the optimizer's ``lr`` for it."""
        self.last_epoch += 1
        self._set_lr()

    def _hyperparams(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _validate(self, hyper: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Python scalars: the schedule's name, ``base_lr``, ``last_epoch`` and its settings."""
        return {"schedule": type(self).__name__, "base_lr": self.base_lr, "last_epoch": self.last_epoch,
                **self._hyperparams()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule and set the optimizer's ``lr`` for the restored epoch."""
        name = type(self).__name__
        where = f"{name}.load_state_dict"
        saved_by = _item(state.get("schedule"))
        if saved_by != name:
            raise ValueError(f"{where} expected a state dict saved by {name}, got one from {saved_by!r}")
        state = {**self._defaults, **state}
        keys = ("base_lr", "last_epoch", *self._hyperparams())
        missing = [k for k in keys if k not in state]
        if missing:
            raise KeyError(f"{where}: the state dict lacks {missing}")
        base_lr = _item(state["base_lr"])
        if isinstance(base_lr, bool) or not isinstance(base_lr, numbers.Real) or not base_lr >= 0:
            raise ValueError(f"{where}: expected base_lr to be a number >= 0, got {base_lr!r}")
        last_epoch = _count(where, "last_epoch", _item(state["last_epoch"]), 0)
        hyper = self._validate({k: _item(state[k]) for k in self._hyperparams()})
        self.base_lr = float(base_lr)
        self.last_epoch = last_epoch
        for key, value in hyper.items():
            setattr(self, key, value)
        self._set_lr()

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self._hyperparams().items())
        return f"{type(self).__name__}({settings}, base_lr={self.base_lr}, last_epoch={self.last_epoch})"


class ExponentialLR(LRSchedule):
    """``lr = max(base_lr * gamma ** epoch, min_lr)``; call :meth:`step` once per epoch.
    (Efficient-CapsNet's authors decay 5e-4 by 0.97 per epoch down to 5e-5.)"""

    _defaults = {"min_lr": 0.0}

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = 0, min_lr: float = 0.0):
        super().__init__(optimizer, last_epoch)
        self.gamma = _gamma("ExponentialLR", gamma)
        self.min_lr = _min_lr("ExponentialLR", min_lr)
        self._set_lr()

    def factor(self, epoch: int) -> float:
        return self.gamma**epoch

    def get_lr(self) -> float:
        return max(super().get_lr(), self.min_lr)

    def _hyperparams(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "min_lr": self.min_lr}

    def _validate(self, hyper: dict[str, Any]) -> dict[str, Any]:
        return {"gamma": _gamma("ExponentialLR", hyper["gamma"]), "min_lr": _min_lr("ExponentialLR", hyper["min_lr"])}


class StepLR(LRSchedule):
    """``lr = base_lr * gamma ** (epoch // step_size)``: decay every ``step_size`` epochs."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = 0):
        super().__init__(optimizer, last_epoch)
        self.step_size = _count("StepLR", "step_size", step_size, 1)
        self.gamma = _gamma("StepLR", gamma)
        self._set_lr()

    def factor(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.step_size)

    def _hyperparams(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "gamma": self.gamma}

    def _validate(self, hyper: dict[str, Any]) -> dict[str, Any]:
        return {"step_size": _count("StepLR", "step_size", hyper["step_size"], 1),
                "gamma": _gamma("StepLR", hyper["gamma"])}
