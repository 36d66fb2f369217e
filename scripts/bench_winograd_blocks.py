"""How big a block of images the Winograd convolutions should run in on this CPU.

On NumPy, :class:`capsnet.layers.convolution.Winograd` and ``Winograd4`` run a block of
images at a time from the gather to the output (``winograd.BLOCK_BYTES``: the largest
intermediate of a block, a^2 x tiles x channels values, at most that many bytes). This
times, one BLAS thread, an inference forward and a training call (forward, then both
gradients) of F(4x4, 3x3) on Efficient-CapsNet's two 3x3 stride-1 layers and a CIFAR-style
3x3 64->64 with padding 1, at each block size of ``--block-kb`` and with the whole batch as
one block ("whole"), the sizes taking turns in ``--rounds`` rounds (medians). The default
block size (3/4 of the L2 cache the OS reports) is marked, and the JSON records the machine.

    PYTHONPATH=$PWD python scripts/bench_winograd_blocks.py
    PYTHONPATH=$PWD python scripts/bench_winograd_blocks.py --batch-sizes 16 --block-kb 256 768 --rounds 5
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from benchlib import Timed, alternate, machine_heading, machine_info, markdown_table, write_json

# (name, height, width, in, out, padding)
SHAPES = [
    ("efficient 3x3 a (32->64)", 24, 24, 32, 64, 0),
    ("efficient 3x3 b (64->64)", 22, 22, 64, 64, 0),
    ("cifar 3x3 p1 (64->64)", 32, 32, 64, 64, 1),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 50, 100], metavar="B")
    p.add_argument("--block-kb", type=int, nargs="+", default=[256, 512, 768, 1536, 4096], metavar="KB",
                   help="block sizes to time, in KiB (the whole batch as one block is always timed too)")
    p.add_argument("--algorithm", choices=("winograd", "winograd4"), default="winograd4")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds; each figure is their median")
    p.add_argument("--min-round-time", type=float, default=0.1, metavar="SECONDS")
    p.add_argument("--json", default="scripts/results/winograd-blocks.json", help="where to write every figure")
    args = p.parse_args(argv)

    from capsnet.parallel import blas_limit  # noqa: PLC0415

    with blas_limit(1):  # one BLAS thread, as in a replica
        return _sweep(args)


def _sweep(args: argparse.Namespace) -> int:
    from capsnet.layers.convolution import ConvGeometry, make, winograd  # noqa: PLC0415

    default_bytes = winograd.BLOCK_BYTES
    default_label = f"{default_bytes >> 10} KiB (default)"
    sizes = {f"{kb} KiB": kb << 10 for kb in args.block_kb if kb << 10 != default_bytes}
    sizes[default_label] = default_bytes
    sizes = dict(sorted(sizes.items(), key=lambda item: item[1]))
    sizes["whole"] = 1 << 62
    rng = np.random.default_rng(0)
    rows = []
    for name, h, w, c, o, pad in SHAPES:
        for batch in args.batch_sizes:
            g = ConvGeometry(batch, h, w, c, o, 3, 3, 1, pad, 1, "float32")
            x = rng.standard_normal((batch, h, w, c)).astype(np.float32)
            wt = (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
            gy = rng.standard_normal((batch, g.out_h, g.out_w, o)).astype(np.float32)
            alg = make(args.algorithm)

            def with_block(size: int, call):
                def run():
                    winograd.BLOCK_BYTES = size
                    try:
                        return call()
                    finally:
                        winograd.BLOCK_BYTES = default_bytes
                return run

            def training():
                y, saved = alg.forward(g, x, wt, None, training=True)
                return alg.backward(g, gy, saved, wt)

            for direction, call in (("inference", lambda: alg.forward(g, x, wt, None, training=False)),
                                    ("training", training)):
                impls = {label: Timed(with_block(size, call)) for label, size in sizes.items()}
                timed = alternate(impls, args.rounds, warmup=1, min_round_time=args.min_round_time)
                ms = {label: timed[label]["seconds"] * 1e3 for label in sizes}
                blocks = {label: with_block(size, lambda: len(winograd._blocks(g, alg.m, max(c, o), np)))()
                          for label, size in sizes.items()}
                best = min(ms, key=ms.get)
                rows.append({"shape": name, "batch": batch, "direction": direction, "ms": ms, "blocks": blocks,
                             "rounds": {label: timed[label]["rounds"] for label in sizes}, "fastest": best,
                             "whole_over_default": ms["whole"] / ms[default_label]})
                print(f"{name}, batch {batch}, {direction}: "
                      + ", ".join(f"{label} {v:.2f} ms ({blocks[label]} blocks)" for label, v in ms.items())
                      + f"; fastest {best}", flush=True)
    info = machine_info(1)
    report = {"machine": info, "settings": {**vars(args), "default_block_bytes": default_bytes}, "rows": rows}
    write_json(args.json, report)
    labels = list(sizes)
    print()
    print(machine_heading(info, 1))
    print(f"default block: {default_bytes >> 10} KiB (3/4 of the L2 cache the OS reports)")
    print(markdown_table(["shape", "batch", "direction", *[f"{lab} (ms)" for lab in labels], "whole / default"],
                         [[r["shape"], r["batch"], r["direction"], *[f"{r['ms'][lab]:.2f}" for lab in labels],
                           f"{r['whole_over_default']:.2f}x"] for r in rows]))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
