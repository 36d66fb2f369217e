"""Dataset files: where they are looked for, how they are downloaded and verified, the
errors every reader raises, and the splits every reader returns. One fetcher for all datasets.

A dataset describes its files once, as a :class:`FileSet` of :class:`Remote` files (name,
sha256, other names that count as the file on disk). :func:`locate` finds each file in
``data_dir``, then ``$CAPSNET_DATA_DIR`` (its subfolder named after the dataset, except for
MNIST, which reads the folder itself), then the per-user cache
(``$XDG_CACHE_HOME/capsnet/<dataset>``, by default ``~/.cache/capsnet/<dataset>``), and
downloads the missing ones into the first of these folders with :func:`download_files`. A
download is written to a temporary file in that folder, its sha256 checked (and its format,
where the dataset says how), and only then moved into place: no partial or unverified file
is ever left behind, even after Ctrl-C.

This is our own downloader rather than pooch: it is about 200 lines on the standard
library, keeps the core free of dependencies, tries every mirror in turn and reports each
one's error, and its offline message names the exact files and folders, which is what a
user on a machine without internet needs.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from capsnet import __version__

__all__ = [
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DownloadError",
    "FileSet",
    "Remote",
    "Splits",
    "cache_dir",
    "check_labels",
    "check_pair",
    "download_files",
    "find_remote",
    "labelled_dirs",
    "locate",
]

_CHUNK = 1 << 16
_USER_AGENT = f"capsnet/{__version__} (+python urllib)"


class DatasetFormatError(ValueError):
    """A dataset file is damaged (truncated, wrong magic number, labels out of range, ...)
    or is not the file it claims to be. The message names the file and what is wrong."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the folders searched."""


class DownloadError(OSError):
    """No mirror delivered a verified copy of a dataset file."""


@dataclass(frozen=True)
class Remote:
    """One file of a dataset: ``name`` as the mirrors serve it and as it is saved, its
    ``sha256`` (of the gunzipped content when ``gunzip_digest``, so that recompressed
    copies verify), and ``also``: other names that count as the file when found on disk
    (the uncompressed file, the folder an archive unpacks to)."""

    name: str
    sha256: str
    also: tuple[str, ...] = ()
    gunzip_digest: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.also)


@dataclass(frozen=True)
class FileSet:
    """The files of one dataset and where they come from.

    ``title`` names it in messages ("CIFAR-10"); ``folder`` is its cache subfolder (and its
    subfolder of ``$CAPSNET_DATA_DIR`` unless ``env_is_folder``); ``mirrors`` are base URLs
    tried in order; ``check(path, remote, source)`` checks the format of a download before
    it is kept (None: the sha256 alone); ``homepage`` and ``hint`` go into the offline message;
    ``not_found`` and ``download_error`` are the error types raised (subclasses of
    :class:`DatasetNotFoundError` and :class:`DownloadError`).
    """

    title: str
    folder: str
    files: tuple[Remote, ...]
    mirrors: tuple[str, ...]
    homepage: str = ""
    hint: str = ""
    env_is_folder: bool = False
    check: Callable[[Path, Remote, str], None] | None = None
    not_found: type = DatasetNotFoundError
    download_error: type = DownloadError

    def remote(self, name: str) -> Remote:
        for remote in self.files:
            if remote.name == name:
                return remote
        raise ValueError(f"{self.title} has no file {name!r}; its files are "
                         + ", ".join(r.name for r in self.files))


@dataclass(frozen=True, eq=False)
class Splits:
    """The training and test split of a dataset on the host, as a reader returns them:
    images uint8 (N, H, W) or (N, C, H, W), labels int64 (N,), the class names, and
    anything else the files hold per example in ``extra`` (smallNORB's info)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"Splits(train={self.train_images.shape[0]} images, test={self.test_images.shape[0]} images, "
                f"image shape {tuple(self.train_images.shape[1:])}, {len(self.classes)} classes)")


# ------------------------------------------------------------------ checks readers share


def check_labels(labels: np.ndarray, n_classes: int, source: str, error: type = DatasetFormatError,
                 words: str = "") -> np.ndarray:
    """``labels`` as int64, or ``error`` naming ``source`` and the first label outside
    0..n_classes-1."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    bad = (labels < 0) | (labels >= n_classes)
    if labels.size and bad.any():
        k = int(np.argmax(bad))
        what = words or f"labels must be 0..{n_classes - 1}"
        raise error(f"{source}: {what}, found {labels[k]} at index {k}")
    return labels


