"""The datasets a run can train on, one described entry each: :class:`DatasetSpec`,
the registry :data:`DATASETS` (:func:`dataset`, :func:`register`, :func:`unregister`),
and the builders and metrics the built-in entries are made of.

A :class:`DatasetSpec` says everything the rest of capsnet asks of a dataset: its input
shape, its shifts (the default and the largest allowed), the digits per image, the
architectures that can train on it and the model sizes it needs, how its splits are
loaded, how its training and test sources are built and what its runs report. :class:`~capsnet.training.TrainConfig`,
``python -m capsnet.train``, ``capsnet.evaluate`` and ``capsnet.visualize`` look a dataset
up here by name, so adding one is one :func:`register` call, here or in your own code.

The built-in entries: ``mnist`` (28x28, shifts of up to 2 px), ``expanded`` (each digit
placed at random on a 40x40 canvas, the paper's training set for affine robustness; test
digits centred), ``multimnist`` (two overlapping digits on 36x36, CapsNet only) and
``mnist-sample`` (as ``mnist``, on the 5,000 + 1,000 images installed with capsnet), and
the other datasets the capsule papers report on, read from their distribution files:
``fashion-mnist`` (as MNIST), ``cifar10`` (random 24x24 crops and flips of 32x32 colour
images, the central crop at test; 64 primary capsule types, as Sabour et al. 2017),
``svhn`` (32x32 colour digits, shifts of up to 2 px; the paper's smaller network) and
``smallnorb`` (the stereo pair as two channels, 96x96 averaged down to 48x48, random 32x32
crops in training, the central one at test: both papers' preparation; five classes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from capsnet.data import ArrayDataset, DataSource, MultiMNIST, Splits, both_right, load_cifar10, load_fashion_mnist
from capsnet.data import load_mnist, load_mnist_sample, load_smallnorb, load_svhn
from capsnet.data import center_crop, downsample, random_crop, random_shift, to_float
from capsnet.data.augment import efficient_augment
from capsnet.training.evaluation import Metric, count_correct

__all__ = ["DATASETS", "EXPANDED_PAD", "DatasetSpec", "RunSettings", "crop_source", "dataset", "digit_source",
           "expand", "multimnist_source", "pair_errors", "register", "unregister"]


class RunSettings(Protocol):
    """What a dataset's source builders read of a run's settings (a TrainConfig has them)."""

    max_shift: int
    dtype: str
    test_pairs: int
    augment: str


# (images uint8 (N, H, W) or (N, C, H, W), labels (N,), run settings, array module) -> a DataSource
SourceBuilder = Callable[[np.ndarray, np.ndarray, RunSettings, Any], DataSource]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset a run can train on.

    - ``name``: what ``--dataset`` and ``TrainConfig.dataset`` say; ``description``: one
      line for a run's log (say when it is not MNIST); ``help``: its words in
      ``--dataset``'s help.
    - ``input_shape`` (C, H, W) of the model's inputs; ``digits`` per image (the labels
      are (B, digits) when more than one); ``n_classes``.
    - ``model``: model settings it needs per architecture, under the user's
      (``{"capsnet": {"primary_types": 64}}``).
    - ``max_shift``: the default random shift of training digits, in px;
      ``shift_limit``: the largest allowed (None: any), with ``shift_limit_words``, the
      rule in words for the error (``"... shifts digits by at most 4 px"``).
    - ``archs``: the architectures that can train on it (None: all), with
      ``archs_words`` for the error (``"the CapsNet only (two digits per image)"``).
    - ``load_test(data_dir, progress)``: the same with only the test split read (the
      training split may be empty), for tools that only evaluate; None: ``load``.
    - ``load(data_dir, progress)``: the splits it is made from (an object with
      ``train_images``, ``train_labels``, ``test_images``, ``test_labels``, such as
      :class:`~capsnet.data.Splits`).
    - ``train_source`` and ``test_source`` ``(images, labels, settings, xp)``: the data
      sources of one split (the test source never augmented); ``settings`` has
      ``max_shift``, ``dtype`` and ``test_pairs`` (a TrainConfig).
    - ``metrics``: what its runs report, by name (the loop's :data:`Metric` functions).
    - ``test_pairs``: its test set has ``test_pairs`` fixed pairs per image (MultiMNIST).
    """

    name: str
    description: str
    help: str
    input_shape: tuple[int, int, int]
    max_shift: int
    load: Callable[[str | None, bool], Any]
    train_source: SourceBuilder
    test_source: SourceBuilder
    metrics: Mapping[str, Metric] = field(default_factory=lambda: {"accuracy": count_correct})
    digits: int = 1
    shift_limit: int | None = None
    shift_limit_words: str = ""
    archs: tuple[str, ...] | None = None
    archs_words: str = ""
    test_pairs: bool = False
    n_classes: int = 10
    model: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    load_test: Callable[[str | None, bool], Any] | None = None

    def test_split(self, data_dir: str | None, progress: bool) -> Any:
        """The splits with the test split read (``load_test``, else ``load``)."""
        return (self.load_test or self.load)(data_dir, progress)

    def check_arch(self, arch: str) -> None:
        """Raise a ValueError when ``arch`` cannot train on this dataset."""
        if self.archs is not None and arch not in self.archs:
            words = self.archs_words or "only " + " or ".join(repr(a) for a in self.archs)
            raise ValueError(f"the {self.name} dataset trains {words}; got arch {arch!r}")

    def check_shift(self, max_shift: int) -> None:
        """Raise a ValueError when training digits cannot be shifted by ``max_shift`` px."""
        if self.shift_limit is not None and max_shift > self.shift_limit:
            words = self.shift_limit_words or f"{self.name} shifts digits by at most {self.shift_limit} px"
            raise ValueError(f"{words}, got max_shift {max_shift}")

    def model_defaults(self, arch: str = "capsnet") -> dict[str, Any]:
        """The model settings this dataset needs for ``arch``: its input shape, its classes
        and digits where they are not 10 and 1, and its entry in ``model``."""
        return {"input_shape": self.input_shape, **({"n_classes": self.n_classes} if self.n_classes != 10 else {}),
                **({"digits": self.digits} if self.digits != 1 else {}), **self.model.get(arch, {})}


