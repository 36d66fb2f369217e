#!/usr/bin/env bash
# The paper's experiments beyond MNIST accuracy, at the scale of a 2-core CPU, and the PNGs
# README.md shows. Every step resumes (capsnet.train --resume) or is skipped when its output
# exists, so the script can be interrupted and run again.
#
#   scripts/paper_experiments.sh [RUNS_DIR] [FIGURES_DIR]
#
# 1. Affine robustness (section 5.2): the CapsNet and the baseline CNN trained on the same
#    expanded-MNIST digits (40x40 canvas, shifts of up to 6 px) for the same epochs, then
#    python -m capsnet.robustness on both (rotation, scale and shear sweeps, and the
#    affNIST-style mixed set).
# 2. MultiMNIST (section 6): the paper's CapsNet on 36x36 pairs for MULTI_EPOCHS epochs.
# 3. The figures, from those runs.
#
# Budgets (environment): EXPANDED_TRAIN (training digits, default 10000), EXPANDED_EPOCHS
# (default 1), ROBUST_TEST (test digits per setting, default 500), MULTI_EPOCHS (default 4, about an hour here),
# MULTI_TRAIN (default all 60000). Needs the full MNIST ($CAPSNET_DATA_DIR or --data-dir),
# matplotlib (pip install 'capsnet[viz]').
set -euo pipefail
runs=${1:-runs/paper}
figures=${2:-scripts/results/figures}
mkdir -p "$runs" "$figures"
exp_train=${EXPANDED_TRAIN:-10000}
exp_epochs=${EXPANDED_EPOCHS:-1}
robust_test=${ROBUST_TEST:-500}
multi_epochs=${MULTI_EPOCHS:-4}
multi_train=${MULTI_TRAIN:-60000}

train() {  # train OUT ARGS...: start the run, or resume it if its folder has a checkpoint
    local out=$1; shift
    if [ -e "$out/checkpoint.npz" ]; then
        python -m capsnet.train --out "$out" --resume --no-progress "$@"
    else
        python -m capsnet.train --out "$out" --no-progress "$@"
    fi
}

echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "== 1. expanded MNIST: $exp_train digits, $exp_epochs epoch(s), CapsNet and baseline CNN"
train "$runs/expanded-capsnet" --dataset expanded --train-limit "$exp_train" --test-limit 2000 --epochs "$exp_epochs"
train "$runs/expanded-cnn" --dataset expanded --model cnn --train-limit "$exp_train" --test-limit 2000 \
    --epochs "$exp_epochs"
if [ ! -e "$runs/robustness/robustness.json" ]; then
    python -m capsnet.robustness "$runs/expanded-capsnet/checkpoint.npz" "$runs/expanded-cnn/checkpoint.npz" \
        --test-limit "$robust_test" --out "$runs/robustness" --no-progress
fi
cp "$runs/robustness/robustness.json" "$runs/robustness/robustness.png" "$figures/"

echo "== 2. MultiMNIST: $multi_train training pairs per epoch, $multi_epochs epoch(s)"
train "$runs/multimnist" --dataset multimnist --train-limit "$multi_train" --epochs "$multi_epochs"
cp "$runs/multimnist/metrics.jsonl" "$figures/multimnist-metrics.jsonl"

echo "== 3. figures"
viz() { python -m capsnet.visualize "$@"; }
viz multimnist "$runs/multimnist/checkpoint.npz" -n 10 --out "$figures/multimnist.png"
viz perturbation "$runs/multimnist/checkpoint.npz" --index 0 --out "$figures/perturbation.png"
viz reconstructions "$runs/expanded-capsnet/checkpoint.npz" -n 10 --out "$figures/reconstructions.png"
viz routing "$runs/expanded-capsnet/checkpoint.npz" --index 0 --out "$figures/routing.png"
viz confusion "$runs/expanded-capsnet/checkpoint.npz" --out "$figures/confusion-expanded-capsnet.png"
viz curves "$runs/multimnist" --out "$figures/curves-multimnist.png"
cat "$runs"/*/metrics.jsonl > /dev/null
for r in expanded-capsnet expanded-cnn multimnist; do echo "$r: $(tail -n 1 "$runs/$r/metrics.jsonl")"; done
