#!/usr/bin/env python3
"""masa train vs python/masa_torch/pretrain.py under torchrun, on the same init and tokens (issue 15).

Checks, all f32 on CPU (gloo), from one `masa init` student and one `masa tokens` export:
  export  the export is what the trainer reads: manifest/file sizes agree, and sampled training
          sequences are contiguous windows of the tokenized train split (manifest token_split)
  (a)     masa train vs torchrun --nproc_per_node=1 (and =2): per-step train loss and val_mean
  floor   the f32 noise floor: the same torchrun x1 run with SDPA instead of eager attention
          (the same math, another f32 evaluation order; another thread count changed nothing
          at all on this tiny student: 0.0 over 100 steps)
  f64     masa (f32) and torchrun x1 (f32) each against torchrun x1 in float64: how far each
          trainer's own f32 rounding moves the curve (measured, no tolerance)
  (b)     DDP with 2 processes vs 1 process, same global batch
  (c)     FSDP2 (fully_shard) with 2 processes vs DDP with 2 processes
  (d)     resume: DDP x2 stopped at half way and resumed vs uninterrupted (bit-exact expected)
  (k)     the final DDP and FSDP2 checkpoints: the student's tensor names, reload with
          transformers, reproduce the last validation losses (per domain, within 1e-5)
  (e)     gradient accumulation: masa train --batch B/2 --grad-accum 2 vs torchrun x2, fewer steps

Tolerances (nats, max over steps of |train loss difference|):
  (a)  --tol-masa, default 1e-3 (the issue asks for 0.02). Two f32 implementations of the same
       recipe on the same tokens differ by rounding only, which training amplifies. Measured
       (docs/torch.md): tiny student 9.3e-6 over 100 steps; cpu-6l-256 up to 1.74e-2, all of
       it PyTorch's f32 rounding (the f64 rows: PyTorch in float64 stays within 9.8e-6 of masa,
       PyTorch f32 drifts 1.74e-2 from it). Use --tol-masa 0.02 from ~17M parameters up.
  (b), (c)  same implementation, only the reduction order differs (two half-batch gradients
       averaged by gloo vs one full batch; sharded vs replicated parameters): step 1 within
       1e-5 (a wrong row slice or loss scaling is off by >1e-2 there), every step within
       --tol-dist (default 1e-4: 50x the measured floor, ~2e-6, on the tiny student).
  (d)  exact: 0.
usage: .venv-bench/bin/python scripts/check_torchrun.py --work /tmp/torchrun-check
(scripts/test_torch.sh runs it with the venv made by scripts/setup_torch.sh). Exits 1 on failure.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "python", "masa_torch", "pretrain.py")


def log(msg):
    print(f"[check_torchrun] {msg}", file=sys.stderr, flush=True)


def sh(cmd, env=None):
    log(" ".join(str(c) for c in cmd))
    t0 = time.time()
    subprocess.run([str(c) for c in cmd], check=True, env={**os.environ, **(env or {})})
    return time.time() - t0


def curve(run):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
    return ([r["loss"] for r in rows if "loss" in r], {r["step"]: r["val_mean"] for r in rows if "val_mean" in r}, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--masa", default=os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release/masa"))
    ap.add_argument("--corpus", default=os.path.expanduser(os.path.join(os.environ.get("MASA_HOME", "~/.cache/masa"), "corpus/default")))
    ap.add_argument("--student", default="tiny", help="masa init --student preset or student.toml")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--accum-steps", type=int, default=30, help="steps of the accumulation check (e)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-seqs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="threads per process (masa and torch)")
    ap.add_argument("--checks", default="aAfgbcdke",
                    help="which rows: a masa vs x1, A masa vs DDP x2, f floor, g f32 vs f64, b DDP x2 vs x1, c FSDP2 vs DDP, d resume, "
                         "k checkpoints reload, e accumulation")
    ap.add_argument("--reuse", action="store_true", help="reuse finished torchrun runs in --work (default: run them again)")
    ap.add_argument("--tol-masa", type=float, default=1e-3)
    ap.add_argument("--tol-dist", type=float, default=1e-4)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    w = lambda *p: os.path.join(a.work, *p)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    common_train = ["--lr", a.lr, "--warmup", a.warmup, "--min-lr-ratio", 0.1, "--weight-decay", 0.1, "--clip", 1.0,
                    "--eval-every", a.eval_every]
    port = [29600]

    def torch_run(name, nproc, data, *extra, threads=a.threads, fresh=True, attn="eager"):
        out = w(name)
        if fresh and os.path.isdir(out):
            subprocess.run(["rm", "-rf", out], check=True)
        port[0] += 1
        secs = sh([torchrun, f"--nproc_per_node={nproc}", f"--master_port={port[0]}", PRETRAIN, w("student"),
                   "--data", data, "--out", out, *common_train, "--threads", threads, "--attn", attn, "--quiet", *extra],
                  env={"OMP_NUM_THREADS": str(threads)})
        return out, secs

    def masa_train(name, batch, accum, steps):
        out = w(name)
        if not os.path.isfile(os.path.join(out, "latest")):
            sh([a.masa, "--threads", a.threads, "train", w("student"), "--corpus", a.corpus, "--tokens", steps * batch * accum * a.seq,
                "--batch", batch, "--seq", a.seq, "--grad-accum", accum, "--seed", 0, "--eval-seqs", a.eval_seqs,
                "--ckpt-every", steps, "--out", out, "--quiet", *common_train])
        return out

    def export(name, batch, accum, steps):
        sh([a.masa, "--threads", a.threads, "tokens", w("student"), "--corpus", a.corpus, "--tokens", steps * batch * accum * a.seq,
            "--batch", batch, "--seq", a.seq, "--grad-accum", accum, "--seed", 0, "--eval-seqs", a.eval_seqs,
            "--out", w(name), "--quiet"])
        return w(name)

    if not os.path.isfile(w("student", "model.safetensors")):
        sh([a.masa, "init", "--student", a.student, "--strategy", "scratch", "--seed", 0, "--out", w("student")])
    data = export("tokens", a.batch, 1, a.steps)
    rows, ok = [], True

    def add(check, desc, diffs, tol, vd=None, first_tol=None):
        nonlocal ok
        passed = max(diffs) <= tol and (first_tol is None or diffs[0] <= first_tol)
        ok &= passed
        rows.append((check, desc, len(diffs), diffs[0], max(diffs[:10]), max(diffs), vd,
                     f"{tol:g}" + (f" (step 1: {first_tol:g})" if first_tol is not None else ""), "PASS" if passed else "FAIL"))

    # export round trip
    m = json.load(open(os.path.join(data, "manifest.json")))
    dt = np.uint16 if m["dtype"] == "uint16" else np.uint32
    train = np.fromfile(os.path.join(data, "train.bin"), dtype=dt).reshape(-1, m["sequence_tokens"])
    split = np.memmap(m["token_split"]["path"], dtype=np.uint16 if m["token_split"]["dtype"] == "uint16" else np.uint32, mode="r")
    found = 0
    picks = [0, 1, len(train) // 2, len(train) - 1]
    for i in picks:
        s = train[i]
        cand = np.flatnonzero(split[: len(split) - len(s) + 1] == s[0])
        found += any(np.array_equal(split[c:c + len(s)], s) for c in cand)
    exp_ok = (train.shape[0] == m["train"]["sequences"] == m["steps"] * m["batch"] * m["grad_accum"]
              and found == len(picks))
    ok &= exp_ok
    export_line = (f"export: {train.shape[0]} train sequences x {m['sequence_tokens']} tokens ({m['dtype']}), "
                   f"{len(m['valid']['domains'])} validation domains; {found}/{len(picks)} sampled sequences found verbatim "
                   f"in the tokenized split: {'PASS' if exp_ok else 'FAIL'}")
    log(export_line)

    ml, mv, _ = curve(masa_train("masa", a.batch, 1, a.steps))
    secs, runs = {}, {}

    outs = {"f64": "ddp1-f64", "x1": "ddp1", "sdpa": "ddp1-sdpa", "x2": "ddp2", "fsdp": "fsdp2", "resumed": "ddp2-resumed"}

    def run(key):  # each torchrun run once, on demand -> (losses, {step: val_mean}, rows)
        if key not in runs and a.reuse and os.path.isfile(w(outs[key], "latest")):
            runs[key] = curve(w(outs[key]))
        if key not in runs:
            if key == "x1":
                out, secs["torchrun x1"] = torch_run("ddp1", 1, data)
            elif key == "sdpa":
                out, secs["torchrun x1, SDPA"] = torch_run("ddp1-sdpa", 1, data, attn="sdpa")
            elif key == "f64":
                out, secs["torchrun x1, f64"] = torch_run("ddp1-f64", 1, data, "--dtype", "f64")
            elif key == "x2":
                out, secs["DDP x2"] = torch_run("ddp2", 2, data)
            elif key == "fsdp":
                out, secs["FSDP2 x2"] = torch_run("fsdp2", 2, data, "--fsdp")
            elif key == "resumed":
                out, s1 = torch_run("ddp2-resumed", 2, data, "--stop-at", a.steps // 2)
                _, s2 = torch_run("ddp2-resumed", 2, data, "--resume", out, fresh=False)
                secs["DDP x2 stop+resume"] = s1 + s2
            runs[key] = curve(out)
        return runs[key]

    names = {"f64": "torchrun x1 f64", "x1": "torchrun x1", "sdpa": "torchrun x1 SDPA", "x2": "DDP x2", "fsdp": "FSDP2 x2", "resumed": "DDP x2 resumed"}
    d = lambda x, y: [abs(p - q) for p, q in zip(x, y)] if len(x) == len(y) == a.steps else [float("inf")]
    vd = lambda x, y: max(abs(x[s] - y[s]) for s in x) if set(x) == set(y) else float("inf")
    if "a" in a.checks:
        add("(a)", "masa train vs torchrun x1", d(ml, run("x1")[0]), a.tol_masa, vd(mv, run("x1")[1]))
    if "A" in a.checks:
        add("(a)", "masa train vs torchrun DDP x2", d(ml, run("x2")[0]), a.tol_masa, vd(mv, run("x2")[1]))
    if "f" in a.checks:
        floor = d(run("x1")[0], run("sdpa")[0])
        rows.append(("floor", "torchrun x1: eager vs SDPA attention", len(floor), floor[0],
                     max(floor[:10]), max(floor), vd(run("x1")[1], run("sdpa")[1]), "(measured)", ""))
    if "g" in a.checks:  # distance from an f64 reference: how much each f32 trainer's rounding moves the curve
        for desc, x in (("torchrun x1 f32 vs torchrun f64", run("x1")), ("masa train f32 vs torchrun f64", (ml, mv))):
            g = d(x[0], run("f64")[0])
            rows.append(("f64", desc, len(g), g[0], max(g[:10]), max(g), vd(x[1], run("f64")[1]), "(measured)", ""))
    if "b" in a.checks:
        add("(b)", "DDP x2 vs x1, same global batch", d(run("x2")[0], run("x1")[0]), a.tol_dist,
            vd(run("x2")[1], run("x1")[1]), first_tol=1e-5)
    if "c" in a.checks:
        add("(c)", "FSDP2 x2 vs DDP x2", d(run("fsdp")[0], run("x2")[0]), a.tol_dist,
            vd(run("fsdp")[1], run("x2")[1]), first_tol=1e-5)
    if "d" in a.checks:
        tr, vr, rr_rows = run("resumed")
        resume_ok = [r["step"] for r in rr_rows] == list(range(a.steps + 1))
        add("(d)", f"DDP x2 resumed at {a.steps // 2} vs uninterrupted", d(tr, run("x2")[0]) if resume_ok else [float("inf")],
            0.0, vd(vr, run("x2")[1]))

    # checkpoints: the final HF checkpoint has the student's tensors (tied lm_head stored once),
    # reloads with transformers and reproduces the last validation losses of metrics.jsonl.
    if "k" in a.checks:
        import torch
        import torch.nn.functional as F
        from safetensors import safe_open
        from transformers import LlamaForCausalLM
        torch.set_num_threads(a.threads)
        valid = np.fromfile(os.path.join(data, "valid.bin"), dtype=dt).astype(np.int64).reshape(-1, m["sequence_tokens"])
        want = set(safe_open(w("student", "model.safetensors"), "np").keys())
        for key, name in (("x2", "ddp2"), ("fsdp", "fsdp2")):
            last = run(key)[2][-1]
            ck = os.path.join(w(name), open(os.path.join(w(name), "latest")).read().strip())
            keys_ok = set(safe_open(os.path.join(ck, "model.safetensors"), "np").keys()) == want
            model = LlamaForCausalLM.from_pretrained(ck, torch_dtype=torch.float32, attn_implementation="eager").eval()
            diffs = []
            with torch.no_grad():
                for dom in m["valid"]["domains"]:
                    x = torch.from_numpy(valid[dom["first"]:dom["first"] + dom["sequences"]])
                    logits = model(input_ids=x[:, :a.seq]).logits
                    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()
                    diffs.append(abs(nll - last["val"][dom["domain"]]))
            add("(k)", f"{names[key]} final checkpoint reloaded" + ("" if keys_ok else ": TENSOR NAMES DIFFER"),
                diffs if keys_ok else [float("inf")], 1e-5)

    # (e) gradient accumulation: half the rows per micro-batch, two micro-batches per step.
    if "e" in a.checks and a.accum_steps:
        acc_data = export("tokens-accum", a.batch // 2, 2, a.accum_steps)
        ma, mva, _ = curve(masa_train("masa-accum", a.batch // 2, 2, a.accum_steps))
        ra, secs["DDP x2, grad-accum 2"] = torch_run("ddp2-accum", 2, acc_data)
        ta, va, _ = curve(ra)
        da = [abs(p - q) for p, q in zip(ma, ta)] if len(ma) == len(ta) == a.accum_steps else [float("inf")]
        add("(e)", f"masa vs DDP x2, batch {a.batch // 2} x grad-accum 2", da, a.tol_masa, vd(mva, va))

    print(f"\nmasa train vs torchrun (python/masa_torch/pretrain.py), student '{a.student}', {a.steps} steps of "
          f"{a.batch} x {a.seq} tokens, lr {a.lr}, warmup {a.warmup}, f32, CPU/gloo, {a.threads} thread(s) per process")
    print(export_line)
    print(f"{'check':<6} {'runs':<42} {'steps':>5} {'step 1':>9} {'max 1-10':>9} {'max all':>9} {'max val':>9}  tolerance / result")
    for c, desc, n, f1, f10, fa, v, tol, res in rows:
        vs = f"{v:>9.2e}" if v is not None else f"{'':>9}"
        print(f"{c:<6} {desc:<42} {n:>5} {f1:>9.2e} {f10:>9.2e} {fa:>9.2e} {vs}  {tol} {res}")
    print("(|train loss difference| per step, nats; 'max val' = max |val_mean difference| over validation steps;\n"
          " (k): |validation loss difference| per domain instead of per step)")
    print(f"final train loss / val_mean: masa {ml[-1]:.5f} / {mv[a.steps]:.5f}, " +
          ", ".join(f"{names[k]} {r[0][-1]:.5f} / {r[1][a.steps]:.5f}" for k, r in runs.items()))
    print("wall seconds (incl. start-up): " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
    print("overall:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
