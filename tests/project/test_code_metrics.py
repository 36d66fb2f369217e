"""scripts/code_metrics.py, measured on a small made-up capsnet/ tree with known answers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "code_metrics.py"


@pytest.fixture(scope="module")
def metrics():
    spec = importlib.util.spec_from_file_location("capsnet_code_metrics_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOOP = '''"""A loop."""


class Trainer:
    def fit(self):
{body}
        if self.comm.size > 1:
            self.sync()
        if rank == 0:  # the lead rank
            self.save()
        x.size == 1
        shard(n, comm.rank, comm.size)

    def short(self):
        def inner():
            return 1
        return inner


def helper():
    """Mentions dataset == "multimnist" in a docstring: not a branch."""
    # if dataset == "expanded": a comment, not a branch
    return batch_size > 1
'''

TRAIN = '''if cfg.dataset == "multimnist":
    digits = 2
shape = (36, 36) if name == "expanded" else (28, 28)
if dataset in ("a", "b") and world_size != 1:
    pass
'''


def make_tree(root: Path) -> None:
    body = "\n".join(f"        step_{i} = {i}" for i in range(30))
    files = {
        "capsnet/__init__.py": "",
        "capsnet/training/__init__.py": '"""The training package."""\n',
        "capsnet/training/loop.py": LOOP.format(body=body),
        "capsnet/training/distributed.py": "if comm.size > 1:\n    pass\nlead = comm.rank == 0\n",
        "capsnet/training/strategy/mpi.py": "if comm.size == 1:\n    pass\n",
        "capsnet/data/registry.py": 'if dataset == "multimnist":\n    pass\n',
        "capsnet/data/mnist.py": "a = 1\n\nb = 2\n",
        "capsnet/train.py": TRAIN,
        "capsnet/layers/conv.py": "def conv():\n    return 0\n",  # measured for functions only
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_figures_of_a_known_tree(metrics, tmp_path):
    make_tree(tmp_path)
    m = metrics.measure(tmp_path)
    loop_lines = LOOP.format(body="\n".join(["x"] * 30)).count("\n")
    assert m["lines_per_file"] == {
        "capsnet/data/mnist.py": 3, "capsnet/data/registry.py": 2, "capsnet/train.py": 5,
        "capsnet/training/__init__.py": 1, "capsnet/training/distributed.py": 3,
        "capsnet/training/loop.py": loop_lines, "capsnet/training/strategy/mpi.py": 2}
    assert m["total_lines"] == 16 + loop_lines

    longest = m["longest_functions"]
    assert [(f["path"], f["qualname"], f["lines"]) for f in longest[:3]] == [
        ("capsnet/training/loop.py", "Trainer.fit", 37),
        ("capsnet/training/loop.py", "Trainer.short", 4),
        ("capsnet/training/loop.py", "helper", 4)]
    assert {f["qualname"] for f in longest} == {"Trainer.fit", "Trainer.short", "Trainer.short.inner",
                                                "helper", "conv"}
    assert longest[0]["line"] == 5

    datasets = m["dataset_switch_points"]
    assert [(p["path"], p["line"]) for p in datasets["places"]] == [
        ("capsnet/train.py", 1), ("capsnet/train.py", 3), ("capsnet/train.py", 4)]
    assert datasets["count"] == 3 and datasets["files"] == 1 and datasets["in_conditions"] == 3

    world = m["distribution_branch_points"]
    assert [(p["path"], p["line"], p["condition"]) for p in world["places"]] == [
        ("capsnet/train.py", 4, True),
        ("capsnet/training/loop.py", 36, True), ("capsnet/training/loop.py", 38, True),
        ("capsnet/training/loop.py", 41, False)]
    assert world["count"] == 4 and world["files"] == 2 and world["in_conditions"] == 3


def test_the_command_line_prints_markdown_and_writes_json(metrics, tmp_path, capsys):
    make_tree(tmp_path / "repo")
    assert metrics.main([str(tmp_path / "repo"), "--json", str(tmp_path / "out" / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "| capsnet/train.py | 5 |" in text
    assert "| capsnet/training/loop.py:Trainer.fit | 37 | 5 |" in text
    assert "## Dataset switch points (outside a dataset registry): 3 in 1 files" in text
    assert "- capsnet/training/loop.py:41: `shard(n, comm.rank, comm.size)` *use*" in text
    saved = json.loads((tmp_path / "out" / "m.json").read_text())
    assert saved == json.loads(json.dumps(metrics.measure(tmp_path / "repo")))
    assert saved["commit"] is None  # not a git checkout

    assert metrics.main([str(tmp_path / "nowhere")]) == 2
    assert "has no capsnet/ folder" in capsys.readouterr().err


def test_help_explains_what_is_counted(metrics, capsys):
    with pytest.raises(SystemExit) as exc:
        metrics.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--json", "Dataset switch points", "Distribution branch points", "registry", "distributed.py"):
        assert words in text
