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

Batch 16 on one thread is what each of the two replicas of a batch-32 prediction runs on
this project's 2-core machines. Needs torch. Threads: NumPy's BLAS and torch both limited
to one (threadpoolctl when installed, else the OPENBLAS/OMP variables set before NumPy loads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before NumPy loads: one thread unless the caller says otherwise

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from benchlib import machine_heading, machine_info, markdown_table, write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batch", type=int, default=16, help="images per prediction (default 16)")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds; each row is their median (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    p.add_argument("--json", type=Path, help="write the rows and the machine here")
    args = p.parse_args(argv)
    for name in ("batch", "rounds"):
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise SystemExit("profile_efficient_layers.py needs torch for the PyTorch reference: pip install torch") from None
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415
        limit = threadpool_limits(1)
    except ImportError:  # the environment variables above hold NumPy's BLAS to one thread
        limit = None
    try:
        ours, theirs, x = build(args.batch)
        rows = stages(ours, theirs, x)
        times: dict[tuple[str, str], list[float]] = {}
        with torch.inference_mode():
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
    info = machine_info(1)
    print(machine_heading(info, 1) + f"; Efficient-CapsNet prediction, batch {args.batch}, median of "
          f"{args.rounds} rounds\n")
    print(markdown_table(["stage", "capsnet ms", "torch ms", "torch / capsnet"],
                         [[r["stage"], f"{r['capsnet_ms']:.3f}", f"{r['torch_ms']:.3f}",
                           f"{r['torch_over_capsnet']:.2f}x"] for r in table], right=[False, True, True, True]))
    if args.json:
        write_json(args.json, {"machine": info, "settings": vars(args) | {"json": str(args.json)}, "rows": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
