"""MkDocs hooks of the documentation site (mkdocs.yml ``hooks:``).

- Before the build, each tutorial ``docs/tutorials/NAME.py`` (a jupytext percent script)
  is executed as a notebook with nbclient into ``NAME.ipynb``, which the site renders
  with its outputs; a cell that raises fails the build. A notebook newer than its script
  is kept (``CAPSNET_DOCS_EXECUTE=always`` executes them all again).
- ``{{ source("module:qualname") }}`` in a page becomes the source code of that object,
  read from the package, so a page's code cannot drift from the library's.
- After the build, every public name of ``capsnet`` and its subpackages must have an
  anchor in the API reference (``site/api/``), else the build fails, naming the missing.

A public name is one listed in a module's ``__all__`` (or, for a module without one, a
class or function it defines whose name does not begin with ``_``). A name that a package
re-exports is documented once, under the package.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
TUTORIALS = DOCS / "tutorials"
SOURCE = re.compile(r"\{\{\s*source\(\s*\"([\w.]+):([\w.]+)\"\s*\)\s*\}\}")


class DocsError(Exception):
    """The documentation cannot be built as it stands (the message says why and what to do)."""


# -- the public names ------------------------------------------------------------------------
def modules(package: str = "capsnet") -> list[str]:
    """The package and every module under it, by dotted name."""
    root = importlib.import_module(package)
    return [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]


def public_names(module_name: str) -> list[str]:
    """The names ``module_name`` makes public: its ``__all__``, else the classes and
    functions it defines whose names do not begin with an underscore."""
    module = importlib.import_module(module_name)
    listed = getattr(module, "__all__", None)
    if listed is not None:
        return list(listed)
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module_name]


def anchors_for(module_name: str, name: str) -> list[str]:
    """The anchors under which the API reference may show ``module_name.name``: its own,
    and that of each enclosing package that re-exports the same object."""
    obj = getattr(importlib.import_module(module_name), name)
    found = [f"{module_name}.{name}"]
    parts = module_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        package = importlib.import_module(".".join(parts[:i]))
        if name in getattr(package, "__all__", ()) and getattr(package, name, None) is obj:
            found.append(f"{package.__name__}.{name}")
    return found


def undocumented(anchor_ids: set[str], package: str = "capsnet") -> list[str]:
    """The public names with none of their anchors among ``anchor_ids``."""
    missing = []
    for module_name in modules(package):
        for name in public_names(module_name):
            if not any(a in anchor_ids for a in anchors_for(module_name, name)):
                missing.append(f"{module_name}.{name}")
    return missing


def anchor_ids(site_dir: Path) -> set[str]:
    ids: set[str] = set()
    for page in (site_dir / "api").rglob("*.html"):
        ids.update(re.findall(r'id="(capsnet[\w.]*)"', page.read_text(encoding="utf-8")))
    return ids


# -- the tutorials ---------------------------------------------------------------------------
def execute_tutorial(script: Path, notebook: Path, timeout: int = 900) -> float:
    """Run a jupytext percent script as a notebook (in a scratch folder, so its run
    folders stay out of the docs) and write it with its outputs; returns the seconds."""
    import jupytext  # noqa: PLC0415 - the docs extra
    import nbformat  # noqa: PLC0415
    from nbclient import NotebookClient  # noqa: PLC0415
    from nbclient.exceptions import CellExecutionError  # noqa: PLC0415

    nb = jupytext.read(script)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="capsnet-tutorial-") as scratch:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": scratch}})
        try:
            client.execute()
        except CellExecutionError as exc:
            raise DocsError(f"tutorial {script.name} failed when executed as a notebook:\n{exc}") from None
    tmp = notebook.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, notebook)
    return time.perf_counter() - start


def _plugin_error(exc: DocsError) -> Exception:
    from mkdocs.exceptions import PluginError  # noqa: PLC0415 - only inside a build

    return PluginError(str(exc))


def on_pre_build(config, **kwargs) -> None:
    try:
        _execute_stale_tutorials()
    except DocsError as exc:
        raise _plugin_error(exc) from None


def _execute_stale_tutorials() -> None:
    again = os.environ.get("CAPSNET_DOCS_EXECUTE") == "always"
    for script in sorted(TUTORIALS.glob("*.py")):
        notebook = script.with_suffix(".ipynb")
        if again or not notebook.exists() or notebook.stat().st_mtime < script.stat().st_mtime:
            seconds = execute_tutorial(script, notebook)
            print(f"INFO    -  tutorial {script.name} executed as {notebook.name} in {seconds:.0f} s")


# -- pages -----------------------------------------------------------------------------------
def _source(match: re.Match) -> str:
    module_name, qualname = match.groups()
    obj = importlib.import_module(module_name)
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise DocsError(f'{{{{ source("{module_name}:{qualname}") }}}}: {module_name} has no {qualname}; '
                        "fix the name in the page") from None
    return f"```python\n# {module_name}.{qualname}\n{inspect.getsource(obj).rstrip()}\n```"


def on_page_markdown(markdown: str, **kwargs) -> str:
    try:
        return SOURCE.sub(_source, markdown)
    except DocsError as exc:
        raise _plugin_error(exc) from None


def on_post_build(config, **kwargs) -> None:
    missing = undocumented(anchor_ids(Path(config["site_dir"])))
    if missing:
        raise _plugin_error(DocsError(
            "these public names are missing from the API reference (docs/api/): " + ", ".join(missing)
            + "; add them to a '::: module' block there"))
