#!/usr/bin/env python3
"""Independent check of `masa eval`'s multiple-choice scores with HF transformers.

Reads the task files that `masa fetch tasks` extracted (Arrow IPC streams, with pyarrow),
builds the lm-evaluation-harness zero-shot prompts itself, tokenizes each (context,
continuation) pair as the harness's `_encode_pair` does, runs the full sequence through
transformers (weights dequantized from the same GGUF to f32, no KV cache), sums the
continuation log-probs, and compares item by item with a masa results JSON produced with
`--split all --limit N` (the first N items of each shipped file).

    masa eval smollm2-135m --tasks piqa,winogrande,hellaswag --split all --limit 200 \
        --out runs/eval/smollm2_all200.json
    PYTHONPATH=.pyarrow-pkgs .venv-bench/bin/python scripts/check_eval_transformers.py \
        --gguf ~/.cache/masa/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf \
        --masa runs/eval/smollm2_all200.json --out runs/eval/check_transformers.json

Needs torch, transformers (with gguf) and pyarrow. Not part of the test suite.
"""

import argparse
import json
import math
import os
import re
import time

import pyarrow as pa
import torch

torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))

HOME = os.environ.get("MASA_HOME", os.path.expanduser("~/.cache/masa"))
FILES = {
    "piqa": "piqa/validation.arrow",
    "winogrande": "winogrande/validation.arrow",
    "hellaswag": "hellaswag/validation.arrow",
    "boolq": "boolq/validation.arrow",
    "mmlu_professional_law": "mmlu_professional_law/test.arrow",
}


def read_rows(task):
    with open(os.path.join(HOME, "tasks", FILES[task]), "rb") as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


# --- lm-evaluation-harness doc_to_text / doc_to_choice / doc_to_target ----------------------

def hs_preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def build(task, doc):
    """Returns (contexts, continuations, choices_for_len, gold)."""
    if task == "piqa":
        ctx = "Question: " + doc["goal"] + "\nAnswer:"
        ch = [doc["sol1"], doc["sol2"]]
        return [ctx] * 2, [" " + c for c in ch], ch, int(doc["label"])
    if task == "hellaswag":
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        q = hs_preprocess(doc["activity_label"] + ": " + ctx)
        ch = [hs_preprocess(e) for e in doc["endings"]]
        return [q] * 4, [" " + c for c in ch], ch, int(doc["label"])
    if task == "winogrande":
        idx = doc["sentence"].index("_")
        ctxs = [doc["sentence"][:idx] + o for o in (doc["option1"], doc["option2"])]
        tgt = doc["sentence"][idx + 1:].strip()
        return ctxs, [" " + tgt] * 2, ctxs, {"1": 0, "2": 1}[doc["answer"]]
    if task == "boolq":
        ctx = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        return [ctx] * 2, [" no", " yes"], ["no", "yes"], int(doc["answer"])
    if task == "mmlu_professional_law":
        c = doc["choices"]
        ctx = f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
        return [ctx] * 4, [" A", " B", " C", " D"], ["A", "B", "C", "D"], int(doc["answer"])
    raise ValueError(task)


def encode_pair(tok, context, continuation):
    # lm_eval/models/huggingface.py HFLM._encode_pair (no BOS for SmolLM2).
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglik(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    logits = model(ids[:, :-1]).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    tgt = torch.tensor(cont)
    rows = lp[len(ctx) - 1:]
    return rows.gather(1, tgt.unsqueeze(1)).sum().item()


def mean_stderr(xs):
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--masa", required=True, help="masa eval results JSON (--split all)")
    ap.add_argument("--tasks", default="piqa,hellaswag,winogrande")
    ap.add_argument("--out")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    masa = json.load(open(args.masa))
    assert masa["split"] == "all", "compare a masa run made with --split all"
    report = {"model": args.gguf, "masa_results": args.masa, "tasks": {}}
    for task in args.tasks.split(","):
        mt = masa["tasks"][task]
        items = mt["items"]
        rows = read_rows(task)
        t0 = time.time()
        acc, accn, diffs, agree, agree_n, tok_mismatch = [], [], [], 0, 0, 0
        for it in items:
            ctxs, conts, choices, gold = build(task, rows[it["index"]])
            assert gold == it["gold"], (task, it["index"])
            lls, ntok = [], []
            for c, k in zip(ctxs, conts):
                a, b = encode_pair(tok, c, k)
                lls.append(loglik(model, a, b))
                ntok.append(len(b))
            if ntok != it["tokens"]:
                tok_mismatch += 1
            pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
            norm = [l / len(ch) for l, ch in zip(lls, choices)]
            pred_n = max(range(len(norm)), key=lambda i: (norm[i], -i))
            acc.append(float(pred == gold))
            accn.append(float(pred_n == gold))
            agree += pred == it["pred"]
            agree_n += pred_n == it["pred_norm"]
            diffs += [abs(x - y) for x, y in zip(lls, it["lls"])]
        a, ae = mean_stderr(acc)
        n, ne = mean_stderr(accn)
        r = {
            "n_items": len(items),
            "transformers": {"acc": a, "acc_stderr": ae, "acc_norm": n, "acc_norm_stderr": ne},
            "masa": mt["metrics"],
            "pred_agreement": agree / len(items),
            "pred_norm_agreement": agree_n / len(items),
            "loglik_abs_diff_max": max(diffs),
            "loglik_abs_diff_mean": sum(diffs) / len(diffs),
            "items_with_different_token_counts": tok_mismatch,
            "seconds": time.time() - t0,
        }
        report["tasks"][task] = r
        print(task, json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
