"""The GPU proof (issue 33): one command that settles the CuPy path in the minutes a lent GPU gives.

A GPU is lent to this project now and then, for 15 minutes in all (its start, each command
and each idle wait count). So what to run is decided here, and exercised on every commit
(on the emulated device, below), before a GPU comes. One call, at most 8 minutes on one GPU,
writes everything into one folder: its argument, else ``$OUT`` (the lent machine's result
folder), else ``runs/gpu-proof``. The steps run in order of value, each in a process of its
own under a wall-time cap, and each writes its result as soon as it is known, so a run cut
short keeps what it reached:

1. ``machine``  machine.json: nvidia-smi's GPU and driver, CuPy's ``show_config()``, the CUDA
   runtime and driver versions, the device's properties, NumPy (and its BLAS), PyTorch, the
   CPU, the commit. Missing tools are recorded as missing.
2. ``suite``    suite.xml (JUnit) and suite.log: every test case marked ``gpu`` (the ``cupy``
   case of every backend-parametrised test, tests/conftest.py, and the device runs of
   tests/backend/test_device_runs.py) on the real device, across the cores with
   pytest-xdist where it is installed. Each test's report is kept as it comes, so a suite
   stopped at its cap still gets its XML. Failures and skip reasons are summarised in proof.json.
3. ``parity``   parity.json: CapsNet, EfficientCapsNet and MatrixCapsNet, one training step
   (forward, loss, backward, Adam) each in float64 and float32 on CuPy and on NumPy, from the
   same weights and the same MNIST batch: the loss, the worst relative difference of every
   gradient (max |cupy - numpy| / max |numpy|, per parameter), of the weights after the Adam
   step and of the buffers.
4. ``speed``    speed.json: images/s of a training step (forward, margin + reconstruction
   loss, backward, Adam, zero_grad) and of inference (``predict``) at batch 1, 32, 100 and
   512, capsnet on CuPy beside the PyTorch references (scripts/torch_capsnet.py,
   scripts/torch_efficient_capsnet.py) in CUDA eager mode, for the paper's CapsNet and
   Efficient-CapsNet, from the same weights: medians of timed repeats, the device
   synchronised around each one; TF32 is off in PyTorch, as in CuPy's float32 products. The
   peak device memory of each (CuPy: the memory pool's bytes in use, read at every
   allocation; PyTorch: ``max_memory_allocated``), the launches per step the emulated device
   predicts, and the CUDA kernels, copies and fills PyTorch's profiler (CUPTI) sees in one
   step of each, at batch 1 and 32 (the paper's CapsNet launches as many at 32 as at 100,
   docs/gpu.md; counting at 100 on the CPU would spend the GPU's minutes).
5. ``epoch``    training.json: ``python -m capsnet.train --backend cupy --epochs 1`` on the full
   MNIST (.gpu-data/mnist, carried): wall time, images/s, test accuracy. At its cap it gets
   Ctrl-C, which saves a checkpoint after the step under way, so how far it came is known.
6. ``resume``   training.json: a run stopped mid-epoch (KeyboardInterrupt after a step, as
   Ctrl-C does, the approach of tests/backend/test_device_runs.py), resumed with
   ``--resume``, and compared bit for bit (weights and optimizer state) with the same run
   uninterrupted.
7. ``compile``  speed.json: ``torch.compile`` of both PyTorch references, their training step
   at batch 100, only if each compiles within a minute; last, the least of the proof.

**On this machine and in CI** the same script runs on the emulated device
(``CAPSNET_EMULATE_CUPY=1``) with a smoke budget: small models, tiny batches, a few steps, the
suite reduced to one file (.ci/run runs the whole suite on the emulated device), PyTorch on
the CPU, in under a minute. What needs a GPU says "skipped: <reason>". At its end it prints
the exact call that sends the proof to a lent GPU machine: the command, the folder to carry
and the time limit. With neither a GPU nor the emulation it records the machine, says why
nothing else can run, and exits 1.

**The data** goes with the call: the GPU machine reaches no network and has no
``../shared``, so ``--prepare`` copies the MNIST files into ``.gpu-data/mnist`` inside the
checkout (11 MB), records the commit beside them (the copy sent may lack .git), and adds
``/.gpu-data/`` to ``.git/info/exclude``: ignored, git never offers to commit the data, and
the call's ``carry`` sends the folder explicitly.

    python scripts/gpu_proof.py --prepare                        # once per run: data, commit, the call to make
    CAPSNET_EMULATE_CUPY=1 python scripts/gpu_proof.py /tmp/p    # the smoke run (CI does this)
    PYTHONPATH=. python3 scripts/gpu_proof.py                    # on the GPU machine: results in $OUT
    python scripts/gpu_proof.py --steps speed compile            # only some steps (a second try)

Exit status: 0 when every step was done or skipped with its reason; 1 when a step failed or
ran past its cap (its partial results are kept), or, in the smoke run, when a test failed.
A test failing on the real GPU is a finding (proof.json lists it), not a failure of the proof.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import importlib.util
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
DATA = REPO / ".gpu-data"  # carried to the GPU machine; ignored through .git/info/exclude
FULL_MNIST = DATA / "mnist"
COMMIT_FILE = DATA / "commit.json"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
RESULTS = "docs/results/gpu"
RECORD = "@@proof "  # a worker's result line on stdout: this prefix, then one JSON object
COMPILE_LIMIT_S = 60  # torch.compile counts only if a model compiles within this


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    caps: dict[str, int]  # wall-time cap in seconds, by budget
    files: tuple[str, ...]


STEPS = (
    Step("machine", "the machine", {"gpu": 30, "smoke": 20}, ("machine.json",)),
    Step("suite", "the suite on the device", {"gpu": 150, "smoke": 30}, ("suite.xml", "suite.log")),
    Step("parity", "parity with NumPy", {"gpu": 45, "smoke": 20}, ("parity.json",)),
    Step("speed", "speed against PyTorch", {"gpu": 120, "smoke": 40}, ("speed.json",)),
    Step("epoch", "one epoch on MNIST", {"gpu": 110, "smoke": 25}, ("training.json",)),
    Step("resume", "an interrupted run resumed", {"gpu": 60, "smoke": 25}, ("training.json",)),
    Step("compile", "torch.compile", {"gpu": 90, "smoke": 0}, ("speed.json",)),
)
STEP = {s.name: s for s in STEPS}
TOTAL_CAP = {"gpu": 480, "smoke": 150}  # the whole call; each step also stops at its own cap
GRACE = {"gpu": 15, "smoke": 5}  # a step's own soft deadline comes this long before its cap
# the command to send (run from the repository root of the checkout the device tool sends)
RUN_COMMAND = "PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/gpu_proof.py"
RUN_TIMEOUT_S = TOTAL_CAP["gpu"] + 60

# The small models of the smoke run (the paper's sizes on a GPU); inputs stay 28x28.
SMOKE_SIZES: dict[str, dict[str, Any]] = {
    "capsnet": dict(conv_channels=8, primary_types=2, primary_dim=4, digit_dim=4, decoder_hidden=(16, 32),
                    digit_init_std=0.05),
    "efficient": dict(conv_channels=(4, 6, 6, 8), primary_caps=4, primary_dim=2, digit_dim=4, decoder_hidden=(16,)),
    "em": dict(conv_channels=4, primary_types=2, caps1=2, caps2=3),
}
SMOKE_TRAIN_FLAGS = ["--conv-channels", "8", "--primary-types", "2", "--primary-dim", "4", "--digit-dim", "4",
                     "--decoder-hidden", "16", "32", "--digit-init-std", "0.05"]
BUDGETS: dict[str, dict[str, Any]] = {
    "gpu": dict(sizes={}, parity_batch=8, batches=(1, 32, 100, 512), warmup=3, repeats=5, min_repeat_time=0.25,
                count_batches=(1, 32), suite=[], epoch_flags=[],
                resume=dict(flags=["--train-limit", "2000", "--test-limit", "500", "--batch-size", "100"],
                            stop_at=(0, 7))),
    "smoke": dict(sizes=SMOKE_SIZES, parity_batch=3, batches=(2,), warmup=1, repeats=1, min_repeat_time=0.0,
                  count_batches=(2,), suite=["tests/backend/test_backend.py"],
                  epoch_flags=["--train-limit", "200", "--test-limit", "100", "--batch-size", "50", *SMOKE_TRAIN_FLAGS],
                  resume=dict(flags=["--train-limit", "200", "--test-limit", "100", "--batch-size", "50",
                                     "--log-every", "2", *SMOKE_TRAIN_FLAGS], stop_at=(0, 1))),
}
SPEED_MODELS = ("capsnet", "efficient")
PARITY_MODELS = ("capsnet", "efficient", "em")
TOLERANCE = {"float64": 1e-9, "float32": 1e-3}  # the worst relative difference the proof accepts


# ================================================================ small helpers
def write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically: a reader (or a cut run) sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def update_json(path: Path, key: str, value: Any) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    write_json(path, data)


def emit(record: dict[str, Any]) -> None:
    """A worker's result, one line to its parent."""
    print(RECORD + json.dumps(record, default=str), flush=True)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def sigint_as_in_a_terminal() -> None:
    """In a child before exec: Ctrl-C raises KeyboardInterrupt there, even where this proof
    runs as a background job that ignores SIGINT (as a remote command may)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop(proc: subprocess.Popen, grace: float) -> None:
    """Ctrl-C ``proc`` (it saves or reports what it has), then kill its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def git(*args: str, cwd: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_info() -> dict[str, Any]:
    """The commit measured: from git, or (on the GPU machine, whose copy has no .git) from
    the file ``--prepare`` wrote beside the data."""
    head = git("rev-parse", "HEAD")
    if head:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head, "dirty": bool(dirty), "source": "git"}
    if COMMIT_FILE.exists():
        return {**json.loads(COMMIT_FILE.read_text()), "source": str(COMMIT_FILE.relative_to(REPO))}
    return {"commit": None, "source": "no git and no .gpu-data/commit.json (run --prepare before sending)"}


