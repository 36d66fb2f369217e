"""scripts/time_to_accuracy.py: the seconds to each target read from a curve, and a smoke run of
both frameworks on the packaged sample with a tiny target."""
from __future__ import annotations

import json

from tests.helpers import reference

tta = reference("time_to_accuracy")


def test_seconds_to_a_target_are_those_of_the_first_epoch_that_reaches_it():
    curve = [{"epoch": 1, "test_accuracy": 0.985, "seconds": 10.0}, {"epoch": 2, "test_accuracy": 0.991, "seconds": 21.0},
             {"epoch": 3, "test_accuracy": 0.989, "seconds": 30.0}, {"epoch": 4, "test_accuracy": 0.9931, "seconds": 41.0}]
    assert tta.reached(curve, [98.0, 99.0, 99.3, 99.5]) == {"98": 10.0, "99": 21.0, "99.3": 41.0, "99.5": None}


def test_a_smoke_run_of_both_frameworks_on_the_sample(torch, tmp_path, capsys):
    out = tmp_path / "tta.json"
    assert tta.main(["efficient", "--dataset", "mnist-sample", "--train-limit", "32", "--test-limit", "32",
                     "--target", "1", "--max-epochs", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_model"] and report["machine"]["threads"] >= 1 and report["machine"]["commit"]
    assert report["setup"]["config"]["augment"] == "efficient" and report["setup"]["config"]["lr_min"] == 5e-5
    for framework in ("capsnet", "torch"):
        curve = report["results"][framework]["curve"]
        assert [c["epoch"] for c in curve] == [1] and curve[0]["seconds"] > 0
        assert report["results"][framework]["seconds_to_target"] == {"1": curve[0]["seconds"]}
    assert report["ratio_capsnet_over_torch"]["1"] > 0
    assert "capsnet / PyTorch time to target: 1%:" in capsys.readouterr().out
