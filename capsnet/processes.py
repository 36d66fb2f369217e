"""Data parallelism across processes: a model replica per worker process, a slice of the batch each.

:class:`capsnet.replicas.Replicas` runs its replicas on threads of one process. NumPy
releases the GIL inside a call, but every call's Python side (the layer code, the argument
checks, the small arrays of a batch of 8 or 16) runs under it, so two replicas of a network
made of many small calls wait on each other: at Efficient-CapsNet's batch 16 the second core
adds almost nothing. :class:`ProcessReplicas` runs replica 0 in this process and the others
in worker processes (``python -m capsnet._worker``), each with its own interpreter:

- **One set of weights, in shared memory.** The model's parameter arrays are moved into a
  block of shared memory (``memfd``) that every worker maps, so an optimizer step, which
  updates them in place, is seen by the workers with no copy. A parameter whose array was
  replaced (``load_state_dict`` of a new array, an optimizer that rebinds) is copied back in
  before the next call.
- **Gradients in shared memory.** Each worker accumulates its gradient into a block of its
  own (zeroed by the worker at the start of its backward); this process adds the blocks into
  the model's gradients in worker order after every backward: the bits of
  :class:`~capsnet.replicas.Replicas` with as many threads.
- **Batch norm over the whole batch.** A batch-norm layer's per-image sums travel through this
  process (:class:`capsnet.layers.BatchGroup`'s ``gather``), which joins them in batch order
  and sends the whole back: the statistics of the whole batch, as with threads.
- **Buffers** (running statistics, dropout draw counters) go to the workers with every
  forward; in training the floating ones come back and are averaged, as with threads.
- **Everything else travels as messages** over a socket per worker: the slice of the inputs,
  the outputs, the output gradient and the input gradient.
- **Failures.** An exception in a worker is raised here with the worker's traceback; a worker
  that dies is reported with its exit code, and the workers are started afresh at the next
  call. Workers ignore Ctrl-C (the trainer here decides what an interrupt does) and end when
  this process closes their socket or exits.

Only NumPy models on Linux are split this way (``os.memfd_create``), and the model must be
picklable by reference to importable classes (a class defined in ``__main__`` is not).
:func:`capsnet.replicas.replicate` chooses between threads and processes
(``CAPSNET_REPLICAS``).
"""
from __future__ import annotations

import copy
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
import weakref
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from capsnet.layers.base import Module
from capsnet.layers.norm import _BatchNorm
from capsnet.layers.stochastic import batch_slice, current_batch_slice
from capsnet.parallel import blas_limit, threads
from capsnet.slices import ReplicaSet, batch_rows, join_rows, split_reason, split_rows

__all__ = ["ProcessReplicas", "WorkerError", "process_reason", "serve"]

ALIGN = 64  # bytes: each array in a shared block starts on a cache line
START_TIMEOUT = 120.0  # seconds a worker may take to import capsnet and load the model


class WorkerError(RuntimeError):
    """A replica process failed or ended; the message carries its traceback or exit code."""


class _Aborted(RuntimeError):
    """Raised inside a worker's batch-norm exchange when this process abandons the step."""


def process_reason(model: Module) -> str | None:
    """Why ``model`` cannot run as :class:`ProcessReplicas` (a sentence), or None."""
    if not hasattr(os, "memfd_create"):
        return "shared memory for the workers needs os.memfd_create (Linux)"
    for module in model.modules():
        cls = type(module)
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
            return (f"{cls.__qualname__} is defined in {cls.__module__!r}, which a worker process cannot import: "
                    "define the model's classes in a module")
    return None


