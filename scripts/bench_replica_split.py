"""Where a network's training batch should be split across replicas: one training step (or,
with ``--mode infer``, one prediction) of a batch run as one replica with BLAS on every core,
against the same batch split into one replica per thread (capsnet.replicas) and, with
``--processes``, into one replica per process (capsnet.processes), in alternating rounds.

This is the measurement behind a model's ``min_train_slice`` (the smallest slice a training
batch is split into): Efficient-CapsNet's 16 (batch 32 trains as two replicas of 16) and the
library's default of 32 (scripts/bench_compare.py, the paper's CapsNet).

    PYTHONPATH=$PWD python scripts/bench_replica_split.py --network efficient --batch-sizes 16 32
    PYTHONPATH=$PWD python scripts/bench_replica_split.py --network capsnet --batch-sizes 32 64 --json split.json

Run it on a quiet machine: each figure is the median over rounds, and the ratio is
split / whole speed (above 1: splitting is faster).

    PYTHONPATH=$PWD python scripts/bench_replica_split.py --network em --mode infer --processes --batch-sizes 16 32 100
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def build(network: str, min_slice: int, threads: int, batch: int, seed: int, kind: str = "threads",
          mode: str = "train") -> benchlib.Timed:
    """A Timed training step (``mode`` "train") or prediction ("infer") of ``network`` through
    Replicas (``kind`` "threads") or ProcessReplicas ("processes") with ``min_train_slice =
    min_slice`` (its ``runner`` attribute: the replicas)."""
    from capsnet.layers import MarginLoss, SpreadLoss
    from capsnet.models import CapsNet, EfficientCapsNet, MatrixCapsNet
    from capsnet.optim import Adam
    from capsnet.processes import ProcessReplicas
    from capsnet.replicas import Replicas

    model = {"efficient": EfficientCapsNet, "capsnet": CapsNet, "em": MatrixCapsNet}[network](dtype="float32", seed=0)
    model.min_train_slice = min_slice
    runner = (ProcessReplicas if kind == "processes" else Replicas)(model, threads)
    optimizer, criterion = Adam(model.parameters(), lr=1e-4), MarginLoss()
    spread = SpreadLoss(0.9)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch)

    def step() -> None:
        if network == "em":
            spread(runner(x), y)
            runner.backward(spread.backward())
        else:
            lengths, recon = runner(x, y)
            criterion(lengths, y)
            runner.backward(criterion.backward(), (recon - x) * 1e-3)
        optimizer.step()
        optimizer.zero_grad()
    runner.train(mode == "train")
    timed = benchlib.Timed(step if mode == "train" else (lambda: runner.predict(x)))
    timed.runner = runner
    return timed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", choices=("efficient", "capsnet", "em"), default="efficient")
    p.add_argument("--mode", choices=("train", "infer"), default="train",
                   help="a training step (default) or a prediction")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="replicas when split, BLAS threads when whole (default: usable CPUs)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; each figure is their median")
    p.add_argument("--min-round-time", type=float, default=0.5, help="seconds per round of the slower setting")
    p.add_argument("--processes", action="store_true",
                   help="also time the split batch on replica processes (capsnet.processes) instead of threads")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    if args.threads < 2:
        p.error(f"--threads must be at least 2 to split a batch, got {args.threads}")

    rows: list[dict[str, Any]] = []
    print(benchlib.machine_heading(benchlib.machine_info(args.threads), args.threads))
    print(f"{args.network}: {'one training step' if args.mode == 'train' else 'one prediction'}, one replica (BLAS on {args.threads} threads) against "
          f"{args.threads} replicas (BLAS on one thread each)")
    for batch in args.batch_sizes:
        impls = {"whole": build(args.network, batch + 1, args.threads if args.mode == "train" else 1, batch, 1,
                                mode=args.mode),
                 "split": build(args.network, 1, args.threads, batch, 1, mode=args.mode)}
        if args.processes:
            impls["processes"] = build(args.network, 1, args.threads, batch, 1, kind="processes", mode=args.mode)
        timed = benchlib.alternate(impls, args.rounds, warmup=3, min_round_time=args.min_round_time)
        for impl in impls.values():
            close = getattr(impl.runner, "close", None)
            if close is not None:
                close()
        whole, split = timed["whole"]["seconds"], timed["split"]["seconds"]
        row = {"batch": batch, "whole_ms": whole * 1e3, "split_ms": split * 1e3, "split_speedup": whole / split,
               "rounds": {k: timed[k]["rounds"] for k in impls}}
        line = (f"batch {batch:4d}: whole {whole * 1e3:8.2f} ms, split {split * 1e3:8.2f} ms, "
                f"split / whole speed {whole / split:.3f}")
        if args.processes:
            procs = timed["processes"]["seconds"]
            row |= {"processes_ms": procs * 1e3, "processes_speedup": whole / procs,
                    "processes_over_threads": split / procs}
            line += f"; processes {procs * 1e3:8.2f} ms, {whole / procs:.3f}x whole, {split / procs:.3f}x threads"
        rows.append(row)
        print(line, flush=True)
    if args.json:
        benchlib.write_json(args.json, {"machine": benchlib.machine_info(args.threads), "settings": vars(args) | {
            "json": str(args.json)}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
