"""smallNORB (LeCun, Huang and Bottou 2004): its binary matrix files, found or downloaded.

Stereo pairs of 96x96 grey images of 50 toys in five categories (four-legged animals,
human figures, airplanes, trucks, cars) under 18 azimuths, 9 elevations and 6 lightings:
24,300 pairs for training (instances 4, 6, 7, 8, 9) and 24,300 for test (instances 0, 1,
2, 3, 5), three files each, gzip-compressed as served:

- ``...-dat.mat``: (N, 2, 96, 96) bytes, the left and right image of each pair;
- ``...-cat.mat``: (N,) int32 categories 0..4;
- ``...-info.mat``: (N, 4) int32: instance, elevation, azimuth, lighting.

The binary matrix format: a little-endian int32 magic number giving the element type
(``0x1E3D4C55`` bytes, ``0x1E3D4C54`` int32), the number of dimensions, then at least
three int32 sizes (unused ones are 1), then the data. Files are looked for and downloaded
by the shared fetcher (:mod:`capsnet.data.files`) in ``$CAPSNET_DATA_DIR/smallnorb`` or
``~/.cache/capsnet/smallnorb``.
"""
from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capsnet.data import files

__all__ = ["CLASSES", "FILES", "MAGIC", "file_name", "load_smallnorb", "read_norb_matrix"]

CLASSES = ("animal", "human", "airplane", "truck", "car")
"""The five categories in label order."""

MAGIC = {0x1E3D4C55: np.dtype(np.uint8), 0x1E3D4C54: np.dtype("<i4"), 0x1E3D4C51: np.dtype("<f4"),
         0x1E3D4C53: np.dtype("<f8"), 0x1E3D4C56: np.dtype("<i2")}
"""The magic numbers of the binary matrix format and the element type each announces."""

