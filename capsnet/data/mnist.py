"""MNIST: read the IDX files, find them on disk, download them safely; the packaged sample.

The four files (LeCun, Cortes and Burges) are looked for, plain or ``.gz``, in
``data_dir``, then ``$CAPSNET_DATA_DIR``, then a per-user cache folder
(``$XDG_CACHE_HOME/capsnet/mnist``, by default ``~/.cache/capsnet/mnist``).
Missing files are downloaded into the first of these folders, each one checked
against the sha256 of its *decompressed* content before it is moved into place,
so no partial or unverified file is ever left behind.

:func:`load_mnist_sample` reads the 5,000 + 1,000 image sample installed with the
package (:data:`SAMPLE_DIR`), for a first run, the tutorials and the tests, with no
download; it is a sample, not MNIST.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from capsnet import __version__

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
_CHUNK = 1 << 16
_USER_AGENT = f"capsnet-mnist/{__version__} (+python urllib)"


class MNISTFormatError(ValueError):
    """An MNIST/IDX file is damaged or is not the file it claims to be."""


class MNISTNotFoundError(FileNotFoundError):
    """The MNIST files are in none of the folders searched."""


class MNISTDownloadError(OSError):
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


def read_idx(path: str | os.PathLike, expect: str | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed when its name ends in ``.gz``) as uint8.

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
    if path.suffix == ".gz":
        data = _decompress(data, source)
    return _parse_idx(data, source, expect)


# --------------------------------------------------------------------- finding


def _cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore relative paths here.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "capsnet" / "mnist"


def _labelled_dirs(data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    if data_dir is not None:
        found.append((Path(data_dir).expanduser(), "data_dir / --data-dir"))
    env = os.environ.get("CAPSNET_DATA_DIR", "")
    if env:
        found.append((Path(env).expanduser(), "$CAPSNET_DATA_DIR"))
    found.append((_cache_dir(), "per-user cache"))
    unique: list[tuple[Path, str]] = []
    for path, label in found:
        if all(path != seen for seen, _ in unique):
            unique.append((path, label))
    return unique


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for MNIST, in order: ``data_dir``, ``$CAPSNET_DATA_DIR``,
    then ``$XDG_CACHE_HOME/capsnet/mnist`` (default ``~/.cache/capsnet/mnist``)."""
    return [path for path, _ in _labelled_dirs(data_dir)]