def mnist_count(path: Path) -> int | None:
    """The number of images an idx file holds (from its header), or None."""
    try:
        with gzip.open(path) as f:
            header = f.read(8)
    except OSError:
        return None
    return int.from_bytes(header[4:8], "big") if len(header) == 8 else None


def run_call_text() -> str:
    return (f'run(command="{RUN_COMMAND}", carry=[".gpu-data"], timeout_s={RUN_TIMEOUT_S})'
            "  # the device tool; the results come back from $OUT")


# ================================================================ preparing the data
def prepare(source: Path | None, repo: Path = REPO) -> str:
    """Copy the four MNIST files to ``repo/.gpu-data/mnist``, keep the folder out of git
    (``.git/info/exclude``), record the commit; returns what was done, for the user."""
    candidates = [source] if source else [Path(p) for p in (os.environ.get("CAPSNET_DATA_DIR"),
                                                            repo.parent / "shared" / "data" / "mnist") if p]
    found = next((c for c in candidates if all((c / name).is_file() for name in MNIST_FILES)), None)
    if found is None:
        raise SystemExit(f"--prepare found no MNIST files ({', '.join(MNIST_FILES)}) in "
                         f"{', '.join(map(str, candidates)) or 'nothing'}: pass --data-dir with the four "
                         "standard .gz files (or set CAPSNET_DATA_DIR)")
    target = repo / ".gpu-data" / "mnist"
    target.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        shutil.copyfile(found / name, target / name)
    notes = [f"copied MNIST ({mnist_count(target / MNIST_FILES[0])} training images) from {found} to {target}"]
    if subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", ".gpu-data/mnist"]).returncode != 0:
        exclude = Path(git("rev-parse", "--git-path", "info/exclude", cwd=repo) or ".git/info/exclude")
        exclude = exclude if exclude.is_absolute() else repo / exclude
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a") as f:
            f.write("/.gpu-data/\n")
        notes.append(f"added /.gpu-data/ to {exclude} (git ignores it; the call carries it)")
    head = git("rev-parse", "HEAD", cwd=repo)
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=repo)
    write_json(repo / ".gpu-data" / "commit.json", {"commit": head, "dirty": bool(dirty), "prepared_utc": utc_now()})
    notes.append(f"recorded commit {head}{' (with uncommitted changes)' if dirty else ''}")
    return "\n".join(notes)


# ================================================================ the parent: steps, caps, proof.json
class Proof:
    """Runs the steps, each in a child process under its cap, and keeps proof.json current."""

    def __init__(self, out: Path, budget: str, steps: list[str], work: Path, device: str, usable: str | None):
        self.out, self.budget, self.work, self.usable = out, budget, work, usable
        self.start = time.monotonic()
        self.deadline = self.start + TOTAL_CAP[budget]
        self.index: dict[str, Any] = {
            "what": "the GPU proof of issue 33 (scripts/gpu_proof.py): each step's status, and its result in brief",
            "budget": budget, "device": device, "started_utc": utc_now(), "total_cap_s": TOTAL_CAP[budget],
            "commit": commit_info(), "results_folder": None,
            "steps": [{"step": s, "title": STEP[s].title, "status": "pending", "cap_s": STEP[s].caps[budget],
                       "files": list(STEP[s].files)} for s in steps],
        }
        self.save()

    def save(self) -> None:
        write_json(self.out / "proof.json", self.index)

    def run(self) -> int:
        bad = 0
        for n, entry in enumerate(self.index["steps"], 1):
            name = entry["step"]
            print(f"[{n}/{len(self.index['steps'])}] {name}: {entry['title']} ...", flush=True)
            self._run_step(entry)
            self.save()
            line = entry["status"] + (f": {entry['reason']}" if entry.get("reason") else "")
            headline = entry.get("result", {}).get("headline")
            print(f"    {line} ({entry.get('seconds', 0):.0f} s){' - ' + headline if headline else ''}", flush=True)
            bad += entry["status"] in ("failed", "cut")
            if name == "machine":
                self.index["results_folder"] = results_folder(self.out / "machine.json")
                self.save()
        self.index["seconds"] = round(time.monotonic() - self.start, 1)
        self.save()
        return bad

    def _run_step(self, entry: dict[str, Any]) -> None:
        name = entry["step"]
        cap = min(entry["cap_s"], self.deadline - time.monotonic())
        if self.usable and name != "machine":
            entry.update(status="skipped", reason=self.usable)
            return
        if entry["cap_s"] == 0:
            entry.update(status="skipped", reason="needs a GPU and minutes the smoke budget does not have")
            return
        if cap < min(20, entry["cap_s"]):
            entry.update(status="skipped", reason=f"the {TOTAL_CAP[self.budget]} s budget of the whole call was spent")
            return
        result = self.work / f"{name}.result.json"
        soft = time.time() + cap - min(GRACE[self.budget], cap / 4)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, str(self.out),
               "--work", str(self.work), "--budget", self.budget, "--soft-deadline", f"{soft:.1f}"]
        t0 = time.monotonic()
        with (self.out / "proof.log").open("a") as log:
            log.write(f"\n===== {name} ({utc_now()}, cap {cap:.0f} s)\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(),
                                    start_new_session=True)
            try:
                proc.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                stop(proc, grace=5)
                entry["status"], entry["reason"] = "cut", f"ran past its cap of {cap:.0f} s: what it wrote is kept"
        entry["seconds"] = round(time.monotonic() - t0, 1)
        if result.exists():
            entry["result"] = json.loads(result.read_text())
        if entry["status"] == "cut":
            return
        skipped = entry.get("result", {}).get("skipped")
        if proc.returncode == 0 and skipped:
            entry.update(status="skipped", reason=skipped)
        elif proc.returncode == 0 and result.exists() and entry["result"].get("failing"):
            entry.update(status="failed", reason=entry["result"]["failing"])
        elif proc.returncode == 0 and result.exists():
            entry["status"] = "done"
            if entry["result"].get("findings"):
                entry["reason"] = "findings: " + entry["result"]["findings"]
        else:
            lines = (self.out / "proof.log").read_text().splitlines()
            entry.update(status="failed", reason=f"exit status {proc.returncode}; the end of its output: "
                         + " | ".join(lines[-6:]))


