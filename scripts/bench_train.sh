#!/usr/bin/env bash
# Training-step throughput (forward, CE, backward, clip 1.0, AdamW step): masa vs PyTorch
# eager, same shape, random init, random tokens, run one after the other.
#
# usage: scripts/bench_train.sh CONFIG.json     (e.g. scripts/bench_configs/llama-7m.json)
# env:   BATCH=8 SEQ=128 THREADS=2 STEPS=10 WARMUP=2 MASA=$CARGO_TARGET_DIR/release/masa
#        OUTDIR=runs/bench   TORCH_ATTN=eager (or sdpa)   TORCH_AUTOCAST=none (or bf16)
#        SKIP_MASA=1 / SKIP_TORCH=1
# Results: $OUTDIR/train-<config>-{masa,torch}.json, then both tokens/s and the ratio.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG="${1:?usage: scripts/bench_train.sh CONFIG.json}"
BATCH="${BATCH:-8}" SEQ="${SEQ:-128}" THREADS="${THREADS:-2}"
STEPS="${STEPS:-10}" WARMUP="${WARMUP:-2}"
source scripts/masa_bin.sh
MASA="${MASA:-$MASA_BIN}"
OUTDIR="${OUTDIR:-runs/bench}"
PY="${PY:-$ROOT/.venv-bench/bin/python}"
NAME="$(basename "$CONFIG" .json)"
mkdir -p "$OUTDIR"
M_JSON="$OUTDIR/train-$NAME-masa.json" T_JSON="$OUTDIR/train-$NAME-torch.json"

if [[ "${SKIP_MASA:-0}" != 1 ]]; then
    [[ -x "$MASA" ]] || { echo "no $MASA: build it with cargo build --release" >&2; exit 1; }
    echo "[bench_train] masa: $MASA bench train $CONFIG --batch $BATCH --seq $SEQ --threads $THREADS" >&2
    "$MASA" bench train "$CONFIG" --batch "$BATCH" --seq "$SEQ" --threads "$THREADS" \
        --steps "$STEPS" --warmup "$WARMUP" --json "$M_JSON"
fi

if [[ "${SKIP_TORCH:-0}" != 1 ]]; then
    [[ -x "$PY" ]] || { echo "no $PY: run scripts/setup_bench_env.sh" >&2; exit 1; }
    echo "[bench_train] torch: bench_train_torch.py --config $CONFIG" >&2
    "$PY" scripts/bench_train_torch.py --config "$CONFIG" --batch "$BATCH" --seq "$SEQ" \
        --threads "$THREADS" --steps "$STEPS" --warmup "$WARMUP" --attn "${TORCH_ATTN:-eager}" \
        --autocast "${TORCH_AUTOCAST:-none}" --json "$T_JSON" >/dev/null
fi

python3 scripts/bench_compare.py "$M_JSON" "$T_JSON" "train $NAME B=$BATCH T=$SEQ threads=$THREADS"
