"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): its four IDX files, found or downloaded.

Ten classes of 28x28 grey Zalando article images, 60,000 for training and 10,000 for test,
in MNIST's file format and under MNIST's file names (so they live in a folder of their
own: ``$CAPSNET_DATA_DIR/fashion-mnist`` or the per-user cache
``~/.cache/capsnet/fashion-mnist``). Files are looked for and downloaded by the shared
fetcher (:mod:`capsnet.data.files`), checked against the sha256 of the files the
official mirror serves. MIT licence.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from capsnet.data import files
from capsnet.data.mnist import FILE_NAMES, read_idx

__all__ = ["CLASSES", "FILES", "MIRRORS", "load_fashion_mnist"]

MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
"""The official mirror of the Fashion-MNIST files (the URLs of the dataset's README)."""

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
"""The class names, in label order."""

# sha256 of the .gz files as the mirror serves them (as tensorflow-datasets records them too)
_SHA256 = {
    "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

# MNIST's first 16 training labels: a folder of MNIST (or a subset of it) given for
# Fashion-MNIST, whose files have the same names, is told apart by them.
_MNIST_FIRST_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5, 3, 6, 1, 7]


def _check(path: Path, remote: files.Remote, source: str) -> None:
    read_idx(path, expect="images" if "images" in remote.name else "labels", gzipped=True)


FILES = files.FileSet(
    title="Fashion-MNIST", folder="fashion-mnist",
    files=tuple(files.Remote(f"{name}.gz", _SHA256[name], also=(name,)) for name in FILE_NAMES),
    mirrors=MIRRORS, homepage="https://github.com/zalandoresearch/fashion-mnist",
    hint="The files may be gzip-compressed or not; they have MNIST's names, so keep them in a folder of their own.",
    check=_check)
"""The four Fashion-MNIST files (gzip-compressed as served; uncompressed copies are read too)."""


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                       mirrors: Sequence[str] | None = None, progress: bool = True) -> files.Splits:
    """Fashion-MNIST from the first folder holding each file (see the module's docstring),
    downloaded when missing and ``download`` is true: images uint8 (N, 28, 28), labels
    int64 (N,) in 0..9. Raises :class:`~capsnet.data.files.DatasetNotFoundError` (offline:
    the files and folders), :class:`~capsnet.data.files.DownloadError` or
    :class:`~capsnet.data.files.DatasetFormatError` (a damaged file, named)."""
    paths = files.locate(FILES, data_dir, download=download, mirrors=mirrors, progress=progress)
    split = []
    for images_name, labels_name in ((FILE_NAMES[0], FILE_NAMES[1]), (FILE_NAMES[2], FILE_NAMES[3])):
        images_path, labels_path = paths[f"{images_name}.gz"], paths[f"{labels_name}.gz"]
        images = read_idx(images_path, expect="images")
        labels = read_idx(labels_path, expect="labels")
        if images.shape[1:] != (28, 28):
            raise files.DatasetFormatError(
                f"{images_path}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}")
        files.check_pair(images, labels, str(images_path), str(labels_path))
        if labels_name == FILE_NAMES[1] and labels[:16].tolist() == _MNIST_FIRST_LABELS:
            raise files.DatasetFormatError(
                f"{labels_path} holds MNIST's training labels, not Fashion-MNIST's (the two use the same file names); "
                "point --data-dir (data_dir) at the folder holding the Fashion-MNIST files")
        split += [images, files.check_labels(labels, 10, str(labels_path))]
    return files.Splits(*split, classes=CLASSES)
