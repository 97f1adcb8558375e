#!/usr/bin/env python3
"""Regenerate the reference outputs under tests/data/reference/ that the tests compare masa to.

    python scripts/make_reference.py logits [--models smollm2-135m,gemma3-270m] [--check]
    python scripts/make_reference.py rouge [--check]

`logits`: for each text of TEXTS, HF transformers' token ids, per-token next-token NLL and
last-position logits, computed from the same GGUF file masa reads (`masa fetch smollm2-135m
gemma3-270m` puts it in $MASA_HOME/models/<name>/, default ~/.cache/masa). transformers' GGUF
loader dequantizes every tensor to f32 (and undoes llama.cpp's q/k row permutation); the
forward runs in f32 on the CPU. Writes <out>/<model>/transformers_logits.json.
Needs torch, transformers (5.x) and gguf: `scripts/setup_bench_env.sh` makes such a venv
(.venv-bench), e.g. `.venv-bench/bin/python scripts/make_reference.py logits`.

`rouge`: the Rouge-L F-measure of Google's `rouge_score` (`pip install rouge_score==0.1.2
nltk`), `RougeScorer(['rougeL'], use_stemmer=True)` (NLTK's Porter stemmer), max over the
references, for every (prediction, references) case of <out>/rouge/rougeL_cases.json. The
cases themselves (BIG-bench natural_instructions targets and perturbations of them: word
shuffles, truncations, case and punctuation changes, suffixes for the stemmer, empty strings)
are the committed inputs; this recomputes their expected scores.

`--check` writes nothing: it recomputes and compares with the committed files (ids exactly,
numbers to 1e-6 for Rouge-L and 1e-4 for NLLs/logits, which depend on the torch build), and
exits 1 on a difference.
"""

import argparse
import json
import os
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_OUT = os.path.join(ROOT, "tests", "data", "reference")
HOME = os.environ.get("MASA_HOME", os.path.expanduser("~/.cache/masa"))

# (masa model name, GGUF file in $MASA_HOME/models/<name>/, whether to put BOS first).
# SmolLM2 adds no special tokens; Gemma expects BOS (id 2) first.
MODELS = {
    "smollm2-135m": ("SmolLM2-135M-Instruct.Q4_1.gguf", False),
    "gemma3-270m": ("gemma-3-270m-q4_k_m.gguf", True),
}

# Prose, code, a technical sentence, non-ASCII (accents, CJK, emoji, digits) and chat markup
# (SmolLM2's special tokens; plain text to Gemma).
TEXTS = [
    "The capital of France is Paris. The capital of Germany is",
    'fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!("{:?}", v);\n}',
    "In mathematics, a singular value decomposition factorizes a real matrix into the product",
    "Héllo wörld — naïve café, 東京 and emoji 🙂 test 12345 + 6789 = ?",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]


def logits_entries(gguf_path, add_bos):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    directory, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    entries = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if add_bos:
            ids = [tok.bos_token_id] + ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        nll = (-logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]).tolist()
        last = logits[-1]
        top = torch.topk(last, 5)
        entries.append({
            "text": text,
            "ids": ids,
            "next_token_nll": nll,
            "last_logits_top5_ids": top.indices.tolist(),
            "last_logits_top5": top.values.tolist(),
            "last_logits_first16": last[:16].tolist(),
            "mean_nll": sum(nll) / len(nll),
        })
    return entries


def rouge_cases(cases):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        {
            "prediction": c["prediction"],
            "references": c["references"],
            "rougeL_f": max(scorer.score(ref, c["prediction"])["rougeL"].fmeasure for ref in c["references"]),
        }
        for c in cases
    ]


def differences(want, got, tol, where=""):
    """Paths at which two JSON values differ (numbers by more than `tol`, the rest exactly)."""
    if isinstance(want, bool) or isinstance(got, bool) or isinstance(want, str) or want is None:
        return [] if want == got else [f"{where}: {want!r} != {got!r}"]
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        if isinstance(want, int) and isinstance(got, int):
            return [] if want == got else [f"{where}: {want} != {got}"]
        return [] if abs(want - got) <= tol else [f"{where}: {want} vs {got}"]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: length {len(want)} != {len(got)}"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in differences(a, b, tol, f"{where}[{i}]")]
    if isinstance(want, dict) and isinstance(got, dict):
        if set(want) != set(got):
            return [f"{where}: keys {sorted(want)} != {sorted(got)}"]
        return [d for k in want for d in differences(want[k], got[k], tol, f"{where}.{k}")]
    return [f"{where}: {type(want).__name__} != {type(got).__name__}"]


def emit(path, value, indent, check, tol):
    """Write `value` as the committed files are formatted, or with `check` compare to them."""
    if check:
        with open(path) as f:
            diffs = differences(json.load(f), value, tol)
        for d in diffs[:20]:
            print(f"{path}{d}", file=sys.stderr)
        print(f"{path}: {'matches' if not diffs else f'{len(diffs)} differences'}")
        return not diffs
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=indent)
    print(f"wrote {path}")
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["logits", "rouge"])
    ap.add_argument("--models", default=",".join(MODELS), help="logits: comma-separated masa model names")
    ap.add_argument("--out", default=DEFAULT_OUT, help="reference directory (default: tests/data/reference)")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = ap.parse_args()
    ok = True
    if args.what == "logits":
        for name in args.models.split(","):
            file, add_bos = MODELS[name]
            gguf = os.path.join(HOME, "models", name, file)
            if not os.path.exists(gguf):
                sys.exit(f"{gguf} missing: run `masa fetch {name}` (or set MASA_HOME)")
            path = os.path.join(args.out, name, "transformers_logits.json")
            ok &= emit(path, logits_entries(gguf, add_bos), 1, args.check, 1e-4)
    else:
        path = os.path.join(args.out, "rouge", "rougeL_cases.json")
        with open(path) as f:
            cases = json.load(f)
        ok &= emit(path, rouge_cases(cases), 0, args.check, 1e-6)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
