"""Efficient-CapsNet's prediction layer by layer, capsnet beside the PyTorch reference
(scripts/torch_efficient_capsnet.py) with the same weights and running statistics, on one
thread: where the time of an inference goes, and which layer is behind.

Each layer is timed alone on the previous layer's output (both frameworks in one process,
their order alternating every round; a row's figure is the median over the rounds). Two
more rows time capsnet's convolution stack as its ``Sequential`` runs it in evaluation,
where each Conv2d folds the BatchNorm2d after it into its weights (``Module.folded_with``),
and PyTorch's stack, and the whole prediction of each (``EfficientCapsNet.predict`` without
the decoder; the reference's capsules and lengths under ``torch.inference_mode``).

    PYTHONPATH=$PWD python scripts/profile_efficient_layers.py --batch 16 --rounds 40 \\
        --json scripts/results/efficient-layers-b16-1thread.json
    PYTHONPATH=$PWD python scripts/profile_efficient_layers.py --training --threads 2 --batch 16

Batch 16 on one thread is what each of the two replicas of a batch-32 prediction runs on
this project's 2-core machines. ``--training`` times each stage's forward and backward in
training mode instead (batch statistics, parameter gradients; the first convolution without an
input gradient, as in the network), the decoder, and a whole training step without the
optimizer (forward, margin + reconstruction loss, backward). Compare at one thread: with
``--threads 2`` both frameworks' thread pools live in one process and get in each other's way
(capsnet's whole step took 48.8 ms at 2 threads against 41.1 ms at 1, PyTorch's 73.6 against
45.0; scripts/results/efficient-training-b16-*thread-0.5.3.json). Two threads are compared in
separate processes by scripts/time_to_accuracy.py and scripts/bench.py.
Needs torch. Threads: NumPy's BLAS and torch both limited to ``--threads`` (threadpoolctl when
installed, else the OPENBLAS/OMP variables set before NumPy loads).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

def _threads_arg(argv: list[str]) -> str:
    """--threads as given on the command line (read before NumPy loads), else "1"."""
    for i, arg in enumerate(argv):
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
    return "1"


for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _threads_arg(sys.argv[1:]))  # before NumPy loads, unless the caller set it

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from benchlib import machine_heading, machine_info, markdown_table, write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batch", type=int, default=16, help="images per prediction (default 16)")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds; each row is their median (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    p.add_argument("--training", action="store_true",
                   help="time forward and backward in training mode, and a whole training step")
    p.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    p.add_argument("--json", type=Path, help="write the rows and the machine here")
    args = p.parse_args(argv)
    for name in ("batch", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")
    return args


def build(batch: int) -> tuple[Any, Any, Any]:
    """(capsnet model, PyTorch reference, input): the same weights, running statistics away
    from their initial values (as after training), both in evaluation mode."""
    import torch  # noqa: PLC0415

    from capsnet.models import EfficientCapsNet  # noqa: PLC0415
    from torch_efficient_capsnet import TorchEfficientCapsNet  # noqa: PLC0415

    rng = np.random.default_rng(0)
    ours = EfficientCapsNet(dtype="float32", seed=0)
    for layer in ours.features:
        if hasattr(layer, "running_mean"):
            layer.running_mean.data[...] = rng.normal(0, 0.1, layer.num_features)
            layer.running_var.data[...] = rng.uniform(0.5, 2, layer.num_features)
    theirs = TorchEfficientCapsNet(dtype=torch.float32)
    theirs.load_from_capsnet(ours.state_dict())
    ours.eval()
    theirs.eval()
    return ours, theirs, rng.random((batch, 1, 28, 28), dtype=np.float32)


def stages(ours: Any, theirs: Any, x: np.ndarray) -> dict[str, dict[str, Callable[[], Any]]]:
    """{row: {framework: a call timing that stage on the stage's real input}}."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from capsnet.layers import relu  # noqa: PLC0415
    from torch_efficient_capsnet import efficient_squash  # noqa: PLC0415

    rows: dict[str, dict[str, Callable[[], Any]]] = {}
    h, t = x, torch.from_numpy(x)
    ours_layers = list(ours.features)
    with torch.inference_mode():
        for k, (conv, norm) in enumerate(zip(theirs.convs, theirs.norms)):
            c, n, r = ours_layers[3 * k: 3 * k + 3]
            hc = c(h)
            hn = n(hc)
            tc = conv(t)
            tn = norm(tc)
            rows[f"conv {k} ({c.in_channels}->{c.out_channels} {c.kernel_size}x{c.kernel_size})"] = {
                "capsnet": (lambda c=c, h=h: c(h)), "torch": (lambda conv=conv, t=t: conv(t))}
            rows[f"batch norm {k}"] = {"capsnet": (lambda n=n, hc=hc: n(hc)), "torch": (lambda norm=norm, tc=tc: norm(tc))}
            rows[f"relu {k} (out of place)"] = {"capsnet": (lambda hn=hn: relu(hn)),
                                                "torch": (lambda tn=tn: F.relu(tn))}
            h, t = r(hn), F.relu(tn)
        b = x.shape[0]
        u = ours.primary(h)
        tu = efficient_squash(theirs.primary(t).reshape(b, theirs.primary_caps, theirs.primary_dim))
        v, tv = ours.digit(u), theirs.digit(tu)
    rows["primary capsules"] = {
        "capsnet": lambda: ours.primary(h),
        "torch": lambda: efficient_squash(theirs.primary(t).reshape(b, theirs.primary_caps, theirs.primary_dim))}
    rows["FCCaps routing"] = {"capsnet": lambda: ours.digit(u), "torch": lambda: theirs.digit(tu)}
    rows["lengths"] = {"capsnet": lambda: ours.length(v), "torch": lambda: tv.norm(dim=-1)}

    def torch_stack() -> Any:
        y = torch.from_numpy(x)
        for conv, norm in zip(theirs.convs, theirs.norms):
            y = F.relu(norm(conv(y)))
        return y

    rows["convolution stack, as run (capsnet: batch norms folded)"] = {
        "capsnet": lambda: ours.features(x), "torch": torch_stack}
    rows["whole prediction"] = {"capsnet": lambda: ours.predict(x),
                                "torch": lambda: theirs(torch.from_numpy(x))[0]}
    return rows


def training_stages(ours: Any, theirs: Any, x: np.ndarray) -> dict[str, dict[str, Callable[[], Any]]]:
    """{row: {framework: a call running that stage's forward and backward in training mode on
    the stage's real input}}: each stage gets a fixed random output gradient; parameter
    gradients accumulate on both sides, as in a step."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from capsnet.layers import MarginLoss, ReconstructionLoss  # noqa: PLC0415
    from torch_capsnet import total_loss  # noqa: PLC0415
    from torch_efficient_capsnet import efficient_squash  # noqa: PLC0415

    ours.train()
    theirs.train()
    rng = np.random.default_rng(1)
    b = x.shape[0]
    labels = rng.integers(0, 10, b)
    rows: dict[str, dict[str, Callable[[], Any]]] = {}

    def pair(ours_fn: Callable[[Any], Any], ours_bwd: Callable[[Any], Any], ours_in: Any,
             torch_fn: Callable[[Any], Any], torch_in: Any, input_grad: bool = True) -> tuple:
        """Both calls of a stage, and the stage's outputs (for the next stage)."""
        y = ours_fn(ours_in)
        shape = y.shape
        g = rng.standard_normal(shape).astype(np.float32)
        if y.ndim == 4:  # the layout the network's own gradient arrives in: channels-last memory
            g = np.ascontiguousarray(g.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        ours_bwd(g)
        leaf = torch_in.detach().clone().requires_grad_(input_grad)
        tg = torch.from_numpy(np.ascontiguousarray(g))

        def ours_call() -> None:
            ours_fn(ours_in)
            ours_bwd(g)

        def torch_call() -> None:
            torch_fn(leaf).backward(tg)
        with torch.no_grad():
            ty = torch_fn(torch_in)
        return {"capsnet": ours_call, "torch": torch_call}, y, ty

    h, t = x, torch.from_numpy(x)
    layers = list(ours.features)
    for k, (conv, norm) in enumerate(zip(theirs.convs, theirs.norms)):
        c, n, r = layers[3 * k: 3 * k + 3]
        name = f"conv {k} ({c.in_channels}->{c.out_channels} {c.kernel_size}x{c.kernel_size})"
        rows[name], hc, tc = pair(c, c.backward, h, conv, t, input_grad=k > 0)
        rows[f"batch norm {k}"], hn, tn = pair(n, n.backward, hc, norm, tc)
        rows[f"relu {k}"], h, t = pair(r, r.backward, hn, F.relu, tn)  # in place as in the network: idempotent
    rows["primary capsules"], u, tu = pair(
        ours.primary, ours.primary.backward, h,
        lambda a: efficient_squash(theirs.primary(a).reshape(b, theirs.primary_caps, theirs.primary_dim)), t)
    rows["FCCaps routing"], v, tv = pair(ours.digit, ours.digit.backward, u, theirs.digit, tu)
    masked = ours.mask(v, labels)
    tmasked = torch.from_numpy(np.ascontiguousarray(masked.reshape(b, -1)))

    def torch_decoder(a: Any) -> Any:
        for j, layer in enumerate(theirs.decoder):
            a = layer(a)
            a = torch.relu(a) if j < len(theirs.decoder) - 1 else torch.sigmoid(a)
        return a
    rows["decoder"], _, _ = pair(ours.decoder, ours.decoder.backward, masked, torch_decoder, tmasked)
    margin, recon_loss = MarginLoss(), ReconstructionLoss(0.0005)
    tx, ty = torch.from_numpy(x), torch.from_numpy(labels)

    def ours_step() -> None:
        lengths, recon = ours(x, labels)
        margin(lengths, labels)
        recon_loss(recon, x)
        ours.backward(margin.backward(), recon_loss.backward())

    def torch_step() -> None:
        lengths, recon = theirs(tx, ty)
        total_loss(lengths, recon, ty, tx, 0.0005).backward()
    rows["whole training step (no optimizer)"] = {"capsnet": ours_step, "torch": torch_step}
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise SystemExit("profile_efficient_layers.py needs torch for the PyTorch reference: pip install torch") from None
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415
        limit = threadpool_limits(args.threads)
    except ImportError:  # the environment variables above hold NumPy's BLAS to one thread
        limit = None
    try:
        ours, theirs, x = build(args.batch)
        rows = training_stages(ours, theirs, x) if args.training else stages(ours, theirs, x)
        times: dict[tuple[str, str], list[float]] = {}
        with contextlib.nullcontext() if args.training else torch.inference_mode():
            for r in range(args.warmup + args.rounds):
                for name, calls in rows.items():
                    order = list(calls.items())
                    for framework, call in (order if r % 2 == 0 else order[::-1]):
                        t0 = time.perf_counter()
                        call()
                        if r >= args.warmup:
                            times.setdefault((name, framework), []).append(time.perf_counter() - t0)
    finally:
        if limit is not None:
            limit.unregister()
    table = []
    for name in rows:
        ms = {fw: 1e3 * statistics.median(times[(name, fw)]) for fw in ("capsnet", "torch")}
        table.append({"stage": name, "capsnet_ms": ms["capsnet"], "torch_ms": ms["torch"],
                      "torch_over_capsnet": ms["torch"] / ms["capsnet"]})
    info = machine_info(args.threads)
    what = "training, forward and backward," if args.training else "prediction,"
    print(machine_heading(info, args.threads) + f"; Efficient-CapsNet {what} batch {args.batch}, median of "
          f"{args.rounds} rounds\n")
    print(markdown_table(["stage", "capsnet ms", "torch ms", "torch / capsnet"],
                         [[r["stage"], f"{r['capsnet_ms']:.3f}", f"{r['torch_ms']:.3f}",
                           f"{r['torch_over_capsnet']:.2f}x"] for r in table], right=[False, True, True, True]))
    if args.json:
        write_json(args.json, {"machine": info, "settings": vars(args) | {"json": str(args.json)}, "rows": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
