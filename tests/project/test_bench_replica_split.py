"""scripts/bench_replica_split.py: a smoke run (no figure is checked, only that both settings run
through Replicas with the slices they stand for, and the JSON they write)."""
from __future__ import annotations

import json

import pytest

from tests.helpers import reference


def test_a_smoke_run_times_both_settings_and_writes_them(tmp_path, capsys):
    split = reference("bench_replica_split")
    out = tmp_path / "split.json"
    assert split.main(["--network", "efficient", "--batch-sizes", "4", "--threads", "2", "--rounds", "1",
                       "--min-round-time", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["batch"] == 4 and row["whole_ms"] > 0 and row["split_ms"] > 0
    assert set(row["rounds"]) == {"whole", "split"}
    assert "cpu_model" in report["machine"]
    assert "split / whole speed" in capsys.readouterr().out


def test_the_whole_setting_runs_one_replica_and_the_split_one_a_replica_per_thread():
    split = reference("bench_replica_split")
    for min_slice, replicas in ((5, 1), (1, 2)):
        step = split.build("efficient", min_slice, 2, 4, 0)
        step.once()
        assert len(step.runner.models) == replicas


def test_one_thread_cannot_split_a_batch():
    split = reference("bench_replica_split")
    with pytest.raises(SystemExit):
        split.main(["--threads", "1"])


def test_a_smoke_run_with_processes_and_predictions_times_all_three(tmp_path, capsys):
    split = reference("bench_replica_split")
    out = tmp_path / "split.json"
    assert split.main(["--network", "em", "--mode", "infer", "--processes", "--batch-sizes", "4", "--threads", "2",
                       "--rounds", "1", "--min-round-time", "0", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["rounds"]) == {"whole", "split", "processes"} and row["processes_ms"] > 0
    assert row["processes_over_threads"] == pytest.approx(row["split_ms"] / row["processes_ms"])
    printed = capsys.readouterr().out
    assert "one prediction" in printed and "x threads" in printed
