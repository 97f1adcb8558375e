#!/usr/bin/env python3
"""Training parity of `masa train` against PyTorch + transformers on the same student.

Two checks (issue 16; docs/training.md, "Parity with PyTorch"):

same-data   masa exports the exact training sequences it will draw (`masa tokens`); PyTorch
            trains the same student directory on them with the same recipe (AdamW with
            torch's decoupled weight decay on matrices and embeddings, none on norms, global
            clip, linear warmup + cosine to min_lr_ratio x peak, mean CE over the batch), f32
            on both. Passes when every step's training loss agrees within --tol (default
            1e-3 nats) and the validation losses on masa's windows agree too.
own-sampling  each trainer with its own batch sampling from the same students and seeds:
            masa's shuffled chunks vs nanoGPT's uniformly random windows over the same
            tokenized train split (`ix = randint(len - seq - 1)`). Reports the final mean
            validation loss per seed and whether masa's mean lies within PyTorch's seed
            spread (min..max over seeds, widened by the larger of the two sample stds).

usage (from the repository root, after `cargo build --release` and
`scripts/setup_bench_env.sh`):
  .venv-bench/bin/python scripts/check_train_torch.py --work /tmp/parity [--check both]

The students are made with `masa init --student cpu-6l-256 --strategy scratch --seed S`, the
corpus is the default one (`masa fetch corpus`). Prints one table per check and exits 1 if
the same-data check fails.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg):
    print(f"[check_train_torch] {msg}", file=sys.stderr, flush=True)


def masa(args, masa_bin):
    log("masa " + " ".join(str(a) for a in args))
    subprocess.run([masa_bin, *map(str, args)], check=True)


def lr_at(step, total, warmup, peak, min_lr):
    """masa's schedule (src/student/optim.rs `lr_at`)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def read_tokens(path, dtype, shape=None):
    a = np.fromfile(path, dtype=np.uint16 if dtype == "uint16" else np.uint32).astype(np.int64)
    return a if shape is None else a.reshape(shape)


def load_student(path):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    model.train()
    return model


def optimizer(model, a):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)


