"""The convolution sweep (issue 29): every convolution of the built-in networks, capsnet
against PyTorch, forward and backward, with the machine's GEMM rate beside each.

**Shapes.** Each ``Conv2d`` of the five built-in networks at their default sizes, read off
the models by running each once at batch 1 and recording the input every convolution
sees: the paper's CapsNet (conv1, PrimaryCaps), its MultiMNIST network (36x36 inputs),
EfficientCapsNet (the 5x5/3x3 stack and the depthwise primary capsules), MatrixCapsNet
(conv1 and the 1x1 primary capsules; its ConvCaps layers are EM routing, not convolutions,
and are not swept) and the baseline CNN; identical geometries are swept once, under the
first network's name. Two more: a CIFAR-style 3x3 64->64 on 32x32 with padding 1, and a
1x1 256->64 on 32x32. ``--shapes`` keeps the names that contain one of its words.

**Directions.** ``forward``: a training-mode forward (``Conv2d(x)``; PyTorch's
``F.conv2d`` with autograd recording). ``backward``: the input and weight gradients of a
layer inside a network (``Conv2d.backward`` with ``input_grad=True``;
``torch.autograd.grad(y, (x, w, b), g)``). ``weight_grad``: the weight (and bias) gradient
alone, what a network's first layer runs (``Conv2d(..., input_grad=False)``;
``torch.autograd.grad(y, (w, b), g)``). capsnet's layer API has no call for the input
gradient alone, so it is measured with the weight gradient, as every inner layer of a
network needs both. A backward is timed alone: its forward runs untimed before each call.

**Implementations.** capsnet's ``Conv2d`` with each algorithm of
``capsnet.layers.conv.ALGORITHMS`` (read at run time): ``auto`` and each pinned one that
applies to the shape (one that raises ``ValueError``/``NotImplementedError`` is recorded as
not applicable; one that the layer runs as another algorithm, as grouped convolutions do,
is recorded as such and not timed twice); and PyTorch's ``torch.nn.functional.conv2d``
(``--no-torch`` leaves it out). All get the same float32 inputs and weights; the first
call of each is checked against PyTorch (largest difference over largest value).

**Measurement.** For each thread count of ``--threads`` one child process (its BLAS and
OpenMP threads set before NumPy or torch load; ``torch.set_num_threads``) measures the
float32 GEMM rate of ``numpy.matmul`` on a ``--gemm-size`` square product, then every
shape, batch size and direction: ``--rounds`` rounds in which the implementations take
turns, the order rotated every round, each round ``--min-round-time`` seconds long at
least; each figure is the median over rounds of the time per call. GFLOP/s counts the
direct convolution's multiply-adds (2 B OH OW O C/groups KH KW per direction, twice that
for ``backward``), whatever an algorithm executes, so the Fourier method can pass the
GEMM rate. The ratio is PyTorch's time over capsnet's (> 1: capsnet is faster).

**Peak memory** comes from one more child, at the largest thread count, that runs each
call once between a reset of the peak RSS (/proc/self/clear_refs) and a read of it, with
glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536) so that every large array
freed by an earlier call is returned to the system and cannot hide a later one's.
Inputs, weights and the forward of a timed backward are allocated before the reset.

Usage: python scripts/bench_conv.py [--threads 1 2] [--batch-sizes 1 32 100] [--rounds 5]
           [--shapes efficient capsnet] [--json bench-conv.json] [--markdown bench-conv.md]
       python scripts/bench_conv.py --table bench-conv.json   # the tables again, from the JSON
       python scripts/bench_conv.py --quick --no-torch     # smoke test, well under a minute
"""
from __future__ import annotations

# Only the standard library (and benchlib) at module level: the children set their thread
# variables before NumPy or torch is first imported.
import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

from benchlib import (PeakMemory, Timed, alternate, fmt, gemm_gflops, geomean, machine_heading, machine_info,
                      markdown_table, run_child, thread_env, torch_setup, torch_skip_reason, write_json)

