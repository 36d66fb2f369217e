"""EM routing against its PyTorch reference: throughput, peak memory and where a step's time goes.

    PYTHONPATH=$PWD python scripts/profile_em.py --out em-profile.json
    PYTHONPATH=$PWD python scripts/profile_em.py --preset paper --batch-sizes 1 32 --out em32.json
    git show 85a3922:scripts/torch_matrix_capsnet.py > /tmp/torch_matrix_capsnet_old.py
    PYTHONPATH=$PWD python scripts/profile_em.py --compare-torch /tmp/torch_matrix_capsnet_old.py ...

Throughput: every (implementation, batch size) is measured in a fresh interpreter, the
implementations alternating within each round, ``--rounds`` rounds, medians reported.
capsnet trains through ``capsnet.replicas.replicate`` (one replica per thread, BLAS on one
thread each), as ``python -m capsnet.train`` does; PyTorch with ``torch.set_num_threads``.
Both start from the same weights (capsnet's seed 0, loaded into the reference) and see the
same random images and labels. Training step: forward, spread loss (margin 0.9), backward,
Adam. Inference: forward in eval mode (``torch.inference_mode`` for PyTorch).

Peak memory: the worker resets the kernel's high-water mark (``/proc/self/clear_refs``)
after the model, optimizer and batch exist and reports VmHWM minus the resident size at that
moment, over the training steps (first step included: autograd and workspaces allocate there).
Minor page faults per training step (after the first) tell how much memory a step takes
fresh from the kernel: large blocks freed and allocated again are zero-filled page by page.

Profile (``--profile-batch``): one thread each, the step's time split into parts by timers
around the library's functions (capsnet: exclusive time of each wrapped call) and, for
PyTorch, around the reference's functions in the forward and identity autograd nodes at
the parts' boundaries in the backward. Parts: convolutions (conv1 and the primary 1x1),
gather (capsnet's im2col / col2im of the ConvCaps windows; PyTorch's unfold stays in
other), votes (V = M W and its gradient; capsnet: with the routing layout), M-step t and
E-step t forward and backward for each routing iteration (the layers summed), the loss,
Adam, and what is left (other).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from benchlib import TORCH_ALLOCATORS, allocator_env, host_allocator

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
PRESETS = {"default": {}, "paper": {"conv_channels": 32, "primary_types": 32, "caps1": 32, "caps2": 32}}
MARGIN = 0.9


# -- machine ----------------------------------------------------------------------------------
def machine_info(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "threads": threads}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["cpu"] = model
        info["cpu_count"] = os.cpu_count()
        info["vector_extensions"] = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "amx")))
    except OSError:
        info["cpu"] = platform.processor()
    import numpy as np
    from threadpoolctl import threadpool_info

    info["numpy"] = np.__version__
    info["blas"] = [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "filepath")}
                    for lib in threadpool_info() if lib.get("user_api") == "blas"]
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        info["torch"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                            capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


# -- memory -------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; the RSS (kB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


# -- the two implementations ----------------------------------------------------------------------
def batch(size: int):
    import numpy as np
    rng = np.random.default_rng(1)
    return rng.uniform(0, 1, (size, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, size).astype(np.int64)


def build_capsnet(preset: str, threads: int):
    """(model, runner, train_step, infer, parts) for the library."""
    from capsnet.layers import SpreadLoss
    from capsnet.models import MatrixCapsNet
    from capsnet.optim import Adam
    from capsnet.replicas import replicate

    model = MatrixCapsNet(dtype="float32", seed=0, **PRESETS[preset])
    crit = SpreadLoss(MARGIN)
    opt = Adam(model.parameters(), lr=1e-3)
    runner = replicate(model, threads)

    def train_step(x, y) -> None:
        crit(runner(x), y)
        runner.backward(crit.backward())
        opt.step()
        opt.zero_grad()

    def infer(x) -> None:
        runner.predict(x)

    return model, crit, opt, train_step, infer


def build_torch(preset: str, threads: int, module: str):
    import importlib.util

    import torch
    from capsnet.models import MatrixCapsNet

    torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("torch_matrix_ref", module)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    ours = MatrixCapsNet(dtype="float32", seed=0, **PRESETS[preset])
    state = {k: v for k, v in ours.state_dict().items()}
    model = ref.TorchMatrixCapsNet(dtype=torch.float32, **PRESETS[preset])
    model.load_from_capsnet(state)
    del ours, state
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step(x, y) -> None:
        opt.zero_grad()
        ref.spread_loss(model(x), y, MARGIN).backward()
        opt.step()

    def infer(x) -> None:
        with torch.inference_mode():
            model(x).argmax(dim=1)

    return ref, model, opt, train_step, infer


def _median_time(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    x, y = batch(args.batch)
    if args.worker == "capsnet":
        model, _, _, train_step, infer = build_capsnet(args.preset, args.threads)
        if args.min_train_slice is not None:
            model.min_train_slice = args.min_train_slice
    else:
        import torch
        _, model, _, train_step, infer = build_torch(args.preset, args.threads, args.torch_module)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    base = reset_peak()
    train_step(x, y)  # warm-up: allocations, replicas, autograd buffers
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train = _median_time(lambda: train_step(x, y), args.steps)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    peak_mb = (_status_kb("VmHWM") - base) / 1024
    model.eval()
    infer(x)
    inference = _median_time(lambda: infer(x), args.steps)
    return {"train_images_per_s": args.batch / train, "infer_images_per_s": args.batch / inference,
            "train_peak_mb": peak_mb, "train_page_faults_per_step": faults}


def run_worker(impl: str, batch_size: int, args: argparse.Namespace, torch_module: str | None = None,
               min_train_slice: int | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", impl, "--batch", str(batch_size), "--preset", args.preset,
           "--threads", str(args.threads), "--steps", str(args.steps)]
    if torch_module:
        cmd += ["--torch-module", torch_module]
    if min_train_slice is not None:
        cmd += ["--min-train-slice", str(min_train_slice)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    env.pop("CAPSNET_EMULATE_CUPY", None)
    if impl == "torch":  # the reference imports capsnet for its weights: its allocator is set here
        env.update(allocator_env(args.torch_allocator))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- profile by part ---------------------------------------------------------------------------------
class PartTimer:
    """Exclusive wall time per label: a wrapped call's time minus that of the wrapped calls inside it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []

    def wrap(self, fn: Callable, label: Callable[..., str] | str) -> Callable:
        def timed(*a, **k):
            name = label(*a, **k) if callable(label) else label
            frame = [name, 0.0]
            self._stack.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                elapsed = time.perf_counter() - t0
                self._stack.pop()
                self.totals[name] += elapsed - frame[1]
                if self._stack:
                    self._stack[-1][1] += elapsed
        return timed


