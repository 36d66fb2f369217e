"""The general training loop on a model that is not a CapsNet, evaluation leaving the
model as it was, and the core's couplings (release, device keys, CuPy detection, names)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
import tracemalloc
import types

import numpy as np
import pytest

from capsnet import backend
from capsnet.data import ArrayDataset, DataSource, load_mnist, random_shift, to_float
from capsnet.gradcheck import check_module
from capsnet.layers import Conv2d, Flatten, Linear, MarginLoss, ReLU, Sequential, Sigmoid
from capsnet.models import CapsNet, CapsNetConfig
from capsnet.optim import Adam, ExponentialLR
from capsnet.training import CapsNetTask, CheckpointError, SupervisedTask, Trainer, count_correct, evaluate

from test_layers import dev, host


def conv_net(seed=0, dtype="float32"):
    """A plain convolutional classifier: (B, 1, 28, 28) -> (B, 10) scores in (0, 1)."""
    rng = np.random.default_rng(seed)
    return Sequential(Conv2d(1, 8, 5, stride=3, dtype=dtype, seed=rng), ReLU(), Flatten(),
                      Linear(8 * 8 * 8, 10, dtype=dtype, seed=rng), Sigmoid())


@pytest.fixture(scope="module")
def mnist_slice(mnist_dir):
    data = load_mnist(mnist_dir, download=False, progress=False)
    return (to_float(data.train_images[:400]), data.train_labels[:400],
            to_float(data.test_images[:200]), data.test_labels[:200])


def make_trainer(mnist_slice, run_dir, epochs=3, on_step=None, metrics=None):
    x, y, tx, ty = mnist_slice
    model = conv_net()
    optimizer = Adam(model.parameters(), lr=3e-3)
    train = ArrayDataset(x, y, augment=lambda images, rng: random_shift(images, 2, rng))
    return Trainer(model, MarginLoss(), optimizer, train, run_dir, epochs=epochs, batch_size=50,
                   eval_data=ArrayDataset(tx, ty), schedule=ExponentialLR(optimizer, 0.9), seed=7, log_every=3,
                   metrics=metrics, config={"model": "conv_net", "lr": 3e-3}, progress=False, log=False,
                   on_step=on_step)


def test_a_convolutional_classifier_trains_through_the_loop(mnist_slice, tmp_path):
    trainer = make_trainer(mnist_slice, tmp_path / "run")
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.5
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"checkpoint.npz", "best.npz", "metrics.jsonl",
                                                              "config.json"}
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"model": "conv_net", "lr": 3e-3,
                                                                           "device": "numpy (CPU)"}
    assert trainer.optimizer.lr == pytest.approx(3e-3 * 0.9**3)


@pytest.mark.parametrize("stop_at", [(0, 4), (1, 0), (2, 7)])
def test_kill_and_resume_of_a_non_capsnet_model_is_bit_exact(mnist_slice, tmp_path, stop_at):
    straight = make_trainer(mnist_slice, tmp_path / "straight")
    straight.fit()

    def interrupt(trainer, epoch, step):
        if (epoch, step) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(mnist_slice, tmp_path / "resumed", on_step=interrupt).fit()
    resumed = make_trainer(mnist_slice, tmp_path / "resumed")
    resumed.fit(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if "second" not in k}
                          for l in path.read_text().splitlines()]
    assert strip(tmp_path / "straight" / "metrics.jsonl") == [
        pytest.approx(r, rel=1e-12) for r in strip(tmp_path / "resumed" / "metrics.jsonl")]


def test_custom_metrics_are_logged_in_metrics_jsonl(mnist_slice, tmp_path):
    def errors(outputs, batch):
        return (outputs.argmax(axis=1) != batch[1]).sum()

    def mean_score(outputs, batch):  # a vector metric: the summed scores per class
        return outputs.sum(axis=0)

    metrics = {"accuracy": count_correct, "error": errors, "score": mean_score}
    make_trainer(mnist_slice, tmp_path / "run", epochs=2, metrics=metrics).fit()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["train_error"] == pytest.approx(1 - r["train_accuracy"])
        assert r["test_error"] == pytest.approx(1 - r["test_accuracy"])
        assert len(r["test_score"]) == 10 and all(0 < s < 1 for s in r["test_score"])


def test_a_resume_with_another_configuration_is_refused(mnist_slice, tmp_path):
    make_trainer(mnist_slice, tmp_path / "run", epochs=1).fit()
    other = make_trainer(mnist_slice, tmp_path / "run", epochs=2)
    other.must_match = {"model": "conv_net", "lr": 1e-3}
    with pytest.raises(CheckpointError, match="lr: checkpoint has 0.003, asked for 0.001"):
        other.fit(resume=True)


def test_the_loop_refuses_what_does_not_follow_its_protocols(mnist_slice, tmp_path):
    x, y, _, _ = mnist_slice
    model = conv_net()
    opt = Adam(model.parameters())
    data = ArrayDataset(x, y)
    assert isinstance(data, DataSource)
    with pytest.raises(TypeError, match="data source with __len__, order"):
        Trainer(model, MarginLoss(), opt, [x, y], tmp_path, epochs=1, batch_size=10)
    with pytest.raises(TypeError, match="task with forward"):
        Trainer(model, "margin", opt, data, tmp_path, epochs=1, batch_size=10)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        Trainer(model, MarginLoss(), opt, data, tmp_path, epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="same first axis"):
        ArrayDataset(x, y[:10])


def test_fit_scopes_the_backend_instead_of_setting_it(mnist_slice, tmp_path, monkeypatch):
    def refuse(name):
        raise AssertionError("the loop must not change the global backend")

    monkeypatch.setattr(backend, "set_backend", refuse)
    before = backend.get_backend()
    make_trainer(mnist_slice, tmp_path / "run", epochs=1).fit()
    assert backend.get_backend() == before


SMALL_CAPSNET = dict(conv_channels=32, primary_types=4, primary_dim=8, digit_dim=8, decoder_hidden=[32, 64])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluation_leaves_the_model_as_it_found_it(mnist_slice, mode):
    """Mode restored, no cache or spectrum kept, no memory left behind (tracemalloc)."""
    x, y, tx, ty = mnist_slice
    model = CapsNet(CapsNetConfig(**{**CapsNetConfig().as_dict(), **SMALL_CAPSNET, "decoder_hidden": (32, 64)}))
    assert model.primary.conv.algorithm_for(20, 20, 50) == "fourier"  # scratch worth releasing
    task = CapsNetTask()
    opt = Adam(model.parameters())
    model.train()
    loss, _ = task.forward(model, (x[:50], y[:50]))  # a training step: its spectra are kept for the next
    opt.zero_grad()
    task.backward(model)
    opt.step()
    model.train(mode == "train")
    held_before = model.held_nbytes()
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


def test_release_drops_caches_and_scratch(xp, host_rng):
    layer = Conv2d(3, 4, 5, stride=2, algorithm="fourier", dtype="float64", seed=0)
    layer.eval()
    layer(dev(host_rng.standard_normal((2, 3, 11, 11))))
    assert layer.held_nbytes() > 0
    layer.release()
    assert layer.held_nbytes() == 0
    layer.train()
    layer(dev(host_rng.standard_normal((2, 3, 11, 11))))
    assert layer.held_nbytes() > 0  # the training forward's cache
    layer.release()
    with pytest.raises(RuntimeError, match="without a cached forward pass"):
        layer.backward(dev(np.ones((2, 4, 4, 4))))


def test_gradcheck_flatten(xp, host_rng):
    check_module(Sequential(Flatten(), Linear(12, 3, dtype="float64", seed=0)),
                 dev(host_rng.standard_normal((2, 3, 2, 2))))


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


def test_device_key_names_backend_and_device(xp):
    key = backend.device_key(xp.zeros(3))
    assert key == backend.device_key(xp)
    assert key[0] == xp.__name__
    with pytest.raises(backend.BackendError, match="device_key expected"):
        backend.device_key(json)


def test_cupy_arrays_are_recognised_whoever_imported_cupy(monkeypatch):
    """is_cupy_array asks sys.modules, so it does not depend on the backend having loaded
    CuPy first (a stand-in module plays CuPy here)."""
    fake = types.ModuleType("cupy")

    class ndarray:  # noqa: N801 - CuPy's name
        pass

    fake.ndarray = ndarray
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert backend.is_cupy_array(ndarray())
    assert not backend.is_cupy_array(np.zeros(2))
    assert backend.get_array_module(ndarray()) is fake
    with pytest.raises(backend.BackendError, match="different backends"):
        backend.get_array_module(ndarray(), np.zeros(2))


@pytest.mark.parametrize("package", ["capsnet.layers", "capsnet.models", "capsnet.optim", "capsnet.data",
                                     "capsnet.training"])
def test_no_export_shadows_a_submodule(package):
    pkg = importlib.import_module(package)
    shadowed = [name for name in pkg.__all__ if importlib.util.find_spec(f"{package}.{name}") is not None]
    assert shadowed == []
    assert all(hasattr(pkg, name) for name in pkg.__all__)
    assert isinstance(importlib.import_module("capsnet.layers.dense"), types.ModuleType)


def test_only_backend_py_mentions_cupy_in_code():
    """backend.py alone imports CuPy; the emulated CuPy (capsnet/testing) names CuPy's API
    in its messages but imports nothing of it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "capsnet"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "backend.py":
            continue
        emulation = path.parent.name == "testing"
        for line in path.read_text().splitlines():
            code = line.split("#")[0]
            pattern = r"import cupy|from cupy" if emulation else r"import cupy|xp\.cuda\b|\bcupy\.[A-Za-z_]"
            if re.search(pattern, code):
                offenders.append(f"{path.relative_to(root)}: {line.strip()}")
    assert offenders == []