# -- shared memory ----------------------------------------------------------------------
class _Block:
    """Arrays of the given (shape, dtype) laid out in one block of shared memory (a memfd,
    which a worker maps through the descriptor it inherits)."""

    def __init__(self, layout: list[tuple[tuple[int, ...], str]], fd: int | None = None):
        offsets, size = [], 0
        for shape, dtype in layout:
            offsets.append(size)
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            size += -(-max(nbytes, 1) // ALIGN) * ALIGN
        size = max(size, ALIGN)
        if fd is None:
            fd = os.memfd_create("capsnet-replicas")  # close-on-exec: only the workers it is passed to get it
            os.ftruncate(fd, size)
        self.fd, self.layout = fd, layout
        self._map = mmap.mmap(fd, size)
        self.arrays = [np.ndarray(shape, dtype=np.dtype(dtype), buffer=self._map, offset=offset)
                       for (shape, dtype), offset in zip(layout, offsets)]

    def close_fd(self) -> None:
        """Close the descriptor (the mapping, and the arrays on it, stay valid)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _layout(params: list) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(p.data.shape), np.dtype(p.data.dtype).str) for p in params]


# -- batch norm across processes ----------------------------------------------------------
class _LeaderGroup:
    """The model's batch-norm layers' group in this process (member 0): gathers the workers'
    per-image rows, joins them after its own and sends the whole back to each."""

    waits_for_members = True

    def __init__(self, owner: "ProcessReplicas"):
        self._owner = weakref.ref(owner)
        self.parties = 0

    @property
    def is_open(self) -> bool:
        return self.parties > 1

    def gather(self, index: int, part: Any) -> Any:
        workers = self._owner()._workers[:self.parties - 1]
        parts = [part] + [w.expect("gather") for w in workers]
        whole = np.concatenate(parts, axis=0)
        for w in workers:
            w.conn.send(("whole", whole))
        return whole


class _MemberGroup:
    """A worker's batch-norm layers' group: sends its rows to the leader, gets the whole back."""

    waits_for_members = True

    def __init__(self, conn: Connection):
        self.conn = conn
        self.parties = 0

    @property
    def is_open(self) -> bool:
        return self.parties > 1

    def gather(self, index: int, part: Any) -> Any:
        self.conn.send(("gather", np.ascontiguousarray(part)))
        message = self.conn.recv()
        if message[0] != "whole":
            raise _Aborted("the step was abandoned by the process that leads it")
        return message[1]


def _batch_norms(model: Module) -> list:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


# -- this process's side -------------------------------------------------------------------
class _Worker:
    """One worker process, its socket and its gradient block, with the request awaiting its
    last message (``pending``)."""

    def __init__(self, member: int, payload: bytes, layout: list, params: _Block):
        self.member = member
        self.grads = _Block(layout)
        here, there = socket.socketpair()
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        # the worker imports what this process imports: capsnet where it was found, and the
        # model's modules from this process's path (a script's folder, a test's root)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [root, *(os.path.abspath(p or os.curdir) for p in sys.path)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in path if os.path.isdir(p)))
        fds = (there.fileno(), params.fd, self.grads.fd)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "capsnet._worker", *map(str, fds)],
                                         pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
        finally:
            there.close()
            self.grads.close_fd()
        self.conn = Connection(here.detach())
        self.pending = False
        self.conn.send(("init", payload, layout, member))
        if not self.conn.poll(START_TIMEOUT):
            self.kill()
            raise WorkerError(f"replica process {member} did not start within {START_TIMEOUT:.0f} s")
        self.pending = True
        self.ready_rss_kb = self.expect("ready")  # its resident memory before any step (for benchmarks)

    def request(self, *message: Any) -> None:
        try:
            self.conn.send(message)
        except OSError as exc:
            raise self._ended() from exc
        self.pending = True

    def _recv(self) -> tuple:
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise self._ended() from exc

    def _ended(self) -> WorkerError:
        """The error for a worker whose socket closed: it ended (or is ending)."""
        self.pending = False
        try:
            code: Any = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = "still running"
        return WorkerError(f"replica process {self.member} ended (exit code {code}) in the middle of a call; "
                           "its error, if any, is on stderr above. The workers start afresh at the next call")

    def expect(self, kind: str) -> Any:
        """The next message, which must be ``kind`` (``"done"`` ends the request); an error
        reported by the worker is raised here."""
        message = self._recv()
        if message[0] == "error":
            self.pending = False
            exc, text = message[1], message[2]
            if isinstance(exc, BaseException) and not isinstance(exc, _Aborted):
                exc.add_note(f"raised in replica process {self.member}:\n{text}")
                raise exc
            raise WorkerError(f"replica process {self.member} failed:\n{text}")
        if message[0] != kind:
            raise WorkerError(f"replica process {self.member} sent {message[0]!r} where {kind!r} was expected")
        if kind in ("done", "ready"):
            self.pending = False
        return message[1] if len(message) > 1 else None

    def drain(self) -> None:
        """Abandon the pending request: tell the worker, then read up to its last message."""
        if not self.pending:
            return
        self.conn.send(("abort",))
        while self.pending:
            message = self._recv()
            if message[0] in ("done", "error"):
                self.pending = False

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(("close",))
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        finally:
            self.conn.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.close()
        except Exception:  # noqa: BLE001 - at exit: kill what does not close
            w.kill()
    workers.clear()


def _detached(model: Module) -> bytes:
    """The model pickled for a worker: no parameter or gradient data (the worker maps the
    shared blocks), no caches, no scratch, no thread replicas' shared holders."""
    placeholder = np.empty(0, dtype=np.float32)
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p.data)] = placeholder
        memo[id(p.grad)] = placeholder
    for m in model.modules():  # what a forward or a scratch holds is dropped, not copied
        memo[id(m._cache)] = None
    clone = copy.deepcopy(model, memo)
    clone.release()
    for bn in _batch_norms(clone):
        bn._group, bn._member = None, 0
    try:
        return pickle.dumps(clone, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"ProcessReplicas cannot send {type(model).__name__} to a worker process: {exc}. "
                        "Use thread replicas (CAPSNET_REPLICAS=threads)") from exc


