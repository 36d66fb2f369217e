"""An emulated CuPy: the ``cupy`` backend run on the CPU, strict where CuPy is strict.

No GPU has run this library's CuPy path, so this stands in for one. It is switched
on only by ``CAPSNET_EMULATE_CUPY=1`` (see :mod:`capsnet.backend`); then
``backend.set_backend("cupy")`` and ``--backend cupy`` run here, and the device
work is done by NumPy underneath. What it proves and what it cannot:

- **proves** dispatch (every array op reaches the array module of its inputs),
  the API (only names and keywords that the installed CuPy has, or the list in
  ``cupy_api.json`` where CuPy is absent), transfers (a device array never turns
  into a NumPy one implicitly: ``numpy.asarray(device_array)`` raises CuPy's
  ``TypeError``, a NumPy array in a device expression raises
  ``TypeError: Unsupported type <class 'numpy.ndarray'>``), and synchronisations
  (``float()``, ``int()``, ``bool()``, ``.item()``, ``.get()`` ... are counted with
  their call sites);
- **counts** each operation that would launch a kernel on a GPU (element-wise,
  reduction, matrix product, copy, fill, FFT, random, sort), one per call that
  writes device memory; a view (reshape, transpose, basic slicing, broadcast)
  launches nothing;
- **cannot prove** kernels, cuBLAS/cuFFT numerics, or speed: the arithmetic is
  NumPy's.

Its array type, :class:`ndarray`, holds a NumPy array but is not a subclass of
``numpy.ndarray``. Reductions and indexing give 0-d device arrays, as CuPy's do.

Counting::

    from capsnet.testing import device_counts
    with device_counts() as counts:
        step()
    counts.launches, counts.by_kind, counts.d2h, counts.syncs
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy

from capsnet import backend
from capsnet.testing.cupy_api import CupyApi, load_api

__all__ = ["DeviceCounts", "Event", "device_counts", "module", "ndarray"]

_IMPLICIT_CONVERSION = ("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

_HERE = os.path.dirname(os.path.abspath(__file__))
_NUMPY_DIR = os.path.dirname(os.path.abspath(numpy.__file__))


# --------------------------------------------------------------------------- counting

@dataclass(frozen=True)
class Event:
    """One counted transfer or synchronisation: what, how many bytes, where in the caller."""

    what: str
    nbytes: int
    site: str


@dataclass
class DeviceCounts:
    """What the device did while a :func:`device_counts` block ran.

    ``launches`` is the number of operations that would launch a kernel,
    ``by_kind`` and ``by_name`` break it down; ``d2h`` and ``h2d`` are the
    transfers, ``syncs`` the points where the host waited for the device (each
    device-to-host transfer is one, and so is an explicit stream synchronisation)."""

    by_kind: Counter = field(default_factory=Counter)
    by_name: Counter = field(default_factory=Counter)
    d2h: list[Event] = field(default_factory=list)
    h2d: list[Event] = field(default_factory=list)
    syncs: list[Event] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return sum(self.by_kind.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.by_kind.most_common())
        return (f"{self.launches} launches ({kinds}); {len(self.h2d)} host-to-device and "
                f"{len(self.d2h)} device-to-host transfers; {len(self.syncs)} synchronisations")


class _Recorder(threading.local):
    def __init__(self):
        self.active: list[DeviceCounts] = []
        self.fusing = 0


_rec = _Recorder()


@contextlib.contextmanager
def device_counts() -> Iterator[DeviceCounts]:
    """Count the emulated device's work inside a ``with`` block (blocks may nest)."""
    counts = DeviceCounts()
    _rec.active.append(counts)
    try:
        yield counts
    finally:
        _rec.active.remove(counts)


def _site() -> str:
    """file:line of the first caller outside this package and NumPy."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_HERE) and not path.startswith(_NUMPY_DIR) and "contextlib" not in path:
            return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _launch(kind: str, name: str, n: int = 1) -> None:
    if _rec.fusing or not _rec.active:
        return
    for counts in _rec.active:
        counts.by_kind[kind] += n
        counts.by_name[name] += n


def _transfer(direction: str, what: str, nbytes: int) -> None:
    if not _rec.active:
        return
    event = Event(what, int(nbytes), _site())
    for counts in _rec.active:
        (counts.d2h if direction == "d2h" else counts.h2d).append(event)
        if direction == "d2h":
            counts.syncs.append(event)


def _sync(what: str) -> None:
    if not _rec.active:
        return
    event = Event(what, 0, _site())
    for counts in _rec.active:
        counts.syncs.append(event)


# --------------------------------------------------------------------------- the API

_api: CupyApi | None = None


def api() -> CupyApi:
    """The reading of CuPy's API that calls are checked against."""
    global _api
    if _api is None:
        _api = load_api(backend.installed_cupy())
    return _api


