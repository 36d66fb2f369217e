#!/usr/bin/env bash
# Build the sdist and the wheel (python -m build: the wheel is built from the sdist, so a file
# missing from the sdist fails here too), check what the wheel holds and its size, install it
# into a fresh venv outside the work tree and use it from there: import, --help and --version
# of every command, a tiny training through Trainer and python -m capsnet.train, both on the
# MNIST sample installed with the package, with no download.
#
# Usage: bash scripts/check_wheel.sh   (needs: pip install build; PyPI for numpy and tqdm)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m build --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/*.whl)"
sdist="$(ls "$work"/dist/*.tar.gz)"
python - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile
from pathlib import Path

wheel, sdist = map(Path, sys.argv[1:])
names = zipfile.ZipFile(wheel).namelist()
sample = sorted(n for n in names if n.startswith("capsnet/data/mnist_sample/"))
expected = [f"capsnet/data/mnist_sample/{f}" for f in (
    "README.md", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")]
if sample != expected:
    sys.exit(f"the wheel should hold the MNIST sample {expected}, holds {sample}")
stray = [n for n in names if not (n.startswith("capsnet/") or ".dist-info/" in n)]
if stray:
    sys.exit(f"the wheel should hold only the capsnet package, also holds {stray}")
in_sdist = tarfile.open(sdist).getnames()
if any("/tests/fixtures/" in n for n in in_sdist):
    sys.exit("tests/fixtures (the 0.1 run folder) should stay out of the sdist")
limit = 2 * 1024 * 1024
size = wheel.stat().st_size
print(f"wheel {wheel.name}: {size / 1024:.0f} KiB, {len(names)} files "
      f"(the MNIST sample {sum(zipfile.ZipFile(wheel).getinfo(n).compress_size for n in sample) / 1024:.0f} KiB); "
      f"sdist {sdist.name}: {sdist.stat().st_size / 1024:.0f} KiB")
if size > limit:
    sys.exit(f"the wheel should stay under {limit // 1024} KiB, it is {size // 1024} KiB")
PY

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$wheel"
cd "$work"  # outside the work tree: what runs is the wheel's capsnet, not the source
bin="$work/venv/bin"
"$bin/python" - "$work/venv" <<'PY'
import sys
import capsnet, capsnet.data, capsnet.layers, capsnet.models, capsnet.optim, capsnet.training
assert capsnet.__file__.startswith(sys.argv[1]), f"capsnet imported from {capsnet.__file__}, not the venv"
print(f"import capsnet {capsnet.__version__} from {capsnet.__file__}")
PY
"$bin/python" -m capsnet.train --help > /dev/null
for cli in train evaluate export robustness visualize; do
    "$bin/capsnet-$cli" --help > /dev/null
    [ "$("$bin/capsnet-$cli" --version)" = "capsnet $("$bin/python" -c 'import capsnet; print(capsnet.__version__)')" ]
done
echo "capsnet-{train,evaluate,export,robustness,visualize} --help and --version: ok"

# A tiny training through Trainer on the packaged sample.
"$bin/python" - <<'PY'
import numpy as np
from capsnet.data import ArrayDataset, load_mnist_sample, to_float
from capsnet.layers import CapsuleLength, Conv2d, DigitCaps, MarginLoss, PrimaryCaps, ReLU, Sequential
from capsnet.optim import Adam
from capsnet.training import Trainer

mnist = load_mnist_sample()
train = ArrayDataset(to_float(mnist.train_images[:1000]), mnist.train_labels[:1000])
test = ArrayDataset(to_float(mnist.test_images[:200]), mnist.test_labels[:200])
rng = np.random.default_rng(0)
model = Sequential(Conv2d(1, 16, 9, seed=rng), ReLU(), PrimaryCaps(16, n_types=4, dim=8, seed=rng),
                   DigitCaps(144, 8, 10, 8, seed=rng), CapsuleLength())
history = Trainer(model, MarginLoss(), Adam(model.parameters(), lr=1e-2), train, "runs/trainer", epochs=2,
                  batch_size=50, eval_data=test, progress=False).fit()
assert history[-1]["test_accuracy"] > 0.5, history  # chance is 0.1 (0.685 with NumPy 2.4 on the project's machine)
print(f"Trainer on the sample: test accuracy {history[-1]['test_accuracy']:.3f}")
PY
# python -m capsnet.train on the packaged sample, with no data folder and no network needed.
CAPSNET_DATA_DIR="$work/no-mnist" XDG_CACHE_HOME="$work/no-cache" "$bin/python" -m capsnet.train \
    --dataset mnist-sample --epochs 1 --train-limit 500 --test-limit 200 --batch-size 50 --conv-channels 16 \
    --primary-types 4 --digit-dim 8 --decoder-hidden 32 64 --no-progress --out "$work/runs/cli" | tee "$work/cli.log"
grep -q "not the full MNIST" "$work/cli.log"
grep -q '"dataset": "mnist-sample"' "$work/runs/cli/config.json"
# Replicas in worker processes: the workers (python -m capsnet._worker) import capsnet from the
# venv, not from the work tree (run from outside it).
(cd "$work" && OMP_NUM_THREADS=2 "$bin/python" -m capsnet.train --model efficient --replicas processes \
    --dataset mnist-sample --epochs 1 --train-limit 128 --test-limit 64 --batch-size 32 --no-progress \
    --out "$work/runs/processes" | tee "$work/processes.log")
grep -q '"replicas": "processes"' "$work/processes.log"
echo "wheel smoke test: ok"
