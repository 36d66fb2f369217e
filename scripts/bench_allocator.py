"""What capsnet's host-allocator setting (capsnet.allocator) is worth: the same step with
glibc's defaults (CAPSNET_MALLOC=system) and with the thresholds ``import capsnet`` sets.

For each network, batch size and mode (a training step: forward, backward, Adam; or a
prediction), two fresh processes per round, one per setting, in alternating order; each
warms up, then times ``--steps`` steps through ``capsnet.replicas.replicate`` (as the
training loop runs them) and counts the minor page faults per step. Each figure is the
median over the rounds. Run it on a quiet machine:

    PYTHONPATH=$PWD python scripts/bench_allocator.py --rounds 3
    PYTHONPATH=$PWD python scripts/bench_allocator.py --cases em:1:infer efficient:32:train

The JSON (default scripts/results/allocator-<cores>core.json) records the machine
(scripts/benchlib.py), each process's allocator state and its peak resident memory
(ru_maxrss: the whole process, model and data included).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import machine_heading, machine_info, markdown_table, run_child, thread_env, write_json

SCRIPTS = Path(__file__).resolve().parent
NETWORKS = ("capsnet", "efficient", "em")
MODES = ("train", "infer")
DEFAULT_CASES = ("em:1:infer", "em:1:train", "em:32:infer", "em:32:train", "efficient:1:infer", "efficient:32:train",
                 "efficient:32:infer", "capsnet:1:infer", "capsnet:32:train")
SETTINGS = ("system", "tuned")


def parse_case(text: str) -> tuple[str, int, str]:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in NETWORKS or not parts[1].isdigit() or int(parts[1]) < 1 \
            or parts[2] not in MODES:
        raise argparse.ArgumentTypeError(f"a case is NETWORK:BATCH:MODE with NETWORK one of {NETWORKS}, BATCH a "
                                         f"positive integer and MODE one of {MODES}, e.g. em:32:train; got {text!r}")
    return parts[0], int(parts[1]), parts[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in DEFAULT_CASES],
                   metavar="NETWORK:BATCH:MODE", help=f"default: {' '.join(DEFAULT_CASES)}")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of fresh processes (median)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per process (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="JSON file (default scripts/results/allocator-<cores>core.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(spec: dict[str, Any], out: str) -> None:
    """One process: build the network, warm up, time ``steps`` steps, count page faults."""
    import resource
    import time

    import numpy as np

    from capsnet import allocator
    from capsnet.layers import SpreadLoss
    from capsnet.models import CapsNet, CapsNetLoss, EfficientCapsNet, MatrixCapsNet
    from capsnet.optim import Adam
    from capsnet.replicas import replicate

    net, size, mode = spec["network"], spec["batch"], spec["mode"]
    rng = np.random.default_rng(0)
    x = rng.random((size, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, size).astype(np.int64)
    model = {"capsnet": CapsNet, "efficient": EfficientCapsNet, "em": MatrixCapsNet}[net](dtype="float32", seed=0)
    runner = replicate(model)
    opt = Adam(model.parameters(), lr=1e-3)
    if net == "em":
        crit = SpreadLoss(0.5)

        def train() -> None:
            crit(runner(x), y)
            runner.backward(crit.backward())
            opt.step()
            opt.zero_grad()
    else:
        crit = CapsNetLoss()

        def train() -> None:
            lengths, recon = runner(x, y)
            crit(lengths, recon, y, x)
            runner.backward(*crit.backward())
            opt.step()
            opt.zero_grad()

    def infer() -> None:
        runner.predict(x)

    step = train if mode == "train" else infer
    for _ in range(3):
        step()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / spec["steps"]
    with open(out, "w") as f:
        json.dump({"step_s": statistics.median(times), "faults_per_step": faults, "allocator": allocator.state(),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "replicas": getattr(runner, "threads", 1)}, f)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        worker(spec, spec["out"])
        return 0
    for name, value in (("rounds", args.rounds), ("steps", args.steps), ("threads", args.threads)):
        if value < 1:
            raise SystemExit(f"bench_allocator: --{name} must be >= 1, got {value}")
    info = machine_info(args.threads)
    print(machine_heading(info, args.threads), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for net, size, mode in args.cases:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
            for r in range(args.rounds):
                for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                    out = os.path.join(tmp, f"{setting}.json")
                    spec = {"network": net, "batch": size, "mode": mode, "steps": args.steps, "out": out}
                    env = thread_env(args.threads, CAPSNET_MALLOC=setting)
                    got = run_child([sys.executable, __file__, "--worker", json.dumps(spec)], env, out)
                    if "error" in got:
                        raise SystemExit(f"bench_allocator: {net} batch {size} {mode} ({setting}) failed: "
                                         + "\n".join(got["stderr_tail"]))
                    runs[setting].append(got)
                    os.remove(out)
            row: dict[str, Any] = {"network": net, "batch": size, "mode": mode}
            for setting in SETTINGS:
                row[setting] = {"step_ms": 1e3 * statistics.median(g["step_s"] for g in runs[setting]),
                                "faults_per_step": statistics.median(g["faults_per_step"] for g in runs[setting]),
                                "peak_rss_mb": statistics.median(g["peak_rss_mb"] for g in runs[setting]),
                                "rounds_step_ms": [1e3 * g["step_s"] for g in runs[setting]],
                                "allocator": runs[setting][0]["allocator"], "replicas": runs[setting][0]["replicas"]}
            row["speedup"] = row["system"]["step_ms"] / row["tuned"]["step_ms"]
            results.append(row)
            print(f"{net} batch {size} {mode}: system {row['system']['step_ms']:.2f} ms "
                  f"({row['system']['faults_per_step']:.0f} faults/step), tuned {row['tuned']['step_ms']:.2f} ms "
                  f"({row['tuned']['faults_per_step']:.0f}): {row['speedup']:.2f}x", flush=True)
    table = markdown_table(
        ["network", "batch", "mode", "glibc defaults, ms", "faults/step", "capsnet's setting, ms", "faults/step",
         "speed-up", "peak RSS MB, defaults / capsnet's"],
        [[r["network"], r["batch"], r["mode"], f"{r['system']['step_ms']:.2f}", f"{r['system']['faults_per_step']:.0f}",
          f"{r['tuned']['step_ms']:.2f}", f"{r['tuned']['faults_per_step']:.0f}", f"{r['speedup']:.2f}x",
          f"{r['system']['peak_rss_mb']:.0f} / {r['tuned']['peak_rss_mb']:.0f}"]
         for r in results],
        right=[False, True, False, True, True, True, True, True, True])
    print(table)
    out = args.out or str(SCRIPTS / "results" / f"allocator-{info.get('cpu_count', 'n')}core.json")
    write_json(out, {"machine": info, "settings": {"rounds": args.rounds, "steps": args.steps,
                                                   "threads": args.threads}, "results": results, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
