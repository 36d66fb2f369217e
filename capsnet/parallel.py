"""Both CPU cores for NumPy's single-threaded work.

A NumPy element-wise pass runs on one core while OpenBLAS's large products use all of
them. Work that splits into independent pieces (the chunks of an optimizer update) can
run on a few threads instead: NumPy releases the GIL inside those calls. (Splitting
dynamic routing over the batch the same way was measured and did not speed up the
training step: NOTES.md.) Each piece computes
exactly what the whole would for its part (nothing is reduced across pieces), so the
results are the same bit for bit whatever the split. Only the NumPy backend uses this;
on CuPy the GPU already runs each call in parallel.
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
    """Run the tasks on a shared pool of host_threads() threads and wait for all; here,
    in order, with one thread, one task, or when called from inside a pool task."""
    global _pool, _pool_size
    threads = min(host_threads(), len(tasks))
    if threads <= 1 or getattr(_inside, "active", False):
        for task in tasks:
            task()
        return
    with _pool_lock:
        if _pool is None or _pool_size < threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
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

    for future in [pool.submit(inside(task)) for task in tasks]:
        future.result()  # re-raises a task's error here
