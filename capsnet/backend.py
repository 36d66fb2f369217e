"""The one place that knows about CuPy.

Everything else asks this module for the array module (``xp``) of the arrays
at hand, or of the current backend when it allocates:

    >>> from capsnet import backend
    >>> backend.set_backend("numpy")
    >>> xp = backend.xp()                 # numpy
    >>> with backend.use("cupy"): ...     # scoped switch (needs a GPU)

CuPy is imported lazily and guarded, so the library imports and runs on
machines without it; asking for ``"cupy"`` there raises :class:`BackendError`
naming the package to install.

With the environment variable ``CAPSNET_EMULATE_CUPY=1`` (and only then), the
``"cupy"`` backend is an emulated device on the CPU
(:mod:`capsnet.testing.emulation`): strict where CuPy is strict, and counting
transfers, synchronisations and kernel launches. :func:`is_emulated` and
:func:`describe_device` say which one runs.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy

__all__ = [
    "BACKENDS",
    "EMULATE_ENV",
    "BackendError",
    "available_backends",
    "cupy_available",
    "describe_device",
    "device_key",
    "fused",
    "get_array_module",
    "get_backend",
    "installed_cupy",
    "is_emulated",
    "register_emulator",
    "rng",
    "set_backend",
    "to_device",
    "to_numpy",
    "use",
    "xp",
]

BACKENDS = ("numpy", "cupy")
EMULATE_ENV = "CAPSNET_EMULATE_CUPY"

_INSTALL_HINT = (
    "install CuPy for your CUDA version: pip install 'capsnet[cuda12]' "
    "(cupy-cuda12x) or pip install 'capsnet[cuda13]' (cupy-cuda13x)"
)


class BackendError(RuntimeError):
    """A backend was asked for that is unknown or cannot run here."""


_cupy: ModuleType | None = None
_cupy_error: str | None = None
_cupy_checked = False
_emulated = False
_emulator: Callable[[], ModuleType] | None = None
_lock = threading.Lock()
_state = threading.local()


def installed_cupy() -> ModuleType | None:
    """The real ``cupy`` package if it imports (a GPU need not be present), else None.

    For reading CuPy's API (the emulated device checks calls against it); arrays are
    made through :func:`xp` and :func:`to_device`, never through this."""
    try:
        import cupy  # noqa: PLC0415  (guarded, the only CuPy import)
    except Exception:
        return None
    return cupy


def _load_cupy() -> ModuleType | None:
    """Import CuPy once and check that a CUDA device really exists; or, when
    ``CAPSNET_EMULATE_CUPY=1``, load the emulated device instead."""
    global _cupy, _cupy_error, _cupy_checked, _emulated
    with _lock:
        if _cupy_checked:
            return _cupy
        _cupy_checked = True
        if os.environ.get(EMULATE_ENV) == "1":
            if _emulator is None:
                _cupy_error = (f"{EMULATE_ENV}=1 asks for the emulated device, but none is registered "
                               "(import capsnet.testing.emulation, which registers itself)")
                return None
            _cupy, _emulated = _emulator(), True
            return _cupy
        try:
            import cupy  # noqa: PLC0415  (guarded, the only CuPy import)
        except Exception as exc:  # ImportError, or a broken CUDA install
            _cupy_error = f"CuPy could not be imported ({type(exc).__name__}: {exc})"
            return None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            _cupy_error = f"CuPy is installed but CUDA reports no usable device ({exc})"
            return None
        if count < 1:
            _cupy_error = "CuPy is installed but no CUDA device is present"
            return None
        _cupy = cupy
        return cupy


def register_emulator(factory: Callable[[], ModuleType]) -> None:
    """Plug in the emulated device: ``factory()`` gives the module the ``cupy`` backend
    becomes under ``CAPSNET_EMULATE_CUPY=1``. :mod:`capsnet.testing.emulation` registers
    itself when imported (``import capsnet`` imports it under that variable), so this
    module never imports the test tool."""
    global _emulator
    _emulator = factory


def cupy_available() -> bool:
    """True when CuPy imports and at least one CUDA device is present."""
    return _load_cupy() is not None


def is_emulated() -> bool:
    """True when the ``cupy`` backend is the emulated device (``CAPSNET_EMULATE_CUPY=1``)."""
    _load_cupy()
    return _emulated


def describe_device(name: str | None = None) -> str:
    """A line for logs and run records: which device ``name`` (default: the current
    backend) runs on, saying plainly when it is the emulated one."""
    name = name or get_backend()
    if name == "numpy":
        return "numpy (CPU)"
    if is_emulated():
        return f"cupy, EMULATED on the CPU ({EMULATE_ENV}=1): no GPU runs"
    cupy = _module_for(name)
    return f"cupy on CUDA device {int(cupy.cuda.Device().id)}"


def available_backends() -> tuple[str, ...]:
    """The backends that can run on this machine, ``numpy`` always first."""
    return ("numpy", "cupy") if cupy_available() else ("numpy",)


def _module_for(name: str) -> ModuleType:
    if not isinstance(name, str) or name not in BACKENDS:
        raise BackendError(
            f"unknown backend {name!r}: expected one of {', '.join(map(repr, BACKENDS))}"
        )
    if name == "numpy":
        return numpy
    cupy = _load_cupy()
    if cupy is None:
        raise BackendError(f"the 'cupy' backend is not available: {_cupy_error}; {_INSTALL_HINT}")
    return cupy


def set_backend(name: str) -> None:
    """Make ``name`` ('numpy' or 'cupy') the backend for new arrays and modules."""
    _module_for(name)
    _state.name = name


def get_backend() -> str:
    """The name of the current backend ('numpy' unless set otherwise)."""
    return getattr(_state, "name", "numpy")


def xp() -> ModuleType:
    """The array module of the current backend (numpy or cupy)."""
    return _module_for(get_backend())


@contextlib.contextmanager
def use(name: str) -> Iterator[ModuleType]:
    """Switch the backend inside a ``with`` block; yields the array module."""
    module = _module_for(name)
    previous = get_backend()
    _state.name = name
    try:
        yield module
    finally:
        _state.name = previous


def _imported_cupy() -> ModuleType | None:
    """CuPy if anything in this process imported it (the library, or the user), else None.

    Asking ``sys.modules`` rather than :func:`_load_cupy` means recognising a CuPy
    array never depends on whether this module loaded CuPy first, and never
    imports it."""
    return _cupy or sys.modules.get("cupy")


def is_cupy_array(array: Any) -> bool:
    """True for a ``cupy.ndarray``, whoever imported CuPy."""
    cupy = _imported_cupy()
    return cupy is not None and isinstance(array, cupy.ndarray)


def get_array_module(*arrays: Any) -> ModuleType:
    """numpy or cupy, whichever the arrays live on.

    Raises :class:`BackendError` when NumPy and CuPy arrays are mixed, which
    would otherwise fail deep inside an operation or copy silently.
    """
    cupy = _imported_cupy()
    if cupy is None:  # nothing imported CuPy, so nothing can be a CuPy array
        return numpy
    on_gpu = [isinstance(a, cupy.ndarray) for a in arrays if a is not None]
    if any(on_gpu):
        if not all(on_gpu):
            kinds = ", ".join(type(a).__module__ + "." + type(a).__name__ for a in arrays if a is not None)
            raise BackendError(
                f"arrays on different backends were mixed ({kinds}): "
                "move them to one device first with capsnet.backend.to_device"
            )
        return cupy
    return numpy


def device_key(where: Any) -> tuple:
    """Which device an array lives on, or an array module allocates on now:
    ``("numpy",)`` or ``("cupy", device id)``. Memory kept for one device (a
    workspace, a cached spectrum, DFT tables) is no use on another, so caches
    key on this rather than on the array module alone."""
    if where is numpy or isinstance(where, numpy.ndarray):
        return ("numpy",)
    cupy = _imported_cupy()
    if cupy is not None:
        if where is cupy:
            return ("cupy", int(cupy.cuda.Device().id))
        if isinstance(where, cupy.ndarray):
            return ("cupy", int(where.device.id))
    if isinstance(where, ModuleType):
        raise BackendError(f"device_key expected numpy, cupy or an array of either, got module {where.__name__!r}")
    return ("numpy",)


def backend_of(array: Any) -> str:
    """'cupy' for a CuPy array, 'numpy' otherwise."""
    return "cupy" if is_cupy_array(array) else "numpy"


def to_device(array: Any, backend: str | None = None) -> Any:
    """Copy ``array`` to ``backend`` (default: the current one); no copy if it is there."""
    module = _module_for(backend or get_backend())
    if module is numpy:
        return to_numpy(array)
    return module.asarray(array)


def to_numpy(array: Any) -> numpy.ndarray:
    """A NumPy array holding ``array``'s values (copied from the GPU if needed)."""
    if is_cupy_array(array):
        return array.get()
    return numpy.asarray(array)


