"""The host allocator: keep freed memory for the next step instead of handing it back.

A training step allocates and frees the same arrays every step, most of them between 128 KB
and a few MB. glibc's malloc serves blocks above its mmap threshold (128 KB at first) with
fresh ``mmap`` pages and returns the top of its heap to the system once more than its trim
threshold is free, so those arrays come back as new pages every step, and the kernel zeroes
each page on its first touch. On the project's 2-core machine that was 2,600 to 4,600 page
faults per training step of the EM and Efficient-CapsNet networks at batch 16, and 590 per
batch-1 prediction of the EM network: a third of their time
(``scripts/bench_allocator.py`` measures it).

:func:`keep_freed_memory` sets three of glibc's ``mallopt`` parameters: blocks of up to
``mmap_threshold`` (32 MiB, glibc's largest) come from the heap; up to ``trim_threshold``
(512 MiB) of freed heap stays with the process; and each heap keeps ``top_pad`` (64 MiB) of
slack, without which a replica thread's arena (:mod:`capsnet.replicas`) hands back a whole
heap as soon as it is empty. ``import capsnet`` calls it once, unless

- ``CAPSNET_MALLOC=system`` is set (glibc's own behaviour is kept), or
- one of glibc's own variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
  ``MALLOC_TOP_PAD_``) is set: the user's choice wins.

The cost is memory held, not used: a process keeps up to its peak plus the trim threshold
in freed heap instead of returning it. Peak memory (``VmHWM``) does not grow. Anywhere but
glibc (macOS, Windows, musl) nothing is changed. :func:`state` says what was done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading
from typing import Any

__all__ = ["ENV", "GLIBC_VARIABLES", "MMAP_THRESHOLD", "TOP_PAD", "TRIM_THRESHOLD", "keep_freed_memory", "state"]

ENV = "CAPSNET_MALLOC"
"""The environment variable: ``system`` keeps glibc's defaults; unset or ``tuned`` applies them."""
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
"""glibc's own tuning variables: when any is set, capsnet leaves the allocator alone."""
MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size (glibc's largest allowed threshold on 64-bit) come from the heap."""
TRIM_THRESHOLD = 512 << 20
"""Freed heap kept by the process before glibc returns the top of it to the system."""
TOP_PAD = 64 << 20
"""Slack each heap keeps when it grows or shrinks (virtual until touched)."""

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_state: dict[str, Any] = {"applied": False, "reason": "not requested"}


def _glibc() -> Any | None:
    """The C library when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``), else None."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
        libc.mallopt  # noqa: B018 (present, or AttributeError)
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    libc._capsnet_glibc_version = version().decode()
    return libc


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD,
                      top_pad: int = TOP_PAD) -> bool:
    """Set glibc's mmap threshold, trim threshold and top pad (bytes) so freed arrays are
    reused, not remapped.

    Returns True when all three were set; False where the C library is not glibc or refused a
    value (:func:`state` says why). Process-wide and idempotent; any thread may call it.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold),
                        ("top_pad", top_pad)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
            raise ValueError(f"keep_freed_memory {name} must be an integer number of bytes in (0, 2**31), "
                             f"got {value!r}")
    with _lock:
        libc = _glibc()
        if libc is None:
            _state.update(applied=False, reason="the C library is not glibc: the allocator is left as it is")
            return False
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
              and libc.mallopt(_M_TOP_PAD, top_pad) == 1)
        _state.clear()
        _state.update(applied=ok, glibc=libc._capsnet_glibc_version, mmap_threshold=mmap_threshold,
                      trim_threshold=trim_threshold, top_pad=top_pad,
                      reason="set by capsnet.allocator" if ok else "glibc's mallopt refused a threshold")
        return ok


def _apply_default() -> None:
    """What ``import capsnet`` does: :func:`keep_freed_memory`, unless the environment says otherwise."""
    choice = os.environ.get(ENV, "tuned").strip().lower()
    if choice == "system":
        _state.update(applied=False, reason=f"{ENV}=system: glibc's defaults kept")
        return
    if choice not in ("", "tuned"):
        raise ValueError(f"{ENV} must be 'tuned' (the default) or 'system', got {os.environ[ENV]!r}")
    chosen = [name for name in GLIBC_VARIABLES if name in os.environ]
    if chosen:
        _state.update(applied=False, reason=f"{', '.join(chosen)} set in the environment: glibc reads it")
        return
    keep_freed_memory()


def state() -> dict[str, Any]:
    """What was done to the host allocator: ``applied`` (bool), ``reason``, and the thresholds
    and glibc version when set. Recorded by the benchmarks beside their figures."""
    with _lock:
        return dict(_state)
