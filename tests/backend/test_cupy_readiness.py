"""CuPy readiness on a machine without a GPU: the library's CuPy calls exist in the
installed CuPy, and asking for the cupy backend without a device gives our own error.

Skipped where CuPy is not installed (``pip install 'capsnet[cuda13]'`` installs it;
it imports without a GPU). The GPU cases of the rest of the suite run the code itself."""
from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from capsnet import backend


pytestmark = pytest.mark.skipif(importlib.util.find_spec("cupy") is None,
                                reason="CuPy is not installed (pip install 'capsnet[cuda13]' or '[cuda12]')")


ROOT = Path(__file__).resolve().parents[2] / "capsnet"


# What the library reaches through an array module: ``xp.name(.name...)``, ``xp().name``,
# ``get_array_module(...).name`` and, in backend.py, ``module.name`` / ``cupy.name``.
PATTERNS = [
    re.compile(r"\bxp\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"),
    re.compile(r"\bxp\(\)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"),
    re.compile(r"get_array_module\([^()]*\)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"),
]


BACKEND_PATTERNS = [re.compile(r"\b(?:module|cupy)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")]


def _code_lines(path: Path):
    """Source lines without comments and without docstring text."""
    in_doc = False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        quotes = stripped.count('"""')
        if in_doc:
            if quotes:
                in_doc = False
            continue
        if stripped.startswith('"""'):
            in_doc = quotes == 1
            continue
        yield line.split("#")[0]


def used_names() -> dict[str, list[str]]:
    """Each attribute chain the library takes from an array module, with where."""
    found: dict[str, list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        patterns = PATTERNS + (BACKEND_PATTERNS if path.name == "backend.py" else [])
        for number, line in enumerate(_code_lines(path), 1):
            for pattern in patterns:
                for chain in pattern.findall(line):
                    found.setdefault(chain, []).append(f"{path.relative_to(ROOT)}:{number}")
    return found


def test_the_scan_finds_what_the_library_uses():
    names = used_names()
    # a few that must be there, or the scan is broken
    for chain in ("matmul", "lib.stride_tricks.as_strided", "zeros", "random.default_rng", "cuda.Device",
                  "cuda.runtime.getDeviceCount", "ndarray"):
        assert chain in names, (chain, sorted(names))


def test_every_array_module_call_of_the_library_exists_in_the_installed_cupy():
    import cupy

    missing = []
    for chain, where in sorted(used_names().items()):
        obj = cupy
        for part in chain.split("."):
            if not hasattr(obj, part):
                missing.append(f"cupy.{chain} (used at {', '.join(where[:3])})")
                break
            obj = getattr(obj, part)
    assert missing == [], f"CuPy {cupy.__version__} lacks: " + "; ".join(missing)


def test_asking_for_cupy_without_a_device_gives_the_library_error():
    if backend.cupy_available():
        pytest.skip(f"the cupy backend works here: {backend.describe_device('cupy')}")
    with pytest.raises(backend.BackendError) as info:
        backend.set_backend("cupy")
    message = str(info.value)
    assert "the 'cupy' backend is not available" in message
    assert "no usable device" in message or "no CUDA device" in message
    assert backend.get_backend() == "numpy"
    assert backend.available_backends() == ("numpy",)


def test_only_backend_py_mentions_cupy_in_code():
    """backend.py alone imports CuPy; the emulated CuPy (capsnet/testing) names CuPy's API
    in its messages but imports nothing of it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "capsnet"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "backend.py":
            continue
        emulation = path.parent.name == "testing"
        for line in path.read_text().splitlines():
            code = line.split("#")[0]
            pattern = r"import cupy|from cupy" if emulation else r"import cupy|xp\.cuda\b|\bcupy\.[A-Za-z_]"
            if re.search(pattern, code):
                offenders.append(f"{path.relative_to(root)}: {line.strip()}")
    assert offenders == []
