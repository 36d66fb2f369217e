"""Training throughput of each dataset's run at its input size, for the time estimates of docs/datasets.md.

For each dataset of ``--datasets`` (MNIST first, as the reference) and each architecture of
``--archs``, the run that ``python -m capsnet.train --dataset NAME --model ARCH`` builds
(its model configuration, objective, optimizer and batch size: the dataset's defaults)
takes training steps through the loop's own step (:class:`capsnet.training.Updater`) on
random images of the size the dataset's files hold, through the dataset's training source
(its shifts, crops and flips included). No dataset file is needed.

Each figure is images/s, the median over ``--rounds`` rounds of ``--steps`` timed steps
after one untimed step; the datasets take turns within a round and their order rotates
from round to round, so a slow spell of a shared machine is spread over all of them. The
ratio to MNIST's images/s in the same run is the figure to compare across machines; the
estimated epoch time is the training set's size divided by the images/s. For the CapsNet the
training flops per image (:func:`capsnet.models.capsnet.flops_per_image`) and their ratio to
MNIST's are recorded beside it: a second, noise-free view of how the input size and the
network change the cost.

The JSON records the CPU model, its vector extensions, the BLAS and the kernel it chose,
the thread count, the load average and the commit.

Usage: python scripts/bench_datasets.py [--datasets mnist cifar10 ...] [--archs capsnet em]
       [--rounds 3] [--steps 2] [--threads 2] [--batch-size B]
       [--json scripts/results/bench-datasets-cpu-2core.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchlib import machine_info

REPO = Path(__file__).resolve().parent.parent

# The size of one example as the dataset's reader gives it, before the training source
# crops it, and the training set's size, for the epoch estimate.
STORED = {"mnist": ((28, 28), 60000), "fashion-mnist": ((28, 28), 60000), "cifar10": ((3, 32, 32), 50000),
          "svhn": ((3, 32, 32), 73257), "smallnorb": ((2, 48, 48), 24300)}


def make_run(name: str, arch: str, batch_size: int | None = None, seed: int = 0, backend_name: str = "numpy"):
    """(step function, batch size, training flops per image for the CapsNet) of the run ``--dataset name --model arch`` would train
    (``batch_size``: another batch size than the run's)."""
    import numpy as np

    from capsnet import backend
    from capsnet.training import TrainConfig, Updater
    from capsnet.training.datasets import dataset
    from capsnet.training.run import ARCH_DEFAULTS, build_model, build_optimizer, build_task, run_metrics

    settings = {**ARCH_DEFAULTS.get(arch, {}), **({"batch_size": batch_size} if batch_size else {})}
    cfg = TrainConfig(dataset=name, arch=arch, **settings).validate()
    spec = dataset(name)
    shape, _ = STORED[name]
    rng = np.random.default_rng(seed)
    n = cfg.batch_size * 2
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = np.arange(n) % spec.n_classes
    with backend.use(backend_name) as xp:
        source = spec.train_source(images, labels, cfg, xp)
        model = build_model(cfg)
        task = build_task(cfg)
        if hasattr(task, "progress"):
            task.progress = lambda: 1.0  # the spread loss at its final margin
        updater = Updater(model, task, build_optimizer(cfg, model), run_metrics(cfg))
        updater.start()
    order = source.order(rng)

    def step(k: int) -> None:
        start = (k % 2) * cfg.batch_size
        updater.update(source.batch(order[start:start + cfg.batch_size], rng))
        updater.read()  # the host read a log interval ends with: the step is done when it returns

    flops = None
    if arch == "capsnet":
        from capsnet.models.capsnet import flops_per_image

        flops = flops_per_image(cfg.model_config())
    return step, cfg.batch_size, flops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_datasets.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(STORED), choices=list(STORED))
    p.add_argument("--archs", nargs="+", default=["capsnet"], choices=("capsnet", "cnn", "efficient", "em"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--batch-size", type=int, default=None, help="default: each run's own (100 for the CapsNet)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, str(REPO))
    info = machine_info(args.threads)
    from capsnet import backend

    info["device"] = backend.describe_device(args.backend)
    from capsnet import parallel

    runs = {}
    with parallel.threads(args.threads):
        for name in args.datasets:
            for arch in args.archs:
                step, batch, flops = make_run(name, arch, args.batch_size, backend_name=args.backend)
                step(0)  # untimed: first allocations, workspaces
                runs[(name, arch)] = (step, batch, flops, [])
        keys = list(runs)
        for r in range(args.rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                step, batch, _, rates = runs[key]
                t0 = time.perf_counter()
                for k in range(args.steps):
                    step(k + 1)
                rates.append(args.steps * batch / (time.perf_counter() - t0))
    results = []
    reference = {arch: statistics.median(runs[("mnist", arch)][3]) for arch in args.archs if ("mnist", arch) in runs}
    mnist_flops = runs[("mnist", "capsnet")][2] if ("mnist", "capsnet") in runs else None
    for (name, arch), (_, batch, flops, rates) in runs.items():
        rate = statistics.median(rates)
        _, n_train = STORED[name]
        results.append({"dataset": name, "arch": arch, "batch_size": batch, "images_per_s": rate,
                        "rounds": rates, "vs_mnist": rate / reference[arch] if arch in reference else None,
                        "epoch_minutes": n_train / rate / 60, "flops_per_image": flops,
                        "flops_vs_mnist": flops / mnist_flops if flops and mnist_flops else None})
    print(f"{info['cpu_model']}, {args.threads} threads, load {info['load_average_at_start']}")
    print(f"{'dataset':14} {'arch':9} {'batch':>5} {'images/s':>9} {'vs MNIST':>9} {'min/epoch':>10} "
          f"{'flops vs MNIST':>15}")
    for e in results:
        ratio = f"{e['vs_mnist']:.2f}" if e["vs_mnist"] is not None else "-"
        flops = f"{e['flops_vs_mnist']:.2f}" if e["flops_vs_mnist"] is not None else "-"
        print(f"{e['dataset']:14} {e['arch']:9} {e['batch_size']:5d} {e['images_per_s']:9.1f} {ratio:>9} "
              f"{e['epoch_minutes']:10.1f} {flops:>15}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                   for k, v in vars(args).items()},
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
