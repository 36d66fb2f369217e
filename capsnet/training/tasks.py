"""Tasks: what the loop trains, a model's loss on a batch and its backward.

A task has ``forward(model, batch) -> (loss, outputs)``, with ``loss`` a 0-d array,
caching what the backward needs only when the model is in training mode, and
``backward(model)``, which backpropagates that loss into the parameters' gradients.
:class:`SupervisedTask` makes one from any loss module. The tasks of particular models
live beside them: :class:`capsnet.models.CapsNetTask` (margin plus reconstruction loss)
and :class:`capsnet.models.SpreadTask` (EM routing's spread loss).
"""
from __future__ import annotations

from typing import Any

from capsnet.layers.base import Module

__all__ = ["SupervisedTask"]


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
        grad = self.loss.backward()
        if isinstance(grad, tuple):
            model.backward(*grad)
        else:
            model.backward(grad)