_REGISTRY: dict[str, DatasetSpec] = {}
DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(_REGISTRY)
"""Every registered dataset by name, in registration order (read-only; see :func:`register`)."""


def dataset(name: str) -> DatasetSpec:
    """The registered dataset called ``name``, or a ValueError listing the names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"dataset must be one of {sorted(_REGISTRY)}, got {name!r}") from None


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` (``--dataset`` offers it from then on); a name
    already registered is refused. Returns ``spec``."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register expected a DatasetSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise ValueError(f"a dataset called {spec.name!r} is already registered; unregister it first or "
                         "choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> DatasetSpec:
    """Remove the dataset called ``name`` from :data:`DATASETS`; returns its entry."""
    spec = dataset(name)
    del _REGISTRY[name]
    return spec


# -- the builders the built-in entries share -------------------------------------------------
EXPANDED_PAD = 6
"""The margin of expanded MNIST's canvas: 28x28 digits on 40x40, shifted by at most this."""


def expand(images: np.ndarray, pad: int = EXPANDED_PAD) -> np.ndarray:
    """uint8 digits (N, 28, 28) centred on a (28 + 2 pad)-pixel square canvas of zeros."""
    return np.pad(np.asarray(images), ((0, 0), (pad, pad), (pad, pad)))


def digit_source(images: np.ndarray, labels: np.ndarray, settings: RunSettings, xp: Any, *, train: bool,
                 pad: int = 0) -> ArrayDataset:
    """One digit per image, centred on a canvas ``pad`` px wider on each side (0: as is),
    as floats on ``xp``; ``train=True``: shifted at random by up to ``settings.max_shift``
    px on every draw, or with ``settings.augment`` "efficient" augmented as Efficient-CapsNet's
    authors do (:func:`~capsnet.data.augment.efficient_augment`)."""
    x = to_float(expand(images, pad) if pad else images, settings.dtype, xp)
    if not train:
        return ArrayDataset(x, xp.asarray(labels))
    if getattr(settings, "augment", "shift") == "efficient":
        return ArrayDataset(x, xp.asarray(labels), augment=efficient_augment)
    shift = settings.max_shift
    return ArrayDataset(x, xp.asarray(labels), augment=lambda batch, rng: random_shift(batch, shift, rng))


