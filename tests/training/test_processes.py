"""ProcessReplicas (capsnet/processes.py): replicas in worker processes, the same bits as
replicas on threads; failures, dead workers, Ctrl-C, replaced weights; the choice of kind
(capsnet.replicas.replica_kind) and the Trainer's ``replicas``."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from capsnet import parallel
from capsnet import slices as slices_module
from capsnet.layers import BatchNorm1d, Dropout, Linear, Sequential
from capsnet.models import CapsNet, CapsNetConfig, CapsNetLoss, EfficientCapsNet, MatrixCapsNet
from capsnet.optim import Adam
from capsnet.processes import ProcessReplicas, WorkerError, process_reason
from capsnet.replicas import Replicas, replica_kind, replicate

from tests.helpers import FailsOnMarkedRows
from tests.training.test_replicas import SMALL, capsnet_trainer

pytestmark = [
    pytest.mark.skipif(parallel.blas_threads() is None,
                       reason="the BLAS thread count cannot be controlled here (no OpenBLAS loaded)"),
    pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="worker processes need os.memfd_create (Linux)"),
]


@pytest.fixture(autouse=True)
def split_small_batches(monkeypatch):
    monkeypatch.setattr(slices_module, "MIN_TRAIN_SLICE", 1)


@pytest.fixture
def closing():
    """Process replicas made in a test, closed at its end (their workers ended)."""
    made: list[ProcessReplicas] = []

    def make(model, n=2):
        runner = ProcessReplicas(model, n)
        made.append(runner)
        return runner
    yield make
    for runner in made:
        runner.close()
        for w in runner._workers:
            assert w.proc.poll() is not None


def _steps(runner, model, x, y, steps, loss):
    """``steps`` Adam steps through ``runner``; (outputs, gradients) of each."""
    opt = Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        model.train()
        out = runner(x, y) if y is not None else runner(x)
        grads = loss(out)
        opt.zero_grad()
        runner.backward(*grads)
        history.append((out, {n: p.grad.copy() for n, p in model.named_parameters()}))
        opt.step()
    return history


def _same(a, b, what):
    if isinstance(a, (tuple, list)):
        for k, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{what}[{k}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k], f"{what}.{k}")
    else:
        np.testing.assert_array_equal(a, b, err_msg=what)


@pytest.mark.parametrize("network", ["efficient", "capsnet", "em"])
def test_process_replicas_compute_the_bits_of_thread_replicas(network, closing):
    """Forward, backward, batch norm over the whole batch, buffers, Adam steps on the shared
    weights and predictions: bit for bit the thread replicas', with 2 and 3 replicas."""
    rng = np.random.default_rng(0)
    x = rng.random((9, 1, 28, 28)).astype(np.float32)
    y = np.arange(9) % 10

    def make():
        if network == "efficient":
            return EfficientCapsNet(seed=0)
        if network == "capsnet":
            return CapsNet(CapsNetConfig(**SMALL), seed=0)
        return MatrixCapsNet(seed=0, conv_channels=8, primary_types=4, caps1=4, caps2=4)

    def loss(out):
        if network == "em":
            return (out - 0.5,)
        crit = CapsNetLoss()
        crit(*out, y, x)
        return crit.backward()
    labels = None if network == "em" else y
    for n in (2, 3):
        results = []
        for kind in ("threads", "processes"):
            model = make()
            runner = Replicas(model, n) if kind == "threads" else closing(model, n)
            history = _steps(runner, model, x, labels, 2, loss)
            model.eval()
            results.append((history, runner.predict(x) if network != "em" else runner(x), model.state_dict()))
        _same(results[1], results[0], f"{network}, {n} replicas")


def test_a_failing_replica_is_reported_with_its_traceback_and_the_next_step_works(closing):
    model = Sequential(FailsOnMarkedRows(), BatchNorm1d(5, dtype="float64"))
    runner = closing(model, 3)
    x = np.random.default_rng(6).standard_normal((9, 5))
    for row in (3, 6, 0):  # a worker fails (the others wait in the batch norm's exchange); this process fails
        bad = x.copy()
        bad[row, 0] = 999
        with pytest.raises(ValueError, match="marked row") as info:
            runner(bad)
        if row:
            assert any("replica process" in note and "helpers.py" in note
                       for note in getattr(info.value, "__notes__", []))
    y = runner(x)
    runner.backward(np.ones_like(y))
    expected = Sequential(BatchNorm1d(5, dtype="float64"))(x)
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-14)


