#!/usr/bin/env bash
# The `gpu` spec (specs/gpu.toml) on a borrowed GPU machine that has no network and takes at most
# 64 MiB of files per call (docs/gpu.md, "The gpu spec"). The source GGUF (98 MB) does not fit in
# one call, so the inputs travel in two:
#
#   scripts/gpu_run.sh prepare   here: build masa --features cuda, fetch what the spec reads, and
#                                stage .device/a (binary, first part of the source) and .device/b
#                                (rest of the source, corpus, PIQA); prints the two device calls
#   scripts/gpu_run.sh check     device call 1 (carry .device/a): install the binary and the first
#                                part under $STAGE, then scripts/gpu_check.sh (NO_CHECK=1 skips it;
#                                BENCH=1 adds scripts/bench_gpu.sh, BENCH_COMPILE=0 without compile)
#   scripts/gpu_run.sh run [S]   device call 2 (carry .device/b; within the machine's warm window
#                                after call 1): assemble $MASA_HOME, `masa run gpu` for at most S
#                                seconds (default 540), report to $OUT/gpu-results.tar.gz. Run it
#                                again (no carry needed) to resume a run cut off by S. A finished
#                                run is followed by `parity`.
#   scripts/gpu_run.sh parity    the real source and data on both devices ($OUT/parity.txt):
#                                200 PIQA items of a fine-tuned student of the run (identical
#                                predictions, log-likelihood differences) and calibration
#                                statistics of 4,096 tokens (worst relative error per site)
#
# Overrides for a dry run on a CPU machine: SPEC (a spec name or file), DEVICE (cpu), STAGE,
# MASA_HOME, RUNS, OUT.
# Under `set -e`: every command that may fail on purpose ends in `|| true` or is tested.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
stage=${STAGE:-/tmp/masa-stage}
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
limit=$((64 * 1024 * 1024))

# Bytes that travel with every call: tracked files and untracked files git does not ignore.
tree_bytes() {
    { git ls-files -z; git ls-files -z -o --exclude-standard; } | { xargs -0 -r stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'
}

case $what in
prepare)
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    source scripts/ensure_rust.sh
    cargo build --release --features cuda
    source scripts/masa_bin.sh
    masa=$MASA_BIN
    home=${MASA_HOME:-$HOME/.cache/masa}
    "$masa" fetch smollm2-135m corpus piqa
    src="$home/models/smollm2-135m/$gguf"
    [ -f "$src" ] || { echo "gpu_run: $src is missing after masa fetch" >&2; exit 1; }
    rm -rf .device && mkdir -p .device/a .device/b
    gzip -9 -c "$masa" > .device/a/masa.gz
    # Home files the spec reads: the default corpus and PIQA (xz, unpacked with Python's tarfile).
    tar -C "$home" -cJf .device/b/home.tar.xz corpus/default tasks/piqa tasks/splits.json
    tree=$(tree_bytes)
    size=$(stat -c %s "$src")
    # Part 1 fills call 1 (less 1 MiB of margin); part 2 is the rest.
    part1=$((limit - tree - $(stat -c %s .device/a/masa.gz) - 1024 * 1024))
    [ "$part1" -gt 0 ] || { echo "gpu_run: the working tree ($tree bytes) leaves no room for the source" >&2; exit 1; }
    [ "$part1" -lt "$size" ] || part1=$size
    head -c "$part1" "$src" > .device/a/source.part1
    tail -c +$((part1 + 1)) "$src" > .device/b/source.part2
    sha256sum "$src" | awk -v n="$gguf" '{print $1 "  " n}' > .device/b/source.sha256
    for call in a b; do
        bytes=$((tree + $(du -cb .device/$call | tail -1 | cut -f1)))
        printf 'call with .device/%s: %d bytes of %d (tree %d)\n' $call $bytes $limit "$tree"
        [ "$bytes" -le "$limit" ] || { echo "gpu_run: .device/$call is over the 64 MiB a call takes" >&2; exit 1; }
    done
    cat <<EOF
Device calls (docs/gpu.md, "The gpu spec"); send the second within the machine's warm window:
  1. run(command="scripts/gpu_run.sh check", carry=[".device/a"], timeout_s=300)
  2. run(command="scripts/gpu_run.sh run 540", carry=[".device/b"], timeout_s=600)
  (cut off by the 540 s: run(command="scripts/gpu_run.sh run 540", timeout_s=600) resumes)
EOF
    ;;
check)
    mkdir -p "$stage"
    gzip -dc .device/a/masa.gz > "$stage/masa.tmp" && chmod +x "$stage/masa.tmp" && mv "$stage/masa.tmp" "$stage/masa"
    cp .device/a/source.part1 "$stage/source.part1"
    echo "gpu_run: staged the binary and $(stat -c %s "$stage/source.part1") bytes of the source in $stage"
    if [ "${NO_CHECK:-0}" != 1 ]; then
        mkdir -p "${OUT:-/tmp}"
        scripts/gpu_check.sh "$stage/masa" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
    fi
    if [ "${BENCH:-0}" = 1 ]; then
        scripts/bench_gpu.sh "$stage/masa" 2>&1 | tee "${OUT:-/tmp}/bench_gpu.log"
    fi
    ;;