def check_pair(images: np.ndarray, labels: np.ndarray, images_source: str, labels_source: str,
               error: type = DatasetFormatError) -> None:
    """``error`` when the image and label counts differ."""
    if images.shape[0] != labels.shape[0]:
        raise error(f"image and label counts differ: {images_source} has {images.shape[0]} images "
                    f"but {labels_source} has {labels.shape[0]} labels")


# --------------------------------------------------------------------------- finding


def cache_dir(folder: str) -> Path:
    """The per-user cache of one dataset: ``$XDG_CACHE_HOME/capsnet/<folder>``
    (default ``~/.cache/capsnet/<folder>``)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore relative paths here.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "capsnet" / folder


def labelled_dirs(files: FileSet, data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """The folders searched for ``files``, in order, each with the words that say where it came from."""
    found: list[tuple[Path, str]] = []
    if data_dir is not None:
        found.append((Path(data_dir).expanduser(), "data_dir / --data-dir"))
    env = os.environ.get("CAPSNET_DATA_DIR", "")
    if env:
        if files.env_is_folder:
            found.append((Path(env).expanduser(), "$CAPSNET_DATA_DIR"))
        else:
            found.append((Path(env).expanduser() / files.folder, f"$CAPSNET_DATA_DIR/{files.folder}"))
    found.append((cache_dir(files.folder), "per-user cache"))
    unique: list[tuple[Path, str]] = []
    for path, label in found:
        if all(path != seen for seen, _ in unique):
            unique.append((path, label))
    return unique


def find_remote(remote: Remote, dirs: Iterable[str | os.PathLike]) -> Path | None:
    """The first ``dir/name`` (or one of its other names) that exists, or None."""
    for folder in dirs:
        for name in remote.names:
            candidate = Path(folder) / name
            if candidate.exists():
                return candidate
    return None


def _not_found_message(files: FileSet, labelled: list[tuple[Path, str]], missing: Sequence[Remote]) -> str:
    folders = "\n".join(f"  {path}  ({label})" for path, label in labelled)
    names = "\n".join(f"  {r.name}" + (f"  (or {' or '.join(r.also)})" if r.also else "") for r in missing)
    return (f"{files.title} files not found. Folders searched, in order:\n{folders}\n"
            f"Missing files:\n{names}\n"
            f"Put the files in one of these folders, or in another folder passed as data_dir (--data-dir on the "
            f"command line) or named by the CAPSNET_DATA_DIR environment variable; or allow downloading "
            f"(download=True).")


def locate(files: FileSet, data_dir: str | os.PathLike | None = None, *, download: bool = True,
           mirrors: Sequence[str] | None = None, progress: bool = True) -> dict[str, Path]:
    """Each file of ``files`` by name: found in the folders of :func:`labelled_dirs`, or
    downloaded into the first of them when ``download`` is true; otherwise
    ``files.not_found`` lists the folders searched and the missing files."""
    labelled = labelled_dirs(files, data_dir)
    dirs = [path for path, _ in labelled]
    missing = [r for r in files.files if find_remote(r, dirs) is None]
    if missing:
        if not download:
            raise files.not_found(_not_found_message(files, labelled, missing))
        download_files(files, dirs[0], names=[r.name for r in missing], mirrors=mirrors, progress=progress)
    paths = {}
    for remote in files.files:
        path = find_remote(remote, dirs)
        if path is None:  # deleted between the download and now
            raise files.not_found(_not_found_message(files, labelled, [remote]))
        paths[remote.name] = path
    return paths


# ------------------------------------------------------------------------ downloading


class _BadDownload(Exception):
    """A mirror answered, but what came was short or failed verification."""


def describe_error(exc: BaseException) -> str:
    """One line for a mirror's failure."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect: {exc.reason}"
    if isinstance(exc, (_BadDownload, DatasetFormatError)):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _stream(url: str, out: Any, desc: str, progress: bool, timeout: float) -> None:
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
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                  disable=None if progress else True, leave=False) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _BadDownload(f"connection dropped: received {received} of {total} bytes (Content-Length)")


