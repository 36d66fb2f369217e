"""No host synchronisation inside a training step: counted on the emulated device.

The emulated CuPy (capsnet.testing) counts every device-to-host transfer, with its call
site. These tests run in every suite run, on the emulated device whatever the machine has.
"""
from __future__ import annotations

import numpy as np

from capsnet.testing import device_counts
from capsnet.training import RunTrainer, TerminateOnNaN, TrainConfig, evaluate

SMALL = {"conv_channels": 8, "primary_types": 2, "primary_dim": 4, "digit_dim": 4, "decoder_hidden": [16, 32]}


def _per_step(cfg, run_dir):
    """(d2h, h2d, syncs) of each training step of one epoch, and the trainer."""
    marks = []
    with device_counts() as counts:
        def on_step(trainer, epoch, step):
            marks.append((len(counts.d2h), len(counts.h2d), len(counts.syncs)))

        trainer = RunTrainer(cfg, run_dir, progress=False, log=False, on_step=on_step)
        trainer.fit()
    steps = [tuple(b - a for a, b in zip(before, after)) for before, after in zip([(0, 0, 0)] + marks, marks)]
    return steps, trainer, counts


def test_a_training_step_transfers_nothing_to_the_host_but_the_flush(emulated_cupy, mnist_dir, tmp_path):
    cfg = TrainConfig(data_dir=str(mnist_dir), backend="cupy", epochs=1, batch_size=20, train_limit=240,
                      test_limit=60, log_every=4, model=SMALL)
    steps, trainer, counts = _per_step(cfg, tmp_path / "run")
    assert len(steps) == 12
    # the stop on divergence is on (the default) and reads what the flush brought: no extra sync
    assert any(isinstance(e, TerminateOnNaN) for e in trainer.extensions)
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
    trainer = RunTrainer(cfg, tmp_path / "run", progress=False, log=False)
    trainer.fit()
    with device_counts() as counts:
        result = evaluate(trainer.model, trainer.task, trainer.eval_data, batch_size=20,
                          metrics=trainer.metrics)
    batches = -(-90 // 20)
    assert result["n"] == 90 and np.isfinite(result["loss"])
    assert 1 <= len(counts.d2h) <= batches and len(counts.syncs) <= batches, counts.syncs
    assert counts.h2d == []  # the test set is already on the device; contiguous batches are views


def test_fused_kernels_give_numpys_numbers_bit_for_bit(emulated_cupy, host_rng):
    """Adam's update and squash run as single fused kernels on the device; under emulation
    their operations and order are NumPy's, so both backends agree exactly."""
    from capsnet import backend
    from capsnet.layers import squash, squash_backward
    from capsnet.layers.base import Parameter
    from capsnet.optim import Adam

    s = host_rng.standard_normal((4, 10, 16)).astype(np.float32)
    g = host_rng.standard_normal((4, 10, 16)).astype(np.float32)
    s[0, 0] = 0  # squash at zero length
    on_device = emulated_cupy.asarray
    np.testing.assert_array_equal(backend.to_numpy(squash(on_device(s))), squash(s))
    np.testing.assert_array_equal(backend.to_numpy(squash_backward(on_device(g), on_device(s))),
                                  squash_backward(g, s))
    host = [Parameter(host_rng.standard_normal((3, 5)).astype(np.float32)) for _ in range(2)]
    device = [Parameter(on_device(p.data)) for p in host]
    optimizers = [Adam(host, lr=1e-2, weight_decay=1e-3), Adam(device, lr=1e-2, weight_decay=1e-3)]
    for step in range(3):
        grads = [host_rng.standard_normal((3, 5)).astype(np.float32) for _ in host]
        for params in (host, device):
            for p, grad in zip(params, grads):
                p.grad[...] = grad if params is host else on_device(grad)
        with device_counts() as counts:
            optimizers[1].step()
        optimizers[0].step()
        # one kernel per parameter, weight decay included (and the moments' zeros at the first step)
        assert counts.by_kind == ({"fused": 2, "fill": 4} if step == 0 else {"fused": 2}), counts.by_kind
        for a, b in zip(host, device):
            np.testing.assert_array_equal(backend.to_numpy(b.data), a.data)


def test_a_training_step_launches_fewer_kernels_than_pytorch_eager(emulated_cupy):
    """The counts of scripts/launch_counts.py, at a batch of 8 (the same code paths as 100):
    capsnet's step on the emulated device against PyTorch's profiled eager step."""
    import importlib.util
    import sys

    import pytest

    from tests.helpers import REPO

    if importlib.util.find_spec("torch") is None:
        pytest.skip("the PyTorch count needs torch")
    sys.path.insert(0, str(REPO / "scripts"))
    import launch_counts

    ours, theirs = launch_counts.count_ours(8), launch_counts.count_torch(8)
    assert ours["host_transfers_in_step"] == 0
    assert ours["optimizer_step"] == 11 and ours["by_kind"]["fused"] >= 11 + 2 * 4
    assert ours["train_step"] < theirs["train_step"], (ours, theirs)
    assert ours["inference"] <= theirs["inference"], (ours, theirs)
