"""Robustness to affine transformations (section 5.2): ``python -m capsnet.robustness --help``.

Evaluates one or more checkpoints (CapsNets and baseline CNNs alike) on MNIST test digits
under sweeps of rotation, scale and shear (:data:`capsnet.data.affine.TRANSFORMS`), each
digit centred on the model's input canvas, and on a random mixed set in the spirit of
affNIST (:func:`capsnet.data.affine.random_affine`, its ranges options); optionally on a
real affNIST ``.mat`` file too. Writes ``robustness.json`` (every accuracy, with the
settings) and ``robustness.png`` (accuracy against each transformation's strength).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from capsnet import __version__, backend
from capsnet.data import MNISTDownloadError, MNISTFormatError, MNISTNotFoundError
from capsnet.data.affine import AFFNIST_RANGES, TRANSFORMS, random_affine, read_affnist, sweep
from capsnet.training import CheckpointError, load_model, train_config_of
from capsnet.training.datasets import dataset

__all__ = ["accuracy", "check_model", "evaluate_checkpoint", "main", "test_digits"]


def accuracy(model: Any, images: np.ndarray, labels: np.ndarray, batch_size: int = 100) -> float:
    """Fraction of host images (N, 1, H, W) float in [0, 1] whose predicted class (the longest
    capsule, or the largest logit) is the label; batches moved to the model's backend."""
    xp = backend.xp()
    correct = xp.zeros((), dtype=xp.int64)
    dtype = model.dtype
    for start in range(0, len(labels), batch_size):
        x = xp.asarray(images[start:start + batch_size], dtype=dtype)
        classes, _ = model.predict(x)
        correct += (classes == xp.asarray(labels[start:start + batch_size])).sum()
    return float(backend.to_numpy(correct)) / max(len(labels), 1)


def check_model(path: Path, model: Any, affnist: bool) -> None:
    """Refuse, before any work, a model robustness cannot evaluate: inputs not square and
    one-channel, two digits per image, or (``affnist``) a canvas other than affNIST's 40x40."""
    c, h, w = model.config.input_shape
    if c != 1 or h != w:
        raise ValueError(f"{path}: robustness needs a model of square one-channel inputs, got {(c, h, w)}")
    if getattr(model.config, "digits", 1) != 1:
        raise ValueError(f"{path} is a MultiMNIST (two-digit) model; robustness evaluates one digit per image")
    if affnist and h != 40:
        raise ValueError(f"{path}: --affnist images are 40x40, the model takes {h}x{w}; train on the 40x40 canvas "
                         "(python -m capsnet.train --dataset expanded) or leave out --affnist")


