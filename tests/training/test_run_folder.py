"""capsnet.training.run_folder: one process holds a run folder; a second is refused with the
holder's pid, kill -9 frees it, and fit releases the lock however it ends."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import capsnet.train as train_cli
from capsnet.training import RunFolder, RunFolderError


REPO = Path(__file__).resolve().parents[2]


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


def test_a_second_process_is_refused_with_the_holders_pid_and_kill_9_frees_the_folder(make_trainer, tmp_path, holder):
    with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}") as info:
        make_trainer(tmp_path / "run").fit()
    assert info.value.reason == "locked" and info.value.pid == holder.pid
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    holder.send_signal(signal.SIGKILL)  # the kernel drops the lock with the process
    holder.wait()
    assert [r["epoch"] for r in make_trainer(tmp_path / "run", epochs=1).fit()] == [1]


def test_the_command_line_names_the_process_that_holds_the_folder(mnist_dir, tmp_path, holder, capsys):
    code = train_cli.main(["--out", str(tmp_path / "run"), "--data-dir", str(mnist_dir), "--train-limit", "50",
                           "--no-progress", "--model", "cnn"])
    assert code == 2
    assert f"is in use by process {holder.pid}" in capsys.readouterr().err


def test_the_lock_is_released_when_fit_ends_however_it_ends(make_trainer, tmp_path):
    def stop(trainer, epoch, step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run", on_step=stop).fit()
    assert RunFolder(tmp_path / "run").lock().locked  # free again: taken here at once
    with pytest.raises(RunFolderError, match="in use by process"):
        RunFolder(tmp_path / "run").lock()  # ... and now held by the object above


def test_a_whole_last_line_without_its_newline_gets_one_so_the_next_epoch_does_not_join_it(tmp_path):
    folder = RunFolder(tmp_path)
    folder.metrics.write_text('{"epoch": 1}\n{"epoch": 2}')
    assert folder.trim_metrics(2) == 0
    folder.append_metrics({"epoch": 3})
    assert [json.loads(line)["epoch"] for line in folder.metrics.read_text().splitlines()] == [1, 2, 3]
