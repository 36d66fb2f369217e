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


def test_a_training_smoke_run_times_forward_and_backward_of_every_stage(torch, tmp_path, capsys):
    out = tmp_path / "training.json"
    assert profile.main(["--training", "--threads", "1", "--batch", "2", "--rounds", "1", "--warmup", "0",
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    stages = [r["stage"] for r in report["rows"]]
    assert stages[0].startswith("conv 0 (1->32 5x5)") and stages[-1] == "whole training step (no optimizer)"
    assert {"decoder", "FCCaps routing", "primary capsules"} <= set(stages)
    assert all(r["capsnet_ms"] > 0 and r["torch_ms"] > 0 for r in report["rows"])
    assert report["settings"]["training"] and "training, forward and backward" in capsys.readouterr().out


def test_the_training_stages_give_both_networks_the_same_gradients(torch):
    """One training step of each through the profile's own calls: equal gradients to float32
    rounding, so the stages time the same work."""
    ours, theirs, x = profile.build(4)
    rows = profile.training_stages(ours, theirs, x)
    for p in ours.parameters():
        p.grad[...] = 0
    theirs.zero_grad()
    rows["whole training step (no optimizer)"]["capsnet"]()
    rows["whole training step (no optimizer)"]["torch"]()
    state = dict(ours.named_parameters())
    conv_biases = {f"features.{3 * k}.bias" for k in range(4)}  # before a batch norm: zero up to rounding
    for name, tensor in theirs._names().items():
        if name in state and tensor.grad is not None and name not in conv_biases:
            expected = tensor.grad.numpy()
            np.testing.assert_allclose(state[name].grad, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max(),
                                       err_msg=name)