def find_file(name: str, dirs: Iterable[str | os.PathLike]) -> Path | None:
    """The first ``dir/name`` or ``dir/name.gz`` that exists, or None."""
    for folder in dirs:
        for candidate in (Path(folder) / name, Path(folder) / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _not_found_message(labelled: list[tuple[Path, str]], missing: Sequence[str]) -> str:
    folders = "\n".join(f"  {path}  ({label})" for path, label in labelled)
    names = "\n".join(f"  {name}.gz  (or uncompressed: {name})" for name in missing)
    return (
        f"MNIST files not found. Folders searched, in order:\n{folders}\n"
        f"Missing files:\n{names}\n"
        f"Put the files in one of these folders, or in another folder passed as "
        f"load_mnist(data_dir=...) (--data-dir on the command line) or named by the CAPSNET_DATA_DIR "
        f"environment variable; or allow downloading (download=True)."
    )


# ------------------------------------------------------------------ downloading


class _BadDownload(Exception):
    """A mirror answered, but what came was short or failed verification."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect: {exc.reason}"
    if isinstance(exc, (_BadDownload, MNISTFormatError)):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _mirror_url(base: str, name: str) -> str:
    return f"{base if base.endswith('/') else base + '/'}{name}.gz"


def _stream(url: str, out, desc: str, progress: bool, timeout: float) -> None:
    """Copy the body at ``url`` into the open file ``out``."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the open connection
        raise
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(
            total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
            disable=None if progress else True, leave=False,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _BadDownload(
            f"connection dropped: received {received} of {total} bytes (Content-Length)"
        )


def _verify(name: str, compressed: bytes, source: str) -> None:
    """Check a downloaded ``name.gz``: gzip, sha256 of the content, IDX header."""
    data = _decompress(compressed, source)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        raise _BadDownload(
            f"sha256 mismatch for the decompressed {name}: got {digest}, expected {SHA256[name]}"
        )
    _parse_idx(data, source, "images" if "images" in name else "labels")


def _fetch(url: str, dest: Path, name: str, progress: bool, timeout: float) -> Path:
    """Download ``url`` to a temporary file in ``dest``, verify it, move it into place."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
    except OSError as exc:
        raise MNISTDownloadError(
            f"cannot write a temporary file in {dest}: {exc}; "
            "choose a writable folder: pass it as data_dir (or dest to download_mnist), or set CAPSNET_DATA_DIR"
        ) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, f"{name}.gz", progress, timeout)
            out.flush()
            os.fsync(out.fileno())
        _verify(name, tmp.read_bytes(), f"downloaded {name}.gz")
        final = dest / f"{name}.gz"
        os.replace(tmp, final)
        return final
    except BaseException:  # KeyboardInterrupt too: never leave a partial file
        tmp.unlink(missing_ok=True)
        raise


def _offline_hint(dest: Path) -> str:
    names = "\n".join(f"  {name}.gz" for name in FILE_NAMES)
    return (
        f"To work offline, fetch the MNIST files on a machine with internet access "
        f"(from any MNIST mirror, e.g. {MIRRORS[0]}) and put them, gzip-compressed or "
        f"not, in {dest}:\n{names}\n"
        f"or put them in another folder and pass it as data_dir (--data-dir on the command line) or set "
        f"CAPSNET_DATA_DIR.\n"
        f"To train with no download at all, use the MNIST sample installed with capsnet "
        f"(5,000 + 1,000 images, not the full MNIST): python -m capsnet.train --dataset mnist-sample, "
        f"or capsnet.data.load_mnist_sample()."
    )


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
    must match :data:`SHA256` and parse as IDX before it is moved into place.
    Returns the paths written. Raises :class:`MNISTDownloadError`, listing
    every mirror's error, when no mirror delivers a file.
    """
    if isinstance(mirrors, str):
        mirrors = (mirrors,)
    mirrors = tuple(mirrors)
    if not mirrors:
        raise ValueError("download_mnist needs at least one mirror base URL, got none")
    names = tuple(names)
    unknown = [name for name in names if name not in SHA256]
    if unknown:
        raise ValueError(
            f"download_mnist names must be among {', '.join(FILE_NAMES)}, got {', '.join(unknown)}"
        )
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MNISTDownloadError(
            f"cannot create the MNIST folder {dest}: {exc}; "
            "choose a writable folder: pass it as data_dir (or dest to download_mnist), or set CAPSNET_DATA_DIR"
        ) from exc

    written = []
    for name in names:
        if find_file(name, [dest]) is not None:
            continue
        errors = []
        for base in mirrors:
            url = _mirror_url(base, name)
            try:
                written.append(_fetch(url, dest, name, progress, timeout))
                break
            except MNISTDownloadError:
                raise
            except (OSError, ValueError, http.client.HTTPException, _BadDownload) as exc:
                errors.append(f"  {url}: {_describe(exc)}")
        else:
            raise MNISTDownloadError(
                f"could not download {name}.gz from any mirror:\n" + "\n".join(errors)
                + "\n" + _offline_hint(dest)
            )
    return written


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
    labelled = _labelled_dirs(data_dir)
    dirs = [path for path, _ in labelled]
    needed = (TEST_IMAGES, TEST_LABELS) if test_only else FILE_NAMES
    missing = [name for name in needed if find_file(name, dirs) is None]
    if missing:
        if not download:
            raise MNISTNotFoundError(_not_found_message(labelled, missing))
        download_mnist(dirs[0], mirrors=mirrors, progress=progress, names=missing)
    paths = {}
    for name in needed:
        path = find_file(name, dirs)
        if path is None:  # deleted between the download and now
            raise MNISTNotFoundError(_not_found_message(labelled, [name]))
        paths[name] = path
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
