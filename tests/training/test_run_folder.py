"""capsnet.training.run_folder: one process holds a run folder; a second is refused with the
holder's pid, kill -9 frees it, and fit releases the lock however it ends."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import capsnet.train as train_cli
from capsnet.data import ArrayDataset, load_mnist, random_shift, to_float
from capsnet.layers import MarginLoss
from capsnet.optim import Adam
from capsnet.training import RunFolder, RunFolderError, Trainer

from tests.helpers import conv_net


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(mnist_dir):
    d = load_mnist(mnist_dir, download=False, progress=False)
    x, y = to_float(d.train_images[:200]), d.train_labels[:200]
    return (ArrayDataset(x, y, augment=lambda images, rng: random_shift(images, 2, rng)),
            ArrayDataset(to_float(d.test_images[:100]), d.test_labels[:100]))


def trainer(data, run_dir, *, epochs=3, optimizer=None, **kw):
    model = conv_net()
    optimizer = optimizer(model) if optimizer is not None else Adam(model.parameters(), lr=3e-3)
    train, test = data
    return Trainer(model, MarginLoss(), optimizer, train, run_dir, epochs=epochs, batch_size=50, eval_data=test,
                   seed=3, log_every=3, progress=False, log=False, **kw)


# -- one run folder, one process ----------------------------------------------------
HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from capsnet.training import RunFolder
RunFolder({folder!r}).lock()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/'run' (killed with SIGKILL at the end, or by the test)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO), folder=str(tmp_path / "run"))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_a_second_process_is_refused_with_the_holders_pid_and_kill_9_frees_the_folder(data, tmp_path, holder):
    with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}") as info:
        trainer(data, tmp_path / "run").fit()
    assert info.value.reason == "locked" and info.value.pid == holder.pid
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    holder.send_signal(signal.SIGKILL)  # the kernel drops the lock with the process
    holder.wait()
    assert [r["epoch"] for r in trainer(data, tmp_path / "run", epochs=1).fit()] == [1]


def test_the_command_line_names_the_process_that_holds_the_folder(mnist_dir, tmp_path, holder, capsys):
    code = train_cli.main(["--out", str(tmp_path / "run"), "--data-dir", str(mnist_dir), "--train-limit", "50",
                           "--no-progress", "--model", "cnn"])
    assert code == 2
    assert f"is in use by process {holder.pid}" in capsys.readouterr().err


def test_the_lock_is_released_when_fit_ends_however_it_ends(data, tmp_path):
    def stop(trainer, epoch, step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer(data, tmp_path / "run", on_step=stop).fit()
    assert RunFolder(tmp_path / "run").lock().locked  # free again: taken here at once
    with pytest.raises(RunFolderError, match="in use by process"):
        RunFolder(tmp_path / "run").lock()  # ... and now held by the object above
