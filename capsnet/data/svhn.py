"""SVHN (Netzer et al. 2011), the cropped digits: its two ``.mat`` files, found or downloaded.

House-number digits from Google Street View, cropped to 32x32 colour images: 73,257 for
training (``train_32x32.mat``) and 26,032 for test (``test_32x32.mat``). Each file is a
MATLAB 5 file with ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) labels 1..10, where 10
stands for the digit 0. Read with SciPy (``pip install 'capsnet[svhn]'``); SciPy's
``loadmat`` builds arrays and never runs code from the file. Files are looked for and
downloaded by the shared fetcher (:mod:`capsnet.data.files`) in
``$CAPSNET_DATA_DIR/svhn`` or ``~/.cache/capsnet/svhn``. For non-commercial use only.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capsnet.data import files

__all__ = ["FILES", "TEST_FILE", "TRAIN_FILE", "load_svhn", "read_svhn_mat"]

TRAIN_FILE = "train_32x32.mat"
"""The cropped digits' training file."""
TEST_FILE = "test_32x32.mat"
"""The cropped digits' test file."""


def _loadmat():
    try:
        from scipy.io import loadmat  # noqa: PLC0415 - an optional dependency
    except ImportError as exc:
        raise ImportError("reading SVHN's .mat files needs SciPy: pip install 'capsnet[svhn]' (or scipy)") from exc
    return loadmat


def read_svhn_mat(path: str | os.PathLike, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN cropped-digits file: images uint8 (N, 3, 32, 32), labels int64 (N,) in
    0..9 (the file's 10 becomes 0). A file that is not such a MATLAB file, is cut short or
    holds labels outside 1..10 is a :class:`~capsnet.data.files.DatasetFormatError`
    naming the file."""
    source = source or str(path)
    loadmat = _loadmat()
    try:
        content = loadmat(path, variable_names=("X", "y"))
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for a damaged file; one line for all
        raise files.DatasetFormatError(f"{source}: not a readable MATLAB file, damaged or truncated "
                                       f"({type(exc).__name__}: {exc})") from None
    x, y = content.get("X"), content.get("y")
    if x is None or y is None:
        raise files.DatasetFormatError(f"{source}: expected the variables X and y of SVHN's cropped digits, got "
                                       + ", ".join(sorted(k for k in content if not k.startswith("__"))))
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise files.DatasetFormatError(f"{source}: X must be uint8 of shape (32, 32, 3, N), got {x.dtype} "
                                       f"{tuple(x.shape)}")
    y = np.asarray(y).reshape(-1)
    files.check_pair(x.transpose(3, 0, 1, 2), y, f"{source} (X)", f"{source} (y)")
    labels = files.check_labels(y.astype(np.int64) - 1, 10, source, words="labels must be 1..10 (10 for the digit "
                                "0), shifted down by one here")
    labels = (labels + 1) % 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


def _check(path: Path, remote: files.Remote, source: str) -> None:
    read_svhn_mat(path, source)


FILES = files.FileSet(
    title="SVHN", folder="svhn",
    files=(files.Remote(TRAIN_FILE, "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8"),
           files.Remote(TEST_FILE, "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b")),
    mirrors=("http://ufldl.stanford.edu/housenumbers/",), homepage="http://ufldl.stanford.edu/housenumbers/",
    hint="Take format 2, the cropped digits (train_32x32.mat and test_32x32.mat).", check=_check)
"""SVHN's cropped-digit training and test files (sha256 as served)."""


def load_svhn(data_dir: str | os.PathLike | None = None, *, download: bool = True,
              mirrors: Sequence[str] | None = None, progress: bool = True) -> files.Splits:
    """SVHN's cropped digits from the first folder holding each file, downloaded when
    missing and ``download`` is true: images uint8 (N, 3, 32, 32), labels int64 (N,) 0..9."""
    _loadmat()  # the missing dependency is said before any download
    paths = files.locate(FILES, data_dir, download=download, mirrors=mirrors, progress=progress)
    train = read_svhn_mat(paths[TRAIN_FILE])
    test = read_svhn_mat(paths[TEST_FILE])
    return files.Splits(*train, *test, classes=tuple(str(k) for k in range(10)))
