"""MNIST loading and download, the image preparation used in training, and data sources."""
from capsnet.data import mnist
from capsnet.data.augment import iterate_batches, random_shift, to_float
from capsnet.data.dataset import ArrayDataset, DataSource
from capsnet.data.mnist import *  # noqa: F401,F403 - re-exports exactly mnist.__all__

__all__ = sorted([*mnist.__all__, "ArrayDataset", "DataSource", "iterate_batches", "random_shift", "to_float"])
