"""The benchmarks' shared harness: child processes, rounds and medians, peak memory, the GEMM
rate, machine info, JSON and markdown tables.

Used by scripts/bench.py (the networks), scripts/bench_conv.py (the convolution sweep) and
the smaller scripts that write JSON. Only the standard library is imported at module level:
a child sets its thread variables (:func:`thread_env`) before NumPy or torch first loads,
so this module must not load them.

- **Children.** Each measurement that depends on a thread count runs in a fresh interpreter
  (:func:`run_child`) whose environment fixes OMP_NUM_THREADS, OPENBLAS_NUM_THREADS,
  MKL_NUM_THREADS and VECLIB_MAXIMUM_THREADS; it writes its result as JSON to a path it is
  given, so nothing it prints can be taken for the result.
- **Rounds.** :func:`alternate` times several implementations of one thing in rounds,
  rotating their order from round to round, so the machine's drift (other jobs, clock
  changes) falls on all of them alike; each figure is the median over the rounds.
- **Peak memory.** :class:`PeakMemory` resets the kernel's high-water mark (VmHWM) by
  writing "5" to /proc/self/clear_refs and reads it back afterwards; where that is not
  available it falls back to ``ru_maxrss``, a lifetime peak, and says so.
- **The machine.** :func:`machine_info` records the CPU model, its vector extensions, NumPy's
  BLAS and the kernel it chose (threadpoolctl), the thread count, the versions and the git
  commit: every JSON the benchmarks write carries it, and every table is headed by
  :func:`machine_heading`.
"""
from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
# /proc/cpuinfo flags (x86) and features (arm) that name vector instruction sets
VECTOR_FLAG_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "asimd", "sve")
VECTOR_FLAGS = ("neon", "sme", "sme2")


