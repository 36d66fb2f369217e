"""Data-parallel training on MPI: images per second on 1 and 2 ranks, the Allreduce's share
of a step, and a model of the scaling to many nodes with the measured numbers plugged in.

Each measurement is ``mpiexec -n N`` of this script's worker, one BLAS thread per rank
(OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS set to 1), running the training
step of capsnet.training.Trainer under MPI: the global batch (``--batch``) split into one
slice per rank, forward, backward, the gradients summed by one in-place Allreduce of the
flat gradient buffer, an Adam step. ``--warmup`` untimed steps, then ``--repeats`` timed
runs of ``--steps`` steps; each figure is the median over the repeats (rank 0's clock,
after a barrier).

The scaling model (printed and written to the JSON): a step on N nodes takes

    T(N) = T_compute(G / N) + T_allreduce(N),   T_allreduce = 2 (N - 1) / N * S / B + 2 (N - 1) * a

(a ring Allreduce of S bytes over links of bandwidth B with latency a per message), where
T_compute(G / N) is taken as the measured one-rank compute time per image times G / N (an
upper bound on the speed-up: small slices run the matrix products less efficiently).

Usage: python scripts/bench_distributed.py [--batch 100] [--steps 3] [--repeats 3]
       [--bandwidth-gbit 10 100] [--json scripts/results/bench-distributed-2core.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine_info

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import numpy as np

    from capsnet.models import CapsNet, CapsNetConfig
    from capsnet.optim import Adam
    from capsnet.training import CapsNetTask
    from capsnet.training.distributed import GradientBuffer, MPIComm, shard, world

    comm = world()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    lo, hi = shard(args.batch, comm.rank, comm.size)
    xs, ys = x[lo:hi], y[lo:hi]
    model = CapsNet(CapsNetConfig(), seed=0)
    task = CapsNetTask()
    opt = Adam(model.parameters())
    grads = GradientBuffer(model.parameters(), comm)
    barrier = comm._comm.Barrier if isinstance(comm, MPIComm) else (lambda: None)

    def step() -> None:
        task.forward(model, (xs, ys))
        opt.zero_grad()
        task.backward(model)
        grads.allreduce((hi - lo) / args.batch, False)
        opt.step()

    for _ in range(args.warmup):
        step()
    times, reduce_times = [], []
    for _ in range(args.repeats):
        barrier()
        grads.seconds = 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        barrier()
        times.append((time.perf_counter() - start) / args.steps)
        reduce_times.append(grads.seconds / args.steps)
    if comm.rank == 0:
        Path(args.worker_result).write_text(json.dumps({
            "ranks": comm.size, "step_seconds": statistics.median(times), "step_seconds_all": times,
            "allreduce_seconds": statistics.median(reduce_times), "allreduce_seconds_all": reduce_times,
            "buffer_bytes": grads.nbytes, "images_per_second": args.batch / statistics.median(times)}))


def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise SystemExit("mpiexec not found: pip install 'capsnet[mpi]' (mpi4py and mpich)")
    return found


def model_table(one: dict, batch: int, bandwidths_gbit: list[float], latency_s: float) -> list[dict]:
    per_image = (one["step_seconds"] - one["allreduce_seconds"]) / batch
    rows = []
    for gbit in bandwidths_gbit:
        bandwidth = gbit * 1e9 / 8
        for n in (1, 2, 4, 8, 16, 32, 64):
            reduce = 0.0 if n == 1 else 2 * (n - 1) / n * one["buffer_bytes"] / bandwidth + 2 * (n - 1) * latency_s
            step = per_image * batch / n + reduce
            rows.append({"bandwidth_gbit": gbit, "nodes": n, "allreduce_s": reduce, "step_s": step,
                         "images_per_second": batch / step, "speedup": (per_image * batch) / step,
                         "efficiency": (per_image * batch) / step / n})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_distributed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100, help="global batch (default 100)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--bandwidth-gbit", type=float, nargs="+", default=[10.0, 100.0],
                   help="link bandwidths for the scaling model, Gbit/s (default 10 and 100)")
    p.add_argument("--latency-us", type=float, default=5.0, help="per-message latency for the model, us")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            out = Path(tmp) / f"{n}.json"
            cmd = [mpiexec(), "-n", str(n), sys.executable, __file__, "--worker", "--worker-result", str(out),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup)]
            print(f"{n} rank(s) of 1 thread, global batch {args.batch} ...", flush=True)
            subprocess.run(cmd, env=env, check=True)
            results.append(json.loads(out.read_text()))
    one = results[0]
    print(f"\npaper-sized CapsNet, float32, gradient buffer {one['buffer_bytes'] / 1e6:.1f} MB")
    print(f"{'ranks':>5} {'img/s':>8} {'step ms':>8} {'allreduce ms':>13} {'share':>6} {'speed-up':>9}")
    for r in results:
        print(f"{r['ranks']:>5} {r['images_per_second']:>8.1f} {1e3 * r['step_seconds']:>8.1f} "
              f"{1e3 * r['allreduce_seconds']:>13.2f} {r['allreduce_seconds'] / r['step_seconds']:>6.1%} "
              f"{r['images_per_second'] / one['images_per_second']:>9.2f}")
    table = model_table(one, args.batch, args.bandwidth_gbit, args.latency_us * 1e-6)
    print(f"\nmodel: T(N) = T_compute(1 rank) / N + 2 (N-1)/N * S / B + 2 (N-1) * {args.latency_us:g} us, "
          f"S = {one['buffer_bytes'] / 1e6:.1f} MB, per-image compute {1e3 * (one['step_seconds'] - one['allreduce_seconds']) / args.batch:.2f} ms")
    print(f"{'Gbit/s':>6} {'nodes':>5} {'allreduce ms':>13} {'step ms':>8} {'img/s':>8} {'efficiency':>10}")
    for row in table:
        print(f"{row['bandwidth_gbit']:>6g} {row['nodes']:>5} {1e3 * row['allreduce_s']:>13.1f} "
              f"{1e3 * row['step_s']:>8.1f} {row['images_per_second']:>8.1f} {row['efficiency']:>10.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": {**machine_info(1), "cpus": os.cpu_count(), "threads_per_rank": 1},
            "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "measured": results,
            "model": {"latency_us": args.latency_us, "rows": table}}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
