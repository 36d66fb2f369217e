#!/usr/bin/env bash
# The README's figure for the baseline CNN: the paper's baseline (35.4M parameters) trained
# for one epoch on the full MNIST training set (60,000 images, shifts of up to 2 px, Adam 1e-3,
# batch 100), then tested on all 10,000 test images. Prints the epoch's metrics line and the
# machine. Needs the full MNIST (--data-dir, $CAPSNET_DATA_DIR or the per-user cache).
set -euo pipefail
out=${1:-runs/baseline-cnn-cpu-1epoch}
rm -rf "$out"
python -m capsnet.train --model cnn --backend numpy --epochs 1 --batch-size 100 --out "$out" --no-progress
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
cat "$out/metrics.jsonl"
