"""Data-parallel training under ``mpiexec -n 2``: the same weights as one process with
the same global batch, resume with another number of ranks, a failing rank ending the
job, checkpoints written once. Skipped without mpi4py or mpiexec (the ``mpi`` extra)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import capsnet.train as train_cli
from capsnet import backend, parallel
from capsnet.training import distributed, load_checkpoint
from capsnet.training.distributed import LocalComm, launched_by_mpi, shard, world

from tests.helpers import REPO
from tests.training.mpi import mpiexec, needs_mpi, run, train_args


def weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoint.npz")[1]


def assert_same(a: dict, b: dict, rtol: float = 1e-10) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        diff = np.linalg.norm(a[name] - b[name]) / max(np.linalg.norm(b[name]), 1e-300)
        assert diff <= rtol, f"{name}: relative difference {diff:.2e}"


def test_shards_cover_the_batch_in_order():
    for n in (1, 7, 50, 51):
        for size in (1, 2, 3):
            parts = [shard(n, r, size) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


def test_one_process_needs_no_mpi(monkeypatch):
    launchers = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")
    for name in launchers:
        monkeypatch.delenv(name, raising=False)
    assert launched_by_mpi() == 0  # no launcher in the environment: one process
    assert isinstance(world(), LocalComm)
    for size, name in enumerate(launchers, 2):  # the world size each launcher announces is read
        monkeypatch.setenv(name, "not a number")
        assert launched_by_mpi() == 0, name
        monkeypatch.setenv(name, str(size))
        assert launched_by_mpi() == size, name
        monkeypatch.delenv(name)


def test_under_mpiexec_without_mpi4py_the_command_fails_at_once_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PMI_SIZE", "2")  # what mpiexec -n 2 announces
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now fails
    monkeypatch.setattr(distributed, "_WORLD", None)
    out = tmp_path / "run"
    assert train_cli.main(["--dataset", "mnist-sample", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "started by mpiexec with 2 processes" in err
    assert "pip install 'capsnet[mpi]'" in err and not out.exists()


def test_under_mpiexec_the_blas_threads_are_this_ranks_share_of_the_cores(monkeypatch):
    if parallel.blas_threads() is None:
        pytest.skip("the BLAS thread count cannot be controlled here (no OpenBLAS)")
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    cores = len(os.sched_getaffinity(0))
    before = parallel.blas_threads()
    try:
        assert parallel.share_blas_threads() == max(cores // 2, 1) == parallel.blas_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice comes first
        assert parallel.share_blas_threads() == 1 == parallel.blas_threads()
    finally:
        parallel._blas_api()[0](before)  # the process's count as it was


@needs_mpi
def test_two_ranks_share_the_cores_out_and_say_so_in_the_first_line(mnist_dir, tmp_path):
    """Without OMP_NUM_THREADS each rank's BLAS would start a thread per core."""
    two = run(2, ["--", *train_args(mnist_dir, tmp_path / "two", epochs=1)], one_thread=False)
    assert two.returncode == 0, two.stderr
    threads = max(len(os.sched_getaffinity(0)) // 2, 1)
    first = two.stdout.splitlines()[0]
    assert f"parameters on 2 MPI ranks, {threads} BLAS thread{'s' if threads > 1 else ''} each" in first, first


@needs_mpi
def test_two_ranks_end_with_the_weights_of_one_process_with_the_same_global_batch(mnist_dir, tmp_path):
    one = run(0, ["--", *train_args(mnist_dir, tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run(2, ["--log", str(tmp_path / "saves.txt"), "--", *train_args(mnist_dir, tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    assert_same(weights(tmp_path / "two"), weights(tmp_path / "one"))
    records = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    singles = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records] == [2, 2] and [r["world_size"] for r in singles] == [1, 1]
    for a, b in zip(records, singles):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert load_checkpoint(tmp_path / "two" / "checkpoint.npz")[0]["world_size"] == 2
    saves = [line for line in (tmp_path / "saves.txt").read_text().splitlines() if " saved " in line]
    assert saves and all(line.startswith("rank 0 ") for line in saves)  # written once, by rank 0
    assert saves.count("rank 0 saved checkpoint.npz") == 2  # once per epoch
    assert sum("parameters on 2 MPI ranks" in line for line in two.stdout.splitlines()) == 1


@needs_mpi
@pytest.mark.gpu
@pytest.mark.skipif(not backend.cupy_available(),
                    reason="the cupy backend needs CuPy and a CUDA device, or CAPSNET_EMULATE_CUPY=1")
def test_two_ranks_on_the_device_stage_the_gradients_through_the_host_and_match_one_process(mnist_dir, tmp_path):
    """On CuPy the gradient buffer is copied to the host around the Allreduce; the ranks
    inherit CAPSNET_EMULATE_CUPY, so under emulation they run on the emulated device."""
    args = lambda out: ["--", *train_args(mnist_dir, out), "--backend", "cupy"]  # noqa: E731
    one = run(0, args(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = run(2, args(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert_same(weights(tmp_path / "two"), weights(tmp_path / "one"))
    assert json.loads((tmp_path / "two" / "config.json").read_text())["device"] == backend.describe_device("cupy")


@needs_mpi
@pytest.mark.parametrize("first,then", [(2, 0), (0, 2)], ids=["2-ranks-then-1", "1-then-2-ranks"])
def test_a_run_stopped_and_resumed_with_another_number_of_ranks_matches(mnist_dir, tmp_path, first, then):
    straight = run(0, ["--", *train_args(mnist_dir, tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr
    stopped = run(first, ["--stop-at", "0", "2", "--", *train_args(mnist_dir, tmp_path / "run")])
    assert stopped.returncode == 130, stopped.stderr
    header = load_checkpoint(tmp_path / "run" / "checkpoint.npz")[0]
    assert (header["epoch"], header["step_in_epoch"]) == (0, 3)
    resumed = run(then, ["--", "--out", str(tmp_path / "run"), "--resume", "--data-dir", str(mnist_dir),
                         "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same(weights(tmp_path / "run"), weights(tmp_path / "straight"))


@needs_mpi
def test_a_rank_that_fails_ends_the_job_quickly_and_leaves_the_checkpoint(mnist_dir, tmp_path):
    start = time.monotonic()
    failed = run(2, ["--fail-on-rank", "1", "1", "1", "--", *train_args(mnist_dir, tmp_path / "run", epochs=3)],
                 timeout=120)
    elapsed = time.monotonic() - start
    report = f"exit code {failed.returncode}, stdout {failed.stdout!r}, stderr {failed.stderr!r}"
    assert failed.returncode != 0, report
    assert "rank 1 of 2 failed" in failed.stderr and "bad data on this node" in failed.stderr, report
    assert elapsed < 60
    header = load_checkpoint(tmp_path / "run" / "checkpoint.npz")[0]  # the end of epoch 1, intact
    assert header["epoch"] == 1 and header["step_in_epoch"] == 0


@needs_mpi
def test_under_mpi_rank_0_holds_the_run_folder_and_a_held_folder_refuses_every_rank(mnist_dir, tmp_path):
    from capsnet.training import RunFolder

    holder = RunFolder(tmp_path / "run").lock()  # this process holds it: the job must not start
    start = time.monotonic()
    refused = run(2, ["--", *train_args(mnist_dir, tmp_path / "run", epochs=1)], timeout=120)
    assert refused.returncode != 0 and time.monotonic() - start < 60
    assert f"is in use by process {os.getpid()}" in refused.stderr
    assert not (tmp_path / "run" / "checkpoint.npz").exists()
    holder.unlock()
    done = run(2, ["--log", str(tmp_path / "saves.txt"), "--", *train_args(mnist_dir, tmp_path / "run", epochs=1)])
    assert done.returncode == 0, done.stderr
    held = sorted(line for line in (tmp_path / "saves.txt").read_text().splitlines() if "holds" in line)
    assert held == ["rank 0 holds the run folder: True", "rank 1 holds the run folder: False"]
    free = RunFolder(tmp_path / "run").lock()  # released at the end of the job
    free.unlock()
    # a fresh run over it is refused on every rank in the command line's words
    occupied = run(2, ["--", *train_args(mnist_dir, tmp_path / "run", epochs=1)], timeout=120)
    assert occupied.returncode != 0
    # every rank refuses; whichever ends the job first cuts the others' lines short (an abort
    # is not ordered with another rank's print, which a loaded machine showed), so:
    # a rank's error line (rank 0's, unless another rank's abort came first), and every report of
    # a rank ending the job, in the command line's words
    words = "already holds a run: pass --resume to continue it, or choose another --out"
    assert "fit(resume=True)" not in occupied.stderr
    assert f"{tmp_path / 'run'} {words}" in occupied.stderr
    reports = [line for line in occupied.stderr.splitlines() if "failed, ending the job" in line]
    assert all(words in line for line in reports), reports


@needs_mpi
def test_a_stop_asked_by_a_writer_only_extension_stops_every_rank_after_the_next_step(mnist_dir, tmp_path):
    """A KeyboardInterrupt from an extension that runs on rank 0 only cannot stop rank 1 by
    itself: it becomes a stop request, which the ranks agree on in the next step's reduction."""
    stopped = run(2, ["--writer-stop-at", "0", "1", "--", *train_args(mnist_dir, tmp_path / "run")], timeout=120)
    assert stopped.returncode == 130, stopped.stderr
    header = load_checkpoint(tmp_path / "run" / "checkpoint.npz")[0]
    assert (header["epoch"], header["step_in_epoch"], header["world_size"]) == (0, 3, 2)


@needs_mpi
def test_ctrl_c_under_mpiexec_stops_every_rank_after_the_same_step_and_saves(mnist_dir, tmp_path):
    import signal

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    args = train_args(mnist_dir, tmp_path / "run", epochs=200)
    # SIGINT as in a terminal, even where this test runs as a background job that ignores it
    proc = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, "-m", "capsnet.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # wait for the first epoch, so the loop is running
            if line.startswith("epoch 1/") or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    header = load_checkpoint(tmp_path / "run" / "checkpoint.npz")[0]
    assert header["world_size"] == 2 and header["epoch"] >= 1


@needs_mpi
def test_the_baseline_with_dropout_on_two_ranks_matches_one_process(mnist_dir, tmp_path):
    """Dropout draws the mask of the whole global batch on every rank and keeps its rows."""
    cnn = ["--data-dir", str(mnist_dir), "--dtype", "float64", "--epochs", "1", "--batch-size", "50",
           "--train-limit", "150", "--test-limit", "60", "--model", "cnn", "--cnn-channels", "4", "4", "2",
           "--cnn-fc", "16", "8", "--pool", "--no-progress"]
    one = run(0, ["--", *cnn, "--out", str(tmp_path / "one")])
    two = run(2, ["--", *cnn, "--out", str(tmp_path / "two")])
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert_same(weights(tmp_path / "two"), weights(tmp_path / "one"))


def test_a_failing_rank_flushes_its_report_and_waits_before_the_abort(monkeypatch):
    """mpiexec relays a rank's output through its proxy; an abort that arrives first ends
    the job with the report unread (a CI run ended with code 1 and an empty stderr)."""
    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def write(self, text):
            events.append(("write", self.name))

        def flush(self):
            events.append(("flush", self.name))

    class FakeMPI:
        def Abort(self, code):  # noqa: N802 - mpi4py's name
            events.append(("abort", code, time.monotonic()))

    comm = distributed.MPIComm.__new__(distributed.MPIComm)
    comm._comm, comm.rank, comm.size = FakeMPI(), 1, 2
    monkeypatch.setattr(sys, "stderr", Stream("stderr"))
    monkeypatch.setattr(sys, "stdout", Stream("stdout"))
    start = time.monotonic()
    distributed.fail(comm, RuntimeError("bad data on this node"), code=3)
    assert distributed.ABORT_GRACE_SECONDS >= 0.5
    flushed = [e for e in events if e[0] == "flush"]
    assert ("flush", "stderr") in flushed and ("flush", "stdout") in flushed
    assert events[-1][:2] == ("abort", 3) and events[-1][2] - start >= distributed.ABORT_GRACE_SECONDS
    assert all(e[0] != "write" for e in events[events.index(flushed[-1]):])  # nothing written after the flush


LIBRARY_FAILURE = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np
from capsnet.data import ArrayDataset, load_mnist, to_float
from capsnet.layers import Flatten, Linear, MarginLoss, Sequential, Sigmoid
from capsnet.optim import Adam
from capsnet.training import SupervisedTask, Trainer
from capsnet.training.distributed import world

comm = world()
data = load_mnist({data!r}, download=False, progress=False)
model = Sequential(Flatten(), Linear(784, 10, seed=0), Sigmoid())
task = SupervisedTask(MarginLoss())
forward = task.forward
calls = [0]
def failing(model, batch):
    calls[0] += 1
    if comm.rank == 1 and calls[0] == 3:
        raise RuntimeError("bad data on this node")
    return forward(model, batch)
task.forward = failing
train = ArrayDataset(to_float(data.train_images[:400]), data.train_labels[:400])
Trainer(model, task, Adam(model.parameters()), train, {out!r}, epochs=5, batch_size=20, progress=False,
        log=False, comm=comm).fit()
"""


@needs_mpi
def test_a_failing_rank_ends_a_job_that_uses_the_trainer_as_a_library(mnist_dir, tmp_path):
    script = tmp_path / "library.py"
    script.write_text(LIBRARY_FAILURE.format(repo=str(REPO), data=str(mnist_dir), out=str(tmp_path / "run")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    report = f"exit code {proc.returncode}, stdout {proc.stdout!r}, stderr {proc.stderr!r}"
    assert proc.returncode != 0, report
    assert "rank 1 of 2 failed" in proc.stderr and "bad data on this node" in proc.stderr, report
    assert time.monotonic() - start < 60
