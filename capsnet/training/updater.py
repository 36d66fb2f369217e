"""The optimizer step: forward, backward, reduce, update, and the running sums.

:class:`Updater` owns one training step of the loop (:class:`~capsnet.training.Trainer`):
the task's forward and backward on this process's rows of the global batch (one model
replica per host thread, :mod:`capsnet.replicas`), the gradients combined by the
distribution strategy (:mod:`capsnet.training.strategy`), and the optimizer's step. The
loss and metric sums of the steps stay on the device until :meth:`Updater.read`, the
loop's only host synchronisation.
"""
from __future__ import annotations

from typing import Any, Mapping

from capsnet import backend
from capsnet.layers.base import Module
from capsnet.replicas import replicate
from capsnet.training.evaluation import Metric, Sums, combine_sums
from capsnet.training.strategy import SingleProcess

__all__ = ["Updater"]


class Updater:
    """Takes optimizer steps for ``model`` with ``task`` and ``optimizer``; ``metrics`` are
    summed on the device for every step; ``strategy`` (default :class:`SingleProcess`)
    decides the rows each process computes and how gradients meet.

    :meth:`start` before the first step (it builds the replicas and the strategy's
    buffers from the weights as they are then), :meth:`close` after the last.
    """

    def __init__(self, model: Module, task: Any, optimizer: Any, metrics: Mapping[str, Metric],
                 strategy: Any = None, replicas: str | None = None):
        self.model, self.task, self.optimizer = model, task, optimizer
        self.replicas = replicas
        self.metrics = dict(metrics)
        self.strategy = strategy if strategy is not None else SingleProcess()
        self.runner: Any = model
        self.sums: Sums | None = None

    def start(self) -> None:
        self.strategy.setup(self.model)
        # one model replica per host thread, a slice of each batch each, on threads or in
        # worker processes (capsnet.replicas); the model itself with one thread or off NumPy
        self.runner = replicate(self.model, kind=self.replicas)
        self.sums = Sums(self.metrics, backend.xp())

    @property
    def threads(self) -> int:
        """The host threads that split each batch (a resume is bit-exact with the same count)."""
        return getattr(self.runner, "threads", 1)

    @property
    def kind(self) -> str | None:
        """Where the replicas run ("threads" or "processes"), None when the model runs whole."""
        return getattr(self.runner, "kind", None) if self.runner is not self.model else None

    def update(self, batch: tuple, stop: bool = False) -> bool:
        """One optimizer step on the global ``batch``; ``stop``: this process asks to stop
        after it. Returns whether any process asked."""
        rows, context = self.strategy.local(batch)
        n = len(rows[0])
        if n:
            with context:
                loss, outputs = self.task.forward(self.runner, rows)
            self.optimizer.zero_grad()
            self.task.backward(self.runner)
        else:  # a short last batch leaves this process no rows: it adds zeros to the sum
            self.optimizer.zero_grad()
            self.strategy.idle(self.model)
        stop = self.strategy.reduce_gradients(n / len(batch[0]), stop)
        self.optimizer.step()
        if n:
            self.sums.add(loss, n, outputs, rows)
        return stop

    def read(self) -> tuple[float, int, dict[str, Any]]:
        """(loss sum, examples, {metric: sum}) of the steps since the last read, over every
        process, on the host: one transfer, which also settles the pending input checks."""
        return combine_sums(self.strategy.gather(self.sums.read()))

    def close(self) -> None:
        """Drop what the steps cached (no step's cache or spectra outlive the run) and end
        the replica processes, if any."""
        self.runner.release()
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()
