"""Figures of trained models and of their runs, each a PNG, as functions and as the command
``python -m capsnet.visualize`` (one subcommand per figure; ``--help``).

Every figure is a function that computes what it draws (returned as arrays, so it can be
checked) and writes the PNG with matplotlib, an optional extra (``pip install
'capsnet[viz]'``); the library itself never needs it.

- :func:`reconstructions`: test inputs above the decoder's reconstructions from the
  longest capsule.
- :func:`perturbation`: each of the 16 dimensions of the predicted capsule moved from -0.25
  to 0.25 in steps of 0.05, decoded (figure 4 of the paper).
- :func:`multimnist`: MultiMNIST inputs with the two digits' reconstructions drawn over them
  in two colours (figure 5).
- :func:`curves`: training curves from one or more ``metrics.jsonl``.
- :func:`confusion`: the confusion matrix on the test set.
- :func:`routing`: the coupling coefficients of one input drawn over the primary-capsule
  grid, one panel per class.
- :func:`robustness_plot`: accuracy against each transformation's strength
  (``python -m capsnet.robustness`` writes it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from capsnet import __version__, backend
from capsnet.layers.capsule import longest_capsules

__all__ = ["PERTURBATION_STEPS", "confusion", "curves", "multimnist", "perturbation", "pyplot", "reconstructions",
           "robustness_plot", "routing"]

PERTURBATION_STEPS = np.round(np.arange(-0.25, 0.2501, 0.05), 2)  # 11 values, as in the paper's figure 4
"""How far each capsule dimension is moved in :func:`perturbation`: -0.25 to 0.25 by 0.05."""


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or an ImportError naming the extra."""
    try:
        import matplotlib  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise ImportError("the figures need matplotlib: pip install 'capsnet[viz]' (or pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _host(a: Any) -> np.ndarray:
    return backend.to_numpy(a)


def _shown(images: Any) -> np.ndarray:
    """Images (B, C, H, W) as drawn: in colour (B, H, W, 3) when C is 3 (CIFAR-10, SVHN),
    else the first channel (B, H, W) (smallNORB: the left image of the pair)."""
    host = _host(images)
    return host.transpose(0, 2, 3, 1) if host.shape[1] == 3 else host[:, 0]


def _image_grid(ax: Any, rows: np.ndarray, gap: float = 0.5) -> None:
    """Draw images (R, C, H, W) in [0, 1] (or RGB (R, C, H, W, 3)) as one grid, no axes."""
    r, c, h, w = rows.shape[:4]
    rgb = rows.ndim == 5
    canvas = np.full((r * (h + 1) - 1, c * (w + 1) - 1, *((3,) if rgb else ())), gap, dtype=np.float32)
    for i in range(r):  # a loop over the figure's cells, not over data
        for j in range(c):
            canvas[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = rows[i, j]
    ax.imshow(canvas, cmap=None if rgb else "gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()


def reconstructions(model: Any, images: Any, path: str | Path) -> np.ndarray:
    """Inputs (B, C, H, W) in the top row, the reconstructions from the longest capsule
    below, in colour for three channels. Returns the reconstructions as drawn, (B, H, W)
    or (B, H, W, 3), in [0, 1]."""
    recon = _shown(model.reconstruct(images))
    plt = pyplot()
    b = len(recon)
    fig, ax = plt.subplots(figsize=(1.0 * b, 2.3))
    _image_grid(ax, np.stack([_shown(images), recon]))
    ax.set_title("inputs (top) and reconstructions from the longest capsule (bottom)", fontsize=9)
    _save(fig, path)
    return recon


def perturbation(model: Any, image: Any, path: str | Path, steps: Sequence[float] = PERTURBATION_STEPS) -> np.ndarray:
    """Figure 4: the predicted capsule of one image (1, 1, H, W), each of its dimensions in
    turn moved by each of ``steps`` (the others kept), decoded with every other capsule
    masked. Returns the decoded images (D, S, H, W): row d is dimension d."""
    xp = backend.get_array_module(image)
    classes, _ = model.predict(image)
    with model.evaluating():
        v = model.capsules(image)  # (1, K, D)
    k = int(_host(classes)[0])
    kept = xp.zeros_like(v)
    kept[:, k] = v[:, k]
    d = v.shape[2]
    steps = np.asarray(steps, dtype=np.float64)
    moved = xp.repeat(kept, d * len(steps), axis=0)  # (D * S, K, D)
    offsets = np.zeros((d, len(steps), d))
    offsets[np.arange(d), :, np.arange(d)] = steps
    moved[:, k] += xp.asarray(offsets.reshape(d * len(steps), d), dtype=v.dtype)
    shown = _shown(model.decode(moved))
    decoded = shown.reshape(d, len(steps), *shown.shape[1:])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(0.6 * len(steps), 0.6 * d))
    _image_grid(ax, decoded)
    ax.set_title(f"class {k}: each row one of the {d} dimensions, moved from {steps[0]:+.2f} to {steps[-1]:+.2f}",
                 fontsize=8)
    _save(fig, path)
    return decoded


def multimnist(model: Any, images: Any, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Figure 5: MultiMNIST inputs (B, 1, H, W) with the reconstructions of the two longest
    capsules drawn over them, one in red and one in green. Returns (reconstructions
    (B, 2, H, W), predicted class pairs (B, 2))."""
    recon = _host(model.reconstruct(images))[:, :, 0]  # (B, 2, H, W), classes in increasing order
    _, lengths = model.predict(images)
    pairs = longest_capsules(_host(lengths), 2)
    x = _host(images)[:, 0]
    overlay = np.stack([recon[:, 0], recon[:, 1], np.zeros_like(x)], axis=-1)
    overlay = np.clip(0.35 * x[..., None] + overlay, 0, 1)
    plt = pyplot()
    b = len(x)
    fig, ax = plt.subplots(figsize=(1.0 * b, 2.3))
    _image_grid(ax, np.stack([np.repeat(x[..., None], 3, -1), overlay]))
    ax.set_title("inputs (top); reconstructions of the two longest capsules in red and green: "
                 + " ".join(f"{a}{c}" for a, c in pairs), fontsize=8)
    _save(fig, path)
    return recon, pairs


def curves(metric_files: Sequence[str | Path], path: str | Path, names: Sequence[str] | None = None) -> dict:
    """Loss and every accuracy/error per epoch of one or more runs' ``metrics.jsonl``.
    Returns {name: {key: [values per epoch]}}."""
    runs = {}
    for i, f in enumerate(metric_files):
        f = Path(f)
        if f.is_dir():
            f = f / "metrics.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"no metrics file at {f}")
        records = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if not records:
            raise ValueError(f"{f} holds no epochs yet")
        name = names[i] if names else f.parent.name
        keys = [k for k in records[-1] if k == "epoch" or k.endswith(("_loss", "_accuracy", "_error"))]
        runs[name] = {k: [r.get(k) for r in records] for k in keys}
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, series in runs.items():
        for key, values in series.items():
            if key == "epoch":
                continue
            ax = ax_loss if key.endswith("_loss") else ax_acc
            ax.plot(series["epoch"], values, marker="o", ms=3, label=f"{name}: {key}")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy / error")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return runs


def confusion(matrix: Any, path: str | Path, title: str = "confusion matrix") -> np.ndarray:
    """The confusion counts (K, K) (rows: true class) drawn with each cell's count."""
    m = np.asarray(matrix, dtype=np.int64)
    plt = pyplot()
    k = m.shape[0]
    fig, ax = plt.subplots(figsize=(0.55 * k + 1.5, 0.55 * k + 1))
    ax.imshow(np.log1p(m), cmap="Blues")
    for i in range(k):  # the figure's cells
        for j in range(k):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    _save(fig, path)
    return m


def routing(model: Any, image: Any, path: str | Path) -> np.ndarray:
    """The coupling coefficients c_ij of one image (1, 1, H, W), averaged over the capsule
    types at each position of the primary-capsule grid, drawn over the input for each class
    j (the grid stretched over the whole input), as their difference from uniform routing
    (1/K). Returns the maps (K, OH, OW); at each position they sum to 1 over the classes."""
    _, c = model.routing(image)  # (1, I, K)
    cfg = model.config
    _, (oh, ow) = cfg.feature_sizes
    maps = _host(c)[0].reshape(cfg.primary_types, oh, ow, cfg.n_classes).mean(axis=0).transpose(2, 0, 1)
    lengths = np.linalg.norm(_host(model.capsules(image))[0], axis=-1)
    x = _host(image)[0, 0]
    plt = pyplot()
    k = cfg.n_classes
    cols = min(k, 5)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    h, w = x.shape
    spread = max(float(np.abs(maps - 1 / k).max()), 1e-12)
    for j, ax in enumerate(axes.flat):  # one panel per class
        ax.set_axis_off()
        if j >= k:
            continue
        ax.imshow(x, cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0))
        ax.imshow(maps[j] - 1 / k, cmap="RdBu_r", alpha=0.6, vmin=-spread, vmax=spread, extent=(0, w, h, 0),
                  interpolation="nearest")
        ax.set_title(f"class {j}: |v| {lengths[j]:.2f}", fontsize=8)
    fig.suptitle(f"coupling coefficients c_ij - 1/{k} over the primary-capsule grid (mean over the {cfg.primary_types} "
                 f"types; red: more than uniform, blue: less; scale +-{spread:.2g})", fontsize=8)
    _save(fig, path)
    return maps


def robustness_plot(table: dict, path: str | Path) -> Path:
    """Accuracy against strength, one panel per transformation, one line per checkpoint
    (``table`` as ``python -m capsnet.robustness`` writes it)."""
    plt = pyplot()
    transforms = list(table["transforms"])
    fig, axes = plt.subplots(1, len(transforms), figsize=(4.2 * len(transforms), 3.6), squeeze=False)
    for ax, name in zip(axes[0], transforms):
        for run in table["runs"]:
            points = run["sweeps"][name]
            label = run["name"] + (f" (mixed {run['mixed']:.3f})" if "mixed" in run else "")
            ax.plot([p["strength"] for p in points], [p["accuracy"] for p in points], marker="o", ms=3, label=label)
        ax.set_xlabel({"rotation": "rotation (degrees)", "scale": "scale factor", "shear": "shear factor"}
                      .get(name, name))
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


# -- command line --------------------------------------------------------------------------
def _test_batch(checkpoint: Path, n: int, start: int, data_dir: str | None, backend_name: str) -> tuple:
    """(model, header, config, batch of n test examples from ``start``) of a checkpoint, on
    its dataset's unaugmented test set."""
    from capsnet.training import load_model, train_config_of  # noqa: PLC0415
    from capsnet.training.run import data_sources, load_data  # noqa: PLC0415

    model, header = load_model(checkpoint, backend_name)
    cfg = train_config_of(header, checkpoint)
    cfg.test_limit = None
    data = load_data(cfg, data_dir or cfg.data_dir, progress=False)
    with backend.use(backend_name) as xp:
        _, test = data_sources(cfg, data, xp, train=False)
        if not 0 <= start < len(test):
            raise ValueError(f"--index must be in [0, {len(test)}), got {start}")
        batch = test.batch(np.arange(start, min(start + n, len(test))))
    return model, header, cfg, batch


def _capsnet_only(model: Any, what: str) -> None:
    from capsnet.models import CapsNet  # noqa: PLC0415

    if not isinstance(model, CapsNet):
        raise ValueError(f"the {what} figure needs a CapsNet checkpoint, got a {type(model).__name__}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m capsnet.visualize``: one subcommand per figure."""
    p = argparse.ArgumentParser(
        prog="python -m capsnet.visualize",
        description="Figures of trained models, each written as a PNG (needs matplotlib: "
                    "pip install 'capsnet[viz]'). Test examples come from the checkpoint's own dataset "
                    "(MNIST, expanded MNIST or MultiMNIST), unaugmented.",
        epilog="examples:\n  python -m capsnet.visualize reconstructions runs/cpu/best.npz --out recon.png\n"
               "  python -m capsnet.visualize perturbation runs/cpu/best.npz --index 3 --out perturb.png\n"
               "  python -m capsnet.visualize multimnist runs/multimnist/best.npz --out multi.png\n"
               "  python -m capsnet.visualize curves runs/cpu runs/cnn --out curves.png\n"
               "  python -m capsnet.visualize confusion runs/cpu/best.npz --out confusion.png\n"
               "  python -m capsnet.visualize routing runs/cpu/best.npz --index 0 --out routing.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"capsnet {__version__}")
    sub = p.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    helps = {"reconstructions": "inputs and their reconstructions from the longest capsule",
             "perturbation": "the 16 dimensions of the predicted capsule, each moved from -0.25 to 0.25",
             "multimnist": "MultiMNIST inputs with the two reconstructions in two colours",
             "curves": "training curves of one or more run folders (or metrics.jsonl files)",
             "confusion": "the confusion matrix on the test set",
             "routing": "coupling coefficients of one input over the primary-capsule grid, per class"}
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--out", type=Path, required=True, help="the PNG to write")
        if name == "curves":
            s.add_argument("runs", nargs="+", type=Path, help="run folders or metrics.jsonl files")
            s.add_argument("--names", nargs="+", help="a label per run (default: the folder names)")
            continue
        s.add_argument("checkpoint", type=Path, help="a checkpoint written by capsnet.train")
        s.add_argument("--backend", choices=backend.BACKENDS, default="numpy")
        s.add_argument("--data-dir", default=None, help="folder with the dataset's files (else the run's, "
                                                        "then $CAPSNET_DATA_DIR)")
        s.add_argument("--index", type=int, default=0, help="first test example shown (default 0)")
        if name in ("reconstructions", "multimnist"):
            s.add_argument("-n", type=int, default=10, help="how many examples (default 10)")
        if name == "confusion":
            s.add_argument("--test-limit", type=int, default=None, help="use only the first N test examples")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m capsnet.visualize``: returns the exit status (0, or 2 with the error on stderr)."""
    args = build_parser().parse_args(argv)
    from capsnet.data import MNISTDownloadError, MNISTFormatError, MNISTNotFoundError  # noqa: PLC0415
    from capsnet.training import CheckpointError  # noqa: PLC0415
    from capsnet.training.datasets import dataset  # noqa: PLC0415

    try:
        pyplot()
        if args.figure == "curves":
            curves(args.runs, args.out, args.names)
        elif args.figure == "confusion":
            from capsnet.training import evaluate_classifier  # noqa: PLC0415

            model, header, cfg, batch = _test_batch(args.checkpoint, args.test_limit or 10**9, 0, args.data_dir,
                                                    args.backend)
            if dataset(cfg.dataset).digits > 1:
                raise ValueError("the confusion figure is for one digit per image; this is a MultiMNIST checkpoint")
            with backend.use(args.backend):
                result = evaluate_classifier(model, batch[0], batch[1], recon_weight=cfg.recon_weight)
            confusion(result["confusion"], args.out, f"{args.checkpoint}: accuracy {result['accuracy']:.4f} on "
                                                     f"{result['n']} test images")
        else:
            n = getattr(args, "n", 1)
            model, _, cfg, batch = _test_batch(args.checkpoint, n, args.index, args.data_dir, args.backend)
            _capsnet_only(model, args.figure)
            digits = dataset(cfg.dataset).digits
            draw = {"reconstructions": multimnist if digits > 1 else reconstructions, "multimnist": multimnist,
                    "perturbation": lambda m, x, out: perturbation(m, x[:1], out),
                    "routing": lambda m, x, out: routing(m, x[:1], out)}[args.figure]
            if draw is multimnist and digits == 1:
                raise ValueError("the multimnist figure needs a checkpoint trained with --dataset multimnist")
            with backend.use(args.backend):
                draw(model, batch[0], args.out)
    except (ImportError, backend.BackendError, CheckpointError, MNISTNotFoundError, MNISTDownloadError,
            MNISTFormatError, ValueError, OSError) as exc:  # a missing extra, bad input: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
