"""CIFAR-10 (Krizhevsky 2009) from its binary version: found or downloaded, read record by record.

Ten classes of 32x32 colour images, 50,000 for training (``data_batch_1.bin`` to
``data_batch_5.bin``) and 10,000 for test (``test_batch.bin``), in
``cifar-10-binary.tar.gz``, whose folder ``cifar-10-batches-bin/`` also holds
``batches.meta.txt`` (the class names, one a line). Each record is 3,073 bytes: the label
(0..9), then the 1,024 red, 1,024 green and 1,024 blue values of the image, rows first.
The archive is read in place (no extraction); an unpacked ``cifar-10-batches-bin/``
folder is read too. Never the Python version of CIFAR-10: unpickling a downloaded file
runs whatever code it holds. Files are looked for and downloaded by the shared fetcher
(:mod:`capsnet.data.files`) in ``$CAPSNET_DATA_DIR/cifar10`` or
``~/.cache/capsnet/cifar10``.
"""
from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capsnet.data import files

__all__ = ["ARCHIVE", "CLASSES", "FILES", "FOLDER", "RECORD_BYTES", "TEST_FILES", "TRAIN_FILES", "load_cifar10",
           "read_cifar10_records"]

ARCHIVE = "cifar-10-binary.tar.gz"
"""The binary version's archive, as distributed (read in place)."""
FOLDER = "cifar-10-batches-bin"
"""The folder the archive unpacks to (read instead of the archive when present)."""
TRAIN_FILES = tuple(f"data_batch_{k}.bin" for k in range(1, 6))
"""The five training batches (10,000 records each)."""
TEST_FILES = ("test_batch.bin",)
"""The test batch (10,000 records)."""
META = "batches.meta.txt"
RECORD_BYTES = 1 + 3 * 32 * 32
"""One record: a label byte and a 3x32x32 image, channels then rows."""

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
"""The class names in label order (as ``batches.meta.txt`` lists them)."""


def read_cifar10_records(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The records of one batch file: images uint8 (N, 3, 32, 32), labels int64 (N,).
    A length that is not a whole number of records, or a label outside 0..9, is a
    :class:`~capsnet.data.files.DatasetFormatError` naming ``source``."""
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise files.DatasetFormatError(
            f"{source}: truncated or not a CIFAR-10 binary batch: {len(data)} bytes is not a whole number of "
            f"{RECORD_BYTES}-byte records (label byte + 3x32x32 image)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = files.check_labels(records[:, 0], 10, source, words="labels (the first byte of each record) must be "
                                "0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def _read_members(path: Path) -> dict[str, bytes]:
    """The batch files and the class names, from the archive or the unpacked folder."""
    names = (*TRAIN_FILES, *TEST_FILES, META)
    if path.is_dir():
        found = {}
        for name in names:
            member = path / name
            if not member.is_file():
                if name == META:
                    continue
                raise files.DatasetFormatError(f"{path}: the CIFAR-10 folder lacks {name}; expected "
                                               + ", ".join(names))
            found[name] = member.read_bytes()
        return found
    try:
        with tarfile.open(path, "r:gz") as archive:
            found = {}
            for name in names:
                try:
                    member = archive.extractfile(f"{FOLDER}/{name}")
                except KeyError:
                    member = None
                if member is None:
                    if name == META:
                        continue
                    raise files.DatasetFormatError(f"{path}: the archive lacks {FOLDER}/{name}; is it "
                                                   f"{ARCHIVE}, the binary version?")
                found[name] = member.read()
            return found
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise files.DatasetFormatError(f"{path}: damaged or truncated archive "
                                       f"({type(exc).__name__}: {exc or 'ends early'})") from None


def _check(path: Path, remote: files.Remote, source: str) -> None:
    for name, data in _read_members(path).items():
        if name != META:
            read_cifar10_records(data, f"{source}: {FOLDER}/{name}")


FILES = files.FileSet(
    title="CIFAR-10", folder="cifar10",
    files=(files.Remote(ARCHIVE, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                        also=(FOLDER,)),),
    mirrors=("https://www.cs.toronto.edu/~kriz/",), homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    hint=f"Take the binary version ({ARCHIVE}), not the Python or MATLAB one; the archive may stay packed, or be "
         f"unpacked to a {FOLDER}/ folder.",
    check=_check)
"""CIFAR-10's one file, the binary version's archive (or the folder it unpacks to)."""


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                 mirrors: Sequence[str] | None = None, progress: bool = True) -> files.Splits:
    """CIFAR-10 from the archive (or its unpacked folder) in the first folder holding it,
    downloaded when missing and ``download`` is true: images uint8 (N, 3, 32, 32), labels
    int64 (N,) in 0..9, class names from ``batches.meta.txt``."""
    path = files.locate(FILES, data_dir, download=download, mirrors=mirrors, progress=progress)[ARCHIVE]
    members = _read_members(path)
    split = []
    for group in (TRAIN_FILES, TEST_FILES):
        parts = [read_cifar10_records(members[name], f"{path}: {name}") for name in group]
        split += [np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])]
    classes = CLASSES
    if META in members:
        listed = tuple(line.strip() for line in members[META].decode("ascii", "replace").splitlines() if line.strip())
        if len(listed) == 10:
            classes = listed
    return files.Splits(*split, classes=classes)
