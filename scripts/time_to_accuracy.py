"""Time to accuracy against PyTorch, as MLPerf measures training: the wall time from the first
step until the test accuracy, evaluated after every epoch, first reaches a target.

capsnet (RunTrainer, the experiment's TrainConfig) and the PyTorch reference of the same
network (scripts/torch_capsnet.py, scripts/torch_efficient_capsnet.py) train with the same
setup on the same CPU and the same number of threads, from the same initial weights (capsnet's,
copied into the reference), on the same batches in the same order with the same augmentation
(drawn by capsnet's data source from the same seeded generator); the optimizer is Adam with the
same settings and the same per-epoch decay. The time counted is training plus the evaluations,
not the start-up (data loading, building the network). Each framework runs in its own process,
one after the other: the machine should be quiet (compare only numbers of one run).

    PYTHONPATH=$PWD python scripts/time_to_accuracy.py capsnet --target 99.0 --target 99.3
    PYTHONPATH=$PWD python scripts/time_to_accuracy.py efficient --target 99.0 --target 99.3
    # a smoke test on the packaged sample, a tiny target:
    PYTHONPATH=$PWD python scripts/time_to_accuracy.py capsnet --dataset mnist-sample --train-limit 300 \\
        --test-limit 200 --target 30 --max-epochs 2 --out /tmp/tta.json

Writes a JSON (default docs/results/EXPERIMENT-time-to-accuracy.json, which
scripts/results_table.py shows on the results page under the experiment) with the machine (CPU
model, vector extensions, BLAS, threads, commit), the setup, and for each framework the test
accuracy and the cumulative seconds after each epoch and the seconds to each target (null: not
reached within --max-epochs). Needs torch (the PyTorch reference).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import results_records as rr

NETWORKS = {"capsnet": "mnist-capsnet", "efficient": "mnist-efficient"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("network", choices=tuple(NETWORKS),
                   help="capsnet (the setup of mnist-capsnet) or efficient (the setup of mnist-efficient)")
    p.add_argument("--target", type=float, action="append",
                   help="test accuracy in %% to reach (repeat; default 99.0 and 99.3)")
    p.add_argument("--max-epochs", type=int, default=None, help="give up after this many epochs (default: the "
                   "experiment's)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="threads for both frameworks (default: the usable CPUs)")
    p.add_argument("--frameworks", nargs="+", choices=("capsnet", "torch"), default=["capsnet", "torch"])
    p.add_argument("--dataset", help="another dataset (mnist-sample for a smoke test)")
    p.add_argument("--train-limit", type=int)
    p.add_argument("--test-limit", type=int)
    p.add_argument("--data-dir", help="the MNIST files (default $CAPSNET_DATA_DIR)")
    p.add_argument("--out", type=Path, help="the JSON (default docs/results/EXPERIMENT-time-to-accuracy.json)")
    p.add_argument("--worker", choices=("capsnet", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.target = sorted(args.target or [99.0, 99.3])
    return args


def train_config(args: argparse.Namespace) -> Any:
    from capsnet.train import build_parser, config_from_args  # noqa: PLC0415
    from capsnet.training import TrainConfig  # noqa: PLC0415

    exp = rr.EXPERIMENTS[NETWORKS[args.network]]
    flags = list(exp.args)
    for name in ("dataset", "train_limit", "test_limit", "data_dir"):
        value = getattr(args, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    if args.max_epochs is not None:
        flags[flags.index("--epochs") + 1] = str(args.max_epochs)
    return config_from_args(build_parser().parse_args(flags), TrainConfig()).validate()


def reached(curve: list[dict[str, float]], targets: list[float]) -> dict[str, float | None]:
    """Seconds at the first epoch whose test accuracy reaches each target (None: never)."""
    return {f"{t:g}": next((c["seconds"] for c in curve if c["test_accuracy"] * 100 >= t), None) for t in targets}


# -- the two workers, each in its own process ----------------------------------------------------
def worker_capsnet(args: argparse.Namespace) -> list[dict[str, float]]:
    from capsnet.training import Extension, RunTrainer  # noqa: PLC0415

    cfg = train_config(args)  # threads: OMP_NUM_THREADS, set by the parent for both workers
    curve: list[dict[str, float]] = []
    top = max(args.target)

    class Until(Extension):
        def epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
            seconds = (curve[-1]["seconds"] if curve else 0.0) + record["epoch_seconds"]
            curve.append({"epoch": record["epoch"], "test_accuracy": record["test_accuracy"], "seconds": seconds})
            if record["test_accuracy"] * 100 >= top:
                trainer.stop_requested = True

    with tempfile.TemporaryDirectory(prefix="capsnet-tta-") as run_dir:
        trainer = RunTrainer(cfg, run_dir, progress=False, log=False, extensions=[Until()])
        try:
            trainer.fit()
        except KeyboardInterrupt:
            pass  # the target was reached
    return curve


def worker_torch(args: argparse.Namespace) -> list[dict[str, float]]:
    import torch  # noqa: PLC0415

    from capsnet.training import RunTrainer  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    cfg = train_config(args)
    if args.network == "capsnet":
        from torch_capsnet import TorchCapsNet as Net  # noqa: PLC0415
    else:
        from torch_efficient_capsnet import TorchEfficientCapsNet as Net  # noqa: PLC0415
    from torch_capsnet import total_loss  # noqa: PLC0415 - the same margin + reconstruction loss for both

    with tempfile.TemporaryDirectory(prefix="capsnet-tta-") as run_dir:  # never trained: its model, data and seed
        ours = RunTrainer(cfg, run_dir, progress=False, log=False)
    train, test = ours.train_data, ours.eval_data
    net = Net(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.items()}, dtype=torch.float32)
    net.load_from_capsnet(ours.model.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, eps=1e-8)
    rng = np.random.default_rng(ours.seed)  # the stream RunTrainer draws its order and augmentation from
    curve: list[dict[str, float]] = []
    seconds, top = 0.0, max(args.target)
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = max(cfg.lr * cfg.lr_decay**epoch, cfg.lr_min)
        start = time.perf_counter()
        net.train()
        order = train.order(rng)
        for i in range(0, len(order), cfg.batch_size):
            x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in train.batch(order[i:i + cfg.batch_size], rng))
            lengths, recon = net(x, y)
            loss = total_loss(lengths, recon, y, x, cfg.recon_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test), 100):
                x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in test.batch(np.arange(i, min(i + 100, len(test)))))
                correct += int((net(x)[0].argmax(dim=1) == y).sum())
        seconds += time.perf_counter() - start
        curve.append({"epoch": epoch + 1, "test_accuracy": correct / len(test), "seconds": seconds})
        if correct / len(test) * 100 >= top:
            break
    return curve


def machine(threads: int) -> dict[str, Any]:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    vector = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags.split()]
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # older NumPy: no dict mode
        blas = {}
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415 - optional
        kernel = [p.get("architecture") for p in threadpool_info() if p.get("user_api") == "blas"]
    except ImportError:
        kernel = []
    import torch  # noqa: PLC0415

    return {"cpu_model": rr.cpu_model(), "vector_extensions": vector, "cpus": os.cpu_count(), "threads": threads,
            "blas": {k: blas[k] for k in ("name", "version") if k in blas}, "blas_kernel": kernel,
            "numpy": np.__version__, "torch": torch.__version__, "commit": rr.commit(),
            "load_average_at_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        curve = worker_capsnet(args) if args.worker == "capsnet" else worker_torch(args)
        print("CURVE " + json.dumps(curve))
        return 0
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        raise SystemExit("time_to_accuracy.py needs torch for the PyTorch reference: pip install torch") from None
    cfg = train_config(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join(
               [str(rr.REPO), str(rr.REPO / "scripts"), os.environ.get("PYTHONPATH", "")])}
    report: dict[str, Any] = {"machine": machine(args.threads), "network": args.network,
                              "setup": {"experiment": NETWORKS[args.network], "config": cfg.as_dict()},
                              "targets": args.target, "max_epochs": cfg.epochs, "results": {}}
    for framework in args.frameworks:
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", framework]
        print(f"== {framework}: training until {max(args.target)}% or {cfg.epochs} epochs", flush=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("CURVE ")), None)
        if done.returncode != 0 or line is None:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"the {framework} worker failed (exit {done.returncode})")
        curve = json.loads(line[len("CURVE "):])
        report["results"][framework] = {"curve": curve, "seconds_to_target": reached(curve, args.target)}
        for target, seconds in report["results"][framework]["seconds_to_target"].items():
            print(f"   {target}%: " + (f"{seconds:.1f} s" if seconds is not None else "not reached") +
                  f" (best {max(c['test_accuracy'] for c in curve) * 100:.2f}% in {len(curve)} epoch(s))")
    results = report["results"]
    if {"capsnet", "torch"} <= set(results):
        report["ratio_capsnet_over_torch"] = {
            t: (s / results["torch"]["seconds_to_target"][t] if s is not None and
                results["torch"]["seconds_to_target"][t] else None)
            for t, s in results["capsnet"]["seconds_to_target"].items()}
        print("capsnet / PyTorch time to target: " + ", ".join(
            f"{t}%: {r:.2f}" if r is not None else f"{t}%: -" for t, r in report["ratio_capsnet_over_torch"].items()))
    out = args.out or rr.RESULTS / f"{NETWORKS[args.network]}-time-to-accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