def test_a_worker_that_dies_is_reported_with_its_exit_code_and_replaced(closing):
    model = Sequential(Linear(5, 3, dtype="float64", seed=np.random.default_rng(1)))
    runner = closing(model)
    x = np.random.default_rng(2).standard_normal((6, 5))
    expected = model(x)
    np.testing.assert_array_equal(runner(x), expected)
    for between in (True, False):  # killed between two calls; killed between a forward and its backward
        if not between:
            runner(x)
        dead = runner._workers[0].proc
        dead.kill()
        dead.wait()
        with pytest.raises(WorkerError, match="replica process 1 ended \\(exit code -9\\)"):
            runner(x) if between else runner.backward(np.ones((6, 3)))
        np.testing.assert_array_equal(runner(x), expected)  # started afresh
        assert runner._workers[0].proc is not dead


def test_workers_ignore_ctrl_c_and_end_on_close(closing):
    model = Sequential(Linear(5, 3, dtype="float64", seed=np.random.default_rng(1)), BatchNorm1d(3, dtype="float64"))
    runner = closing(model)
    x = np.random.default_rng(3).standard_normal((6, 5))
    runner(x)
    proc = runner._workers[0].proc
    os.kill(proc.pid, signal.SIGINT)
    runner(x)
    assert proc.poll() is None
    runner.close()
    assert proc.poll() is not None
    assert model[1]._group is None  # the layer normalises on its own again
    model(x)


def test_weights_replaced_in_the_model_reach_the_workers(closing):
    model = Sequential(Linear(5, 3, dtype="float64", seed=np.random.default_rng(1)))
    runner = closing(model)
    x = np.random.default_rng(4).standard_normal((6, 5))
    runner(x)
    model[0].weight.data = np.random.default_rng(5).standard_normal(model[0].weight.data.shape)
    new = model[0].weight.data.copy()
    out = runner(x)
    np.testing.assert_array_equal(model[0].weight.data, new)
    np.testing.assert_array_equal(out, model(x))
    model[0].weight.data = model[0].weight.data.astype(np.float32)
    with pytest.raises(RuntimeError, match="build a new ProcessReplicas"):
        runner(x)


def test_running_statistics_loaded_into_the_model_reach_the_workers(closing):
    model = EfficientCapsNet(seed=0)
    runner = closing(model)
    x = np.random.default_rng(5).random((8, 1, 28, 28)).astype(np.float32)
    model.eval()
    runner.predict(x)
    state = model.state_dict()
    for name in state:
        if name.endswith("running_mean") or name.endswith("running_var"):
            state[name] = state[name] + np.float32(0.5)
    model.load_state_dict(state)
    for method in (runner.predict, runner):  # map() and an eval forward
        _same(method(x), model.predict(x) if method == runner.predict else model(x), "after load_state_dict")


def test_dropout_masks_and_draw_counters_match_the_threads(closing):
    def run(kind):
        model = Sequential(Linear(6, 8, dtype="float64", seed=np.random.default_rng(1)), Dropout(0.5, seed=11))
        runner = Replicas(model, 2) if kind == "threads" else closing(model)
        x = np.random.default_rng(3).standard_normal((10, 6))
        outs = [runner(x) for _ in range(2)]
        return outs, model.state_dict()
    _same(run("processes"), run("threads"), "dropout")


def test_a_model_a_worker_cannot_import_is_refused_and_not_preferred():
    class Local(Sequential):
        replica_kind = "processes"

    model = Local(Linear(5, 3, dtype="float64", seed=np.random.default_rng(1)))
    assert "Local" in process_reason(model)
    with pytest.raises(ValueError, match="cannot import"):
        ProcessReplicas(model, 2)
    with pytest.raises(ValueError, match="cannot import"):
        replicate(model, 2, kind="processes")
    assert replica_kind(None, model) == "threads"
    assert isinstance(replicate(model, 2), Replicas)