# ------------------------------------------------------------------ children
def thread_env(threads: int, **extra: str) -> dict[str, str]:
    """This process's environment with every BLAS/OpenMP thread variable set to ``threads``
    and the repository first on PYTHONPATH, for a child that has not loaded NumPy yet."""
    env = dict(os.environ)
    for var in THREAD_VARIABLES:
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def run_child(cmd: Sequence[str], env: dict[str, str], result: str | os.PathLike,
              echo: bool = False) -> dict[str, Any]:
    """Run ``cmd`` to completion; the JSON it wrote to ``result``, or ``{"error": ...,
    "stderr_tail": [...]}`` when it failed or wrote nothing. ``echo`` lets its standard
    output through (progress lines) instead of capturing it."""
    proc = subprocess.run(list(cmd), env=env, stdout=None if echo else subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0 or not os.path.exists(result):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        return {"error": f"child exited with status {proc.returncode}", "stderr_tail": tail}
    with open(result) as f:
        return json.load(f)


# ------------------------------------------------------------------ PyTorch
def torch_skip_reason(no_torch: bool) -> str | None:
    """Why the PyTorch side is left out (``--no-torch``, or torch not installed), or None.
    Asks the import system only: torch is loaded by the children, never here."""
    if no_torch:
        return "skipped: --no-torch"
    if importlib.util.find_spec("torch") is None:
        return "skipped: PyTorch is not installed (pip install torch)"
    return None


def torch_setup(threads: int) -> dict[str, Any]:
    """In a child: give torch ``threads`` threads; its version, threads and CPU capability
    (the vector instructions its kernels use, e.g. AVX512)."""
    import torch

    torch.set_num_threads(threads)
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


# ------------------------------------------------------------------- timing
def median_rate(step: Callable[[], Any], items: int, repeats: int, warmup: int,
                min_repeat_time: float) -> dict[str, Any]:
    """Warm up, then time ``repeats`` repeats of enough ``step`` calls to last
    ``min_repeat_time`` seconds; ``items`` per call over seconds, each repeat and the median."""
    last = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        step()
        last = time.perf_counter() - t0
    if last is None:  # no warm-up: time one step to size the repeats
        t0 = time.perf_counter()
        step()
        last = time.perf_counter() - t0
    steps = max(1, int(min_repeat_time / max(last, 1e-9)) + (min_repeat_time > 0))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(items * steps / (time.perf_counter() - t0))
    return {"images_per_s": statistics.median(rates), "repeats": rates, "steps_per_repeat": steps}


class Timed:
    """One implementation to time: ``run()`` is timed, ``prepare()`` (optional) runs untimed
    before each call, e.g. the forward pass whose backward is being timed."""

    def __init__(self, run: Callable[[], Any], prepare: Callable[[], Any] | None = None):
        self.run, self.prepare = run, prepare

    def once(self) -> float:
        """Seconds of one timed call."""
        if self.prepare is not None:
            self.prepare()
        t0 = time.perf_counter()
        self.run()
        return time.perf_counter() - t0

    def calls(self, n: int) -> float:
        """Mean seconds of ``n`` timed calls."""
        return sum(self.once() for _ in range(n)) / n


def alternate(impls: dict[str, Timed], rounds: int, warmup: int = 1, min_round_time: float = 0.0) -> dict[str, Any]:
    """Time each implementation in ``rounds`` rounds, the order rotated every round.

    After ``warmup`` untimed calls of each, the calls per round are sized so the slowest
    implementation's round lasts ``min_round_time`` seconds (at least one call; the same
    count for all). Returns ``{name: {"seconds": median, "rounds": [...]}}`` and
    ``"calls_per_round"``."""
    names = list(impls)
    first = {}
    for name in names:
        for _ in range(max(warmup, 1)):
            first[name] = impls[name].once()
    calls = max(1, math.ceil(min_round_time / max(max(first.values()), 1e-9))) if min_round_time > 0 else 1
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(impls[name].calls(calls))
    out: dict[str, Any] = {name: {"seconds": statistics.median(t), "rounds": t} for name, t in times.items()}
    out["calls_per_round"] = calls
    return out


def geomean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


# ------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0); True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def _proc_status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def worker_memory(runner: Any) -> dict[str, Any] | None:
    """The peak memory the replica processes of ``runner`` (capsnet.processes.ProcessReplicas)
    added, in MB: each worker's peak RSS (VmHWM) less its RSS when it was ready (the
    interpreter and its imports, as the PyTorch side's imports are not counted either) and less
    the shared memory it maps (the weights, counted in the leading process). None without
    worker processes."""
    workers = getattr(runner, "_workers", None)
    if not workers:
        return None
    total = 0.0
    for w in workers:
        hwm, shmem = _proc_status_kb(w.proc.pid, "VmHWM"), _proc_status_kb(w.proc.pid, "RssShmem") or 0
        if hwm is None or w.ready_rss_kb is None:
            return None
        total += max(hwm - shmem - w.ready_rss_kb, 0) / 1024
    return {"workers": len(workers), "workers_peak_increase_mb": total}


class PeakMemory:
    """Peak RSS increase over the RSS at ``start()``, in MB.

    ``before_model()`` (optional) also records the RSS before the model exists, for
    a second figure that counts parameters, gradients and optimizer state alike
    however lazily each framework allocates them.
    """

    pre_model_kb: int | None = None
    runner: Any = None  # replicas whose worker processes' memory counts too (worker_memory)

    def before_model(self) -> None:
        gc.collect()
        self.pre_model_kb = _status_kb("VmRSS")

    def start(self) -> None:
        gc.collect()
        self.base_kb = _status_kb("VmRSS") or _maxrss_kb()
        self.maxrss_before_kb = _maxrss_kb()
        self.method = "VmHWM after clear_refs reset" if _reset_peak_rss() else "ru_maxrss"

    def stop(self) -> dict[str, Any]:
        if self.method == "ru_maxrss":
            peak = _maxrss_kb()
            lifetime = peak <= self.maxrss_before_kb  # the peak may predate the measurement
        else:
            peak, lifetime = _status_kb("VmHWM"), False
        workers = worker_memory(self.runner)
        extra = workers["workers_peak_increase_mb"] if workers else 0.0
        return {
            "method": self.method,
            "baseline_rss_mb": self.base_kb / 1024,
            "peak_rss_mb": peak / 1024,
            "peak_increase_mb": (peak - self.base_kb) / 1024 + extra,
            "peak_may_predate_training": lifetime,
            "peak_increase_over_pre_model_mb": None if self.pre_model_kb is None
            else (peak - self.pre_model_kb) / 1024 + extra,
            **({"this_process_peak_increase_mb": (peak - self.base_kb) / 1024, **workers} if workers else {}),
        }


# --------------------------------------------------------------- GEMM rate
def gemm_gflops(shapes: Iterable[tuple[int, int, int]], repeats: int) -> dict[str, Any]:
    """float32 GFLOP/s of ``numpy.matmul`` on (M, K) x (K, N) products, in this process (so
    with its thread count): each shape warmed up once, then timed ``repeats`` times."""
    import numpy as np

    rng = np.random.default_rng(0)
    done = []
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        c = np.empty((m, n), dtype=np.float32)
        np.matmul(a, b, out=c)  # warm-up: thread pool start, page faults
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(a, b, out=c)
            rates.append(2.0 * m * k * n / (time.perf_counter() - t0) / 1e9)
        done.append({"m": m, "k": k, "n": n, "gflops": rates, "median_gflops": statistics.median(rates)})
        del a, b, c
    every = [r for s in done for r in s["gflops"]]
    return {"shapes": done, "median_gflops": statistics.median(every)}


# ------------------------------------------------------------------ machine
def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and model in ("unknown", "", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, sorted({f for f in flags if f.startswith(VECTOR_FLAG_PREFIXES) or f in VECTOR_FLAGS})


def blas_info() -> dict[str, Any]:
    """NumPy's BLAS: library, version and the kernel it chose (threadpoolctl's
    ``architecture``, e.g. Haswell, SkylakeX, Zen), else what ``numpy.show_config`` says."""
    import numpy as np

    try:
        from threadpoolctl import threadpool_info

        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    except ImportError:
        pools = []
    if pools:
        p = pools[0]
        return {"name": p.get("internal_api"), "version": p.get("version"), "kernel": p.get("architecture"),
                "threading_layer": p.get("threading_layer"), "library": os.path.basename(p.get("filepath", "")),
                "source": "threadpoolctl"}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # NumPy < 1.26 has no dict mode
        return {"name": None, "version": None, "kernel": None, "source": "unknown"}
    config = blas.get("openblas configuration", "")
    return {"name": blas.get("name"), "version": blas.get("version"),
            "kernel": config.split()[-2] if "DYNAMIC_ARCH" in config else None,  # the build's default target
            "source": "numpy.show_config (the kernel is the build's target, not necessarily the one in use)"}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(threads: int | None, torch_allocator: str = "system") -> dict[str, Any]:
    """Where a figure was measured: CPU, vector extensions, BLAS and kernel, threads,
    versions, commit. Loads NumPy (call it in the parent, or in a child after its threads
    are set). torch's version is read from its metadata, without importing it."""
    import numpy as np

    cpu, vector = _cpuinfo()
    mem_kb = None
    try:
        with open("/proc/meminfo") as f:
            mem_kb = next((int(line.split()[1]) for line in f if line.startswith("MemTotal")), None)
    except OSError:
        pass
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {
        "cpu_model": cpu,
        "cpu_vector_extensions": vector,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": None if mem_kb is None else mem_kb / 1024**2,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "blas": blas_info(),
        "threads": threads,
        "git_commit": commit.stdout.strip() or None,
        "git_dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
        "host_allocator": host_allocator(torch_allocator),
    }


TORCH_ALLOCATORS = ("system", "tuned")
"""How a PyTorch child's host allocator is set: glibc's defaults, as PyTorch's users run it
(the default), or capsnet's thresholds, to see what they give PyTorch."""


def allocator_env(setting: str) -> dict[str, str]:
    """Environment variables for a child's host allocator: "system" keeps glibc's defaults
    (capsnet's setting off, should the child import capsnet); "tuned" sets capsnet's thresholds
    through glibc's own variables, so they hold in a process that never imports capsnet."""
    import capsnet.allocator as allocator

    if setting not in TORCH_ALLOCATORS:
        raise ValueError(f"allocator setting must be one of {TORCH_ALLOCATORS}, got {setting!r}")
    if setting == "system":
        return {allocator.ENV: "system"}
    return {"MALLOC_MMAP_THRESHOLD_": str(allocator.MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(allocator.TRIM_THRESHOLD), "MALLOC_TOP_PAD_": str(allocator.TOP_PAD)}


def host_allocator(torch_allocator: str = "system") -> dict[str, Any]:
    """The host allocator each side runs with: capsnet's processes as ``import capsnet`` sets
    it (capsnet.allocator, unless CAPSNET_MALLOC=system or glibc's own variables are set);
    PyTorch's children as ``torch_allocator`` says (:func:`allocator_env`)."""
    import capsnet.allocator

    torch_side = ("glibc defaults" if torch_allocator == "system"
                  else "capsnet's settings, through MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_")
    return {"capsnet": capsnet.allocator.state(), "torch": torch_side,
            "environment": {k: os.environ[k] for k in (capsnet.allocator.ENV, *capsnet.allocator.GLIBC_VARIABLES)
                            if k in os.environ}}


def machine_heading(info: dict[str, Any], threads: Any = None) -> str:
    """One line naming the machine, to head a table: CPU, vector extensions, BLAS and kernel,
    threads, commit."""
    blas = info.get("blas") or {}
    wide = [f for f in info.get("cpu_vector_extensions") or [] if f in ("avx2", "avx512f", "amx_tile", "sve", "asimd")]
    threads = info.get("threads") if threads is None else threads
    threads = ", ".join(map(str, threads)) if isinstance(threads, (list, tuple)) else threads
    return (f"{info.get('cpu_model')} ({', '.join(wide) or 'no AVX2'}), {info.get('usable_cpus')} usable CPUs; "
            f"NumPy {info.get('numpy')} with {blas.get('name')} {blas.get('version')} "
            f"(kernel {blas.get('kernel')}); torch {info.get('torch') or '-'}"
            f"{' (' + info['torch_cpu_capability'] + ')' if info.get('torch_cpu_capability') else ''}; "
            f"{threads} thread(s); "
            f"commit {(info.get('git_commit') or '?')[:10]}{' (dirty)' if info.get('git_dirty') else ''}")


# ------------------------------------------------------------------- output
def write_json(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Write ``report`` as indented JSON and say where."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {os.path.abspath(path)}")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; ``right[i]`` right-aligns column i (numbers)."""
    right = right or [False] * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or "-" for None."""
    return "-" if value is None else format(value, spec) + suffix


if __name__ == "__main__":  # python scripts/benchlib.py: this machine's description
    print(json.dumps(machine_info(None), indent=2))