def _check_keywords(qualified: str, signature: dict | None, args: tuple, kwargs: dict) -> None:
    if signature is None:
        return
    unknown = [k for k in kwargs if k not in signature["params"]]
    if unknown and not signature["varkw"]:
        raise TypeError(f"{qualified}() got an unexpected keyword argument {unknown[0]!r} "
                        f"(CuPy {api().version} takes {', '.join(signature['params']) or 'no keywords'}; "
                        "emulated device)")
    if len(args) > len(signature["params"]) and not signature["varargs"]:
        raise TypeError(f"{qualified}() takes at most {len(signature['params'])} positional arguments "
                        f"in CuPy {api().version}, {len(args)} given (emulated device)")


# --------------------------------------------------------------------------- the array

def _unsupported(value: Any) -> TypeError:
    return TypeError(f"Unsupported type {type(value)}")


def _root(array: Any) -> Any:
    while getattr(array, "base", None) is not None:
        array = array.base
    return array


def _unwrap(value: Any, *, host_ok: bool = False) -> Any:
    """Device arrays to their NumPy data; a NumPy array is refused as CuPy refuses it,
    unless ``host_ok`` (the value of ``asarray``, ``__setitem__`` ...: a transfer)."""
    if type(value) is ndarray:
        return value._a
    if isinstance(value, numpy.ndarray):
        if not host_ok:
            raise _unsupported(value)
        _transfer("h2d", "host array passed to the device", value.nbytes)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, host_ok=host_ok) for v in value)
    return value


