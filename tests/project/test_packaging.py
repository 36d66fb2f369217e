"""The package as installed: one version, printed by every command; the changelog; the
console scripts; the MNIST sample declared as package data."""
from __future__ import annotations

import importlib
import importlib.util
import re
import tomllib
import types
from pathlib import Path

import pytest

import capsnet


REPO = Path(__file__).resolve().parents[2]


PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


COMMANDS = ("train", "evaluate", "export", "robustness", "visualize")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_prints_the_version(name, capsys):
    cli = importlib.import_module(f"capsnet.{name}")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"capsnet {capsnet.__version__}"


def test_the_version_is_set_in_one_place():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "capsnet.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", capsnet.__version__)


def test_the_changelog_describes_this_version():
    sections = re.findall(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert sections[0] == capsnet.__version__, f"CHANGELOG.md's newest section is {sections[0]}"


def test_a_console_script_for_every_command():
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts == {f"capsnet-{name}": f"capsnet.{name}:main" for name in COMMANDS}


def test_the_package_data_covers_the_whole_sample():
    from capsnet.data import SAMPLE_DIR

    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["capsnet.data"]
    shipped = {p.relative_to(SAMPLE_DIR.parent) for p in SAMPLE_DIR.iterdir()}
    declared = {p.relative_to(SAMPLE_DIR.parent) for pattern in patterns for p in SAMPLE_DIR.parent.glob(pattern)}
    assert shipped == declared and len(shipped) == 5
    assert sum(p.stat().st_size for p in SAMPLE_DIR.iterdir()) < 1024 * 1024  # under 1 MB


@pytest.mark.parametrize("package", ["capsnet.layers", "capsnet.models", "capsnet.optim", "capsnet.data",
                                     "capsnet.training"])
def test_no_export_shadows_a_submodule(package):
    pkg = importlib.import_module(package)
    shadowed = [name for name in pkg.__all__ if importlib.util.find_spec(f"{package}.{name}") is not None]
    assert shadowed == []
    assert all(hasattr(pkg, name) for name in pkg.__all__)
    assert isinstance(importlib.import_module("capsnet.layers.dense"), types.ModuleType)
