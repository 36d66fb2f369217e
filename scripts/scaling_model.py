"""Per-section time and parallel fraction of a training step, and a model of its speed on more cores.

The paper-sized CapsNet, float32, one process. A training step is timed per section,
the time spent in each (exclusive of the sections nested in it) on every thread:

    conv1            Conv2d(1 -> 256, 9x9) and its ReLU, forward and weight gradient
    fourier          the PrimaryCaps convolution (Fourier domain), forward and both gradients
    primary capsules PrimaryCaps around its convolution: regrouping into capsules, squash
    routing          DigitCaps: u_hat = W u, three routing iterations, and their gradients
    decoder          the three fully connected layers, forward and backward
    loss             capsule lengths, masking, margin and reconstruction losses
    reduction        the replicas' parameter gradients added into the model's (threads > 1)
    optimizer        Adam's step and zero_grad
    other            the step's wall time not in any section (splitting, joining, Python)

in three configurations, alternating, ``--repeats`` times each:

- ``one``: one thread, BLAS on one thread (the single-thread time t1);
- ``replicas``: ``--threads`` T replicas on T threads, a slice of the batch each, BLAS on
  one thread per call (capsnet.replicas, what the training loop runs);
- ``blas``: the model on the calling thread with BLAS on T threads (the step before
  capsnet.replicas).

A section's parallel time is the largest of its per-thread totals (the replicas run
their slices side by side). From t1 and tT, Amdahl's law gives its parallel fraction,
``p = (1 - tT / t1) / (1 - 1 / T)``, clipped to [0, 1]. The model predicts each
section's time on n cores as ``t1 * ((1 - p) + p * ceil(B / n) / B)``: the parallel part
shrinks with the largest slice a thread gets (so a batch of 100 cannot use more than
100 threads, and 64 threads give slices of 1 and 2), the serial part stays. It assumes
that memory bandwidth and the per-image cost of each section do not change with the
slice size, so it is an upper bound where small slices make the products less efficient.

Writes ``--json``; ``--table`` prints the README's markdown tables from such a JSON.

    python scripts/scaling_model.py --batch-sizes 100 32 --threads 2 --json scripts/results/scaling-model.json
    python scripts/scaling_model.py --table scripts/results/scaling-model.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from benchlib import machine_info

SECTIONS = ("conv1", "fourier", "primary capsules", "routing", "decoder", "loss", "reduction", "optimizer", "other")
CORES = (1, 2, 4, 8, 16, 64)


class Clock:
    """Exclusive time per (thread, section): a nested timed call's time is taken out of its parent's."""

    def __init__(self) -> None:
        self.totals: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.local = threading.local()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = getattr(self.local, "stack", None)
            if stack is None:
                stack = self.local.stack = []
            stack.append(0.0)  # time of nested timed calls
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = stack.pop()
                self.totals[threading.get_ident()][name] += elapsed - nested
                if stack:
                    stack[-1] += elapsed
        return timed

    def reset(self) -> None:
        self.totals.clear()

    def parallel_times(self) -> dict[str, float]:
        """Each section's largest per-thread total."""
        out: dict[str, float] = defaultdict(float)
        for per_thread in self.totals.values():
            for name, t in per_thread.items():
                out[name] = max(out[name], t)
        return out


def instrument(model: Any, clock: Clock) -> None:
    """Time the sections of one CapsNet replica (instance attributes shadow the methods)."""
    pairs = [(model.conv1, ("forward_nhwc", "backward_nhwc"), "conv1"),
             (model.relu, ("forward", "backward"), "conv1"),
             (model.primary.conv, ("forward_nhwc", "backward_nhwc"), "fourier"),
             (model.primary, ("forward_nhwc", "backward_nhwc"), "primary capsules"),
             (model.digit, ("forward", "backward"), "routing"),
             (model.decoder, ("forward", "backward"), "decoder"),
             (model.length, ("forward", "backward"), "loss"),
             (model.mask, ("forward", "backward"), "loss")]
    for module, methods, name in pairs:
        for method in methods:
            setattr(module, method, clock.wrap(name, getattr(module, method)))


def measure(batch: int, threads: int, repeats: int, steps: int) -> dict[str, Any]:
    import numpy as np

    from capsnet import parallel
    from capsnet.models import CapsNet, CapsNetLoss
    from capsnet.optim import Adam
    from capsnet.replicas import Replicas

    rng = np.random.default_rng(0)
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    y = np.arange(batch) % 10
    setups: dict[str, dict[str, Any]] = {}
    for mode in ("one", "replicas", "blas"):
        clock = Clock()
        model, crit = CapsNet(seed=0), CapsNetLoss()
        opt = Adam(model.parameters(), lr=1e-3)
        runner = Replicas(model, threads) if mode == "replicas" else model
        if mode == "replicas":
            runner.predict(x)  # makes the copies, then every replica is instrumented
            runner._reduce = clock.wrap("reduction", runner._reduce)
        for replica in getattr(runner, "models", [model]):
            instrument(replica, clock)
        crit.forward = clock.wrap("loss", crit.forward)
        crit.backward = clock.wrap("loss", crit.backward)
        opt.step = clock.wrap("optimizer", opt.step)
        opt.zero_grad = clock.wrap("optimizer", opt.zero_grad)

        def step(runner=runner, crit=crit, opt=opt) -> None:
            lengths, recon = runner(x, y)
            crit(lengths, recon, y, x)
            runner.backward(*crit.backward())
            opt.step()
            opt.zero_grad()
        setups[mode] = {"step": step, "clock": clock, "blas": 1 if mode == "one" else threads,
                        "samples": []}
    for _ in range(repeats + 1):  # the first round warms up
        for mode, setup in setups.items():
            with parallel.blas_limit(setup["blas"]):
                setup["clock"].reset()
                start = time.perf_counter()
                for _ in range(steps):
                    setup["step"]()
                wall = (time.perf_counter() - start) / steps
            sections = {k: v / steps for k, v in setup["clock"].parallel_times().items()}
            sections["other"] = max(0.0, wall - sum(sections.values()))
            setup["samples"].append({"step": wall, **sections})
    result: dict[str, Any] = {"batch": batch, "threads": threads, "repeats": repeats, "steps_per_repeat": steps}
    for mode, setup in setups.items():
        kept = setup["samples"][1:]
        result[mode] = {name: 1e3 * statistics.median(s.get(name, 0.0) for s in kept)
                        for name in ("step", *SECTIONS)}
    return result


