"""MNIST: read the IDX files, find them on disk, download them safely; the packaged sample.

The four files (LeCun, Cortes and Burges) are looked for, plain or ``.gz``, in
``data_dir``, then ``$CAPSNET_DATA_DIR``, then a per-user cache folder
(``$XDG_CACHE_HOME/capsnet/mnist``, by default ``~/.cache/capsnet/mnist``).
Missing files are downloaded into the first of these folders by the fetcher every
dataset shares (:mod:`capsnet.data.files`), each one checked against the sha256 of
its *decompressed* content before it is moved into place, so no partial or
unverified file is ever left behind.

:func:`load_mnist_sample` reads the 5,000 + 1,000 image sample installed with the
package (:data:`SAMPLE_DIR`), for a first run, the tutorials and the tests, with no
download; it is a sample, not MNIST.
"""
from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capsnet.data import files

__all__ = [
    "FILE_NAMES",
    "MIRRORS",
    "MNIST",
    "MNISTDownloadError",
    "MNISTFormatError",
    "MNISTNotFoundError",
    "SAMPLE_DIR",
    "SHA256",
    "candidate_dirs",
    "download_mnist",
    "find_file",
    "load_mnist",
    "load_mnist_sample",
    "read_idx",
]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
"""The four MNIST files, without the ``.gz``: training images and labels, test images and labels."""

# sha256 of the decompressed files, so that recompressed copies verify too.
SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
"""sha256 of each full MNIST file's decompressed content, checked on download."""

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
"""The base URLs :func:`download_mnist` tries, in order."""

SAMPLE_DIR = Path(__file__).resolve().parent / "mnist_sample"
"""The folder of the MNIST sample installed with the package: the first 5,000 training and
1,000 test images of MNIST, read by :func:`load_mnist_sample`."""

_MAGIC = {"images": 0x00000803, "labels": 0x00000801}
_MAGIC_WORDS = {"images": "an IDX image file", "labels": "an IDX label file"}
_UBYTE = 0x08


class MNISTFormatError(files.DatasetFormatError):
    """An MNIST/IDX file is damaged or is not the file it claims to be."""


class MNISTNotFoundError(files.DatasetNotFoundError):
    """The MNIST files are in none of the folders searched."""


class MNISTDownloadError(files.DownloadError):
    """No mirror delivered a verified copy of an MNIST file."""


@dataclass(frozen=True, eq=False)
class MNIST:
    """The MNIST arrays on the host.

    train_images (60000, 28, 28) uint8, train_labels (60000,) int64,
    test_images (10000, 28, 28) uint8, test_labels (10000,) int64.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __repr__(self) -> str:
        return (
            f"MNIST(train={self.train_images.shape[0]} images, "
            f"test={self.test_images.shape[0]} images, "
            f"image shape {tuple(self.train_images.shape[1:])})"
        )


# --------------------------------------------------------------------- reading


def _decompress(raw: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise MNISTFormatError(
            f"{source}: corrupted gzip: the compressed stream ends early (file cut short?)"
        ) from None
    except (OSError, zlib.error) as exc:  # BadGzipFile, CRC mismatch, bad deflate data
        raise MNISTFormatError(f"{source}: corrupted gzip: {exc}") from None


def _parse_idx(data: bytes, source: str, expect: str | None) -> np.ndarray:
    """Check an IDX header against ``data`` and return the payload as uint8."""
    if len(data) < 4:
        raise MNISTFormatError(
            f"{source}: truncated: {len(data)} bytes, too short for the 4-byte IDX magic number"
        )
    magic = int.from_bytes(data[:4], "big")
    if expect is not None:
        if magic != _MAGIC[expect]:
            raise MNISTFormatError(
                f"{source}: wrong magic number 0x{magic:08X}, "
                f"expected 0x{_MAGIC[expect]:08X} ({_MAGIC_WORDS[expect]})"
            )
    elif data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or data[3] == 0:
        raise MNISTFormatError(
            f"{source}: wrong magic number 0x{magic:08X}, expected 0x000008NN "
            "(an IDX file of unsigned bytes with NN dimensions)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTFormatError(
            f"{source}: truncated: the header needs {header} bytes for {ndim} dimensions, "
            f"file has {len(data)} bytes"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    have = len(data) - header
    if have != expected:
        what = "truncated" if have < expected else "too long"
        shape = f"{'x'.join(map(str, dims))} = " if ndim > 1 else ""
        raise MNISTFormatError(
            f"{source}: {what}: header says {shape}{expected} bytes, "
            f"file has {have} bytes after the {header}-byte header"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike, expect: str | None = None, *, gzipped: bool | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed when its name ends in ``.gz``, or when ``gzipped``) as uint8.

    ``expect`` is ``"images"`` (magic 0x00000803, 3 dimensions), ``"labels"``
    (magic 0x00000801, 1 dimension) or None (any IDX file of unsigned bytes).
    Raises :class:`MNISTFormatError`, naming the file, when the header, the
    payload length or the gzip stream is wrong.
    """
    if expect not in (None, "images", "labels"):
        raise ValueError(f"read_idx expect must be 'images', 'labels' or None, got {expect!r}")
    path = Path(path)
    source = str(path)
    data = path.read_bytes()
    if path.suffix == ".gz" if gzipped is None else gzipped:
        data = _decompress(data, source)
    return _parse_idx(data, source, expect)


# ------------------------------------------------------- finding and downloading


