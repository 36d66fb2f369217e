"""Refit the convolution engine's cost model from a sweep on this machine.

For each convolution of the built-in networks (and a CIFAR-style 3x3 and a 1x1), each
batch size and each algorithm that can run it, this times an inference call (forward)
and a training call (forward, weight gradient and, where the network needs it, input
gradient), with NumPy's BLAS on 1 and on 2 threads. Per algorithm and thread count it
fits, by non-negative least squares on the relative error, the seconds per feature of
:func:`capsnet.layers.convolution.cost_features` (calls, matrix-product flops,
element-wise flops, values moved), and writes them with the machine they came from:

    PYTHONPATH=$PWD python scripts/fit_conv_cost.py                   # writes the shipped table
    PYTHONPATH=$PWD python scripts/fit_conv_cost.py --out /tmp/m.json --batches 1 8 --threads 1

The shipped table is capsnet/layers/convolution/cost_model.json; timings are the
minimum of --repeats calls after one warm-up call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# (name, height, width, in, out, kernel, stride, padding, groups, input gradient in training)
SHAPES = [
    ("capsnet conv1 9x9", 28, 28, 1, 256, 9, 1, 0, 1, False),
    ("capsnet primary 9x9 s2", 20, 20, 256, 256, 9, 2, 0, 1, True),
    ("efficient 5x5", 28, 28, 1, 32, 5, 1, 0, 1, False),
    ("efficient 3x3 a", 24, 24, 32, 64, 3, 1, 0, 1, True),
    ("efficient 3x3 b", 22, 22, 64, 64, 3, 1, 0, 1, True),
    ("efficient 3x3 s2", 20, 20, 64, 128, 3, 2, 0, 1, True),
    ("efficient depthwise 9x9", 9, 9, 128, 128, 9, 1, 0, 128, True),
    ("matrix conv1 5x5 s2", 28, 28, 1, 32, 5, 2, 0, 1, False),
    ("matrix primary 1x1", 12, 12, 32, 136, 1, 1, 0, 1, True),
    ("baseline 5x5 p2", 28, 28, 1, 256, 5, 1, 2, 1, False),
    ("cifar 3x3 p1", 32, 32, 64, 64, 3, 1, 1, 1, True),
    ("pointwise 256->64", 14, 14, 256, 64, 1, 1, 0, 1, True),
    ("grouped 3x3 g2", 16, 16, 32, 32, 3, 1, 1, 2, True),
]


def machine() -> dict:
    cpu, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = [x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "fma", "sse4"))]
    except OSError:
        pass
    blas = None
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
        blas = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for d in threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        pass
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"cpu_model": cpu, "vector_extensions": flags, "blas": blas, "numpy": np.__version__,
            "platform": platform.platform(), "git_commit": commit.stdout.strip() or None}


def time_call(alg, g, x, w, gy, training: bool, input_grad: bool, repeats: int) -> float:
    best = float("inf")
    for k in range(repeats + 1):
        start = time.perf_counter()
        y, saved = alg.forward(g, x, w, None, training)
        if training:
            alg.backward(g, gy, saved, w, input_grad)
        if k:
            best = min(best, time.perf_counter() - start)
        del y, saved
    alg.release()
    return best


def sweep(batches: list[int], repeats: int, max_seconds: float) -> list[dict]:
    from capsnet.layers.convolution import ConvGeometry, candidates, make  # noqa: PLC0415

    rows, slow = [], set()
    rng = np.random.default_rng(0)
    for name, h, wd, c, o, k, s, p, groups, input_grad in SHAPES:
        for batch in batches:
            g = ConvGeometry(batch, h, wd, c, o, k, k, s, p, groups)
            x = rng.standard_normal((batch, h, wd, c)).astype(np.float32)
            w = rng.standard_normal((o, c // groups, k, k)).astype(np.float32)
            gy = rng.standard_normal((batch, g.out_h, g.out_w, o)).astype(np.float32)
            for alg_name in candidates(g):
                if (name, alg_name) in slow:  # far off the pace at a smaller batch: the fit needs no more of it
                    continue
                for training in (False, True):
                    seconds = time_call(make(alg_name), g, x, w, gy, training, input_grad, repeats)
                    rows.append({"shape": name, "batch": batch, "algorithm": alg_name, "training": training,
                                 "input_grad": input_grad, "geometry": g, "seconds": seconds})
                    print(f"{name:26s} b{batch:<4d} {alg_name:9s} {'train' if training else 'infer'} "
                          f"{seconds * 1e3:9.2f} ms", flush=True)
                    if seconds > max_seconds:
                        slow.add((name, alg_name))
                        break
    return rows


def fit(rows: list[dict]) -> dict:
    from scipy.optimize import nnls  # noqa: PLC0415

    from capsnet.layers.convolution import cost_features  # noqa: PLC0415

    table = {}
    for alg_name in sorted({r["algorithm"] for r in rows}):
        mine = [r for r in rows if r["algorithm"] == alg_name]
        a = np.array([cost_features(alg_name, r["geometry"], r["training"], r["input_grad"]) for r in mine])
        t = np.array([r["seconds"] for r in mine])
        scale = a.max(axis=0)
        scale[scale == 0] = 1
        coef, _ = nnls((a / scale) / t[:, None], np.ones(len(t)))  # least squares on the relative error
        table[alg_name] = [float(v) for v in coef / scale]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=1.0,
                        help="after a call slower than this, skip that algorithm on that shape from then on")
    parser.add_argument("--out", default=str(REPO / "capsnet" / "layers" / "convolution" / "cost_model.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from capsnet.parallel import blas_limit  # noqa: PLC0415

    model = {"version": 1, "features": ["calls", "gemm_flops", "elementwise_flops", "values_moved"],
             "command": "PYTHONPATH=$PWD python scripts/fit_conv_cost.py " + " ".join(sys.argv[1:]),
             "machine": machine(), "batches": args.batches, "threads": {}}
    for threads in args.threads:
        with blas_limit(threads):
            print(f"-- {threads} BLAS thread(s)")
            model["threads"][str(threads)] = fit(sweep(args.batches, args.repeats, args.max_seconds))
    Path(args.out).write_text(json.dumps(model, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