def multimnist_source(images: np.ndarray, labels: np.ndarray, settings: RunSettings, xp: Any, *,
                      train: bool) -> MultiMNIST:
    """MultiMNIST pairs of one split: drawn afresh each epoch in training, else
    ``settings.test_pairs`` fixed pairs per image."""
    if getattr(settings, "augment", "shift") != "shift":
        raise ValueError(f"MultiMNIST makes its own shifted pairs; augment {settings.augment!r} applies to one-digit "
                         "datasets only (drop --augment)")
    if train:
        return MultiMNIST(images, labels, train=True, max_shift=settings.max_shift, dtype=settings.dtype)
    return MultiMNIST(images, labels, train=False, max_shift=settings.max_shift,
                      pairs_per_image=settings.test_pairs, dtype=settings.dtype)


def pair_errors(outputs: Any, batch: tuple) -> Any:
    """How many pairs of the batch are not :func:`~capsnet.data.both_right`: MultiMNIST errors, as a count."""
    return batch[1].shape[0] - both_right(outputs, batch)


def _mnist(data_dir: str | None, progress: bool) -> Any:
    return load_mnist(data_dir, progress=progress)


def _mnist_test(data_dir: str | None, progress: bool) -> Any:
    return load_mnist(data_dir, progress=progress, test_only=True)  # the training files neither read nor fetched


def _sample(data_dir: str | None, progress: bool) -> Any:
    return load_mnist_sample()  # installed with the package: never a download


_DIGITS = {"train_source": partial(digit_source, train=True), "test_source": partial(digit_source, train=False)}

register(DatasetSpec(
    name="mnist", description="MNIST", help="28x28", input_shape=(1, 28, 28), max_shift=2, load=_mnist,
    load_test=_mnist_test,
    **_DIGITS))
register(DatasetSpec(
    name="expanded", description="expanded MNIST (40x40)",
    help="expanded MNIST: digits placed at random on 40x40, the training set of the affine-robustness experiment",
    input_shape=(1, 40, 40), max_shift=EXPANDED_PAD, load=_mnist, load_test=_mnist_test,
    train_source=partial(digit_source, train=True, pad=EXPANDED_PAD),
    test_source=partial(digit_source, train=False, pad=EXPANDED_PAD),
    shift_limit=EXPANDED_PAD,
    shift_limit_words=f"expanded MNIST shifts digits by at most {EXPANDED_PAD} px (the canvas margin)"))
register(DatasetSpec(
    name="multimnist", description="MultiMNIST (36x36 pairs)",
    help="two overlapping digits on 36x36, CapsNet only; reports the error rate: a pair is right when both "
         "digits are",
    input_shape=(1, 36, 36), max_shift=4, load=_mnist, load_test=_mnist_test, digits=2,
    train_source=partial(multimnist_source, train=True), test_source=partial(multimnist_source, train=False),
    metrics={"accuracy": both_right, "error": pair_errors}, test_pairs=True,
    shift_limit=4, shift_limit_words="MultiMNIST shifts digits by at most 4 px on its 36x36 canvas",
    archs=("capsnet",), archs_words="the CapsNet only (two digits per image)"))
register(DatasetSpec(
    name="mnist-sample",
    description="the MNIST sample installed with capsnet (the first 5,000 training and 1,000 test images), "
                "not the full MNIST",
    help="the first 5,000 training and 1,000 test images of MNIST, installed with capsnet: trains anywhere with "
         "no download; a sample, not MNIST",
    input_shape=(1, 28, 28), max_shift=2, load=_sample, **_DIGITS))


