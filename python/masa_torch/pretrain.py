#!/usr/bin/env python3
"""Pre-train a masa student with PyTorch on `masa tokens` data: DDP or FSDP under torchrun.

One readable file, nanoGPT-style. It reproduces `masa train`'s recipe on exactly the sequences
masa's trainer would draw (`masa tokens` export) and writes masa's `metrics.jsonl` schema, so
runs trained here can be compared with (and reported next to) masa-trained ones.

    masa tokens STUDENT --corpus C --tokens N --batch B --seq T [--grad-accum A] --seed S \\
        --eval-seqs E --out DATA
    torchrun --nproc_per_node=8 python/masa_torch/pretrain.py STUDENT --data DATA --out RUN \\
        --lr 4e-4 --warmup 100 [--fsdp] [--device cuda]

Recipe (src/train.rs, src/student/optim.rs, docs/training.md):
  * AdamW, torch semantics, betas (0.9, 0.95), eps 1e-8; weight decay on every parameter with
    >= 2 dims (embeddings included), none on 1-D ones (norm weights).
  * lr(step) = peak*(step+1)/warmup during warmup, then cosine from peak to
    min_lr = peak*min_lr_ratio over the remaining steps.
  * Global-norm gradient clipping (--clip, 0 = off; the norm is logged before clipping).
  * Loss = mean cross-entropy over all batch x seq target tokens of an optimizer step. With
    gradient accumulation, each micro-batch's summed CE is weighted 1/(batch*seq*grad_accum).
  * Data layout: train.bin holds sequences of seq_len+1 tokens, step-major, sequence index
    (step*grad_accum + micro)*batch + row. With W processes, rank r takes rows
    [r*batch/W, (r+1)*batch/W) of every micro-batch, so the global batch is masa's batch and
    the averaged gradient is the same mean as masa's (DDP / FSDP average over ranks).
  * Validation: mean NLL per domain over valid.bin's windows, at step 0, every --eval-every
    steps and at the end.

Outputs (rank 0): OUT/metrics.jsonl (one line per optimizer step: step, tokens, loss, lr,
grad_norm, tokens_per_s, and val/val_mean on validation steps; step 0 has only step, tokens,
val, val_mean), OUT/step-NNNNNNNN/ (HF checkpoint: save_pretrained + the student's tokenizer
files, plus trainer.pt with optimizer state for --resume), OUT/latest, OUT/engine.json.

Without torchrun it runs as a single process. Backend: nccl on cuda, gloo on cpu.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

STUDENT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "masa.json",
                 "generation_config.json")


class DataError(Exception):
    """The export and the student disagree, or a file is missing/damaged."""


def log(msg, rank=0):
    if rank == 0:
        print(f"[masa_torch] {msg}", file=sys.stderr, flush=True)


def lr_at(step, total, warmup, peak, min_lr):
    """masa's schedule (src/student/optim.rs `lr_at`), step is 0-based."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# data: a `masa tokens` export