run)
    secs=${2:-540}
    export MASA_HOME=${MASA_HOME:-/tmp/masa-home}
    runs=${RUNS:-/tmp/masa-runs}
    out=${OUT:-/tmp/gpu-out}
    mkdir -p "$out"
    model="$MASA_HOME/models/smollm2-135m/$gguf"
    if [ ! -f "$model" ]; then
        [ -f "$stage/source.part1" ] && [ -x "$stage/masa" ] \
            || { echo "gpu_run: $stage has no binary or first part of the source: run \`scripts/gpu_run.sh check\` (call 1) on this machine first" >&2; exit 3; }
        [ -f .device/b/source.part2 ] || { echo "gpu_run: .device/b/source.part2 is missing: carry .device/b" >&2; exit 3; }
        mkdir -p "$(dirname "$model")"
        cat "$stage/source.part1" .device/b/source.part2 > "$model.tmp"
        want=$(cut -d' ' -f1 .device/b/source.sha256)
        got=$(sha256sum "$model.tmp" | cut -d' ' -f1)
        [ "$got" = "$want" ] || { rm -f "$model.tmp"; echo "gpu_run: the reassembled source has sha256 $got, expected $want" >&2; exit 3; }
        mv "$model.tmp" "$model"
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .device/b/home.tar.xz "$MASA_HOME"
        echo "gpu_run: assembled $MASA_HOME (source sha256 verified, corpus, PIQA)"
    fi
    [ "${DEVICE:-cuda}" = cpu ] || source scripts/gpu_env.sh
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    set +e
    SECONDS=0
    timeout "$secs" "$stage/masa" run "${SPEC:-gpu}" --runs "$runs" ${DEVICE:+--device "$DEVICE"} 2>&1 | tee -a "$out/run.log"
    rc=${PIPESTATUS[0]}
    set -e
    name=$(basename "${SPEC:-gpu}" .toml)
    echo "gpu_run: masa run exited $rc after $SECONDS s (124: cut off at $secs s; run again to resume)"
    if [ -f "$runs/$name/results.json" ]; then
        tar -C "$runs/$name" -czf "$out/gpu-results.tar.gz" $(cd "$runs/$name" && ls -d report.md report.html results.json plots 2>/dev/null)
        ls -la "$out"
    fi
    [ "$rc" != 0 ] || [ "${DEVICE:-cuda}" = cpu ] || "$0" parity || true
    exit "$rc"
    ;;
parity)
    export MASA_HOME=${MASA_HOME:-/tmp/masa-home}
    runs=${RUNS:-/tmp/masa-runs}
    out=${OUT:-/tmp/gpu-out}
    mkdir -p "$out"
    [ "${DEVICE:-cuda}" = cpu ] || source scripts/gpu_env.sh
    ckpt=$(ls -d "$runs"/artifacts/finetune-*/sft/model 2>/dev/null | head -1) || true
    [ -n "$ckpt" ] || { echo "gpu_run: no fine-tuned student under $runs/artifacts" >&2; exit 3; }
    for d in cpu ${DEVICE:-cuda}; do
        "$stage/masa" eval "$ckpt" --tasks piqa --limit 200 --device "$d" --out "$out/piqa_$d.json" 2>&1 | tail -1
    done
    python3 - "$out/piqa_cpu.json" "$out/piqa_${DEVICE:-cuda}.json" "$ckpt" <<'PY' | tee "$out/parity.txt"
import json, sys
a, b = (json.load(open(p))["tasks"]["piqa"]["items"] for p in sys.argv[1:3])
same = sum(x["pred"] == y["pred"] for x, y in zip(a, b))
dll = max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x["lls"], y["lls"]))
print(f"PIQA parity ({sys.argv[3]}): {same}/{len(a)} identical predictions (need >= 99%), "
      f"max |log-likelihood difference| {dll:.2e} nats: {'pass' if same >= 0.99 * len(a) and len(a) == len(b) else 'FAIL'}")
PY
    for d in cpu ${DEVICE:-cuda}; do
        "$stage/masa" calibrate smollm2-135m --tokens 4096 --device "$d" --out "$out/stats_$d.safetensors" 2>&1 | tail -1
    done
    python3 - "$out/stats_cpu.safetensors" "$out/stats_${DEVICE:-cuda}.safetensors" <<'PY' | tee -a "$out/parity.txt"
import json, struct, sys
import numpy as np
def load(p):
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head, data = json.loads(f.read(n)), f.read()
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], dtype="<f8") for k, v in head.items() if k != "__metadata__"}
a, b = load(sys.argv[1]), load(sys.argv[2])
def rel(x, y):
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300))
worst = max((rel(b[k], a[k]), k) for k in a if k in b)
ok = a.keys() == b.keys() and worst[0] < 1e-4
print(f"calibration parity (smollm2-135m, 4096 tokens): {len(a)} tensors, worst rel. error {worst[0]:.2e} ({worst[1]}) "
      f"(need < 1e-4): {'pass' if ok else 'FAIL'}")
PY
    rm -f "$out"/stats_*.safetensors
    ;;
*)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