def fractions(result: dict[str, Any], mode: str) -> dict[str, float | None]:
    t = result["threads"]
    out: dict[str, float | None] = {}
    for name in SECTIONS:
        t1, tt = result["one"][name], result[mode][name]
        if name == "reduction":  # no such work on one thread: all of it is overhead of the split
            out[name] = 0.0
        elif t1 < 1e-3:
            out[name] = None
        else:
            out[name] = min(1.0, max(0.0, (1 - tt / t1) / (1 - 1 / t)))
    return out


def model_speedups(result: dict[str, Any], mode: str) -> dict[str, float]:
    """Predicted speed-up over one thread on n cores, per n in CORES."""
    b = result["batch"]
    p = fractions(result, mode)
    one = result["one"]
    t1_total = sum(one[name] for name in SECTIONS)
    extra_reduction = result[mode]["reduction"]  # per extra replica, at T threads
    out = {}
    for n in CORES:
        total = 0.0
        for name in SECTIONS:
            if name == "reduction":
                # one pass per extra replica, shared by the n threads: the T-thread figure scaled
                total += 0.0 if n == 1 else extra_reduction * (n - 1) / (result["threads"] - 1) * result["threads"] / n
                continue
            frac = p[name] or 0.0
            total += one[name] * ((1 - frac) + frac * math.ceil(b / n) / b)
        out[str(n)] = t1_total / total
    return out


def table(report: dict[str, Any]) -> str:
    lines = []
    for result in report["results"]:
        t, b = result["threads"], result["batch"]
        lines.append(f"Batch {b}, training step, ms (median of {result['repeats']}); p = parallel fraction "
                     f"from 1 to {t} threads:\n")
        lines.append(f"| section | 1 thread | {t} replicas | p (replicas) | BLAS on {t} threads | p (BLAS only) |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        pr, pb = fractions(result, "replicas"), fractions(result, "blas")
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        for name in SECTIONS:
            lines.append(f"| {name} | {result['one'][name]:.1f} | {result['replicas'][name]:.1f} | {fmt(pr[name])} "
                         f"| {result['blas'][name]:.1f} | {fmt(pb[name])} |")
        lines.append(f"| **step** | **{result['one']['step']:.1f}** | **{result['replicas']['step']:.1f}** | "
                     f"x{result['one']['step'] / result['replicas']['step']:.2f} | **{result['blas']['step']:.1f}** | "
                     f"x{result['one']['step'] / result['blas']['step']:.2f} |")
        lines.append("")
        mr, mb = model_speedups(result, "replicas"), model_speedups(result, "blas")
        lines.append(f"Modelled speed-up over one thread, batch {b}:\n")
        lines.append("| cores | " + " | ".join(str(n) for n in CORES) + " |")
        lines.append("| --- |" + " ---: |" * len(CORES))
        lines.append("| replicas | " + " | ".join(f"{mr[str(n)]:.2f}" for n in CORES) + " |")
        lines.append("| BLAS threads only | " + " | ".join(f"{mb[str(n)]:.2f}" for n in CORES) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/scaling_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 32])
    p.add_argument("--threads", type=int, default=2, help="threads of the parallel configurations (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each configuration (median)")
    p.add_argument("--steps", type=int, default=2, help="training steps per repeat")
    p.add_argument("--json", default=None, help="write the measurements and the model here")
    p.add_argument("--table", metavar="JSON", default=None, help="print the markdown tables of a written JSON")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.threads < 2:
        p.error("--threads must be at least 2")
    report: dict[str, Any] = {"machine": machine_info(args.threads),
                              "load_average_at_start": list(os.getloadavg()), "cpus": os.cpu_count(),
                              "results": []}
    for b in args.batch_sizes:
        print(f"batch {b} ...", flush=True)
        result = measure(b, args.threads, args.repeats, args.steps)
        result["fractions"] = {mode: fractions(result, mode) for mode in ("replicas", "blas")}
        result["model"] = {mode: model_speedups(result, mode) for mode in ("replicas", "blas")}
        report["results"].append(result)
    report["load_average_at_end"] = list(os.getloadavg())
    print(table(report))
    print(f"load average at start {report['load_average_at_start'][0]:.2f}, at end {report['load_average_at_end'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
