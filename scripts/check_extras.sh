#!/usr/bin/env bash
# Each optional extra alone: for every extra named (default: all five), a fresh venv with
# only capsnet[EXTRA] and pytest (no --system-site-packages, which would hide a missing
# dependency; pip's cache is reused), then that extra's tests and the command that needs it,
# on the MNIST sample shipped with the package. A dependency that only another extra brings
# (Pillow through matplotlib, say) fails here.
#   bash scripts/check_extras.sh                 # safetensors mpi viz affnist svhn tensorboard
#   bash scripts/check_extras.sh tensorboard     # one of them
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
python="${PYTHON:-python}"
extras=("$@")
[ ${#extras[@]} -gt 0 ] || extras=(safetensors mpi viz affnist svhn tensorboard)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sample="$repo/capsnet/data/mnist_sample"
tiny=(--conv-channels 8 --primary-types 2 --primary-dim 4 --digit-dim 4 --decoder-hidden 16 32
      --epochs 1 --batch-size 25 --train-limit 50 --test-limit 20 --no-progress)

for extra in "${extras[@]}"; do
    start=$SECONDS
    env="$work/$extra"
    echo "== the $extra extra alone"
    "$python" -m venv "$env"
    py="$env/bin/python"
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet -e "$repo[$extra]" pytest
    run="$work/$extra-run"
    case "$extra" in
        safetensors)
            "$py" -m pytest -p no:cacheprovider -q tests/training/test_checkpoint.py -k safetensors
            "$py" -m capsnet.train --dataset mnist-sample "${tiny[@]}" --out "$run"
            "$py" -m capsnet.export "$run/best.npz" "$work/model.safetensors" ;;
        mpi)
            "$py" -m pytest -p no:cacheprovider -q tests/training/test_distributed.py
            # no thread variable set: each rank takes its share of the cores by itself
            env -u OMP_NUM_THREADS -u OPENBLAS_NUM_THREADS PATH="$env/bin:$PATH" \
                mpiexec -n 2 "$py" -m capsnet.train --dataset mnist-sample "${tiny[@]}" --out "$run" ;;
        viz)
            "$py" -m pytest -p no:cacheprovider -q tests/cli/test_visualize.py
            "$py" -m capsnet.train --dataset mnist-sample "${tiny[@]}" --out "$run"
            "$py" -m capsnet.visualize reconstructions "$run/best.npz" --out "$work/reconstructions.png" ;;
        affnist)
            "$py" -m pytest -p no:cacheprovider -q tests/data/test_affine.py
            # a 40x40 model (expanded MNIST, made from the sample's files) and a small affNIST-shaped .mat
            "$py" -m capsnet.train --dataset expanded --data-dir "$sample" "${tiny[@]}" --out "$run"
            "$py" - "$work/test.mat" <<'EOF'
import sys

import numpy as np
from scipy.io import savemat

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (1600, 20), dtype=np.uint8)  # 20 images of 40x40, one per column
savemat(sys.argv[1], {"affNISTdata": {"image": images, "label_int": rng.integers(0, 10, (1, 20))}})
EOF
            "$py" -m capsnet.robustness "$run/best.npz" --affnist "$work/test.mat" --data-dir "$sample" \
                --test-limit 20 --no-plot --no-progress --out "$work/robustness" ;;
        svhn)
            # the reader's tests, then --dataset svhn on files the tests write in SVHN's own format
            "$py" -m pytest -p no:cacheprovider -q tests/data/test_dataset_files.py tests/cli/test_datasets.py -k svhn ;;
        tensorboard)
            "$py" -m pytest -p no:cacheprovider -q tests/training/test_tensorboard.py
            "$py" -m capsnet.train --dataset mnist-sample "${tiny[@]}" --out "$run" --tensorboard "$work/tb"
            ls "$work/tb"/events.out.tfevents.* > /dev/null ;;
        *)
            echo "unknown extra: $extra (expected safetensors, mpi, viz, affnist, svhn or tensorboard)" >&2
            exit 2 ;;
    esac
    echo "the $extra extra alone: passed in $((SECONDS - start)) s"
done
