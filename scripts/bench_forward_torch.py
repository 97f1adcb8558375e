#!/usr/bin/env python3
"""PyTorch-eager side of masa's forward (prefill) throughput benchmark.

Loads a Llama-architecture GGUF (SmolLM2-135M) into HF transformers'
LlamaForCausalLM with weights dequantized to f32, then times full forward
passes (batch x seq random token ids, all-position lm_head logits included)
under torch.inference_mode(), eager mode (no torch.compile).

Prints progress to stderr and one JSON line to stdout (also written to --json):
  tokens_per_s  median over --iters timed forwards of batch*seq/seconds
  peak_rss_mb   resource.getrusage(RUSAGE_SELF).ru_maxrss (whole process, incl. loading)
  nll_max_abs_err  sanity check against tests/data/reference/smollm2-135m/transformers_logits.json

Run inside .venv-bench (scripts/setup_bench_env.sh).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

DEFAULT_REFERENCE = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "reference",
    "smollm2-135m", "transformers_logits.json"))


def log(msg):
    print(f"[bench_forward_torch] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def load_hf(gguf_path, attn):
    """transformers' own GGUF loader (dequantizes with `gguf`, un-permutes q/k)."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    d, name = os.path.split(os.path.abspath(gguf_path))
    model = LlamaForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                             attn_implementation=attn)
    return model


def _reverse_permute(w, n_head):
    # Inverse of llama.cpp convert_hf_to_gguf.py's LlamaModel.permute for q/k rows.
    # permute: reshape(n_head, 2, d/n_head/2, ...).swapaxes(1, 2); inverse below.
    dim0 = w.shape[0]
    return (w.reshape(n_head, dim0 // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def load_manual(gguf_path, attn):
    """Fallback: dequantize with `gguf` ourselves and build from a LlamaConfig."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    r = gguf.GGUFReader(gguf_path)

    def meta(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        v = f.parts[f.data[0]]
        return v.item() if v.size == 1 else v.tolist()

    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    if arch != "llama":
        raise SystemExit(f"manual loader supports only llama GGUFs, got {arch}")
    tensors = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        tensors[t.name] = np.array(a.reshape([int(x) for x in reversed(t.shape)]))
    n_head = int(meta("llama.attention.head_count"))
    n_kv = int(meta("llama.attention.head_count_kv", n_head))
    hidden = int(meta("llama.embedding_length"))
    cfg = LlamaConfig(
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=int(meta("llama.feed_forward_length")),
        num_hidden_layers=int(meta("llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=int(meta("llama.attention.key_length", hidden // n_head)),
        max_position_embeddings=int(meta("llama.context_length", 2048)),
        rms_norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta("tokenizer.ggml.eos_token_id"),
    )
    cfg._attn_implementation = attn
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for k, a in tensors.items():
        if k.startswith("blk."):
            _, i, part, suffix = k.split(".", 3)
            if part == "attn_q":
                a = _reverse_permute(a, n_head)
            elif part == "attn_k":
                a = _reverse_permute(a, n_kv)
            sd[f"model.layers.{i}.{per_layer[part]}.{suffix}"] = torch.from_numpy(a)
        elif k in names:
            sd[names[k]] = torch.from_numpy(a)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are still on meta: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SystemExit(f"manual loader left parameters unset: {missing[:5]}")
    return model


# ---------------------------------------------------------------------------
# Sanity check
# ---------------------------------------------------------------------------

def nll_check(model, reference_path):
    with open(reference_path) as f:
        refs = json.load(f)
    errs = []
    first = None
    for n, ref in enumerate(refs):
        ids = torch.tensor([ref["ids"]], dtype=torch.long)
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        nll = -lp[:-1].gather(1, ids[0, 1:, None])[:, 0]
        err = (nll - torch.tensor(ref["next_token_nll"])).abs().max().item()
        errs.append(err)
        if n == 0:
            first = err
            log(f"NLL check, text 0 ({len(ref['ids'])} tokens, {ref['text'][:40]!r}...): "
                f"mean NLL {nll.mean().item():.6f} vs reference {ref['mean_nll']:.6f}, "
                f"max |err| {err:.3e}")
    log(f"NLL check over {len(refs)} reference texts: max |err| {max(errs):.3e} "
        f"({'OK' if max(errs) < 1e-2 else 'MISMATCH'}; expect ~1e-3 or less)")
    return first, max(errs)


# ---------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="path to a llama-architecture GGUF")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                    help="HF attention implementation (default sdpa, transformers' default)")
    ap.add_argument("--loader", choices=["auto", "hf", "manual"], default="auto",
                    help="auto: transformers' GGUF loader, falling back to the manual one")
    ap.add_argument("--reference", default=DEFAULT_REFERENCE,
                    help="transformers_logits.json for the NLL sanity check ('' to skip)")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="bf16: the timed forward under torch.autocast('cpu', bfloat16), PyTorch's fast CPU mode")
    ap.add_argument("--json", help="also write the JSON result to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"interop {torch.get_num_interop_threads()}")

    t0 = time.perf_counter()
    loader = args.loader
    if loader in ("auto", "hf"):
        try:
            model = load_hf(args.gguf, args.attn)
            loader = "hf"
        except Exception as e:  # noqa: BLE001
            if args.loader == "hf":
                raise
            log(f"transformers GGUF loader failed ({type(e).__name__}: {e}); using manual loader")
            loader = "manual"
    if loader == "manual":
        model = load_manual(args.gguf, args.attn)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # (a GGUF-loaded HF model refuses .float(); it is f32 already)
    model = model.eval()
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    log(f"loaded {args.gguf} with {loader} loader in {load_s:.1f} s: {n_params:,} params, "
        f"f32, attn {model.config._attn_implementation}, rss so far {peak_rss_mb():.0f} MB")

    nll_first = nll_max = None
    with torch.inference_mode():
        if args.reference:
            if os.path.exists(args.reference):
                nll_first, nll_max = nll_check(model, args.reference)
            else:
                log(f"reference {args.reference} not found; skipping NLL check")

        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
        tokens = args.batch * args.seq
        times = []
        for i in range(args.warmup + args.iters):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
                logits = model(input_ids=ids, use_cache=False).logits
            dt = time.perf_counter() - t
            assert logits.shape == (args.batch, args.seq, model.config.vocab_size)
            del logits
            kind = "warmup" if i < args.warmup else "iter"
            log(f"{kind} {i if i < args.warmup else i - args.warmup}: {dt:.3f} s, "
                f"{tokens / dt:,.0f} tokens/s")
            if i >= args.warmup:
                times.append(dt)

    med = statistics.median(times)
    result = {
        "bench": "forward", "impl": "torch", "torch": torch.__version__,
        "model": os.path.basename(args.gguf), "params": n_params,
        "dtype": "f32" if args.autocast == "none" else "bf16 autocast (f32 weights)",
        "attn": model.config._attn_implementation, "loader": loader,
        "batch": args.batch, "seq": args.seq, "threads": args.threads,
        "iters": args.iters, "warmup": args.warmup,
        "tokens_per_s": tokens / med, "median_s": med, "times_s": times,
        "peak_rss_mb": peak_rss_mb(), "load_s": load_s,
        "nll_max_abs_err_text0": nll_first, "nll_max_abs_err_all": nll_max,
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
