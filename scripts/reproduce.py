"""Run one of the named experiments (the paper's accuracy and the others) to its end, resumable,
and keep its committed record, docs/results/NAME.jsonl, one line per finished epoch.

    PYTHONPATH=$PWD python scripts/reproduce.py --help          # the experiments, setups and costs
    PYTHONPATH=$PWD python scripts/reproduce.py mnist-capsnet   # start, or continue where it stood
    PYTHONPATH=$PWD python scripts/reproduce.py mnist-capsnet --sync-record   # rebuild the record only
    PYTHONPATH=$PWD python scripts/reproduce.py mnist-capsnet --restart       # a new run, a new record

Each experiment is ``python -m capsnet.train`` with fixed flags (scripts/results_records.py,
EXPERIMENTS), run in-process with one more extension: as each epoch ends it adds the run's id,
the commit and the CPU model to the epoch's line of the run folder's metrics.jsonl, then
rewrites the record from that file. The run folder lives outside the work tree (default
~/capsnet-runs/NAME; --runs-dir or $CAPSNET_RUNS_DIR), so replacing the checkout loses nothing:
--sync-record writes the record again from it. The same command continues a stopped run
(Ctrl-C saves the state between two steps); --restart moves the old run folder aside
(NAME.RUN_ID) and the old record to docs/results/archive/, and starts a new run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import results_records as rr  # scripts/ is on the path: the script's own folder

from capsnet.training import Extension


class RecordEpochs(Extension):
    """Adds the run's id, the commit and the machine to each epoch's metrics line (``observe``:
    before the metrics log writes it), then rewrites the committed record from metrics.jsonl
    (``epoch_end``: after the checkpoint's write, so the record never runs ahead of what a
    resume continues from)."""

    priority = -30  # after the metrics log (300) and the checkpoint (-20)
    writer_only = True

    def __init__(self, run_dir: Path, record: Path, run_id: str):
        self.run_dir, self.record = run_dir, record
        self.environment = rr.environment(run_id)

    def observe(self, trainer: Any, record: dict[str, Any]) -> None:
        record.update(self.environment)

    def epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        rr.sync_record(self.run_dir, self.record)


def describe() -> str:
    parts = []
    for exp in rr.EXPERIMENTS.values():
        hours, source = rr.estimated_hours(exp)
        cost = f"about {hours:.1f} h of training on this 2-core CPU, evaluation aside ({source})" if hours else source
        figures = "; ".join(f"{who} {value}% ({src})" for who, fig in (("paper", exp.paper), ("port", exp.port))
                            if fig for value, src in [fig])
        parts.append(f"{exp.name}: {exp.title}.\n    {exp.setup}.\n    cost: {cost}.\n"
                     + (f"    reference: {figures}.\n" if figures else "")
                     + (f"    target: >= {exp.target}% test accuracy.\n" if exp.target else "")
                     + f"    runs: python -m capsnet.train {' '.join(exp.args)}")
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/reproduce.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one named experiment to its end, resumable from the same command, and keep its "
                    "committed record docs/results/NAME.jsonl (one line per finished epoch: test accuracy and "
                    "error, seconds, cumulative wall seconds, images/s, commit, CPU model, threads, run id). "
                    "Commit the record as it grows.",
        epilog="experiments:\n" + describe() + "\n\nexamples:\n"
               "  PYTHONPATH=$PWD python scripts/reproduce.py mnist-capsnet            # start or continue\n"
               "  PYTHONPATH=$PWD python scripts/reproduce.py mnist-capsnet --sync-record\n"
               "  PYTHONPATH=$PWD python scripts/reproduce.py mnist-efficient --dataset mnist-sample --epochs 1 "
               "--runs-dir /tmp/smoke --results /tmp/smoke/results   # a smoke run")
    p.add_argument("name", choices=tuple(rr.EXPERIMENTS), metavar="NAME",
                   help="the experiment: " + ", ".join(rr.EXPERIMENTS))
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where run folders live (NAME inside; default $CAPSNET_RUNS_DIR, else ~/capsnet-runs)")
    p.add_argument("--results", type=Path, default=rr.RESULTS,
                   help="where records are written (default docs/results of this checkout)")
    p.add_argument("--sync-record", action="store_true",
                   help="only write the record again from the run folder's metrics.jsonl, no training")
    p.add_argument("--restart", action="store_true",
                   help="start a new run: the old run folder is moved to NAME.RUN_ID, the old record to "
                        "RESULTS/archive/NAME.RUN_ID.jsonl")
    g = p.add_argument_group("smoke runs (never for a record that counts: the record names the changes)")
    g.add_argument("--dataset", help="another --dataset (mnist-sample for a run with no download)")
    g.add_argument("--epochs", type=int, help="fewer or more epochs than the experiment's")
    g.add_argument("--train-limit", type=int, help="only the first N training images")
    g.add_argument("--test-limit", type=int, help="only the first N test images")
    g.add_argument("--data-dir", help="the MNIST files (default $CAPSNET_DATA_DIR)")
    return p


def train_args(exp: rr.Experiment, args: argparse.Namespace) -> list[str]:
    """The experiment's flags with the smoke-run overrides in place."""
    out = list(exp.args)
    for flag in ("--dataset", "--epochs", "--train-limit", "--test-limit", "--data-dir"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("dataset", "epochs", "train_limit", "test_limit")
            if getattr(args, k) is not None}