def results_folder(machine_json: Path) -> str | None:
    """docs/results/gpu/<date>-<device>, the device's name made a folder name."""
    if not machine_json.exists():
        return None
    info = json.loads(machine_json.read_text())
    name = (info.get("gpu") or {}).get("name") or ("emulated" if info.get("emulated") else "unknown")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return f"{RESULTS}/{info['when_utc'][:10]}-{slug}"


# ================================================================ step 1: the machine
def _command(cmd: list[str], timeout: float = 20) -> dict[str, Any]:
    if shutil.which(cmd[0]) is None:
        return {"missing": f"{cmd[0]} not found"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{' '.join(cmd)} did not answer within {timeout} s"}
    return {"returncode": out.returncode, "output": out.stdout.strip() or out.stderr.strip()}


def _guarded(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # a missing tool or a broken install is a finding, never the end of the step
        return {"error": f"{type(exc).__name__}: {exc}"}


def attempt(what: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``what`` with ``fn()``'s result, or with the error it raised: one model or batch that
    fails on the device is a finding, and the others still run."""
    try:
        return {**what, **fn()}
    except Exception as exc:
        import traceback

        return {**what, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc().splitlines()[-8:]}


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu() -> dict[str, Any]:
    model, flags = "unknown", []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    vector = sorted(f for f in flags if re.match(r"(sse4|avx|fma|amx)", f))
    return {"model": model, "vector_extensions": vector, "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def _cupy_info() -> dict[str, Any]:
    from capsnet import backend

    if backend.is_emulated():
        from capsnet.testing.emulation import api

        return {"emulated": True, "api_checked_against": f"CuPy {api().version}"}
    cupy = backend.installed_cupy()
    if cupy is None:
        return {"missing": "CuPy does not import"}
    info: dict[str, Any] = {"version": cupy.__version__}
    rt = cupy.cuda.runtime
    info["runtime_version"] = _guarded(rt.runtimeGetVersion)
    info["driver_version"] = _guarded(rt.driverGetVersion)
    info["device_count"] = _guarded(rt.getDeviceCount)

    def props() -> dict[str, Any]:
        p = rt.getDeviceProperties(0)
        keep = ("name", "totalGlobalMem", "multiProcessorCount", "major", "minor", "clockRate", "memoryClockRate",
                "memoryBusWidth", "l2CacheSize", "sharedMemPerBlockOptin")
        return {k: (p[k].decode() if isinstance(p[k], bytes) else p[k]) for k in keep if k in p}

    info["device"] = _guarded(props)

    def show_config() -> str:
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            cupy.show_config()
        return buf.getvalue().strip()

    info["show_config"] = _guarded(show_config)
    return info


def _torch_info() -> dict[str, Any]:
    import torch

    info = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return info


def step_machine(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from capsnet import __version__, backend

    info: dict[str, Any] = {"when_utc": utc_now(), "budget": args.budget, "emulated": backend.is_emulated(),
                            "device": backend.describe_device("cupy") if backend.cupy_available() else None,
                            "commit": commit_info(), "capsnet": __version__, "python": platform.python_version(),
                            "platform": platform.platform(), "cpu": _cpu()}
    smi = _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,"
                    "power.limit,pci.bus_id", "--format=csv,noheader"])
    info["nvidia_smi"] = {"query": smi, "full": _command(["nvidia-smi"])}
    if "output" in smi and smi.get("returncode") == 0:
        fields = ("name", "driver", "memory", "compute_capability", "max_sm_clock", "power_limit", "pci_bus")
        info["gpu"] = dict(zip(fields, (v.strip() for v in smi["output"].splitlines()[0].split(","))))
    info["cupy"] = _guarded(_cupy_info)
    info["numpy"] = {"version": np.__version__,
                     "blas": _guarded(lambda: np.show_config(mode="dicts")["Build Dependencies"]["blas"])}
    if importlib.util.find_spec("threadpoolctl") is None:  # optional: not a finding when absent
        info["threadpools"] = "threadpoolctl not installed"
    else:
        info["threadpools"] = _guarded(lambda: __import__("threadpoolctl").threadpool_info())
    if args.budget == "gpu":
        info["torch"] = _guarded(_torch_info)
    else:  # importing torch would take a tenth of the smoke run's minute
        info["torch"] = {"version": _version("torch"), "note": "not imported in the smoke run"}
    info["packages"] = {p: _version(p) for p in ("pytest", "pytest-xdist", "safetensors", "matplotlib", "mpi4py",
                                                 "tqdm", "cupy-cuda13x", "cupy-cuda12x")}
    if "gpu" not in info and isinstance(info["cupy"].get("device"), dict):
        info["gpu"] = {"name": info["cupy"]["device"].get("name")}
    write_json(args.out / "machine.json", info)
    gpu = (info.get("gpu") or {}).get("name") or ("emulated device" if info["emulated"] else "no GPU")
    versions = [f"CuPy {info['cupy'].get('version')}" if "version" in info["cupy"] else None,
                f"CUDA runtime {info['cupy']['runtime_version']}" if "runtime_version" in info["cupy"] else None,
                f"NumPy {np.__version__}",
                f"torch {info['torch']['version']}" if "version" in info["torch"] else None]
    return {"headline": f"{gpu}; " + ", ".join(v for v in versions if v)}


# ================================================================ step 2: the suite
# A pytest plugin, written to the work folder and loaded with -p: every test report as a JSON
# line the moment it comes (on the xdist controller only), so a suite stopped at its cap still
# says what ran; pytest's own JUnit XML is written only at a session's clean end.
REPORT_PLUGIN = """
import json, os

_out = {"file": None}


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or the only process) writes
        _out["file"] = open(os.environ["CAPSNET_PROOF_REPORTS"], "a")


def pytest_runtest_logreport(report):
    if _out["file"] is None:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
        message = str(report.longrepr[2])
    elif crash is not None:
        message = crash.message
    else:
        message = str(report.longrepr or "")
    _out["file"].write(json.dumps({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                                   "seconds": report.duration, "message": message[:500]}) + "\\n")
    _out["file"].flush()
"""


def step_suite(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    budget = BUDGETS[args.budget]
    workers = os.cpu_count() or 1
    xdist = importlib.util.find_spec("xdist") is not None and workers > 1 and not budget["suite"]
    plugin_dir = args.work / "pytest-plugin"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "capsnet_proof_reports.py").write_text(REPORT_PLUGIN)
    reports = args.work / "suite-reports.jsonl"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-p", "capsnet_proof_reports",
           "-q", "-rfE", "--durations=15", f"--junitxml={args.out / 'suite.xml'}", *budget["suite"]]
    env = child_env(CAPSNET_PROOF_REPORTS=str(reports))
    env["PYTHONPATH"] += os.pathsep + str(plugin_dir)
    env.pop("CAPSNET_DATA_DIR", None)  # the tests' data: the MNIST sample shipped with the package
    if xdist:
        cmd += ["-n", str(workers), "-p", "no:benchmark"]  # pytest-benchmark warns under xdist: an error here
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.monotonic()
    with (args.out / "suite.log").open("w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        # its own process group: Ctrl-C, then the kill, reach pytest and its xdist workers alone
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
        interrupted = False
        try:
            proc.wait(timeout=max(1.0, args.soft_deadline - time.time()))
        except subprocess.TimeoutExpired:
            interrupted = True
        finally:
            stop(proc, grace=5)
    summary = summarise_reports(reports)
    if interrupted or not (args.out / "suite.xml").exists():
        write_junit(reports, args.out / "suite.xml")
        summary["junit"] = "suite.xml written from the reports that came (pytest did not end by itself)"
    summary.update(command=" ".join(cmd[1:]), pytest_exit=proc.returncode, workers=workers if xdist else 1,
                   seconds=round(time.monotonic() - t0, 1), stopped_at_cap=interrupted,
                   selection="every test marked gpu" + (f", in {', '.join(budget['suite'])} only (smoke: .ci/run "
                                                         "runs the whole suite on the emulated device)"
                                                         if budget["suite"] else ""))
    counts = summary["counts"]
    summary["headline"] = (", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no results") + (
        f" (stopped at its cap after {summary['seconds']:.0f} s)" if interrupted else "")
    bad = counts["failed"] + counts["errors"]
    if not interrupted and proc.returncode not in (0, 1):  # 2: interrupted, 3: internal error, 4: usage, 5: none
        summary["failing"] = f"pytest exited with status {proc.returncode}: see suite.log"
    elif bad and args.budget == "smoke":
        summary["failing"] = f"{bad} tests failed on the emulated device"
    elif bad:
        summary["findings"] = f"{bad} tests failed on the GPU: each is a finding to fix (see failures)"
    return summary


def _outcomes(reports: Path) -> dict[str, dict[str, Any]]:
    """Each test's outcome from its reports: an error in setup or teardown, a failure in the
    call, a skip, or a pass; with the message that says why."""
    tests: dict[str, dict[str, Any]] = {}
    lines = reports.read_text().splitlines() if reports.exists() else []
    for line in lines:
        r = json.loads(line)
        test = tests.setdefault(r["test"], {"outcome": "passed", "message": "", "seconds": 0.0})
        test["seconds"] += r["seconds"]
        if r["outcome"] == "failed" and test["outcome"] not in ("failed", "errors"):
            test.update(outcome="failed" if r["when"] == "call" else "errors", message=r["message"])
        elif r["outcome"] == "skipped" and test["outcome"] == "passed":
            test.update(outcome="skipped", message=r["message"])
    return tests


def summarise_reports(reports: Path) -> dict[str, Any]:
    """Counts, failures (the test and its message) and skip reasons."""
    tests = _outcomes(reports)
    counts = Counter(t["outcome"] for t in tests.values())
    failures = [{"test": name, "kind": t["outcome"], "message": t["message"][:300]}
                for name, t in tests.items() if t["outcome"] in ("failed", "errors")]
    skips = Counter(t["message"][:200] for t in tests.values() if t["outcome"] == "skipped")
    return {"counts": {k: counts.get(k, 0) for k in ("passed", "failed", "errors", "skipped")},
            "failures": failures, "skip_reasons": dict(skips.most_common())}


def write_junit(reports: Path, path: Path) -> None:
    """A JUnit XML of the tests that reported, for a suite that did not end by itself."""
    import xml.etree.ElementTree as ET

    tests = _outcomes(reports)
    suite = ET.Element("testsuite", name="capsnet on the device (cut at its cap)", tests=str(len(tests)))
    for name, t in tests.items():
        module, _, test = name.partition("::")
        case = ET.SubElement(suite, "testcase", classname=module, name=test, time=f"{t['seconds']:.3f}")
        if t["outcome"] != "passed":
            tag = {"failed": "failure", "errors": "error", "skipped": "skipped"}[t["outcome"]]
            ET.SubElement(case, tag, message=t["message"])
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


# ================================================================ models, batches, steps (parity, speed)
def sample_batch(n: int) -> tuple[Any, Any]:
    """n MNIST test images (uint8, (n, 28, 28)) and labels from the sample shipped with capsnet,
    repeated to reach n."""
    import numpy as np

    from capsnet.data import load_mnist
    from capsnet.data.mnist import SAMPLE_DIR

    data = load_mnist(SAMPLE_DIR, download=False, progress=False)
    reps = -(-n // len(data.test_images))
    return (np.concatenate([data.test_images] * reps)[:n], np.concatenate([data.test_labels] * reps)[:n]
            .astype(np.int64))


def build_model(name: str, dtype: str, sizes: dict[str, dict[str, Any]]) -> Any:
    from capsnet.models import CapsNet, EfficientCapsNet, MatrixCapsNet

    cls = {"capsnet": CapsNet, "efficient": EfficientCapsNet, "em": MatrixCapsNet}[name]
    return cls(dtype=dtype, seed=0, **sizes.get(name, {}))


class TrainingStep:
    """One training step of a library model, backend-generic: forward, the model's loss
    (CapsNetLoss: margin + reconstruction; SpreadLoss for the EM network), backward, and
    optionally Adam's step and zero_grad."""

    def __init__(self, name: str, model: Any, x: Any, y: Any):
        from capsnet.layers import SpreadLoss
        from capsnet.models import CapsNetLoss
        from capsnet.optim import Adam

        self.name, self.model, self.x, self.y = name, model, x, y
        self.criterion = SpreadLoss(0.5) if name == "em" else CapsNetLoss()
        self.optimizer = Adam(model.parameters(), lr=1e-3)

    def loss_and_backward(self) -> Any:
        if self.name == "em":
            loss = self.criterion(self.model(self.x), self.y)
            self.model.backward(self.criterion.backward())
        else:
            lengths, recon = self.model(self.x, self.y)
            loss = self.criterion(lengths, recon, self.y, self.x)
            self.model.backward(*self.criterion.backward())
        return loss

    def __call__(self) -> None:
        self.loss_and_backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def infer(self) -> None:
        self.model.predict(self.x)


# ================================================================ step 3: parity
def relative(a: Any, b: Any, floor: float = 0.0) -> float:
    """max |a - b| / max(max |b|, floor): the worst difference relative to the reference's largest
    entry, or to ``floor`` where that is smaller (a gradient that is zero but for rounding)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(np.max(np.abs(a - b), initial=0.0))
    scale = max(float(np.max(np.abs(b), initial=0.0)), floor)
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


# A parameter whose gradient is zero in exact arithmetic (a convolution's bias before batch
# norm) has a gradient of rounding noise on both devices; its difference is measured against
# this fraction of the model's largest gradient instead of against the noise itself.
GRADIENT_FLOOR = 1e-2


def one_step(name: str, dtype: str, where: str, state: dict | None, images: Any, labels: Any,
             sizes: dict) -> tuple[dict, dict[str, Any]]:
    """(state before the step, {loss, gradients, weights after Adam, buffers}) on ``where``, as host arrays."""
    from capsnet import backend
    from capsnet.data import to_float

    with backend.use(where) as xp:
        model = build_model(name, dtype, sizes)
        if state is not None:
            model.load_state_dict(state)
        start = {k: backend.to_numpy(v).copy() for k, v in model.state_dict().items()}
        x, y = to_float(xp.asarray(images), dtype), xp.asarray(labels)
        step = TrainingStep(name, model, x, y)
        model.train()
        loss = step.loss_and_backward()
        grads = {n: backend.to_numpy(p.grad).copy() for n, p in model.named_parameters()}
        step.optimizer.step()
        after = {n: backend.to_numpy(p.data).copy() for n, p in model.named_parameters()}
        buffers = {n: backend.to_numpy(b.data).copy() for n, b in model.named_buffers()}
        return start, {"loss": float(loss), "grads": grads, "weights": after, "buffers": buffers}


def compare_step(name: str, dtype: str, images: Any, labels: Any, sizes: dict) -> dict[str, Any]:
    import numpy as np

    state, ref = one_step(name, dtype, "numpy", None, images, labels, sizes)
    t0 = time.perf_counter()
    _, dev = one_step(name, dtype, "cupy", state, images, labels, sizes)
    largest = max(float(np.max(np.abs(g), initial=0.0)) for g in ref["grads"].values())
    grads = {n: relative(dev["grads"][n], g, GRADIENT_FLOOR * largest) for n, g in ref["grads"].items()}
    row = {"cupy_seconds_with_compilation": round(time.perf_counter() - t0, 2),
           "loss": {"numpy": ref["loss"], "cupy": dev["loss"], "relative": relative(dev["loss"], ref["loss"])},
           "worst_gradient": max(grads.values()), "gradients": grads,
           "weights_after_adam": {n: relative(dev["weights"][n], w) for n, w in ref["weights"].items()},
           "buffers": {n: relative(dev["buffers"][n], b) for n, b in ref["buffers"].items()}}
    row["within_tolerance"] = max(row["worst_gradient"], row["loss"]["relative"]) <= TOLERANCE[dtype]
    return row


def step_parity(args: argparse.Namespace) -> dict[str, Any]:
    budget = BUDGETS[args.budget]
    images, labels = sample_batch(budget["parity_batch"])
    report: dict[str, Any] = {"what": "one training step on cupy against numpy from the same weights and batch: "
                                      "relative difference = max |cupy - numpy| / max |numpy| per array (for a gradient: "
                                      f"at least {GRADIENT_FLOOR} times the model's largest gradient)",
                              "batch": budget["parity_batch"], "sizes": "smoke" if budget["sizes"] else "the paper's",
                              "tolerance": TOLERANCE, "results": []}
    worst: dict[str, float] = {}
    for name in PARITY_MODELS:
        for dtype in ("float64", "float32"):
            if time.time() > args.soft_deadline:
                report["results"].append({"model": name, "dtype": dtype, "skipped": "the step's cap was reached"})
                continue
            row = attempt({"model": name, "dtype": dtype},
                          lambda: compare_step(name, dtype, images, labels, budget["sizes"]))
            report["results"].append(row)
            if "worst_gradient" in row:
                worst[f"{name} {dtype}"] = row["worst_gradient"]
            write_json(args.out / "parity.json", report)
    write_json(args.out / "parity.json", report)
    outside = [r for r in report["results"] if r.get("within_tolerance") is False or "error" in r]
    result = {"worst_gradient": worst,
              "headline": "worst gradient difference " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())}
    if outside:
        result["findings"] = "outside the tolerance: " + ", ".join(f"{r['model']} {r['dtype']}" for r in outside)
    return result


# ================================================================ step 4: speed
def median_rate(step: Callable[[], Any], batch: int, sync: Callable[[], Any], budget: dict,
                deadline: float) -> dict[str, Any]:
    """images/s: warm up, size a repeat to last min_repeat_time, time ``repeats`` repeats with
    the device synchronised before and after each; their median."""
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0  # with CuPy's kernel compilation, when not cached yet
    for _ in range(budget["warmup"] - 1):
        step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    one = time.perf_counter() - t0
    steps = max(1, int(budget["min_repeat_time"] / max(one, 1e-9)) + (budget["min_repeat_time"] > 0))
    rates: list[float] = []
    for _ in range(budget["repeats"]):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(batch * steps / (time.perf_counter() - t0))
        if time.time() > deadline:
            break
    return {"images_per_s": statistics.median(rates), "repeats": rates, "steps_per_repeat": steps,
            "first_step_s": first}


def cupy_peak(cp: Any, fn: Callable[[], Any], sync: Callable[[], Any]) -> dict[str, int]:
    """CuPy's memory pool during two calls of ``fn``: the bytes in use before, and the most
    in use at any allocation (an allocator that reads the pool after each malloc)."""
    pool = cp.get_default_memory_pool()
    sync()
    seen = {"start_bytes": pool.used_bytes()}
    seen["peak_bytes"] = seen["start_bytes"]

    def malloc(size: int) -> Any:
        memory = pool.malloc(size)
        seen["peak_bytes"] = max(seen["peak_bytes"], pool.used_bytes())
        return memory

    cp.cuda.set_allocator(malloc)
    try:
        fn()
        fn()
        sync()
    finally:
        cp.cuda.set_allocator(pool.malloc)
    return seen


def profiled_device_events(fn: Callable[[], Any], sync: Callable[[], Any]) -> dict[str, int]:
    """CUDA kernels, copies and fills PyTorch's profiler (CUPTI: every kernel of the process,
    CuPy's too) records while ``fn`` runs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    kinds: Counter = Counter()
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kinds["copies" if event.name.startswith("Memcpy") else "fills" if event.name.startswith("Memset")
                  else "kernels"] += 1
    return {k: kinds.get(k, 0) for k in ("kernels", "copies", "fills")}


def worker_capsnet_speed(args: argparse.Namespace) -> None:
    """capsnet on the cupy backend: each model and batch, train and infer, memory; the profiler count."""
    import importlib.util

    from capsnet import backend

    budget = BUDGETS[args.budget]
    images, labels = sample_batch(max(budget["batches"]))
    emulated = backend.is_emulated()
    with backend.use("cupy") as cp:
        sync = cp.cuda.Device().synchronize
        for batch in budget["batches"]:  # batch first: both models at the small batches, whatever the time
            for name in SPEED_MODELS:
                if time.time() > args.soft_deadline:
                    emit({"framework": "capsnet", "model": name, "batch": batch, "skipped": "the step's cap"})
                    continue
                def measure() -> dict[str, Any]:
                    step = _capsnet_step(name, batch, cp, images, labels, budget)
                    row = {"train": median_rate(step, batch, sync, budget, args.soft_deadline)}
                    if not emulated:
                        row["train"]["memory"] = _guarded(lambda: cupy_peak(cp, step, sync))
                    step.model.eval()
                    row["infer"] = median_rate(step.infer, batch, sync, budget, args.soft_deadline)
                    if not emulated:
                        row["infer"]["memory"] = _guarded(lambda: cupy_peak(cp, step.infer, sync))
                    return row

                emit(attempt({"framework": "capsnet", "model": name, "batch": batch}, measure))
                cp.get_default_memory_pool().free_all_blocks()
        if emulated:
            emit({"framework": "capsnet", "profiler": {"skipped": "needs a GPU (emulated device)"}})
        elif importlib.util.find_spec("torch") is None:
            emit({"framework": "capsnet", "profiler": {"skipped": "PyTorch (its profiler) is not installed"}})
        else:
            emit({"framework": "capsnet", "profiler": profiler_counts(
                lambda name, batch: _capsnet_step(name, batch, cp, images, labels, budget), sync, budget,
                args.soft_deadline)})


def _capsnet_step(name: str, batch: int, cp: Any, images: Any, labels: Any, budget: dict) -> Any:
    from capsnet.data import to_float

    model = build_model(name, "float32", budget["sizes"])
    model.train()
    return TrainingStep(name, model, to_float(cp.asarray(images[:batch]), "float32"), cp.asarray(labels[:batch]))


def profiler_counts(make: Callable[[str, int], Any], sync: Callable[[], Any], budget: dict, deadline: float) -> Any:
    """Device events of one steady-state training step and one inference, per model and batch."""
    def count(name: str, batch: int) -> dict[str, Any]:
        step = make(name, batch)
        step()
        step()  # the optimizer's state exists: the steady state
        train = profiled_device_events(step, sync)
        step.model.eval()
        step.infer()
        return {"train_step": train, "inference": profiled_device_events(step.infer, sync)}

    return [{"model": name, "batch": batch, **(_guarded(lambda: count(name, batch)) if time.time() < deadline
                                               else {"skipped": "the step's cap"})}
            for name in SPEED_MODELS for batch in budget["count_batches"]]


def worker_emulated_counts(args: argparse.Namespace) -> None:
    """Launches per step that the emulated device predicts (run with CAPSNET_EMULATE_CUPY=1)."""
    from capsnet import backend
    from capsnet.testing import device_counts

    budget = BUDGETS[args.budget]
    images, labels = sample_batch(max(budget["count_batches"]))
    with backend.use("cupy") as cp:
        for batch in budget["count_batches"]:
            for name in SPEED_MODELS:
                if time.time() > args.soft_deadline:
                    break
                def count() -> dict[str, Any]:
                    step = _capsnet_step(name, batch, cp, images, labels, budget)
                    step()
                    with device_counts() as train:
                        step()
                    step.model.eval()
                    with device_counts() as infer:
                        step.infer()
                    return {"train_step": train.launches, "inference": infer.launches,
                            "host_transfers_in_step": len(train.d2h)}

                emit(attempt({"framework": "capsnet-emulated", "model": name, "batch": batch}, count))


def reference(name: str) -> Any:
    """The PyTorch reference module ``scripts/<name>.py``."""
    import importlib

    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


class TorchStep:
    """The PyTorch reference of a library model (scripts/torch_capsnet.py,
    scripts/torch_efficient_capsnet.py) on ``device``, from the library model's seed-0
    weights: its training step (zero_grad, margin + reconstruction loss, backward, Adam)
    and its inference (as the library's ``predict``: the lengths, no decoder)."""

    def __init__(self, name: str, sizes: dict, device: Any, x: Any, y: Any, compiled: bool = False):
        import torch

        from capsnet import backend

        with backend.use("numpy"):
            state = {k: backend.to_numpy(v) for k, v in build_model(name, "float32", sizes).state_dict().items()}
        if name == "capsnet":
            self.model = reference("torch_capsnet").TorchCapsNet(dtype=torch.float32, **sizes.get(name, {}))
        else:
            self.model = reference("torch_efficient_capsnet").TorchEfficientCapsNet(dtype=torch.float32,
                                                                                    **sizes.get(name, {}))
        self.model.load_from_capsnet(state)
        self.model.to(device)
        self.name, self.x, self.y = name, x, y
        self.forward = torch.compile(self.model) if compiled else self.model
        self.total_loss = reference("torch_capsnet").total_loss  # CapsNetLoss's reference
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.model.train()

    def __call__(self) -> None:
        self.optimizer.zero_grad()
        lengths, recon = self.forward(self.x, self.y)
        self.total_loss(lengths, recon, self.y, self.x).backward()
        self.optimizer.step()

    def infer(self) -> None:
        import torch

        with torch.inference_mode():
            if self.name == "capsnet":
                self.model.predict(self.x)
            else:
                self.model.capsules(self.x).norm(dim=-1).argmax(dim=1)


def worker_torch_speed(args: argparse.Namespace) -> None:
    """The PyTorch references in eager mode: on CUDA on a GPU, on the CPU in the smoke run."""
    import torch

    budget = BUDGETS[args.budget]
    cuda = torch.cuda.is_available() and args.budget == "gpu"
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products in float32, as CuPy's
    torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    images, labels = sample_batch(max(budget["batches"]))
    emit({"framework": "torch", "settings": {"version": torch.__version__, "device": str(device),
                                             "tf32": False, "threads": torch.get_num_threads()}})

    def make(name: str, batch: int) -> TorchStep:
        x = torch.from_numpy(images[:batch, None].astype("float32") / 255).to(device)
        return TorchStep(name, budget["sizes"], device, x, torch.from_numpy(labels[:batch]).to(device))

    for batch in budget["batches"]:  # batch first: both models at the small batches, whatever the time
        for name in SPEED_MODELS:
            if time.time() > args.soft_deadline:
                emit({"framework": "torch", "model": name, "batch": batch, "skipped": "the step's cap"})
                continue
            def measure() -> dict[str, Any]:
                step = make(name, batch)
                row = {"train": median_rate(step, batch, sync, budget, args.soft_deadline)}
                if cuda:
                    row["train"]["memory"] = _guarded(lambda: torch_peak(step, sync))
                step.model.eval()
                row["infer"] = median_rate(step.infer, batch, sync, budget, args.soft_deadline)
                if cuda:
                    row["infer"]["memory"] = _guarded(lambda: torch_peak(step.infer, sync))
                return row

            emit(attempt({"framework": "torch", "model": name, "batch": batch, "device": str(device)}, measure))
            if cuda:
                torch.cuda.empty_cache()
    if cuda:
        emit({"framework": "torch", "profiler": profiler_counts(make, sync, budget, args.soft_deadline)})
    else:
        emit({"framework": "torch", "profiler": {"skipped": "needs CUDA"}})


def torch_peak(fn: Callable[[], Any], sync: Callable[[], Any]) -> dict[str, int]:
    import torch

    sync()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    fn()
    sync()
    return {"start_bytes": start, "peak_bytes": torch.cuda.max_memory_allocated()}


def worker_torch_compile(args: argparse.Namespace) -> None:
    """torch.compile of each reference's training step at batch 100: the time to compile (with
    the first step), then images/s."""
    import torch

    budget = BUDGETS[args.budget]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device, sync, batch = torch.device("cuda"), torch.cuda.synchronize, 100
    images, labels = sample_batch(batch)
    x = torch.from_numpy(images[:, None].astype("float32") / 255).to(device)
    y = torch.from_numpy(labels).to(device)
    for name in SPEED_MODELS:
        def compile_and_time() -> dict[str, Any]:
            step = TorchStep(name, budget["sizes"], device, x, y, compiled=True)
            emit({"event": "compiling", "model": name})
            t0 = time.perf_counter()
            step()
            sync()
            emit({"event": "compiled", "model": name})
            return {"compile_and_first_step_s": time.perf_counter() - t0,
                    "train": median_rate(step, batch, sync, budget, args.soft_deadline)}

        emit(attempt({"framework": "torch.compile", "model": name, "batch": batch}, compile_and_time))
        emit({"event": "compiled", "model": name})  # after an error too: the watchdog stops waiting


def stream_worker(kind: str, args: argparse.Namespace, on_record: Callable[[dict], None],
                  env: dict[str, str] | None = None, watchdog: Callable[[dict | None], str | None] | None = None,
                  share: float = 1.0) -> dict[str, Any]:
    """Run ``--worker kind`` and hand each result line to ``on_record`` as it comes. It gets
    ``share`` of the step's time left, so that a slow worker leaves the next its turn, and is
    stopped past it, or when ``watchdog`` (told each record, or None on a quiet second)
    returns a reason. Returns its exit status and the tail of its other output."""
    now = time.time()
    if now > args.soft_deadline:
        return {"skipped": "the step's cap was reached before it started"}
    until = now + share * (args.soft_deadline - now)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--budget", args.budget,
           "--soft-deadline", f"{until:.1f}", str(args.out), "--work", str(args.work)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env or child_env(), start_new_session=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                              daemon=True)
    reader.start()
    other: list[str] = []
    stopped = None
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line.startswith(RECORD):
            record = json.loads(line[len(RECORD):])
            on_record(record)
            stopped = watchdog(record) if watchdog else None
        elif line:
            other.append(line.rstrip("\n"))
            print(line, end="", flush=True)
        elif watchdog:
            stopped = watchdog(None)
        if stopped is None and time.time() > until + 3:
            stopped = "its share of the step's time was spent"
        if stopped:
            stop(proc, grace=2)
            break
    proc.wait()
    return {"exit": proc.returncode, "stopped": stopped, "output_tail": other[-10:]}


def step_speed(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    from capsnet import backend

    budget = BUDGETS[args.budget]
    path = args.out / "speed.json"
    emulated = backend.is_emulated()
    report: dict[str, Any] = {
        "what": "images/s of a training step and of inference, medians of timed repeats with the device "
                "synchronised around each; capsnet on the cupy backend, the PyTorch references eager",
        "batches": list(budget["batches"]), "sizes": "smoke" if budget["sizes"] else "the paper's",
        "timing": {k: budget[k] for k in ("warmup", "repeats", "min_repeat_time")},
        "memory": "peak bytes in use during two steps: CuPy's memory pool (read at each allocation), "
                  "torch.cuda.max_memory_allocated; both include the weights, gradients, optimizer state and batch",
        "emulated": emulated, "rows": [], "runs": {}}
    if emulated:
        report["note"] = ("the emulated device: these times are NumPy's on the CPU, not a GPU's; they prove only "
                          "that the code runs")

    def keep(record: dict) -> None:
        if "profiler" in record:
            report.setdefault("profiler_counts", {})[record["framework"]] = record["profiler"]
        elif "settings" in record:
            report.setdefault("torch_settings", record["settings"])
        elif record["framework"] == "capsnet-emulated":
            report.setdefault("emulated_launches", []).append(record)
        else:
            report["rows"].append(record)
        write_json(path, report)

    write_json(path, report)
    # shares of the time left: capsnet 45% of it, then PyTorch 60% of what remains, then the count
    report["runs"]["capsnet"] = stream_worker("speed-capsnet", args, keep, share=0.45)
    if importlib.util.find_spec("torch") is None:
        report["runs"]["torch"] = {"skipped": "PyTorch is not installed"}
    else:
        report["runs"]["torch"] = stream_worker("speed-torch", args, keep, share=0.6)
    report["runs"]["emulated_launches"] = stream_worker("emulated-counts", args, keep,
                                                        env=child_env(CAPSNET_EMULATE_CUPY="1"))
    write_json(path, report)
    pairs = []
    for row in report["rows"]:
        if row["framework"] == "capsnet" and "train" in row:
            ref = next((r for r in report["rows"] if r["framework"] == "torch" and r["model"] == row["model"]
                        and r["batch"] == row["batch"] and "train" in r), None)
            if ref:
                pairs.append(f"{row['model']} b{row['batch']} "
                             f"{row['train']['images_per_s'] / ref['train']['images_per_s']:.2f}x")
    failed = [k for k, v in report["runs"].items() if v.get("exit") not in (0, None) and not v.get("stopped")]
    cut = [k for k, v in report["runs"].items() if v.get("stopped") or "cap" in v.get("skipped", "")
           or any(r.get("skipped") for r in report["rows"] if r["framework"] == k)]
    errors = [f"{r['framework']} {r['model']} b{r['batch']}" for r in report["rows"] if "error" in r]
    result: dict[str, Any] = {"headline": ("train speed capsnet/torch: " + ", ".join(pairs)) if pairs
                              else f"{sum('train' in r for r in report['rows'])} measurements"}
    if emulated:
        result["headline"] += " (emulated and torch on the CPU: not speeds)"
    if cut:
        result["headline"] += f" (stopped or not started at the step's cap: {', '.join(cut)})"
    if errors:
        result["findings"] = "errors (see speed.json): " + ", ".join(errors)
    if failed:
        result["failing"] = "workers failed: " + ", ".join(failed)
    return result


def step_compile(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    from capsnet import backend

    if backend.is_emulated():
        return {"skipped": "needs a GPU (this is the emulated device)"}
    if importlib.util.find_spec("torch") is None:
        return {"skipped": "PyTorch is not installed"}
    path = args.out / "speed.json"
    rows: list[dict] = []
    compiling: dict[str, Any] = {}

    def keep(record: dict) -> None:
        if "event" not in record:
            rows.append(record)
            update_json(path, "torch_compile", rows)

    def watchdog(record: dict | None) -> str | None:
        if record and record.get("event") == "compiling":
            compiling.update(model=record["model"], since=time.monotonic())
        elif record and record.get("event") == "compiled":
            compiling.clear()
        if compiling and time.monotonic() - compiling["since"] > COMPILE_LIMIT_S:
            return f"{compiling['model']} did not compile within {COMPILE_LIMIT_S} s"
        return None

    run = stream_worker("torch-compile", args, keep, watchdog=watchdog)
    rows.append({"run": run})
    update_json(path, "torch_compile", rows)
    done = [f"{r['model']} {r['train']['images_per_s']:.0f} img/s" for r in rows
            if r.get("framework") == "torch.compile" and "train" in r]
    if not done:  # optional: a compiler that fails or takes too long is a note, not a failure of the proof
        errors = [f"{r['model']}: {r['error']}" for r in rows if "error" in r]
        return {"skipped": run["stopped"] or "; ".join(errors) or f"the worker exited with status {run['exit']}"}
    return {"headline": "compiled, batch 100 training: " + ", ".join(done)}


# ================================================================ steps 5 and 6: training
def step_epoch(args: argparse.Namespace) -> dict[str, Any]:
    from capsnet.training import load_checkpoint

    budget = BUDGETS[args.budget]
    full = all((FULL_MNIST / name).is_file() for name in MNIST_FILES)
    if not full and args.budget == "gpu":
        return {"skipped": f"no MNIST in {FULL_MNIST.relative_to(REPO)}: run `python scripts/gpu_proof.py --prepare` "
                           "before sending, and carry .gpu-data"}
    data = ["--data-dir", str(FULL_MNIST)] if full else ["--dataset", "mnist-sample"]
    run_dir = args.work / "epoch"
    cmd = [sys.executable, "-m", "capsnet.train", "--backend", "cupy", "--epochs", "1", *data, "--out", str(run_dir),
           "--no-progress", *budget["epoch_flags"]]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=child_env(), preexec_fn=sigint_as_in_a_terminal)
    try:
        output, _ = proc.communicate(timeout=max(1.0, args.soft_deadline - time.time()))
        cut = False
    except subprocess.TimeoutExpired:
        cut = True
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the step under way ends, a checkpoint is saved
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    wall = time.monotonic() - t0
    print(output, flush=True)
    result: dict[str, Any] = {"command": "python " + " ".join(cmd[1:]), "exit": proc.returncode,
                              "wall_seconds": round(wall, 1), "first_line": output.splitlines()[0] if output else "",
                              "training_images": mnist_count(FULL_MNIST / MNIST_FILES[0]) if full else "the sample's"}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.read_text().strip():
        record = json.loads(metrics.read_text().strip().splitlines()[-1])
        result["metrics"] = record
        rate, accuracy = record.get("train_images_per_second", math.nan), record.get("test_accuracy", math.nan)
        result["headline"] = f"{rate:.0f} img/s training, test accuracy {accuracy:.4f}, {wall:.0f} s in all"
    elif cut and (run_dir / "checkpoint.npz").exists():
        header = load_checkpoint(run_dir / "checkpoint.npz")[0]
        result["cut_at"] = {"epoch": header.get("epoch"), "step_in_epoch": header.get("step_in_epoch")}
        result["headline"] = f"cut by its cap at step {header.get('step_in_epoch')} of the epoch after {wall:.0f} s"
        result["findings"] = "the epoch did not end within its cap: too slow on this device"
    if not full:
        result["note"] = "smoke: the MNIST sample shipped with capsnet and a small model, not the full MNIST"
    update_json(args.out / "training.json", "epoch", result)
    if proc.returncode != 0 and not cut:
        result["failing"] = f"python -m capsnet.train exited with status {proc.returncode}"
    return result


def _flat(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
            yield from _flat(f"{prefix}.{k}", v)
    else:
        yield prefix, value


def step_resume(args: argparse.Namespace) -> dict[str, Any]:
    """The approach of tests/backend/test_device_runs.py: the same run straight, and stopped
    after a step mid-epoch then resumed; the final checkpoints must be equal bit for bit."""
    import numpy as np

    from capsnet import train as train_cli
    from capsnet.data.mnist import SAMPLE_DIR
    from capsnet.training import RunTrainer, TrainConfig, load_checkpoint

    budget = BUDGETS[args.budget]["resume"]
    full = all((FULL_MNIST / name).is_file() for name in MNIST_FILES)
    common = ["--backend", "cupy", "--data-dir", str(FULL_MNIST if full else SAMPLE_DIR), "--epochs", "2",
              "--no-progress", *budget["flags"]]
    straight, cut = args.work / "straight", args.work / "cut"
    stop_at = tuple(budget["stop_at"])
    result: dict[str, Any] = {"run": " ".join(common), "stop_after_step": {"epoch": stop_at[0], "step": stop_at[1]}}
    update_json(args.out / "training.json", "resume", result)  # a cut run still says what it was running

    def phase(name: str, run: Callable[[], None]) -> bool:
        """Run one of the three runs if the step's time allows; the result so far is saved."""
        if time.time() > args.soft_deadline:
            result.update(headline=f"not done: the step's cap came before the {name} run",
                          findings=f"the resume check did not finish within its cap (before the {name} run)")
            update_json(args.out / "training.json", "resume", result)
            return False
        t0 = time.monotonic()
        run()
        result[f"{name}_s"] = round(time.monotonic() - t0, 1)
        update_json(args.out / "training.json", "resume", result)
        return True

    def interrupt(trainer: Any, epoch: int, step: int) -> None:
        if (epoch, step) == stop_at:
            raise KeyboardInterrupt

    def interrupted() -> None:
        cfg = train_cli.config_from_args(train_cli.build_parser().parse_args([*common, "--out", str(cut)]),
                                         TrainConfig())
        try:
            RunTrainer(cfg, cut, progress=False, log=False, on_step=interrupt).fit()
            raise RuntimeError(f"the run was not interrupted at (epoch, step) {stop_at}")
        except KeyboardInterrupt:
            pass
        header = load_checkpoint(cut / "checkpoint.npz")[0]
        result["stopped_after"] = {"epoch": header.get("epoch"), "step_in_epoch": header.get("step_in_epoch")}

    if not (phase("uninterrupted", lambda: require(train_cli.main([*common, "--out", str(straight)]) == 0,
                                                     "the uninterrupted run failed"))
            and phase("interrupted", interrupted)
            and phase("resumed", lambda: require(train_cli.main([*common, "--out", str(cut), "--resume"]) == 0,
                                                 "the resumed run failed"))):
        return result

    (_, a_state, a_opt), (_, b_state, b_opt) = load_checkpoint(straight / "checkpoint.npz"), \
        load_checkpoint(cut / "checkpoint.npz")
    differing = []
    for kind, a, b in (("weights", a_state, b_state), ("optimizer", a_opt, b_opt)):
        flat_a, flat_b = dict(_flat("", a)), dict(_flat("", b))
        for key in sorted(set(flat_a) | set(flat_b)):
            x, y = flat_a.get(key), flat_b.get(key)
            same = isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and np.array_equal(x, y) \
                or not isinstance(x, np.ndarray) and x == y
            if not same:
                entry = {"what": f"{kind} {key}"}
                if isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.shape == y.shape:
                    entry["max_abs_difference"] = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
                differing.append(entry)
    stopped = result["stopped_after"]
    result.update(bit_identical=not differing, differing=differing[:50], n_differing=len(differing))
    result["headline"] = (f"bit-identical after a stop at step {stopped['step_in_epoch']} of epoch "
                          f"{stopped['epoch'] + 1}" if not differing
                          else f"NOT bit-identical: {len(differing)} arrays differ")
    update_json(args.out / "training.json", "resume", result)
    if differing:
        result["findings" if args.budget == "gpu" else "failing"] = result["headline"]
    return result


STEP_FUNCTIONS = {"machine": step_machine, "suite": step_suite, "parity": step_parity, "speed": step_speed,
                  "epoch": step_epoch, "resume": step_resume, "compile": step_compile}
WORKERS = {"speed-capsnet": worker_capsnet_speed, "speed-torch": worker_torch_speed,
           "emulated-counts": worker_emulated_counts, "torch-compile": worker_torch_compile}


# ================================================================ command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Steps: " + "; ".join(f"{s.name}: {s.title}" for s in STEPS))
    p.add_argument("out", nargs="?", help="the output folder (default: $OUT where set, else runs/gpu-proof)")
    p.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], metavar="STEP",
                   help="run only these steps, in the proof's order")
    p.add_argument("--smoke", action="store_true",
                   help="the smoke budget even on a GPU (always on the emulated device)")
    p.add_argument("--prepare", action="store_true",
                   help="copy MNIST to .gpu-data/mnist, keep it out of git, record the commit, print the call "
                        "to send; runs no step")
    p.add_argument("--data-dir", type=Path,
                   help="--prepare: the MNIST folder (else $CAPSNET_DATA_DIR, else ../shared/data/mnist)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (the training runs' folders)")
    p.add_argument("--step", choices=list(STEP_FUNCTIONS), help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--budget", choices=list(BUDGETS),
                   help="the sizes and caps to run with (default: gpu on a GPU, smoke elsewhere); --budget gpu on "
                        "the emulated device tries the GPU's caps, which cut the steps there")
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--soft-deadline", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(args: argparse.Namespace) -> int:
    args.out = Path(args.out)
    if args.worker:
        WORKERS[args.worker](args)
        return 0
    result = STEP_FUNCTIONS[args.step](args)
    write_json(args.work / f"{args.step}.result.json", result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step or args.worker:
        return run_child(args)
    if args.prepare:
        print(prepare(args.data_dir))
        print("then send:\n    " + run_call_text())
        return 0
    from capsnet import backend

    out = Path(args.out or os.environ.get("OUT") or REPO / "runs" / "gpu-proof").resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = [s.name for s in STEPS if not args.steps or s.name in args.steps]
    for stale in {"proof.json", "proof.log", *(f for s in steps for f in STEP[s].files)}:
        (out / stale).unlink(missing_ok=True)  # a file left from an earlier run would pass for this one's
    emulated, usable = backend.is_emulated(), None
    if not backend.cupy_available():
        usable = (f"the cupy backend cannot run here ({backend._cupy_error}); for the smoke run on the emulated "
                  "device set CAPSNET_EMULATE_CUPY=1")
    budget = args.budget or ("smoke" if emulated or args.smoke or usable else "gpu")
    device = backend.describe_device("cupy") if not usable else "none"
    work = Path(tempfile.mkdtemp(prefix="capsnet-gpu-proof-"))
    print(f"GPU proof, {budget} budget, device: {usable or device}; results in {out}", flush=True)
    try:
        proof = Proof(out, budget, steps, work, device, usable)
        bad = proof.run()
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    folder = proof.index.get("results_folder")
    print(f"\nproof.json and the step files are in {out}")
    if budget == "gpu":
        print(f"commit them as they came: mkdir -p {folder} && cp {out}/* {folder}/")
    else:
        print("a smoke run: nothing here is a GPU figure. To run the proof on a lent GPU:\n"
              "    python scripts/gpu_proof.py --prepare   # MNIST to .gpu-data/mnist, the commit recorded\n"
              "    " + run_call_text())
    return 1 if bad or usable else 0


if __name__ == "__main__":
    if str(REPO) not in sys.path[:1]:
        sys.path.insert(0, str(REPO))  # this checkout's capsnet, whatever else is installed
    sys.exit(main())
