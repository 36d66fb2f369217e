"""Code measurements of the training package, for comparing designs (issue 21): file lengths,
the longest functions, and how many places a new dataset or a new distributed concern touches.

Four figures, read from the source alone (stdlib, nothing imported from capsnet):

- **lines per file**: every ``.py`` under ``capsnet/training/``, plus ``capsnet/train.py``,
  ``capsnet/evaluate.py``, ``capsnet/visualize.py``, ``capsnet/models/*.py`` and
  ``capsnet/data/*.py`` (physical lines, blank and comment lines included);
- **the longest functions**: every function and method in ``capsnet/`` by ``ast``
  (``end_lineno - lineno + 1``, decorators not counted), named ``file:Class.method``
  (a nested function as ``file:outer.inner``);
- **dataset switch points**: source lines in ``capsnet/`` that branch on a dataset's name
  (``dataset ==``, ``dataset !=``, ``dataset in (``, ``== "multimnist"``, ``== "expanded"``,
  ``== "mnist-sample"`` ...), outside a dataset registry module (a file named
  ``*registry*.py`` or ``datasets.py``): the places a new dataset would have to be added to;
- **distribution branch points**: source lines in ``capsnet/`` that branch on the MPI world
  (``comm.size``, ``comm.rank``, ``size > 1``, ``size == 1``, ``rank == 0`` ...), outside
  ``capsnet/training/distributed.py`` and any strategy module (a file or folder whose name
  contains ``strateg``): the places a new distributed concern would have to be added to.

The two counts are line-level regular expressions on code (comments and docstrings are
left out; a line counts once however many patterns it matches), a proxy to read with the
lines it lists, not a parser's verdict; each line is marked with whether it holds a
condition (an if, while, conditional expression, assert or comparison) or only uses the
value, and the count of the first kind is given too. Run it on both sides of a change with the same
script::

    python scripts/code_metrics.py                        # this repository, Markdown on stdout
    python scripts/code_metrics.py /path/to/other/checkout --json metrics.json
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOP_FUNCTIONS = 10

SINGLE_FILES = ("capsnet/train.py", "capsnet/evaluate.py", "capsnet/visualize.py")
FILE_GLOBS = ("capsnet/training/**/*.py", "capsnet/models/*.py", "capsnet/data/*.py")

DATASET_NAMES = ("multimnist", "expanded", "mnist-sample")
DATASET_PATTERNS = (
    re.compile(r"\bdataset\s*(?:==|!=)"),
    re.compile(r"\bdataset\s+(?:not\s+)?in\s*[(\[{]"),
    re.compile(r"(?:==|!=)\s*[\"'](?:%s)[\"']" % "|".join(re.escape(n) for n in DATASET_NAMES)),
    re.compile(r"[\"'](?:%s)[\"']\s*(?:==|!=)" % "|".join(re.escape(n) for n in DATASET_NAMES)),
)
DISTRIBUTION_PATTERNS = (
    re.compile(r"\bcomm\.(?:size|rank)\b"),
    # a bare name, so an array's ``x.size == 1`` or a ``batch_size > 1`` does not count
    re.compile(r"(?<![\w.])(?:world_)?size\s*(?:>|==|!=)\s*1\b"),
    re.compile(r"(?<![\w.])rank\s*(?:==|!=)\s*0\b"),
)
DISTRIBUTION_HOME = "capsnet/training/distributed.py"


def is_dataset_registry(rel: str) -> bool:
    """Whether ``rel`` (a path relative to the root) is a dataset registry module."""
    name = Path(rel).name
    return "registry" in name or name == "datasets.py"


def is_distribution_home(rel: str) -> bool:
    """Whether ``rel`` is where the MPI world may be looked at: distributed.py or a strategy module."""
    return rel == DISTRIBUTION_HOME or any("strateg" in part for part in Path(rel).parts)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def python_files(root: Path) -> list[Path]:
    """Every .py file under root/capsnet, sorted."""
    return sorted(p for p in (root / "capsnet").rglob("*.py") if p.is_file())


def lines_per_file(root: Path) -> dict[str, int]:
    """Physical lines of each file named in the module docstring that exists under ``root``."""
    paths = {root / name for name in SINGLE_FILES}
    for pattern in FILE_GLOBS:
        paths.update(root.glob(pattern))
    return {_rel(p, root): len(p.read_text().splitlines()) for p in sorted(paths) if p.is_file()}


def functions(path: Path, root: Path) -> list[dict[str, Any]]:
    """Every function and method in one file: path, qualname, first line, length in lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[dict[str, Any]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = prefix + child.name
                found.append({"path": _rel(path, root), "qualname": qualname, "line": child.lineno,
                              "lines": child.end_lineno - child.lineno + 1})
                visit(child, qualname + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def longest_functions(root: Path, top: int = TOP_FUNCTIONS) -> list[dict[str, Any]]:
    """The ``top`` longest functions and methods in root/capsnet, longest first."""
    every = [f for path in python_files(root) for f in functions(path, root)]
    every.sort(key=lambda f: (-f["lines"], f["path"], f["line"]))
    return every[:top]


def code_lines(text: str) -> dict[int, str]:
    """Line number -> the line without its comment, for every line that is not part of a
    docstring (a string standing alone as a statement)."""
    tree = ast.parse(text)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            skip.update(range(node.lineno, node.end_lineno + 1))
    lines = text.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return {n: line for n, line in enumerate(lines, 1) if n not in skip and line.strip()}


def condition_lines(text: str) -> set[int]:
    """Lines that hold a condition: the test of an if, elif, while, conditional expression
    or assert, or a comparison (which may be stored as a flag and tested later)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        tests = [node.test] if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)) else []
        if isinstance(node, ast.Compare):
            tests.append(node)
        for test in tests:
            lines.update(range(test.lineno, test.end_lineno + 1))
    return lines


def branch_points(root: Path, patterns: tuple[re.Pattern, ...], exclude) -> list[dict[str, Any]]:
    """Code lines in root/capsnet matching any of ``patterns``, in files ``exclude`` does not
    name; ``condition`` says whether the line holds a condition (see :func:`condition_lines`)
    or only uses the value (``shard(n, comm.rank, comm.size)``)."""
    places = []
    for path in python_files(root):
        rel = _rel(path, root)
        if exclude(rel):
            continue
        text = path.read_text()
        conditions = condition_lines(text)
        for n, line in code_lines(text).items():
            if any(p.search(line) for p in patterns):
                places.append({"path": rel, "line": n, "text": line.strip(), "condition": n in conditions})
    return places


def dataset_switch_points(root: Path) -> list[dict[str, Any]]:
    """Lines that branch on a dataset's name, outside a dataset registry module."""
    return branch_points(root, DATASET_PATTERNS, is_dataset_registry)


def distribution_branch_points(root: Path) -> list[dict[str, Any]]:
    """Lines that branch on the MPI world, outside distributed.py and strategy modules."""
    return branch_points(root, DISTRIBUTION_PATTERNS, is_distribution_home)


def git_version(root: Path) -> dict[str, str | None]:
    """The checkout's commit (with '+changes' when capsnet/ differs from it) and the git tree
    of its capsnet/ folder (the same for every commit that left capsnet/ as it was); None
    outside git."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    changed = bool(commit) and bool(git("status", "--porcelain", "--", "capsnet"))
    tree = git("rev-parse", "--short", "HEAD:capsnet") if commit and not changed else None
    return {"commit": commit + "+changes" if changed else commit, "capsnet_tree": tree}


def measure(root: Path) -> dict[str, Any]:
    """All four figures for the checkout at ``root``, as one JSON-able dict (paths relative
    to ``root``, so that two checkouts' figures compare line by line)."""
    root = root.resolve()
    if not (root / "capsnet").is_dir():
        raise FileNotFoundError(f"{root} has no capsnet/ folder: pass the root of a capsnet checkout")
    files = lines_per_file(root)
    summary = {}
    for key, places in (("dataset_switch_points", dataset_switch_points(root)),
                        ("distribution_branch_points", distribution_branch_points(root))):
        summary[key] = {"count": len(places), "in_conditions": sum(p["condition"] for p in places),
                        "files": len({p["path"] for p in places}), "places": places}
    return {**git_version(root), "lines_per_file": files,
            "total_lines": sum(files.values()), "longest_functions": longest_functions(root), **summary}


def markdown(m: dict[str, Any], name: str = "capsnet") -> str:
    """The report of :func:`measure` as Markdown, titled with ``name`` (the checkout's folder)."""
    at = f" at {m['commit']}" + (f" (capsnet/ tree {m['capsnet_tree']})" if m["capsnet_tree"] else "")
    out = [f"# Code metrics of {name}" + (at if m["commit"] else ""), "",
           "## Lines per file", "", "| file | lines |", "|---|---:|"]
    out += [f"| {path} | {n} |" for path, n in m["lines_per_file"].items()]
    out += [f"| **total** | **{m['total_lines']}** |", "",
            f"## The {len(m['longest_functions'])} longest functions", "",
            "| function | lines | first line |", "|---|---:|---:|"]
    out += [f"| {f['path']}:{f['qualname']} | {f['lines']} | {f['line']} |" for f in m["longest_functions"]]
    for key, title in (("dataset_switch_points", "Dataset switch points (outside a dataset registry)"),
                       ("distribution_branch_points", "Distribution branch points "
                                                      "(outside distributed.py and strategy modules)")):
        entry = m[key]
        out += ["", f"## {title}: {entry['count']} in {entry['files']} files", "",
                f"{entry['in_conditions']} of them hold a condition; the others (marked *use*) only use the value.",
                ""]
        out += [f"- {p['path']}:{p['line']}: `{p['text']}`" + ("" if p["condition"] else " *use*")
                for p in entry["places"]]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Lines per file: capsnet/training/**/*.py, capsnet/{train,evaluate,visualize}.py, "
               "capsnet/models/*.py, capsnet/data/*.py. Longest functions: all of capsnet/, by ast. "
               "Dataset switch points: code lines matching dataset ==/!=/in (...) or ==/!= "
               '"multimnist"/"expanded"/"mnist-sample", outside *registry*.py and datasets.py. '
               "Distribution branch points: code lines matching comm.size, comm.rank, size >/==/!= 1, "
               "rank ==/!= 0, outside capsnet/training/distributed.py and strategy modules. "
               "Comments and docstrings are not searched.")
    p.add_argument("root", nargs="?", type=Path, default=REPO,
                   help=f"root of the capsnet checkout to measure (default: this script's, {REPO})")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures to PATH as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        m = measure(args.root)
    except (FileNotFoundError, SyntaxError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown(m, args.root.resolve().name))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(m, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
