"""A quick side-by-side of the convolution engine against torch.nn.functional.conv2d on
the convolutions of Efficient-CapsNet and MatrixCapsNet (and the CapsNet's two), for
development: one training call (forward, weight gradient and the input gradient where
the network needs it) per round, capsnet and PyTorch alternating, medians over rounds.

    PYTHONPATH=$PWD python scripts/conv_side_by_side.py --threads 2 --batches 1 32 100 --rounds 5

The full sweep (every direction, GFLOP/s, memory, JSON) is scripts/bench_conv.py.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fit_conv_cost import SHAPES as FIT_SHAPES

# the convolutions of the networks whose speed the targets name, from the refit's list
SHAPES = [shape for shape in FIT_SHAPES if shape[0].startswith(("efficient", "matrix", "capsnet"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 100])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", nargs="*", help="substrings of the shape names to keep")
    args = parser.parse_args()
    import torch  # noqa: PLC0415

    from capsnet.layers import Conv2d  # noqa: PLC0415
    from capsnet.parallel import blas_limit  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{'shape':26s} {'batch':>5s} {'algorithm':>9s} {'capsnet ms':>10s} {'torch ms':>9s} {'ratio':>6s}")
    with blas_limit(args.threads):
        for name, h, w, c, o, k, s, p, groups, input_grad in SHAPES:
            if args.shapes and not any(part in name for part in args.shapes):
                continue
            for batch in args.batches:
                layer = Conv2d(c, o, k, s, p, groups=groups, input_grad=input_grad, seed=0)
                x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
                y = layer.forward(x)
                gy = rng.standard_normal(y.shape).astype(np.float32)
                layer.backward(gy)
                xt = torch.tensor(x, requires_grad=input_grad)
                wt = torch.tensor(layer.weight.data, requires_grad=True)
                bt = torch.tensor(layer.bias.data, requires_grad=True)
                gyt = torch.tensor(gy)

                def ours():
                    layer.forward(x)
                    layer.backward(gy)

                def theirs():
                    torch.nn.functional.conv2d(xt, wt, bt, stride=s, padding=p, groups=groups).backward(gyt)

                times = {"ours": [], "torch": []}
                for _ in range(args.rounds):
                    for side, fn in (("ours", ours), ("torch", theirs)):
                        start = time.perf_counter()
                        fn()
                        times[side].append(time.perf_counter() - start)
                a, b = statistics.median(times["ours"]), statistics.median(times["torch"])
                print(f"{name:26s} {batch:5d} {layer.algorithm_for(h, w, batch):>9s} {a * 1e3:10.2f} {b * 1e3:9.2f} "
                      f"{b / a:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