@torch.no_grad()
def validate(model, valid, domains, t):
    model.eval()
    out = {}
    for d in domains:
        seqs = torch.from_numpy(valid[d["first"]:d["first"] + d["sequences"]])
        logits = model(seqs[:, :t]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
        out[d["domain"]] = loss.item()
    model.train()
    return out


def train_torch(student, batches, valid, domains, a, eval_every, dtype=torch.float32):
    """Train on `batches` (a callable step -> LongTensor (b, t+1)); returns per-step losses and
    {step: mean validation loss}."""
    torch.manual_seed(0)
    model = load_student(student).to(dtype)
    opt = optimizer(model, a)
    t = a.seq
    losses, val = [], {0: statistics.mean(validate(model, valid, domains, t).values())}
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.warmup, a.lr, a.lr * a.min_lr_ratio)
        x = batches(step)
        logits = model(x[:, :t]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == a.steps:
            val[step + 1] = statistics.mean(validate(model, valid, domains, t).values())
    return losses, val


def masa_curve(run):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    val = {r["step"]: r["val_mean"] for r in rows if r.get("val_mean") is not None}
    return losses, val


def prepare(a, seed):
    """Student, exported tokens and a masa training run for `seed`."""
    student = os.path.join(a.work, f"student-{seed}")
    if not os.path.isfile(os.path.join(student, "model.safetensors")):
        masa(["init", "--student", a.student, "--strategy", "scratch", "--seed", seed, "--out", student], a.masa)
    tokens = a.steps * a.batch * a.seq
    common = ["--corpus", a.corpus, "--tokens", tokens, "--batch", a.batch, "--seq", a.seq, "--seed", seed,
              "--eval-seqs", a.eval_seqs, "--quiet"]
    export = os.path.join(a.work, f"tokens-{seed}")
    masa(["tokens", student, *common, "--out", export], a.masa)
    run = os.path.join(a.work, f"masa-{seed}")
    if not os.path.isfile(os.path.join(run, "latest")):
        masa(["--threads", a.threads, "train", student, *common, "--out", run, "--lr", a.lr, "--warmup", a.warmup,
              "--min-lr-ratio", a.min_lr_ratio, "--weight-decay", a.weight_decay, "--clip", a.clip,
              "--eval-every", a.eval_every, "--ckpt-every", a.steps], a.masa)
    m = json.load(open(os.path.join(export, "manifest.json")))
    return student, export, m, run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="working directory (students, exports, runs)")
    ap.add_argument("--masa", default=os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release/masa"))
    ap.add_argument("--corpus", default=os.path.expanduser(os.path.join(os.environ.get("MASA_HOME", "~/.cache/masa"), "corpus/default")))
    ap.add_argument("--student", default="cpu-6l-256")
    ap.add_argument("--check", choices=["same-data", "own-sampling", "both"], default="both")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the own-sampling check (init and data)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-seqs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    torch.set_num_threads(a.threads)
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    ok = True

    if a.check in ("same-data", "both"):
        student, export, m, run = prepare(a, 0)
        t = a.seq
        train = read_tokens(os.path.join(export, "train.bin"), m["dtype"], (-1, t + 1))
        valid = read_tokens(os.path.join(export, "valid.bin"), m["dtype"], (-1, t + 1))
        b = a.batch
        t0 = time.time()
        tl, tv = train_torch(student, lambda s: torch.from_numpy(train[s * b:(s + 1) * b]), valid, m["valid"]["domains"], a, a.eval_every)
        log(f"PyTorch: {a.steps} steps in {time.time() - t0:.0f} s")
        # The reference without f32 rounding: the same PyTorch run in float64. Rounding
        # differences grow chaotically over training, so f32 vs f32 measures both trainers'
        # rounding; f32 vs f64 measures each one's.
        torch.set_default_dtype(torch.float64)
        fl, fv = train_torch(student, lambda s: torch.from_numpy(train[s * b:(s + 1) * b]), valid, m["valid"]["domains"], a, a.eval_every, dtype=torch.float64)
        torch.set_default_dtype(torch.float32)
        ml, mv = masa_curve(run)
        json.dump({"masa": ml, "torch": tl, "torch_f64": fl, "masa_val": mv, "torch_val": tv, "torch_f64_val": fv},
                  open(os.path.join(a.work, "same-data-curves.json"), "w"))
        floor = [abs(x - y) for x, y in zip(fl, tl)]
        masa64 = [abs(x - y) for x, y in zip(fl, ml)]
        diffs = [abs(x - y) for x, y in zip(ml, tl)]
        vdiffs = [abs(mv[s] - tv[s]) for s in sorted(tv) if s in mv]
        print(f"\nsame data, seed 0: {a.steps} steps of {b} x {t} tokens, lr {a.lr}, f32 on both")
        print(f"{'step':>5} {'masa f32':>10} {'torch f32':>10} {'torch f64':>10} {'|masa-torch|':>12} {'|masa-f64|':>10} {'|torch-f64|':>11}")
        for s in [0, 1, 2, 4, 9, 19, 29, 49, 69, 89, len(ml) - 1]:
            if s < min(len(ml), len(tl)):
                print(f"{s + 1:>5} {ml[s]:>10.5f} {tl[s]:>10.5f} {fl[s]:>10.5f} {diffs[s]:>12.2e} {masa64[s]:>10.2e} {floor[s]:>11.2e}")
        print(f"{'val step':>8} {'masa val':>9} {'torch val':>9}")
        for s in sorted(tv):
            if s in mv and (s % (5 * a.eval_every) == 0 or s == a.steps):
                print(f"{s:>8} {mv[s]:>9.5f} {tv[s]:>9.5f}")
        v64 = [abs(mv[s] - fv[s]) for s in sorted(fv) if s in mv]
        same_ok = len(ml) == len(fl) == a.steps and max(masa64) < a.tol and max(v64) < a.tol
        print(f"masa f32 vs PyTorch f64: max |train loss diff| over {len(masa64)} steps {max(masa64):.2e}, max |val diff| {max(v64):.2e}; "
              f"tolerance {a.tol}: {'PASS' if same_ok else 'FAIL'}")
        print(f"masa f32 vs PyTorch f32: max |train loss diff| {max(diffs):.2e} (first 50 steps {max(diffs[:50]):.2e}), max |val diff| {max(vdiffs):.2e}")
        print(f"PyTorch f32 vs PyTorch f64 (PyTorch's own f32 rounding): max |train loss diff| {max(floor):.2e} (first 50 steps {max(floor[:50]):.2e})")
        ok &= same_ok

    if a.check in ("own-sampling", "both"):
        rows = []
        for seed in [int(s) for s in a.seeds.split(",")]:
            student, export, m, run = prepare(a, seed)
            t = a.seq
            valid = read_tokens(os.path.join(export, "valid.bin"), m["dtype"], (-1, t + 1))
            split = read_tokens(m["token_split"]["path"], m["token_split"]["dtype"])
            assert len(split) == m["token_split"]["tokens"], "token split changed since the export"
            g = torch.Generator().manual_seed(seed)
            split_t = torch.from_numpy(split)

            def windows(_step, b=a.batch):
                ix = torch.randint(len(split_t) - t - 1, (b,), generator=g)
                return torch.stack([split_t[i:i + t + 1] for i in ix.tolist()])

            _, tv = train_torch(student, windows, valid, m["valid"]["domains"], a, a.eval_every)
            _, mv = masa_curve(run)
            rows.append((seed, mv[a.steps], tv[a.steps]))
        ms = [r[1] for r in rows]
        ts = [r[2] for r in rows]
        print(f"\nown sampling: final mean validation loss after {a.steps * a.batch * a.seq} tokens")
        print(f"{'seed':>4} {'masa (chunks)':>14} {'torch (windows)':>16}")
        for s, x, y in rows:
            print(f"{s:>4} {x:>14.4f} {y:>16.4f}")
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"mean {statistics.mean(ms):>14.4f} {statistics.mean(ts):>16.4f}")
        print(f"std  {sd(ms):>14.4f} {sd(ts):>16.4f}")
        lo, hi = min(ts) - max(sd(ms), sd(ts)), max(ts) + max(sd(ms), sd(ts))
        within = lo <= statistics.mean(ms) <= hi
        print(f"masa's mean {'within' if within else 'OUTSIDE'} PyTorch's seed range widened by one std [{lo:.4f}, {hi:.4f}]")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
