"""TensorBoard curves of a training run: :class:`TensorBoardLog` (the ``tensorboard`` extra).

:class:`~capsnet.training.Trainer` (``tensorboard=DIR``, ``python -m capsnet.train
--tensorboard DIR``) writes, on rank 0 only, at steps counted in optimizer steps since
the run began:

- ``train/<name>``: the epoch's running mean of the loss and of each metric, and ``lr``,
  every ``log_every`` steps, from the values the loop already brings to the host there
  (no extra synchronisation);
- ``epoch/<key>``: every number of the epoch's ``metrics.jsonl`` record, at the epoch's
  last step;
- ``images/<name>``: a few test inputs and their reconstructions each epoch, when the task
  draws them (:meth:`capsnet.training.CapsNetTask.images`).

A resumed run opens its writer with ``purge_step`` one past the checkpoint's step:
TensorBoard then drops whatever the stopped run wrote after its checkpoint, and the curves
go on with no step written twice.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["INSTALL_HINT", "TensorBoardLog", "summary_writer_class"]

INSTALL_HINT = "pip install 'capsnet[tensorboard]'"
"""How to install what TensorBoard logging needs."""


def summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, or an ImportError that says how to install it.

    Also imports Pillow, which tensorboardX needs for the reconstructions (its
    ``add_images``) but loads only at the first image: without this, a run would fail
    at the end of its first epoch instead of before it."""
    missing = []
    for module in ("tensorboardX", "PIL.Image"):  # PIL.Image: what tensorboardX's add_images imports
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing.append(str(exc))
    if missing:
        raise ImportError(f"TensorBoard logging (--tensorboard on the command line, Trainer(tensorboard=...)) needs "
                          f"the tensorboardX package and Pillow, which cannot be imported here ({'; '.join(missing)}); "
                          f"install them with {INSTALL_HINT}")
    from tensorboardX import SummaryWriter  # noqa: PLC0415 - an optional extra, importable as just checked

    return SummaryWriter


def _scalar(value: Any) -> float | None:
    """``value`` as a float when it is a finite-or-not plain number (not a bool, not a list)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


class TensorBoardLog:
    """One run's TensorBoard event files in ``logdir``.

    ``purge_step``: the first step this writer may write; events at or after it that an
    earlier, stopped run left in ``logdir`` are discarded by TensorBoard (a resume).
    Every method takes host values only.
    """

    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        writer_class = summary_writer_class()
        self.logdir = Path(logdir)
        # TensorBoard reads a folder's event files in name order, and tensorboardX names them by
        # the second they were opened: the first step in the name keeps a resume that starts in
        # the same second as its run from overwriting that run's file, and orders the two.
        self.writer = writer_class(str(self.logdir), purge_step=purge_step,
                                   filename_suffix=f".step{purge_step or 0:012d}")

    def interval(self, step: int, means: Mapping[str, float], lr: float) -> None:
        """The running means of the epoch so far (``loss`` and each scalar metric), and the
        learning rate, at optimizer step ``step``."""
        for name, value in means.items():
            if _scalar(value) is not None:
                self.writer.add_scalar(f"train/{name}", float(value), step)
        self.writer.add_scalar("lr", float(lr), step)

    def epoch(self, step: int, record: Mapping[str, Any]) -> None:
        """Every number of an epoch's record (but the epoch's own number), at ``step``."""
        for key, value in record.items():
            number = _scalar(value)
            if key != "epoch" and number is not None and not math.isnan(number):
                self.writer.add_scalar(f"epoch/{key}", number, step)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Image batches (N, C, H, W) with values in [0, 1], one grid per name."""
        for name, batch in images.items():
            self.writer.add_images(f"images/{name}", np.clip(np.asarray(batch, dtype=np.float32), 0, 1), step,
                                   dataformats="NCHW")

    def flush(self) -> None:
        """Write what is buffered to disk (before every checkpoint, so a resume purges right)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
