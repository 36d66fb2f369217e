"""scripts/bench_conv.py, the convolution sweep: its smoke run (--quick) writes a JSON that
names the machine and holds one row per shape and direction, and a markdown table headed by
the CPU; the performance page's sweep table is the recorded run's. Nothing here checks a
speed: the figures are the script's, not the test's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import reference

REPO = Path(__file__).resolve().parents[2]
MACHINE_FIELDS = ("cpu_model", "cpu_vector_extensions", "usable_cpus", "blas", "threads", "git_commit", "numpy",
                  "torch", "platform")


def _sweep(tmp_path: Path, *options: str) -> tuple[dict, str]:
    out, md = tmp_path / "conv.json", tmp_path / "conv.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_conv.py"), "--quick", "--json", str(out),
                           "--markdown", str(md), *options], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


def test_quick_sweep_without_torch_has_a_row_per_shape_and_direction(tmp_path):
    report, table = _sweep(tmp_path, "--no-torch")
    machine = report["machine"]
    for field in MACHINE_FIELDS:
        assert field in machine, f"machine info lacks {field}"
    assert machine["cpu_model"] and machine["threads"] == [1]
    assert {"name", "version", "kernel"} <= set(machine["blas"])
    if Path("/proc/cpuinfo").exists() and sys.platform == "linux":
        assert machine["cpu_vector_extensions"], "no vector extension read from /proc/cpuinfo"

    shapes = {s["name"]: s for s in report["shapes"]}
    # read off the models: the paper's CapsNet, Efficient-CapsNet's depthwise 9x9, EM's 1x1, the CNN's 5x5
    assert (shapes["capsnet.conv1"]["kernel"], shapes["capsnet.conv1"]["out"]) == (9, 256)
    primary = shapes["capsnet.primary.conv"]
    assert (primary["in"], primary["out"], primary["kernel"], primary["stride"], primary["height"]) == (
        256, 256, 9, 2, 20)
    depthwise = shapes["efficient.primary.conv"]
    assert depthwise["groups"] == depthwise["in"] == 128 and depthwise["height"] == depthwise["kernel"] == 9
    assert shapes["em.primary.conv"]["kernel"] == 1
    assert shapes["cnn.features.0"]["kernel"] == 5 and shapes["cnn.features.0"]["padding"] == 2
    assert {"cifar.3x3", "bottleneck.1x1", "multimnist.conv1"} <= set(shapes)

    rows = report["rows"]
    assert not report["failed"] and not any("error" in r for r in rows)
    keys = sorted((r["shape"], r["direction"]) for r in rows)
    assert keys == sorted((name, d) for name in shapes for d in report["directions"]), "one row per shape/direction"
    for r in rows:
        assert r["batch"] == 1 and r["threads"] == 1
        assert r["seconds"]["capsnet:auto"] > 0 and "torch" not in r["seconds"]
        assert r["gflops"]["capsnet:auto"] == pytest.approx(r["flops"] / r["seconds"]["capsnet:auto"] / 1e9)
        assert "capsnet:auto" in r["peak_mb"]
    assert report["gemm_gflops"]["1"] > 0
    assert table.startswith(f"**{machine['cpu_model']} (") and "kernel" in table and "1 thread(s)" in table
    assert len([line for line in table.splitlines() if line.startswith("| ") and " | 1 | " in line]) == len(rows)


def test_quick_sweep_against_torch_gives_ratios_and_agrees(tmp_path, torch):
    report, _ = _sweep(tmp_path, "--shapes", "cifar", "em.primary", "--no-memory")
    assert [s["name"] for s in report["shapes"]] == ["em.primary.conv", "cifar.3x3"]
    assert report["machine"]["torch"] == torch.__version__
    assert report["machine"]["torch_threads"] == 1
    for r in report["rows"]:
        assert r["seconds"]["torch"] > 0
        assert r["ratio_torch_over"]["capsnet:auto"] == pytest.approx(r["seconds"]["torch"] /
                                                                       r["seconds"]["capsnet:auto"])
        assert r["max_rel_diff_vs_torch"]["capsnet:auto"] < 1e-4, "capsnet and torch computed different things"
    summary = report["summary"]["1"]["capsnet:auto"]
    assert summary["rows"] == len(report["rows"]) == 6 and summary["geomean"] > 0


def test_the_sweep_tables_of_the_performance_page_are_the_recorded_runs():
    """Each bench_conv.py command with a recorded JSON (``--json scripts/results/...``) on the
    performance page is followed by what bench_conv.py prints for that JSON: the tables, their
    headings (the machine) and summary lines."""
    bench_conv = reference("bench_conv")
    page = (REPO / "docs" / "performance.md").read_text()
    commands = re.findall(r"`python scripts/bench_conv\.py ([^`]*--json (scripts/results/[^\s`]+\.json)[^`]*)`", page)
    assert commands, "the performance page shows no recorded sweep"
    for _, path in commands:
        report = json.loads((REPO / path).read_text())
        assert not report["failed"] and not any("error" in r for r in report["rows"]), path
        assert bench_conv.tables(report).strip() in page, f"the page's table of {path} is not the recorded run"


def test_an_algorithm_the_library_does_not_have_is_refused_before_any_work(capsys):
    bench_conv = reference("bench_conv")
    assert bench_conv.main(["--quick", "--algorithms", "no-such-algorithm"]) == 2
    assert "capsnet.layers.conv.ALGORITHMS" in capsys.readouterr().err
