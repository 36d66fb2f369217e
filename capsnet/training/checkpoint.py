"""Checkpoints: one .npz holding weights, optimizer state and a JSON header.

Written atomically (a temporary file in the same folder, flushed and fsynced, then
renamed over the old one, then the folder fsynced so the rename itself survives a
power cut), so an interrupted write never leaves a half checkpoint behind. Reading
turns every way a file can be broken (truncated, not a zip, a member missing, a
header that is not JSON) into a :class:`CheckpointError` naming the file and the cause.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
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
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the file itself is already synced
    finally:
        os.close(fd)


_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError)
_HINT = ("it may be truncated (disk full, a copy cut short) or not a capsnet checkpoint; "
         "use another one (best.npz, a backup)")
_ZIP = b"PK\x03\x04"  # what every .npz archive starts with


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint: (header, model_state, optimizer_state)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # the file opened here, not by np.load, so that it is closed whatever np.load raises
        with open(path, "rb") as fh:
            start = fh.read(len(_ZIP))
            if start != _ZIP:  # NumPy would answer with advice to unpickle it, which is unsafe for a file not ours
                raise CheckpointError(f"{path} is not a readable capsnet checkpoint: not an .npz archive (it starts "
                                      f"with {start!r}, an .npz with {_ZIP!r}); expected a checkpoint.npz or best.npz "
                                      "written by capsnet (python -m capsnet.train)")
            fh.seek(0)
            data = np.load(fh, allow_pickle=False)
            if not hasattr(data, "files"):
                raise CheckpointError(f"{path} is a single array, not a capsnet checkpoint (an .npz archive)")
            with data:
                if "header" not in data.files:
                    raise CheckpointError(f"{path} has no header member, so it is not a capsnet checkpoint; {_HINT}")
                header = json.loads(bytes(data["header"]).decode())
                model_state = {k[len("model/"):]: data[k] for k in data.files if k.startswith("model/")}
                optim_state = {k[len("optim/"):]: data[k] for k in data.files if k.startswith("optim/")}
    except CheckpointError:
        raise
    except _READ_ERRORS as exc:
        raise CheckpointError(f"{path} is not a readable capsnet checkpoint ({type(exc).__name__}: {exc}); "
                              f"{_HINT}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is {type(header).__name__}, not a JSON object; {_HINT}")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {header.get('format')!r}, expected {FORMAT!r}")
    if not model_state:
        raise CheckpointError(f"{path} holds no model weights (no model/ members); {_HINT}")
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
