"""Input checks whose verdict waits on the device until the next flush.

A check of array *values* (a label out of range) needs the values on the host. On
NumPy they are there, and the check raises at once. On CuPy, reading them back
would stop the GPU at every step, so the check counts the bad values on the
device instead (no synchronisation) and the count travels to the host with the
next transfer the caller makes anyway: the training loop's flush every
``log_every`` steps, the end of :func:`capsnet.training.evaluate`. Then
:func:`settle` raises, naming the check and how many values failed it.

    >>> counts = pending()            # device arrays, one per failing-able check
    >>> host = [int(c) for c in ...]  # brought back with the caller's own transfer
    >>> settle(host)                  # raises ValueError if any count is non-zero

:func:`raise_pending` does both, with one transfer of its own, for code that has
no flush of its own (a test, an interactive session).
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

from capsnet import backend

__all__ = ["clear", "count_out_of_range", "pending", "raise_pending", "settle"]


class _Pending(threading.local):
    def __init__(self):
        self.checks: dict[tuple, tuple[str, Any]] = {}  # key -> (message, device count)
        self.last: dict[tuple, Any] = {}  # bounds -> the array last checked against them


_state = _Pending()


def count_out_of_range(who: str, values: Any, low: int, high: int, what: str = "labels") -> None:
    """Refuse ``values`` outside ``[low, high)``: at once on NumPy, at the next flush on CuPy."""
    if values.size == 0:
        return
    message = f"{who} expected {what} in [{low}, {high})"
    if backend.backend_of(values) == "numpy":
        if values.min() < low or values.max() >= high:
            raise ValueError(f"{message}, got values from {values.min()} to {values.max()}")
        return
    if _state.last.get((low, high)) is values:  # the same labels, already checked by another layer
        return
    _state.last[(low, high)] = values
    xp = backend.get_array_module(values)
    bad = xp.count_nonzero((values < low) | (values >= high))
    key = (who, what, low, high, backend.device_key(values))
    previous = _state.checks.get(key)
    _state.checks[key] = (message, bad if previous is None else previous[1] + bad)


def pending() -> list[Any]:
    """The device counts of the checks made since the last :func:`settle`, in a fixed order
    (a caller brings them to the host with its own transfer and hands them to ``settle``)."""
    return [count for _, count in _state.checks.values()]


def settle(host_counts: Sequence[Any]) -> None:
    """Clear the pending checks; raise ``ValueError`` if any of their counts (host values,
    in :func:`pending`'s order) is non-zero."""
    messages = [message for message, _ in _state.checks.values()]
    _state.checks = {}
    failed = [f"{message}, got {int(n)} outside since the last check" for message, n in zip(messages, host_counts)
              if int(n)]
    if failed:
        raise ValueError("; ".join(failed) + " (on the GPU values are checked at each flush, not at once)")


def raise_pending() -> None:
    """Bring the pending counts to the host (one transfer) and :func:`settle` them."""
    counts = pending()
    if not counts:
        return
    xp = backend.get_array_module(counts[0])
    settle(backend.to_numpy(xp.stack(counts)).tolist())


def clear() -> None:
    """Drop the pending checks unread (what a test does between cases, or code that abandons
    a device)."""
    _state.checks = {}
    _state.last = {}
