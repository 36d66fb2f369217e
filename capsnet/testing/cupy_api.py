"""What CuPy's API holds, as the emulated device checks calls against it.

The emulation (:mod:`capsnet.testing.emulation`) lets a call through only when the
name exists in CuPy and every keyword it is given is one that CuPy's function
takes. That knowledge comes from the installed CuPy when one is importable (its
signatures, or for Cython functions and ufuncs the signature line that opens
their docstring), and otherwise from ``cupy_api.json`` beside this file, which
``python scripts/cupy_api_list.py`` reads from an installed CuPy and which names
that CuPy's version.

A signature is kept as ``{"params": [...], "varargs": bool, "varkw": bool}``;
``None`` stands for a name that exists but whose parameters CuPy does not expose.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["API_FILE", "CupyApi", "load_api", "read_installed_cupy"]

API_FILE = Path(__file__).with_name("cupy_api.json")
"""The API list kept beside the emulation, read from an installed CuPy (it names the version)."""

# The namespaces the emulation serves; each is read whole from CuPy.
MODULES = ("", "fft", "linalg", "random", "lib.stride_tricks")
CLASSES = {"ndarray": "ndarray", "random.Generator": "random.Generator"}

_DOC_SIGNATURE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+)\((.*)\)")


def _split_params(text: str) -> list[str]:
    """Top-level comma split of a parameter list (defaults may hold brackets)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _from_doc_line(obj: Any) -> dict | None:
    """The signature a Cython function or ufunc states on its docstring's first line."""
    doc = getattr(obj, "__doc__", None) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    match = _DOC_SIGNATURE.match(first)
    if not match:
        return None
    params, varargs, varkw = [], False, False
    for raw in _split_params(match.group(2).replace("\\*", "*")):
        name = raw.split("=")[0].split(":")[0].strip()
        name = name.split()[-1] if name.split() else name  # "Py_ssize_t axis1" -> "axis1"
        if name in ("/", "*", "self"):
            continue
        if name.startswith("**"):
            varkw = True
        elif name.startswith("*"):
            varargs = True
        elif name.isidentifier():
            params.append(name)
    return {"params": params, "varargs": varargs, "varkw": varkw}


def _signature(obj: Any) -> dict | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return _from_doc_line(obj)
    params, varargs, varkw = [], False, False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.VAR_POSITIONAL:
            varargs = True
        elif p.kind is p.VAR_KEYWORD:
            varkw = True
        else:
            params.append(p.name)
    if varargs and varkw and not params:  # (*args, **kwargs): says nothing; try the docstring
        return _from_doc_line(obj) or {"params": [], "varargs": True, "varkw": True}
    return {"params": params, "varargs": varargs, "varkw": varkw}


def _resolve(root: Any, dotted: str) -> Any:
    obj = root
    for part in filter(None, dotted.split(".")):
        obj = getattr(obj, part)
    return obj


def read_installed_cupy(cupy: Any) -> dict:
    """Every public name of CuPy's array namespaces, with signatures where CuPy gives them."""
    api: dict[str, Any] = {"cupy_version": cupy.__version__, "names": {}, "classes": {}}
    for dotted in CLASSES.values():  # CuPy loads some submodules lazily: load them before listing
        _resolve(cupy, dotted)
    for module_name in MODULES:
        module = _resolve(cupy, module_name)
        for name in dir(module):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            qualified = f"{module_name}.{name}" if module_name else name
            kind = "ufunc" if type(obj).__name__ == "ufunc" else (
                "class" if inspect.isclass(obj) else ("callable" if callable(obj) else "value"))
            api["names"][qualified] = {"kind": kind,
                                       "signature": _signature(obj) if kind in ("ufunc", "callable") else None}
    for key, dotted in CLASSES.items():
        cls = _resolve(cupy, dotted)
        members = {}
        for name in dir(cls):
            if name.startswith("_") and name not in ("__getitem__", "__setitem__"):
                continue
            obj = getattr(cls, name)
            members[name] = {"kind": "method" if callable(obj) else "attribute",
                             "signature": _signature(obj) if callable(obj) else None}
        api["classes"][key] = members
    return api


class CupyApi:
    """Look-ups into one reading of CuPy's API (see the module docstring)."""

    def __init__(self, data: dict, source: str):
        self.data = data
        self.version = data["cupy_version"]
        self.source = source

    def has(self, qualified: str) -> bool:
        return qualified in self.data["names"]

    def kind(self, qualified: str) -> str | None:
        entry = self.data["names"].get(qualified)
        return entry["kind"] if entry else None

    def signature(self, qualified: str) -> dict | None:
        return self.data["names"][qualified]["signature"]

    def member(self, cls: str, name: str) -> dict | None:
        """``{"kind", "signature"}`` of a method or attribute of ``cls``, or None if absent."""
        return self.data["classes"][cls].get(name)

    def names_in(self, module: str) -> list[str]:
        prefix = f"{module}." if module else ""
        return [n[len(prefix):] for n in self.data["names"]
                if n.startswith(prefix) and "." not in n[len(prefix):]]


def load_api(real_cupy: Any | None) -> CupyApi:
    """The installed CuPy's API when CuPy imports, else the list kept in ``cupy_api.json``."""
    if real_cupy is not None:
        return CupyApi(read_installed_cupy(real_cupy), f"the installed CuPy {real_cupy.__version__}")
    data = json.loads(API_FILE.read_text())
    return CupyApi(data, f"{API_FILE.name} (read from CuPy {data['cupy_version']})")
