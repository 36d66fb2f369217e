"""Small files in each dataset's true distribution format, laid out byte for byte as the
official files are (headers, byte order, record order, label encoding, file names), from
a few records of known content. Each writer returns the arrays it wrote, as the reader
should give them back."""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np

from capsnet.data import cifar10, smallnorb, svhn
from capsnet.data.mnist import FILE_NAMES


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: big-endian magic 0x00000803/0x00000801, sizes, data."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def write_fashion_mnist(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """The four gzip-compressed IDX files of Fashion-MNIST, under their served names."""
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": np.arange(n_train) % 10, "test_images": rng.integers(0, 256, (n_test, 28, 28),
                                                                                    dtype=np.uint8),
              "test_labels": (np.arange(n_test) * 3) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for name, key in zip(FILE_NAMES, ("train_images", "train_labels", "test_images", "test_labels")):
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arrays[key])))
    return arrays


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: one label byte, then the red, green and blue planes, rows first."""
    flat = np.asarray(images, dtype=np.uint8).reshape(len(labels), -1)
    return np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], flat], axis=1).tobytes()


def write_cifar10(folder: Path, per_batch: int = 2, n_test: int = 3, seed: int = 0, *, packed: bool = True,
                  members: dict[str, bytes] | None = None) -> dict[str, np.ndarray]:
    """cifar-10-binary.tar.gz (or, ``packed=False``, the cifar-10-batches-bin/ folder) with
    ``per_batch`` records in each of data_batch_1..5.bin and ``n_test`` in test_batch.bin;
    ``members`` replaces the bytes of the named files."""
    rng = np.random.default_rng(seed)
    n_train = 5 * per_batch
    arrays = {"train_images": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
              "train_labels": np.arange(n_train) % 10,
              "test_images": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
              "test_labels": (np.arange(n_test) * 7) % 10}
    content = {"batches.meta.txt": ("\n".join(cifar10.CLASSES) + "\n\n").encode()}
    for k, name in enumerate(cifar10.TRAIN_FILES):
        part = slice(k * per_batch, (k + 1) * per_batch)
        content[name] = cifar_records(arrays["train_images"][part], arrays["train_labels"][part])
    content["test_batch.bin"] = cifar_records(arrays["test_images"], arrays["test_labels"])
    content["readme.html"] = b"<html></html>"
    content.update(members or {})
    folder.mkdir(parents=True, exist_ok=True)
    if packed:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in content.items():
                info = tarfile.TarInfo(f"{cifar10.FOLDER}/{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        (folder / cifar10.ARCHIVE).write_bytes(buffer.getvalue())
    else:
        (folder / cifar10.FOLDER).mkdir(exist_ok=True)
        for name, data in content.items():
            (folder / cifar10.FOLDER / name).write_bytes(data)
    return arrays


def write_svhn(folder: Path, n_train: int = 5, n_test: int = 3, seed: int = 0,
               labels: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """train_32x32.mat and test_32x32.mat as MATLAB 5 files: X (32, 32, 3, N) uint8, y (N, 1)
    with labels 1..10 (10 for the digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
              "train_labels": np.arange(n_train) % 10,
              "test_images": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
              "test_labels": (np.arange(n_test) * 3 + 1) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for k, (name, split) in enumerate(((svhn.TRAIN_FILE, "train"), (svhn.TEST_FILE, "test"))):
        y = np.where(arrays[f"{split}_labels"] == 0, 10, arrays[f"{split}_labels"]) if labels is None else labels[k]
        savemat(folder / name, {"X": arrays[f"{split}_images"].transpose(2, 3, 1, 0),
                                "y": np.asarray(y, dtype=np.uint8)[:, None]})
    return arrays


def norb_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """The binary matrix format: little-endian int32 magic, ndim, at least 3 sizes (unused: 1), data."""
    array = np.asarray(array)
    if magic is None:
        magic = 0x1E3D4C55 if array.dtype == np.uint8 else 0x1E3D4C54
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = np.array([magic, array.ndim, *dims], dtype="<u4").tobytes()
    return header + array.astype(np.uint8 if array.dtype == np.uint8 else "<i4").tobytes()


def write_smallnorb(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 0, *, compressed: bool = True,
                    replace: dict[str, bytes] | None = None) -> dict[str, np.ndarray]:
    """The six smallNORB files (dat, cat, info of training and testing), gzip-compressed as
    served (or not); ``replace`` gives other bytes for a kind, e.g. {"training-cat": ...}."""
    rng = np.random.default_rng(seed)
    arrays = {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("training", n_train), ("testing", n_test)):
        key = "train" if split == "training" else "test"
        arrays[f"{key}_images"] = rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8)
        arrays[f"{key}_labels"] = np.arange(n) % 5
        arrays[f"{key}_info"] = np.stack([np.arange(n) % 10, np.arange(n) % 9, (np.arange(n) * 2) % 36,
                                          np.arange(n) % 6], axis=1)
        for kind, array in (("dat", arrays[f"{key}_images"]), ("cat", arrays[f"{key}_labels"]),
                            ("info", arrays[f"{key}_info"])):
            data = (replace or {}).get(f"{split}-{kind}", norb_bytes(array))
            name = smallnorb.file_name(split, kind)
            if compressed:
                (folder / name).write_bytes(gzip.compress(data))
            else:
                (folder / name[:-3]).write_bytes(data)
    return arrays


WRITERS = {"fashion-mnist": write_fashion_mnist, "cifar10": write_cifar10, "svhn": write_svhn,
           "smallnorb": write_smallnorb}
"""Each new dataset's writer, by its --dataset name."""