def profile_capsnet(args: argparse.Namespace) -> dict[str, float]:
    from threadpoolctl import threadpool_limits

    import capsnet.layers.matrix_capsules as mc

    timer = PartTimer()
    it = {"t": 0}

    def fwd(name: str) -> Callable[..., str]:
        def label(*a, **k) -> str:
            return f"{name} {it['t']} forward"
        return label

    def bwd(name: str) -> Callable[..., str]:
        def label(*a, **k) -> str:
            return f"{name} {it['t']} backward"
        return label

    routing, routing_backward = mc._route, mc._route_backward
    m_step, e_step, m_back, e_back = mc._m_step, mc._e_step, mc._m_step_backward, mc._e_step_backward

    def em_routing(*a, **k):
        it["t"] = 0
        return routing(*a, **k)

    def em_routing_backward(grad_mean, grad_a, a_in, beta_u, state, detach):
        it["t"] = len(state.a) - 1
        return routing_backward(grad_mean, grad_a, a_in, beta_u, state, detach)

    def m_step_then_count(*a, **k):
        return m_step(*a, **k)

    def e_step_then_count(*a, **k):
        out = e_step(*a, **k)
        it["t"] += 1
        return out

    def m_back_then_count(*a, **k):
        out = m_back(*a, **k)
        it["t"] -= 1
        return out

    mc._route = timer.wrap(em_routing, "routing: other forward")  # what the layers call
    mc._route_backward = timer.wrap(em_routing_backward, "routing: other backward")
    mc._m_step = timer.wrap(m_step_then_count, fwd("M-step"))
    mc._e_step = timer.wrap(e_step_then_count, fwd("E-step"))
    mc._m_step_backward = timer.wrap(m_back_then_count, bwd("M-step"))
    mc._e_step_backward = timer.wrap(e_back, bwd("E-step"))
    mc._votes_by_parent = timer.wrap(mc._votes_by_parent, "votes forward")
    mc._centre = timer.wrap(mc._centre, "votes forward")
    mc._votes_by_parent_backward = timer.wrap(mc._votes_by_parent_backward, "votes backward")
    mc._unblock = timer.wrap(mc._unblock, "votes backward")
    mc.im2col = timer.wrap(mc.im2col, "gather forward")
    mc.col2im = timer.wrap(mc.col2im, "gather backward")
    model, crit, opt, _, _ = build_capsnet(args.preset, 1)
    for layer in (model.conv1, model.primary):
        layer.forward = timer.wrap(layer.forward, "convolutions forward")
        layer.backward = timer.wrap(layer.backward, "convolutions backward")
    crit.forward = timer.wrap(crit.forward, "loss forward")
    crit.backward = timer.wrap(crit.backward, "loss backward")
    opt_step, opt_zero = timer.wrap(opt.step, "Adam"), timer.wrap(opt.zero_grad, "Adam")
    x, y = batch(args.profile_batch)

    def step() -> None:
        crit(model(x), y)
        model.backward(crit.backward())
        opt_step()
        opt_zero()

    model.train()
    with threadpool_limits(1):
        return _profile_steps(step, timer, args)


