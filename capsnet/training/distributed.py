"""Data-parallel training over MPI (``mpiexec -n N python -m capsnet.train ...``).

Every rank holds the whole model and draws the same global batch (order and augmentation
come from one seeded host generator, the same on every rank), computes the loss of its
own contiguous slice of it, and the gradients meet in one flat buffer summed by a single
in-place ``Allreduce`` per step. Each rank's gradient is weighted by its share of the
global batch, so the sum is the gradient of the global batch's mean loss: a run's result
does not depend on the number of ranks beyond rounding (summation order, and the
convolution method picked for the per-rank batch). Dropout draws the whole batch's mask
and keeps its rows (:func:`capsnet.layers.stochastic.batch_slice`); BatchNorm alone sees
only its rank's slice, and its running statistics are averaged over the ranks before
each evaluation and checkpoint. Every rank then takes the same optimizer step.

MPI comes from ``mpi4py`` (the ``mpi`` extra: ``pip install 'capsnet[mpi]'`` brings
mpi4py and an MPICH to run it; on a cluster, build mpi4py against the system's MPI).
Outside ``mpiexec`` nothing here imports it: :func:`world` gives a one-rank
:class:`LocalComm`.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

import numpy as np

from capsnet import backend
from capsnet.parallel import shard  # the ranks' slices are the host threads' (capsnet.replicas)

__all__ = ["GradientBuffer", "LocalComm", "MPIComm", "launched_by_mpi", "shard", "world"]

_MPI_HINT = "install the mpi extra: pip install 'capsnet[mpi]' (mpi4py and mpich)"


def launched_by_mpi() -> int:
    """The world size mpiexec announced in the environment (MPICH/Hydra, Open MPI,
    Slurm's PMI), or 0 when this process was not started by an MPI launcher."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 0


class LocalComm:
    """One process, no MPI: the collectives are identities."""

    rank, size = 0, 1

    def allreduce_(self, host: np.ndarray) -> np.ndarray:
        return host

    def bcast(self, obj: Any) -> Any:
        return obj

    def allgather(self, obj: Any) -> list:
        return [obj]

    def abort(self, code: int) -> None:  # pragma: no cover - nothing to abort
        raise SystemExit(code)


class MPIComm:
    """``mpi4py``'s COMM_WORLD behind the three collectives the loop uses."""

    def __init__(self) -> None:
        try:
            from mpi4py import MPI  # noqa: PLC0415 - optional, only under mpiexec
        except ImportError as exc:
            raise ImportError(f"started by mpiexec with {launched_by_mpi()} processes, but mpi4py cannot be "
                              f"imported ({exc}); {_MPI_HINT}") from exc
        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()

    def allreduce_(self, host: np.ndarray) -> np.ndarray:
        """Sum a contiguous host array over the ranks, in place."""
        self._comm.Allreduce(self._mpi.IN_PLACE, host, op=self._mpi.SUM)
        return host

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled: headers and state dicts)."""
        return self._comm.bcast(obj, root=0)

    def allgather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank (pickled: small host values)."""
        return self._comm.allgather(obj)

    def abort(self, code: int) -> None:
        """End every rank of the job now (a rank that failed must not leave the others
        waiting in a collective).

        The output is flushed, then forwarded for :data:`ABORT_GRACE_SECONDS` before the
        abort: mpiexec relays each rank's output through its proxy, and an abort that
        reaches the proxy first ends the job with that output unread (it happened in CI:
        the job ended with code 1 and an empty stderr, the failing rank's report lost).
        """
        sys.stderr.flush()
        sys.stdout.flush()
        time.sleep(ABORT_GRACE_SECONDS)
        self._comm.Abort(code)


ABORT_GRACE_SECONDS = 1.0
"""How long a failing rank waits, its report flushed, before ``MPI_Abort`` (see
:meth:`MPIComm.abort`): a failure costs this once, a lost report costs the user the cause."""

_WORLD: LocalComm | MPIComm | None = None


def world() -> LocalComm | MPIComm:
    """The communicator of this process: MPI's world under mpiexec with 2 or more
    ranks, else a :class:`LocalComm` (mpi4py is not imported then)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = MPIComm() if launched_by_mpi() > 1 else LocalComm()
    return _WORLD


def fail(comm: LocalComm | MPIComm, exc: BaseException, code: int = 1, trace: bool = True,
         message: str | None = None) -> None:
    """Under MPI, report ``exc`` (in the words of ``message`` when given) naming this rank,
    then end the whole job (a failed rank must not leave the others waiting in a
    collective). Does nothing in one process."""
    if comm.size > 1:
        words = message if message is not None else str(exc)
        print(f"capsnet: rank {comm.rank} of {comm.size} failed, ending the job: {type(exc).__name__}: {words}",
              file=sys.stderr)
        if trace:
            traceback.print_exception(exc, file=sys.stderr)
        comm.abort(code)


class GradientBuffer:
    """The gradients of ``params`` as views into one contiguous buffer (plus one slot
    for a stop flag), so that a step sums them over the ranks with one Allreduce and
    no gathering copies. On CuPy the buffer is copied to the host around the Allreduce.

    Rebinding ``p.grad`` elsewhere (``Module.astype``, ``Module.to``) breaks the views:
    build the buffer after such changes (the loop does, at the start of ``fit``).
    """

    def __init__(self, params: list, comm: LocalComm | MPIComm):
        if not params:
            raise ValueError("GradientBuffer needs at least one parameter")
        self.comm = comm
        self.params = params
        dtype = params[0].grad.dtype
        if any(p.grad.dtype != dtype for p in params):
            raise TypeError("data-parallel training needs every parameter in one dtype; got "
                            f"{sorted({str(p.grad.dtype) for p in params})}")
        xp = backend.get_array_module(params[0].grad)
        sizes = [p.grad.size for p in params]
        self.flat = xp.zeros(sum(sizes) + 1, dtype=dtype)  # the last slot: the stop flag
        offset = 0
        self._views = []
        for p, n in zip(params, sizes):
            view = self.flat[offset:offset + n].reshape(p.grad.shape)
            view[...] = p.grad
            p.grad = view
            self._views.append(view)
            offset += n
        self.seconds = 0.0  # time spent in the Allreduce, host copies included
        self.calls = 0

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes)

    def intact(self) -> bool:
        """Whether every parameter's gradient is still a view of the buffer."""
        return all(p.grad is view for p, view in zip(self.params, self._views))

    def allreduce(self, weight: float, stop: bool) -> bool:
        """grad <- sum over ranks of weight_r * grad_r, in place; returns whether any rank
        asked to stop after this step."""
        if not self.intact():
            raise RuntimeError("a parameter's gradient was rebound since the gradient buffer was built "
                               "(Module.astype or Module.to during fit?): its gradient would not be summed")
        self.flat *= self.flat.dtype.type(weight)
        self.flat[-1] = 1 if stop else 0  # overwrites the scaled flag of the last step
        start = time.perf_counter()
        if backend.is_cupy_array(self.flat):
            host = backend.to_numpy(self.flat)
            self.comm.allreduce_(host)
            self.flat[...] = backend.to_device(host, "cupy")
        else:
            self.comm.allreduce_(self.flat)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return bool(self.flat[-1] > 0)
