"""Thread scaling of capsnet and PyTorch side by side: scripts/bench.py at several thread counts.

Runs ``bench.py --threads T`` for each T of ``--threads``, ``--rounds`` times, alternating
the thread counts within each round so the machine's drift falls on all of them alike.
Each figure is the median over the rounds of bench.py's own medians (images/s), for
capsnet and PyTorch 2.x in the same run; the speed-up is each framework's own rate at T
threads over its rate at the first thread count.

Usage: python scripts/bench_threads.py [--threads 1 2] [--rounds 2] [--batch-sizes 32 100]
       [--json scripts/results/bench-threads.json]
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

SCRIPTS = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_threads.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 100])
    p.add_argument("--repeats", type=int, default=5, help="bench.py --repeats")
    p.add_argument("--no-torch", action="store_true", help="bench.py --no-torch")
    p.add_argument("--json", default=None, help="write the rounds and the medians here")
    args = p.parse_args(argv)
    runs: dict[int, list] = {t: [] for t in args.threads}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for t in args.threads:
                out = Path(tmp) / f"t{t}-{r}.json"
                cmd = [sys.executable, str(SCRIPTS / "bench.py"), "--threads", str(t), "--json", str(out),
                       "--repeats", str(args.repeats), "--batch-sizes", *map(str, args.batch_sizes),
                       "--gemm-repeats", "1"]
                if args.no_torch:
                    cmd.append("--no-torch")
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1}/{args.rounds}: {t} thread(s), load {loads[-1]:.2f} ...", flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                runs[t].append(json.loads(out.read_text()))
    frameworks = ("ours",) if args.no_torch else ("ours", "torch")
    table = []
    first = args.threads[0]
    for batch in args.batch_sizes:
        for mode in ("train", "infer"):
            row = {"batch": batch, "mode": mode}
            for fw in frameworks:
                for t in args.threads:
                    values = [next(x for x in rep["results"] if x["batch"] == batch)[fw][mode]["images_per_s"]
                              for rep in runs[t]]
                    row[f"{fw}_{t}"] = statistics.median(values)
            for t in args.threads:
                for fw in frameworks:
                    row[f"{fw}_speedup_{t}"] = row[f"{fw}_{t}"] / row[f"{fw}_{first}"]
                if not args.no_torch:
                    row[f"ratio_{t}"] = row[f"ours_{t}"] / row[f"torch_{t}"]
            table.append(row)
    print(f"\nimages/s, median of {args.rounds} rounds (capsnet / PyTorch, ratio); speed-up over {first} thread(s)")
    for row in table:
        cells = []
        for t in args.threads:
            if args.no_torch:
                cells.append(f"{t}t: {row[f'ours_{t}']:7.1f} (x{row[f'ours_speedup_{t}']:.2f})")
            else:
                cells.append(f"{t}t: {row[f'ours_{t}']:7.1f} / {row[f'torch_{t}']:6.1f} ({row[f'ratio_{t}']:.2f}x; "
                             f"speed-up {row[f'ours_speedup_{t}']:.2f} / {row[f'torch_speedup_{t}']:.2f})")
        print(f"b{row['batch']:<4} {row['mode']:<5} " + "  ".join(cells))
    print(f"1-minute load before each bench.py run: {', '.join(f'{x:.2f}' for x in loads)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(args.threads), "threads": args.threads, "rounds": args.rounds, "loads": loads,
                                               "table": table, "runs": {str(t): v for t, v in runs.items()}},
                                              indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
