#!/usr/bin/env bash
# The README's CPU figure: the paper-sized CapsNet trained for one epoch on the full MNIST
# training set (60,000 images, shifts of up to 2 px), then tested on all 10,000 test images.
# Prints the epoch's metrics line (test accuracy, seconds) and the machine.
set -euo pipefail
out=${1:-runs/paper-cpu-1epoch}
rm -rf "$out"
python -m capsnet.train --backend numpy --epochs 1 --batch-size 100 --out "$out" --no-progress
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
cat "$out/metrics.jsonl"
