#!/usr/bin/env python3
"""PyTorch side of masa's GPU training-step benchmark (scripts/bench_gpu.sh).

A randomly initialised HF LlamaForCausalLM (f32 master weights) from an HF-style config.json,
trained on random tokens the way a PyTorch user would on one GPU: bf16 autocast, SDPA attention,
fused AdamW(lr 4e-4, betas (0.9, 0.95), weight decay 0.1), clip_grad_norm_(1.0); `--compile`
wraps the model in torch.compile. Each timed step ends with loss.item() (the device is idle at
the end of a step, as in masa's bench). Prints one JSON line: median tokens/s, peak device memory.
`--peak` instead measures the bf16 matrix-product rate (8192^3, random data) used for MFU.
"""
import argparse
import json
import statistics
import sys
import time

import torch

from bench_train_torch import CONFIG_KEYS  # the HF config fields both benchmarks build from


def log(msg):
    print(f"[bench_gpu_torch] {msg}", file=sys.stderr, flush=True)


def peak_rate():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak", action="store_true", help="measure the bf16 matmul rate and exit")
    args = ap.parse_args()
    if args.peak:
        print(json.dumps({"bench": "peak_bf16_matmul", "flops_per_s": peak_rate(),
                          "device": torch.cuda.get_device_name()}), flush=True)
        return

    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    with open(args.config) as f:
        raw = json.load(f)
    cfg = LlamaConfig(**{k: raw[k] for k in CONFIG_KEYS if k in raw}, use_cache=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).cuda().float().train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    run = torch.compile(model) if args.compile else model
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = args.batch * args.seq
    times, losses = [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g, device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        dt = time.perf_counter() - t
        del out
        if i >= args.warmup:
            times.append(dt)
            losses.append(loss)
        log(f"{'warmup' if i < args.warmup else 'step'} {i}: {dt * 1e3:.1f} ms, {tokens / dt:,.0f} tokens/s, loss {loss:.4f}")
    med = statistics.median(times)
    print(json.dumps({
        "bench": "train_gpu", "impl": "torch.compile" if args.compile else "torch eager",
        "torch": torch.__version__, "config": args.config, "params": n_params,
        "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "tokens_per_s": tokens / med, "median_s": med, "losses": losses,
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
        # In use on the device at the end, allocator cache and CUDA context included (as masa's).
        "device_mem_mb": (lambda f: (f[1] - f[0]) / 2 ** 20)(torch.cuda.mem_get_info()),
        "device": torch.cuda.get_device_name(),
    }), flush=True)


if __name__ == "__main__":
    main()
