"""How replicas share a batch: which models can be split (:func:`split_reason`), into which
slices (:func:`plan_slices`, at least :data:`MIN_TRAIN_SLICE` examples each in training), and
the slices cut from the inputs and joined back along the batch axis (:func:`split_rows`,
:func:`join_rows`), for :mod:`capsnet.replicas` (threads) and :mod:`capsnet.processes`
(worker processes) alike."""
from __future__ import annotations

from typing import Any

from capsnet import backend
from capsnet.layers.base import Module
from capsnet.parallel import blas_threads, host_threads, run_all, shard

__all__ = ["MIN_TRAIN_SLICE", "ReplicaSet", "batch_rows", "join_rows", "plan_slices", "split_reason", "split_rows"]

CHUNK = 1 << 18
"""Elements per task of the replicas' gradient sum: 1 MB of float32 per array."""
MIN_TRAIN_SLICE = 32
"""A training batch is split only into slices of at least this many examples (a model may set
its own ``min_train_slice``). Measured at 2 threads on the paper's network
(scripts/bench_compare.py, quiet machine): slices of 50 (batch 100) trained 1.20x faster than
one replica with BLAS on both cores, slices of 16 (batch 32) 0.93x. Inference splits at any
size (batch 32: 1.20x)."""


def split_reason(model: Module, threads: int | None = None) -> str | None:
    """Why ``model`` would run on one thread (a sentence), or None when it can be split."""
    n = host_threads() if threads is None else threads
    if n <= 1:
        return "one host thread (OMP_NUM_THREADS, capsnet.parallel.threads)"
    params = model.parameters()
    if not params:
        return "the model has no parameters"
    if any(backend.backend_of(p.data) != "numpy" for p in params):
        return "the model is not on the NumPy backend (the GPU parallelises each call)"
    if blas_threads() is None:
        return "the BLAS thread count cannot be controlled (no OpenBLAS loaded)"
    return None


def plan_slices(model: Module, parts: int, rows: int, training: bool = False) -> list[tuple[int, int]]:
    """The slices of a batch of ``rows`` for ``parts`` replicas: one per replica, each of at
    least one example (at least MIN_TRAIN_SLICE in training, below which one replica with
    BLAS on every core is faster; a model whose step is mostly element-wise passes sets its
    own ``min_train_slice``)."""
    most = rows // getattr(model, "min_train_slice", MIN_TRAIN_SLICE) if training else rows
    n = max(1, min(parts, most))
    return [shard(rows, r, n) for r in range(n)]


def split_rows(value: Any, rows: int, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of every array with ``rows`` rows in ``value`` (tuples and lists
    followed); anything else as it is."""
    if isinstance(value, (tuple, list)):
        return type(value)(split_rows(v, rows, lo, hi) for v in value)
    if hasattr(value, "shape") and len(value.shape) >= 1 and value.shape[0] == rows:
        return value[lo:hi]
    return value


def join_rows(parts: list, slices: list[tuple[int, int]], what: str) -> Any:
    """The replicas' results joined along the batch axis (tuples followed; None stays None).
    Each must have its slice's rows: an output laid out otherwise (a model returning
    (targets * batch, ...) rows) cannot be joined and is refused."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(join_rows([p[k] for p in parts], slices, what) for k in range(len(first)))
    if len(parts) == 1:
        return first
    for part, (lo, hi) in zip(parts, slices):
        if not hasattr(part, "shape") or len(part.shape) == 0 or part.shape[0] != hi - lo:
            shape = tuple(part.shape) if hasattr(part, "shape") else type(part).__name__
            raise ValueError(f"Replicas cannot join the replicas' {what}: a slice of {hi - lo} rows gave {shape}, "
                             "expected the batch along the first axis. Run this model on one thread "
                             "(OMP_NUM_THREADS=1, or capsnet.parallel.threads(1))")
    xp = backend.get_array_module(*parts)
    return xp.concatenate(parts, axis=0)


def batch_rows(args: tuple) -> int:
    """The batch size: the first input's first axis (refused when the first input has none)."""
    first = args[0] if args else None
    if not hasattr(first, "shape") or len(first.shape) == 0:
        raise TypeError("Replicas needs the batch as the first input (an array with a batch axis), "
                        f"got {type(first).__name__}")
    return int(first.shape[0])


class ReplicaSet:
    """What :class:`capsnet.replicas.Replicas` and :class:`capsnet.processes.ProcessReplicas`
    answer alike, as the model would: ``training``, ``train``, ``eval``, ``evaluating``,
    ``parameters``, ``replicas(*inputs)`` and ``predict`` (through ``map``). ``self.model`` is
    the model; ``self.threads`` the number of replicas; a subclass defines ``forward``,
    ``backward``, ``map`` and ``release``, and extends ``train`` where its replicas keep a mode
    of their own."""

    model: Module
    threads: int
    kind: str  # "threads" or "processes", as capsnet.replicas.KINDS names them
    _slices: list[tuple[int, int]] | None  # of the training forward awaiting its backward

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> "ReplicaSet":
        self.model.train(mode)
        return self

    def eval(self) -> "ReplicaSet":
        return self.train(False)

    evaluating = Module.evaluating  # the same context manager: eval mode inside, the mode restored after

    def parameters(self) -> list:
        return self.model.parameters()

    def _plan(self, rows: int, training: bool = False) -> list[tuple[int, int]]:
        return plan_slices(self.model, self.threads, rows, training)

    def __call__(self, *inputs: Any) -> Any:
        return self.forward(*inputs)

    def forward(self, *inputs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def map(self, name: str, *args: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, x: Any) -> Any:
        return self.map("predict", x)

    def _take_slices(self) -> list[tuple[int, int]]:
        """The slices of the training forward that this backward follows (taken: a second
        backward needs a new forward)."""
        if self._slices is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a training forward before it: "
                               "call forward in training mode (train()) before each backward")
        slices, self._slices = self._slices, None
        return slices

    def _add_gradients(self, others: list[list], zero: bool) -> None:
        """model.grad += each other replica's gradient (``others``: per replica, its gradient
        arrays in the model's parameter order), in replica order, each then zeroed if ``zero``;
        in chunks shared by the host threads (each element summed in the same order whatever
        the chunking)."""
        tasks = []
        for k, p in enumerate(self.model.parameters()):
            total = p.grad.reshape(-1)
            parts = [grads[k].reshape(-1) for grads in others]
            for start in range(0, total.size, CHUNK):
                def add(total=total, parts=parts, s=slice(start, start + CHUNK)) -> None:
                    for part in parts:
                        total[s] += part[s]
                        if zero:
                            part[s] = 0
                tasks.append(add)
        run_all(tasks)

    def _average_buffers(self, theirs: list[list]) -> None:
        """The model's floating buffers (BatchNorm's running statistics) set to the mean of
        the replicas' (``theirs``: each other replica's buffer arrays, in the model's order),
        each replica having updated its own from its slice."""
        for k, (_, buf) in enumerate(self.model.named_buffers()):
            if buf.data.dtype.kind != "f":
                continue
            total = buf.data.copy()
            for other in theirs:
                total += other[k]
            buf.data[...] = total / (len(theirs) + 1)