def _profile_steps(step: Callable[[], None], timer: PartTimer, args: argparse.Namespace) -> dict[str, float]:
    step()
    per_step: list[dict[str, float]] = []
    for _ in range(args.profile_steps):
        timer.totals.clear()
        t0 = time.perf_counter()
        step()
        total = time.perf_counter() - t0
        parts = dict(timer.totals)
        parts["other"] = total - sum(parts.values())
        parts["step"] = total
        per_step.append(parts)
    labels = sorted({k for p in per_step for k in p})
    return {k: 1e3 * statistics.median(p.get(k, 0.0) for p in per_step) for k in labels}


def profile_torch(args: argparse.Namespace) -> dict[str, float]:
    import torch

    ref, model, opt, _, _ = build_torch(args.preset, 1, args.torch_module)
    timer = PartTimer()
    events: list[tuple[float, str, str]] = []  # (time, label, "enter" | "exit") seen in the backward
    it = {"t": 0}

    class Boundary(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, label, side):
            ctx.label, ctx.side = label, side
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            events.append((time.perf_counter(), ctx.label, ctx.side))
            return g, None, None

    calls = {"n": 0}

    def part(fn: Callable, label: Callable[[], str] | str, count: bool = False) -> Callable:
        """fn timed in the forward, and its backward bracketed by boundary nodes (one tag per call)."""
        def wrapped(*a):
            name = label() if callable(label) else label
            calls["n"] += 1
            tag = f"{name}|{calls['n']}"
            a = tuple(Boundary.apply(v, tag, "enter") if torch.is_tensor(v) and v.requires_grad else v for v in a)
            out = timer.wrap(fn, name + " forward")(*a)
            if count:
                it["t"] += 1
            if isinstance(out, tuple):
                return tuple(Boundary.apply(v, tag, "exit") if torch.is_tensor(v) and v.requires_grad else v
                             for v in out)
            return Boundary.apply(out, tag, "exit") if out.requires_grad else out
        return wrapped

    by_parent = ref.em_routing_by_parent

    def routing(*a, **k):
        it["t"] = 0
        return by_parent(*a, **k)

    ref.em_routing_by_parent = routing
    ref.m_step = part(ref.m_step, lambda: f"M-step {it['t']}")
    ref.e_step = part(ref.e_step, lambda: f"E-step {it['t']}", count=True)
    ref.votes_of = part(ref.votes_of, "votes")
    for layer in (model.conv1, model.primary):
        layer.forward = part(layer.forward, "convolutions")
    loss_fn = part(ref.spread_loss, "loss")
    x, y = batch(args.profile_batch)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    opt_step = timer.wrap(opt.step, "Adam")
    opt_zero = timer.wrap(opt.zero_grad, "Adam")

    def step() -> None:
        opt_zero()
        loss = loss_fn(model(x), y, MARGIN)
        events.clear()
        t0 = time.perf_counter()
        loss.backward()
        _backward_parts(events, t0, timer)
        opt_step()

    torch.set_num_threads(1)
    model.train()
    return _profile_steps(step, timer, args)


def _backward_parts(events: list, t0: float, timer: PartTimer) -> None:
    """Each call's backward: from the first gradient at its outputs to the last one leaving
    through its inputs (what falls between the parts stays in 'other')."""
    exits: dict[str, list[float]] = defaultdict(list)
    enters: dict[str, list[float]] = defaultdict(list)
    for when, tag, side in events:
        (exits if side == "exit" else enters)[tag].append(when)
    for tag, out_times in exits.items():
        if enters.get(tag):
            timer.totals[tag.split("|")[0] + " backward"] += max(enters[tag]) - min(out_times)


