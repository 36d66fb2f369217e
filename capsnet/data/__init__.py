"""MNIST loading and download, the MNIST sample installed with the package, the image
preparation used in training, data sources, and MultiMNIST."""
from capsnet.data.augment import iterate_batches, random_shift, to_float
from capsnet.data.dataset import ArrayDataset, DataSource
from capsnet.data.multimnist import MultiMNIST, both_right
from capsnet.data.mnist import (
    FILE_NAMES,
    MIRRORS,
    MNIST,
    SAMPLE_DIR,
    SHA256,
    MNISTDownloadError,
    MNISTFormatError,
    MNISTNotFoundError,
    candidate_dirs,
    download_mnist,
    find_file,
    load_mnist,
    load_mnist_sample,
    read_idx,
)

__all__ = [
    "FILE_NAMES",
    "MIRRORS",
    "MNIST",
    "SAMPLE_DIR",
    "SHA256",
    "ArrayDataset",
    "DataSource",
    "MNISTDownloadError",
    "MNISTFormatError",
    "MNISTNotFoundError",
    "MultiMNIST",
    "both_right",
    "candidate_dirs",
    "download_mnist",
    "find_file",
    "iterate_batches",
    "load_mnist",
    "load_mnist_sample",
    "random_shift",
    "read_idx",
    "to_float",
]
