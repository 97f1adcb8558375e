#!/usr/bin/env bash
# The most useful thing masa does end to end today (until `masa run` lands): fetch SmolLM2-135M
# and the default corpus, check the forward pass against transformers, calibrate on the corpus,
# and extract gene matrices for all 90 FFN matrices. Outputs go to runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS="${TOKENS:-65536}"
OUT=runs/quickstart
mkdir -p "$OUT"
echo "== building masa"
cargo build --release
M=./target/release/masa
echo "== fetching SmolLM2-135M and the default multi-domain corpus"
$M fetch smollm2-135m corpus
echo "== the source model"
$M inspect smollm2-135m
echo "== parity with HF transformers (reference NLLs in ../shared/reference, if present)"
REF=../shared/reference/smollm2-135m/transformers_logits.json
if [[ -f "$REF" ]]; then
    $M score smollm2-135m "$REF" --out "$OUT/score.json"
fi
echo "== calibration: $TOKENS tokens over all domains"
$M calibrate smollm2-135m --tokens "$TOKENS" --out "$OUT/stats.safetensors"
echo "== extraction: gene matrices at M/W ratio 0.12"
$M extract smollm2-135m --stats "$OUT/stats.safetensors" --ratio 0.12 --out "$OUT/genes.safetensors"
echo "== done: $OUT/genes.safetensors, per-matrix report in $OUT/genes.report.json"
