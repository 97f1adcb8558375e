#!/usr/bin/env bash
# Paper-size sources on this machine (docs/extraction.md "Paper-size sources"): for each preset,
# `masa synth` a synthetic checkpoint, `masa calibrate` it under /usr/bin/time -v (peak RSS,
# tokens/s), and for OLMo-7B time `masa extract` of layer 0 (two 11008×4096 and one 4096×11008
# matrices) at r = 634 and r = 2324 (layer-0 statistics of 4,096 tokens: more than r); then delete the checkpoint before the next one, so the
# disk holds one source at a time (OLMo-7B 13.8 GB, OLMoE 13.8 GB, DeepSeekMoE 32.8 GB, plus the
# statistics).
#
# usage: scripts/bench_sources.sh [PRESET...]   (default: olmo-7b olmoe-1b-7b deepseek-moe-16b)
# env:   DIR=/work/synth (outside any repository; needs ~45 GB free for DeepSeekMoE)
#        MASA=$CARGO_TARGET_DIR/release/masa THREADS=2 TOKENS=512 BATCH=2 SEQ=256
#        RANK_olmo_7b=634 RANK_olmoe_1b_7b=128 RANK_deepseek_moe_16b=64 (rank-specific mode:
#        full d×d sums of these models are 35–89 GB; see the docs for the sizes per rank)
# Logs: $DIR/<preset>-{synth,calibrate,extract-r*}.log (the `time -v` report at the end).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/masa_bin.sh"
MASA="$(realpath "${MASA:-$MASA_BIN}")"
DIR="${DIR:-/work/synth}" THREADS="${THREADS:-2}" TOKENS="${TOKENS:-512}" BATCH="${BATCH:-2}" SEQ="${SEQ:-256}"
PRESETS=("$@")
[[ ${#PRESETS[@]} -gt 0 ]] || PRESETS=(olmo-7b olmoe-1b-7b deepseek-moe-16b)
[[ -x "$MASA" ]] || { echo "no $MASA: build it with cargo build --release" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"
timed() { local log="$1"; shift; echo "[bench_sources] $* (load: $(cut -d' ' -f1-3 /proc/loadavg))" | tee "$log" >&2; /usr/bin/time -v "$@" >>"$log" 2>&1; grep -E "calibrated|wrote|extracted|Elapsed|Maximum resident" "$log" >&2 || true; }
for p in "${PRESETS[@]}"; do
    var="RANK_${p//-/_}"
    rank="${!var:-}"
    [[ -n "$rank" ]] || { case "$p" in olmo-7b) rank=634;; olmoe-1b-7b) rank=128;; *) rank=64;; esac; }
    rm -rf "$DIR/$p"
    timed "$p-synth.log" "$MASA" synth --config "$p" --out "$DIR/$p"
    timed "$p-calibrate.log" "$MASA" --threads "$THREADS" calibrate "$DIR/$p" --tokens "$TOKENS" --batch "$BATCH" --seq "$SEQ" --rank "$rank" --out "$DIR/$p-r$rank.safetensors"
    if [[ "$p" == olmo-7b ]]; then
        timed "$p-extract-r634.log" "$MASA" --threads "$THREADS" extract "$DIR/$p" --stats "$DIR/$p-r$rank.safetensors" --rank "$rank" --layers 0 --out "$DIR/$p-genes-r$rank.safetensors"
        timed "$p-calibrate-r2324.log" "$MASA" --threads "$THREADS" calibrate "$DIR/$p" --tokens 4096 --batch 8 --seq 256 --rank 2324 --layers 0 --out "$DIR/$p-r2324-layer0.safetensors"
        timed "$p-extract-r2324.log" "$MASA" --threads "$THREADS" extract "$DIR/$p" --stats "$DIR/$p-r2324-layer0.safetensors" --rank 2324 --layers 0 --out "$DIR/$p-genes-r2324.safetensors"
    fi
    rm -rf "$DIR/$p" "$DIR/$p"-r*.safetensors
done
