"""Data parallelism inside one process: a model replica per host thread, a slice of the batch each.

A CPU training step is matrix products, which BLAS spreads over every core, and
element-wise passes (routing over u_hat, squash, the losses, the im2col gathers, the DFT
transposes, the adds and copies between), each of which NumPy runs on one core. With
``T`` threads, :class:`Replicas` cuts every batch into ``T`` contiguous slices
(:func:`capsnet.parallel.shard`, as MPI ranks do) and runs each through a
replica of the model on its own thread, with BLAS held to one thread per call
(:func:`capsnet.parallel.blas_limit`): the whole step, element-wise work included, then
runs on ``T`` cores. NumPy releases the GIL inside its calls on large arrays.

- **One set of weights.** Replica 0 is the model itself; the others are copies whose
  parameters are the model's arrays (re-bound before every call, so an optimizer or a
  ``load_state_dict`` that replaces them is followed) with gradients of their own. A
  backward adds each copy's gradient into the model's, in replica order, and zeroes it;
  the optimizer sees only the model's parameters.
- **The loss over the whole batch.** Outputs are joined along the batch axis, so a
  task computes its loss (and the gradient of its mean) as for one thread; the output
  gradient is cut into the same slices for the backward.
- **Deterministic.** Each replica computes its slice with single-threaded BLAS and the
  gradients meet in a fixed order, so a run repeats bit for bit with the same thread
  count, and a resumed run ends where an uninterrupted one does. Against one thread the
  result differs by rounding (the summation order, and the convolution method that
  ``Conv2d``'s automatic choice picks for the smaller slice), as under MPI.
- **What depends on the weights alone** is made once per step: a layer with a
  ``share_with_replica(copy)`` method (``Conv2d``: the Fourier method's weight spectrum)
  hands its copies a holder that the first replica fills.
- **Buffers.** Dropout draws the mask of the whole batch and keeps the slice's rows
  (:func:`capsnet.layers.stochastic.batch_slice`), so masks do not depend on the thread
  count; copies take the model's buffers before each forward.
- **Batch norm over the whole batch.** The replicas of a BatchNorm layer share a
  :class:`~capsnet.layers.BatchGroup` and exchange their per-image channel sums in the forward
  and the backward (as PyTorch's SyncBatchNorm does across processes): statistics, running
  statistics and gradients are the whole batch's, the same bits as one replica on
  channels-last rows. Their jobs then run at once, each on a thread of its own
  (:func:`capsnet.parallel.run_together`), and a replica that fails releases the others.

Only NumPy models are split, and only where BLAS's thread count can be controlled
(OpenBLAS, what NumPy's wheels ship); otherwise, and with one thread,
:func:`replicate` gives the model back and nothing changes. On CuPy the GPU already
runs each call in parallel, and a device and stream belong to the calling thread.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable

from capsnet.layers.base import Module
from capsnet.layers.stochastic import batch_slice, current_batch_slice
from capsnet.parallel import blas_limit, host_threads, run_all, run_together
from capsnet.processes import ProcessReplicas, process_reason
from capsnet.slices import ReplicaSet, batch_rows, join_rows, plan_slices, split_reason, split_rows

__all__ = ["ENV", "KINDS", "Replicas", "plan_slices", "replica_kind", "replicate", "split_reason"]



KINDS = ("threads", "processes")
"""Where replicas can run: threads of this process (:class:`Replicas`) or worker processes
(:class:`capsnet.processes.ProcessReplicas`)."""
ENV = "CAPSNET_REPLICAS"
"""The environment variable that chooses the kind for every model (``threads`` or ``processes``)."""


def replica_kind(kind: str | None = None, model: Module | None = None) -> str:
    """Where replicas run: ``kind`` if given; else the environment's CAPSNET_REPLICAS; else
    the model's own ``replica_kind`` (networks of many small calls, where processes were
    measured faster, say ``"processes"``); else ``"threads"``. A value not in KINDS is refused."""
    for chosen, source in ((kind, "replicas"), (os.environ.get(ENV) or None, ENV)):
        if chosen is not None:
            if chosen not in KINDS:
                raise ValueError(f"{source} must be one of {', '.join(KINDS)}, got {chosen!r}")
            return chosen
    preferred = getattr(model, "replica_kind", "threads")
    if preferred == "processes":
        if process_reason(model) is not None:  # a preference only: a subclass defined in a script stays in-process
            return "threads"
    return preferred if preferred in KINDS else "threads"


def replicate(model: Module, threads: int | None = None, kind: str | None = None) -> Any:
    """``model`` run by ``threads`` replicas (default :func:`~capsnet.parallel.host_threads`),
    or ``model`` itself where that cannot help (see :func:`split_reason`). ``kind`` says where
    the replicas run (default: :func:`replica_kind`): ``"threads"`` (:class:`Replicas`, one
    process) or ``"processes"`` (:class:`capsnet.processes.ProcessReplicas`: this process and
    worker processes, which escape the GIL; refused, with the reason, for a model a worker
    cannot import). All answer ``__call__``, ``backward``, ``predict``, ``train``, ``eval``,
    ``training``, ``parameters`` and ``release``; both kinds compute the same bits."""
    n = host_threads() if threads is None else threads
    chosen = replica_kind(kind, model)
    if split_reason(model, n) is not None:
        return model
    if chosen == "processes":
        return ProcessReplicas(model, n)
    return Replicas(model, n)


class Replicas(ReplicaSet):
    """``model`` run on ``threads`` host threads, one replica and one slice of each batch per
    thread (see the module docstring). ``replicas(*inputs)`` and ``replicas.backward(*grads)``
    work as the model's own; ``replicas.map(name, *args)`` calls any batch method (such as
    ``predict``) slice by slice. ``replicas.model`` is the model."""

    kind = "threads"

    def __init__(self, model: Module, threads: int):
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"Replicas threads must be a positive integer, got {threads!r}")
        reason = split_reason(model, max(threads, 2))
        if reason is not None:
            raise ValueError(f"Replicas cannot split this model: {reason}")
        self.model = model
        self.threads = threads
        self._copies: list[Module] = []
        self._shared: list[Any] = []  # holders of what the replicas share within a step (weight spectra)
        self._slices: list[tuple[int, int]] | None = None  # of the forward awaiting its backward

    # -- the replicas -------------------------------------------------------------
    def _clone(self) -> Module:
        """A copy of the model sharing its parameter arrays, with its own gradients,
        buffers, caches and scratch."""
        memo: dict[int, Any] = {}
        for p in self.model.parameters():
            memo[id(p.data)] = p.data
        for holder in self._shared:  # shared as they are, never copied
            memo[id(holder)] = holder
        clone = copy.deepcopy(self.model, memo)
        clone.release()  # scratch copied from the model is not this replica's
        for p in clone.parameters():
            p.grad[...] = 0
        for mine, theirs in zip(self.model.modules(), clone.modules()):
            share = getattr(mine, "share_with_replica", None)
            if share is not None:  # what depends only on the weights is made once per step
                holder = share(theirs)
                if all(holder is not h for h in self._shared):
                    self._shared.append(holder)
        return clone

    def _replicas(self, n: int) -> list[Module]:
        """The first ``n`` replicas, their parameters bound to the model's current arrays."""
        if n == 1:
            return [self.model]  # no copy to bind (batch 1: spares a walk of the tree)
        params = self.model.parameters()
        while len(self._copies) < n - 1:
            self._copies.append(self._clone())
        for clone in self._copies[:n - 1]:
            theirs = clone.parameters()
            if len(theirs) != len(params) or any(a.shape != b.shape or a.dtype != b.dtype
                                                 for a, b in zip(theirs, params)):
                raise RuntimeError("the model's parameters changed shape or dtype since its replicas were made "
                                   "(Module.astype or a new layer?): build a new Replicas")
            for mine, theirs_p in zip(theirs, params):
                mine.data = theirs_p.data
            clone.train(self.model.training)
        return [self.model, *self._copies[:n - 1]]

    def _run(self, jobs: list[Callable[[], Any]], groups: list[Any] = ()) -> list:
        """The jobs on the host threads, BLAS on one thread each; their results in order.
        With ``groups`` (open :class:`~capsnet.layers.BatchGroup` s, whose members wait for
        each other) every job runs at once on a thread of its own, and a job that fails
        aborts the groups so that the others stop waiting for it."""
        results: list = [None] * len(jobs)

        def task(k: int) -> Callable[[], None]:
            def run() -> None:
                try:
                    results[k] = jobs[k]()
                except BaseException:
                    for group in groups:
                        group.abort()
                    raise
            return run
        if len(jobs) == 1:
            results[0] = jobs[0]()
            return results
        with blas_limit(1):
            (run_together if groups else run_all)([task(k) for k in range(len(jobs))])
        return results

    def _open(self, parties: int) -> tuple[list[Any], list[Any]]:
        """Open what the replicas share for a training step of ``parties`` slices: (every
        holder, the groups among them whose members wait for each other)."""
        shared = self._shared if parties > 1 else []
        for holder in shared:
            holder.open(parties)
        return shared, self._groups(parties)

    def _groups(self, parties: int) -> list[Any]:
        """The shared holders whose members wait for each other (batch norms), for a step of
        ``parties`` slices: none when one replica runs the whole batch."""
        return [h for h in self._shared if getattr(h, "waits_for_members", False)] if parties > 1 else []

    @property
    def models(self) -> list[Module]:
        """The replicas made so far: the model, then its copies (for tools that look inside)."""
        return [self.model, *self._copies]

    # -- what a model answers ------------------------------------------------------
    def train(self, mode: bool = True) -> "Replicas":
        self.model.train(mode)
        for clone in self._copies:
            clone.train(mode)
        return self

    def release(self) -> "Replicas":
        """Drop every replica's caches and scratch (the copies stay, without memory of their own
        beyond their gradients)."""
        self.model.release()
        for clone in self._copies:
            clone.release()
        self._slices = None
        return self

    def forward(self, *inputs: Any) -> Any:
        """The model's forward on each slice of the batch (the first input's rows), joined."""
        rows = batch_rows(inputs)
        training = self.model.training
        slices = self._plan(rows, training)
        replicas = self._replicas(len(slices))
        buffers = [buf for _, buf in self.model.named_buffers()] if len(replicas) > 1 else []
        for clone in replicas[1:]:
            for mine, theirs in zip((buf for _, buf in clone.named_buffers()), buffers):
                mine.data[...] = theirs.data

        # rows of the caller's batch, itself perhaps an MPI rank's slice of a global batch
        total, base = (rows, 0) if (outer := current_batch_slice()) is None else (outer[0], outer[1])

        def job(replica: Module, lo: int, hi: int) -> Callable[[], Any]:
            def run() -> Any:
                args = split_rows(inputs, rows, lo, hi)
                if len(slices) == 1:
                    return replica(*args)
                with batch_slice(total, base + lo, base + hi):
                    return replica(*args)
            return run
        shared, groups = self._open(len(slices)) if training else ([], [])
        try:
            outputs = self._run([job(r, lo, hi) for r, (lo, hi) in zip(replicas, slices)], groups)
        finally:
            for holder in shared:
                holder.close()
        if training and len(slices) > 1:
            self._average_buffers([[buf.data for _, buf in r.named_buffers()] for r in replicas[1:]])
        self._slices = slices if training else None
        return join_rows(outputs, slices, "outputs")

    def backward(self, *grads: Any) -> Any:
        """The model's backward, slice by slice, with the copies' parameter gradients added
        into the model's; returns the input gradient joined (or None)."""
        slices = self._take_slices()
        rows = slices[-1][1]
        replicas = self._replicas(len(slices))

        def job(replica: Module, lo: int, hi: int) -> Callable[[], Any]:
            return lambda: replica.backward(*split_rows(grads, rows, lo, hi))
        groups = self._groups(len(slices))
        for group in groups:  # the batch norms exchange their gradient sums again
            group.open(len(slices))
        try:
            results = self._run([job(r, lo, hi) for r, (lo, hi) in zip(replicas, slices)], groups)
        finally:
            for group in groups:
                group.close()
        if len(replicas) > 1:  # the copies' gradients into the model's, the copies' zeroed
            self._add_gradients([[p.grad for p in r.parameters()] for r in replicas[1:]], zero=True)
        return join_rows(results, slices, "input gradients")

    def map(self, name: str, *args: Any) -> Any:
        """``model.<name>(*args)`` run slice by slice on the replicas and joined (for batch
        methods that keep no cache, such as ``predict``)."""
        rows = batch_rows(args)
        slices = self._plan(rows)
        replicas = self._replicas(len(slices))
        jobs = [(lambda r=r, lo=lo, hi=hi: getattr(r, name)(*split_rows(args, rows, lo, hi)))
                for r, (lo, hi) in zip(replicas, slices)]
        return join_rows(self._run(jobs), slices, f"{name} results")

