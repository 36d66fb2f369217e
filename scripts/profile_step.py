"""Where a training step's time goes: the paper-sized CapsNet, float32, one batch.

Times (median of several runs, milliseconds) the whole step and each component
on its own: the two convolutions forward and backward, routing, u_hat, Adam.
Used for the optimisation notes in NOTES.md; run it on a quiet machine.

    python scripts/profile_step.py --batch-size 100
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from capsnet.layers import capsule as caps
from capsnet.layers import conv
from capsnet.layers.convolution import fourier
from capsnet.models import CapsNet, CapsNetLoss
from capsnet.optim import Adam


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    b = args.batch_size
    rng = np.random.default_rng(0)
    model, criterion = CapsNet(), CapsNetLoss()
    opt = Adam(model.parameters())
    x = rng.random((b, 1, 28, 28), dtype=np.float32)
    y = np.arange(b) % 10

    def step() -> None:
        lengths, recon = model(x, y)
        criterion(lengths, recon, y, x)
        opt.zero_grad()
        model.backward(*criterion.backward())
        opt.step()

    rows = []
    for algorithm in ("im2col", "fourier"):
        model.primary.conv.algorithm = algorithm
        rows.append((f"training step ({algorithm})", median_ms(step, args.repeats)))
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    w1, b1 = model.conv1.weight.data, model.conv1.bias.data
    w2, b2 = model.primary.conv.weight.data, model.primary.conv.bias.data
    h = np.maximum(conv.conv2d_nhwc(x_nhwc, w1, b1), 0)
    y2, cache = fourier.conv2d_fourier_nhwc(h, w2, b2, 2)
    g1 = rng.random(h.shape, dtype=np.float32)
    g2 = rng.random(y2.shape, dtype=np.float32)
    rows += [
        ("conv1 forward", median_ms(lambda: conv.conv2d_nhwc(x_nhwc, w1, b1), args.repeats)),
        ("conv1 backward (weights only)", median_ms(lambda: conv.conv2d_nhwc_backward(g1, x_nhwc, w1, need_input_grad=False), args.repeats)),
        ("primary conv forward (im2col)", median_ms(lambda: conv.conv2d_nhwc(h, w2, b2, 2), args.repeats)),
        ("primary conv backward (im2col)", median_ms(lambda: conv.conv2d_nhwc_backward(g2, h, w2, 2), args.repeats)),
        ("primary conv forward (fourier)",
         median_ms(lambda: fourier.conv2d_fourier_nhwc(h, w2, b2, 2), args.repeats)),
        ("primary conv backward (fourier)",
         median_ms(lambda: fourier.conv2d_fourier_nhwc_backward(g2, cache, w2, 2), args.repeats)),
    ]
    model.primary.eval()
    u = model.primary.forward_nhwc(h)
    wd = model.digit.weight.data
    u_hat = caps.capsule_predictions(u, wd)
    v, state = caps.dynamic_routing(u_hat, 3)
    gv = rng.random(v.shape, dtype=np.float32)
    g_hat = caps.dynamic_routing_backward(gv, u_hat, state)
    rows += [
        ("u_hat = W u", median_ms(lambda: caps.capsule_predictions(u, wd), args.repeats)),
        ("routing forward (3 iterations)", median_ms(lambda: caps.dynamic_routing(u_hat, 3), args.repeats)),
        ("routing backward", median_ms(lambda: caps.dynamic_routing_backward(gv, u_hat, state), args.repeats)),
        ("u_hat backward", median_ms(lambda: caps.capsule_predictions_backward(g_hat, u, wd), args.repeats)),
        ("Adam step", median_ms(opt.step, args.repeats)),
    ]
    print(f"batch {b}, float32, median of {args.repeats}")
    for name, ms in rows:
        print(f"  {name:32s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