def test_digits(dataset_name: str, data_dir: str | None, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels) of the test digits a checkpoint's dataset is made
    from: the sample installed with capsnet for ``mnist-sample``, else MNIST's test files
    alone (the training files are neither read nor downloaded)."""
    data = dataset(dataset_name).test_split(data_dir, progress)
    return data.test_images, data.test_labels.astype(np.int64)


def evaluate_checkpoint(path: Path, digits: np.ndarray, labels: np.ndarray, *, mixed: dict | None,
                        affnist: tuple[np.ndarray, np.ndarray] | None, batch_size: int,
                        progress: bool, loaded: tuple[Any, dict] | None = None) -> dict[str, Any]:
    """Every accuracy of one checkpoint: the sweeps, the mixed set (``mixed``: keyword
    arguments of random_affine plus ``seed``) and the affNIST file, if given. ``loaded``:
    the checkpoint's (model, header) when already read."""
    model, header = loaded if loaded is not None else load_model(path)
    cfg = train_config_of(header, path)
    check_model(path, model, affnist is not None)
    h = model.config.input_shape[1]
    floats = digits.astype(np.float32) / 255
    out: dict[str, Any] = {"checkpoint": str(path), "name": path.parent.name, "arch": cfg.arch,
                           "dataset": cfg.dataset, "epoch": header.get("epoch"), "canvas": h, "sweeps": {}}
    total = sum(len(s) for _, s in TRANSFORMS.values()) + (mixed is not None) + (affnist is not None)
    bar = tqdm(total=total, desc=path.parent.name, disable=not progress, leave=False)
    t0 = time.perf_counter()
    for name, (_, strengths) in TRANSFORMS.items():
        out["sweeps"][name] = []
        for s in strengths:
            out["sweeps"][name].append({"strength": s, "accuracy": accuracy(model, sweep(floats, name, s, h), labels,
                                                                            batch_size)})
            bar.update()
    if mixed is not None:
        settings = dict(mixed)
        rng = np.random.default_rng(settings.pop("seed"))
        images, _ = random_affine(floats, rng, canvas=h, **settings)
        out["mixed"] = accuracy(model, images, labels, batch_size)
        bar.update()
    if affnist is not None:
        a_images, a_labels = affnist
        out["affnist"] = accuracy(model, a_images[:, None].astype(np.float32) / 255, a_labels, batch_size)
        bar.update()
    bar.close()
    out["seconds"] = time.perf_counter() - t0
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m capsnet.robustness``."""
    p = argparse.ArgumentParser(
        prog="python -m capsnet.robustness",
        description="Accuracy of checkpoints (CapsNet or baseline CNN) on MNIST test digits under affine "
                    "transformations: sweeps of rotation, scale and shear (digits centred on the model's input "
                    "canvas), and a random mixed set in the spirit of affNIST. Writes robustness.json and "
                    "robustness.png (the plot needs matplotlib: pip install 'capsnet[viz]').",
        epilog="example (the paper's experiment: train on expanded MNIST, 40x40):\n"
               "  python -m capsnet.train --dataset expanded --epochs 1 --out runs/expanded-capsnet\n"
               "  python -m capsnet.train --dataset expanded --model cnn --epochs 1 --out runs/expanded-cnn\n"
               "  python -m capsnet.robustness runs/expanded-capsnet/best.npz runs/expanded-cnn/best.npz "
               "--out runs/robustness",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"capsnet {__version__}")
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints written by capsnet.train")
    p.add_argument("--out", type=Path, default=Path("robustness"), help="folder for robustness.json and .png")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST files (else $CAPSNET_DATA_DIR)")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test digits")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--backend", choices=backend.BACKENDS, default="numpy")
    g = p.add_argument_group("the mixed set (defaults: affNIST's ranges)")
    g.add_argument("--rotation", type=float, default=AFFNIST_RANGES["rotation"], help="up to this many degrees "
                   f"either way (default {AFFNIST_RANGES['rotation']})")
    g.add_argument("--shear", type=float, default=AFFNIST_RANGES["shear"],
                   help=f"shear factor up to this either way (default {AFFNIST_RANGES['shear']})")
    g.add_argument("--scale", type=float, nargs=2, default=list(AFFNIST_RANGES["scale"]), metavar=("LO", "HI"),
                   help=f"each axis scaled by a factor in [LO, HI] (default {list(AFFNIST_RANGES['scale'])})")
    g.add_argument("--no-translate", action="store_true", help="keep the mixed set's digits centred")
    g.add_argument("--seed", type=int, default=0, help="seed of the mixed set (default 0)")
    p.add_argument("--affnist", type=Path, default=None,
                   help="also evaluate on a real affNIST .mat file (e.g. test.mat; needs scipy: "
                        "pip install 'capsnet[affnist]')")
    p.add_argument("--no-plot", action="store_true", help="write the JSON table only")
    p.add_argument("--no-progress", action="store_true")
    return p


def extras_first(args: argparse.Namespace) -> None:
    """The optional packages the options ask for, imported before any work: an ImportError
    naming the option, the extra and the pip command."""
    if not args.no_plot:
        from capsnet.visualize import pyplot  # noqa: PLC0415

        try:
            pyplot()
        except ImportError as exc:
            raise ImportError(f"{exc}; or pass --no-plot for robustness.json alone") from exc
    if args.affnist:
        try:
            import scipy.io  # noqa: F401, PLC0415 - what read_affnist reads .mat files with
        except ImportError as exc:
            raise ImportError(f"--affnist reads .mat files with scipy, which cannot be imported here ({exc}): "
                              "pip install 'capsnet[affnist]' (or pip install scipy)") from exc


def main(argv: list[str] | None = None) -> int:
    """``python -m capsnet.robustness``: returns the exit status (0, or 2 with the error on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        for path in args.checkpoints:  # before any work
            if not path.is_file():
                raise FileNotFoundError(f"no checkpoint at {path}")
        extras_first(args)
        with backend.use(args.backend):
            loaded = [load_model(path) for path in args.checkpoints]  # each checked before any work
        for path, (model, _) in zip(args.checkpoints, loaded):
            check_model(path, model, args.affnist is not None)
        affnist = read_affnist(args.affnist) if args.affnist else None
        digits_of: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # each checkpoint's own dataset's test digits
        for path, (_, header) in zip(args.checkpoints, loaded):
            name = train_config_of(header, path).dataset
            if name not in digits_of:
                digits_of[name] = test_digits(name, args.data_dir, not args.no_progress)
        mixed = {"rotation": args.rotation, "shear": args.shear, "scale": tuple(args.scale),
                 "translate_digits": not args.no_translate, "seed": args.seed}
        runs = []
        with backend.use(args.backend):
            for path, (model, header) in zip(args.checkpoints, loaded):
                images, labels = digits_of[train_config_of(header, path).dataset]
                n = min(args.test_limit or len(labels), len(labels))
                run = evaluate_checkpoint(path, images[:n], labels[:n], mixed=mixed, affnist=affnist,
                                          batch_size=args.batch_size, progress=not args.no_progress,
                                          loaded=(model, header))
                run["test_digits"] = n
                runs.append(run)
                sweeps = "  ".join(f"{k} " + "/".join(f"{p['accuracy']:.3f}" for p in v) for k, v in run["sweeps"].items())
                print(f"{path}: mixed {run['mixed']:.4f}" + (f", affNIST {run['affnist']:.4f}" if "affnist" in run else "")
                      + f" | {sweeps} ({run['seconds']:.0f} s)", flush=True)
    except (ImportError, backend.BackendError, CheckpointError, MNISTNotFoundError, MNISTDownloadError,
            MNISTFormatError, ValueError, OSError) as exc:  # a missing extra, bad input: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = {"test_digits": max(run["test_digits"] for run in runs), "transforms": {k: list(s) for k, (_, s) in TRANSFORMS.items()},
             "mixed": {**mixed, "scale": list(mixed["scale"])}, "affnist_file": str(args.affnist) if args.affnist else None,
             "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {args.out / 'robustness.json'}")
    if not args.no_plot:
        from capsnet.visualize import robustness_plot  # noqa: PLC0415

        print(f"wrote {robustness_plot(table, args.out / 'robustness.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
