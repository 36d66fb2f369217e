"""Distribution strategies: every concern of training on one process or on many.

The training loop (:class:`~capsnet.training.Trainer` and its
:class:`~capsnet.training.Updater`) never asks how many processes there are; it asks
its strategy. A strategy decides

- which rows of each global batch this process computes (:meth:`~SingleProcess.local`),
  and what a process left without rows does instead (:meth:`~SingleProcess.idle`);
- how gradients meet before the optimizer step, and whether any process asked to stop
  after this step (:meth:`~SingleProcess.reduce_gradients`);
- how host values (the running loss and metric sums) are combined (:meth:`~SingleProcess.gather`),
  how buffers such as BatchNorm's statistics are made one (:meth:`~SingleProcess.sync_buffers`),
  and how the processes agree to stop between two steps (:meth:`~SingleProcess.agree`);
- which process writes files and logs (:attr:`~SingleProcess.writes`), how what it read is
  shared with the others (:meth:`~SingleProcess.on_writer`), and how a failure on one
  process ends them all (:meth:`~SingleProcess.fail`).

:class:`SingleProcess` does nothing in each of these: one process computes the whole
batch and writes. :class:`DataParallel` is MPI data parallelism (see
:mod:`capsnet.training.distributed` for the communicator). :func:`strategy_for` picks one
for a communicator. A new distributed concern is a new method here, in both classes,
and one call in the loop.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import numpy as np

from capsnet import backend
from capsnet.layers.base import Module
from capsnet.layers.stochastic import batch_slice
from capsnet.parallel import share_blas_threads
from capsnet.training.checkpoint import CheckpointError
from capsnet.training.run_folder import RunFolderError
from capsnet.training.distributed import GradientBuffer, LocalComm, fail, shard

__all__ = ["DataParallel", "SingleProcess", "strategy_for"]


class SingleProcess:
    """One process computes every batch whole and writes every file: each hook is an identity."""

    rank, size = 0, 1
    comm: Any = LocalComm()

    @property
    def writes(self) -> bool:
        """Whether this process writes files, bars and log lines (here: always)."""
        return True

    @property
    def across(self) -> str:
        """Where the run runs, for a log line: "" here, " on N MPI ranks" under MPI."""
        return ""

    @property
    def here(self) -> str:
        """Which process speaks, for an error message: "" here, " on rank R" under MPI."""
        return ""

    def setup(self, model: Module) -> None:
        """Prepare for training ``model`` (after its weights are final for the run)."""

    def on_writer(self, read: Callable[[], Any]) -> Any:
        """``read()`` run where files are written, its result (or its CheckpointError) on every process."""
        return read()

    def share_weights(self, model: Module) -> None:
        """Give every process the writing process's initial weights (a fresh start)."""

    def local(self, batch: tuple) -> tuple[tuple, ContextManager]:
        """This process's rows of a global ``batch``, and the context its forward runs in."""
        return batch, contextlib.nullcontext()

    def shard(self, n: int) -> tuple[int, int]:
        """This process's contiguous share [lo, hi) of ``n`` examples (evaluation)."""
        return 0, n

    def idle(self, model: Module) -> None:
        """What a process with no rows in this batch does instead of a forward (nothing here)."""

    def reduce_gradients(self, share: float, stop: bool) -> bool:
        """Combine the gradients of this process's ``share`` of the batch into the global
        batch's; returns whether any process asked to stop after this step."""
        return stop

    def gather(self, value: Any) -> list:
        """Every process's host ``value``, in rank order."""
        return [value]

    def agree(self, stop: bool) -> bool:
        """Whether any process asks to stop, between two steps."""
        return stop

    def sync_buffers(self, model: Module) -> None:
        """Make the floating buffers (BatchNorm's statistics) the same on every process."""

    def fail(self, exc: BaseException, code: int = 1, trace: bool = True, message: str | None = None) -> None:
        """End every process after ``exc`` on this one, with exit status ``code`` (and the
        traceback with ``trace``; ``message``: the words to report it in); nothing to end here."""

    def __repr__(self) -> str:
        return "SingleProcess()"


