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
    PYTHONPATH=$PWD python scripts/fit_conv_cost.py --refit /tmp/m.json --out /tmp/m.json   # new features, same timings
    PYTHONPATH=$PWD python scripts/fit_conv_cost.py --update winograd   # a new algorithm: its shapes timed again

``--update ALGORITHM`` times again, at the shipped table's batch sizes and thread counts, only
the shapes that ALGORITHM can run (every candidate of each), keeps the table's other timings
and refits every algorithm from the union: a new algorithm joins without a whole sweep.

The shipped table is capsnet/layers/convolution/cost_model.json, with the timings it was
fitted from; each timing is the median of --rounds rounds in which the candidates alternate,
after a warm-up round.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import machine_info

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


def time_round(algs: dict, g, x, w, gy, training: bool, input_grad: bool) -> dict:
    """One call of each algorithm, one after the other: {name: seconds}."""
    times = {}
    for name, alg in algs.items():
        start = time.perf_counter()
        y, saved = alg.forward(g, x, w, None, training)
        if training:
            alg.backward(g, gy, saved, w, input_grad)
        times[name] = time.perf_counter() - start
        del y, saved
    return times


def shapes_for(algorithm: str | None) -> list[tuple]:
    """SHAPES, or those that ``algorithm`` can run (at batch 1: support does not depend on the batch)."""
    if algorithm is None:
        return list(SHAPES)
    from capsnet.layers.convolution import ConvGeometry, make  # noqa: PLC0415

    alg = make(algorithm)
    return [shape for shape in SHAPES
            if alg.supports(ConvGeometry(1, shape[1], shape[2], shape[3], shape[4], shape[5], shape[5], shape[6],
                                         shape[7], shape[8]))]


