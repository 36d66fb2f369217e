"""The named experiments of ``scripts/reproduce.py`` and their committed records
(``docs/results/NAME.jsonl``), shared by reproduce.py, results_table.py, results_figure.py and
time_to_accuracy.py.

A **record** is one JSON line per finished epoch of one run: the epoch, the test accuracy
and error, the epoch's seconds and the run's cumulative wall seconds, the training images
per second, the commit, the CPU model and the thread count, and the run's id. Every line
of a record file carries the same run id: a record is one run, resumed or not. It is a
projection of the run folder's ``metrics.jsonl`` (the run's own lines carry the run id, the
commit and the machine, added as each epoch ends), so it can always be rebuilt from the
run folder (:func:`sync_record`).

The figures of the paper and of the public ports stand in :data:`EXPERIMENTS`, each with
its source; every other number comes from a record.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
RUN_FILE = "reproduce.json"  # in the run folder: the experiment's name and the run's id


@dataclass(frozen=True)
class Experiment:
    """One named experiment: what it trains (``args`` of ``python -m capsnet.train``, all but
    ``--out``), the setup in words, the paper's and the best public port's figures with their
    sources, the target, and where its cost estimate comes from before a record exists."""

    name: str
    title: str
    setup: str
    args: tuple[str, ...]
    network: str  # the README table's row
    metric: str = "test_accuracy"  # what the record's accuracy is read from
    paper: tuple[float, str] | None = None  # (test accuracy %, source)
    port: tuple[float, str] | None = None
    target: float | None = None  # test accuracy % the issue asks for
    train_images: int = 60000
    rate_source: tuple[str, Any] = ("", None)  # (committed file, how to read images/s from it)
    rate_note: str = ""  # how far that benchmark's network is from this one
    # a command run once training is complete ({run}: the run folder; python: this interpreter), and the
    # file it writes there, copied beside the record as RESULTS/NAME-<file name>
    after: tuple[str, ...] = field(default=())
    after_output: str = ""

    @property
    def epochs(self) -> int:
        return int(self.args[self.args.index("--epochs") + 1])


def _bench_rate(batch: int):
    """images/s of training at ``batch`` in a scripts/bench.py JSON."""
    def read(data: Any) -> float:
        return next(r["ours"]["train"]["images_per_s"] for r in data["results"] if r["batch"] == batch)
    return read


def _epoch_rate(lines: list[dict[str, Any]]) -> float:
    return lines[0]["train_images_per_second"]


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment(
        "mnist-capsnet", "The paper's CapsNet on MNIST",
        "CapsNet (8.2M parameters), Adam lr 1e-3 decayed x0.9 per epoch, batch 100, shifts of up to 2 px, "
        "3 routing iterations, reconstruction 0.0005 x summed squared error, 30 epochs",
        ("--epochs", "30", "--batch-size", "100", "--lr", "1e-3", "--lr-decay", "0.9", "--max-shift", "2",
         "--routing", "3", "--recon-weight", "0.0005"),
        "CapsNet (Sabour et al. 2017)",
        paper=(99.75, "Sabour et al. 2017, Table 1: 0.25% test error; the authors' MNIST command, "
                      "research/capsules/README.md in tensorflow/models, trains 300,000 steps"),
        port=(99.66, "XifengGuo/CapsNet-Keras README: 99.66% after 30 epochs"), target=99.70,
        rate_source=("scripts/results/bench-cpu-2core.json", _bench_rate(100))),
    Experiment(
        "mnist-efficient", "Efficient-CapsNet on MNIST (Mazzia et al.'s setup)",
        "Efficient-CapsNet (161,824 parameters + decoder), Adam lr 5e-4 x 0.97^epoch with a floor of 5e-5, "
        "batch 16, reconstruction 0.392 x mean squared error (= 0.0005 x summed), augmentation: rotation of up "
        "to 30 degrees on half the images, shift within the margins, horizontal squish, 4x4 erase; best.npz "
        "is the best epoch on the test set, the authors' validation set; 150 epochs",
        ("--model", "efficient", "--epochs", "150", "--batch-size", "16", "--lr", "5e-4", "--lr-decay", "0.97",
         "--lr-min", "5e-5", "--augment", "efficient", "--recon-weight", "0.0005"),
        "Efficient-CapsNet (Mazzia et al. 2021)",
        paper=(99.74, "Mazzia et al. 2021: 0.26% test error for one model"),
        port=None, target=99.6,
        rate_source=("scripts/results/bench-efficient-cpu-2core.json", _bench_rate(32))),
    Experiment(
        "mnist-em", "Matrix capsules with EM routing on MNIST",
        "EM-routing network (A=64, B=8, C=D=16), Adam lr 0.01 decayed x0.96 per epoch, batch 128, "
        "2 EM iterations (the port's best at this size: 99.1% with 2, 97.5% with 3), spread loss, "
        "no augmentation, 30 epochs",
        ("--model", "em", "--epochs", "30", "--batch-size", "128", "--lr", "0.01", "--lr-decay", "0.96",
         "--max-shift", "0", "--routing", "2", "--conv-channels", "64", "--primary-types", "8",
         "--caps1", "16", "--caps2", "16"),
        "Matrix capsules, EM routing (Hinton et al. 2018)",
        paper=None, port=(99.1, "yl-1993/Matrix-Capsules-EM-PyTorch README: 99.1% after 30 epochs at A=64, B=8, "
                                "C=D=16 with 2 iterations (97.5% with 3; 99.3% at A=B=C=D=32)"), target=99.2,
        rate_source=("scripts/results/bench-em-cpu-2core.json", _bench_rate(100)),
        rate_note="a lower bound: the benchmark's EM network is the default, smaller one (A=32, C=D=8); the "
                  "record's first epoch gives the real rate"),
    Experiment(
        "mnist-cnn", "The paper's baseline CNN on MNIST",
        "Baseline CNN (35.4M parameters), Adam lr 1e-3 decayed x0.9 per epoch, batch 100, shifts of up to 2 px, "
        "dropout 0.5, 10 epochs (the budget of a 2-core CPU: about 35 minutes an epoch)",
        ("--model", "cnn", "--epochs", "10", "--batch-size", "100", "--lr", "1e-3", "--lr-decay", "0.9",
         "--max-shift", "2"),
        "Baseline CNN (Sabour et al. 2017)",
        paper=(99.61, "Sabour et al. 2017, Table 1: baseline 0.39% test error"), port=None,
        rate_source=("scripts/results/one-epoch-cnn-cpu-2core.jsonl", _epoch_rate)),
    Experiment(
        "multimnist", "The paper's CapsNet on MultiMNIST",
        "CapsNet on 36x36 pairs of overlapping digits (shifts of up to 4 px), the paper's setup otherwise; "
        "a pair is right when both digits are; 10 epochs of 60,000 fresh pairs (the paper: 60M pairs)",
        ("--dataset", "multimnist", "--epochs", "10", "--batch-size", "100", "--lr", "1e-3", "--lr-decay", "0.9"),
        "CapsNet on MultiMNIST", metric="test_accuracy",
        paper=(94.8, "Sabour et al. 2017, section 6: 5.2% error on pairs"), port=None,
        rate_source=("scripts/results/bench-multimnist-cpu-2core.json", _bench_rate(100))),
    Experiment(
        "affine-robustness", "Affine robustness: CapsNet trained on expanded MNIST, tested on affNIST-style digits",
        "CapsNet on expanded MNIST (digits placed at random on 40x40, shifts of up to 6 px), 20,000 training "
        "digits, 2,000 test digits, 5 epochs; then python -m capsnet.robustness on best.npz (rotation, scale "
        "and shear sweeps and the affNIST-style mixed set)",
        ("--dataset", "expanded", "--train-limit", "20000", "--test-limit", "2000", "--epochs", "5",
         "--batch-size", "100"),
        "CapsNet, expanded MNIST (40x40)",
        paper=(99.23, "Sabour et al. 2017, section 5.2: 99.23% on expanded MNIST test, 79% on affNIST"),
        port=None, train_images=20000,
        rate_source=("scripts/results/bench-multimnist-cpu-2core.json", _bench_rate(100)),
        rate_note="the 36x36 MultiMNIST CapsNet's benchmark, a proxy for 40x40",
        after=("python", "-m", "capsnet.robustness", "{run}/best.npz", "--test-limit", "1000", "--out",
               "{run}/robustness", "--no-progress"),
        after_output="robustness/robustness.json"),
)}


def experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise SystemExit(f"no experiment called {name!r}: choose one of {', '.join(EXPERIMENTS)}") from None


# -- the machine and the code ------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor() or "unknown")
    except OSError:
        return platform.processor() or "unknown"


def commit() -> str:
    """The checked-out commit of the capsnet that runs (the checkout its package was imported
    from, which may not be this script's), with "+dirty" when tracked files differ."""
    import capsnet  # noqa: PLC0415

    where = str(Path(capsnet.__file__).resolve().parents[1])
    head = subprocess.run(["git", "-C", where, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(run_id: str) -> dict[str, Any]:
    """What each epoch's line of the run folder's metrics.jsonl gets besides the loop's own entries."""
    return {"run_id": run_id, "commit": commit(), "cpu": cpu_model(), "cpus": os.cpu_count()}


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


# -- run folders and records -------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number} is not a JSON line ({exc}); fix or remove that line") from None
    return lines


def run_info(run_dir: Path) -> dict[str, Any]:
    """The run folder's reproduce.json: {"experiment", "run_id", "started"}."""
    path = run_dir / RUN_FILE
    if not path.exists():
        raise SystemExit(f"{run_dir} has no {RUN_FILE}: it was not started by scripts/reproduce.py")
    return json.loads(path.read_text())


def record_lines(run_dir: Path) -> list[dict[str, Any]]:
    """The record of the run in ``run_dir``, one dict per finished epoch, from its metrics.jsonl."""
    info = run_info(run_dir)
    wall = 0.0
    out = []
    for line in read_jsonl(run_dir / "metrics.jsonl"):
        wall += line.get("epoch_seconds", 0.0)
        if line.get("run_id", info["run_id"]) != info["run_id"]:
            raise SystemExit(f"{run_dir}/metrics.jsonl holds epoch {line.get('epoch')} of run {line['run_id']}, "
                             f"not of the folder's run {info['run_id']}: restart with --restart")
        accuracy = line.get("test_accuracy")
        error = line.get("test_error", None if accuracy is None else 1.0 - accuracy)
        out.append({
            "experiment": info["experiment"], "run_id": info["run_id"], "epoch": line["epoch"],
            "test_accuracy": accuracy, "test_error": error, "train_loss": line.get("train_loss"),
            "lr": line.get("lr"), "epoch_seconds": line.get("epoch_seconds"), "wall_seconds": wall,
            "images_per_second": line.get("train_images_per_second"), "commit": line.get("commit"),
            "cpu": line.get("cpu"), "threads": line.get("host_threads"), "processes": line.get("world_size"),
            **({"overrides": info["overrides"]} if info.get("overrides") else {}),
        })
    return out


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    """``lines`` to ``path``, atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)


def sync_record(run_dir: Path, record: Path) -> list[dict[str, Any]]:
    """Rewrite ``record`` from the run folder: the run's finished epochs, nothing else.
    A record of another run is refused (start over with --restart, which archives it)."""
    lines = record_lines(run_dir)
    old = read_jsonl(record)
    if old and lines and old[0]["run_id"] != lines[0]["run_id"]:
        raise SystemExit(f"{record} is the record of run {old[0]['run_id']}, but {run_dir} holds run "
                         f"{lines[0]['run_id']}: pass --restart to archive the old record and keep the new run's")
    write_jsonl(record, lines)
    return lines


def read_record(name: str, results: Path = RESULTS) -> list[dict[str, Any]]:
    """The committed record of experiment ``name`` (empty when none), checked to be one run."""
    lines = read_jsonl(results / f"{name}.jsonl")
    runs = {line["run_id"] for line in lines}
    if len(runs) > 1:
        raise SystemExit(f"{results / (name + '.jsonl')} mixes runs {sorted(runs)}: a record is one run; "
                         f"rebuild it with scripts/reproduce.py {name} --sync-record")
    return lines


def estimated_hours(exp: Experiment, results: Path = RESULTS) -> tuple[float | None, str]:
    """(hours of training for all epochs, where the rate comes from): the record's median
    images/s when there is one, else the committed benchmark named by the experiment."""
    lines = read_record(exp.name, results)
    rates = sorted(line["images_per_second"] for line in lines if line.get("images_per_second"))
    if rates:
        rate, source = rates[len(rates) // 2], f"the record's median, {rates[len(rates) // 2]:.0f} images/s"
    else:
        path, read = exp.rate_source
        try:
            data = read_jsonl(REPO / path) if path.endswith(".jsonl") else json.loads((REPO / path).read_text())
            rate = read(data)
        except (OSError, StopIteration, KeyError, IndexError, ValueError):
            return None, f"no rate: {path} is missing or has no entry for this batch size"
        source = f"{path}, {rate:.0f} images/s" + (f"; {exp.rate_note}" if exp.rate_note else "")
    return exp.epochs * exp.train_images / rate / 3600, source
