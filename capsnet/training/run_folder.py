"""The run folder: what a training run writes, held by one process at a time.

A run folder holds ``checkpoint.npz`` (the state to resume from, written atomically),
``best.npz``, ``metrics.jsonl`` (one JSON line per epoch), ``config.json`` and ``.lock``.
:class:`RunFolder` knows these paths and the folder's rules:

- **one process**: :meth:`RunFolder.lock` takes an OS lock on ``.lock`` (``fcntl.flock``;
  the kernel drops it when the process ends, even by ``kill -9``) and writes the holder's
  PID there; a second process is refused with a :class:`RunFolderError` naming that PID;
- **a fresh run does not overwrite a run, and a resume needs a checkpoint**
  (:meth:`RunFolder.check_start`);
- **the metrics log agrees with the checkpoint**: an epoch's line is written before its
  checkpoint, and on a resume :meth:`RunFolder.trim_metrics` drops the lines of epochs the
  checkpoint does not hold (a run that failed or was killed between the two writes, or
  a line cut short by a full disk), so no epoch is ever logged twice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from capsnet.training.checkpoint import CheckpointError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: msvcrt's byte-range lock instead
    fcntl = None
    import msvcrt

__all__ = ["RunFolder", "RunFolderError"]


class RunFolderError(CheckpointError):
    """The run folder does not allow what was asked. ``reason`` says why: ``"occupied"``
    (it holds a run and no resume was asked), ``"empty"`` (a resume was asked and there is
    no checkpoint), ``"locked"`` (another process holds it; ``pid`` is that process's,
    when known) or ``"file"`` (the path names a file, not a folder)."""

    def __init__(self, message: str, reason: str, folder: Path, pid: int | None = None):
        super().__init__(message)
        self.reason, self.folder, self.pid = reason, folder, pid


class RunFolder:
    """The files of one run in ``path`` (created on :meth:`lock`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoint = self.path / "checkpoint.npz"
        self.best = self.path / "best.npz"
        self.metrics = self.path / "metrics.jsonl"
        self.config = self.path / "config.json"
        self.lock_path = self.path / ".lock"
        self._lock_fd: int | None = None

    # -- one process at a time ---------------------------------------------------
    @property
    def locked(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._lock_fd is not None

    def lock(self) -> "RunFolder":
        """Hold the folder for this process until :meth:`unlock` (or the process ends);
        raises :class:`RunFolderError` (reason "locked") when another process holds it.
        Usable as a context manager."""
        if self._lock_fd is not None:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} is a file, not a folder: train in another run folder", "file",
                                 self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _try_lock(fd)
        except OSError:
            pid = _read_pid(fd)
            os.close(fd)
            holder = f"process {pid}" if pid is not None else "another process"
            raise RunFolderError(f"{self.path} is in use by {holder}, which is training in it; wait for it to end, "
                                 "stop it, or use another run folder", "locked", self.path, pid) from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        """Let other processes have the folder (the PID file stays; the lock is what counts)."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the lock

    def __enter__(self) -> "RunFolder":
        return self.lock()

    def __exit__(self, *exc: Any) -> None:
        self.unlock()

    # -- the folder's rules ----------------------------------------------------
    def check_start(self, resume: bool) -> None:
        """Refuse a fresh run over a run, or a resume without a checkpoint (RunFolderError)."""
        if resume and not self.checkpoint.exists():
            raise RunFolderError(f"resume asked, but {self.path} holds no checkpoint (expected "
                                 f"{self.checkpoint.name})", "empty", self.path)
        if not resume and self.checkpoint.exists():
            raise RunFolderError(f"{self.path} already holds a run: resume it (fit(resume=True)), or train in "
                                 "another run folder", "occupied", self.path)

    def write_config(self, record: dict[str, Any]) -> None:
        self.config.write_text(json.dumps(record, indent=2) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One epoch's line, flushed to the disk before the checkpoint that follows it."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def trim_metrics(self, epochs: int) -> int:
        """Keep the lines of the first ``epochs`` epochs (what the checkpoint holds) and drop
        the rest: lines of later epochs, and a last line cut short. Returns how many were dropped."""
        if not self.metrics.exists():
            return 0
        kept, dropped = [], 0
        text = self.metrics.read_text()
        for line in text.splitlines():
            try:
                epoch = json.loads(line).get("epoch")
            except (ValueError, AttributeError):
                epoch = None
            if isinstance(epoch, int) and epoch <= epochs:
                kept.append(line)
            else:
                dropped += 1
        if dropped or (text and not text.endswith("\n")):  # a whole last line without its newline: add it
            tmp = self.metrics.with_name(self.metrics.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.metrics)
        return dropped

    def clear_metrics(self) -> None:
        self.metrics.unlink(missing_ok=True)


def _try_lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # pragma: no cover - never run: CI is Linux only
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
