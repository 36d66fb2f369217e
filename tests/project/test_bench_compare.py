"""scripts/bench_compare.py: each exported revision's bench.py imports that revision's capsnet
(before 0.5.2 an installed or editable capsnet, or PYTHONPATH, could be measured in both)."""
from __future__ import annotations

import os

import pytest

from tests.helpers import reference

compare = reference("bench_compare")


def test_each_exported_tree_imports_its_own_package_and_another_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(compare.REPO))  # as a developer runs the scripts
    tree = tmp_path / "head"
    compare.export("HEAD", tree)
    assert compare.tree_env(tree)["PYTHONPATH"].split(os.pathsep)[0] == str(tree)
    compare.check_imports_from(tree)  # the tree's own capsnet: no refusal
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="not the tree's own package"):
        compare.check_imports_from(empty)
