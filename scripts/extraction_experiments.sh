#!/usr/bin/env bash
# The extraction numbers of docs/extraction.md, rerunnable: calibration of SmolLM2-135M on the
# default corpus, exact extraction at M/W ratios 0.12 and 0.23 (all 90 matrices), a λ sweep on
# a subset of layers, and the paper's minibatch mode on the same tokens for timing.
# Outputs under runs/extraction/ (a summary in runs/extraction/summary.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/masa_bin.sh
M=$MASA_BIN
OUT=runs/extraction
TOKENS="${TOKENS:-262144}"
SWEEP_LAYERS="${SWEEP_LAYERS:-0,7,15,22,29}"
mkdir -p "$OUT"
cargo build --release
STATS="$OUT/stats-$TOKENS.safetensors"
if [[ ! -f "$STATS" ]]; then
    /usr/bin/time -f "calibrate wall %e s" $M calibrate smollm2-135m --tokens "$TOKENS" --out "$STATS" 2>&1 | tee "$OUT/calibrate.log"
fi
for ratio in 0.12 0.23; do
    [[ -f "$OUT/genes-$ratio.safetensors" ]] || $M extract smollm2-135m --stats "$STATS" --ratio "$ratio" --out "$OUT/genes-$ratio.safetensors" 2>&1 | tee "$OUT/extract-$ratio.log"
done
for lambda in 0 0.001 0.01 0.1 1; do
    f="$OUT/sweep-lambda-$lambda.safetensors"
    [[ -f "$f" ]] || $M extract smollm2-135m --stats "$STATS" --ratio 0.12 --lambda "$lambda" --layers "$SWEEP_LAYERS" --out "$f" 2>&1 | tail -1
done
# The paper's procedure vs exact mode on the same tokens: a 16,384-token calibration (the same
# stream as the first 16,384 tokens above), layer 15's three matrices, λ = 0.
SMALL="$OUT/stats-16384.safetensors"
[[ -f "$SMALL" ]] || $M calibrate smollm2-135m --tokens 16384 --out "$SMALL" 2>&1 | tail -1
EX="$OUT/exact-16k-layer15.safetensors"
[[ -f "$EX" ]] || $M extract smollm2-135m --stats "$SMALL" --ratio 0.12 --lambda 0 --layers 15 --out "$EX" 2>&1 | tail -1
MB="$OUT/minibatch-16k-layer15.safetensors"
[[ -f "$MB" ]] || $M extract smollm2-135m --stats "$SMALL" --ratio 0.12 --lambda 0 --layers 15 --mode minibatch \
    --tokens 16384 --epochs "${EPOCHS:-80}" --lr 3e-3 --out "$MB" 2>&1 | tee "$OUT/minibatch.log"
python3 scripts/extraction_summary.py "$OUT" > "$OUT/summary.md"
cat "$OUT/summary.md"
