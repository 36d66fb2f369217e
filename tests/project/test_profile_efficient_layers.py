"""scripts/profile_efficient_layers.py: a smoke run (no figure is checked: each stage timed on
both sides, the stages in the network's order, and the JSON), and that the stages it times
compute what the network computes."""
from __future__ import annotations

import json

import numpy as np

from tests.helpers import reference

profile = reference("profile_efficient_layers")


def test_a_smoke_run_times_every_stage_on_both_sides_and_writes_them(torch, tmp_path, capsys):
    out = tmp_path / "layers.json"
    assert profile.main(["--batch", "2", "--rounds", "1", "--warmup", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    stages = [r["stage"] for r in report["rows"]]
    assert stages[0].startswith("conv 0 (1->32 5x5)") and stages[-1] == "whole prediction"
    assert sum(s.startswith("batch norm") for s in stages) == 4
    assert all(r["capsnet_ms"] > 0 and r["torch_ms"] > 0 for r in report["rows"])
    assert report["machine"]["cpu_model"] and report["settings"]["batch"] == 2
    assert "| whole prediction |" in capsys.readouterr().out


def test_both_networks_predict_the_same_lengths(torch):
    ours, theirs, x = profile.build(3)
    with torch.inference_mode():
        expected = theirs(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(ours.predict(x)[1], expected, rtol=1e-4, atol=1e-5)
