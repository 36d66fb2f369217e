"""What a new user hits (issue 32): each refusal says what to do, in the command line's
words, before any work, and leaves nothing behind."""
from __future__ import annotations

import pytest

from capsnet import evaluate as evaluate_cli, train as train_cli
from capsnet.training import RunTrainer, RunFolderError, TrainConfig

TINY = ["--conv-channels", "8", "--primary-types", "2", "--primary-dim", "4", "--digit-dim", "4",
        "--decoder-hidden", "16", "32"]
SAMPLE = ["--dataset", "mnist-sample", "--train-limit", "50", "--test-limit", "20", "--batch-size", "25",
          "--epochs", "1", *TINY, "--no-progress"]


@pytest.fixture
def no_data(monkeypatch):
    """Reading any MNIST file (every dataset is made from them) fails the test: a refusal
    must come before the data is read."""
    from capsnet.data import mnist  # noqa: PLC0415

    def fail(*args, **kwargs):
        pytest.fail("the data was read before the refusal")

    monkeypatch.setattr(mnist, "read_idx", fail)


def train(args, capsys) -> tuple[int, str, str]:
    code = train_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_out_naming_a_file_is_refused_naming_the_option(tmp_path, capsys, no_data):
    afile = tmp_path / "afile"
    afile.write_text("notes\n")
    code, _, err = train(["--out", afile, *SAMPLE], capsys)
    assert code == 2 and err == f"error: --out {afile} is a file, not a folder: choose another --out (a folder, made if missing)\n"
    assert afile.read_text() == "notes\n"


@pytest.mark.parametrize("flag,value,words", [("--lr", "-1", "--lr must be > 0, got -1.0"),
                                              ("--lr-decay", "0", "--lr-decay must be > 0, got 0.0"),
                                              ("--recon-weight", "-0.5", "--recon-weight must be >= 0, got -0.5")])
def test_a_bad_value_names_the_option_and_the_value(tmp_path, capsys, flag, value, words):
    code, _, err = train(["--out", tmp_path / "run", *SAMPLE, flag, value], capsys)
    assert code == 2 and err == f"error: {words}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,words", [
    (["--routing", "0"], "--routing must be at least 1, got 0"),
    (["--conv-channels", "0"], "--conv-channels must be at least 1, got 0"),
    (["--decoder-hidden", "512", "0"], "--decoder-hidden must be at least 1, got [512, 0]"),
    (["--model", "cnn", "--cnn-channels", "0", "5"], "--cnn-channels must be at least 1, got [0, 5]"),
    (["--model", "em", "--caps1", "0"], "--caps1 must be at least 1, got 0")])
def test_a_model_size_below_one_names_the_flag_not_the_layer(tmp_path, capsys, flags, words):
    data = ["--dataset", "mnist-sample", "--train-limit", "50", "--test-limit", "20", "--no-progress"]
    code, _, err = train(["--out", tmp_path / "run", *data, *flags], capsys)
    assert code == 2 and err == f"error: {words}\n"
    assert not (tmp_path / "run").exists()


def test_a_dataset_that_does_not_train_the_model_says_model_not_arch(tmp_path, capsys, no_data):
    code, _, err = train(["--out", tmp_path / "run", "--dataset", "multimnist", "--model", "cnn"], capsys)
    assert code == 2 and err == "error: --dataset multimnist trains --model capsnet only; got --model cnn\n"


def test_a_text_file_as_a_checkpoint_gets_no_advice_to_unpickle_it(tmp_path, capsys):
    text = tmp_path / "notes.npz"
    text.write_text("these are my notes\n")
    assert evaluate_cli.main([str(text), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not an .npz archive" in err and "pickle" not in err
    assert "resume" not in err  # training advice does not belong to evaluate


def test_evaluate_on_a_damaged_checkpoint_gives_no_training_advice(tmp_path, capsys):
    damaged = tmp_path / "best.npz"
    damaged.write_bytes(b"PK\x03\x04 cut short")
    assert evaluate_cli.main([str(damaged), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "resume" not in err and "run folder" not in err


def test_resume_into_a_folder_without_a_checkpoint_leaves_nothing_behind(tmp_path, capsys, no_data):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for folder in (missing, empty):
        code, _, err = train(["--out", folder, "--resume", "--no-progress"], capsys)
        assert code == 2 and err == f"error: --resume: no checkpoint in {folder} (expected checkpoint.npz)\n"
    assert not missing.exists() and list(empty.iterdir()) == []


def test_the_library_refuses_a_resume_without_a_checkpoint_before_making_the_folder(tmp_path):
    cfg = TrainConfig(dataset="mnist-sample", train_limit=50, test_limit=20, batch_size=25, epochs=1,
                      model={"conv_channels": 8, "primary_types": 2, "primary_dim": 4, "digit_dim": 4,
                             "decoder_hidden": [16, 32]})
    with pytest.raises(RunFolderError, match="holds no checkpoint") as info:
        RunTrainer(cfg, tmp_path / "missing", progress=False, log=False).fit(resume=True)
    assert info.value.reason == "empty" and not (tmp_path / "missing").exists()


def test_resume_on_a_finished_run_says_there_is_nothing_to_do(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = train(["--out", out, *SAMPLE], capsys)
    assert code == 0, err
    code, text, err = train(["--out", out, "--resume", "--no-progress"], capsys)
    assert code == 0 and err == ""
    assert text.splitlines()[-1] == (f"{out} has already trained 1 epoch (--epochs 1): nothing to do. To train "
                                     "on, resume with a higher --epochs (e.g. --resume --epochs 11)")