def rng(seed: int | None = None, backend: str | None = None) -> Any:
    """A seeded random generator on ``backend`` (default: the current one).

    NumPy gives ``numpy.random.Generator``; CuPy gives ``cupy.random.Generator``.
    Both offer ``standard_normal``, ``uniform``, ``integers`` and ``random``; CuPy's has
    no ``permutation``, ``choice`` or ``shuffle`` (draw those on the host).
    """
    module = _module_for(backend or get_backend())
    if module is numpy:
        return numpy.random.default_rng(seed)
    return module.random.default_rng(seed)


def synchronize(array: Any = None) -> None:
    """Wait for queued GPU work (no-op on NumPy); for timing and logging only."""
    cupy = _imported_cupy()
    if cupy is not None and (array is None or is_cupy_array(array)):
        cupy.cuda.get_current_stream().synchronize()


def fused(make: Any) -> Any:
    """One GPU kernel from backend-generic element-wise code.

    ``make(xp)`` returns a function written with ``xp``'s ufuncs and operators (in-place
    operators on its array arguments included, reductions at most at the end). On
    CuPy it is compiled once by ``cupy.fuse`` and runs as one kernel; on NumPy it runs
    as it is, one pass per operation. The arrays decide: ``fused(make)(a, b, 0.5)``
    runs on the device of ``a`` and ``b``."""
    compiled: dict[Any, Any] = {}

    def call(*args: Any) -> Any:
        module = get_array_module(*[a for a in args if hasattr(a, "shape")])
        function = compiled.get(module)
        if function is None:
            function = compiled[module] = make(module) if module is numpy else module.fuse(make(module))
        return function(*args)

    call.__name__ = getattr(make, "__name__", "fused")
    call.__doc__ = make.__doc__
    return call