def sha256_of(path: Path, gunzip: bool = False, source: str | None = None) -> str:
    """The sha256 of a file, or of its gunzipped content; a damaged gzip stream is a
    :class:`DatasetFormatError` naming ``source``."""
    digest = hashlib.sha256()
    try:
        with (gzip.open(path, "rb") if gunzip else open(path, "rb")) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except EOFError:
        raise DatasetFormatError(f"{source or path}: corrupted gzip: the compressed stream ends early "
                                 "(file cut short?)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetFormatError(f"{source or path}: corrupted gzip: {exc}") from None
    return digest.hexdigest()


def _fetch(files: FileSet, remote: Remote, url: str, dest: Path, progress: bool, timeout: float) -> Path:
    """Download ``url`` to a temporary file in ``dest``, verify it, move it into place."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.name}.", suffix=".part", dir=dest)
    except OSError as exc:
        raise files.download_error(
            f"cannot write a temporary file in {dest}: {exc}; choose a writable folder: pass it as data_dir "
            "(--data-dir), or set CAPSNET_DATA_DIR") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, remote.name, progress, timeout)
            out.flush()
            os.fsync(out.fileno())
        source = f"downloaded {remote.name}"
        digest = sha256_of(tmp, remote.gunzip_digest, source)
        if digest != remote.sha256:
            what = f"the decompressed {remote.name}" if remote.gunzip_digest else remote.name
            raise _BadDownload(f"sha256 mismatch for {what}: got {digest}, expected {remote.sha256}")
        if files.check is not None:
            files.check(tmp, remote, source)
        final = dest / remote.name
        os.replace(tmp, final)
        return final
    except BaseException:  # KeyboardInterrupt too: never leave a partial file
        tmp.unlink(missing_ok=True)
        raise


def offline_hint(files: FileSet, dest: Path) -> str:
    """How to get the files of ``files`` into ``dest`` by hand."""
    names = "\n".join(f"  {r.name}" for r in files.files)
    where = files.homepage or files.mirrors[0]
    return (f"To work offline, fetch the {files.title} files on a machine with internet access (from {where}) "
            f"and put them in {dest}:\n{names}\n"
            f"or put them in another folder and pass it as data_dir (--data-dir on the command line), or put them "
            f"in $CAPSNET_DATA_DIR{'' if files.env_is_folder else '/' + files.folder}."
            + (f"\n{files.hint}" if files.hint else ""))


def download_files(files: FileSet, dest: str | os.PathLike, *, names: Iterable[str] | None = None,
             mirrors: Sequence[str] | str | None = None, progress: bool = True, timeout: float = 30.0) -> list[Path]:
    """Download the files of ``files`` missing from ``dest`` (``names``: only these).

    Each file is tried on each mirror in turn; its sha256 (and format, where ``files.check``
    says how) must match before it is moved into place. Returns the paths written. Raises
    ``files.download_error``, listing every mirror's error and how to work offline, when no
    mirror delivers a file.
    """
    if mirrors is None:
        mirrors = files.mirrors
    if isinstance(mirrors, str):
        mirrors = (mirrors,)
    mirrors = tuple(mirrors)
    if not mirrors:
        raise ValueError(f"downloading {files.title} needs at least one mirror base URL, got none")
    wanted = [files.remote(name) for name in names] if names is not None else list(files.files)
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise files.download_error(
            f"cannot create the {files.title} folder {dest}: {exc}; choose a writable folder: pass it as data_dir "
            "(--data-dir), or set CAPSNET_DATA_DIR") from exc
    written = []
    for remote in wanted:
        if find_remote(remote, [dest]) is not None:
            continue
        errors = []
        for base in mirrors:
            url = f"{base if base.endswith('/') else base + '/'}{remote.name}"
            try:
                written.append(_fetch(files, remote, url, dest, progress, timeout))
                break
            except DownloadError:
                raise
            except (OSError, ValueError, http.client.HTTPException, _BadDownload) as exc:
                errors.append(f"  {url}: {describe_error(exc)}")
        else:
            raise files.download_error(f"could not download {remote.name} from any mirror:\n" + "\n".join(errors)
                                       + "\n" + offline_hint(files, dest))
    return written
