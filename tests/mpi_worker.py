"""Run by tests/test_distributed.py under mpiexec (or alone): ``python -m capsnet.train``
with hooks the tests need. Not a test module itself.

    python tests/mpi_worker.py [--stop-at EPOCH STEP] [--fail-on-rank R EPOCH STEP] [--log FILE] -- TRAIN_ARGS...

--stop-at raises KeyboardInterrupt after that step on every rank (a Ctrl-C that all ranks
see at once); --fail-on-rank raises RuntimeError on one rank only; --log appends one line
"rank R saved NAME" per checkpoint written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import capsnet.train as train_cli  # noqa: E402
from capsnet.training import distributed, loop  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stop-at", type=int, nargs=2)
    p.add_argument("--fail-on-rank", type=int, nargs=3)
    p.add_argument("--log")
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    rank = distributed.world().rank

    def on_step(trainer, epoch, step):
        if args.stop_at and [epoch, step] == args.stop_at:
            raise KeyboardInterrupt
        if args.fail_on_rank and rank == args.fail_on_rank[0] and [epoch, step] == args.fail_on_rank[1:]:
            raise RuntimeError(f"bad data on this node (epoch {epoch}, step {step})")

    original = train_cli.MNISTTrainer

    class Hooked(original):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "on_step": on_step})

    train_cli.MNISTTrainer = Hooked
    if args.log:
        save = loop.save_checkpoint

        def logged(path, **kw):
            with open(args.log, "a") as f:
                f.write(f"rank {rank} saved {Path(path).name}\n")
            return save(path, **kw)

        loop.save_checkpoint = logged
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return train_cli.main(train_args)


if __name__ == "__main__":
    sys.exit(main())
