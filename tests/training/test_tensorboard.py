"""TensorBoard curves while training: what is written and when, read back from the event
files; a resume that continues the curves without duplicate steps; rank 0 alone under MPI;
a clear error without tensorboardX."""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from capsnet import train as train_cli
from capsnet.models import CapsNetConfig
from capsnet.training import RunTrainer, TrainConfig

needs_tensorboardx = pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None,
                                        reason="needs tensorboardX: pip install 'capsnet[tensorboard]'")
SMALL = dict(conv_channels=8, primary_types=2, primary_dim=4, digit_dim=4, decoder_hidden=[16, 32])


def small_config(**kw) -> TrainConfig:
    """300 sample images in batches of 50: 6 steps an epoch, a log every 4 steps."""
    base = dict(dataset="mnist-sample", dtype="float64", epochs=2, batch_size=50, train_limit=300, test_limit=60,
                log_every=4, model={**CapsNetConfig().as_dict(), **SMALL})
    return TrainConfig(**{**base, **kw})


def read_events(logdir: Path) -> list:
    """Every event of the folder's files, in TensorBoard's order (file names, then records)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # a record: length (8 bytes), its crc (4), the event, its crc (4)
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
    return events


def curves(logdir: Path) -> tuple[dict[str, dict[int, float]], dict[str, list[int]]]:
    """({scalar tag: {step: value}}, {image tag: [steps]}) as TensorBoard shows them: a session
    START at step s (tensorboardX's purge_step) drops every event at step >= s before it.
    Fails on a step written twice that TensorBoard would show."""
    from tensorboardX.proto.event_pb2 import SessionLog

    shown: list[tuple[str, int, object]] = []
    for event in read_events(logdir):
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            shown = [item for item in shown if item[1] < event.step]
        for value in event.summary.value:
            kind = "image" if value.HasField("image") else "scalar"
            shown.append((value.tag, event.step, value.simple_value if kind == "scalar" else kind))
    keys = [(tag, step) for tag, step, _ in shown]
    assert len(keys) == len(set(keys)), f"steps written twice: {sorted(k for k in keys if keys.count(k) > 1)}"
    scalars: dict[str, dict[int, float]] = {}
    images: dict[str, list[int]] = {}
    for tag, step, value in shown:
        if value == "image":
            images.setdefault(tag, []).append(step)
        else:
            scalars.setdefault(tag, {})[step] = value
    return scalars, images


@needs_tensorboardx
def test_every_metric_each_interval_and_epoch_the_lr_and_reconstructions(tmp_path):
    run = tmp_path / "run"
    history = RunTrainer(small_config(), run, progress=False, log=False, tensorboard=run / "tb").fit()
    scalars, images = curves(run / "tb")
    # 6 steps an epoch, a log every 4: steps 4 and 6, then 10 and 12
    for tag in ("train/loss", "train/accuracy", "lr"):
        assert sorted(scalars[tag]) == [4, 6, 10, 12], tag
    assert scalars["lr"][4] == pytest.approx(1e-3) and scalars["lr"][10] == pytest.approx(0.9e-3)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records == history
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "train_images_per_second"):
        assert scalars[f"epoch/{key}"] == {6 * (i + 1): pytest.approx(r[key], rel=1e-6) for i, r in enumerate(records)}
    # at an epoch's last step the running means are the epoch's
    assert scalars["train/loss"][6] == pytest.approx(records[0]["train_loss"], rel=1e-6)
    assert scalars["train/accuracy"][12] == pytest.approx(records[1]["train_accuracy"], rel=1e-6)
    assert images == {"images/inputs": [6, 12], "images/reconstructions": [6, 12]}


@needs_tensorboardx
@pytest.mark.parametrize("stop", [
    ("ctrl-c", 0, 1),   # mid-interval: the checkpoint at step 2, the last curve point at none
    ("ctrl-c", 1, 3),   # on an interval: the checkpoint and a point at step 10
    ("crash", 1, 4),    # a crash after step 11: the last checkpoint is epoch 1's (step 6), the curves went on to 10
])
def test_a_resumed_run_continues_the_curves_without_duplicate_steps(tmp_path, stop):
    kind, at_epoch, at_step = stop
    straight = tmp_path / "straight"
    RunTrainer(small_config(), straight, progress=False, log=False, tensorboard=straight / "tb").fit()

    def interrupt(trainer, epoch, step):
        if (epoch, step) == (at_epoch, at_step):
            raise KeyboardInterrupt if kind == "ctrl-c" else RuntimeError("the node went down")

    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt if kind == "ctrl-c" else RuntimeError):
        RunTrainer(small_config(), stopped, progress=False, log=False, on_step=interrupt,
                     tensorboard=stopped / "tb").fit()
    before, _ = curves(stopped / "tb")
    resumed = RunTrainer(small_config(), stopped, progress=False, log=False, tensorboard=stopped / "tb")
    resumed.fit(resume=True)
    if kind == "crash":  # the crashed run had written step 10, which the resumed run writes again
        assert 10 in before["train/loss"]
    after, images = curves(stopped / "tb")
    expected, expected_images = curves(straight / "tb")
    assert sorted(after) == sorted(expected)
    for tag in expected:
        assert sorted(after[tag]) == sorted(expected[tag]), tag
        if "second" not in tag:  # the same numbers (but the timings): the resume is exact on the CPU
            assert after[tag] == pytest.approx(expected[tag], rel=1e-9, abs=1e-12), tag
    assert images == expected_images


@pytest.mark.parametrize("missing", ["tensorboardX", "PIL"])  # PIL: tensorboardX imports it at the first image
def test_without_tensorboardx_the_option_fails_at_the_start_naming_the_extra(monkeypatch, tmp_path, capsys, missing):
    from capsnet.data import mnist

    pil = sys.modules.get("PIL")
    if pil is not None and hasattr(pil, "Image"):
        # a PIL.Image imported afresh while hidden replaces the package's attribute too; put back,
        # or a later savefig (matplotlib: from PIL import Image) finds no PNG writer in it
        monkeypatch.setattr(pil, "Image", pil.Image)
    monkeypatch.setitem(sys.modules, missing, None)  # importing it raises ImportError
    monkeypatch.delitem(sys.modules, "PIL.Image", raising=False)
    monkeypatch.setattr(mnist, "read_idx", lambda *a, **k: pytest.fail("the data was read before the refusal"))
    out = tmp_path / "run"
    code = train_cli.main(["--dataset", "mnist-sample", "--out", str(out), "--tensorboard", str(tmp_path / "tb"),
                           "--epochs", "1", "--train-limit", "50", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensorboard" in err and "pip install 'capsnet[tensorboard]'" in err
    assert "needs the tensorboardX package and Pillow" in err and missing in err
    assert not out.exists() and not (tmp_path / "tb").exists()
    with pytest.raises(ImportError, match=r"pip install 'capsnet\[tensorboard\]'"):
        RunTrainer(small_config(), out, progress=False, log=False, tensorboard=tmp_path / "tb")


@needs_tensorboardx
def test_only_rank_0_writes_under_mpi(mnist_dir, tmp_path):
    from tests.training.mpi import needs_mpi, run, train_args

    if needs_mpi.args[0]:
        pytest.skip(needs_mpi.kwargs["reason"])
    out, tb = tmp_path / "run", tmp_path / "tb"
    done = run(2, ["--", *train_args(mnist_dir, out, epochs=1), "--tensorboard", str(tb)])
    assert done.returncode == 0, done.stderr
    files = list(tb.glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # rank 1 opened no writer
    scalars, _ = curves(tb)
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["world_size"] == 2
    # 230 images in batches of 50: 5 steps, a log every 2
    assert sorted(scalars["train/loss"]) == [2, 4, 5]
    assert scalars["epoch/test_accuracy"] == {5: pytest.approx(record["test_accuracy"], rel=1e-6)}
    assert np.isfinite(list(scalars["train/loss"].values())).all()