def open_export(data_dir, student_dir, config):
    """Read and check OUT/manifest.json, train.bin and valid.bin against the student."""
    man_path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(man_path):
        raise DataError(f"{man_path}: missing (expected the output of `masa tokens`)")
    try:
        m = json.load(open(man_path))
    except json.JSONDecodeError as e:
        raise DataError(f"{man_path}: not valid JSON ({e})")
    for key in ("dtype", "batch", "seq_len", "grad_accum", "steps", "sequence_tokens", "train", "valid"):
        if key not in m:
            raise DataError(f"{man_path}: no field '{key}' (not a `masa tokens` manifest?)")
    if m["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{man_path}: dtype {m['dtype']!r} is neither uint16 nor uint32")
    t, st = m["seq_len"], m["sequence_tokens"]
    if st != t + 1:
        raise DataError(f"{man_path}: sequence_tokens {st} != seq_len + 1 = {t + 1}")
    dtype = np.dtype("<u2" if m["dtype"] == "uint16" else "<u4")
    vocab, max_pos = config.vocab_size, config.max_position_embeddings
    cfg_path = os.path.join(student_dir, "config.json")
    if t > max_pos:
        raise DataError(f"{man_path}: seq_len {t} exceeds max_position_embeddings {max_pos} of {cfg_path}")
    if m["dtype"] == "uint32" and vocab <= 65536:
        log(f"note: {man_path} stores uint32 tokens for a vocabulary of {vocab}")

    def load(name, sequences):
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (listed by {man_path})")
        want = sequences * st * dtype.itemsize
        got = os.path.getsize(path)
        if got != want:
            raise DataError(f"{path}: {got} bytes, the manifest implies {sequences} sequences x {st} tokens x "
                            f"{dtype.itemsize} bytes = {want}")
        return np.memmap(path, dtype=dtype, mode="r", shape=(sequences, st))

    n_train = m["train"]["sequences"]
    want_train = m["steps"] * m["grad_accum"] * m["batch"]
    if n_train != want_train:
        raise DataError(f"{man_path}: train.sequences {n_train} != steps x grad_accum x batch = {want_train}")
    train = load(m["train"].get("file", "train.bin"), n_train)
    domains = m["valid"]["domains"]
    n_valid = sum(d["sequences"] for d in domains)
    valid = load(m["valid"].get("file", "valid.bin"), n_valid)
    for d in domains:
        if d["first"] + d["sequences"] > n_valid:
            raise DataError(f"{man_path}: validation domain {d['domain']} reaches past valid.bin")
    if n_valid and int(valid.max()) >= vocab:
        raise DataError(f"{os.path.join(data_dir, 'valid.bin')}: token id {int(valid.max())} >= vocab_size "
                        f"{vocab} of {cfg_path} (export made with another tokenizer?)")
    # The export records the model directory whose tokenizer made it (as given on masa's command
    # line); if that is an absolute path still there, its tokenizer.json must be the student's.
    # (masa's `tokenizer` fingerprint hashes the tokenizer with its BOS/EOS facts; it is not
    # recomputed here.)
    src = str(m.get("model", ""))
    src_tok = os.path.join(src, "tokenizer.json")
    own_tok = os.path.join(student_dir, "tokenizer.json")
    if (os.path.isabs(src) and os.path.isfile(src_tok) and os.path.isfile(own_tok)
            and open(src_tok, "rb").read() != open(own_tok, "rb").read()):
        raise DataError(f"{own_tok} differs from {src_tok}, the tokenizer {man_path} was made with")
    return m, train, valid


def check_tokens(x, vocab, what):
    hi = int(x.max())
    if hi >= vocab:
        raise DataError(f"{what}: token id {hi} >= vocab_size {vocab} of the student")


# ----------------------------------------------------------------------------------------------
# model, parallelism, optimizer


def load_student(path, attn):
    from transformers import LlamaForCausalLM
    for f in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, f)) and not (f == "model.safetensors" and os.path.isfile(
                os.path.join(path, "model.safetensors.index.json"))):
            raise DataError(f"{os.path.join(path, f)}: missing (not a masa student / HF Llama directory?)")
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    return model


def wrap(model, a, device, world):
    """DDP, or FSDP2 fully_shard per decoder layer + root (FSDP1 if this torch has no FSDP2)."""
    if a.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            fully_shard = None
        if fully_shard is not None:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            return model, "fsdp2"
        # FSDP1 fallback (torch < 2.6): not exercised by scripts/check_torchrun.sh (torch 2.13).
        import functools
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        log("note: torch.distributed.fsdp.fully_shard (FSDP2) not available in torch "
            f"{torch.__version__}; using FSDP1 (FullyShardedDataParallel, use_orig_params=True)")
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
        return FSDP(model, auto_wrap_policy=policy, use_orig_params=True,
                    device_id=device if device.type == "cuda" else None), "fsdp1"
    if world > 1 or dist.is_initialized():
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None), "ddp"
    return model, "single"