def test_a_ctrl_c_in_the_middle_of_a_step_still_resumes_bit_exactly(mnist_slice, tmp_path, monkeypatch):
    """The signal is noted, the step under way finishes, then the loop stops and saves."""
    import signal

    straight = make_trainer(mnist_slice, tmp_path / "straight")
    straight.fit()
    trainer = make_trainer(mnist_slice, tmp_path / "resumed")
    calls = {"n": 0}
    original = trainer.task.backward

    def backward_with_ctrl_c(model):
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)  # arrives while the step's backward runs
        original(model)

    monkeypatch.setattr(trainer.task, "backward", backward_with_ctrl_c)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore it)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, outer)
    resumed = make_trainer(mnist_slice, tmp_path / "resumed")
    resumed.fit(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_confusion_counts_do_not_wrap_with_small_label_types(xp):
    from capsnet.training import confusion_counts

    scores = np.zeros((2, 20))
    scores[0, 19] = scores[1, 0] = 1
    counts = host(confusion_counts(20)(dev(scores), (None, dev(np.array([19, 18], dtype=np.uint8)))))
    assert counts[19, 19] == 1 and counts[18, 0] == 1 and counts.sum() == 2


def test_dropout_masks_of_slices_are_rows_of_the_whole_batch_mask(xp, host_rng):
    from capsnet.layers import Dropout
    from capsnet.layers.stochastic import batch_slice

    x = dev(np.ones((7, 5)))
    whole = host(Dropout(0.5, seed=4)(x))
    parts = []
    for lo, hi in ((0, 4), (4, 7)):
        layer = Dropout(0.5, seed=4)
        with batch_slice(7, lo, hi):
            parts.append(host(layer(x[lo:hi])))
    np.testing.assert_array_equal(np.concatenate(parts), whole)
