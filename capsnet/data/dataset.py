"""The data-source protocol of the training loop, and a source over arrays.

A data source is anything with these three methods (:class:`DataSource`):

- ``len(source)``: the number of examples;
- ``source.order(rng)``: the order of one training epoch, a host int array of
  example indices drawn from the host generator ``rng`` (a permutation, say);
- ``source.batch(indices, rng)``: the examples at ``indices`` (a host int array)
  as a tuple of arrays on the current backend, ``(inputs, targets, ...)``. In
  training ``rng`` is the loop's host generator, for augmentation; in
  evaluation it is None, and nothing random may happen.

Everything random is drawn from the generator the loop hands over, in a fixed
order, so a resumed run replays the same batches and the same augmentation:
that is what makes resume exact. :class:`ArrayDataset` is the source over
arrays that the MNIST training uses.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import numpy

from capsnet import backend

__all__ = ["ArrayDataset", "DataSource"]


@runtime_checkable
class DataSource(Protocol):
    """What :class:`capsnet.training.Trainer` asks of its data (see the module's docstring)."""

    def __len__(self) -> int: ...

    def order(self, rng: numpy.random.Generator) -> numpy.ndarray: ...

    def batch(self, indices: numpy.ndarray, rng: numpy.random.Generator | None) -> tuple[Any, ...]: ...


class ArrayDataset:
    """Examples held as arrays with a common first axis: ``ArrayDataset(x, y, ...)``.

    ``batch(indices, rng)`` returns ``(x[indices], y[indices], ...)`` on the arrays'
    device (a view when the indices are a run, as in evaluation), with ``augment(x_batch, rng)`` applied to the first array in
    training (when ``rng`` is given). ``order(rng)`` is ``rng.permutation(n)``.
    Keep the arrays on the device the model trains on: a batch is then a gather
    there, with no transfer.
    """

    def __init__(self, *arrays: Any, augment: Callable[[Any, numpy.random.Generator], Any] | None = None):
        if not arrays:
            raise ValueError("ArrayDataset needs at least one array, e.g. ArrayDataset(images, labels)")
        for k, a in enumerate(arrays):
            if not hasattr(a, "shape") or len(a.shape) == 0:
                raise TypeError(f"ArrayDataset expected arrays with a first axis, got {type(a).__name__} at "
                                f"position {k}")
        sizes = [int(a.shape[0]) for a in arrays]
        if len(set(sizes)) != 1:
            raise ValueError(f"ArrayDataset arrays must have the same first axis, got lengths {sizes}")
        if augment is not None and not callable(augment):
            raise TypeError(f"ArrayDataset augment must be a function (x, rng) -> x, got {type(augment).__name__}")
        backend.get_array_module(*arrays)  # one device for all
        self.arrays = arrays
        self.augment = augment

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0])

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(a.shape)) for a in self.arrays)
        return f"ArrayDataset({shapes}{', augmented' if self.augment else ''})"

    def order(self, rng: numpy.random.Generator) -> numpy.ndarray:
        return rng.permutation(len(self)).astype(numpy.int64, copy=False)

    def batch(self, indices: numpy.ndarray, rng: numpy.random.Generator | None = None) -> tuple[Any, ...]:
        indices = numpy.asarray(indices)
        n = indices.size
        if n and indices[-1] - indices[0] == n - 1 and (n == 1 or bool((numpy.diff(indices) == 1).all())):
            where: Any = slice(int(indices[0]), int(indices[-1]) + 1)  # a run: a view, no gather
        else:
            where = None
        if where is None:
            where = backend.get_array_module(self.arrays[0]).asarray(indices)  # moved once for all arrays
        out = [a[where] for a in self.arrays]
        if rng is not None and self.augment is not None:
            out[0] = self.augment(out[0], rng)
        return tuple(out)
