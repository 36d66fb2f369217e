"""Benchmark the paper-sized CapsNet (float32, CPU): this library against PyTorch.

For each batch size it measures, for capsnet and for the PyTorch reference in
scripts/torch_capsnet.py (skipped with a message when torch is missing):

- training throughput, images/s: forward, margin + reconstruction loss,
  backward and one Adam step;
- inference throughput, images/s: an eval-mode forward to the capsule lengths
  (``CapsNet.predict``; ``TorchCapsNet.predict`` under ``torch.inference_mode``);
- peak memory of training: the peak resident set size during the training steps
  (warm-up and timed) minus the resident set size just before the first step,
  after the model, the optimizer and the input batch exist.

Each figure is the median of ``--repeats`` timed repeats after ``--warmup``
untimed steps; a repeat runs enough steps to last ``--min-repeat-time`` seconds.
With ``--rounds N`` each (framework, batch size) pair runs in N processes, the
frameworks taking turns, and each figure is the median over the N processes.
Every (framework, batch size) pair runs in a fresh subprocess, so neither
framework's allocations, thread pools or peak memory leak into the other's
numbers. Both get ``--threads`` threads: OMP_NUM_THREADS, OPENBLAS_NUM_THREADS
and MKL_NUM_THREADS are set in the child's environment before NumPy or torch
is imported, and the torch child calls ``torch.set_num_threads``.

Peak memory: the child resets the kernel's high-water mark (VmHWM in
/proc/self/status) by writing "5" to /proc/self/clear_refs just before the
first training step and reads VmHWM after the last; where that reset is not
available it falls back to ``getrusage(RUSAGE_SELF).ru_maxrss``, which is a
lifetime peak and is marked as such in the JSON.

The FLOP bound: the measured float32 GEMM rate of this machine (median over a
few large ``numpy.matmul`` calls, same thread count) divided by
``flops_per_image`` of the paper's model gives the images/s the matrix products
alone would allow; throughput is reported as a percentage of that. (The
inference count includes the decoder, which ``predict`` skips: 0.7% of it.)
The count is the network's, with direct convolution; capsnet's PrimaryCaps
convolution runs in the Fourier domain at batch sizes where that saves flops
and then executes fewer (reported beside it), so its percentage can pass 100.

``--network multimnist`` benchmarks the MultiMNIST network instead (36x36 inputs, 3,200
primary capsules, two digits per image: both positives of the margin loss and the decoder
run once per digit), on MultiMNIST test pairs, against the same network in PyTorch.

``--network efficient`` and ``--network em`` benchmark the routing models instead:
``EfficientCapsNet`` (margin + reconstruction loss, ``CapsNetLoss``) against
scripts/torch_efficient_capsnet.py, and the default (small) ``MatrixCapsNet`` (spread loss
at its final margin, 0.9) against scripts/torch_matrix_capsnet.py, both started from the
same weights (``load_from_capsnet``), Adam in both; inference is each model's predict path
(lengths, or class activations) in eval mode. The GEMM rate, the FLOP bound and the
Fourier columns are the paper CapsNet's and are not computed for them (shown as "-").

``--launches`` counts instead of timing: the operations a GPU would launch per training
and inference step, capsnet's on the emulated CuPy device and PyTorch's eager kernel
calls by its profiler, at each batch size (see scripts/launch_counts.py for what each
count includes). Nothing is timed then.

The JSON's ``machine`` (scripts/benchlib.py) names the CPU, its vector extensions, NumPy's
BLAS and the kernel it chose, the threads and the commit; the table is headed by them.

Usage: python scripts/bench.py [--batch-sizes 1 32 100] [--repeats 5] [--rounds 3] [--json bench.json]
       python scripts/bench.py --launches --json launches.json
       python scripts/bench.py --network multimnist --json bench-multimnist.json
       python scripts/bench.py --quick      # smoke test: batches 1 and 8, 1 repeat
"""
from __future__ import annotations

