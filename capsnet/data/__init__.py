"""The datasets' readers (MNIST and its packaged sample, Fashion-MNIST, CIFAR-10, SVHN,
smallNORB) over one fetcher (:mod:`capsnet.data.files`), the image preparation used in
training, data sources, and MultiMNIST."""
from capsnet.data.augment import center_crop, downsample, iterate_batches, random_crop, random_shift, to_float
from capsnet.data.cifar10 import load_cifar10
from capsnet.data.fashion_mnist import load_fashion_mnist
from capsnet.data.files import DatasetFormatError, DatasetNotFoundError, DownloadError, Splits
from capsnet.data.smallnorb import load_smallnorb
from capsnet.data.svhn import load_svhn
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
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DownloadError",
    "MNISTDownloadError",
    "MNISTFormatError",
    "MNISTNotFoundError",
    "MultiMNIST",
    "Splits",
    "both_right",
    "candidate_dirs",
    "center_crop",
    "download_mnist",
    "downsample",
    "find_file",
    "iterate_batches",
    "load_cifar10",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_sample",
    "load_smallnorb",
    "load_svhn",
    "random_crop",
    "random_shift",
    "read_idx",
    "to_float",
]
