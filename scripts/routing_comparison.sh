#!/usr/bin/env bash
# Dynamic routing, EM routing, self-attention routing and the baseline CNN side by side on
# MNIST (issue 22, part 3): what README's comparison table needs, measured on this machine.
# Every training resumes (capsnet.train --resume) and every later step is skipped when its
# output exists, so the script can be interrupted and run again. It prints what it measured;
# nothing is written into README by it.
#
#   scripts/routing_comparison.sh [RUNS_DIR]
#
# 1. MNIST accuracy after each epoch: each network with its own loss and training defaults
#    (capsnet: margin + reconstruction, Adam 1e-3; efficient: the same loss, Adam 5e-4, batch
#    16; em: spread loss, Adam 3e-3, batch 32; cnn: cross-entropy) for EPOCHS epochs. The
#    per-epoch test accuracy is in RUNS_DIR/mnist-<model>/metrics.jsonl (with images/s of
#    training); the command for one of them is the `train` line below.
# 2. Robustness: the four trained on expanded MNIST (40x40, shifts of up to 6 px) at one shared
#    budget (EXPANDED_TRAIN digits, EXPANDED_EPOCHS epochs), then python -m capsnet.robustness
#    on all four (rotation sweep and the affNIST-style mixed set).
# 3. Parameters and inference images/s of each trained network (python -m capsnet.evaluate on
#    the full test set, timed).
#
# Budgets (environment): EPOCHS (default 10), TRAIN_LIMIT (default all 60000), EXPANDED_TRAIN
# (default 10000), EXPANDED_EPOCHS (default 1), ROBUST_TEST (default 500). MODELS (default
# "capsnet em efficient cnn") picks the networks. Needs the full MNIST ($CAPSNET_DATA_DIR or
# --data-dir) and, for the robustness plot, matplotlib.
set -euo pipefail
runs=${1:-runs/routing}
mkdir -p "$runs"
epochs=${EPOCHS:-10}
train_limit=${TRAIN_LIMIT:-60000}
exp_train=${EXPANDED_TRAIN:-10000}
exp_epochs=${EXPANDED_EPOCHS:-1}
robust_test=${ROBUST_TEST:-500}
models=${MODELS:-"capsnet em efficient cnn"}

train() {  # train OUT ARGS...: start the run, or resume it if its folder has a checkpoint
    local out=$1; shift
    if [ -e "$out/checkpoint.npz" ]; then
        python -m capsnet.train --out "$out" --resume --no-progress "$@"
    else
        python -m capsnet.train --out "$out" --no-progress "$@"
    fi
}

echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "== 1. MNIST, $train_limit training images, $epochs epoch(s) each"
for m in $models; do
    echo "-- train: python -m capsnet.train --model $m --train-limit $train_limit --epochs $epochs --out $runs/mnist-$m"
    train "$runs/mnist-$m" --model "$m" --train-limit "$train_limit" --epochs "$epochs"
done

echo "== 2. expanded MNIST: $exp_train digits, $exp_epochs epoch(s) each, then the robustness sweeps"
checkpoints=()
for m in $models; do
    train "$runs/expanded-$m" --model "$m" --dataset expanded --train-limit "$exp_train" --test-limit 2000 \
        --epochs "$exp_epochs"
    checkpoints+=("$runs/expanded-$m/checkpoint.npz")
done
if [ ! -e "$runs/robustness/robustness.json" ]; then
    python -m capsnet.robustness "${checkpoints[@]}" --test-limit "$robust_test" --out "$runs/robustness" \
        --no-progress
fi

echo "== 3. parameters and inference images/s (full test set)"
for m in $models; do
    if [ ! -e "$runs/mnist-$m/evaluate.json" ]; then
        start=$(date +%s.%N)
        python -m capsnet.evaluate "$runs/mnist-$m/best.npz" --no-progress --json "$runs/mnist-$m/evaluate.json" \
            > /dev/null
        end=$(date +%s.%N)
        python -c "import sys; print(f'$m: inference {10000 / ($end - $start):.1f} images/s (whole command, 10000 images)')" \
            | tee "$runs/mnist-$m/inference.txt"
    fi
    python -c "
from capsnet.training import load_model
from capsnet.models import n_parameters
model, _ = load_model('$runs/mnist-$m/best.npz')
print('$m:', type(model).__name__, f'{n_parameters(model):,} parameters')"
    echo "$m per epoch:"; cat "$runs/mnist-$m/metrics.jsonl"
done
