#!/usr/bin/env bash
# Forward (prefill, logits included) throughput: masa vs PyTorch eager, same shapes, run one
# after the other (never concurrently) on the same machine.
#
# usage: scripts/bench_forward.sh [MODEL]
#   MODEL: a GGUF path or a masa model name (default smollm2-135m; masa fetches it).
# env:   BATCH=8 SEQ=256 THREADS=2 ITERS=5 WARMUP=1 MASA=$CARGO_TARGET_DIR/release/masa
#        OUTDIR=runs/bench   TORCH_ATTN=sdpa (or eager)   TORCH_AUTOCAST=none (or bf16)
#        SKIP_MASA=1 / SKIP_TORCH=1
#        PATHS="fused candle" (masa's forward implementations to time: `bench forward --path`)
#        ROUNDS=1: alternate masa and PyTorch this many times (a noisy machine drifts over
#          minutes; interleaved rounds see the same drift), then print each round's ratio of
#          medians and the ratio of the best iterations
#        BASELINE=BIN: also time another masa binary each round (e.g. the previous build), as
#          path `baseline` (its first path of $PATHS)
# Results: $OUTDIR/forward-masa-{fused,candle}.json and forward-torch.json (with ROUNDS > 1:
# $OUTDIR/round-N/...), then tokens/s and the ratio masa/torch for each path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${1:-smollm2-135m}"
BATCH="${BATCH:-8}" SEQ="${SEQ:-256}" THREADS="${THREADS:-2}"
ITERS="${ITERS:-5}" WARMUP="${WARMUP:-1}"
source scripts/masa_bin.sh
MASA="${MASA:-$MASA_BIN}"
OUTDIR="${OUTDIR:-runs/bench}"
PY="${PY:-$ROOT/.venv-bench/bin/python}"
mkdir -p "$OUTDIR"
PATHS="${PATHS:-fused candle}"
T_JSON="$OUTDIR/forward-torch.json"

# The torch side needs the GGUF file itself (masa fetches it when given a model name).
if [[ ! -e "$MODEL" && -x "$MASA" ]]; then
    "$MASA" fetch "$MODEL" >&2
fi
if [[ -f "$MODEL" ]]; then
    GGUF="$MODEL"
else
    GGUF="$(ls "${MASA_HOME:-$HOME/.cache/masa}/models/$MODEL/"*.gguf 2>/dev/null | head -1 || true)"
    [[ -n "$GGUF" ]] || { echo "no GGUF for $MODEL under ${MASA_HOME:-$HOME/.cache/masa}/models (run: $MASA fetch $MODEL)" >&2; exit 1; }
fi

ROUNDS="${ROUNDS:-1}"
BASE_PATH="${PATHS%% *}"
round() {  # round OUT_DIR
    local D="$1"
    mkdir -p "$D"
    if [[ "${SKIP_MASA:-0}" != 1 ]]; then
        [[ -x "$MASA" ]] || { echo "no $MASA: build it with cargo build --release" >&2; exit 1; }
        for P in $PATHS; do
            echo "[bench_forward] masa: $MASA --threads $THREADS bench forward $MODEL --batch $BATCH --seq $SEQ --path $P" >&2
            "$MASA" --threads "$THREADS" bench forward "$MODEL" --batch "$BATCH" --seq "$SEQ" \
                --warmup "$WARMUP" --iters "$ITERS" --path "$P" --json "$D/forward-masa-$P.json"
        done
        if [[ -n "${BASELINE:-}" ]]; then
            echo "[bench_forward] baseline: $BASELINE --threads $THREADS bench forward $MODEL --path $BASE_PATH" >&2
            "$BASELINE" --threads "$THREADS" bench forward "$MODEL" --batch "$BATCH" --seq "$SEQ" \
                --warmup "$WARMUP" --iters "$ITERS" --path "$BASE_PATH" --json "$D/forward-masa-baseline.json"
        fi
    fi
    if [[ "${SKIP_TORCH:-0}" != 1 ]]; then
        [[ -x "$PY" ]] || { echo "no $PY: run scripts/setup_bench_env.sh" >&2; exit 1; }
        echo "[bench_forward] torch: bench_forward_torch.py --gguf $GGUF" >&2
        "$PY" scripts/bench_forward_torch.py --gguf "$GGUF" --batch "$BATCH" --seq "$SEQ" \
            --threads "$THREADS" --iters "$ITERS" --warmup "$WARMUP" --attn "${TORCH_ATTN:-sdpa}" \
            --autocast "${TORCH_AUTOCAST:-none}" --json "$D/forward-torch.json" >/dev/null
    fi
}

NAMES="$PATHS${BASELINE:+ baseline}"
if [[ "$ROUNDS" == 1 ]]; then
    round "$OUTDIR"
    for P in $NAMES; do
        python3 scripts/bench_compare.py "$OUTDIR/forward-masa-$P.json" "$T_JSON" \
            "forward ($P) $(basename "$GGUF") B=$BATCH T=$SEQ threads=$THREADS"
    done
else
    for i in $(seq 1 "$ROUNDS"); do round "$OUTDIR/round-$i"; done
    python3 - "$OUTDIR" "$ROUNDS" $NAMES <<'PY'
import json, statistics, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def times(path):
    d = json.load(open(path))
    return d.get("seconds") or d["times_s"]
torch = [times(f"{out}/round-{i}/forward-torch.json") for i in range(1, rounds + 1)]
for n in names:
    masa = [times(f"{out}/round-{i}/forward-masa-{n}.json") for i in range(1, rounds + 1)]
    per = [statistics.median(t) / statistics.median(m) for m, t in zip(masa, torch)]
    best = min(map(min, torch)) / min(map(min, masa))
    print(f"{n:9s} ratio masa/torch per round (medians): {' / '.join(f'{r:.3f}' for r in per)}"
          f"   median {statistics.median(per):.3f}   best iterations {best:.3f}")
PY
fi
