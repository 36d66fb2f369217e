"""capsnet.training.trainer: the general training loop on a model that is not a CapsNet
(training, bit-exact kill and resume, custom metrics, refusals, the backend scope)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from capsnet import backend
from capsnet.data import ArrayDataset, DataSource, random_shift
from capsnet.layers import MarginLoss
from capsnet.optim import Adam, ExponentialLR
from capsnet.training import CheckpointError, Trainer, count_correct

from tests.helpers import assert_records_match, conv_net


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
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    chosen = config.pop("convolution_algorithms")
    assert config == {"model": "conv_net", "lr": 3e-3, "device": "numpy (CPU)"}
    # what "auto" picked for the Conv2d (5x5 stride 3 on 28x28, 8 channels), in training and evaluation
    conv = [c for c in chosen if (c["height"], c["kernel_h"], c["stride"], c["out_channels"]) == (28, 5, 3, 8)]
    assert {c["training"] for c in conv} == {True, False}
    assert {c["chosen_by"] for c in conv} == {"cost model"}
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
    assert_records_match(strip(tmp_path / "straight" / "metrics.jsonl"),
                         strip(tmp_path / "resumed" / "metrics.jsonl"), rel=1e-12)


def test_an_epoch_resumed_after_a_stop_counts_the_time_and_images_before_the_stop(mnist_slice, tmp_path):
    """The record of an interrupted epoch gives its whole training time and images/s, not only
    the part after the resume (the results records' hours are the sum of epoch_seconds)."""
    import time

    def slow_then_stop(trainer, epoch, step):
        if epoch == 1:
            time.sleep(0.1)  # four slow steps before the stop
            if step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(mnist_slice, tmp_path / "run", epochs=2, on_step=slow_then_stop).fit()
    resumed = make_trainer(mnist_slice, tmp_path / "run", epochs=2)
    (record,) = resumed.fit(resume=True)
    assert record["epoch"] == 2
    assert record["train_seconds"] >= 0.4 and record["epoch_seconds"] >= record["train_seconds"]
    images = len(mnist_slice[0])
    assert record["train_images_per_second"] == pytest.approx(images / record["train_seconds"])


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


def test_a_short_last_batch_counts_as_a_step_of_the_epoch(mnist_slice, tmp_path):
    """180 images in batches of 50: 4 steps an epoch, the last of 30 images; the global step
    (TensorBoard's x axis, the checkpoint's clock) counts every step once, across epochs."""
    x, y, tx, ty = mnist_slice
    model = conv_net()
    steps = []
    trainer = Trainer(model, MarginLoss(), Adam(model.parameters(), lr=1e-3), ArrayDataset(x[:180], y[:180]),
                      tmp_path / "run", epochs=2, batch_size=50, eval_data=ArrayDataset(tx[:50], ty[:50]),
                      log_every=3, progress=False, log=False,
                      on_step=lambda t, epoch, step: steps.append((epoch, step, t.global_step)))
    assert trainer.steps_per_epoch == 4
    trainer.fit()
    assert [s[:2] for s in steps] == [(e, s) for e in (0, 1) for s in range(4)]
    assert [s[2] for s in steps] == list(range(1, 9))