# -- driver -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="default: A=32, B=C=D=8; paper: A=B=C=D=32")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 100])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of fresh processes (median)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (median)")
    p.add_argument("--torch-module", default=str(SCRIPTS / "torch_matrix_capsnet.py"))
    p.add_argument("--torch-allocator", choices=TORCH_ALLOCATORS, default="system",
                   help="the references' host allocator: system (glibc's defaults, as PyTorch's users run it) or "
                        "tuned (the thresholds capsnet sets on import, capsnet.allocator)")
    p.add_argument("--compare-torch", default=None,
                   help="another reference file (the old one) measured in the same rounds")
    p.add_argument("--slices", action="store_true",
                   help="also capsnet with min_train_slice 32 (one replica below 32 per thread)")
    p.add_argument("--profile-batch", type=int, default=32, help="0: no profile")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--worker-timeout", type=int, default=1800)
    p.add_argument("--out", default=None, help="JSON file")
    p.add_argument("--worker", choices=("capsnet", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--min-train-slice", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    report: dict[str, Any] = {"machine": {**machine_info(args.threads),
                                          "host_allocator": host_allocator(args.torch_allocator)},
                              "preset": args.preset,
                              "config": PRESETS[args.preset], "rounds": args.rounds, "steps": args.steps,
                              "torch_module": args.torch_module, "compare_torch": args.compare_torch}
    impls = [("capsnet", "capsnet", None, None), ("torch", "torch", args.torch_module, None)]
    if args.compare_torch:
        impls.append(("torch (compare)", "torch", args.compare_torch, None))
    if args.slices:
        impls.append(("capsnet min_train_slice 32", "capsnet", None, 32))
    if not args.skip_throughput:
        raw: dict[str, dict[int, list]] = {name: {b: [] for b in args.batch_sizes} for name, *_ in impls}
        for r in range(args.rounds):
            for b in args.batch_sizes:
                order = impls if r % 2 == 0 else impls[::-1]
                for name, kind, module, slice_ in order:
                    result = run_worker(kind, b, args, module, slice_)
                    raw[name][b].append(result)
                    print(f"round {r + 1} batch {b:4d} {name:28s} {result}", flush=True)
        table: dict[str, Any] = {}
        for name, per_batch in raw.items():
            table[name] = {}
            for b, results in per_batch.items():
                ok = [x for x in results if "error" not in x]
                if not ok:
                    table[name][b] = {"error": results[-1].get("error")}
                    continue
                table[name][b] = {k: statistics.median(x[k] for x in ok) for k in ok[0]}
        report["throughput"] = table
        report["raw"] = raw
        print(f"\n{'':28s}" + "".join(f"  batch {b:>4d} train / infer img/s, peak MB" for b in args.batch_sizes))
        for name, per_batch in table.items():
            cells = []
            for b in args.batch_sizes:
                c = per_batch[b]
                cells.append("  error" if "error" in c else
                             f"  {c['train_images_per_s']:8.1f} / {c['infer_images_per_s']:8.1f}, "
                             f"{c['train_peak_mb']:7.0f}")
            print(f"{name:28s}" + "".join(cells))
        ratios = {}
        for b in args.batch_sizes:
            ours, theirs = table["capsnet"][b], table["torch"][b]
            if "error" not in ours and "error" not in theirs:
                ratios[b] = {"train": ours["train_images_per_s"] / theirs["train_images_per_s"],
                             "infer": ours["infer_images_per_s"] / theirs["infer_images_per_s"],
                             "peak_memory": ours["train_peak_mb"] / max(theirs["train_peak_mb"], 1e-9)}
        report["capsnet_over_torch"] = ratios
        print("capsnet / torch:", json.dumps(ratios))
        if 32 in args.batch_sizes and "error" not in table["capsnet"][32]:
            rate = table["capsnet"][32]["train_images_per_s"]
            report["mnist_epoch_minutes_batch32"] = 60000 / rate / 60
            print(f"MNIST epoch (60,000 images) at batch 32, estimated from images/s: "
                  f"{report['mnist_epoch_minutes_batch32']:.1f} min")
    if args.profile_batch:
        report["profile_batch"] = args.profile_batch
        report["profile_threads"] = 1
        report["profile_ms"] = {"capsnet": profile_capsnet(args), "torch": profile_torch(args)}
        labels = sorted(set(report["profile_ms"]["capsnet"]) | set(report["profile_ms"]["torch"]))
        print(f"\nprofile, batch {args.profile_batch}, one thread, median of {args.profile_steps} steps (ms)")
        print(f"{'part':62s} {'capsnet':>9s} {'torch':>9s}")
        for label in labels:
            print(f"{label:62s} {report['profile_ms']['capsnet'].get(label, 0):9.1f} "
                  f"{report['profile_ms']['torch'].get(label, 0):9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
