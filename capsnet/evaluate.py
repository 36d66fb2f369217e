"""Evaluate a checkpoint on the MNIST test set: ``python -m capsnet.evaluate --help``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from capsnet import backend
from capsnet.data import MNISTDownloadError, MNISTFormatError, MNISTNotFoundError, load_mnist, to_float
from capsnet.training import CheckpointError, evaluate_mnist, load_model, train_config_of


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m capsnet.evaluate",
        description="Test accuracy, per-class accuracy and the confusion matrix of a checkpoint "
                    "(checkpoint.npz or best.npz of a run folder) on the MNIST test set, unaugmented.",
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint file written by capsnet.train")
    p.add_argument("--backend", choices=backend.BACKENDS, default="numpy")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST files (else $CAPSNET_DATA_DIR)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        with backend.use(args.backend) as xp:
            model, header = load_model(args.checkpoint, args.backend)
            data = load_mnist(args.data_dir, progress=not args.no_progress)
            n = min(args.test_limit or len(data.test_labels), len(data.test_labels))
            x = to_float(data.test_images[:n], model.dtype, xp)
            y = xp.asarray(data.test_labels[:n])
            result = evaluate_mnist(model, x, y, batch_size=args.batch_size, progress=not args.no_progress,
                                    recon_weight=train_config_of(header, args.checkpoint).recon_weight)
    except (backend.BackendError, CheckpointError, MNISTNotFoundError, MNISTDownloadError,
            MNISTFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint {args.checkpoint} (epoch {header.get('epoch', '?')}), {n} test images")
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