def test_the_kind_comes_from_the_argument_the_environment_then_the_model(monkeypatch):
    monkeypatch.delenv("CAPSNET_REPLICAS", raising=False)
    assert replica_kind(None, EfficientCapsNet(seed=0)) == "processes"
    assert replica_kind(None, MatrixCapsNet(seed=0)) == "processes"
    assert replica_kind(None, CapsNet(CapsNetConfig(**SMALL), seed=0)) == "threads"
    assert replica_kind("threads", EfficientCapsNet(seed=0)) == "threads"
    monkeypatch.setenv("CAPSNET_REPLICAS", "threads")
    assert replica_kind(None, EfficientCapsNet(seed=0)) == "threads"
    assert replica_kind("processes", None) == "processes"
    monkeypatch.setenv("CAPSNET_REPLICAS", "fork")
    with pytest.raises(ValueError, match="CAPSNET_REPLICAS must be one of threads, processes, got 'fork'"):
        replica_kind()
    with pytest.raises(ValueError, match="replicas must be one of"):
        replica_kind("gpu")


def test_a_run_on_processes_is_the_run_on_threads_and_resumes_on_either(mnist_slice, tmp_path):
    with parallel.threads(2):
        threads = capsnet_trainer(mnist_slice, tmp_path / "threads", replicas="threads")
        threads_history = threads.fit()

        def interrupt(trainer, epoch, step):
            if (epoch, step) == (0, 2):
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            capsnet_trainer(mnist_slice, tmp_path / "resumed", on_step=interrupt, replicas="processes").fit()
        resumed = capsnet_trainer(mnist_slice, tmp_path / "resumed", replicas="threads")
        resumed.fit(resume=True)
        processes = capsnet_trainer(mnist_slice, tmp_path / "processes", replicas="processes")
        history = processes.fit()
    assert history[-1]["replicas"] == "processes" and threads_history[-1]["replicas"] == "threads"
    assert processes.updater.runner._workers == []  # ended with the run
    for other in (threads, resumed):
        for name, value in processes.model.state_dict().items():
            np.testing.assert_array_equal(other.model.state_dict()[name], value, err_msg=name)
    assert history[-1]["test_loss"] == threads_history[-1]["test_loss"]


def test_an_unknown_kind_fails_when_the_trainer_is_made(mnist_slice, tmp_path):
    with pytest.raises(ValueError, match="replicas must be one of threads, processes, got 'gpu'"):
        capsnet_trainer(mnist_slice, tmp_path / "run", replicas="gpu")


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def test_ctrl_c_in_a_terminal_stops_the_run_saves_it_and_leaves_no_worker(tmp_path):
    """Ctrl-C reaches the whole process group, workers included: they ignore it, the run
    stops after its step and saves, and the workers end with it."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    # two threads whatever an earlier test left in the environment (host_threads takes the
    # smallest of OMP_NUM_THREADS and OPENBLAS_NUM_THREADS); replicas are a NumPy matter
    env = dict(os.environ, CAPSNET_REPLICAS="processes", OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    env.pop("CAPSNET_EMULATE_CUPY", None)
    with subprocess.Popen([sys.executable, "-m", "capsnet.train", "--backend", "numpy", "--model", "efficient",
                           "--dataset", "mnist-sample", "--train-limit", "640", "--test-limit", "64", "--epochs", "50",
                           "--batch-size", "32", "--out", str(out), "--no-progress"], env=env, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as proc:
        try:
            deadline = time.monotonic() + 120
            while not (workers := _children(proc.pid)) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
            if not workers:
                proc.kill()
                pytest.fail(f"no worker process started:\n{proc.communicate()[0]}")
            time.sleep(1)
            os.killpg(proc.pid, signal.SIGINT)
            output, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, output
    assert "state saved" in output and (out / "checkpoint.npz").exists()
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_a_run_configuration_refuses_an_unknown_kind():
    from capsnet.training import TrainConfig

    with pytest.raises(ValueError, match="replicas must be one of threads, processes, got 'gpu'"):
        TrainConfig(replicas="gpu").validate()
    assert TrainConfig(replicas="processes").validate().replicas == "processes"