_PREFIX = {"training": "smallnorb-5x46789x9x18x6x2x96x96-training",
           "testing": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
_SHA256 = {
    "training-dat": "5ffd6272a07d32695ee1082a26a41a93a37aab8c28da047f8c34ed348d214873",
    "training-cat": "2784e542c1922060691090952b6cd6278879a216c90f81476f0f00256d42cdaa",
    "training-info": "de7eb932ebe7a4ee16217fead60660d0eb3d23632c2f4d1c51f88c501c17bf32",
    "testing-dat": "cf7104eed3e51174d2f65b66d1e5878b9da233b886f161b0d88f4510ba2c7474",
    "testing-cat": "ecaf6d5bb8c3bc5eab9cf0258f6d2198dd474e016e374836fc097f2e5ff509ff",
    "testing-info": "16adf314226327ee006d1a44db8cfef52773c06c829951d5653a9f6f310248a2",
}
_EXPECT = {"dat": (np.dtype(np.uint8), 4), "cat": (np.dtype("<i4"), 1), "info": (np.dtype("<i4"), 2)}


def file_name(split: str, kind: str) -> str:
    """The served name of one file: ``split`` "training" or "testing", ``kind`` "dat", "cat" or "info"."""
    return f"{_PREFIX[split]}-{kind}.mat.gz"


def read_norb_matrix(path: str | os.PathLike, *, gzipped: bool | None = None, source: str | None = None) -> np.ndarray:
    """One file of the binary matrix format (gzip-compressed when its name ends in ``.gz``,
    or when ``gzipped``) as an array of the type and shape its header gives. A wrong magic
    number, a header or payload cut short, or a file too long is a
    :class:`~capsnet.data.files.DatasetFormatError` naming the file."""
    path = Path(path)
    source = source or str(path)
    data = path.read_bytes()
    if path.suffix == ".gz" if gzipped is None else gzipped:
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise files.DatasetFormatError(f"{source}: corrupted gzip: the compressed stream ends early "
                                           "(file cut short?)") from None
        except (OSError, zlib.error) as exc:
            raise files.DatasetFormatError(f"{source}: corrupted gzip: {exc}") from None
    if len(data) < 8:
        raise files.DatasetFormatError(f"{source}: truncated: {len(data)} bytes, too short for the 8-byte header "
                                       "(magic number and number of dimensions)")
    magic, ndim = (int(v) for v in np.frombuffer(data[:8], "<i4").astype(np.int64) & 0xFFFFFFFF)
    if magic not in MAGIC:
        raise files.DatasetFormatError(
            f"{source}: wrong magic number 0x{magic:08X}, expected one of the binary matrix format's "
            + ", ".join(f"0x{m:08X}" for m in MAGIC) + " (0x1E3D4C55 for bytes, 0x1E3D4C54 for int32)")
    if not 1 <= ndim <= 16:
        raise files.DatasetFormatError(f"{source}: the header gives {ndim} dimensions, expected 1..16")
    header = 8 + 4 * max(ndim, 3)
    if len(data) < header:
        raise files.DatasetFormatError(f"{source}: truncated: the header needs {header} bytes for {ndim} "
                                       f"dimensions, file has {len(data)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(data[8:8 + 4 * ndim], "<i4"))
    if any(d < 0 for d in dims):
        raise files.DatasetFormatError(f"{source}: negative size in the header: {dims}")
    dtype = MAGIC[magic]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(data) - header
    if have != expected:
        what = "truncated" if have < expected else "too long"
        raise files.DatasetFormatError(f"{source}: {what}: header says {'x'.join(map(str, dims))} {dtype.name} = "
                                       f"{expected} bytes, file has {have} bytes after the {header}-byte header")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).copy()


def _read(path: Path, kind: str, **kw) -> np.ndarray:
    array = read_norb_matrix(path, **kw)
    dtype, ndim = _EXPECT[kind]
    source = kw.get("source") or str(path)
    if array.dtype != dtype or array.ndim != ndim:
        word = {np.dtype(np.uint8): "bytes", np.dtype("<i4"): "int32"}
        raise files.DatasetFormatError(
            f"{source}: a smallNORB {kind} file holds {ndim}-dimensional {word[dtype]}, got {array.ndim}-dimensional "
            f"{array.dtype.name}; is it the right file?")
    if kind == "dat" and array.shape[1:] != (2, 96, 96):
        raise files.DatasetFormatError(f"{source}: expected stereo pairs of 96x96 images (N, 2, 96, 96), got "
                                       f"{tuple(array.shape)}")
    if kind == "info" and array.shape[1] != 4:
        raise files.DatasetFormatError(f"{source}: expected 4 values per pair (instance, elevation, azimuth, "
                                       f"lighting), got {array.shape[1]}")
    return array


def _check(path: Path, remote: files.Remote, source: str) -> None:
    _read(path, remote.name.rsplit("-", 1)[1].split(".")[0], gzipped=True, source=source)


FILES = files.FileSet(
    title="smallNORB", folder="smallnorb",
    files=tuple(files.Remote(file_name(split, kind), _SHA256[f"{split}-{kind}"],
                             also=(file_name(split, kind)[:-3],))
                for split in ("training", "testing") for kind in ("dat", "cat", "info")),
    mirrors=("https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",),
    homepage="https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",
    hint="The files may be gzip-compressed (as served) or not.", check=_check)
"""smallNORB's six files, gzip-compressed as served (uncompressed copies are read too)."""


def load_smallnorb(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                   mirrors: Sequence[str] | None = None, progress: bool = True) -> files.Splits:
    """smallNORB from the first folder holding each file, downloaded when missing and
    ``download`` is true: images uint8 (N, 2, 96, 96) (the stereo pair as two channels),
    labels int64 (N,) in 0..4, and ``extra["train_info"]``, ``extra["test_info"]`` int64
    (N, 4): instance, elevation, azimuth, lighting."""
    paths = files.locate(FILES, data_dir, download=download, mirrors=mirrors, progress=progress)
    split, extra = [], {}
    for name in ("training", "testing"):
        dat_path, cat_path, info_path = (paths[file_name(name, kind)] for kind in ("dat", "cat", "info"))
        images = _read(dat_path, "dat")
        labels = files.check_labels(_read(cat_path, "cat"), 5, str(cat_path), words="categories must be 0..4")
        info = _read(info_path, "info").astype(np.int64)
        files.check_pair(images, labels, str(dat_path), str(cat_path))
        files.check_pair(images, info, str(dat_path), str(info_path))
        split += [images, labels]
        extra["train_info" if name == "training" else "test_info"] = info
    return files.Splits(*split, classes=CLASSES, extra=extra)
