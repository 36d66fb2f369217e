"""Run by tests/training/test_distributed.py under mpiexec (or alone): ``python -m capsnet.train``
with hooks the tests need. Not a test module itself.

    python tests/training/mpi_worker.py [--stop-at EPOCH STEP] [--fail-on-rank R EPOCH STEP] [--log FILE] -- TRAIN_ARGS...

--stop-at raises KeyboardInterrupt after that step on every rank (a Ctrl-C that all ranks
see at once); --fail-on-rank raises RuntimeError on one rank only; --log appends one line
"rank R saved NAME" per checkpoint written; --writer-stop-at raises KeyboardInterrupt from a
writer-only extension (rank 0 only) after that step. The hooks are an extension of the trainer
(capsnet.training.Extension), passed to capsnet.train.main.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import capsnet.train as train_cli  # noqa: E402
from capsnet.training import Extension, distributed  # noqa: E402


class Hooks(Extension):
    """The tests' hooks, as an extension of the trainer the command line builds."""

    def __init__(self, args: argparse.Namespace, rank: int):
        self.args, self.rank = args, rank

    def start(self, trainer) -> None:
        if self.args.log:
            with open(self.args.log, "a") as f:
                f.write(f"rank {self.rank} holds the run folder: {trainer.folder.locked}\n")

    def step(self, trainer) -> None:
        epoch, step = trainer.epoch, trainer.step_in_epoch - 1
        if self.args.stop_at and [epoch, step] == self.args.stop_at:
            raise KeyboardInterrupt
        if self.args.fail_on_rank and self.rank == self.args.fail_on_rank[0] and [epoch, step] == self.args.fail_on_rank[1:]:
            raise RuntimeError(f"bad data on this node (epoch {epoch}, step {step})")

    def saved(self, trainer, path) -> None:
        if self.args.log:
            with open(self.args.log, "a") as f:
                f.write(f"rank {self.rank} saved {path.name}\n")


class WriterStop(Extension):
    """Raises KeyboardInterrupt on rank 0 only, after step S of epoch E (--writer-stop-at E S)."""

    writer_only = True

    def __init__(self, at: list[int]):
        self.at = at

    def step(self, trainer) -> None:
        if [trainer.epoch, trainer.step_in_epoch - 1] == self.at:
            raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stop-at", type=int, nargs=2)
    p.add_argument("--fail-on-rank", type=int, nargs=3)
    p.add_argument("--log")
    p.add_argument("--writer-stop-at", type=int, nargs=2)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    rank = distributed.world().rank
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    extensions = (Hooks(args, rank), *([WriterStop(args.writer_stop_at)] if args.writer_stop_at else []))
    return train_cli.main(train_args, extensions=extensions)


if __name__ == "__main__":
    sys.exit(main())