def _wrap(value: Any) -> Any:
    if isinstance(value, numpy.ndarray):
        return ndarray._of(value)
    if isinstance(value, numpy.generic):
        return ndarray._of(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _device_inputs(values: Any) -> list[numpy.ndarray]:
    found = []
    for v in values:
        if type(v) is ndarray:
            found.append(v._a)
        elif isinstance(v, (list, tuple)):
            found.extend(_device_inputs(v))
    return found


def _is_view(result: Any, inputs: list[numpy.ndarray]) -> bool:
    if not isinstance(result, numpy.ndarray) or not inputs:
        return False
    root = _root(result)
    return any(root is _root(a) for a in inputs)


class ndarray:  # noqa: N801  (CuPy's name)
    """A device array of the emulated CuPy (its data is a NumPy array that only the
    emulation touches)."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the emulated device does not take memptr or strides")
        self._a = numpy.empty(shape, dtype=dtype, order=order)

    @classmethod
    def _of(cls, data: numpy.ndarray) -> "ndarray":
        out = object.__new__(cls)
        out._a = data
        return out

    # --- what CuPy refuses ---------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT_CONVERSION)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for value in list(inputs) + list(kwargs.get("out", ()) or ()):
            if isinstance(value, numpy.ndarray):
                raise _unsupported(value)
        if method != "__call__":
            return NotImplemented
        return _call_ufunc(ufunc.__name__, ufunc, inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        mod = func.__module__ or ""
        sub = next((s for s in ("fft", "linalg") if mod.endswith(s)), "")
        qualified = f"{sub}.{name}" if sub else name
        if not api().has(qualified):
            return NotImplemented
        return _namespace_call(qualified, args, kwargs)

    # --- host conversions: each one is a transfer and a synchronisation -------
    def _to_host(self, what: str) -> numpy.ndarray:
        if _rec.fusing:
            raise TypeError(f"{what} of a value inside cupy.fuse: a fused kernel cannot branch "
                            "on device values (emulated device)")
        _transfer("d2h", what, self._a.nbytes)
        return self._a

    def get(self, stream=None, order="C", out=None, blocking=True):
        data = self._to_host(".get()")
        if out is not None:
            out[...] = data
            return out
        return numpy.array(data, order=order)

    def set(self, arr, stream=None):
        if not isinstance(arr, numpy.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        _transfer("h2d", ".set()", arr.nbytes)
        self._a[...] = arr

    def item(self):
        return self._to_host(".item()").item()

    def tolist(self):
        return self._to_host(".tolist()").tolist()

    def __float__(self):
        return float(self._to_host("float()"))

    def __int__(self):
        return int(self._to_host("int()"))

    def __index__(self):
        return self._to_host("operator.index()").__index__()

    def __bool__(self):
        return bool(self._to_host("bool()"))

    def __complex__(self):
        return complex(self._to_host("complex()"))

    def __repr__(self):
        return repr(self._to_host("repr()"))

    def __str__(self):
        return str(self._to_host("str()"))

    def __format__(self, spec):
        return format(self._to_host("format()"), spec)

    def __reduce__(self):
        raise TypeError("the emulated device's arrays cannot be pickled: use .get() first")

    # --- attributes ------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._of(self._a.T))
    device = property(lambda self: _cuda.Device(0))

    @property
    def base(self):
        base = self._a.base
        return ndarray._of(base) if isinstance(base, numpy.ndarray) else None

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        for i in range(len(self._a)):
            yield ndarray._of(self._a[i])

    __hash__ = None  # type: ignore[assignment]

    # --- indexing ----------------------------------------------------------------
    def __getitem__(self, key):
        if _rec.fusing:
            raise TypeError("indexing inside cupy.fuse is not supported (emulated device)")
        host_key = _unwrap(key, host_ok=True)
        keys = host_key if isinstance(host_key, tuple) else (host_key,)
        if any(isinstance(k, numpy.ndarray) and k.dtype == bool for k in keys):
            _sync("boolean-mask indexing (the result's size depends on the data)")
        result = self._a[host_key]
        if isinstance(result, numpy.generic) and Ellipsis not in keys:
            result = self._a[keys + (Ellipsis,)]  # CuPy gives a 0-d view, not a scalar
        if not (isinstance(result, numpy.ndarray) and _root(result) is _root(self._a)):
            _launch("copy", "getitem")
        return _wrap(result)

    def __setitem__(self, key, value):
        if _rec.fusing:
            raise TypeError("indexed assignment inside cupy.fuse is not supported (emulated device)")
        self._a[_unwrap(key, host_ok=True)] = _unwrap(value, host_ok=True)
        _launch("fill" if numpy.isscalar(value) else "copy", "setitem")

    # --- methods: whatever CuPy's ndarray has, nothing more ----------------------
    def __getattr__(self, name):
        entry = api().member("ndarray", name) if not name.startswith("__") else None
        if entry is None:
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}' "
                                 f"(not in CuPy {api().version}; emulated device)")
        target = getattr(self._a, name)
        if entry["kind"] == "attribute":
            return _wrap(target)
        return functools.partial(_method_call, self, name, entry["signature"], target)


def _binary(ufunc: numpy.ufunc, reflected: bool = False, inplace: bool = False):
    def op(self, other):
        if isinstance(other, (numpy.ndarray, list, tuple)):
            raise _unsupported(other)
        if not (type(other) is ndarray or isinstance(other, (bool, int, float, complex, numpy.generic))):
            return NotImplemented
        if inplace:
            return _call_ufunc(ufunc.__name__, ufunc, (self, other), {"out": self})
        return _call_ufunc(ufunc.__name__, ufunc, (other, self) if reflected else (self, other), {})
    return op


def _unary(ufunc: numpy.ufunc):
    return lambda self: _call_ufunc(ufunc.__name__, ufunc, (self,), {})


for _name, _ufunc in {"add": numpy.add, "sub": numpy.subtract, "mul": numpy.multiply,
                      "truediv": numpy.true_divide, "floordiv": numpy.floor_divide, "mod": numpy.remainder,
                      "pow": numpy.power, "matmul": numpy.matmul, "and": numpy.bitwise_and,
                      "or": numpy.bitwise_or, "xor": numpy.bitwise_xor, "lshift": numpy.left_shift,
                      "rshift": numpy.right_shift}.items():
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", _binary(_ufunc, inplace=True))
for _name, _ufunc in {"eq": numpy.equal, "ne": numpy.not_equal, "lt": numpy.less, "le": numpy.less_equal,
                      "gt": numpy.greater, "ge": numpy.greater_equal}.items():
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in {"neg": numpy.negative, "pos": numpy.positive, "abs": numpy.absolute,
                      "invert": numpy.invert}.items():
    setattr(ndarray, f"__{_name}__", _unary(_ufunc))


def _method_call(array: ndarray, name: str, signature: dict | None, target: Callable, *args, **kwargs):
    _check_keywords(f"cupy.ndarray.{name}", signature, args, kwargs)
    if _rec.fusing and name not in _FUSABLE_METHODS:
        raise TypeError(f"ndarray.{name} inside cupy.fuse is not supported (emulated device)")
    out = kwargs.get("out")
    host_args = _unwrap(args)
    host_kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
    if name == "astype" and kwargs.get("copy", True) is False and numpy.dtype(args[0] if args else kwargs["dtype"]) == array.dtype:
        return array
    if name in ("reshape",) and "copy" in host_kwargs:
        host_kwargs.pop("copy")  # NumPy < 2.1 lacks it; the emulation decides views below
    result = target(*host_args, **host_kwargs)
    inputs = [array._a] + _device_inputs(args)
    if name == "fill" or out is not None:
        _launch(_kind(name), f"ndarray.{name}")
    elif not _is_view(result, inputs):
        _launch(_kind(name), f"ndarray.{name}")
    return _wrap(result) if result is not None else None


ndarray.__module__ = "cupy"  # messages and reprs name it as CuPy does


# --------------------------------------------------------------------------- the namespace

_REDUCTIONS = {"sum", "prod", "max", "min", "amax", "amin", "mean", "var", "std", "argmax", "argmin",
               "any", "all", "count_nonzero", "nansum", "nanmax", "nanmin", "nanmean", "cumsum", "cumprod",
               "allclose", "array_equal", "array_equiv", "norm", "ptp", "trace", "average", "median",
               "bincount", "histogram", "isclose"}
_MATMULS = {"matmul", "dot", "tensordot", "einsum", "inner", "outer", "vdot", "kron"}
_FILLS = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange", "linspace", "eye",
          "identity", "fill", "tri", "indices"}
_SORTS = {"sort", "argsort", "partition", "argpartition", "lexsort", "searchsorted"}
_ALLOCATIONS = {"empty", "empty_like", "ndarray"}
_HOST_RESULTS = {"shape", "ndim", "size", "isscalar", "result_type", "can_cast", "iscomplexobj",
                 "isrealobj", "may_share_memory", "shares_memory", "min_scalar_type", "promote_types",
                 "common_type", "iterable", "get_array_module", "asnumpy", "broadcast_shapes"}
_HOST_WRITERS = {"save", "savez", "savez_compressed", "savetxt", "array_repr", "array_str", "array2string"}
_DATA_DEPENDENT = {"nonzero", "argwhere", "flatnonzero", "unique", "extract", "compress"}
_FUSABLE_FUNCTIONS = {"sum", "prod", "max", "min", "amax", "amin", "where", "clip", "all", "any", "mean"}
_FUSABLE_METHODS = {"sum", "prod", "max", "min", "all", "any", "mean", "astype", "copy"}
_UFUNC_NAMES: set[str] = set()


def _kind(name: str) -> str:
    short = name.rsplit(".", 1)[-1]
    if short in _UFUNC_NAMES or short in ("where", "clip"):
        return "elementwise"
    if short in _REDUCTIONS:
        return "reduction"
    if short in _MATMULS or name.startswith("linalg."):
        return "matmul"
    if short in _FILLS:
        return "fill"
    if short in _SORTS:
        return "sort"
    if name.startswith("fft."):
        return "fft"
    if name.startswith("random."):
        return "random"
    return "copy"


def _call_ufunc(name: str, ufunc: numpy.ufunc, inputs: tuple, kwargs: dict) -> Any:
    for value in inputs:
        if isinstance(value, (list, tuple)) or isinstance(value, numpy.ndarray):
            raise _unsupported(value)
    host_kwargs = dict(kwargs)
    if "out" in host_kwargs:
        out = host_kwargs["out"]
        host_kwargs["out"] = tuple(_unwrap(o) for o in out) if isinstance(out, tuple) else _unwrap(out)
    result = ufunc(*(_unwrap(v) for v in inputs), **host_kwargs)
    _launch("matmul" if name in _MATMULS else "elementwise", name)
    if "out" in kwargs:
        out = kwargs["out"]
        return out[0] if isinstance(out, tuple) and len(out) == 1 else out
    return _wrap(result)


_MISSING = object()


def _numpy_target(qualified: str) -> Any:
    obj: Any = numpy
    for part in qualified.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _namespace_call(qualified: str, args: tuple, kwargs: dict) -> Any:
    special = _SPECIAL.get(qualified)
    if special is not None:
        return special(*args, **kwargs)
    _check_keywords(f"cupy.{qualified}", api().signature(qualified), args, kwargs)
    short = qualified.rsplit(".", 1)[-1]
    if _rec.fusing and short not in _UFUNC_NAMES and short not in _FUSABLE_FUNCTIONS:
        raise TypeError(f"cupy.{qualified} inside cupy.fuse is not supported (emulated device)")
    if short in _UFUNC_NAMES:
        return _call_ufunc(short, _numpy_target(qualified), args, kwargs)
    target = _numpy_target(qualified)
    if target is _MISSING:
        raise NotImplementedError(f"cupy.{qualified} exists in CuPy but the emulated device has no "
                                  "NumPy counterpart for it")
    inputs = _device_inputs(args) + _device_inputs(kwargs.values())
    host_kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
    result = target(*_unwrap(args), **host_kwargs)
    if short in _HOST_WRITERS:
        _transfer("d2h", f"cupy.{short}", sum(a.nbytes for a in inputs))
        return result
    if short in _DATA_DEPENDENT:
        _sync(f"cupy.{short} (the result's size depends on the data)")
    if short in _HOST_RESULTS:
        return result
    if "out" in kwargs and kwargs["out"] is not None:
        _launch(_kind(qualified), qualified)
        return kwargs["out"]
    if short not in _ALLOCATIONS and not _is_view(result, inputs):
        _launch(_kind(qualified), qualified, 2 if short == "pad" else 1)
    if isinstance(result, (bool, int, float, complex)) and inputs:
        result = numpy.asarray(result)  # CuPy answers with a 0-d device array
    return _wrap(result)


# --- the calls that are not NumPy's under another name

def _to_device(obj: Any, what: str, dtype, order, ndmin: int = 0) -> ndarray:
    """Host data (or a list holding device arrays) as a new device array."""
    if isinstance(obj, (list, tuple)) and _device_inputs(obj):
        _launch("copy", what)
        return ndarray._of(numpy.array(_unwrap(obj), dtype=dtype, order=order, ndmin=ndmin))
    data = numpy.array(obj, dtype=dtype, order=order, ndmin=ndmin)
    _transfer("h2d", what, data.nbytes)
    return ndarray._of(data)


def _asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    if type(a) is ndarray:
        if (dtype is None or numpy.dtype(dtype) == a.dtype) and not copy:
            return a
        _launch("copy", "asarray")
        return ndarray._of(numpy.array(a._a, dtype=dtype, order=order or "K"))
    return _to_device(a, "cupy.asarray", dtype, order or "K")


def _array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if type(obj) is ndarray:
        _launch("copy", "array")
        return ndarray._of(numpy.array(obj._a, dtype=dtype, copy=True, order=order, ndmin=ndmin))
    return _to_device(obj, "cupy.array", dtype, order, ndmin)


def _asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if type(a) is ndarray:
        return a.get(order=order, out=out)
    return numpy.asarray(a, order=order)


def _get_array_module(*args):
    return _module if any(type(a) is ndarray for a in args) else numpy


class _Fused:
    """``cupy.fuse``: the function runs as one kernel; the emulation runs it on NumPy
    with counting suspended, counts one launch, and refuses inside it what a fused
    kernel cannot do (indexing, matrix products, reading values back)."""

    def __init__(self, func: Callable, kernel_name: str | None):
        self._func = func
        functools.update_wrapper(self, func)
        self.__name__ = kernel_name or func.__name__  # the launch is counted under this name

    def __call__(self, *args):
        for value in args:
            if isinstance(value, numpy.ndarray):
                raise _unsupported(value)
        _rec.fusing += 1
        try:
            result = self._func(*args)
        finally:
            _rec.fusing -= 1
        _launch("fused", f"fuse:{self.__name__}")
        return result


def _fuse(*args, kernel_name=None):
    if args and callable(args[0]):
        return _Fused(args[0], kernel_name)
    return lambda func: _Fused(func, kernel_name)


def _as_strided(x, shape=None, strides=None):
    if type(x) is not ndarray:
        raise _unsupported(x)
    return ndarray._of(numpy.lib.stride_tricks.as_strided(x._a, shape=shape, strides=strides))


_SPECIAL: dict[str, Callable] = {
    "asarray": _asarray,
    "array": _array,
    "asnumpy": _asnumpy,
    "get_array_module": _get_array_module,
    "fuse": _fuse,
    "lib.stride_tricks.as_strided": _as_strided,
}


# --------------------------------------------------------------------------- random

class Generator:
    """``cupy.random.Generator``: only the methods CuPy's has, with its keywords."""

    def __init__(self, seed=None):
        self._g = numpy.random.default_rng(seed)

    def __getattr__(self, name):
        entry = api().member("random.Generator", name) if not name.startswith("_") else None
        if entry is None or entry["kind"] != "method":
            raise AttributeError(f"'cupy.random.Generator' object has no attribute '{name}' "
                                 f"(not in CuPy {api().version}; emulated device)")
        return functools.partial(self._draw, name, entry["signature"])

    def _draw(self, name, signature, *args, **kwargs):
        _check_keywords(f"cupy.random.Generator.{name}", signature, args, kwargs)
        method = getattr(self._g, name)
        accepted = inspect.signature(method).parameters if _has_signature(method) else {}
        dtype = kwargs.pop("dtype", None) if "dtype" not in accepted else None
        out = kwargs.get("out")
        kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
        result = method(*_unwrap(args), **kwargs)
        if dtype is not None:
            result = numpy.asarray(result).astype(dtype, copy=False)
        _launch("random", f"random.Generator.{name}")
        return out if out is not None else _wrap(numpy.asarray(result))


def _has_signature(func) -> bool:
    try:
        inspect.signature(func)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- cuda

class _Stream:
    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.null = null

    def synchronize(self):
        _sync("Stream.synchronize()")

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Device:
    def __init__(self, device=None):
        self.id = int(device or 0)
        if self.id != 0:
            raise RuntimeError(f"the emulated device has one GPU (id 0), asked for {self.id}")

    def use(self):
        return None

    def synchronize(self):
        _sync("Device.synchronize()")

    compute_capability = property(lambda self: "90")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    def __hash__(self):
        return hash(("emulated-device", self.id))

    def __repr__(self):
        return f"<CUDA Device {self.id} (emulated)>"


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        return None


_null_stream = _Stream(null=True)
_cuda = types.SimpleNamespace(
    Device=_Device,
    Stream=_Stream,
    get_current_stream=lambda device=None: _null_stream,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
    MemoryPool=_MemoryPool,
)
_pool = _MemoryPool()


# --------------------------------------------------------------------------- the module

class _Namespace(types.ModuleType):
    """A CuPy namespace (``cupy``, ``cupy.fft`` ...): a name resolves only if CuPy has it."""

    def __init__(self, name: str, prefix: str, extra: dict | None = None):
        super().__init__(name)
        self._prefix = prefix
        for key, value in (extra or {}).items():
            setattr(self, key, value)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_prefix":
            raise AttributeError(name)
        qualified = f"{self._prefix}{name}"
        kind = api().kind(qualified)
        if kind is None:
            raise AttributeError(f"module '{self.__name__}' has no attribute '{name}' "
                                 f"(not in CuPy {api().version}; emulated device)")
        if kind in ("value", "class"):
            target = _numpy_target(qualified)
            if target is _MISSING:
                raise AttributeError(f"cupy.{qualified} exists in CuPy but is not emulated")
            return target
        def func(*args, **kwargs):
            return _namespace_call(qualified, args, kwargs)

        func.__name__ = func.__qualname__ = name
        func.__module__ = self.__name__
        setattr(self, name, func)  # resolved once; later look-ups find it directly
        return func


def _build() -> _Namespace:
    for qualified in api().names_in(""):
        if api().kind(qualified) == "ufunc":
            _UFUNC_NAMES.add(qualified)
    random_ns = _Namespace("cupy.random", "random.", {"Generator": Generator,
                                                      "default_rng": lambda seed=None: Generator(seed)})
    stride_tricks = _Namespace("cupy.lib.stride_tricks", "lib.stride_tricks.")
    lib = types.ModuleType("cupy.lib")
    lib.stride_tricks = stride_tricks  # type: ignore[attr-defined]
    top = _Namespace("cupy", "", {
        "ndarray": ndarray,
        "cuda": _cuda,
        "random": random_ns,
        "fft": _Namespace("cupy.fft", "fft."),
        "linalg": _Namespace("cupy.linalg", "linalg."),
        "lib": lib,
        "get_default_memory_pool": lambda: _pool,
        "get_default_pinned_memory_pool": lambda: _pool,
        "__version__": api().version,
        "emulated": True,
    })
    return top


_module: _Namespace | None = None
_module_lock = threading.Lock()


def module() -> _Namespace:
    """The emulated ``cupy`` module (one per process)."""
    global _module
    with _module_lock:
        if _module is None:
            _module = _build()
    return _module


backend.register_emulator(module)  # a plug-in: the backend never imports this module
