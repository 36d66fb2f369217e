"""capsnet.training.evaluation and tasks: evaluation leaves the model as it found it, the
supervised task caches only in training, confusion counts do not wrap."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from capsnet.data import ArrayDataset
from capsnet.layers import Linear, MarginLoss, Sequential, Sigmoid
from capsnet.models import CapsNet, CapsNetConfig
from capsnet.optim import Adam
from capsnet.training import CapsNetTask, SupervisedTask, evaluate

from tests.helpers import dev, host


SMALL_CAPSNET = dict(conv_channels=32, primary_types=4, primary_dim=8, digit_dim=8, decoder_hidden=[32, 64])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluation_leaves_the_model_as_it_found_it(mnist_slice, mode):
    """Mode restored, no cache or spectrum kept, no memory left behind (tracemalloc)."""
    x, y, tx, ty = mnist_slice
    model = CapsNet(CapsNetConfig(**{**CapsNetConfig().as_dict(), **SMALL_CAPSNET, "decoder_hidden": (32, 64)}))
    model.primary.conv.algorithm = "fourier"  # scratch worth releasing
    task = CapsNetTask()
    opt = Adam(model.parameters())
    model.train()
    loss, _ = task.forward(model, (x[:50], y[:50]))  # a training step: its spectra are kept for the next
    opt.zero_grad()
    task.backward(model)
    opt.step()
    model.train(mode == "train")
    held_before = model.held_nbytes()
    # one evaluation first: what the first call of a process keeps for good (the imports of the
    # progress bar's first use, the convolution engine's choice for the evaluation's geometry) is no leak
    model.release()
    evaluate(model, task, ArrayDataset(tx[:50], ty[:50]), batch_size=50)
    model.train(mode == "train")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = evaluate(model, task, ArrayDataset(tx, ty), batch_size=50)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 <= result["accuracy"] <= 1 and result["n"] == 200
    assert peak > before + 1_000_000  # evaluation did allocate scratch...
    assert after <= before + 100_000  # ...and gave it back
    assert model.training is (mode == "train")
    assert model.held_nbytes() == 0 <= held_before
    assert all(m._cache is None for m in (*model.modules(), *task.criterion.modules()))


def test_supervised_task_caches_only_in_training(xp, host_rng):
    model = Sequential(Linear(4, 3, dtype="float64", seed=0), Sigmoid())
    task = SupervisedTask(MarginLoss())
    batch = (dev(host_rng.standard_normal((5, 4))), dev(np.array([0, 1, 2, 0, 1])))
    model.eval()
    task.forward(model, batch)
    assert task.loss._cache is None
    model.train()
    task.forward(model, batch)
    task.backward(model)
    assert float(np.abs(host(model[0].weight.grad)).sum()) > 0


def test_confusion_counts_do_not_wrap_with_small_label_types(xp):
    from capsnet.training import confusion_counts

    scores = np.zeros((2, 20))
    scores[0, 19] = scores[1, 0] = 1
    counts = host(confusion_counts(20)(dev(scores), (None, dev(np.array([19, 18], dtype=np.uint8)))))
    assert counts[19, 19] == 1 and counts[18, 0] == 1 and counts.sum() == 2
