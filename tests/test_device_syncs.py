"""No host synchronisation inside a training step: counted on the emulated device.

The emulated CuPy (capsnet.testing) counts every device-to-host transfer, with its call
site. These tests run in every suite run, on the emulated device whatever the machine has.
"""
from __future__ import annotations

import numpy as np

from capsnet.testing import device_counts
from capsnet.training import MNISTTrainer, TrainConfig, evaluate

SMALL = {"conv_channels": 8, "primary_types": 2, "primary_dim": 4, "digit_dim": 4, "decoder_hidden": [16, 32]}


def _per_step(cfg, run_dir):
    """(d2h, h2d, syncs) of each training step of one epoch, and the trainer."""
    marks = []
    with device_counts() as counts:
        def on_step(trainer, epoch, step):
            marks.append((len(counts.d2h), len(counts.h2d), len(counts.syncs)))

        trainer = MNISTTrainer(cfg, run_dir, progress=False, log=False, on_step=on_step)
        trainer.fit()
    steps = [tuple(b - a for a, b in zip(before, after)) for before, after in zip([(0, 0, 0)] + marks, marks)]
    return steps, trainer, counts


def test_a_training_step_transfers_nothing_to_the_host_but_the_flush(emulated_cupy, mnist_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(mnist_dir), backend="cupy", epochs=1, batch_size=20, train_limit=240,
                      test_limit=60, log_every=4, model=SMALL)
    steps, trainer, counts = _per_step(cfg, tmp_path / "run")
    assert len(steps) == 12
    flushes = [s for s in range(12) if (s + 1) % 4 == 0]
    for s, (d2h, h2d, syncs) in enumerate(steps):
        # one transfer, one wait at each flush (loss, metrics and label checks packed together), none otherwise
        assert (d2h, syncs) == ((1, 1) if s in flushes else (0, 0)), (s, steps)
        if s > 0:  # steady state: the batch's indices and its shifts, one transfer each
            assert h2d == 2, (s, steps)
    whats = {(e.what, e.site.rsplit("/", 1)[-1].split(":")[0]) for e in counts.h2d}
    assert ("cupy.asarray", "dataset.py") in whats and ("cupy.asarray", "augment.py") in whats


def test_evaluation_makes_at_most_one_transfer_per_batch(emulated_cupy, mnist_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(mnist_dir), backend="cupy", epochs=1, batch_size=20, train_limit=40,
                      test_limit=90, log_every=2, model=SMALL)
    trainer = MNISTTrainer(cfg, tmp_path / "run", progress=False, log=False)
    trainer.fit()
    with device_counts() as counts:
        result = evaluate(trainer.model, trainer.task, trainer.eval_data, batch_size=20,
                          metrics=trainer.metrics)
    batches = -(-90 // 20)
    assert result["n"] == 90 and np.isfinite(result["loss"])
    assert 1 <= len(counts.d2h) <= batches and len(counts.syncs) <= batches, counts.syncs
    assert counts.h2d == []  # the test set is already on the device; contiguous batches are views