def make_optimizer(model, a, device):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    # cuda: fused kernels (foreach for FSDP's DTensors); cpu: the plain per-parameter loop.
    kw = ({"foreach": True} if a.fsdp else {"fused": True}) if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def grad_norm_and_clip(model, mode, clip):
    """Global gradient L2 norm before clipping; clips to `clip` unless clip == 0."""
    max_norm = clip if clip > 0 else float("inf")
    if mode == "fsdp1":
        norm = model.clip_grad_norm_(max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm.item()


# ----------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(model, opt, a, step, out, student, rank, extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, opt, options=opts)  # collective under FSDP: every rank calls it
    if rank != 0:
        return
    name = f"step-{step:08d}"
    final, tmp = os.path.join(out, name), os.path.join(out, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    raw = model.module if hasattr(model, "module") else model
    if hasattr(raw, "_fsdp_wrapped_module"):
        raw = raw._fsdp_wrapped_module
    if getattr(raw.config, "tie_word_embeddings", False):
        msd.pop("lm_head.weight", None)  # tied to embed_tokens: stored once, as masa writes students
    raw.save_pretrained(tmp, state_dict={k: v.contiguous() for k, v in msd.items()}, safe_serialization=True)
    for f in STUDENT_FILES:
        if os.path.isfile(os.path.join(student, f)):
            shutil.copy2(os.path.join(student, f), os.path.join(tmp, f))
    torch.save({"step": step, "optimizer": osd}, os.path.join(tmp, "trainer.pt"))
    json.dump({"step": step, **extra}, open(os.path.join(tmp, "masa_trainer_state.json"), "w"), indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(out, ".latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(out, ".latest.tmp"), os.path.join(out, "latest"))
    log(f"checkpoint {final}")


def resume_from(path):
    """A run directory (its `latest`) or a step-* directory -> (checkpoint dir, step)."""
    if os.path.isfile(os.path.join(path, "latest")):
        path = os.path.join(path, open(os.path.join(path, "latest")).read().strip())
    state = os.path.join(path, "trainer.pt")
    if not os.path.isfile(state):
        raise DataError(f"{state}: missing (not a checkpoint of this trainer)")
    return path, state


# ----------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def validate(model, valid, domains, t, device, rank, world, eval_batch, autocast):
    """Mean NLL per domain. Each rank takes every world-th sequence in chunks; every rank runs
    the same number of forwards (a zero-weight dummy row where it has none) so FSDP's
    collectives line up."""
    model.eval()
    out = {}
    for d in domains:
        idx = list(range(d["first"], d["first"] + d["sequences"]))
        tot = torch.zeros(2, dtype=torch.float64, device=device)
        for c in range(0, len(idx), eval_batch * world):
            mine = idx[c:c + eval_batch * world][rank::world]
            rows = mine or idx[:1]
            x = torch.from_numpy(np.asarray(valid[rows], dtype=np.int64)).to(device)
            with autocast():
                logits = model(input_ids=x[:, :t]).logits
            nll = F.cross_entropy(upcast(logits).reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            if mine:
                tot += torch.stack([nll.double(), torch.tensor(x[:, 1:].numel(), dtype=torch.float64, device=device)])
        if world > 1:
            dist.all_reduce(tot)
        out[d["domain"]] = (tot[0] / tot[1]).item()
    model.train()
    return out


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", help="student directory (HF Llama: config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--data", required=True, help="a `masa tokens --out` directory (manifest.json, train.bin, valid.bin)")
    ap.add_argument("--out", required=True, help="run directory: metrics.jsonl, step-* checkpoints, latest")
    ap.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (masa default 4e-4)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="max global gradient norm (0 = off)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batch", type=int, default=16, help="validation sequences per forward per rank")
    ap.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", help="a run directory (its latest checkpoint) or a step-* checkpoint of this trainer")
    ap.add_argument("--stop-at", type=int, default=0, help="stop (with a checkpoint) after this step; the schedule still spans the whole export")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f64"],
                    help="bf16: autocast with f32 master weights (default on cuda); f32 (default on cpu); "
                         "f64: the whole model in float64, a reference for measuring f32 rounding (checks only)")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard (FSDP1 if unavailable) instead of DDP")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention implementation")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda but torch.cuda.is_available() is False")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = a.dtype or ("bf16" if device.type == "cuda" else "f32")
    if device.type == "cuda":  # TF32 matmuls only when bf16 was asked for; --dtype f32 means f32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "bf16"
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    try:
        from transformers import AutoConfig
        if not os.path.isfile(os.path.join(a.student, "config.json")):
            raise DataError(f"{os.path.join(a.student, 'config.json')}: missing (not a masa student directory?)")
        config = AutoConfig.from_pretrained(a.student)
        m, train, valid = open_export(a.data, a.student, config)
        b, t, accum, steps = m["batch"], m["seq_len"], m["grad_accum"], m["steps"]
        if b % world:
            raise DataError(f"{os.path.join(a.data, 'manifest.json')}: batch {b} is not divisible by the "
                            f"{world} processes (each rank takes batch/world rows of every micro-batch)")
        if a.fsdp and not dist.is_initialized():
            raise DataError("--fsdp needs a process group: launch with torchrun (--nproc_per_node=1 is fine)")
        resume_dir, resume_state = resume_from(a.resume) if a.resume else (None, None)
        model = load_student(resume_dir or a.student, a.attn)
    except DataError as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(f"error: {e}")
    rows = b // world
    lo = rank * rows
    model.to(device, dtype=torch.float64 if dtype == "f64" else torch.float32).train()
    n_params = sum(p.numel() for p in model.parameters())
    model, mode = wrap(model, a, device, world)
    opt = make_optimizer(model, a, device)
    start = 0
    if resume_state:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        ckpt = torch.load(resume_state, map_location="cpu", weights_only=False)
        start = ckpt["step"]
        set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
        log(f"resumed from {resume_dir} at step {start}", rank)
    min_lr = a.lr * a.min_lr_ratio
    end = min(steps, a.stop_at) if a.stop_at else steps
    out_metrics = os.path.join(a.out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        kept = []
        if start and os.path.isfile(out_metrics):  # drop lines past the checkpoint
            kept = [l for l in open(out_metrics) if l.strip() and json.loads(l)["step"] <= start]
        with open(out_metrics, "w") as f:
            f.writelines(kept)
        json.dump({"engine": "torchrun", "mode": mode, "world_size": world, "device": device.type, "dtype": dtype,
                   "attn": a.attn, "torch": torch.__version__, "student": os.path.abspath(a.student),
                   "data": os.path.abspath(a.data), "params": n_params, "args": vars(a)},
                  open(os.path.join(a.out, "engine.json"), "w"), indent=2)
    log(f"{mode} x{world} on {device.type} ({dtype}), {n_params / 1e6:.1f}M params, {steps} steps of "
        f"{b} x {t} x {accum} tokens, rows {lo}..{lo + rows} of each micro-batch on rank 0..", rank)

    def emit(rec):
        if rank == 0:
            with open(out_metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def run_validation():
        v = validate(model, valid, m["valid"]["domains"], t, device, rank, world, a.eval_batch, autocast)
        return {"val": v, "val_mean": sum(v.values()) / len(v)} if v else {}

    if start == 0:
        emit({"step": 0, "tokens": 0, **run_validation()})
    train_time, trained = 0.0, 0
    step_tokens = b * t * accum
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, steps, a.warmup, a.lr, min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for micro in range(accum):
            base = (step * accum + micro) * b + lo
            x_np = np.asarray(train[base:base + rows], dtype=np.int64)
            check_tokens(x_np, config.vocab_size, f"{os.path.join(a.data, 'train.bin')} sequences {base}..{base + rows}")
            x = torch.from_numpy(x_np).to(device, non_blocking=True)
            last = micro == accum - 1
            if mode == "ddp":
                sync = model.no_sync() if not last else _null()
            elif mode == "fsdp2":
                model.set_requires_gradient_sync(last)
                sync = _null()
            elif mode == "fsdp1":
                sync = model.no_sync() if not last else _null()
            else:
                sync = _null()
            with sync:
                with autocast():
                    logits = model(input_ids=x[:, :t]).logits
                ce = F.cross_entropy(upcast(logits).reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
                # This rank's share of the step's mean; DDP/FSDP average gradients over ranks.
                (ce / (rows * t * accum)).backward()
            loss_sum += ce.detach().double()
        gn = grad_norm_and_clip(model, mode, a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum.item() / step_tokens
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        trained += step_tokens
        rec = {"step": step + 1, "tokens": (step + 1) * step_tokens, "loss": loss, "lr": lr, "grad_norm": gn,
               "tokens_per_s": trained / train_time}
        if (a.eval_every > 0 and (step + 1) % a.eval_every == 0) or step + 1 == steps:
            rec.update(run_validation())
        emit(rec)
        if not a.quiet and (step == start or (step + 1) % 10 == 0 or step + 1 == end):
            log(f"step {step + 1}/{steps} loss {loss:.4f} lr {lr:.2e} grad_norm {gn:.3f} "
                f"{trained / train_time:,.0f} tok/s" + (f" val_mean {rec['val_mean']:.4f}" if "val_mean" in rec else ""), rank)
        if (a.ckpt_every and (step + 1) % a.ckpt_every == 0) or step + 1 == end:
            save_checkpoint(model, opt, a, step + 1, a.out, a.student, rank,
                            {"total_steps": steps, "tokens": (step + 1) * step_tokens, "batch": b, "seq_len": t,
                             "grad_accum": accum, "seed": m.get("seed"), "data": os.path.abspath(a.data),
                             "engine": "torchrun", "mode": mode, "world_size": world})
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def upcast(logits):
    """bf16/f16 logits (autocast) to f32 for the loss; f32 and f64 stay as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