def crop_source(images: np.ndarray, labels: np.ndarray, settings: RunSettings, xp: Any, *, train: bool, size: int,
                flip: bool = False) -> ArrayDataset:
    """Images (N, C, H, W) as floats on ``xp``, seen through a ``size`` x ``size`` window:
    ``train=True``: a random window on every draw (mirrored left-right half the time when
    ``flip``), else the central one."""
    x = to_float(images, settings.dtype, xp)
    if not train:
        return ArrayDataset(xp.ascontiguousarray(center_crop(x, size)), xp.asarray(labels))
    return ArrayDataset(x, xp.asarray(labels), augment=lambda batch, rng: random_crop(batch, size, rng, flip=flip))


def _fashion(data_dir: str | None, progress: bool) -> Any:
    return load_fashion_mnist(data_dir, progress=progress)


def _cifar10(data_dir: str | None, progress: bool) -> Any:
    return load_cifar10(data_dir, progress=progress)


def _svhn(data_dir: str | None, progress: bool) -> Any:
    return load_svhn(data_dir, progress=progress)


NORB_SIZE, NORB_CROP = 48, 32
"""smallNORB's preparation in both papers: 96x96 averaged down to 48x48, 32x32 crops."""


def _smallnorb(data_dir: str | None, progress: bool) -> Any:
    data = load_smallnorb(data_dir, progress=progress)
    factor = data.train_images.shape[-1] // NORB_SIZE
    return Splits(downsample(data.train_images, factor), data.train_labels, downsample(data.test_images, factor),
                  data.test_labels, classes=data.classes, extra=data.extra)


def _no_shift(name: str, words: str) -> dict[str, Any]:
    return {"max_shift": 0, "shift_limit": 0, "shift_limit_words": f"{name} is augmented by {words}, not shifted"}


register(DatasetSpec(
    name="fashion-mnist", description="Fashion-MNIST (28x28 grey articles of clothing, 10 classes)",
    help="Zalando's 28x28 articles of clothing, MNIST's format and sizes", input_shape=(1, 28, 28), max_shift=2,
    load=_fashion, **_DIGITS))
register(DatasetSpec(
    name="cifar10", description="CIFAR-10 (32x32 colour, random 24x24 crops and flips; central crop at test)",
    help="32x32 colour images, trained on random 24x24 crops and flips, 64 primary capsule types",
    input_shape=(3, 24, 24), load=_cifar10,
    train_source=partial(crop_source, train=True, size=24, flip=True),
    test_source=partial(crop_source, train=False, size=24),
    model={"capsnet": {"primary_types": 64}}, **_no_shift("CIFAR-10", "random 24x24 crops and flips")))
register(DatasetSpec(
    name="svhn", description="SVHN cropped digits (32x32 colour)",
    help="32x32 colour house-number digits, shifts of up to 2 px; the paper's smaller CapsNet (64 channels, "
         "16 types of 6D primary capsules, 8D digit capsules); needs scipy",
    input_shape=(3, 32, 32), max_shift=2, load=_svhn, **_DIGITS,
    model={"capsnet": {"conv_channels": 64, "primary_types": 16, "primary_dim": 6, "digit_dim": 8}}))
register(DatasetSpec(
    name="smallnorb", description="smallNORB (stereo pairs 96x96 -> 48x48, random 32x32 crops; 5 classes)",
    help="stereo pairs of toys in 5 classes as 2 channels, 96x96 averaged to 48x48, random 32x32 crops "
         "(central at test)",
    input_shape=(2, NORB_CROP, NORB_CROP), load=_smallnorb, n_classes=5,
    train_source=partial(crop_source, train=True, size=NORB_CROP),
    test_source=partial(crop_source, train=False, size=NORB_CROP),
    **_no_shift("smallNORB", f"random {NORB_CROP}x{NORB_CROP} crops")))
