"""README's table of the networks and docs/results.md are what scripts/results_table.py makes
from the committed records; a record's figures reach them, and scripts/results_figure.py draws
its curves."""
from __future__ import annotations

import json

import pytest

from tests.helpers import reference

rr = reference("results_records")
table = reference("results_table")
figure = reference("results_figure")


def test_readme_and_the_results_page_are_generated_from_the_records():
    assert table.current_block(table.README) == table.readme_table().strip("\n"), \
        "README.md's results table is out of date: run PYTHONPATH=$PWD python scripts/results_table.py --write"
    assert table.current_block(table.PAGE) == table.page_body().strip("\n"), \
        "docs/results.md is out of date: run PYTHONPATH=$PWD python scripts/results_table.py --write"


def test_efficient_capsnet_has_the_authors_161824_parameters_without_its_decoder():
    total, decoder = table.parameters("mnist-efficient")
    assert total - decoder == 161_824


def record(name: str, accuracies: list[float], run_id: str = "r1") -> list[dict]:
    return [{"experiment": name, "run_id": run_id, "epoch": k + 1, "test_accuracy": a, "test_error": 1 - a,
             "train_loss": 0.1, "lr": 1e-3, "epoch_seconds": 1800.0, "wall_seconds": 1800.0 * (k + 1),
             "images_per_second": 30.0 + k, "commit": "abc", "cpu": "Test CPU", "threads": 2, "processes": 1}
            for k, a in enumerate(accuracies)]


def test_a_record_reaches_the_table_and_the_page(tmp_path):
    rr.write_jsonl(tmp_path / "mnist-em.jsonl", record("mnist-em", [0.98, 0.9925, 0.991]))
    text = table.readme_table(tmp_path)
    row = next(line for line in text.splitlines() if "EM routing" in line)
    assert "| 31 | 99.25% (epoch 2) | 3 of 30 | 1.50 |" in row
    assert "on Test CPU, 2 threads" in text
    assert sum(table.NONE_YET in line for line in text.splitlines()) == len(rr.EXPERIMENTS) - 1
    page = table.page_body(tmp_path, tmp_path)
    assert "best 99.25% at epoch 2, 3 of 30 epochs in 1.50 h" in page
    assert "| 2 | 99.25% | 1.00 | 31 | abc |" in page
    assert "results-mnist-em.png" not in page  # no figure drawn yet
    pytest.importorskip("matplotlib")
    assert figure.main(["--results", str(tmp_path), "--figures", str(tmp_path)]) == 0
    assert (tmp_path / "results-mnist-em.png").stat().st_size > 0
    assert "![Matrix capsules with EM routing on MNIST" in table.page_body(tmp_path, tmp_path)


def test_an_archived_record_is_listed_under_its_experiment(tmp_path):
    (tmp_path / "archive").mkdir()
    rr.write_jsonl(tmp_path / "archive" / "mnist-em.old1.jsonl", record("mnist-em", [0.90, 0.95, 0.94], "old1"))
    page = table.page_body(tmp_path, tmp_path)
    section = page.split("{#mnist-em}")[1].split("\n## ")[0]
    assert ("- archived run `old1` (`docs/results/archive/mnist-em.old1.jsonl`): 3 of 30 epochs, best 95.00% at "
            "epoch 2, 1.50 h on Test CPU") in section
    assert table.NONE_YET in section  # the archived run is not the experiment's record
    assert "archived run" not in page.split("{#mnist-em}")[0]


def test_a_stale_block_is_reported(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.BEGIN}\nold numbers\n{table.END}\nrest\n")
    page = tmp_path / "results.md"
    page.write_text(f"{table.BEGIN}\n{table.END}\n")
    monkeypatch.setattr(table, "README", readme)
    monkeypatch.setattr(table, "PAGE", page)
    monkeypatch.setattr(rr, "REPO", tmp_path)
    assert table.main(["--check"]) == 1
    assert "out of date: README.md, results.md" in capsys.readouterr().out
    assert table.main(["--write"]) == 0 and table.main(["--check"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "old numbers" not in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="must hold one block between"):
        table.main(["--write"])


def test_the_robustness_sweeps_committed_beside_a_record_reach_the_page(tmp_path):
    rr.write_jsonl(tmp_path / "affine-robustness.jsonl", record("affine-robustness", [0.97]))
    (tmp_path / "affine-robustness-robustness.json").write_text(json.dumps({
        "test_digits": 1000, "runs": [{"mixed": 0.7512, "sweeps": {"rotation": [{"strength": 0.0, "accuracy": 0.99},
                                                                                {"strength": 30.0, "accuracy": 0.8}]}}]}))
    page = table.page_body(tmp_path, tmp_path)
    assert "on the best epoch, 1,000 test digits each" in page
    assert "- affNIST-style mixed set: 75.12%; rotation 0: 99.0%, 30: 80.0%" in page


def test_a_committed_time_to_accuracy_reaches_the_page_under_its_experiment(tmp_path):
    rr.write_jsonl(tmp_path / "mnist-capsnet.jsonl", record("mnist-capsnet", [0.99]))
    curve = {"capsnet": [{"epoch": 1, "test_accuracy": 0.991, "seconds": 300.0},
                         {"epoch": 2, "test_accuracy": 0.9935, "seconds": 600.0}],
             "torch": [{"epoch": 1, "test_accuracy": 0.9905, "seconds": 900.0},
                       {"epoch": 2, "test_accuracy": 0.992, "seconds": 1800.0}]}
    (tmp_path / "mnist-capsnet-time-to-accuracy.json").write_text(json.dumps({
        "machine": {"cpu_model": "Test CPU", "threads": 2, "commit": "0123456789abcdef"}, "network": "capsnet",
        "targets": [99.0, 99.3],
        "results": {fw: {"curve": c, "seconds_to_target": {"99": c[0]["seconds"],
                                                           "99.3": 600.0 if fw == "capsnet" else None}}
                    for fw, c in curve.items()},
        "ratio_capsnet_over_torch": {"99": 300 / 900, "99.3": None}}))
    page = table.page_body(tmp_path, tmp_path)
    section = page.split("{#mnist-capsnet}")[1].split("\n## ")[0]
    assert "on Test CPU with 2 threads, commit 0123456789" in section
    assert "| 99% | 5.0 min (epoch 1) | 15.0 min (epoch 1) | 0.33 |" in section
    assert "| 99.3% | 10.0 min (epoch 2) | not reached in 2 epochs (best 99.20%) | — |" in section
    assert "time-to-accuracy" not in page.split("{#mnist-capsnet}")[0]  # only under its experiment
