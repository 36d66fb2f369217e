"""One training epoch on the MNIST sample as a user runs it: one process against
``mpiexec -n 2``, with no thread variable set (each rank sets its own BLAS threads now),
side by side in alternating rounds; the median epoch time of each.

``--before DIR`` adds a third command, ``mpiexec -n 2`` of the capsnet checkout in DIR (an
older commit, e.g. /work/main before the ranks set their BLAS threads), to show what the
change buys. The epoch's seconds are read from each run's metrics.jsonl (``epoch_seconds``:
the training steps, without evaluation or start-up).

Usage: python scripts/bench_mpi_epoch.py [--rounds 2] [--before /work/main]
       [--json scripts/results/bench-mpi-epoch-2core.json] [-- extra capsnet.train flags]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import machine_info

REPO = Path(__file__).resolve().parents[1]
# the command (issue 32): the sample, a smaller CapsNet
TRAIN = ["--dataset", "mnist-sample", "--epochs", "1", "--conv-channels", "64", "--primary-types", "8",
         "--no-progress"]


def epoch(checkout: Path, ranks: int, extra: list[str]) -> tuple[float, str]:
    """(epoch seconds, the first line printed) of one run of checkout's capsnet.train."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                              "MKL_NUM_THREADS", "PMI_SIZE")}
    env["PYTHONPATH"] = str(checkout)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "capsnet.train", *TRAIN, *extra, "--out", str(Path(tmp) / "run")]
        if ranks > 1:
            cmd = ["mpiexec", "-n", str(ranks), *cmd]
        done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        record = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        return float(record["epoch_seconds"]), done.stdout.splitlines()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before", type=Path, help="a capsnet checkout to time under mpiexec -n 2 as well")
    p.add_argument("--json", type=Path)
    p.add_argument("extra", nargs="*", help="more capsnet.train flags (after --)")
    args = p.parse_args()
    runs = {"one process": (REPO, 1), "mpiexec -n 2": (REPO, 2)}
    if args.before:
        runs["mpiexec -n 2, before"] = (args.before.resolve(), 2)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    first_lines: dict[str, str] = {}
    info = machine_info(None)  # each run sets its own threads: the ranks their share
    for r in range(args.rounds):  # alternating, so that a change in the machine's load hits every command
        for name, (checkout, ranks) in runs.items():
            s, first_lines[name] = epoch(checkout, ranks, args.extra)
            seconds[name].append(s)
            print(f"round {r + 1}: {name}: {s:.1f} s", flush=True)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    one = medians["one process"]
    for name, m in medians.items():
        print(f"{name}: median {m:.1f} s per epoch ({one / m:.2f}x one process's speed); first line: "
              f"{first_lines[name]}")
    result = {"command": ["python", "-m", "capsnet.train", *TRAIN, *args.extra], "machine": info,
              "rounds": args.rounds, "epoch_seconds": seconds, "median_epoch_seconds": medians,
              "speed_vs_one_process": {name: one / m for name, m in medians.items()}, "first_lines": first_lines,
              "load_average_at_end": os.getloadavg()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