DIRECTIONS = ("forward", "backward", "weight_grad")
EXTRA_SHAPES = {  # name: (in, out, kernel, stride, padding, groups, height, width)
    "cifar.3x3": (64, 64, 3, 1, 1, 1, 32, 32),
    "bottleneck.1x1": (256, 64, 1, 1, 0, 1, 32, 32),
}
QUICK = {"batch_sizes": [1], "threads": [1], "rounds": 1, "warmup": 1, "min_round_time": 0.0, "gemm_size": 256,
         "gemm_repeats": 1, "algorithms": ["auto"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/bench_conv.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", metavar="WORD",
                   help="sweep only the shapes whose name contains one of these words (e.g. efficient "
                        "capsnet.primary cifar); default: all")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, one child each")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 100], metavar="B")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; each figure is their median")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each implementation first")
    p.add_argument("--min-round-time", type=float, default=0.2, metavar="SECONDS",
                   help="calls per round are sized so the slowest implementation's round lasts this long")
    p.add_argument("--gemm-size", type=int, default=2048, help="the square float32 matmul of the GEMM rate")
    p.add_argument("--gemm-repeats", type=int, default=3)
    p.add_argument("--algorithms", nargs="+", metavar="NAME",
                   help="capsnet algorithms to time (of capsnet.layers.conv.ALGORITHMS); default: all")
    p.add_argument("--no-torch", action="store_true", help="measure capsnet only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child")
    p.add_argument("--json", default="bench-conv.json", help="where to write every figure")
    p.add_argument("--markdown", default=None, help="also write the markdown tables here")
    p.add_argument("--table", metavar="JSON", help="print (and with --markdown write) the tables of a written JSON, "
                                                   "measuring nothing")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: batch 1, 1 thread, 1 round, a 256 GEMM, capsnet's auto only (options given "
                        "explicitly win)")
    p.add_argument("--child", choices=("time", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    p.add_argument("--child-result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    for name in ("rounds", "gemm_size", "gemm_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(t < 1 for t in args.threads) or any(b < 1 for b in args.batch_sizes):
        p.error(f"--threads and --batch-sizes must be positive, got {args.threads} and {args.batch_sizes}")
    if args.warmup < 0 or args.min_round_time < 0:
        p.error("--warmup and --min-round-time must be >= 0")
    return args


# ------------------------------------------------------------------- shapes
def _named_modules(module: Any, prefix: str = "") -> Any:
    yield prefix, module
    for name, child in module.named_children():
        yield from _named_modules(child, f"{prefix}.{name}" if prefix else name)


def _trace(network: str, model: Any, x: Any, conv_class: type) -> list[dict[str, Any]]:
    """Run ``model`` once on ``x`` and return each convolution's geometry, in call order."""
    seen: list[dict[str, Any]] = []
    convs = [(name, m) for name, m in _named_modules(model) if isinstance(m, conv_class)]

    def recorder(name: str, m: Any, method: str, nhwc: bool) -> Callable[..., Any]:
        original = getattr(m, method)

        def record(x: Any, *rest: Any, **kwargs: Any) -> Any:
            h, w = (x.shape[1], x.shape[2]) if nhwc else (x.shape[2], x.shape[3])
            if not any(s["module"] == name for s in seen):
                seen.append({"name": f"{network}.{name}", "network": network, "module": name,
                             "in": m.in_channels, "out": m.out_channels, "kernel": m.kernel_size,
                             "stride": m.stride, "padding": m.padding, "groups": m.groups,
                             "height": int(h), "width": int(w), "input_grad_in_network": bool(m.input_grad)})
            return original(x, *rest, **kwargs)
        return record

    for name, m in convs:  # wrapped on the instances, which are thrown away after the trace
        m.forward = recorder(name, m, "forward", False)
        if hasattr(m, "forward_nhwc"):
            m.forward_nhwc = recorder(name, m, "forward_nhwc", True)
    model.eval()
    model(x)
    missed = [name for name, _ in convs if not any(s["module"] == name for s in seen)]
    if missed:
        raise RuntimeError(f"{network}: the trace saw no input for {missed}; the model calls them some other way: "
                           "record it in scripts/bench_conv.py's _trace")
    return seen


def network_shapes() -> list[dict[str, Any]]:
    """Every convolution of the built-in networks (default sizes) and the extra shapes, each
    geometry once: (name, in, out, kernel, stride, padding, groups, height, width, ...)."""
    import numpy as np

    from capsnet import backend
    from capsnet.layers.conv import Conv2d
    from capsnet.models import BaselineCNN, CapsNet, EfficientCapsNet, MatrixCapsNet

    networks = (("capsnet", lambda: CapsNet(dtype="float32", seed=0), (1, 28, 28)),
                ("multimnist", lambda: CapsNet(dtype="float32", seed=0, input_shape=(1, 36, 36)), (1, 36, 36)),
                ("efficient", lambda: EfficientCapsNet(dtype="float32", seed=0), (1, 28, 28)),
                ("em", lambda: MatrixCapsNet(dtype="float32", seed=0), (1, 28, 28)),
                ("cnn", lambda: BaselineCNN(dtype="float32", seed=0), (1, 28, 28)))
    shapes: list[dict[str, Any]] = []
    for network, make, side in networks:
        x = np.random.default_rng(0).random((1, *side), dtype=np.float32)
        with backend.use("numpy"):  # the sweep is of the CPU, whatever the environment's default
            traced = _trace(network, make(), x, Conv2d)
        for s in traced:
            key = _geometry(s)
            same = next((t for t in shapes if _geometry(t) == key), None)
            if same is None:
                shapes.append({**s, "also_in": []})
            else:
                same["also_in"].append(s["name"])
    for name, (c, o, k, stride, pad, groups, h, w) in EXTRA_SHAPES.items():
        shapes.append({"name": name, "network": None, "module": None, "in": c, "out": o, "kernel": k,
                       "stride": stride, "padding": pad, "groups": groups, "height": h, "width": w,
                       "input_grad_in_network": True, "also_in": []})
    return shapes


def _geometry(s: dict[str, Any]) -> tuple:
    return tuple(s[k] for k in ("in", "out", "kernel", "stride", "padding", "groups", "height", "width"))


def _out_size(s: dict[str, Any]) -> tuple[int, int]:
    k, st, p = s["kernel"], s["stride"], s["padding"]
    return (s["height"] + 2 * p - k) // st + 1, (s["width"] + 2 * p - k) // st + 1


def direct_flops(s: dict[str, Any], batch: int, direction: str) -> int:
    """2 multiply-add flops of the direct convolution, per direction (backward: two products)."""
    oh, ow = _out_size(s)
    one = 2 * batch * oh * ow * s["out"] * (s["in"] // s["groups"]) * s["kernel"] ** 2
    return 2 * one if direction == "backward" else one


def describe(s: dict[str, Any]) -> str:
    text = f"{s['in']}->{s['out']} {s['kernel']}x{s['kernel']}"
    text += f" s{s['stride']}" if s["stride"] != 1 else ""
    text += f" p{s['padding']}" if s["padding"] else ""
    text += f" g{s['groups']}" if s["groups"] != 1 else ""
    return text + f" on {s['height']}x{s['width']}"


# -------------------------------------------------------------------- child
class Case:
    """One shape at one batch size: the inputs and every implementation of each direction."""

    def __init__(self, s: dict[str, Any], batch: int, use_torch: bool):
        import numpy as np

        self.s, self.batch = s, batch
        rng = np.random.default_rng(0)
        oh, ow = _out_size(s)
        self.x = rng.standard_normal((batch, s["in"], s["height"], s["width"]), dtype=np.float32)
        self.g = rng.standard_normal((batch, s["out"], oh, ow), dtype=np.float32)
        self.use_torch = use_torch

    def capsnet(self, algorithm: str, direction: str) -> tuple[Timed, Any]:
        """The Timed call of capsnet's Conv2d pinned to ``algorithm``, and the layer."""
        from capsnet.layers.conv import Conv2d

        s = self.s
        layer = Conv2d(s["in"], s["out"], s["kernel"], s["stride"], s["padding"], groups=s["groups"],
                       input_grad=direction != "weight_grad", algorithm=algorithm, dtype="float32", seed=0)
        layer.train()
        if direction == "forward":
            return Timed(lambda: layer(self.x)), layer
        return Timed(lambda: layer.backward(self.g), prepare=lambda: layer(self.x)), layer

    def torch_forward(self, layer: Any, input_grad: bool) -> tuple[Callable[[], Any], tuple]:
        """PyTorch's forward on copies of the input and of ``layer``'s weights, and (x, w, b)."""
        import torch
        import torch.nn.functional as F

        s = self.s
        x = torch.from_numpy(self.x).requires_grad_(input_grad)
        w = torch.from_numpy(layer.weight.data.copy()).requires_grad_(True)
        b = torch.from_numpy(layer.bias.data.copy()).requires_grad_(True)
        return (lambda: F.conv2d(x, w, b, s["stride"], s["padding"], 1, s["groups"])), (x, w, b)

    def torch(self, direction: str, layer: Any) -> Timed:
        """The Timed call of ``torch.nn.functional.conv2d`` (and autograd) on ``layer``'s weights."""
        import torch

        forward, (x, w, b) = self.torch_forward(layer, direction != "weight_grad")
        if direction == "forward":
            return Timed(forward)
        g = torch.from_numpy(self.g)
        held: dict[str, Any] = {}
        inputs = (x, w, b) if direction == "backward" else (w, b)
        return Timed(lambda: torch.autograd.grad(held["y"], inputs, g),
                     prepare=lambda: held.__setitem__("y", forward()))


def _ran_as(layer: Any, s: dict[str, Any], batch: int) -> str | None:
    """The algorithm the layer says it runs for this input, where it can say."""
    choose = getattr(layer, "algorithm_for", None)
    if choose is None:
        return None
    try:
        return str(choose(s["height"], s["width"], batch))
    except TypeError:  # another signature: not known
        return None


def _difference(layer: Any, case: Case, direction: str, reference: dict[str, Any]) -> float:
    """Largest |capsnet - torch| over the largest |torch| of what ``direction`` computes."""
    import numpy as np

    layer.zero_grad()
    y = layer(case.x)
    got = {"y": y}
    if direction != "forward":
        gx = layer.backward(case.g)
        got = {"w": layer.weight.grad, "b": layer.bias.grad}
        if direction == "backward":
            got["x"] = gx
    return max(float(np.max(np.abs(got[k] - reference[k]))) / max(float(np.max(np.abs(reference[k]))), 1e-30)
               for k in got)


def _torch_reference(case: Case, layer: Any) -> dict[str, Any]:
    """PyTorch's output and three gradients for ``case`` on ``layer``'s weights, as NumPy."""
    import torch

    forward, (x, w, b) = case.torch_forward(layer, True)
    y = forward()
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.from_numpy(case.g))
    return {"y": y.detach().numpy(), "x": gx.numpy(), "w": gw.numpy(), "b": gb.numpy()}


def _implementations(case: Case, direction: str, algorithms: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """(Timed by name, notes by name, max relative difference from torch by name)."""
    timed: dict[str, Timed] = {}
    notes: dict[str, str] = {}
    diffs: dict[str, float] = {}
    reference = None
    for algorithm in algorithms:
        name = f"capsnet:{algorithm}"
        try:
            call, layer = case.capsnet(algorithm, direction)
            if case.use_torch and reference is None:
                reference = _torch_reference(case, layer)
            if reference is not None:
                diffs[name] = _difference(layer, case, direction, reference)
            else:
                call.once()
        except (ValueError, NotImplementedError) as e:
            notes[name] = f"not applicable: {type(e).__name__}: {e}"
            continue
        ran_as = _ran_as(layer, case.s, case.batch)
        if algorithm != "auto" and ran_as not in (None, algorithm):
            notes[name] = f"runs as {ran_as}: not timed again"
            continue
        if algorithm == "auto" and ran_as:
            notes[name] = f"runs as {ran_as}"
        timed[name] = call
    if case.use_torch:
        _, layer = case.capsnet("auto", direction)  # the weights: the same seed as every capsnet layer
        timed["torch"] = case.torch(direction, layer)
    return timed, notes, diffs


def child(args: argparse.Namespace) -> None:
    """Measure every case of the spec (time or memory) and write the result JSON."""
    import numpy as np

    from capsnet import backend
    from capsnet.layers.conv import ALGORITHMS

    spec = json.loads(Path(args.child_spec).read_text())
    threads = spec["threads"]
    backend.set_backend("numpy")
    versions: dict[str, Any] = {"numpy": np.__version__}
    if spec["use_torch"]:
        versions.update(torch_setup(threads))
    algorithms = tuple(a for a in ("auto", *(a for a in ALGORITHMS if a != "auto"))
                       if spec["algorithms"] is None or a in spec["algorithms"])
    result: dict[str, Any] = {"threads": threads, "versions": versions, "algorithms": list(algorithms), "rows": []}
    if args.child == "time":
        result["gemm"] = gemm_gflops([(spec["gemm_size"],) * 3], spec["gemm_repeats"])
        print(f"  {threads} thread(s): GEMM {result['gemm']['median_gflops']:.1f} GFLOP/s", flush=True)
    for s in spec["shapes"]:
        for batch in spec["batch_sizes"]:
            case = Case(s, batch, spec["use_torch"])
            for direction in DIRECTIONS:
                row: dict[str, Any] = {"shape": s["name"], "batch": batch, "direction": direction, "threads": threads}
                try:
                    timed, notes, diffs = _implementations(case, direction, algorithms)
                    row["notes"], row["max_rel_diff_vs_torch"] = notes, diffs
                    if args.child == "time":
                        row["timing"] = alternate(timed, spec["rounds"], spec["warmup"], spec["min_round_time"])
                    else:
                        row["peak_mb"] = {name: _peak(call) for name, call in timed.items()}
                except Exception:  # recorded; the other cases still run
                    row["error"] = traceback.format_exc().strip().splitlines()[-6:]
                result["rows"].append(row)
            print(f"  {threads} thread(s) {args.child}: {s['name']} batch {batch} done", flush=True)
            del case
    Path(args.child_result).write_text(json.dumps(result))


def _peak(call: Timed) -> float:
    """Peak RSS growth in MB of one call (its prepare runs before the reset)."""
    import gc

    if call.prepare is not None:
        call.prepare()
    gc.collect()
    memory = PeakMemory()
    memory.start()
    call.run()
    return memory.stop()["peak_increase_mb"]


# ------------------------------------------------------------------- parent
def _spawn(kind: str, threads: int, spec: dict[str, Any], work: str) -> dict[str, Any]:
    spec_path = Path(work) / f"spec-{kind}-{threads}.json"
    spec_path.write_text(json.dumps({**spec, "threads": threads}))
    out = Path(work) / f"result-{kind}-{threads}.json"
    extra = {"MALLOC_MMAP_THRESHOLD_": "65536"} if kind == "memory" else {}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-spec", str(spec_path),
           "--child-result", str(out)]
    return run_child(cmd, thread_env(threads, **extra), out, echo=True)


def summarize(rows: list[dict[str, Any]], algorithms: list[str]) -> dict[str, Any]:
    """For auto and each algorithm: the geometric mean and the worst of torch / capsnet over
    the rows, how many reach 1.0x, and how many cases of batch 32 or more reach half the GEMM
    rate (issue 29's targets)."""
    summary: dict[str, Any] = {}
    for name in [f"capsnet:{a}" for a in algorithms]:
        timed = [r for r in rows if name in r.get("seconds", {})]
        if not timed:
            continue
        large = [r for r in timed if r["batch"] >= 32 and r["percent_of_gemm"].get(name) is not None]
        entry = {"batch_32_plus": len(large),
                 "half_gemm_at_batch_32_plus": sum(r["percent_of_gemm"][name] >= 50 for r in large)}
        ratios = [(r["ratio_torch_over"][name], r) for r in timed if name in r.get("ratio_torch_over", {})]
        if ratios:
            worst_ratio, worst = min(ratios, key=lambda t: t[0])
            entry.update(geomean=geomean(r for r, _ in ratios), worst=worst_ratio, rows=len(ratios),
                         worst_at=f"{worst['shape']} b{worst['batch']} {worst['direction']} {worst['threads']}t",
                         at_least_1x=sum(r >= 1.0 for r, _ in ratios))
        summary[name] = entry
    return summary


def _summary_line(name: str, s: dict[str, Any]) -> str:
    parts = []
    if "geomean" in s:
        parts.append(f"geometric mean of torch / capsnet {s['geomean']:.2f}x over {s['rows']} cases, worst "
                     f"{s['worst']:.2f}x ({s['worst_at']}), {s['at_least_1x']} of {s['rows']} at 1.0x or more")
    if s["batch_32_plus"]:
        parts.append(f"at batch 32 and more {s['half_gemm_at_batch_32_plus']} of {s['batch_32_plus']} cases at half "
                     "the GEMM rate or more")
    return f"- {name}: " + ("; ".join(parts) or "no PyTorch figures, no batch of 32 or more")


def build_rows(times: dict[int, dict], memory: dict[str, Any] | None, shapes: dict[str, dict]) -> list[dict]:
    """One row per (shape, batch, direction, threads) with times, ratios, GFLOP/s and memory."""
    peaks = {(r["shape"], r["batch"], r["direction"]): r.get("peak_mb", {}) for r in (memory or {}).get("rows", [])}
    rows = []
    for threads, result in times.items():
        gemm = result.get("gemm", {}).get("median_gflops")
        for r in result.get("rows", []):
            row = {k: r[k] for k in ("shape", "batch", "direction", "threads")}
            s = shapes[r["shape"]]
            row.update(geometry=describe(s), flops=direct_flops(s, r["batch"], r["direction"]),
                       notes=r.get("notes", {}), max_rel_diff_vs_torch=r.get("max_rel_diff_vs_torch", {}),
                       peak_mb=peaks.get((r["shape"], r["batch"], r["direction"]), {}))
            if "error" in r:
                row["error"] = r["error"]
                rows.append(row)
                continue
            timing = {k: v for k, v in r["timing"].items() if k != "calls_per_round"}
            row["calls_per_round"] = r["timing"]["calls_per_round"]
            row["seconds"] = {k: v["seconds"] for k, v in timing.items()}
            row["rounds"] = {k: v["rounds"] for k, v in timing.items()}
            row["gflops"] = {k: row["flops"] / t / 1e9 for k, t in row["seconds"].items()}
            row["percent_of_gemm"] = {k: None if not gemm else 100 * v / gemm for k, v in row["gflops"].items()}
            torch_s = row["seconds"].get("torch")
            row["ratio_torch_over"] = {k: torch_s / t for k, t in row["seconds"].items()
                                       if torch_s and k != "torch"}
            rows.append(row)
    return rows


def tables(report: dict[str, Any]) -> str:
    """The markdown: per thread count, a heading naming the machine, then one row per case."""
    algorithms = [f"capsnet:{a}" for a in report["algorithms"]]
    info = report["machine"]
    out = []
    for threads in report["settings"]["threads"]:
        gemm = report["gemm_gflops"].get(str(threads))
        rows = [r for r in report["rows"] if r["threads"] == threads]
        load = (info.get("load_average_at_start") or [None])[0]
        out.append(f"**{machine_heading(info, threads)}**; float32 GEMM {fmt(gemm, '.1f')} GFLOP/s; "
                   f"median of {report['settings']['rounds']} alternating rounds; 1-minute load "
                   f"{fmt(load, '.1f')} at the start.\n")
        pinned = [a for a in algorithms if a != "capsnet:auto"]
        headers = ["shape", "batch", "direction", "MFLOP", "auto ms (runs as)",
                   *[f"{a.split(':')[1]} ms" for a in pinned], "torch ms", "torch / auto",
                   "GFLOP/s auto / torch (% GEMM)", "peak MB auto / torch"]
        body = []
        for r in rows:
            if "error" in r:
                body.append([r["shape"], r["batch"], r["direction"], "error: " + r["error"][-1][:60],
                             *[None] * (len(headers) - 4)])
                continue
            sec, gf, pct, peak = r["seconds"], r["gflops"], r["percent_of_gemm"], r["peak_mb"]
            ms = {k: fmt(None if k not in sec else 1e3 * sec[k], ".2f") for k in [*algorithms, "torch"]}
            ran = r["notes"].get("capsnet:auto", "").removeprefix("runs as ")
            for a in pinned:  # not timed: "n/a" where it does not apply, "=im2col" where it runs as im2col
                note = r["notes"].get(a, "")
                if note.startswith("not applicable"):
                    ms[a] = "n/a"
                elif note.startswith("runs as"):
                    ms[a] = "=" + note.removeprefix("runs as ").split(":")[0]
            ratio = r["ratio_torch_over"].get("capsnet:auto")
            body.append([f"{r['shape']} ({r['geometry']})", r["batch"], r["direction"], f"{r['flops'] / 1e6:.1f}",
                         ms["capsnet:auto"] + (f" ({ran})" if ran else ""), *[ms[a] for a in pinned], ms["torch"],
                         fmt(ratio, ".2f", "x"),
                         f"{fmt(gf.get('capsnet:auto'), '.1f')} / {fmt(gf.get('torch'), '.1f')} "
                         f"({fmt(pct.get('capsnet:auto'), '.0f', '%')} / {fmt(pct.get('torch'), '.0f', '%')})",
                         f"{fmt(peak.get('capsnet:auto'), '.1f')} / {fmt(peak.get('torch'), '.1f')}"])
        out.append(markdown_table(headers, body, [False, True, False, *[True] * (len(headers) - 3)]))
        summary = summarize(rows, report["algorithms"])
        out.append("\n" + "\n".join(_summary_line(name, s) for name, s in summary.items()) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.table:
        text = tables(json.loads(Path(args.table).read_text()))
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        return 0
    torch_note = torch_skip_reason(args.no_torch)
    use_torch = torch_note is None
    if torch_note:
        print(f"PyTorch {torch_note}: measuring capsnet only")
    from capsnet.layers.conv import ALGORITHMS

    unknown = sorted(set(args.algorithms or ()) - {"auto", *ALGORITHMS})
    if unknown:
        print(f"error: --algorithms {unknown}: capsnet.layers.conv.ALGORITHMS has {ALGORITHMS}", file=sys.stderr)
        return 2
    shapes = network_shapes()
    if args.shapes:
        shapes = [s for s in shapes if any(word in s["name"] for word in args.shapes)]
        if not shapes:
            print(f"error: no shape name contains any of {args.shapes}; the names are "
                  f"{[s['name'] for s in network_shapes()]}", file=sys.stderr)
            return 2
    info = machine_info(args.threads)
    if info["load_average_at_start"] and info["load_average_at_start"][0] > 0.5 * (info["usable_cpus"] or 1):
        print(f"warning: load average {info['load_average_at_start'][0]:.2f} at start; "
              "other work on this machine will distort the numbers")
    print(machine_heading(info, args.threads))
    print(f"{len(shapes)} shapes: {', '.join(s['name'] for s in shapes)}", flush=True)
    spec = {"shapes": shapes, "batch_sizes": args.batch_sizes, "use_torch": use_torch, "algorithms": args.algorithms,
            **{k: getattr(args, k) for k in ("rounds", "warmup", "min_round_time", "gemm_size", "gemm_repeats")}}
    with tempfile.TemporaryDirectory(prefix="capsnet-bench-conv-") as work:
        times = {t: _spawn("time", t, spec, work) for t in args.threads}
        memory = None if args.no_memory else _spawn("memory", max(args.threads), spec, work)
    failed = [f"{t} threads: {r['error']}: " + " | ".join(r["stderr_tail"]) for t, r in times.items() if "error" in r]
    if memory is not None and "error" in memory:
        failed.append(f"memory: {memory['error']}: " + " | ".join(memory["stderr_tail"]))
    first = next((r for r in times.values() if "error" not in r), {})
    if first.get("versions"):
        info.update({k: v for k, v in first["versions"].items() if k != "numpy"})
    rows = build_rows({t: r for t, r in times.items() if "error" not in r},
                      None if memory is None or "error" in memory else memory, {s["name"]: s for s in shapes})
    report: dict[str, Any] = {
        "machine": info,
        "settings": {k: getattr(args, k) for k in ("threads", "batch_sizes", "rounds", "warmup", "min_round_time",
                                                    "gemm_size", "gemm_repeats", "quick", "shapes", "algorithms")}
                    | {"torch": use_torch, "memory": memory is not None,
                       "memory_method": "VmHWM after clear_refs reset, MALLOC_MMAP_THRESHOLD_=65536, "
                                        f"{max(args.threads)} thread(s)"},
        "algorithms": first.get("algorithms", ["auto"]),
        "directions": list(DIRECTIONS),
        "shapes": shapes,
        "gemm_gflops": {str(t): r.get("gemm", {}).get("median_gflops") for t, r in times.items()},
        "rows": rows,
        "summary": {str(t): summarize([r for r in rows if r["threads"] == t], first.get("algorithms", ["auto"]))
                    for t in args.threads},
        "failed": failed,
    }
    write_json(args.json, report)
    text = tables(report)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
        print(f"wrote {os.path.abspath(args.markdown)}")
    errors = failed + [f"{r['shape']} b{r['batch']} {r['direction']} {r['threads']}t: {r['error'][-1]}"
                       for r in rows if "error" in r]
    for e in errors:
        print(f"FAILED: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