# Only the standard library (and benchlib, which keeps to it) at module level: a worker must
# set its thread variables before NumPy or torch is first imported.
import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from benchlib import (TORCH_ALLOCATORS, PeakMemory, allocator_env, gemm_gflops, machine_heading, machine_info,
                      median_rate, run_child, thread_env, torch_setup, torch_skip_reason)

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
GEMM_SHAPES = ((4096, 4096, 4096), (3600, 20736, 256))  # (M, K, N); the second is PrimaryCaps at batch 100
FRAMEWORKS = ("ours", "torch")


# ----------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training and inference throughput and peak training memory of the paper-sized "
                    "CapsNet in float32: capsnet against the PyTorch reference (scripts/torch_capsnet.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 100], metavar="B",
                   help="batch sizes to measure")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; each figure is their median")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per framework and batch size, the frameworks taking turns (the order "
                        "swapped every round); each figure is the median over rounds of each process's median")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--min-repeat-time", type=float, default=0.5, metavar="SECONDS",
                   help="each timed repeat runs enough steps to last at least this long")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both frameworks")
    p.add_argument("--gemm-repeats", type=int, default=3, help="timed runs of each GEMM shape")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST files (else $CAPSNET_DATA_DIR, the per-user cache, "
                        "../shared/data/mnist); random images when none is found")
    p.add_argument("--no-torch", action="store_true", help="measure this library only")
    p.add_argument("--replicas", choices=("threads", "processes"),
                   help="where capsnet's replicas run (sets CAPSNET_REPLICAS; default: the model's choice)")
    p.add_argument("--torch-allocator", choices=TORCH_ALLOCATORS, default="system",
                   help="PyTorch's host allocator: system (glibc's defaults, as its users run it) or tuned "
                        "(the thresholds capsnet sets on import, capsnet.allocator, through glibc's variables)")
    p.add_argument("--network", choices=(*NETWORKS, *ROUTING_NETWORKS), default="mnist",
                   help="mnist: the paper's MNIST CapsNet (28x28, 1,152 primary capsules); multimnist: its "
                        "MultiMNIST network (36x36, 3,200 primary capsules, two digits per image); "
                        "efficient: EfficientCapsNet (self-attention routing); em: the default MatrixCapsNet "
                        "(EM routing); the last two without the GEMM rate and FLOP bound")
    p.add_argument("--launches", action="store_true",
                   help="count the device operations per training and inference step (capsnet on the emulated "
                        "CuPy device, PyTorch by its profiler) instead of timing")
    p.add_argument("--json", default="bench.json", help="where to write all results")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: batch sizes 1 and 8, 1 warm-up step, 1 repeat, 1 GEMM run "
                        "(unless given explicitly)")
    # Internal: the script re-invokes itself as a worker for each measurement.
    p.add_argument("--worker", choices=("ours", "torch", "gemm", "launches-ours", "launches-torch"),
                   help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-data", help=argparse.SUPPRESS)
    p.add_argument("--worker-network", default="mnist", help=argparse.SUPPRESS)
    p.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        quick = {"batch_sizes": [1, 8], "repeats": 1, "warmup": 1, "min_repeat_time": 0.0, "gemm_repeats": 1}
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    for name in ("repeats", "rounds", "threads", "gemm_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.min_repeat_time < 0:
        p.error("--warmup and --min-repeat-time must be >= 0")
    if any(b < 1 for b in args.batch_sizes):
        p.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if args.launches and args.network in ROUTING_NETWORKS:
        p.error(f"--launches counts the CapsNet networks only, not --network {args.network}")
    return args


# ------------------------------------------------------------------ timing
def _median_rate(step: Callable[[], Any], batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then time ``args.repeats`` repeats; images/s of each and their median."""
    return median_rate(step, batch, args.repeats, args.warmup, args.min_repeat_time)


def _measure_training(train_step: Callable[[], Any], batch: int, args: argparse.Namespace,
                      memory: PeakMemory) -> dict[str, Any]:
    """Throughput of training steps and the peak memory they reach."""
    memory.start()
    train = _median_rate(train_step, batch, args)
    train["memory"] = memory.stop()
    return train


# ------------------------------------------------------------------ workers
NETWORKS = {"mnist": {}, "multimnist": {"input_shape": (1, 36, 36), "digits": 2}}
# The routing models, at their default configurations; no FLOP bound is computed for them.
ROUTING_NETWORKS = ("efficient", "em")
SPREAD_MARGIN = 0.9  # the spread loss's margin at the end of training (SpreadTask's default)


def _kind(runner: Any, model: Any) -> str | None:
    """Where the replicas ran: "threads", "processes", or None (the model whole)."""
    return None if runner is model else runner.kind


def routing_model(network: str):
    """The library's routing model for ``network`` (float32, seed 0, default configuration)."""
    from capsnet.models import EfficientCapsNet, MatrixCapsNet

    return (EfficientCapsNet if network == "efficient" else MatrixCapsNet)(dtype="float32", seed=0)


def _weights_path(data: str) -> str:
    return os.path.join(os.path.dirname(data), "weights.npz")


def _load_batch(path: str, batch: int):
    """(images (B, 1, H, W) uint8, labels (B,) or (B, 2), targets: None, or the two digits
    alone (B, 2, 1, H, W) uint8 for the MultiMNIST network)."""
    import numpy as np

    with np.load(path) as data:
        arrays = [data["images"], data["labels"], data["digits"] if "digits" in data else None]
    reps = -(-batch // len(arrays[0]))
    return tuple(None if a is None else np.concatenate([a] * reps)[:batch] for a in arrays)


def worker_ours(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from capsnet import backend
    from capsnet.data import to_float
    from capsnet.models.capsnet import CapsNet, CapsNetLoss
    from capsnet.optim import Adam
    from capsnet.replicas import replicate, split_reason

    backend.set_backend("numpy")
    images, labels, digits = _load_batch(args.worker_data, args.worker_batch)
    x = to_float(images, "float32", xp=np)
    y = labels.astype(np.int64)
    target = x if digits is None else to_float(digits.reshape(-1, *digits.shape[2:]), "float32", xp=np).reshape(
        digits.shape)
    memory = PeakMemory()
    memory.before_model()
    model = CapsNet(dtype="float32", seed=0, **NETWORKS[args.worker_network])
    crit = CapsNetLoss()
    opt = Adam(model.parameters(), lr=1e-3)
    runner = replicate(model)  # one replica per thread, a slice of the batch each (capsnet.replicas)
    memory.runner = runner  # worker processes' memory counts too

    def train_step() -> None:
        lengths, recon = runner(x, y)
        crit(lengths, recon, y, target)
        runner.backward(*crit.backward())
        opt.step()
        opt.zero_grad()

    def infer() -> None:
        runner.predict(x)

    model.train()
    conv = model.primary.conv
    (h1, w1), _ = model.config.feature_sizes
    method = {"train": conv.algorithm_for(h1, w1, args.worker_batch)}
    train = _measure_training(train_step, args.worker_batch, args, memory)
    conv.eval()
    method["infer"] = conv.algorithm_for(h1, w1, args.worker_batch)
    conv.train()
    return {"train": train, "infer": _median_rate(infer, args.worker_batch, args),
            "primary_conv_method": method, "versions": {"numpy": np.__version__},
            "replicas": getattr(runner, "threads", 1), "replica_kind": _kind(runner, model),
            "one_replica_because": split_reason(model)}


def worker_torch(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    sys.path.insert(0, str(SCRIPTS))
    from torch_capsnet import TorchCapsNet, total_loss

    versions = torch_setup(args.threads)
    images, labels, digits = _load_batch(args.worker_data, args.worker_batch)
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255))
    y = torch.from_numpy(labels.astype(np.int64))
    target = x if digits is None else torch.from_numpy(digits.astype(np.float32) / np.float32(255))
    memory = PeakMemory()
    memory.before_model()
    torch.manual_seed(0)
    model = TorchCapsNet(dtype=torch.float32, **NETWORKS[args.worker_network])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        opt.zero_grad()
        lengths, recon = model(x, y)
        total_loss(lengths, recon, y, target).backward()
        opt.step()

    def infer() -> None:
        with torch.inference_mode():
            model.predict(x)

    model.train()
    train = _measure_training(train_step, args.worker_batch, args, memory)
    model.eval()
    return {"train": train, "infer": _median_rate(infer, args.worker_batch, args),
            "versions": {"numpy": np.__version__, **versions}}


def worker_ours_routing(args: argparse.Namespace) -> dict[str, Any]:
    """EfficientCapsNet (CapsNetLoss) or MatrixCapsNet (SpreadLoss): one training step and predict."""
    import numpy as np

    from capsnet import backend
    from capsnet.data import to_float
    from capsnet.layers import SpreadLoss
    from capsnet.models import CapsNetLoss
    from capsnet.optim import Adam
    from capsnet.replicas import replicate, split_reason

    backend.set_backend("numpy")
    images, labels, _ = _load_batch(args.worker_data, args.worker_batch)
    x = to_float(images, "float32", xp=np)
    y = labels.astype(np.int64)
    memory = PeakMemory()
    memory.before_model()
    model = routing_model(args.worker_network)
    opt = Adam(model.parameters(), lr=1e-3)
    runner = replicate(model)  # as the training loop runs it: one replica per thread
    memory.runner = runner  # worker processes' memory counts too
    if args.worker_network == "efficient":
        crit = CapsNetLoss()

        def train_step() -> None:
            lengths, recon = runner(x, y)
            crit(lengths, recon, y, x)
            runner.backward(*crit.backward())
            opt.step()
            opt.zero_grad()
    else:
        spread = SpreadLoss(SPREAD_MARGIN)

        def train_step() -> None:
            spread(runner(x), y)
            runner.backward(spread.backward())
            opt.step()
            opt.zero_grad()

    def infer() -> None:
        runner.predict(x)

    model.train()
    train = _measure_training(train_step, args.worker_batch, args, memory)
    return {"train": train, "infer": _median_rate(infer, args.worker_batch, args),
            "versions": {"numpy": np.__version__},
            "replicas": getattr(runner, "threads", 1), "replica_kind": _kind(runner, model),
            "one_replica_because": split_reason(model)}


def worker_torch_routing(args: argparse.Namespace) -> dict[str, Any]:
    """The PyTorch references of the routing models, from the library's weights (weights.npz)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(SCRIPTS))
    versions = torch_setup(args.threads)
    images, labels, _ = _load_batch(args.worker_data, args.worker_batch)
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255))
    y = torch.from_numpy(labels.astype(np.int64))
    memory = PeakMemory()
    memory.before_model()
    with np.load(_weights_path(args.worker_data)) as f:
        state = {k: f[k] for k in f.files}
    if args.worker_network == "efficient":
        from torch_capsnet import total_loss  # CapsNetLoss: the margin plus the reconstruction loss
        from torch_efficient_capsnet import TorchEfficientCapsNet

        model = TorchEfficientCapsNet(dtype=torch.float32)
        model.load_from_capsnet(state)

        def loss() -> torch.Tensor:
            lengths, recon = model(x, y)
            return total_loss(lengths, recon, y, x)

        def predict() -> Any:  # as EfficientCapsNet.predict: the lengths, no decoder
            lengths = model.capsules(x).norm(dim=-1)
            return lengths.argmax(dim=1), lengths
    else:
        from torch_matrix_capsnet import TorchMatrixCapsNet, spread_loss

        model = TorchMatrixCapsNet(dtype=torch.float32)
        model.load_from_capsnet(state)

        def loss() -> torch.Tensor:
            return spread_loss(model(x), y, SPREAD_MARGIN)

        def predict() -> Any:
            a = model(x)
            return a.argmax(dim=1), a
    del state
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        opt.zero_grad()
        loss().backward()
        opt.step()

    def infer() -> None:
        with torch.inference_mode():
            predict()

    model.train()
    train = _measure_training(train_step, args.worker_batch, args, memory)
    model.eval()
    return {"train": train, "infer": _median_rate(infer, args.worker_batch, args),
            "versions": {"numpy": np.__version__, **versions}}


def worker_gemm(args: argparse.Namespace) -> dict[str, Any]:
    return gemm_gflops(GEMM_SHAPES, args.gemm_repeats)


def worker_launches(framework: str) -> Callable[[argparse.Namespace], dict[str, Any]]:
    def count(args: argparse.Namespace) -> dict[str, Any]:
        sys.path.insert(0, str(SCRIPTS))
        import launch_counts

        counter = launch_counts.count_ours if framework == "ours" else launch_counts.count_torch
        return counter(args.worker_batch, args.worker_network)
    return count


WORKERS = {"ours": worker_ours, "torch": worker_torch, "gemm": worker_gemm,
           "launches-ours": worker_launches("ours"), "launches-torch": worker_launches("torch")}


def run_worker(args: argparse.Namespace) -> None:
    worker = WORKERS[args.worker]
    if args.worker_network in ROUTING_NETWORKS:
        worker = {"ours": worker_ours_routing, "torch": worker_torch_routing}.get(args.worker, worker)
    result = worker(args)
    with open(args.worker_result, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------ parent
def spawn(kind: str, args: argparse.Namespace, workdir: str, batch: int = 0,
          data: str = "") -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its result dict, or {'error': ...}."""
    result = os.path.join(workdir, f"{kind}-{batch}.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--worker-result", result,
           "--worker-batch", str(batch), "--worker-data", data, "--threads", str(args.threads),
           "--worker-network", args.network,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--min-repeat-time", str(args.min_repeat_time), "--gemm-repeats", str(args.gemm_repeats)]
    env = thread_env(args.threads)
    if args.replicas is not None and kind == "ours":
        env["CAPSNET_REPLICAS"] = args.replicas
    if kind in ("torch", "launches-torch"):
        env.update(allocator_env(args.torch_allocator))
    if kind == "launches-ours":
        env["CAPSNET_EMULATE_CUPY"] = "1"  # the emulated device counts what a GPU would launch
    return run_child(cmd, env, result)


def write_routing_weights(network: str, path: str) -> None:
    """The library model's initial weights (seed 0), for the PyTorch worker's ``load_from_capsnet``."""
    import numpy as np

    from capsnet import backend

    with backend.use("numpy"):
        state = routing_model(network).state_dict()
    np.savez(path, **{k: backend.to_numpy(v) for k, v in state.items()})


def prepare_data(args: argparse.Namespace, path: str) -> str:
    """Write the images the workers use (MNIST test images when found) to ``path``."""
    import numpy as np

    from capsnet.data import MNISTNotFoundError, load_mnist

    n = max(args.batch_sizes)
    dirs = [args.data_dir] if args.data_dir else [None, REPO.parent / "shared" / "data" / "mnist"]
    for d in dirs:
        try:
            data = load_mnist(d, download=False, progress=False)
        except MNISTNotFoundError:
            continue
        if args.network == "multimnist":
            from capsnet.data.multimnist import MultiMNIST, overlay, place

            pairs = MultiMNIST(data.test_images, data.test_labels, train=False)
            first, partner, shifts = pairs.pairs(np.arange(n), None)
            a = place(data.test_images[first], shifts[:, 0], shifts[:, 1])
            b = place(data.test_images[partner], shifts[:, 2], shifts[:, 3])
            np.savez(path, images=overlay(a, b)[:, None], digits=np.stack([a, b], 1)[:, :, None],
                     labels=np.stack([data.test_labels[first], data.test_labels[partner]], 1).astype(np.int64))
            return "MultiMNIST test pairs"
        np.savez(path, images=data.test_images[:n, None], labels=data.test_labels[:n])
        return "MNIST test images"
    print("MNIST not found: benchmarking on random images (throughput does not depend on pixel values)")
    rng = np.random.default_rng(0)
    side = 36 if args.network == "multimnist" else 28
    labels = rng.integers(0, 10, n).astype(np.int64)
    arrays = {"images": rng.integers(0, 256, (n, 1, side, side), dtype=np.uint8), "labels": labels}
    if args.network == "multimnist":
        arrays["labels"] = np.stack([labels, (labels + 1) % 10], 1)
        arrays["digits"] = rng.integers(0, 256, (n, 2, 1, side, side), dtype=np.uint8)
    np.savez(path, **arrays)
    return "random images"


def combine_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One framework's processes at one batch size as one entry: the first process's, with
    each images/s and the training peak memory the median over the processes and every
    process's figure beside it (``rounds_images_per_s``, ``rounds_peak_increase_mb``); the
    first error if a process failed."""
    failed = next((r for r in results if "error" in r), None)
    if failed is not None:
        return failed
    entry = results[0]
    for mode in ("train", "infer"):
        rates = [r[mode]["images_per_s"] for r in results]
        entry[mode]["images_per_s"] = statistics.median(rates)
        entry[mode]["rounds_images_per_s"] = rates
    peaks = [r["train"]["memory"]["peak_increase_mb"] for r in results]
    entry["train"]["memory"]["peak_increase_mb"] = statistics.median(peaks)
    entry["train"]["memory"]["rounds_peak_increase_mb"] = peaks
    return entry


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _rate(entry: dict[str, Any], mode: str) -> float | None:
    return entry[mode]["images_per_s"] if "error" not in entry and "skipped" not in entry else None


def _peak(entry: dict[str, Any]) -> float | None:
    return entry["train"]["memory"]["peak_increase_mb"] if "error" not in entry and "skipped" not in entry else None


def _fmt(value: float | None, width: int, spec: str, suffix: str = "") -> str:
    text = "-" if value is None else format(value, spec) + suffix
    return text.rjust(width)


def print_table(report: dict[str, Any]) -> None:
    bound = report["bound_images_per_s"]
    print()
    routing = report["settings"]["network"] in ROUTING_NETWORKS
    n = report["settings"].get("rounds", 1)
    rounds = f", median over {n} alternating processes" if n > 1 else ""
    print(machine_heading(report["machine"]))
    name = {"mnist": "CapsNet (paper size, MNIST)", "multimnist": "CapsNet (MultiMNIST network, 36x36, two digits)",
            "efficient": "EfficientCapsNet (default, MNIST)", "em": "MatrixCapsNet, EM routing (default small, MNIST)"}
    if routing:
        print(f"{name[report['settings']['network']]} float32, {report['settings']['threads']} threads, "
              f"median of {report['settings']['repeats']} repeats{rounds}; no GEMM rate or FLOP bound for this network")
    else:
        print(f"{name[report['settings']['network']]} float32, {report['settings']['threads']} threads, "
              f"median of {report['settings']['repeats']} repeats{rounds}; GEMM rate "
              f"{report['gemm'].get('median_gflops', float('nan')):.1f} GFLOP/s -> bound "
              f"{_fmt(bound['train'], 0, '.1f')} img/s train, {_fmt(bound['infer'], 0, '.1f')} img/s inference")
    head = (f"{'batch':>5}  {'mode':<5}  {'ours img/s':>10}  {'torch img/s':>11}  {'ours/torch':>10}  "
            f"{'ours %bound':>11}  {'torch %bound':>12}  {'ours MB':>8}  {'torch MB':>8}  {'MB ours/torch':>13}")
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        for mode in ("train", "infer"):
            ours, torch_ = _rate(row["ours"], mode), _rate(row["torch"], mode)
            peak_o = _peak(row["ours"]) if mode == "train" else None
            peak_t = _peak(row["torch"]) if mode == "train" else None
            pct_o = _ratio(ours, bound[mode])
            pct_t = _ratio(torch_, bound[mode])
            print(f"{row['batch']:>5}  {mode:<5}  {_fmt(ours, 10, '.1f')}  {_fmt(torch_, 11, '.1f')}  "
                  f"{_fmt(_ratio(ours, torch_), 10, '.2f')}  "
                  f"{_fmt(None if pct_o is None else 100 * pct_o, 11, '.1f', '%')}  "
                  f"{_fmt(None if pct_t is None else 100 * pct_t, 12, '.1f', '%')}  {_fmt(peak_o, 8, '.0f')}  "
                  f"{_fmt(peak_t, 8, '.0f')}  {_fmt(_ratio(peak_o, peak_t), 13, '.2f')}")
    if routing:
        print("peak MB: resident-memory increase during the training steps over the RSS after model, "
              f"optimizer and batch creation ({report['memory_method']}); the JSON also gives "
              "peak_increase_over_pre_model_mb. Inference memory is not measured.")
        return
    executed = report["flops_per_image_executed_with_fourier_primary_conv"]
    flops = report["flops_per_image"]
    methods = sorted({f"batch {row['batch']} {mode}: {row['ours']['primary_conv_method'][mode]}"
                      for row in report["results"] if "primary_conv_method" in row["ours"]
                      for mode in ("train", "infer")}, key=lambda t: (int(t.split()[1].rstrip(":")), t))
    print(f"bound: direct-convolution FLOPs ({flops['train'] / 1e9:.3f} GFLOP per training image, "
          f"{flops['infer'] / 1e9:.3f} inference). Where capsnet's PrimaryCaps conv runs in the Fourier "
          f"domain it executes {executed['train'] / 1e9:.3f} and {executed['infer'] / 1e9:.3f} GFLOP, "
          f"so its %bound can pass 100. capsnet's PrimaryCaps method: {'; '.join(methods) or '-'}.")
    print("peak MB: resident-memory increase during the training steps over the RSS after model, "
          f"optimizer and batch creation ({report['memory_method']}); capsnet allocates gradients with the "
          "model, torch at the first backward, so the JSON also gives peak_increase_over_pre_model_mb. "
          "Inference memory is not measured.")


def count_launches(args: argparse.Namespace, frameworks: list[str], torch_note: str | None) -> int:
    """--launches: device operations per step, side by side, written to --json."""
    report: dict[str, Any] = {"machine": machine_info(args.threads),
                              "settings": {"batch_sizes": args.batch_sizes, "network": args.network},
                              "what": "operations a GPU would launch per step: capsnet on the emulated CuPy "
                                      "device (capsnet.testing), PyTorch eager by torch.profiler on the CPU "
                                      "(scripts/launch_counts.py)", "results": []}
    phases = ("forward_and_loss", "backward", "optimizer_step", "zero_grad", "train_step", "inference")
    with tempfile.TemporaryDirectory(prefix="capsnet-launches-") as work:
        for batch in args.batch_sizes:
            row: dict[str, Any] = {"batch": batch}
            for fw in FRAMEWORKS:
                row[fw] = spawn(f"launches-{fw}", args, work, batch) if fw in frameworks else {"skipped": torch_note}
                if "error" in row[fw]:
                    print(f"batch {batch} {fw} FAILED:\n    " + "\n    ".join(row[fw]["stderr_tail"]))
            report["results"].append(row)
    print(f"\nlaunches per step, {args.network} network (capsnet: emulated CuPy; PyTorch: profiler, foreach Adam)")
    head = f"{'batch':>5}  {'framework':<9}  " + "  ".join(f"{p:>16}" for p in phases)
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        for fw in FRAMEWORKS:
            entry = row[fw]
            cells = ["-".rjust(16) if "error" in entry or "skipped" in entry else f"{entry[p]:>16}" for p in phases]
            print(f"{row['batch']:>5}  {fw:<9}  " + "  ".join(cells))
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {os.path.abspath(args.json)}")
    return 1 if any("error" in row[fw] for row in report["results"] for fw in FRAMEWORKS) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    from capsnet.models.capsnet import CapsNetConfig, flops_per_image

    torch_note = torch_skip_reason(args.no_torch)
    frameworks = ["ours"] if torch_note else ["ours", "torch"]
    if torch_note:
        print(f"PyTorch reference {torch_note}")
    if args.launches:
        return count_launches(args, frameworks, torch_note)

    info = machine_info(args.threads, args.torch_allocator)
    if info["load_average_at_start"][0] > 0.5 * (info["usable_cpus"] or 1):
        print(f"warning: load average {info['load_average_at_start'][0]:.2f} at start; "
              "other work on this machine will distort the numbers")
    routing = args.network in ROUTING_NETWORKS
    if routing:  # the FLOP count, the bound and the Fourier figures are the CapsNet's: not computed
        flops = fourier_flops = None
    else:
        cfg = CapsNetConfig(**NETWORKS[args.network])
        flops = {"train": flops_per_image(cfg, training=True), "infer": flops_per_image(cfg, training=False)}
        fourier_flops = {mode: flops_per_image(cfg, training=mode == "train", primary_algorithm="fourier")
                         for mode in ("train", "infer")}
    report: dict[str, Any] = {
        "machine": info,
        "settings": {k: getattr(args, k) for k in ("batch_sizes", "repeats", "warmup", "min_repeat_time",
                                                    "threads", "gemm_repeats", "quick", "network", "rounds")},
        "flops_per_image": flops,
        "flops_per_image_executed_with_fourier_primary_conv": fourier_flops,
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="capsnet-bench-") as work:
        data = os.path.join(work, "batch.npz")
        report["settings"]["data"] = prepare_data(args, data)
        if routing:
            write_routing_weights(args.network, _weights_path(data))
            report["gemm"] = {"skipped": f"no FLOP bound for --network {args.network}"}
            report["bound_images_per_s"] = {"train": None, "infer": None}
        else:
            print(f"GEMM rate: numpy float32 matmul {' and '.join('x'.join(map(str, s)) for s in GEMM_SHAPES)}, "
                  f"{args.threads} threads ...", flush=True)
            gemm = spawn("gemm", args, work)
            report["gemm"] = gemm
            rate = gemm.get("median_gflops")
            if rate is None:
                print(f"  GEMM measurement failed: {gemm}")
            else:
                print(f"  {rate:.1f} GFLOP/s (median)")
            report["bound_images_per_s"] = {
                mode: None if rate is None else rate * 1e9 / flops[mode] for mode in ("train", "infer")
            }
        for batch in args.batch_sizes:
            row: dict[str, Any] = {"batch": batch}
            runs: dict[str, list] = {fw: [] for fw in frameworks}
            for r in range(args.rounds):
                for fw in frameworks if r % 2 == 0 else frameworks[::-1]:
                    print(f"batch {batch:>4}  {fw:<5} ...", end=" ", flush=True)
                    runs[fw].append(spawn(fw, args, work, batch, data))
                    if "error" in runs[fw][-1]:
                        print("FAILED:\n    " + "\n    ".join(runs[fw][-1]["stderr_tail"]))
                    else:
                        print(f"train {runs[fw][-1]['train']['images_per_s']:.1f} img/s, "
                              f"inference {runs[fw][-1]['infer']['images_per_s']:.1f} img/s, "
                              f"peak +{runs[fw][-1]['train']['memory']['peak_increase_mb']:.0f} MB", flush=True)
            for fw in FRAMEWORKS:
                row[fw] = combine_rounds(runs[fw]) if fw in frameworks else {"skipped": torch_note}
            for mode in ("train", "infer"):
                ours, ref = _rate(row["ours"], mode), _rate(row["torch"], mode)
                bound = report["bound_images_per_s"][mode]
                row[f"{mode}_ours_over_torch"] = _ratio(ours, ref)
                row[f"{mode}_ours_percent_of_bound"] = None if _ratio(ours, bound) is None else 100 * ours / bound
                row[f"{mode}_torch_percent_of_bound"] = None if _ratio(ref, bound) is None else 100 * ref / bound
            row["peak_mb_ours_over_torch"] = _ratio(_peak(row["ours"]), _peak(row["torch"]))
            report["results"].append(row)

    methods = {row[fw]["train"]["memory"]["method"] for row in report["results"] for fw in FRAMEWORKS
               if "train" in row[fw]}
    report["memory_method"] = ", ".join(sorted(methods)) or "none"
    for row in report["results"]:
        versions = row["torch"].get("versions") if isinstance(row["torch"], dict) else None
        if versions:
            info["torch"] = versions["torch"]
            info["torch_threads"] = versions["torch_threads"]
            info["torch_cpu_capability"] = versions.get("torch_cpu_capability")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    print(f"\nwrote {os.path.abspath(args.json)}")
    failed = any("error" in row[fw] for row in report["results"] for fw in FRAMEWORKS)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
