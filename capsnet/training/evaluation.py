"""Metrics and evaluation: sums computed on the device, brought to the host in one transfer.

A **metric** is ``fn(outputs, batch)``, the *sum* over the batch's examples of a quantity
(a 0-d array, or any shape: a confusion matrix of counts), computed on the device;
reports divide by the number of examples. :func:`count_correct` gives accuracy,
:func:`confusion_counts` a confusion matrix. :func:`evaluate` runs a model over a data
source with a task and returns the means. :class:`Sums` is how the loop and evaluation
keep running sums on the device and read them with one host synchronisation.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from capsnet import backend, checks
from capsnet.layers.base import Module

__all__ = ["Metric", "Sums", "confusion_counts", "count_correct", "evaluate", "scores_of"]

Metric = Callable[[Any, tuple], Any]


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


def add(total: float | list | None, value: float | list) -> float | list:
    """Two host sums added: floats, or nested lists of the same shape (None: nothing yet)."""
    if total is None:
        return value
    if isinstance(value, list):
        return (np.asarray(total) + np.asarray(value)).tolist()
    return total + value


def mean(total: float | list, n: int) -> float | list:
    """A host sum divided by ``n`` examples (at least 1)."""
    if isinstance(total, list):
        return (np.asarray(total) / max(n, 1)).tolist()
    return total / max(n, 1)


def combine(parts: list) -> Any:
    """Per-process host sums added in rank order."""
    total = parts[0]
    for part in parts[1:]:
        total = add(total, part)
    return total


def combine_sums(parts: list[tuple[float, int, dict[str, Any]]]) -> tuple[float, int, dict[str, Any]]:
    """Every process's :meth:`Sums.read` (``(loss sum, examples, {metric: sum})``, in rank
    order) as one: each part added in rank order; a metric only some processes have (a
    process without examples has none) is the sum of those that have it."""
    sums: dict[str, Any] = {}
    for _, _, part in parts:
        for name, value in part.items():
            sums[name] = add(sums.get(name), value)
    return combine([part[0] for part in parts]), sum(part[1] for part in parts), sums


def fetch(values: list[Any]) -> list[np.ndarray]:
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


def _json(arr: np.ndarray) -> float | list:
    return float(arr) if arr.ndim == 0 else arr.astype(float).tolist()


class Sums:
    """The loss and metric sums of the batches seen since the last :meth:`read`, on the
    device (no host synchronisation while adding).

    ``add(loss, n, outputs, batch)`` adds ``loss * n`` and each metric's sum over the batch;
    ``read()`` brings ``(loss sum, examples, {name: sum})`` to the host in one transfer,
    settles the pending input checks of :mod:`capsnet.checks` in the same transfer (they
    raise there if an input failed), and starts again from zero.
    """

    def __init__(self, metrics: Mapping[str, Metric], xp: Any):
        self.metrics, self.xp = dict(metrics), xp
        self._reset()

    def _reset(self) -> None:
        self.loss = self.xp.zeros((), dtype=self.xp.float64)
        self.sums: dict[str, Any] = {}
        self.seen = 0

    def add(self, loss: Any, n: int, outputs: Any, batch: tuple) -> None:
        self.loss += loss * n
        self.seen += n
        for name, fn in self.metrics.items():
            value = fn(outputs, batch)
            self.sums[name] = value if name not in self.sums else self.sums[name] + value

    def read(self) -> tuple[float, int, dict[str, float | list]]:
        pending = checks.pending()
        host = fetch([self.loss, *self.sums.values(), *pending])
        checks.settle([int(n) for n in host[1 + len(self.sums):]])
        out = (float(host[0]), self.seen, {name: _json(v) for name, v in zip(self.sums, host[1:])})
        self._reset()
        return out


def evaluate(model: Module, task: Any, data: Any, *, batch_size: int = 100,
             metrics: Mapping[str, Metric] | None = None, progress: bool = False,
             desc: str = "test", comm: Any = None, strategy: Any = None) -> dict[str, Any]:
    """Mean loss and metrics of ``model`` on all of ``data``, unaugmented, in eval mode.

    Returns ``{"loss": mean, name: mean per example, ..., "n": examples}`` (a metric of
    any shape comes back as nested lists), and ``"totals"``: each metric's plain sum.
    The model is left as it was found: its mode is restored, and what evaluation
    allocated (the Fourier convolution's scratch and weight spectrum) is released.
    Under MPI (``comm``, or a ``strategy`` of :mod:`capsnet.training.strategy`) each
    process evaluates its own contiguous share and the sums are combined; every process
    gets the result.
    """
    from capsnet.training.strategy import strategy_for  # noqa: PLC0415 - the strategies use these sums

    strategy = strategy if strategy is not None else strategy_for(comm)
    metrics = dict(metrics if metrics is not None else {"accuracy": count_correct})
    n = len(data)
    if n < 1:
        raise ValueError("evaluate: the data source is empty")
    lo, hi = strategy.shard(n)
    try:
        with model.evaluating():
            xp = backend.get_array_module(model.parameters()[0].data) if model.parameters() else np
            sums = Sums(metrics, xp)
            starts = range(lo, hi, batch_size)
            for start in tqdm(starts, desc=desc, leave=False, disable=None if progress else True, unit="batch"):
                idx = np.arange(start, min(start + batch_size, hi), dtype=np.int64)
                batch = data.batch(idx, None)
                loss, outputs = task.forward(model, batch)
                sums.add(loss, len(idx), outputs, batch)
            parts = strategy.gather(sums.read())
    except Exception as exc:
        strategy.fail(exc)  # under MPI: the other processes would wait in the gather
        raise
    finally:
        model.release()
    loss, _, totals = combine_sums(parts)
    result: dict[str, Any] = {"loss": loss / n}
    result.update({name: mean(total, n) for name, total in totals.items()})
    result["n"] = n
    result["totals"] = totals
    return result
