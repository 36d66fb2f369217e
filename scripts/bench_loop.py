"""The training loop's own cost at two revisions: does the loop's machinery slow a step?

A model so small that its step costs little (a 784 -> 10 linear layer and a sigmoid,
batches of 10 on 2,000 images of the packaged MNIST sample) trains through
``capsnet.training.Trainer`` for ``--epochs`` epochs with a host read every step
(``log_every=1``, the loop's worst case) and with the defaults of each revision (progress
bars off, one log line per epoch: none is printed here). What is timed is the epoch's
``train_seconds`` per step, so it holds the loop, the step and the reads, not evaluation.
The two revisions (``--before``, ``--after``: git revisions, exported as bench_compare.py
does) run in turn, ``--rounds`` times, alternating; each figure is the median over rounds
of the median over epochs.

Usage: python scripts/bench_loop.py --before 0a448cf [--after HEAD] [--rounds 5] [--epochs 5]
       [--json scripts/results/loop-overhead.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compare import export  # noqa: E402
from benchlib import machine_info  # noqa: E402

CHILD = """
import json, statistics, sys, tempfile
sys.path.insert(0, {tree!r})
import numpy as np
from capsnet import parallel
from capsnet.data import ArrayDataset, load_mnist_sample, to_float
from capsnet.layers import Flatten, Linear, MarginLoss, Sequential, Sigmoid
from capsnet.optim import Adam
from capsnet.training import Trainer

data = load_mnist_sample()
x, y = to_float(data.train_images[:2000]), data.train_labels[:2000]
model = Sequential(Flatten(), Linear(784, 10, seed=0), Sigmoid())
with parallel.threads(1), tempfile.TemporaryDirectory() as run:
    history = Trainer(model, MarginLoss(), Adam(model.parameters()), ArrayDataset(x, y), run, epochs={epochs},
                      batch_size=10, log_every=1, progress=False, log=False).fit()
steps = 2000 // 10
print(json.dumps([r["train_seconds"] / steps for r in history]))
"""


def measure(tree: Path, epochs: int) -> float:
    """Median seconds per step over the epochs of one run in ``tree``."""
    out = subprocess.run([sys.executable, "-c", CHILD.format(tree=str(tree), epochs=epochs)], capture_output=True,
                         text=True, check=True)
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_loop.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision measured as the reference")
    p.add_argument("--after", default="HEAD", help="git revision measured against it (default HEAD)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of 200 steps per run (default 5)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {name: Path(tmp) / name for name in ("before", "after")}
        commits = {name: export(rev, trees[name]) for name, rev in (("before", args.before), ("after", args.after))}
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(args.rounds):
            for name in ("before", "after"):
                times[name].append(measure(trees[name], args.epochs))
                print(f"round {r + 1}: {name} {times[name][-1] * 1e6:.0f} us/step", flush=True)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"before {args.before} ({commits['before'][:7]}): {before * 1e6:.0f} us/step")
    print(f"after  {args.after} ({commits['after'][:7]}): {after * 1e6:.0f} us/step")
    print(f"after / before: {after / before:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(1), "before": commits["before"], "after": commits["after"], "rounds": args.rounds,
                                         "epochs": args.epochs, "seconds_per_step": times,
                                         "median_before": before, "median_after": after,
                                         "ratio": after / before}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
