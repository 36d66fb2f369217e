"""Running tests/training/mpi_worker.py under ``mpiexec`` (not a test module): the marker
that skips without mpi4py or mpiexec, a tiny training command line, and the runner."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mpi_worker.py"


def mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or mpiexec() is None,
                               reason="needs mpi4py and mpiexec: pip install 'capsnet[mpi]'")

TINY = ["--conv-channels", "8", "--primary-types", "2", "--primary-dim", "4", "--digit-dim", "4",
        "--decoder-hidden", "16", "--digit-init-std", "0.05"]


def train_args(mnist_dir, out, epochs=2):
    return ["--data-dir", str(mnist_dir), "--dtype", "float64", "--epochs", str(epochs), "--batch-size", "50",
            "--train-limit", "230", "--test-limit", "101", "--log-every", "2", *TINY, "--out", str(out),
            "--no-progress"]


def run(ranks: int, args: list[str], timeout: float = 180, one_thread: bool = True) -> subprocess.CompletedProcess:
    """The worker on ``ranks`` MPI ranks (0: one process without mpiexec); ``one_thread``
    sets OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1, else neither is set."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    if one_thread:
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("PMI_SIZE", None)
    cmd = [sys.executable, str(WORKER), *args]
    if ranks > 0:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