def _check_download(path: Path, remote: files.Remote, source: str) -> None:
    """A downloaded MNIST file must also parse as IDX (after its sha256 matched)."""
    _parse_idx(_decompress(path.read_bytes(), source), source, "images" if "images" in remote.name else "labels")


def _file_set(mirrors: Sequence[str] | None = None, names: Sequence[str] = FILE_NAMES) -> files.FileSet:
    """The MNIST files ``names`` (all four by default) as the shared fetcher sees them (built on
    each call, from :data:`SHA256` and :data:`MIRRORS` as they are now)."""
    return files.FileSet(
        title="MNIST", folder="mnist", env_is_folder=True,
        files=tuple(files.Remote(f"{name}.gz", SHA256[name], also=(name,), gunzip_digest=True)
                    for name in names),
        mirrors=tuple(MIRRORS if mirrors is None else mirrors), homepage=f"any MNIST mirror, e.g. {MIRRORS[0]}",
        hint="The files may be gzip-compressed or not. To train with no download at all, use the MNIST sample "
             "installed with capsnet (5,000 + 1,000 images, not the full MNIST): python -m capsnet.train "
             "--dataset mnist-sample, or capsnet.data.load_mnist_sample().",
        check=_check_download, not_found=MNISTNotFoundError, download_error=MNISTDownloadError)


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for MNIST, in order: ``data_dir``, ``$CAPSNET_DATA_DIR``,
    then ``$XDG_CACHE_HOME/capsnet/mnist`` (default ``~/.cache/capsnet/mnist``)."""
    return [path for path, _ in files.labelled_dirs(_file_set(), data_dir)]


def find_file(name: str, dirs: Iterable[str | os.PathLike]) -> Path | None:
    """The first ``dir/name`` or ``dir/name.gz`` that exists, or None."""
    for folder in dirs:
        for candidate in (Path(folder) / name, Path(folder) / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def download_mnist(
    dest: str | os.PathLike,
    *,
    mirrors: Sequence[str] = MIRRORS,
    progress: bool = True,
    timeout: float = 30.0,
    names: Iterable[str] = FILE_NAMES,
) -> list[Path]:
    """Download the MNIST files missing from ``dest`` (default: all four).

    Each ``name.gz`` is tried on each mirror in turn; the decompressed content
    must match :data:`SHA256` and parse as IDX before it is moved into place
    (:func:`capsnet.data.files.download_files`). Returns the paths written. Raises
    :class:`MNISTDownloadError`, listing every mirror's error, when no mirror
    delivers a file.
    """
    if isinstance(mirrors, str):
        mirrors = (mirrors,)
    names = tuple(names)
    unknown = [name for name in names if name not in SHA256]
    if unknown:
        raise ValueError(
            f"download_mnist names must be among {', '.join(FILE_NAMES)}, got {', '.join(unknown)}"
        )
    return files.download_files(_file_set(mirrors), dest, names=[f"{name}.gz" for name in names],
                                mirrors=mirrors, progress=progress, timeout=timeout)


# --------------------------------------------------------------------- loading


def _load_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, expect="images")
    labels = read_idx(labels_path, expect="labels")
    if images.shape[1:] != (28, 28):
        raise MNISTFormatError(
            f"{images_path}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}"
        )
    if images.shape[0] != labels.shape[0]:
        raise MNISTFormatError(
            f"image and label counts differ: {images_path} has {images.shape[0]} images "
            f"but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise MNISTFormatError(
            f"{labels_path}: labels must be digits 0..9, found {labels[bad]} at index {bad}"
        )
    return images, labels.astype(np.int64)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirrors: Sequence[str] = MIRRORS,
    progress: bool = True,
    test_only: bool = False,
) -> MNIST:
    """Load MNIST from the first folder of :func:`candidate_dirs` holding each file.

    Files found nowhere are downloaded into the first candidate folder when
    ``download`` is true; otherwise :class:`MNISTNotFoundError` lists the
    folders searched and the file names to put there. ``test_only``: only the two
    test files are looked for (and downloaded); the training split is empty.
    """
    needed = (TEST_IMAGES, TEST_LABELS) if test_only else FILE_NAMES
    found = files.locate(_file_set(mirrors, needed), data_dir, download=download, mirrors=mirrors,
                         progress=progress)
    paths = {name: found[f"{name}.gz"] for name in needed}
    if test_only:
        train_images, train_labels = np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64)
    else:
        train_images, train_labels = _load_pair(paths[TRAIN_IMAGES], paths[TRAIN_LABELS])
    test_images, test_labels = _load_pair(paths[TEST_IMAGES], paths[TEST_LABELS])
    return MNIST(train_images, train_labels, test_images, test_labels)


def load_mnist_sample() -> MNIST:
    """The MNIST sample installed with capsnet, read from the package with no download.

    The first 5,000 training and the first 1,000 test images of MNIST with their labels
    (CC BY-SA 3.0, as MNIST): train_images (5000, 28, 28) uint8, test_images (1000, 28, 28).
    For first runs, tutorials and tests; accuracies on it are not MNIST's. Raises
    :class:`MNISTNotFoundError` when the installation lacks the files.
    """
    missing = [name for name in FILE_NAMES if find_file(name, [SAMPLE_DIR]) is None]
    if missing:
        raise MNISTNotFoundError(
            f"the MNIST sample installed with capsnet is incomplete: {SAMPLE_DIR} lacks "
            + ", ".join(f"{name}.gz" for name in missing)
            + "; reinstall capsnet (pip install --force-reinstall capsnet)"
        )
    return load_mnist(SAMPLE_DIR, download=False, progress=False)
