#!/usr/bin/env python3
"""PyTorch-eager side of masa's training-step throughput benchmark.

Builds a randomly initialised HF LlamaForCausalLM (f32) from an HF-style
config.json and times full training steps on random tokens:
forward, causal-LM cross-entropy, backward, clip_grad_norm_(1.0),
AdamW(lr 4e-4, betas (0.9, 0.95), weight decay 0.1) step, zero_grad.
Eager mode (no torch.compile); attention "eager" by default, "sdpa" with --attn.

Prints progress to stderr and one JSON line to stdout (also written to --json):
  tokens_per_s  median over --steps timed steps of batch*seq/seconds
  peak_rss_mb   resource.getrusage(RUSAGE_SELF).ru_maxrss (whole process)

Run inside .venv-bench (scripts/setup_bench_env.sh).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rope_theta",
               "rms_norm_eps", "max_position_embeddings", "head_dim", "initializer_range",
               "hidden_act", "attention_bias", "mlp_bias")


def log(msg):
    print(f"[bench_train_torch] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="HF-style Llama config.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager",
                    help="HF attention implementation (default eager)")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="bf16: the forward and loss under torch.autocast('cpu', bfloat16), "
                         "PyTorch's fast CPU mode (f32 master weights and optimizer)")
    ap.add_argument("--json", help="also write the JSON result to this file")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    with open(args.config) as f:
        raw = json.load(f)
    kw = {k: raw[k] for k in CONFIG_KEYS if k in raw}
    # transformers 5 keeps rope_theta under rope_parameters; LlamaConfig accepts both.
    cfg = LlamaConfig(**kw, use_cache=False)
    cfg._attn_implementation = args.attn
    model = LlamaForCausalLM(cfg).float().train()
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    log(f"config {args.config}: {n_params:,} params "
        f"(L={cfg.num_hidden_layers} d={cfg.hidden_size} ffn={cfg.intermediate_size} "
        f"heads={cfg.num_attention_heads}/{cfg.num_key_value_heads} vocab={cfg.vocab_size} "
        f"tied={cfg.tie_word_embeddings}), attn {model.config._attn_implementation}")

    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    tokens = args.batch * args.seq

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            out = model(input_ids=ids, labels=ids)  # shifted next-token CE, mean over B*(T-1)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        loss = out.loss.item()
        del out
        warm = i < args.warmup
        log(f"{'warmup' if warm else 'step'} {i if warm else i - args.warmup}: {dt:.3f} s, "
            f"{tokens / dt:,.0f} tokens/s, loss {loss:.4f}")
        if not warm:
            times.append(dt)
            losses.append(loss)

    med = statistics.median(times)
    result = {
        "bench": "train", "impl": "torch", "torch": torch.__version__,
        "config": os.path.basename(args.config), "params": n_params,
        "dtype": "f32" if args.autocast == "none" else "bf16 autocast (f32 weights)",
        "attn": model.config._attn_implementation,
        "batch": args.batch, "seq": args.seq, "threads": args.threads,
        "steps": args.steps, "warmup": args.warmup,
        "tokens_per_s": tokens / med, "median_s": med, "times_s": times,
        "losses": losses, "peak_rss_mb": peak_rss_mb(),
        "optimizer": "AdamW(lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1), clip 1.0",
        "cpu": platform.processor() or platform.machine(),
        # 1/5/15-min load averages at the end; well above `threads` means other
        # processes competed for the cores and the timing is noisy.
        "loadavg": list(os.getloadavg()), "nproc": os.cpu_count(),
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
