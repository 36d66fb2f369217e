"""capsnet.backend: choosing a backend by name, the error without a GPU, mixing arrays of
the two backends, device keys, and recognising CuPy arrays whoever imported CuPy."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from capsnet import backend
from capsnet.gradcheck import check_module
from capsnet.layers import Linear


F64 = "float64"


def test_unknown_backend_name():
    with pytest.raises(backend.BackendError) as info:
        backend.set_backend("tpu")
    message = str(info.value)
    assert "'tpu'" in message and "'numpy'" in message and "'cupy'" in message
    assert backend.get_backend() == "numpy"


@pytest.mark.skipif(backend.cupy_available(), reason="a GPU is present: the cupy backend works here")
def test_cupy_without_gpu_names_the_package():
    with pytest.raises(backend.BackendError, match="cupy-cuda12x"):
        backend.set_backend("cupy")
    with pytest.raises(backend.BackendError, match="cupy-cuda12x"):
        backend.to_device(np.zeros(3), "cupy")
    assert backend.get_backend() == "numpy"
    assert backend.available_backends() == ("numpy",)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cupy_available(), reason="needs CuPy and a CUDA device")
def test_mixing_numpy_and_cupy_arrays_raises():
    on_gpu = backend.to_device(np.zeros(3), "cupy")
    with pytest.raises(backend.BackendError, match="numpy.*cupy|cupy.*numpy"):
        backend.get_array_module(np.zeros(3), on_gpu)
    layer = Linear(3, 2, dtype=F64, seed=0).to("cupy")
    with pytest.raises(backend.BackendError, match="to_device"):
        layer.forward(np.zeros((2, 3)))
    with pytest.raises(backend.BackendError):
        check_module(Linear(3, 2, dtype=F64, seed=0), np.zeros((2, 3)), on_gpu)


def test_device_key_names_backend_and_device(xp):
    key = backend.device_key(xp.zeros(3))
    assert key == backend.device_key(xp)
    assert key[0] == xp.__name__
    with pytest.raises(backend.BackendError, match="device_key expected"):
        backend.device_key(json)


def test_cupy_arrays_are_recognised_whoever_imported_cupy(monkeypatch):
    """is_cupy_array asks sys.modules, so it does not depend on the backend having loaded
    CuPy first (a stand-in module plays CuPy here)."""
    fake = types.ModuleType("cupy")

    class ndarray:  # noqa: N801 - CuPy's name
        pass

    fake.ndarray = ndarray
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert backend.is_cupy_array(ndarray())
    assert not backend.is_cupy_array(np.zeros(2))
    assert backend.get_array_module(ndarray()) is fake
    with pytest.raises(backend.BackendError, match="different backends"):
        backend.get_array_module(ndarray(), np.zeros(2))