class ProcessReplicas(ReplicaSet):
    """``model`` run by ``processes`` replicas, this process's and ``processes - 1`` worker
    processes', one slice of each batch each (see the module docstring). Answers what
    :class:`capsnet.replicas.Replicas` answers: ``replicas(*inputs)``, ``backward``,
    ``predict``, ``map``, ``train``, ``eval``, ``evaluating``, ``parameters``, ``release``,
    plus :meth:`close` (also done at exit). ``threads`` is the number of replicas."""

    kind = "processes"

    def __init__(self, model: Module, processes: int):
        if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
            raise ValueError(f"ProcessReplicas processes must be a positive integer, got {processes!r}")
        reason = split_reason(model, max(processes, 2)) or process_reason(model)
        if reason is not None:
            raise ValueError(f"ProcessReplicas cannot split this model: {reason}")
        self.model = model
        self.threads = processes
        self._params: _Block | None = None
        self._views: list = []
        self._workers: list[_Worker] = []
        self._group = _LeaderGroup(self)
        self._norms = _batch_norms(model)
        self._saved_groups = [(bn._group, bn._member) for bn in self._norms]
        self._slices: list[tuple[int, int]] | None = None
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    # -- the workers ----------------------------------------------------------------
    def _share_params(self) -> None:
        """The model's parameters as views of the shared block (moved there once; copied in
        again where an array was replaced)."""
        params = self.model.parameters()
        layout = _layout(params)
        if self._params is None:
            self._params = _Block(layout)
            self._views = self._params.arrays
        elif layout != self._params.layout:
            raise RuntimeError("the model's parameters changed shape or dtype since its replica processes were "
                               "made (Module.astype or a new layer?): build a new ProcessReplicas")
        for p, view in zip(params, self._views):
            if p.data is not view:
                view[...] = p.data
                p.data = view

    def _start(self, n: int) -> list[_Worker]:
        """The first ``n - 1`` workers, started if need be, with the weights shared."""
        self._share_params()
        ended = [w for w in self._workers if w.proc.poll() is not None]
        if ended:  # reported once; the next call starts them all afresh
            self._stop()
            raise WorkerError(f"replica process {ended[0].member} ended (exit code {ended[0].proc.returncode}) "
                              "between calls; the workers start afresh at the next call")
        if len(self._workers) < n - 1:
            payload = _detached(self.model)
            layout = self._params.layout
            try:
                while len(self._workers) < n - 1:
                    self._workers.append(_Worker(len(self._workers) + 1, payload, layout, self._params))
            except BaseException:
                self._stop()
                raise
        for bn in self._norms:
            bn._group, bn._member = self._group, 0
        return self._workers[:n - 1]

    def _stop(self) -> None:
        """End every worker (after a failure: the next call starts them afresh)."""
        _shutdown(self._workers)

    def close(self) -> None:
        """End the worker processes and give the batch-norm layers back their own groups.
        The model keeps its weights (still in the shared block, which stays mapped)."""
        self._stop()
        for bn, (group, member) in zip(self._norms, self._saved_groups):
            bn._group, bn._member = group, member
        self._group.parties = 0

    def _step(self, workers: list[_Worker], requests: list[tuple], mine: Callable[[], Any],
              parties: int = 0) -> list:
        """Send each worker its request, run ``mine`` here with BLAS on one thread, then
        collect the workers' results; on any failure the workers' requests are abandoned
        (a worker that cannot be brought back in step is ended)."""
        self._group.parties = parties
        try:
            for w, message in zip(workers, requests):
                w.request(*message)
            with blas_limit(1), threads(1):
                own = mine()
            return [own, *(w.expect("done") for w in workers)]
        except BaseException:
            try:
                for w in workers:
                    w.drain()
            except BaseException:
                self._stop()
            if any(w.proc.poll() is not None for w in workers):
                self._stop()
            raise

    # -- what a model answers ------------------------------------------------------
    @property
    def models(self) -> list[Module]:
        return [self.model]

    def release(self) -> "ProcessReplicas":
        """Drop every replica's caches and scratch (the workers keep running)."""
        self.model.release()
        self._slices = None
        workers = [w for w in self._workers if w.proc.poll() is None]
        if workers:
            self._step(workers, [("release",)] * len(workers), lambda: None)
        return self

    def forward(self, *inputs: Any) -> Any:
        """The model's forward on each slice of the batch (the first input's rows), joined."""
        rows = batch_rows(inputs)
        training = self.model.training
        slices = self._plan(rows, training)
        self._slices = None
        if len(slices) == 1:
            self._group.parties = 0
            out = self.model(*inputs)
            self._slices = slices if training else None
            return out
        workers = self._start(len(slices))
        buffers = [buf.data for _, buf in self.model.named_buffers()]
        total, base = (rows, 0) if (outer := current_batch_slice()) is None else (outer[0], outer[1])
        requests = [("forward", training, split_rows(inputs, rows, lo, hi), buffers, (total, base + lo, base + hi),
                     len(slices)) for lo, hi in slices[1:]]
        lo, hi = slices[0]

        def mine() -> Any:
            with batch_slice(total, base + lo, base + hi):
                return self.model(*split_rows(inputs, rows, lo, hi))
        results = self._step(workers, requests, mine, len(slices))
        outputs = [results[0]] + [out for out, _ in results[1:]]
        if training:
            self._average_buffers([theirs for _, theirs in results[1:]])
        self._slices = slices if training else None
        return join_rows(outputs, slices, "outputs")

    def backward(self, *grads: Any) -> Any:
        """The model's backward, slice by slice, with the workers' parameter gradients added
        into the model's; returns the input gradient joined (or None)."""
        slices = self._take_slices()
        if len(slices) == 1:
            return self.model.backward(*grads)
        rows = slices[-1][1]
        workers = self._workers[:len(slices) - 1]
        requests = [("backward", split_rows(grads, rows, lo, hi), len(slices)) for lo, hi in slices[1:]]
        lo, hi = slices[0]
        results = self._step(workers, requests, lambda: self.model.backward(*split_rows(grads, rows, lo, hi)),
                             len(slices))
        self._add_gradients([w.grads.arrays for w in workers], zero=False)  # each worker zeroes its own
        return join_rows(results, slices, "input gradients")

    def map(self, name: str, *args: Any) -> Any:
        """``model.<name>(*args)`` run slice by slice on the replicas and joined (for batch
        methods that keep no cache, such as ``predict``)."""
        rows = batch_rows(args)
        slices = self._plan(rows)
        if len(slices) == 1:
            return getattr(self.model, name)(*args)
        workers = self._start(len(slices))
        training = self.model.training
        buffers = [buf.data for _, buf in self.model.named_buffers()]
        requests = [("call", name, training, split_rows(args, rows, lo, hi), buffers) for lo, hi in slices[1:]]
        lo, hi = slices[0]
        results = self._step(workers, requests, lambda: getattr(self.model, name)(*split_rows(args, rows, lo, hi)))
        return join_rows(results, slices, f"{name} results")