class DataParallel(SingleProcess):
    """MPI data parallelism over ``comm`` (:func:`capsnet.training.distributed.world`).

    Every rank holds the whole model and draws the same global batch, computes its own
    contiguous slice (Dropout draws the whole batch's mask and keeps its rows), and the
    gradients, each weighted by its rank's share, are summed by one in-place Allreduce per
    step, a stop flag riding in the same buffer so that agreeing to stop costs no extra
    message. Rank 0 reads and writes the run folder; what it reads is broadcast. Host sums
    are combined in rank order, and a rank that fails ends the job (no rank is left
    waiting in a collective).
    """

    def __init__(self, comm: Any):
        if comm.size < 2:
            raise ValueError(f"DataParallel needs 2 or more ranks, got a communicator of size {comm.size}; "
                             "use SingleProcess")
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.gradients: GradientBuffer | None = None
        # each rank's BLAS on its share of the cores, not on all of them (the ranks would fight)
        self.blas_threads = share_blas_threads()

    @property
    def writes(self) -> bool:
        return self.rank == 0

    @property
    def across(self) -> str:
        if self.blas_threads is None:
            return f" on {self.size} MPI ranks (BLAS threads not controlled: no OpenBLAS, no threadpoolctl)"
        return f" on {self.size} MPI ranks, {self.blas_threads} BLAS thread{'s' if self.blas_threads > 1 else ''} each"

    @property
    def here(self) -> str:
        return f" on rank {self.rank}"

    def setup(self, model: Module) -> None:
        # built at the start of every fit: rebinding p.grad elsewhere (astype, to) breaks its views
        self.gradients = GradientBuffer(model.parameters(), self.comm)

    def on_writer(self, read: Callable[[], Any]) -> Any:
        # Whatever rank 0's read raises, the other ranks learn it from the broadcast (none is
        # left waiting in it) and raise it too: a RunFolderError with its reason and PID, a
        # CheckpointError, or else a RuntimeError naming rank 0's error.
        payload: tuple = ("ok", None)
        error: BaseException | None = None
        if self.rank == 0:
            try:
                payload = ("ok", read())
            except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then raised here
                error = exc
                payload = ("error", type(exc).__name__, str(exc), getattr(exc, "reason", None),
                           getattr(exc, "folder", None), getattr(exc, "pid", None))
        payload = self.comm.bcast(payload)
        if error is not None:
            raise error
        if payload[0] == "error":
            kind, message, reason, folder, pid = payload[1:]
            if reason is not None:
                raise RunFolderError(message, reason, folder, pid)
            if kind in ("CheckpointError", "RunFolderError"):
                raise CheckpointError(message)
            raise RuntimeError(f"rank 0 failed to read the run folder: {kind}: {message}")
        return payload[1]

    def share_weights(self, model: Module) -> None:
        state = self.comm.bcast(model.state_dict() if self.rank == 0 else None)
        if self.rank != 0:
            model.load_state_dict(state)

    def local(self, batch: tuple) -> tuple[tuple, ContextManager]:
        total = len(batch[0])
        lo, hi = shard(total, self.rank, self.size)
        return tuple(a[lo:hi] for a in batch), batch_slice(total, lo, hi)

    def shard(self, n: int) -> tuple[int, int]:
        return shard(n, self.rank, self.size)

    def idle(self, model: Module) -> None:
        for m in model.modules():
            if hasattr(m, "advance"):  # Dropout: keep the draw count in step with the other ranks
                m.advance()

    def reduce_gradients(self, share: float, stop: bool) -> bool:
        if self.gradients is None:
            raise RuntimeError("DataParallel.reduce_gradients before setup(model)")
        return self.gradients.allreduce(share, stop)

    def gather(self, value: Any) -> list:
        return self.comm.allgather(value)

    def agree(self, stop: bool) -> bool:
        return any(self.comm.allgather(bool(stop)))

    def sync_buffers(self, model: Module) -> None:
        """Average the floating buffers over the ranks (each rank's BatchNorm saw its own slice),
        so that evaluation and the checkpoint see one set."""
        for _, buf in model.named_buffers():
            if buf.data.dtype.kind != "f" or buf.host:
                continue
            host = np.ascontiguousarray(backend.to_numpy(buf.data), dtype=np.float64)
            self.comm.allreduce_(host)
            host /= self.size
            buf.data[...] = backend.to_device(host.astype(buf.data.dtype), backend.backend_of(buf.data))

    def fail(self, exc: BaseException, code: int = 1, trace: bool = True, message: str | None = None) -> None:
        fail(self.comm, exc, code, trace, message)

    def __repr__(self) -> str:
        return f"DataParallel(rank {self.rank} of {self.size})"


def strategy_for(comm: Any = None) -> SingleProcess:
    """The strategy for a communicator: :class:`DataParallel` over 2 or more ranks, else
    :class:`SingleProcess` (also for ``None``)."""
    if comm is None or comm.size < 2:
        return SingleProcess()
    return DataParallel(comm)
