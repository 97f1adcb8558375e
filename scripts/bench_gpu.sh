#!/usr/bin/env bash
# masa's CUDA engine vs PyTorch on the same GPU, same shapes and batches (issue 13): full training
# steps (forward, CE, backward, clip 1.0, AdamW) on random tokens. masa: bf16 tensor-core
# products, f32 master weights; PyTorch: bf16 autocast, SDPA, fused AdamW, eager and
# torch.compile. Prints a Markdown table last (tokens/s, ratio, MFU vs the measured bf16 matmul
# rate, device memory). Logs and JSON lines under ${OUT:-/tmp}/bench_gpu.
#
#   scripts/bench_gpu.sh [MASA_BINARY] [SHAPES...]   shapes: small smollm paper (default all)
#   BENCH_COMPILE=0 skips torch.compile.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/masa_bin.sh
masa=${1:-$MASA_BIN}
shift || true
shapes=${*:-small smollm paper}
source scripts/gpu_env.sh
out=${OUT:-/tmp}/bench_gpu
mkdir -p "$out"
res="$out/results.jsonl"
: > "$res"
python3 scripts/bench_gpu_torch.py --peak >> "$res" 2>> "$out/log.txt"
for s in $shapes; do
    case $s in
        small) cfg=cpu-6l-256 b=32 t=256 ;;
        smollm) cfg=smollm2-135m b=16 t=1024 ;;
        paper) cfg=paper-12l-1024 b=8 t=2048 ;;
        *) echo "unknown shape $s" >&2; exit 2 ;;
    esac
    c=scripts/bench_configs/$cfg.json
    echo "== $cfg ${b}x$t" >&2
    "$masa" bench train "$c" --batch $b --seq $t --warmup 3 --steps 10 --device cuda --precision bf16 >> "$res" 2>> "$out/log.txt" || echo "masa failed on $cfg" >&2
    # The same with the flash-attention kernels forced on (masa picks them only when the stored
    # probabilities would not fit), for comparison.
    MASA_FLASH=1 "$masa" bench train "$c" --batch $b --seq $t --warmup 3 --steps 10 --device cuda --precision bf16 >> "$res" 2>> "$out/log.txt" || echo "masa (flash) failed on $cfg" >&2
    python3 scripts/bench_gpu_torch.py --config "$c" --batch $b --seq $t >> "$res" 2>> "$out/log.txt" || echo "torch eager failed on $cfg" >&2
    if [ "${BENCH_COMPILE:-1}" != 0 ]; then
        python3 scripts/bench_gpu_torch.py --config "$c" --batch $b --seq $t --compile >> "$res" 2>> "$out/log.txt" || echo "torch.compile failed on $cfg" >&2
    fi
done
python3 - "$res" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
peak = next((r["flops_per_s"] for r in rows if r.get("bench") == "peak_bf16_matmul"), None)
def cfg_of(r):
    return json.load(open(r["config"]))
def flops_per_token(c, t):
    # 6 N (matrices incl. the lm head) + causal attention 6·L·h·t (QKᵀ and PV, fwd+bwd, half masked)
    h, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    n = L * (h * (h + 2 * kv) + h * h + 3 * h * f) + v * h
    return 6 * n + 6 * L * h * t
print(f"\nbf16 matmul peak measured: {peak / 1e12:.0f} TFLOP/s" if peak else "")
print("| shape | batch | impl | tokens/s | vs eager | MFU | device mem (MiB) |")
print("|---|---|---|---|---|---|---|")
by = {}
for r in rows:
    if "tokens_per_s" in r:
        name = r["config"].split("/")[-1].removesuffix(".json")
        impl = r.get("impl") or ("masa, flash attention" if "flash" in r["device"] else "masa")
        by.setdefault((name, r["batch"], r["seq"]), {})[impl] = r
for (name, b, t), impls in by.items():
    eager = impls.get("torch eager", {}).get("tokens_per_s")
    for impl in ("masa", "masa, flash attention", "torch eager", "torch.compile"):
        r = impls.get(impl)
        if not r:
            continue
        tps = r["tokens_per_s"]
        mfu = tps * flops_per_token(cfg_of(r), t) / peak if peak else float("nan")
        ratio = f"{tps / eager:.2f}x" if eager else "-"
        mem = r.get("device_mem_mb") or r.get("peak_mem_mb") or float("nan")
        print(f"| {name} | {b}x{t} | {impl} | {tps:,.0f} | {ratio} | {mfu:.1%} | {mem:,.0f} |")
PY