def run_dir_of(args: argparse.Namespace) -> Path:
    root = args.runs_dir or Path(os.environ.get("CAPSNET_RUNS_DIR") or Path.home() / "capsnet-runs")
    return root.expanduser().resolve() / args.name


def restart(run_dir: Path, record: Path) -> None:
    """Move the old run folder and the old record aside, named by the old run's id."""
    if run_dir.exists():
        old = json.loads((run_dir / rr.RUN_FILE).read_text())["run_id"] if (run_dir / rr.RUN_FILE).exists() \
            else time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.{old}"))
        print(f"the old run folder is now {run_dir.with_name(f'{run_dir.name}.{old}')}")
    if record.exists():
        lines = rr.read_jsonl(record)
        old = lines[0]["run_id"] if lines else "empty"
        archived = record.parent / "archive" / f"{record.stem}.{old}.jsonl"
        archived.parent.mkdir(parents=True, exist_ok=True)
        record.rename(archived)
        print(f"the old record is now {archived}")


def after_training(exp: rr.Experiment, args: argparse.Namespace, run_dir: Path) -> int:
    """The experiment's command after training (once: skipped when its output exists), its
    output copied beside the record. A smoke run's --test-limit and --data-dir apply to it too."""
    command = [sys.executable if part == "python" else part.replace("{run}", str(run_dir)) for part in exp.after]
    if args.test_limit is not None and "--test-limit" in command:
        command[command.index("--test-limit") + 1] = str(args.test_limit)
    if args.data_dir is not None:
        command += ["--data-dir", args.data_dir]
    output = run_dir / exp.after_output
    if not output.exists():
        print(f"then: {shlex.join(command)}", flush=True)
        status = subprocess.run(command, check=False).returncode
        if status != 0:
            return status
    copy = args.results / f"{exp.name}-{output.name}"
    copy.write_text(output.read_text())
    print(f"{copy}: from {output}; commit it with the record")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exp = rr.experiment(args.name)
    run_dir = run_dir_of(args)
    record = args.results / f"{exp.name}.jsonl"
    if args.sync_record:
        lines = rr.sync_record(run_dir, record)
        print(f"{record}: {len(lines)} epoch(s) of run {lines[0]['run_id'] if lines else '-'} from {run_dir}")
        return 0
    if args.restart:
        restart(run_dir, record)
    resume = (run_dir / "checkpoint.npz").exists()
    if resume:
        info = rr.run_info(run_dir)
        if info.get("overrides", {}) != overrides(args):
            raise SystemExit(f"{run_dir} holds a run with the overrides {info.get('overrides', {})}; this command "
                             f"gives {overrides(args)}: repeat the run's own command, or pass --restart")
    else:
        if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / rr.RUN_FILE).exists():
            raise SystemExit(f"{run_dir} holds files but no run of scripts/reproduce.py: choose another --runs-dir")
        if record.exists() and rr.read_jsonl(record):
            raise SystemExit(f"{record} holds the record of an earlier run, whose run folder {run_dir} has no "
                             "checkpoint: pass --restart to archive that record and start a new run")
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {"experiment": exp.name, "run_id": rr.new_run_id(), "overrides": overrides(args),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (run_dir / rr.RUN_FILE).write_text(json.dumps(info, indent=1) + "\n")
    command = ["python", "-m", "capsnet.train", *train_args(exp, args), "--out", str(run_dir), "--no-progress"]
    command += ["--resume"] if resume else []
    print(f"{'continuing' if resume else 'starting'} {exp.name} run {info['run_id']}: {shlex.join(command)}",
          flush=True)
    from capsnet.train import main as train_main  # noqa: PLC0415 - after the checks above

    status = train_main(command[3:], extensions=(RecordEpochs(run_dir, record, info["run_id"]),))
    if status != 0:
        return status
    lines = rr.sync_record(run_dir, record)
    shown = record.relative_to(rr.REPO) if record.is_relative_to(rr.REPO) else record
    print(f"{record}: {len(lines)} epoch(s); commit it (git add {shown})")
    epochs = int(train_args(exp, args)[train_args(exp, args).index("--epochs") + 1])
    if exp.after and lines and lines[-1]["epoch"] == epochs:
        return after_training(exp, args, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
