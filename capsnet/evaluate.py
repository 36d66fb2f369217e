"""Evaluate a checkpoint on its dataset's test set: ``python -m capsnet.evaluate --help``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from capsnet import __version__, backend
from capsnet.data import DatasetFormatError, DatasetNotFoundError, DownloadError
from capsnet.training import CheckpointError, evaluate_classifier, load_model, train_config_of
from capsnet.models.capsnet import CapsNetTask
from capsnet.training.datasets import dataset
from capsnet.training.evaluation import evaluate
from capsnet.training.run import data_sources, load_data, run_metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m capsnet.evaluate``: returns the exit status (0, or 2 with the error on stderr)."""
    p = argparse.ArgumentParser(
        prog="python -m capsnet.evaluate",
        description="Test accuracy, per-class accuracy and the confusion matrix of a checkpoint "
                    "(checkpoint.npz or best.npz of a run folder) on the test set of the data it was trained "
                    "on (MNIST, expanded MNIST with the digits centred, or MultiMNIST's fixed pairs, where a "
                    "pair is right when both digits are), unaugmented.",
    )
    p.add_argument("--version", action="version", version=f"capsnet {__version__}")
    p.add_argument("checkpoint", type=Path, help="a checkpoint file written by capsnet.train")
    p.add_argument("--backend", choices=backend.BACKENDS, default="numpy")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files (else $CAPSNET_DATA_DIR)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--test-pairs", type=int, default=None, help="MultiMNIST: pairs per test image (default: "
                                                               "the run's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        with backend.use(args.backend) as xp:
            model, header = load_model(args.checkpoint, args.backend)
            cfg = train_config_of(header, args.checkpoint)
            cfg.test_limit = args.test_limit
            spec = dataset(cfg.dataset)
            if args.test_pairs is not None:
                if not spec.test_pairs:
                    raise ValueError(f"--test-pairs applies to MultiMNIST checkpoints; this one is {cfg.dataset}")
                cfg.test_pairs = args.test_pairs
            data = load_data(cfg, args.data_dir, progress=not args.no_progress)
            _, test = data_sources(cfg, data, xp, train=False)
            n = len(test)
            if spec.digits > 1:  # a confusion matrix needs one digit per image
                result = evaluate(model, CapsNetTask(cfg.recon_weight), test, batch_size=args.batch_size,
                                  metrics=run_metrics(cfg), progress=not args.no_progress)
            else:
                x, y = test.batch(np.arange(n))
                result = evaluate_classifier(model, x, y, batch_size=args.batch_size,
                                             progress=not args.no_progress, recon_weight=cfg.recon_weight)
    except (backend.BackendError, CheckpointError, DatasetNotFoundError, DownloadError, DatasetFormatError,
            ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if spec.digits > 1:
        print(f"checkpoint {args.checkpoint} (epoch {header.get('epoch', '?')}), {n} MultiMNIST test pairs")
        print(f"both digits right {result['accuracy']:.4f}   error {result['error']:.4f}   test loss {result['loss']:.5f}")
        if args.json:
            args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "epoch": header.get("epoch"),
                                             "dataset": cfg.dataset, **result}, indent=2))
        return 0
    print(f"checkpoint {args.checkpoint} (epoch {header.get('epoch', '?')}), {n} {cfg.dataset} test images")
    print(f"test accuracy {result['accuracy']:.4f}   test loss {result['loss']:.5f}")
    print("per-class accuracy: " + "  ".join(f"{k}:{a:.4f}" for k, a in enumerate(result["per_class_accuracy"])))
    print("confusion matrix (rows: true class, columns: predicted)")
    for k, row in enumerate(result["confusion"]):
        print(f"  {k}: " + " ".join(f"{v:5d}" for v in row))
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "epoch": header.get("epoch"), **result},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
