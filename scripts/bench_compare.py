"""This library at two revisions side by side: did a change slow training or inference?

Exports ``--before`` (a git revision) and the working tree's HEAD (or ``--after``) into
temporary folders and runs ``scripts/bench.py --no-torch`` on each in turn, ``--rounds``
times, alternating, so that the machine's drift from minute to minute falls on both
alike. Each figure is the median over the rounds of bench.py's own medians.

Each tree's bench.py runs with that tree first on PYTHONPATH (checked before timing: an
installed or editable capsnet would otherwise be measured twice; compare-*.json files written
before 0.5.2 may have measured one tree against itself).

Usage: python scripts/bench_compare.py --before 84771ba [--rounds 2] [--batch-sizes 1 32 100]
       [--network efficient] [--json scripts/results/compare.json]
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


def export(rev: str, into: Path) -> str:
    """The tree of ``rev`` written into ``into``; returns the full commit id."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True, check=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True)
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit.stdout.strip()


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a bench.py run in ``tree``: the tree first on PYTHONPATH, so that
    ``import capsnet`` loads the tree's package, not an installed or editable one (bench.py
    itself puts only scripts/ on sys.path)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH", "")]))}


def check_imports_from(tree: Path) -> None:
    """Refuse to measure when ``import capsnet`` in ``tree``'s environment loads another copy."""
    found = subprocess.run([sys.executable, "-c", "import capsnet; print(capsnet.__file__)"], cwd=tree,
                           env=tree_env(tree), capture_output=True, text=True)
    where = Path(found.stdout.strip() or ".").resolve()
    if found.returncode != 0 or tree.resolve() not in where.parents:
        raise SystemExit(f"bench_compare.py: import capsnet in the exported tree {tree} loads "
                         f"{found.stdout.strip() or found.stderr.strip()[-300:]!r}, not the tree's own package")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision measured as the reference")
    p.add_argument("--after", default="HEAD", help="git revision measured against it (default HEAD)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 100])
    p.add_argument("--network", default="mnist", help="bench.py --network (default mnist: the paper's CapsNet)")
    p.add_argument("--repeats", type=int, default=5, help="bench.py --repeats")
    p.add_argument("--data-dir", default=None, help="bench.py --data-dir")
    p.add_argument("--json", default=None, help="write the rounds and the medians here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for label, rev in (("before", args.before), ("after", args.after)):
            trees[label] = (Path(tmp) / label, export(rev, Path(tmp) / label))
            check_imports_from(trees[label][0])
        runs: dict[str, list] = {"before": [], "after": []}
        for r in range(args.rounds):
            for label, (tree, _) in trees.items():
                out = Path(tmp) / f"{label}-{r}.json"
                cmd = [sys.executable, "scripts/bench.py", "--no-torch", "--json", str(out), "--repeats",
                       str(args.repeats), "--network", args.network, "--batch-sizes", *map(str, args.batch_sizes)]
                if args.data_dir:
                    cmd += ["--data-dir", args.data_dir]
                print(f"round {r + 1}/{args.rounds}: {label} ({trees[label][1][:10]}) ...", flush=True)
                subprocess.run(cmd, cwd=tree, env=tree_env(tree), check=True, stdout=subprocess.DEVNULL)
                runs[label].append(json.loads(out.read_text()))
    table = []
    print(f"\nmedian of {args.rounds} rounds, images/s (after / before)")
    print(f"{'batch':>5}  {'mode':<9} {'before':>8} {'after':>8} {'ratio':>6}")
    for batch in args.batch_sizes:
        for mode in ("train", "infer"):
            med = {}
            for label, reports in runs.items():
                values = [next(x for x in rep["results"] if x["batch"] == batch)["ours"][mode]["images_per_s"]
                          for rep in reports]
                med[label] = statistics.median(values)
            ratio = med["after"] / med["before"]
            table.append({"batch": batch, "mode": mode, **med, "ratio": ratio})
            print(f"{batch:>5}  {mode:<9} {med['before']:>8.1f} {med['after']:>8.1f} {ratio:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(None), "network": args.network,
                                               "before": trees["before"][1], "after": trees["after"][1],
                                               "rounds": args.rounds, "table": table, "runs": runs}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
