"""The emulated CuPy (capsnet.testing.emulation): strict where CuPy is strict, and counting.

These run in every suite run: they use the emulated module directly, whatever
CAPSNET_EMULATE_CUPY says. With CAPSNET_EMULATE_CUPY=1 the rest of the suite's
CuPy cases run on it too.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capsnet import backend, checks
from capsnet.testing import device_counts
from capsnet.testing import emulation
from capsnet.testing.cupy_api import API_FILE, load_api, read_installed_cupy

HERE = Path(__file__).resolve()
IMPLICIT = "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."


@pytest.fixture
def cp():
    return emulation.module()


def test_the_array_is_no_numpy_array_and_converts_only_explicitly(cp):
    a = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert isinstance(a, cp.ndarray) and not isinstance(a, np.ndarray)
    assert not issubclass(cp.ndarray, np.ndarray)
    assert f"{type(a).__module__}.{type(a).__name__}" == "cupy.ndarray"
    for implicit in (np.asarray, np.array, np.asanyarray, lambda x: np.zeros((2, 3), np.float32) + x.__array__()):
        with pytest.raises(TypeError) as info:
            implicit(a)
        assert str(info.value) == IMPLICIT
    np.testing.assert_array_equal(a.get(), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(cp.asnumpy(a), np.arange(6).reshape(2, 3))
    with device_counts() as counts:
        np.savez(io.BytesIO(), w=a)  # dispatches to cupy.savez, which copies to the host: counted
    assert [e.what for e in counts.d2h] == ["cupy.savez"]


def test_a_numpy_array_in_a_device_expression_is_refused_as_cupy_refuses_it(cp):
    a = cp.ones(3, dtype=cp.float32)
    host = np.ones(3, dtype=np.float32)
    for mixed in (lambda: a + host, lambda: host + a, lambda: a * host, lambda: cp.add(a, host),
                  lambda: cp.maximum(host, a), lambda: cp.stack([a, host]), lambda: cp.matmul(a, host),
                  lambda: np.concatenate([host, a]), lambda: a + np.float32(1) * np.ones(1)):
        with pytest.raises(TypeError, match=r"^Unsupported type <class 'numpy\.ndarray'>$"):
            mixed()
    with pytest.raises(TypeError, match="Unsupported type <class 'list'>"):
        cp.add(a, [1.0, 2.0, 3.0])
    a += np.float32(2)  # NumPy scalars and Python numbers are fine, as in CuPy
    assert float(a[0]) == 3.0


def test_scalars_and_dtypes_behave_as_in_cupy(cp):
    a = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    total = a.sum()
    assert isinstance(total, cp.ndarray) and total.shape == ()  # a 0-d device array, not a scalar
    assert isinstance(a[1, 2], cp.ndarray) and a[1, 2].shape == ()
    assert isinstance(cp.sum(a), cp.ndarray) and isinstance(np.sum(a), cp.ndarray)
    assert isinstance(cp.array_equal(a, a), cp.ndarray)  # CuPy answers on the device
    assert (a * 2.0).dtype == np.float32 and (a + 1).dtype == np.float32
    assert cp.float32 is np.float32 and cp.dtype("float64") == np.float64
    assert isinstance(np.exp(a), cp.ndarray)  # NumPy's ufuncs dispatch to the device, as in CuPy
    assert float(total) == 15.0 and int(a[1, 2]) == 5 and bool(a[0, 1]) and a[0, 2].item() == 2.0
    with pytest.raises(TypeError, match="unhashable"):
        hash(a)


def test_only_cupys_api_exists(cp):
    a = cp.zeros((2, 3), dtype=cp.float32)
    with pytest.raises(AttributeError, match="'cupy.random.Generator' object has no attribute 'permutation'"):
        cp.random.default_rng(0).permutation(5)  # NumPy's Generator has it, CuPy's does not
    with pytest.raises(TypeError, match=r"cupy.sum\(\) got an unexpected keyword argument 'initial'"):
        cp.sum(a, initial=0.0)  # a NumPy-only keyword
    with pytest.raises(TypeError, match="unexpected keyword argument 'where'"):
        a.sum(where=a > 0)
    with pytest.raises(AttributeError, match="module 'cupy' has no attribute 'insert'"):
        cp.insert(a, 0, 1.0)  # a NumPy-only function
    with pytest.raises(AttributeError, match="'cupy.ndarray' object has no attribute 'itemset'"):
        a.itemset(0, 1.0)
    drawn = cp.random.default_rng(0).uniform(0, 1, size=(4,), dtype=cp.float32)  # a CuPy-only keyword
    assert drawn.dtype == np.float32 and isinstance(drawn, cp.ndarray)


def test_transfers_and_synchronisations_are_counted_with_their_call_sites(cp):
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    with device_counts() as counts:
        a = cp.asarray(host)
        same = cp.asarray(a)  # already on the device: no transfer
        a.get()
        cp.asnumpy(a)
        float(a[0, 0])
        int(a[0, 1])
        bool(a[0, 2])
        a[1, 1].item()
        a.tolist()
        cp.cuda.get_current_stream().synchronize()
    assert same is a
    assert [e.nbytes for e in counts.h2d] == [host.nbytes]
    assert [e.what for e in counts.d2h] == [".get()", ".get()", "float()", "int()", "bool()", ".item()", ".tolist()"]
    assert len(counts.syncs) == len(counts.d2h) + 1
    assert all(str(HERE) in e.site for e in counts.h2d + counts.d2h + counts.syncs), counts.syncs


def test_a_boolean_mask_synchronises_as_the_size_depends_on_the_data(cp):
    a = cp.asarray(np.arange(5.0))
    with device_counts() as counts:
        picked = a[a > 2]
    assert picked.shape == (2,)
    assert len(counts.syncs) == 1 and "boolean-mask" in counts.syncs[0].what


def test_launches_are_counted_and_views_launch_nothing(cp):
    a = cp.asarray(np.ones((4, 6), dtype=np.float32))
    with device_counts() as counts:
        b = a * 2 + 1  # two element-wise kernels
        a.sum(axis=0)  # a reduction
        cp.matmul(a, a.T)  # a matrix product (the transpose is a view)
        cp.zeros((3,))  # a fill
        cp.empty((3,))  # an allocation launches nothing
        a.reshape(6, 4)
        a[1:3, ::2]
        cp.broadcast_to(a[:1], (4, 6))
        a.T.copy()  # a copy
        b[0] = 5.0  # a fill of a slice
    assert counts.by_kind == {"elementwise": 2, "reduction": 1, "matmul": 1, "fill": 2, "copy": 1}
    assert counts.launches == 7 and counts.d2h == [] and counts.syncs == []


def test_a_fused_function_is_one_launch_and_refuses_what_a_kernel_cannot_do(cp):
    @cp.fuse()
    def axpy(a, x, y):
        y += a * x
        return y * y

    x, y = cp.ones(5, dtype=cp.float32), cp.full(5, 2.0, dtype=cp.float32)
    with device_counts() as counts:
        out = axpy(np.float32(3.0), x, y)
    assert counts.by_kind == {"fused": 1} and counts.by_name == {"fuse:axpy": 1}
    named = cp.fuse(kernel_name="saxpy")(lambda a, x: a * x)
    with device_counts() as counts:
        named(np.float32(2.0), x)
    assert counts.by_name == {"fuse:saxpy": 1}
    np.testing.assert_array_equal(y.get(), np.full(5, 5.0))
    np.testing.assert_array_equal(out.get(), np.full(5, 25.0))

    @cp.fuse()
    def branches(x):
        return x if float(x.sum()) > 0 else -x

    with pytest.raises(TypeError, match="inside cupy.fuse"):
        branches(x)

    @cp.fuse()
    def gathers(x):
        return x[1:]

    with pytest.raises(TypeError, match="inside cupy.fuse"):
        gathers(x)
    with pytest.raises(TypeError, match="Unsupported type"):
        axpy(np.float32(1), np.ones(5, np.float32), y)


def test_the_backend_recognises_the_emulated_arrays(cp, monkeypatch):
    monkeypatch.setattr(backend, "_cupy", cp)
    a = cp.zeros(3)
    assert backend.is_cupy_array(a) and backend.get_array_module(a) is cp
    with pytest.raises(backend.BackendError, match="different backends"):
        backend.get_array_module(a, np.zeros(3))
    np.testing.assert_array_equal(backend.to_numpy(a), np.zeros(3))


def test_the_api_list_names_its_cupy_and_matches_the_installed_one():
    data = json.loads(API_FILE.read_text())
    assert data["cupy_version"] and len(data["names"]) > 300
    assert data["classes"]["random.Generator"].keys() >= {"standard_normal", "integers", "uniform", "random"}
    assert "permutation" not in data["classes"]["random.Generator"]
    cupy = backend.installed_cupy()
    if cupy is None:
        pytest.skip("CuPy is not installed: the list stands in for it (pip install 'capsnet[cuda13]')")
    if cupy.__version__ != data["cupy_version"]:
        pytest.skip(f"the list was read from CuPy {data['cupy_version']}, {cupy.__version__} is installed: "
                    "rerun python scripts/cupy_api_list.py")
    assert read_installed_cupy(cupy) == data
    assert load_api(None).data == data


def _emulated_in(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != backend.EMULATE_ENV}
    if env_value is not None:
        env[backend.EMULATE_ENV] = env_value
    code = ("from capsnet import backend\n"
            "try:\n    backend.set_backend('cupy'); print(backend.describe_device())\n"
            "except backend.BackendError as e:\n    print('refused:', e)\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.skipif(backend.cupy_available() and not backend.is_emulated(), reason="a real GPU is present")
def test_emulation_switches_on_only_with_the_variable_set_to_1():
    assert "EMULATED on the CPU" in _emulated_in("1")
    for value in (None, "0", "true", ""):
        out = _emulated_in(value)
        assert "EMULATED" not in out and out.startswith("refused:"), (value, out)


def test_a_label_out_of_range_on_the_device_is_raised_at_the_next_flush(cp, monkeypatch):
    from capsnet.layers import MarginLoss

    monkeypatch.setattr(backend, "_cupy", cp)
    checks.clear()  # nothing left over from another test
    lengths = cp.asarray(np.full((2, 10), 0.5))
    with device_counts() as counts:
        MarginLoss()(lengths, cp.asarray(np.array([3, 12])))  # no error yet: no sync either
    assert counts.syncs == []
    with pytest.raises(ValueError, match=r"MarginLoss expected labels in \[0, 10\), got 1 outside"):
        checks.raise_pending()
    checks.raise_pending()  # settled: nothing pending any more
    MarginLoss()(lengths, cp.asarray(np.array([3, 9])))
    checks.raise_pending()


def test_the_emulated_device_is_a_plug_in_the_backend_never_imports(monkeypatch):
    """capsnet.backend knows the emulated device only through register_emulator (the
    emulation registers itself on import): with none registered, the variable alone is
    refused with a message that says what is missing."""
    monkeypatch.setenv(backend.EMULATE_ENV, "1")
    for name, value in (("_emulator", None), ("_cupy", None), ("_cupy_error", None), ("_cupy_checked", False),
                        ("_emulated", False)):
        monkeypatch.setattr(backend, name, value)
    assert not backend.cupy_available()
    with pytest.raises(backend.BackendError, match="none is registered"):
        backend.set_backend("cupy")
    from capsnet.testing import emulation

    monkeypatch.setattr(backend, "_cupy_checked", False)
    backend.register_emulator(emulation.module)
    assert backend.cupy_available() and backend.is_emulated()
