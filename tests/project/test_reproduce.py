"""scripts/reproduce.py and its records: an epoch's line appended as it ends, a resume that
continues the same record, a restart that starts a new one, a record rebuilt from the run
folder; on a tiny network and the packaged sample."""
from __future__ import annotations

import json

import pytest

from tests.helpers import reference

reproduce = reference("reproduce")
rr = reference("results_records")

TINY = rr.Experiment(
    "tiny", "a tiny CapsNet on the sample", "for the tests",
    ("--epochs", "2", "--dataset", "mnist-sample", "--train-limit", "40", "--test-limit", "20", "--batch-size", "20",
     "--conv-channels", "8", "--primary-types", "2", "--decoder-hidden", "16", "16"),
    "tiny")


@pytest.fixture
def place(tmp_path, monkeypatch):
    monkeypatch.setitem(rr.EXPERIMENTS, "tiny", TINY)
    runs, results = tmp_path / "runs", tmp_path / "results"
    return lambda *extra: ["tiny", "--runs-dir", str(runs), "--results", str(results), *extra], runs, results


def stop_after_first_epoch(monkeypatch):
    """The run stops (as after Ctrl-C) once its first epoch is recorded."""
    original = reproduce.RecordEpochs.epoch_end

    def epoch_end(self, trainer, record):
        original(self, trainer, record)
        trainer.stop_requested = True

    monkeypatch.setattr(reproduce.RecordEpochs, "epoch_end", epoch_end)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_epoch_is_recorded_and_a_resume_continues_the_same_record(place, monkeypatch, capsys):
    argv, runs, results = place
    record = results / "tiny.jsonl"
    with monkeypatch.context() as m:
        stop_after_first_epoch(m)
        assert reproduce.main(argv()) == 130  # stopped, resumable
    first = lines(record)
    assert [line["epoch"] for line in first] == [1]
    line = first[0]
    assert line["experiment"] == "tiny" and 0.0 <= line["test_accuracy"] <= 1.0
    assert line["test_error"] == pytest.approx(1 - line["test_accuracy"])
    assert line["wall_seconds"] == line["epoch_seconds"] > 0 and line["images_per_second"] > 0
    assert line["cpu"] == rr.cpu_model() and line["threads"] >= 1 and line["commit"]
    assert line["run_id"] == json.loads((runs / "tiny" / rr.RUN_FILE).read_text())["run_id"]

    assert reproduce.main(argv()) == 0  # the same command continues
    assert "continuing tiny run " + line["run_id"] in capsys.readouterr().out
    both = lines(record)
    assert [x["epoch"] for x in both] == [1, 2] and both[0] == line
    assert {x["run_id"] for x in both} == {line["run_id"]}
    assert both[1]["wall_seconds"] == pytest.approx(line["wall_seconds"] + both[1]["epoch_seconds"])


def test_the_record_is_rebuilt_from_the_run_folder(place):
    argv, runs, results = place
    assert reproduce.main(argv()) == 0
    record = results / "tiny.jsonl"
    written = record.read_text()
    record.unlink()
    assert reproduce.main(argv("--sync-record")) == 0
    assert record.read_text() == written
    assert [x["epoch"] for x in lines(record)] == [1, 2]


def test_a_restart_archives_the_old_run_and_starts_a_new_record(place):
    argv, runs, results = place
    assert reproduce.main(argv()) == 0
    old = lines(results / "tiny.jsonl")
    with pytest.raises(SystemExit, match="holds the record of an earlier run, whose run folder .* has no checkpoint: pass --restart"):
        (runs / "tiny" / "checkpoint.npz").unlink()  # a lost run folder does not silently replace a record
        reproduce.main(argv())
    assert reproduce.main(argv("--restart")) == 0
    new = lines(results / "tiny.jsonl")
    assert [x["epoch"] for x in new] == [1, 2] and {x["run_id"] for x in new} != {old[0]["run_id"]}
    assert lines(results / "archive" / f"tiny.{old[0]['run_id']}.jsonl") == old
    assert (runs / f"tiny.{old[0]['run_id']}" / "metrics.jsonl").exists()


def test_records_of_two_runs_are_refused(place):
    argv, runs, results = place
    assert reproduce.main(argv()) == 0
    record = results / "tiny.jsonl"
    mixed = lines(record)
    mixed[1]["run_id"] = "another"
    record.write_text("".join(json.dumps(x) + "\n" for x in mixed))
    with pytest.raises(SystemExit, match="mixes runs"):
        rr.read_record("tiny", results)
    record.write_text(json.dumps({**mixed[0], "run_id": "another"}) + "\n")
    with pytest.raises(SystemExit, match="is the record of run another.*pass --restart"):
        reproduce.main(argv("--sync-record"))


def test_a_resume_with_other_overrides_is_refused(place, monkeypatch):
    argv, runs, results = place
    with monkeypatch.context() as m:
        stop_after_first_epoch(m)
        assert reproduce.main(argv()) == 130
    with pytest.raises(SystemExit, match=r"holds a run with the overrides \{\}; this command gives \{'epochs': 3\}"):
        reproduce.main(argv("--epochs", "3"))


def test_help_lists_every_experiment_with_its_cost():
    text = reproduce.build_parser().format_help()
    for name, exp in rr.EXPERIMENTS.items():
        assert f"{name}: {exp.title}" in text
        assert "python -m capsnet.train " + " ".join(exp.args) in text
    assert text.count("h of training on this 2-core CPU") == len(rr.EXPERIMENTS)