# -- the worker's side ------------------------------------------------------------------------
def serve(sock_fd: int, params_fd: int, grads_fd: int) -> None:
    """A worker's life (``python -m capsnet._worker``): load the model sent, map the shared
    blocks, then answer requests until told to close or the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the leading process decides what Ctrl-C does
    conn = Connection(sock_fd)
    try:
        _, payload, layout, member = conn.recv()
    except EOFError:
        return
    try:
        model = pickle.loads(payload)
        params, grads = _Block(layout, params_fd), _Block(layout, grads_fd)
        params.close_fd()
        grads.close_fd()
        for p, data, grad in zip(model.parameters(), params.arrays, grads.arrays):
            p.data, p.grad = data, grad
        group = _MemberGroup(conn)
        for bn in _batch_norms(model):
            bn._group, bn._member = group, member
    except BaseException as exc:  # noqa: BLE001 - reported to the leading process
        _send_error(conn, exc)
        return
    conn.send(("ready", _rss_kb()))
    named = [buf for _, buf in model.named_buffers()]
    with blas_limit(1), threads(1):
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            op = message[0]
            if op == "abort":  # a step that had already ended here
                continue
            if op == "close":
                return
            try:
                if op == "forward":
                    _, training, args, buffers, rows, parties = message
                    if model.training != training:
                        model.train(training)
                    for buf, value in zip(named, buffers):
                        buf.data[...] = value
                    group.parties = parties if training else 0
                    with batch_slice(*rows):
                        out = model(*args)
                    result = (out, [buf.data for buf in named] if training else None)
                elif op == "backward":
                    _, grad_out, parties = message
                    for grad in grads.arrays:
                        grad[...] = 0
                    group.parties = parties
                    result = model.backward(*grad_out)
                elif op == "call":
                    _, name, training, args, buffers = message
                    if model.training != training:
                        model.train(training)
                    for buf, value in zip(named, buffers):
                        buf.data[...] = value
                    result = getattr(model, name)(*args)
                elif op == "release":
                    model.release()
                    result = None
                else:
                    raise ValueError(f"unknown request {op!r}")
            except BaseException as exc:  # noqa: BLE001 - reported to the leading process
                _send_error(conn, exc)
                continue
            conn.send(("done", result))


def _rss_kb() -> int | None:
    """This process's resident memory in kB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)
    except OSError:
        return None


def _send_error(conn: Connection, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    try:
        conn.send(("error", exc, text))
    except Exception:  # noqa: BLE001 - an exception that does not pickle travels as text
        conn.send(("error", None, text))
