#!/usr/bin/env bash
# Forward (prefill, logits included) throughput: masa vs PyTorch eager, same shapes, run one
# after the other (never concurrently) on the same machine.
#
# usage: scripts/bench_forward.sh [MODEL]
#   MODEL: a GGUF path or a masa model name (default smollm2-135m; masa fetches it).
# env:   BATCH=8 SEQ=256 THREADS=2 ITERS=5 WARMUP=1 MASA=target/release/masa
#        OUTDIR=runs/bench   TORCH_ATTN=sdpa (or eager)   SKIP_MASA=1 / SKIP_TORCH=1
#        PATHS="fused candle" (masa's forward implementations to time: `bench forward --path`)
# Results: $OUTDIR/forward-masa-{fused,candle}.json and forward-torch.json, then tokens/s and
# the ratio masa/torch for each path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${1:-smollm2-135m}"
BATCH="${BATCH:-8}" SEQ="${SEQ:-256}" THREADS="${THREADS:-2}"
ITERS="${ITERS:-5}" WARMUP="${WARMUP:-1}"
MASA="${MASA:-target/release/masa}"
OUTDIR="${OUTDIR:-runs/bench}"
PY="${PY:-$ROOT/.venv-bench/bin/python}"
mkdir -p "$OUTDIR"
PATHS="${PATHS:-fused candle}"
T_JSON="$OUTDIR/forward-torch.json"

if [[ "${SKIP_MASA:-0}" != 1 ]]; then
    [[ -x "$MASA" ]] || { echo "no $MASA: build it with cargo build --release" >&2; exit 1; }
    for P in $PATHS; do
        echo "[bench_forward] masa: $MASA --threads $THREADS bench forward $MODEL --batch $BATCH --seq $SEQ --path $P" >&2
        "$MASA" --threads "$THREADS" bench forward "$MODEL" --batch "$BATCH" --seq "$SEQ" \
            --warmup "$WARMUP" --iters "$ITERS" --path "$P" --json "$OUTDIR/forward-masa-$P.json"
    done
fi

# The torch side needs the GGUF file itself.
if [[ -f "$MODEL" ]]; then
    GGUF="$MODEL"
else
    GGUF="$(ls "${MASA_HOME:-$HOME/.cache/masa}/models/$MODEL/"*.gguf 2>/dev/null | head -1 || true)"
    [[ -n "$GGUF" ]] || { echo "no GGUF for $MODEL under ${MASA_HOME:-$HOME/.cache/masa}/models (run: $MASA fetch $MODEL)" >&2; exit 1; }
fi

if [[ "${SKIP_TORCH:-0}" != 1 ]]; then
    [[ -x "$PY" ]] || { echo "no $PY: run scripts/setup_bench_env.sh" >&2; exit 1; }
    echo "[bench_forward] torch: bench_forward_torch.py --gguf $GGUF" >&2
    "$PY" scripts/bench_forward_torch.py --gguf "$GGUF" --batch "$BATCH" --seq "$SEQ" \
        --threads "$THREADS" --iters "$ITERS" --warmup "$WARMUP" --attn "${TORCH_ATTN:-sdpa}" \
        --json "$T_JSON" >/dev/null
fi

for P in $PATHS; do
    python3 scripts/bench_compare.py "$OUTDIR/forward-masa-$P.json" "$T_JSON" \
        "forward ($P) $(basename "$GGUF") B=$BATCH T=$SEQ threads=$THREADS"
done
