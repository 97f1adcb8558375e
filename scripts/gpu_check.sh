#!/usr/bin/env bash
# Device check of masa's CUDA engine (issue 13), on a machine with an NVIDIA GPU, from the repo
# root: the GPU engine against the CPU engine (f64) on fresh random weights and batches, in f32
# and bf16 (logits, loss, every gradient, plain and distillation loss), determinism, and 50-step
# loss curves GPU vs CPU. Two shapes: cpu-6l-256 (tied head, multi-head attention) and a small
# grouped-query shape with an untied head. Exits non-zero if any check fails.
#
#   scripts/gpu_check.sh [MASA_BINARY]     (default: the release binary in CARGO_TARGET_DIR or target/, built with --features cuda)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/masa_bin.sh
masa=${1:-$MASA_BIN}
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true
status=0
for spec in "cpu-6l-256.json --batch 4 --seq 64" "check-gqa-untied.json --batch 4 --seq 128"; do
    set -- $spec
    echo "== $1"
    "$masa" bench cuda-check "scripts/bench_configs/$1" "${@:2}" --steps 50 || status=1
done
exit $status
