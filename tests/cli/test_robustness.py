"""``python -m capsnet.robustness``: the table and the plot of accuracy under affine
transformations, for runs trained on expanded MNIST."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def expanded_runs(mnist_dir, tmp_path_factory):
    """A small CapsNet and a small baseline CNN, each two epochs on 1,000 digits of the 40x40
    canvas (shifts of up to 2 px, so that so short a run learns)."""
    from capsnet.training import RunTrainer, TrainConfig  # noqa: PLC0415

    root = tmp_path_factory.mktemp("expanded")
    common = dict(data_dir=str(mnist_dir), dataset="expanded", epochs=2, batch_size=50, train_limit=1000,
                  test_limit=100, max_shift=2)
    RunTrainer(TrainConfig(model={"conv_channels": 32, "primary_types": 8, "decoder_hidden": [64, 128]}, **common),
                 root / "capsnet", progress=False, log=False).fit()
    RunTrainer(TrainConfig(arch="cnn", model={"channels": [16, 16, 8], "fc": [32, 32], "pool": True}, **common),
                 root / "cnn", progress=False, log=False).fit()
    return root


def test_robustness_command_writes_the_table_and_the_plot(expanded_runs, mnist_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from capsnet.robustness import main  # noqa: PLC0415

    out = tmp_path / "rob"
    args = [str(expanded_runs / "capsnet" / "best.npz"), str(expanded_runs / "cnn" / "best.npz"), "--out", str(out),
            "--data-dir", str(mnist_dir), "--test-limit", "100", "--no-progress"]
    assert main(args) == 0
    table = json.loads((out / "robustness.json").read_text())
    assert [r["arch"] for r in table["runs"]] == ["capsnet", "cnn"]
    for run in table["runs"]:
        assert set(run["sweeps"]) == {"rotation", "scale", "shear"}
        rotation = [p["accuracy"] for p in run["sweeps"]["rotation"]]
        assert rotation[0] > 0.25, run  # trained: above chance (0.1) on centred digits
        assert rotation[-1] < rotation[0] - 0.1, run  # and 60 degrees hurts
        assert 0 <= run["mixed"] <= 1
    from matplotlib.image import imread  # noqa: PLC0415

    png = imread(out / "robustness.png")
    assert png.shape[0] > 200 and png.shape[1] > 600 and png[..., :3].std() > 0.05
    capsys.readouterr()
    assert main([str(expanded_runs / "capsnet" / "missing.npz"), "--out", str(out), "--no-progress"]) == 2
    assert "missing.npz" in capsys.readouterr().err
