"""capsnet.training.run: training a CapsNet on real MNIST, exact resume (from this
version and from a capsnet 0.1 run folder), checkpoints refused with their reason, atomic
writes, and the two-digit CapsNet learning MultiMNIST and resuming exactly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from capsnet import parallel, train as train_cli
from capsnet.models import CapsNet, CapsNetConfig
from capsnet.training import CheckpointError, RunTrainer, RunFolderError, TrainConfig, load_weights, train_config_of
from capsnet.training.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import assert_records_match


SMALL = dict(conv_channels=16, primary_types=4, primary_dim=8, digit_dim=8, decoder_hidden=[32, 64])


def small_config(mnist_dir, **kw) -> TrainConfig:
    model = {**CapsNetConfig().as_dict(), **SMALL}
    base = dict(data_dir=str(mnist_dir), epochs=2, batch_size=50, train_limit=300, test_limit=100,
                log_every=3, model=model)
    base.update(kw)
    return TrainConfig(**base)


def weights(trainer: RunTrainer) -> dict:
    return trainer.model.state_dict()


@pytest.mark.slow
def test_small_capsnet_reaches_95_percent_on_real_mnist(mnist_dir, tmp_path):
    """A small CapsNet on 5,000 real training images: >= 95% on 1,000 real test images."""
    model = {**CapsNetConfig().as_dict(), "conv_channels": 64, "primary_types": 8}
    cfg = TrainConfig(data_dir=str(mnist_dir), epochs=4, batch_size=100, train_limit=5000,
                      test_limit=1000, model=model)
    history = RunTrainer(cfg, tmp_path / "run", progress=False).fit()
    assert history[-1]["test_accuracy"] >= 0.95, history
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert lines[0]["train_loss"] > lines[-1]["train_loss"]


@pytest.mark.parametrize("stop_at", [(0, 2), (1, 0), (1, 5)])
def test_interrupted_and_resumed_run_matches_uninterrupted(mnist_dir, tmp_path, stop_at):
    cfg = small_config(mnist_dir)
    straight = RunTrainer(cfg, tmp_path / "straight", progress=False)
    straight.fit()

    def interrupt(trainer, epoch, step):
        if (epoch, step) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RunTrainer(cfg, tmp_path / "resumed", progress=False, on_step=interrupt).fit()
    resumed = RunTrainer(cfg, tmp_path / "resumed", progress=False)
    resumed.fit(resume=True)
    a, b = weights(straight), weights(resumed)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    ma = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if "second" not in k} for l in lines]
    assert_records_match(strip(ma), strip(mb), rel=1e-9)


def test_checkpoint_from_a_different_configuration_is_refused(mnist_dir, tmp_path):
    cfg = small_config(mnist_dir, epochs=1)
    RunTrainer(cfg, tmp_path / "run", progress=False).fit()
    other = small_config(mnist_dir, epochs=2, model={**cfg.model, "digit_dim": 4})
    with pytest.raises(CheckpointError, match="digit_dim: checkpoint has 8, asked for 4"):
        RunTrainer(other, tmp_path / "run", progress=False).fit(resume=True)
    model = CapsNet(CapsNetConfig.from_dict({**cfg.model, "conv_channels": 8}))
    with pytest.raises(CheckpointError, match="conv_channels"):
        load_weights(model, tmp_path / "run" / "checkpoint.npz")


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(mnist_dir, tmp_path, capsys):
    cfg = small_config(mnist_dir, epochs=1)
    with pytest.raises(RunFolderError, match="holds no checkpoint") as empty:
        RunTrainer(cfg, tmp_path / "empty", progress=False).fit(resume=True)
    RunTrainer(cfg, tmp_path / "run", progress=False).fit()
    with pytest.raises(RunFolderError, match=r"resume it \(fit\(resume=True\)\)") as occupied:
        RunTrainer(cfg, tmp_path / "run", progress=False).fit()
    assert (empty.value.reason, occupied.value.reason) == ("empty", "occupied")
    assert "--" not in str(empty.value) + str(occupied.value)  # the library names arguments, not flags
    # the command line words the same refusals with its flags
    args = ["--data-dir", str(mnist_dir), "--train-limit", "100", "--no-progress"]
    assert train_cli.main(["--out", str(tmp_path / "run"), *args]) == 2
    assert "already holds a run: pass --resume to continue it, or choose another --out" in capsys.readouterr().err
    assert train_cli.main(["--out", str(tmp_path / "none"), "--resume", *args]) == 2
    assert f"--resume: no checkpoint in {tmp_path / 'none'}" in capsys.readouterr().err


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "checkpoint.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="not a readable capsnet checkpoint"):
        load_checkpoint(bad)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_checkpoint(path, model_state={"w": np.ones(3)}, header={"epoch": 1})
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model_state={"w": np.zeros(3)}, header={"epoch": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]


DATA = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_run_folder_from_capsnet_0_1_resumes_to_the_same_weights(mnist_dir, tmp_path):
    """tests/fixtures/run-v0.1 was written by capsnet 0.1's MNIST-only trainer (commit 84771ba,
    NumPy 2.4.6): a tiny CapsNet stopped by Ctrl-C after step 3 of epoch 1 (its data_dir,
    a path of the machine that wrote it, since set to null in config.json and in the
    checkpoint's header; nothing else in the files changed). uninterrupted-weights.npz
    holds 0.1's weights at the end of the same run without the stop.

    Bit for bit, on this machine: the folder resumed straight to the end, and resumed,
    stopped again mid-epoch 2 and resumed once more, end with the same weights and metrics
    (the upgraded 0.1 state, saved again in today's format, loses nothing).

    To rounding, against the stored 0.1 weights (computed on another machine, whose BLAS
    may pick other kernels by CPU and so sum in another order): each of the 5 steps run
    after the resume rounds every weight to float32 (a difference in the last bit of an
    update can flip that rounding: 1 ulp, 2**-23 |w|, so 5 steps stay under rtol 1e-6)
    and moves it by an Adam step of at most about lr = 1e-3, whose float32 gradient is
    exact to ~1e-5 relative in another summation order (5 x 1e-3 x 1e-5 = 5e-8, under
    atol 1e-7, for weights near zero). Measured: other OpenBLAS kernels
    (OPENBLAS_CORETYPE=Prescott, SkylakeX, ...) move weights by 1.5e-8 to 3e-8, under a
    tenth of the tolerance; a wrong resume (the LR schedule an epoch off, Adam's step
    count lost, another data order) moves them by 5e-4 or more, over 4,000 times it.
    0.1 ran each batch on one thread (BLAS's own threads aside), so the resumes do too."""
    resume = ["--resume", "--data-dir", str(mnist_dir), "--no-progress"]
    runs = {}
    for name in ("straight", "stopped"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        for file in ("checkpoint.npz", "config.json"):
            shutil.copy(DATA / "run-v0.1" / file, runs[name] / file)

    def interrupt(trainer, epoch, step):
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    with parallel.threads(1):
        assert train_cli.main(["--out", str(runs["straight"]), *resume]) == 0
        header = load_checkpoint(runs["stopped"] / "checkpoint.npz")[0]
        assert "loop_version" not in header and header["train_config"]["data_dir"] is None
        cfg = TrainConfig.from_dict({**train_config_of(header, "v0.1").as_dict(), "data_dir": str(mnist_dir)})
        with pytest.raises(KeyboardInterrupt):
            RunTrainer(cfg, runs["stopped"], progress=False, on_step=interrupt).fit(resume=True)
        assert load_checkpoint(runs["stopped"] / "checkpoint.npz")[0]["step_in_epoch"] == 2
        assert train_cli.main(["--out", str(runs["stopped"]), *resume]) == 0
    states = {name: load_checkpoint(run / "checkpoint.npz")[1] for name, run in runs.items()}
    assert sorted(states["straight"]) == sorted(states["stopped"])
    for name in states["straight"]:
        np.testing.assert_array_equal(states["stopped"][name], states["straight"][name], err_msg=name)
    strip = lambda run: [{k: v for k, v in json.loads(l).items() if "second" not in k}
                         for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in strip(runs["straight"])] == [1, 2]
    assert_records_match(strip(runs["stopped"]), strip(runs["straight"]), rel=1e-9)

    with np.load(DATA / "run-v0.1" / "uninterrupted-weights.npz") as expected:
        assert sorted(expected.files) == sorted(states["straight"])
        for name in expected.files:
            np.testing.assert_allclose(states["straight"][name], expected[name], rtol=1e-6, atol=1e-7,
                                       err_msg=name)


def test_a_run_folder_from_capsnet_0_2_resumes_to_the_same_weights(tmp_path):
    """tests/fixtures/run-v0.2 was written by capsnet 0.2.0 (commit 0a448cf, the last before
    the training package was split, NumPy 2.4.6), on the MNIST sample, one host thread: a
    tiny CapsNet stopped by Ctrl-C after step 3 of epoch 1; uninterrupted-weights.npz holds
    0.2.0's weights at the end of the same run without the stop. Today's loop resumes it and
    ends there, to the rounding another machine's BLAS may bring (the tolerance of the 0.1
    test above, for the same reasons: a few float32 Adam steps)."""
    run = tmp_path / "run"
    run.mkdir()
    for file in ("checkpoint.npz", "config.json"):
        shutil.copy(DATA / "run-v0.2" / file, run / file)
    assert load_checkpoint(run / "checkpoint.npz")[0]["loop_version"] == 2
    with parallel.threads(1):
        assert train_cli.main(["--out", str(run), "--resume", "--no-progress"]) == 0
    state = load_checkpoint(run / "checkpoint.npz")[1]
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with np.load(DATA / "run-v0.2" / "uninterrupted-weights.npz") as expected:
        assert sorted(expected.files) == sorted(state)
        for name in expected.files:
            np.testing.assert_allclose(state[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_checkpoint_from_an_unknown_loop_version_is_refused_with_the_reason(mnist_dir, tmp_path):
    cfg = small_config(mnist_dir, epochs=1)
    RunTrainer(cfg, tmp_path / "run", progress=False).fit()
    header, model_state, optim_state = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    save_checkpoint(tmp_path / "run" / "checkpoint.npz", model_state=model_state, optimizer_state=optim_state,
                    header={**header, "loop_version": 99})
    with pytest.raises(CheckpointError, match="loop_version 99"):
        RunTrainer(small_config(mnist_dir, epochs=2), tmp_path / "run", progress=False).fit(resume=True)


def test_multimnist_run_learns_and_resumes_exactly(mnist_dir, tmp_path):
    """A small two-digit CapsNet on 1,500 MultiMNIST pairs: the pair error falls well below
    what guessing gives (a random pair of classes is right 1 time in 45), and a run stopped
    after one epoch and resumed ends with the weights of one that never stopped."""
    from capsnet.training import RunTrainer, TrainConfig  # noqa: PLC0415

    base = dict(data_dir=str(mnist_dir), dataset="multimnist", batch_size=50, train_limit=1500, test_limit=200,
                test_pairs=2, model={"conv_channels": 32, "primary_types": 8, "decoder_hidden": [64, 128]})
    whole = RunTrainer(TrainConfig(epochs=2, **base), tmp_path / "whole", progress=False, log=False)
    history = whole.fit()
    assert len(history) == 2 and "test_error" in history[-1]
    assert history[-1]["test_error"] == pytest.approx(1 - history[-1]["test_accuracy"])
    assert history[-1]["test_accuracy"] > 3 / 45, history  # more than 3x guessing (0.118 when written)
    RunTrainer(TrainConfig(epochs=1, **base), tmp_path / "cut", progress=False, log=False).fit()
    resumed = RunTrainer(TrainConfig(epochs=2, **base), tmp_path / "cut", progress=False, log=False)
    resumed.fit(resume=True)
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    # python -m capsnet.evaluate knows the checkpoint's dataset: the same fixed test pairs
    from capsnet.evaluate import main  # noqa: PLC0415

    out = tmp_path / "eval.json"
    assert main([str(tmp_path / "whole" / "checkpoint.npz"), "--data-dir", str(mnist_dir), "--test-limit", "200",
                 "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 400 and result["accuracy"] == pytest.approx(history[-1]["test_accuracy"])
