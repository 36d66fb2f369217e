"""Both CPU cores for NumPy's single-threaded work.

A NumPy element-wise pass runs on one core while OpenBLAS's large products use all of
them. Work that splits into independent pieces (the chunks of an optimizer update) can
run on a few threads instead: NumPy releases the GIL inside those calls. (Splitting
dynamic routing over the batch the same way was measured and did not speed up the
training step: NOTES.md.) Each piece computes
exactly what the whole would for its part (nothing is reduced across pieces), so the
results are the same bit for bit whatever the split. Only work on NumPy arrays comes
here (the optimizers run CuPy updates on the calling thread); on CuPy the GPU already runs
each call in parallel.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

__all__ = ["host_threads", "run_all"]

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_inside = threading.local()


def host_threads() -> int:
    """Threads this work may use: the CPUs the process may run on, capped by
    OMP_NUM_THREADS or OPENBLAS_NUM_THREADS when set (the matrix products' limit)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            n = min(n, int(value))
    return max(n, 1)


def run_all(tasks: list[Callable[[], None]]) -> None:
    """Run the tasks on a shared pool of host_threads() threads and wait for all of them
    (an error is raised once every task has ended); here, in order, with one thread, one
    task, or when called from inside a pool task. Callers keep device arrays (CuPy) out:
    a CUDA device and stream belong to the thread that uses them."""
    global _pool, _pool_size
    threads = min(host_threads(), len(tasks))
    if threads <= 1 or getattr(_inside, "active", False):
        for task in tasks:
            task()
        return
    with _pool_lock:
        if _pool is None or _pool_size < threads:  # grow only; an old pool is left to finish its work
            _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="capsnet"), threads
        pool = _pool

    def inside(task: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            _inside.active = True
            try:
                task()
            finally:
                _inside.active = False
        return run

    futures = [pool.submit(inside(task)) for task in tasks]
    errors = [f.exception() for f in futures]  # waits for every task
    for error in errors:
        if error is not None:
            raise error