def sweep(batches: list[int], rounds: int, max_seconds: float, shapes: list[tuple] | None = None) -> list[dict]:
    """Per shape, batch and mode, the candidates alternate within each round (a load spike
    from other jobs hits them alike); each one's median over the rounds, after a warm-up."""
    from capsnet.layers.convolution import ConvGeometry, candidates, make  # noqa: PLC0415

    rows = []
    rng = np.random.default_rng(0)
    for name, h, wd, c, o, k, s, p, groups, input_grad in SHAPES if shapes is None else shapes:
        for batch in batches:
            g = ConvGeometry(batch, h, wd, c, o, k, k, s, p, groups)
            x = rng.standard_normal((batch, h, wd, c)).astype(np.float32)
            w = rng.standard_normal((o, c // groups, k, k)).astype(np.float32)
            gy = rng.standard_normal((batch, g.out_h, g.out_w, o)).astype(np.float32)
            for training in (False, True):
                algs = {n: make(n) for n in candidates(g)}
                time_round(algs, g, x, w, gy, training, input_grad)  # plans, tables, page faults
                samples = [time_round(algs, g, x, w, gy, training, input_grad)]
                # a candidate far slower than the best tells the fit nothing more rounds would
                best = min(samples[0].values())
                kept = {n: a for n, a in algs.items() if samples[0][n] <= max(max_seconds, 10 * best)}
                samples += [time_round(kept, g, x, w, gy, training, input_grad) for _ in range(rounds - 1)]
                for alg_name in algs:
                    seconds = statistics.median(r[alg_name] for r in samples if alg_name in r)
                    rows.append({"shape": name, "batch": batch, "algorithm": alg_name, "training": training,
                                 "input_grad": input_grad, "geometry": g, "seconds": seconds})
                    print(f"{name:26s} b{batch:<4d} {alg_name:9s} {'train' if training else 'infer'} "
                          f"{seconds * 1e3:9.2f} ms", flush=True)
                for alg in algs.values():
                    alg.release()
    return rows


def _row_to_json(row: dict) -> dict:
    import dataclasses  # noqa: PLC0415

    return {**row, "geometry": dataclasses.asdict(row["geometry"])}


def _row_from_json(row: dict) -> dict:
    from capsnet.layers.convolution import ConvGeometry  # noqa: PLC0415

    return {**row, "geometry": ConvGeometry(**row["geometry"])}


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


def check(rows: list[dict], table: dict) -> str:
    """How often the fitted model picks the fastest measured candidate, and the geometric
    mean of (time of its pick / time of the fastest) over the sweep's cases."""
    from capsnet.layers.convolution import cost_features  # noqa: PLC0415

    cases: dict = {}
    for r in rows:
        cases.setdefault((r["shape"], r["batch"], r["training"]), {})[r["algorithm"]] = r
    right, regret = 0, []
    for case in cases.values():
        if len(case) < 2:
            continue
        pick = min(case, key=lambda n: cost_features(n, case[n]["geometry"], case[n]["training"],
                                                     case[n]["input_grad"]) @ np.asarray(table[n]))
        best = min(case, key=lambda n: case[n]["seconds"])
        right += pick == best
        regret.append(case[pick]["seconds"] / case[best]["seconds"])
    return (f"picks the fastest in {right} of {len(regret)} cases; its picks take "
            f"{float(np.exp(np.mean(np.log(regret)))):.3f}x the fastest's time (geometric mean)")


def dump(model: dict, path: str) -> None:
    """One line per top-level key: the tables stay readable, the timings take no indentation."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in model.items()]
    Path(path).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=0.5,
                        help="a candidate slower than this and than 10x the best in the first round is not timed again")
    parser.add_argument("--refit", metavar="JSON",
                        help="fit again from the timings stored in a model file (after the features changed)")
    parser.add_argument("--update", metavar="ALGORITHM",
                        help="time again only the shapes ALGORITHM can run, keep the other timings of --base, refit")
    parser.add_argument("--base", default=str(REPO / "capsnet" / "layers" / "convolution" / "cost_model.json"),
                        help="the model whose timings --update keeps")
    parser.add_argument("--out", default=str(REPO / "capsnet" / "layers" / "convolution" / "cost_model.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from capsnet.parallel import blas_limit  # noqa: PLC0415

    from capsnet.layers.convolution.select import FEATURES  # noqa: PLC0415

    if args.refit:
        model = json.loads(Path(args.refit).read_text())
        for threads, rows in model["timings"].items():
            rows = [_row_from_json(r) for r in rows]
            model["threads"][threads] = fit(rows)
            model.setdefault("check", {})[threads] = check(rows, model["threads"][threads])
            print(f"{threads} thread(s): {model['check'][threads]}")
        model["features"] = list(FEATURES)
        dump(model, args.out)
        print(f"refitted {args.refit} into {args.out}")
        return
    if args.update:
        from capsnet.layers.convolution import ALGORITHMS  # noqa: PLC0415

        if args.update not in ALGORITHMS:
            parser.error(f"--update must name one of {tuple(ALGORITHMS)}, got {args.update!r}")
        model = json.loads(Path(args.base).read_text())
        shapes = shapes_for(args.update)
        names = {shape[0] for shape in shapes}
        print(f"--update {args.update}: timing again {sorted(names)} at batches {model['batches']}")
        for threads in list(model["timings"]):
            with blas_limit(int(threads)):
                print(f"-- {threads} BLAS thread(s)")
                new = sweep(model["batches"], args.rounds, args.max_seconds, shapes)
            kept = [_row_from_json(r) for r in model["timings"][threads] if r["shape"] not in names]
            rows = kept + new
            model["threads"][threads] = fit(rows)
            model["timings"][threads] = [_row_to_json(r) for r in rows]
            model.setdefault("check", {})[threads] = check(rows, model["threads"][threads])
            print(f"{threads} thread(s): {model['check'][threads]}")
        model["features"] = list(FEATURES)
        model.setdefault("updates", []).append({
            "command": "PYTHONPATH=$PWD python scripts/fit_conv_cost.py " + " ".join(sys.argv[1:]),
            "shapes": sorted(names), "machine": machine_info(None)})
        dump(model, args.out)
        print(f"wrote {args.out}")
        return
    model = {"version": 1, "features": list(FEATURES),
             "command": "PYTHONPATH=$PWD python scripts/fit_conv_cost.py " + " ".join(sys.argv[1:]),
             "machine": machine_info(None), "batches": args.batches, "threads": {}, "timings": {}}
    for threads in args.threads:
        with blas_limit(threads):
            print(f"-- {threads} BLAS thread(s)")
            rows = sweep(args.batches, args.rounds, args.max_seconds)
            model["threads"][str(threads)] = fit(rows)
            model["timings"][str(threads)] = [_row_to_json(r) for r in rows]
            model.setdefault("check", {})[str(threads)] = check(rows, model["threads"][str(threads)])
            print(f"{threads} thread(s): {model['check'][str(threads)]}")
    dump(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
