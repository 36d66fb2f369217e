"""Export a checkpoint's weights to safetensors: ``python -m capsnet.export --help``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capsnet import __version__
from capsnet.models.capsnet import _safetensors
from capsnet.training import CheckpointError, load_model


def main(argv: list[str] | None = None) -> int:
    """``python -m capsnet.export``: returns the exit status (0, or 2 with the error on stderr)."""
    p = argparse.ArgumentParser(
        prog="python -m capsnet.export",
        description="Write the weights of a capsnet.train checkpoint (checkpoint.npz or best.npz) to a "
                    ".safetensors file that other frameworks read, with the CapsNet configuration in its "
                    "metadata. CapsNet.from_safetensors reads it back. Needs the safetensors package: "
                    "pip install 'capsnet[safetensors]'.",
        epilog="example:\n  python -m capsnet.export runs/gpu/best.npz capsnet-mnist.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"capsnet {__version__}")
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by python -m capsnet.train")
    p.add_argument("out", type=Path, help="the .safetensors file to write")
    args = p.parse_args(argv)
    try:
        _safetensors("numpy")  # a missing extra fails before the checkpoint is read
        model, header = load_model(args.checkpoint, "numpy")
        if not hasattr(model, "save_safetensors"):
            raise CheckpointError(f"{args.checkpoint} holds a {type(model).__name__}; the export writes CapsNet "
                                  "checkpoints only for now")
        meta = {"source_checkpoint": args.checkpoint.name, "epoch": str(header.get("epoch", ""))}
        model.save_safetensors(args.out, meta)
    except (CheckpointError, ImportError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(model.parameters())} tensors, {model.dtype}, epoch {meta['epoch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
