"""scripts/gpu_proof.py (issue 33): its smoke run on the emulated device end to end, as .ci/run
runs it, so the proof cannot rot between GPUs; --prepare; and the suite's summary when pytest
is stopped at its cap."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from capsnet.data.mnist import SAMPLE_DIR

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_proof.py"


def _proof():
    spec = importlib.util.spec_from_file_location("capsnet_gpu_proof_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks the module up while it is made
    spec.loader.exec_module(module)
    return module


def test_the_smoke_run_does_or_skips_every_step_with_its_reason(tmp_path):
    env = {**os.environ, "CAPSNET_EMULATE_CUPY": "1"}
    env.pop("CAPSNET_DATA_DIR", None)
    out = tmp_path / "proof"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proof = json.loads((out / "proof.json").read_text())
    assert proof["budget"] == "smoke" and "EMULATED" in proof["device"]
    status = {s["step"]: s["status"] for s in proof["steps"]}
    assert status == {"machine": "done", "suite": "done", "parity": "done", "speed": "done", "epoch": "done",
                      "resume": "done", "compile": "skipped"}
    assert next(s for s in proof["steps"] if s["step"] == "compile")["reason"].startswith("needs a GPU")
    # the device tool brings back at most 8 files from $OUT: the proof writes exactly these
    assert sorted(p.name for p in out.iterdir()) == sorted(["proof.json", "proof.log", "machine.json", "suite.xml",
                                                            "suite.log", "parity.json", "speed.json",
                                                            "training.json"])

    machine = json.loads((out / "machine.json").read_text())
    assert machine["emulated"] and machine["cupy"]["emulated"] and "version" in machine["numpy"]
    assert not [name for name, part in machine.items() if isinstance(part, dict) and "error" in part]

    suite = ET.parse(out / "suite.xml").getroot()
    assert len(list(suite.iter("testcase"))) > 0 and not list(suite.iter("failure"))

    parity = json.loads((out / "parity.json").read_text())
    assert {(r["model"], r["dtype"]) for r in parity["results"]} == {
        (m, d) for m in ("capsnet", "efficient", "em") for d in ("float64", "float32")}
    for row in parity["results"]:  # NumPy underneath, but the engine may pick another algorithm per backend
        assert row["worst_gradient"] <= _proof().TOLERANCE[row["dtype"]] and row["within_tolerance"], row["model"]
        assert row["gradients"] and set(row["gradients"]) == set(row["weights_after_adam"])

    speed = json.loads((out / "speed.json").read_text())
    measured = {(r["framework"], r["model"]) for r in speed["rows"] if "train" in r and "infer" in r}
    assert {("capsnet", "capsnet"), ("capsnet", "efficient")} <= measured
    assert all(r["train_step"] > 0 and r["host_transfers_in_step"] == 0 for r in speed["emulated_launches"])
    assert "skipped" in speed["profiler_counts"]["capsnet"]

    training = json.loads((out / "training.json").read_text())
    assert training["epoch"]["exit"] == 0 and 0 <= training["epoch"]["metrics"]["test_accuracy"] <= 1
    assert training["resume"]["bit_identical"] and training["resume"]["stopped_after"]["epoch"] == 0

    assert 'run(command="' in proc.stdout and 'carry=[".gpu-data"]' in proc.stdout and "timeout_s=" in proc.stdout


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_prepare_copies_mnist_keeps_it_out_of_git_and_records_the_commit(tmp_path):
    proof = _proof()
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "README.md").write_text("x\n")
    _git(repo, "add", "README.md")
    _git(repo, "commit", "-qm", "first")
    for _ in range(2):  # a second preparation refreshes, and adds no second exclude line
        proof.prepare(SAMPLE_DIR, repo)
    for name in proof.MNIST_FILES:
        assert (repo / ".gpu-data" / "mnist" / name).read_bytes() == (SAMPLE_DIR / name).read_bytes()
    assert _git(repo, "status", "--porcelain") == ""  # ignored: nothing to commit
    assert (repo / ".git" / "info" / "exclude").read_text().count("/.gpu-data/") == 1
    recorded = json.loads((repo / ".gpu-data" / "commit.json").read_text())
    assert recorded["commit"] == _git(repo, "rev-parse", "HEAD") and recorded["dirty"] is False

    with pytest.raises(SystemExit, match="--data-dir"):
        proof.prepare(tmp_path / "nothing", repo)


def test_a_suite_cut_at_its_cap_is_summarised_from_the_reports_that_came(tmp_path):
    proof = _proof()
    lines = [
        {"test": "tests/a.py::test_ok[cupy]", "when": "call", "outcome": "passed", "seconds": 0.5, "message": ""},
        {"test": "tests/a.py::test_bad[cupy]", "when": "call", "outcome": "failed", "seconds": 0.1,
         "message": "AssertionError: 1 != 2"},
        {"test": "tests/a.py::test_bad[cupy]", "when": "teardown", "outcome": "passed", "seconds": 0.0, "message": ""},
        {"test": "tests/b.py::test_fixture[cupy]", "when": "setup", "outcome": "failed", "seconds": 0.0,
         "message": "RuntimeError: no device"},
        {"test": "tests/b.py::test_skip[cupy]", "when": "setup", "outcome": "skipped", "seconds": 0.0,
         "message": "Skipped: needs mpiexec"},
    ]
    reports = tmp_path / "reports.jsonl"
    reports.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = proof.summarise_reports(reports)
    assert summary["counts"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert {f["test"]: f["message"] for f in summary["failures"]} == {
        "tests/a.py::test_bad[cupy]": "AssertionError: 1 != 2",
        "tests/b.py::test_fixture[cupy]": "RuntimeError: no device"}
    assert summary["skip_reasons"] == {"Skipped: needs mpiexec": 1}
    proof.write_junit(reports, tmp_path / "suite.xml")
    cases = list(ET.parse(tmp_path / "suite.xml").getroot().iter("testcase"))
    kinds = {c.get("name"): [child.tag for child in c] for c in cases}
    assert kinds == {"test_ok[cupy]": [], "test_bad[cupy]": ["failure"], "test_fixture[cupy]": ["error"],
                     "test_skip[cupy]": ["skipped"]}


def test_the_relative_difference_is_against_the_largest_reference_entry():
    proof = _proof()
    assert proof.relative(np.array([1.0, 2.5]), np.array([1.0, 2.0])) == pytest.approx(0.25)
    assert proof.relative(np.zeros(3), np.zeros(3)) == 0.0
    assert proof.relative(np.ones(3), np.zeros(3)) == float("inf")
    assert proof.relative(np.array([3e-9]), np.array([1e-9]), floor=1e-3) == pytest.approx(2e-6)
