"""``python -m capsnet.train``: train the CapsNet, the paper's baseline CNN, Efficient-CapsNet
or matrix capsules with EM routing on a registered dataset (MNIST, expanded MNIST, MultiMNIST,
the packaged sample; :mod:`capsnet.training.datasets`), resumable, on one process or several
under MPI. The parser (:func:`build_parser`), the step from flags to a TrainConfig on top of a
checkpoint's (:func:`config_from_args`) and :func:`main`; ``--help`` lists every option."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from capsnet import __version__, backend
from capsnet.training import distributed
from capsnet.training.strategy import strategy_for
from capsnet.data import MNISTDownloadError, MNISTFormatError, MNISTNotFoundError
from capsnet.models import BaselineCNNConfig, CapsNetConfig, MatrixCapsNetConfig, n_parameters
from capsnet.training import RunTrainer, CheckpointError, RunFolderError, TrainConfig, TrainingDiverged, train_config_of
from capsnet.training.checkpoint import load_checkpoint
from capsnet.training.datasets import DATASETS
from capsnet.training.tensorboard import summary_writer_class
from capsnet.training.run import ARCH_DEFAULTS, AUGMENTS, describe_dataset

MODEL_FLAGS = {
    "conv_channels": int, "conv_kernel": int, "primary_types": int, "primary_dim": int,
    "primary_kernel": int, "primary_stride": int, "digit_dim": int, "digit_init_std": float,
}
CAPSNET_KEYS = (*MODEL_FLAGS, "routing_iterations", "detach_routing", "decoder_hidden", "decoder")
CNN_KEYS = {"cnn_channels": "channels", "cnn_fc": "fc", "dropout": "dropout", "pool": "pool"}
EM_KEYS = ("conv_channels", "primary_types", "caps1", "caps2", "routing_iterations", "detach_routing",
           "inverse_temperature")
EFFICIENT_KEYS = ("decoder_hidden",)
# the model flags each architecture takes
ARCH_KEYS = {"capsnet": CAPSNET_KEYS, "cnn": tuple(CNN_KEYS), "em": EM_KEYS, "efficient": EFFICIENT_KEYS}
ALL_MODEL_KEYS = {*CAPSNET_KEYS, *CNN_KEYS, *EM_KEYS, *EFFICIENT_KEYS}
SAMPLE_HINT = ("To train now with no download, on the MNIST sample installed with capsnet (5,000 training and 1,000 "
               "test images; a sample, not MNIST): python -m capsnet.train --dataset mnist-sample")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m capsnet.train``; unset options stay unset (they come from the checkpoint on --resume)."""
    d = TrainConfig()
    m = CapsNetConfig()
    p = argparse.ArgumentParser(
        prog="python -m capsnet.train",
        description="Train the CapsNet of Sabour, Frosst and Hinton (2017) on MNIST, expanded MNIST, "
                    "MultiMNIST, Fashion-MNIST, CIFAR-10, SVHN or smallNORB, or with --model cnn the paper's "
                    "baseline CNN. Defaults are the paper's setup: Adam 1e-3 with exponential "
                    "decay, shifts of up to 2 px, 3 routing iterations, reconstruction weight 0.0005. The run "
                    "folder gets checkpoint.npz (every epoch and on Ctrl-C), best.npz, metrics.jsonl and "
                    "config.json; one line per epoch goes to stdout.",
        epilog="examples:\n  python -m capsnet.train --dataset mnist-sample --epochs 1 --out runs/first   # no download\n"
               "  python -m capsnet.train --epochs 1 --out runs/cpu\n"
               "  python -m capsnet.train --backend cupy --batch-size 128 --epochs 50 --out runs/gpu\n"
               "  python -m capsnet.train --out runs/gpu --resume        # continue after an interruption\n"
               "  python -m capsnet.train --train-limit 5000 --test-limit 1000 --conv-channels 64 "
               "--primary-types 8 --epochs 3 --out runs/small\n"
               "  python -m capsnet.train --model cnn --epochs 1 --out runs/cnn   # the baseline CNN\n"
               "  python -m capsnet.train --dataset multimnist --epochs 4 --out runs/multimnist\n"
               "  python -m capsnet.train --dataset expanded --epochs 1 --out runs/expanded   # for capsnet.robustness\n"
               "  python -m capsnet.train --dataset cifar10 --data-dir ~/data/cifar10 --out runs/cifar10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # unset options fall back to the checkpoint on --resume
    )
    p.add_argument("--version", action="version", version=f"capsnet {__version__}")
    g = p.add_argument_group("run")
    g.add_argument("--backend", choices=backend.BACKENDS, help=f"array backend (default {d.backend})")
    g.add_argument("--dtype", choices=("float32", "float64"), help=f"floating type (default {d.dtype})")
    g.add_argument("--out", type=Path, help="run folder (default runs/capsnet)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--seed", type=int, help=f"seed for weights, data order and shifts (default {d.seed})")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--replicas", choices=("threads", "processes"),
                   help="where the model's replicas run, one per core and a slice of each batch each: threads of "
                        "this process, or worker processes (escape the GIL; faster for Efficient-CapsNet and EM). "
                        "Both give the same bits. Default: the model's choice, or $CAPSNET_REPLICAS")
    g.add_argument("--log-every", type=int, help=f"update the running loss every N steps (default {d.log_every})")
    g.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="write TensorBoard curves to DIR: the running loss, metrics and learning rate every "
                        "--log-every steps, each epoch's metrics, a few reconstructions each epoch for CapsNets "
                        "(needs tensorboardX: pip install 'capsnet[tensorboard]'); view with tensorboard --logdir DIR")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="folder with the dataset's files (else $CAPSNET_DATA_DIR, for datasets other "
                                      "than MNIST its subfolder named after the dataset, else a per-user cache, "
                                      "downloading there if missing)")
    g.add_argument("--train-limit", type=int, help="use only the first N training images")
    g.add_argument("--test-limit", type=int, help="use only the first N test images")
    g.add_argument("--dataset", choices=tuple(DATASETS),
                   help="; ".join(f"{name} ({spec.help})" for name, spec in DATASETS.items())
                        + f" (default {d.dataset})")
    g.add_argument("--max-shift", type=int, help="random shift of training digits in px (default: "
                   + ", ".join(f"{spec.max_shift} for {name}" for name, spec in DATASETS.items()) + ")")
    g.add_argument("--augment", choices=AUGMENTS,
                   help="training augmentation: shift (random shifts of up to --max-shift px) or efficient "
                        "(Efficient-CapsNet's: rotation of up to 30 degrees on half the images, a shift within the "
                        f"digit's margins, a horizontal squish, a 4x4 erase; --max-shift does not apply) (default {d.augment})")
    g.add_argument("--test-pairs", type=int, help="multimnist: fixed pairs per test image, from a seed of their "
                                                  f"own (default {d.test_pairs})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"total epochs (default {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    g.add_argument("--optimizer", choices=("adam", "sgd"), help=f"(default {d.optimizer})")
    g.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    g.add_argument("--lr-decay", type=float, help=f"learning rate factor per epoch (default {d.lr_decay})")
    g.add_argument("--lr-min", type=float, help=f"floor of the learning rate's decay (default {d.lr_min})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    g.add_argument("--weight-decay", type=float, help=f"L2 weight decay (default {d.weight_decay})")
    g.add_argument("--recon-weight", type=float, help=f"reconstruction loss weight (default {d.recon_weight})")
    g = p.add_argument_group("model (defaults: the paper's)")
    g.add_argument("--model", dest="arch", choices=("capsnet", "cnn", "efficient", "em"),
                   help="the CapsNet, the paper's baseline CNN, Efficient-CapsNet (self-attention routing; "
                        "default lr 5e-4, decay 0.97 down to 5e-5, batch 16) or matrix capsules with EM routing "
                        f"(spread loss; default lr 3e-3, decay 0.96, batch 32) (default {d.arch})")
    g = p.add_argument_group("CapsNet (--model capsnet)")
    g.add_argument("--routing", type=int, dest="routing_iterations",
                   help=f"routing iterations (default {m.routing_iterations})")
    g.add_argument("--detach-routing", action="store_true",
                   help="stop the gradient through the intermediate routing iterations")
    for name, kind in MODEL_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, help=f"(default {getattr(m, name)})")
    g.add_argument("--decoder-hidden", type=int, nargs="+", help=f"decoder hidden sizes (default {list(m.decoder_hidden)})")
    g.add_argument("--decoder", choices=("fc", "deconv"),
                   help=f"fully connected decoder, or one of transposed convolutions (default {m.decoder})")
    c = BaselineCNNConfig()
    g = p.add_argument_group("baseline CNN (--model cnn)")
    g.add_argument("--cnn-channels", type=int, nargs="+", help=f"convolution channels (default {list(c.channels)})")
    g.add_argument("--cnn-fc", type=int, nargs="+", help=f"fully connected sizes (default {list(c.fc)})")
    g.add_argument("--dropout", type=float, help=f"dropout before the output layer (default {c.dropout})")
    g.add_argument("--pool", action="store_true", help="2x2 max pooling after the first two convolutions")
    e = MatrixCapsNetConfig()
    g = p.add_argument_group("EM routing (--model em; also --conv-channels, --primary-types, --routing, "
                             "--detach-routing; the paper's smaller network: --conv-channels 64 --caps1 16 "
                             "--caps2 16; the paper's A=B=C=D=32: --conv-channels 32 --primary-types 32 "
                             "--caps1 32 --caps2 32)")
    g.add_argument("--caps1", type=int, help=f"types of the first ConvCaps layer (default {e.caps1})")
    g.add_argument("--caps2", type=int, help=f"types of the second ConvCaps layer (default {e.caps2})")
    g.add_argument("--inverse-temperature", type=float,
                   help=f"lambda of the last EM iteration (default {e.inverse_temperature})")
    return p


def config_from_args(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    """``base`` overridden by the options given on the command line."""
    values = base.as_dict()
    given = vars(args)
    arch = given.get("arch", base.arch)
    new_data = given.get("dataset", base.dataset) != base.dataset
    if arch != base.arch or new_data:  # another architecture or input: its own defaults
        values["model"] = None
    if new_data:  # the new dataset's own shift
        values["max_shift"] = None
    model = dict(values["model"] or {})
    if arch != base.arch:  # the new architecture's own training defaults, under the flags given
        values.update(ARCH_DEFAULTS.get(arch, {}))
    spec = DATASETS.get(given.get("dataset", base.dataset))
    if spec is not None and spec.archs is not None and arch not in spec.archs:
        raise ValueError(f"--dataset {spec.name} trains --model {' or --model '.join(spec.archs)} only; "
                         f"got --model {arch}")
    wrong = [key for key in given if key in ALL_MODEL_KEYS and key not in ARCH_KEYS[arch]]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ValueError(f"{flags} do{'es' if len(wrong) == 1 else ''} not apply to --model {arch}")
    for key, value in given.items():
        if key in ("out", "resume", "no_progress", "tensorboard"):
            continue
        if key in ALL_MODEL_KEYS:
            model[CNN_KEYS.get(key, key)] = list(value) if isinstance(value, list) else value
        else:
            values[key] = value
    values["model"] = model or None
    values["arch"] = arch
    return TrainConfig.from_dict(values)


FLAGS = {action.dest: action.option_strings[0] for action in build_parser()._actions if action.option_strings}
FLAGS.update({field: FLAGS[flag] for flag, field in CNN_KEYS.items() if field not in FLAGS})
"""The option that sets each configuration field (``lr``: ``--lr``, ``arch``: ``--model``)."""


def _base_config(out: Path, resume: bool, strategy: Any) -> TrainConfig:
    """The checkpoint's configuration on --resume (read by the writing process, sent to the others)."""
    def read() -> dict[str, Any] | None:
        path = out / "checkpoint.npz"
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"{out} is a file, not a folder", "file", out)
        if resume and not path.exists():  # refused before any data is read or folder made
            raise RunFolderError(f"no checkpoint in {out}", "empty", out)
        if resume:
            return train_config_of(load_checkpoint(path)[0], path).as_dict()
        return None

    value = strategy.on_writer(read)
    return TrainConfig.from_dict(value) if value is not None else TrainConfig()


def cli_message(exc: BaseException, out: Path, resume: bool = False) -> str:
    """The library's error in the command line's words: the run folder's refusals name --out and --resume."""
    if isinstance(exc, RunFolderError) and exc.reason == "occupied":
        return f"{out} already holds a run: pass --resume to continue it, or choose another --out"
    if isinstance(exc, RunFolderError) and exc.reason == "empty":
        return f"--resume: no checkpoint in {out} (expected checkpoint.npz)"
    if isinstance(exc, RunFolderError) and exc.reason == "file":
        return f"--out {out} is a file, not a folder: choose another --out (a folder, made if missing)"
    if isinstance(exc, CheckpointError) and not isinstance(exc, RunFolderError) and resume:
        return f"{exc}; or start a new run in another --out"
    if isinstance(exc, (MNISTNotFoundError, MNISTDownloadError)) and "mnist-sample" not in str(exc):
        return f"{exc}\n{SAMPLE_HINT}"
    if type(exc) is ValueError:  # a configuration field's refusal, "lr must be > 0, got -1.0": "--lr must ..."
        return re.sub(r"^(\w+) must", lambda m: f"{FLAGS.get(m[1], m[1])} must", str(exc))
    return str(exc)


def main(argv: list[str] | None = None, extensions: tuple = ()) -> int:
    """``python -m capsnet.train``: returns the exit status (0; 2 with the error on stderr; 1 when
    training diverged; 130 after Ctrl-C). ``extensions`` are added to the trainer
    (:class:`capsnet.training.Extension`), for programs that run the command line."""
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", Path("runs/capsnet"))
    resume = getattr(args, "resume", False)
    try:
        strategy = strategy_for(distributed.world())
    except ImportError as exc:  # under mpiexec without the mpi extra: every rank says so, none waits
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "tensorboard", None) is not None:
            summary_writer_class()  # a missing extra fails before the checkpoint or the data is read
        cfg = config_from_args(args, _base_config(out, resume, strategy))
        trainer = RunTrainer(cfg, out, progress=not getattr(args, "no_progress", False), strategy=strategy,
                             tensorboard=getattr(args, "tensorboard", None), extensions=extensions)
        trainer.checkpointer.resume_hint = "--resume"
        if strategy.writes:
            print(f"{type(trainer.model).__name__}: {n_parameters(trainer.model):,} parameters{strategy.across}; "
                  f"data {describe_dataset(cfg)}; run folder {out}; device: {backend.describe_device(cfg.backend)}",
                  flush=True)
        history = trainer.fit(resume=resume)
    except KeyboardInterrupt:
        return 130
    except TrainingDiverged as exc:  # every rank saw it: no rank is left waiting
        if strategy.writes:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except (backend.BackendError, CheckpointError, MNISTNotFoundError, MNISTDownloadError,
            MNISTFormatError, ValueError, OSError, ImportError) as exc:
        message = cli_message(exc, out, resume)
        print(f"error{strategy.here}: {message}", file=sys.stderr)
        strategy.fail(exc, 2, trace=False, message=message)  # under MPI: end every rank, never a hang
        return 2
    except Exception as exc:
        strategy.fail(exc, 1)
        raise
    if history and strategy.writes:
        print(json.dumps(history[-1]))
    elif strategy.writes:
        done = f"{trainer.epoch} epoch{'s' if trainer.epoch != 1 else ''}"
        print(f"{out} has already trained {done} (--epochs {trainer.epochs}): nothing to do. To "
              f"train on, resume with a higher --epochs (e.g. --resume --epochs {trainer.epoch + 10})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
