"""Checkpoints: one .npz holding weights, optimizer state and a JSON header.

Written atomically (a temporary file in the same folder, flushed, then renamed),
so an interrupted write never leaves a half checkpoint behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "capsnet-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model asked for."""


def save_checkpoint(path: str | os.PathLike, *, model_state: dict[str, np.ndarray],
                    optimizer_state: dict[str, Any] | None = None, header: dict[str, Any]) -> Path:
    """Write weights, optimizer state and a JSON-able header to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {f"model/{k}": np.asarray(v) for k, v in model_state.items()}
    optim_scalars: dict[str, Any] = {}
    for k, v in (optimizer_state or {}).items():
        if isinstance(v, np.ndarray):
            arrays[f"optim/{k}"] = v
        else:
            optim_scalars[k] = v.item() if isinstance(v, np.generic) else v
    meta = {"format": FORMAT, **header, "optimizer_scalars": optim_scalars}
    arrays["header"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint: (header, model_state, optimizer_state)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            model_state = {k[len("model/"):]: data[k] for k in data.files if k.startswith("model/")}
            optim_state = {k[len("optim/"):]: data[k] for k in data.files if k.startswith("optim/")}
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable capsnet checkpoint ({exc})") from exc
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {header.get('format')!r}, expected {FORMAT!r}")
    optim_state.update(header.pop("optimizer_scalars", {}))
    return header, model_state, optim_state


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'key: checkpoint has A, asked for B' for each key whose values differ."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key, "<absent>"), wanted.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: checkpoint has {a!r}, asked for {b!r}")
    return out
