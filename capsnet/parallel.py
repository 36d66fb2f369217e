"""Host threads for NumPy's single-threaded work: how many (host_threads, threads), a shared
pool that runs a list of tasks (run_all), tasks that wait for each other on threads of their
own (run_together), the slice of n items each part takes (shard), and the BLAS thread count
around them (blas_threads, blas_limit).

A NumPy element-wise pass runs on one core while OpenBLAS's large products use all of
them. Work that splits into independent pieces (the chunks of an optimizer update, the
slices of a batch that :mod:`capsnet.replicas` runs through one model replica each) can
run on a few threads instead: NumPy releases the GIL inside those calls. Threads that
each call BLAS must keep it to one thread per call (:func:`blas_limit`), or the
products queue behind OpenBLAS's lock and the cores are oversubscribed. Each piece computes
exactly what the whole would for its part (nothing is reduced across pieces), so the
results are the same bit for bit whatever the split. Only work on NumPy arrays comes
here (the optimizers run CuPy updates on the calling thread); on CuPy the GPU already runs
each call in parallel.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

__all__ = ["blas_limit", "blas_threads", "host_threads", "in_pool_task", "run_all", "run_shards", "run_together", "shard",
           "share_blas_threads", "threads"]

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_inside = threading.local()


_chosen = threading.local()  # set by threads(n): this thread's choice, above the environment's


def _local_ranks() -> int:
    """MPI ranks started on this node (MPICH/Hydra, Open MPI, Slurm), 1 outside mpiexec."""
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def host_threads() -> int:
    """Threads this work may use: the value of an enclosing :func:`threads` block; else
    the CPUs the process may run on, capped by OMP_NUM_THREADS or OPENBLAS_NUM_THREADS
    when set (the matrix products' limit); without either, under mpiexec, the node's
    CPUs shared out among its ranks."""
    chosen = getattr(_chosen, "n", None)
    if chosen is not None:
        return chosen
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    capped = False
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            n, capped = min(n, int(value)), True
    if not capped:
        n //= _local_ranks()
    return max(n, 1)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Inside the block, :func:`host_threads` is ``n`` on this thread (None: back to the
    environment's count); the caller's setting is restored on the way out."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"threads must be a positive integer or None, got {n!r}")
    previous = getattr(_chosen, "n", None)
    _chosen.n = n
    try:
        yield
    finally:
        _chosen.n = previous


# -- the BLAS library's own thread count ------------------------------------------------
# OpenBLAS (what NumPy's wheels ship, under its own or a scipy_ prefix, with a 64_ suffix
# for 64-bit integers) is found among the libraries this process has loaded and asked
# through its C API (ctypes, in the standard library). Another BLAS (MKL, Accelerate) is
# not controlled: blas_threads() is then None and callers keep to one thread of their own.
_BLAS_NAMES = [(f"{prefix}openblas_set_num_threads{suffix}", f"{prefix}openblas_get_num_threads{suffix}")
               for prefix in ("scipy_", "") for suffix in ("64_", "")]
_blas: tuple | None = None
_blas_probed = False
_blas_lock = threading.Lock()


def _loaded_openblas() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(paths)


def _blas_api() -> tuple | None:
    """(set_num_threads, get_num_threads) of the loaded OpenBLAS, or None."""
    global _blas, _blas_probed
    if _blas_probed:
        return _blas
    import numpy  # noqa: F401, PLC0415 - loads the BLAS NumPy links against

    with _blas_lock:
        if not _blas_probed:
            for path in _loaded_openblas():
                try:
                    lib = ctypes.CDLL(path)
                except OSError:
                    continue
                for set_name, get_name in _BLAS_NAMES:
                    if hasattr(lib, set_name) and hasattr(lib, get_name):
                        setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                        setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                        _blas = (setter, getter)
                        break
                if _blas is not None:
                    break
            _blas_probed = True
    return _blas


def blas_threads() -> int | None:
    """The thread count of the loaded OpenBLAS, or None when it cannot be controlled."""
    api = _blas_api()
    return None if api is None else int(api[1]())


@contextlib.contextmanager
def blas_limit(n: int) -> Iterator[bool]:
    """Inside the block the BLAS library runs each call on at most ``n`` threads (process
    wide: enter it on the thread that hands work to the others); yields whether the
    library could be controlled. The previous count is restored on the way out."""
    api = _blas_api()
    if api is None:
        yield False
        return
    previous = int(api[1]())
    if previous != n:
        api[0](n)
    try:
        yield True
    finally:
        if previous != n:
            api[0](previous)


def share_blas_threads() -> int | None:
    """Hold the BLAS library to this process's share of the cores, :func:`host_threads`
    (under mpiexec: the node's CPUs over its ranks, unless OMP_NUM_THREADS or
    OPENBLAS_NUM_THREADS says otherwise), for the rest of the process; returns the
    count the library now runs, or None where it cannot be controlled.

    NumPy's OpenBLAS starts one thread per CPU in every process: two ranks on two cores
    would run four BLAS threads that fight over the cores (six times slower than one
    process). OpenBLAS is set through its C API; another BLAS through threadpoolctl
    where it is installed (it is not a dependency)."""
    n = host_threads()
    api = _blas_api()
    if api is not None:
        api[0](n)
        return int(api[1]())
    try:
        import threadpoolctl  # noqa: PLC0415 - optional: MKL, BLIS
    except ImportError:
        return None
    threadpoolctl.threadpool_limits(n, user_api="blas")
    counts = [info["num_threads"] for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    return max(counts) if counts else None


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of n items that part ``rank`` of ``size`` takes (an MPI
    rank's share of a batch, a host thread's): the first n % size parts get one more."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


_together_lock = threading.Lock()


def run_together(tasks: list[Callable[[], None]]) -> None:
    """Run every task at the same time and wait for all of them; the first error that is not
    a broken barrier is raised once every task has ended. For tasks that wait for each other
    (replicas exchanging batch statistics, :class:`capsnet.layers.BatchGroup`), which
    :func:`run_all` may run one after the other.

    They run on the shared pool of :func:`run_all`, grown to one worker per task, so that a
    step's replicas keep their threads (and glibc's per-thread heaps) from one call to the
    next: with a fresh thread per call, Efficient-CapsNet's training peak at batch 100 grew
    from 212 to 283 MB. A call from inside a pool task, or while another call holds the pool,
    gets threads of its own. Nested :func:`run_all` calls inside the tasks run in order."""
    global _pool, _pool_size
    errors: list[BaseException | None] = [None] * len(tasks)

    def run(k: int) -> None:
        outer = getattr(_inside, "active", False)
        _inside.active = True
        try:
            tasks[k]()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors[k] = exc
        finally:
            _inside.active = outer

    if len(tasks) <= 1:
        for k in range(len(tasks)):
            run(k)
    elif not getattr(_inside, "active", False) and _together_lock.acquire(blocking=False):
        try:
            with _pool_lock:
                if _pool is None or _pool_size < len(tasks):  # grow only, as in run_all
                    _pool, _pool_size = ThreadPoolExecutor(len(tasks), thread_name_prefix="capsnet"), len(tasks)
                pool = _pool
            for future in [pool.submit(run, k) for k in range(len(tasks))]:
                future.result()
        finally:
            _together_lock.release()
    else:
        threads = [threading.Thread(target=run, args=(k,), name=f"capsnet-together-{k}", daemon=True)
                   for k in range(1, len(tasks))]
        for thread in threads:
            thread.start()
        run(0)
        for thread in threads:
            thread.join()
    failures = [e for e in errors if e is not None]
    if failures:
        raise next((e for e in failures if not isinstance(e, threading.BrokenBarrierError)), failures[0])


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


def in_pool_task() -> bool:
    """Whether this thread is running a task of :func:`run_all` or :func:`run_together` (a
    replica's step): work started here runs in order, on this thread."""
    return bool(getattr(_inside, "active", False))


def run_shards(n: int, work: Callable[[int, int], object]) -> list:
    """``work(lo, hi)`` for each contiguous share of n items (:func:`shard`), one share per host
    thread on the shared pool with BLAS held to one thread per call; the results in share order.
    One share, on this thread with BLAS as it is, when there is one host thread, fewer than two
    items, or when called from inside a pool task (a replica's step already has its thread).
    For NumPy work of a few large calls that release the GIL: a split made of many small calls
    loses to the interpreter lock (NOTES.md, Winograd's blocks). A reduction over the shares'
    results is the caller's, in share order, so the result depends on the thread count, as a
    BLAS product's does."""
    parts = min(host_threads(), n)
    if parts <= 1 or in_pool_task():
        return [work(0, n)]
    results: list = [None] * parts

    def task(k: int) -> Callable[[], None]:
        def run() -> None:
            lo, hi = shard(n, k, parts)
            results[k] = work(lo, hi)
        return run

    with blas_limit(1):
        run_all([task(k) for k in range(parts)])
    return results
