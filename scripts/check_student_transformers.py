"""Check that a student directory written by `masa init` / `masa train` loads in HF transformers
as LlamaForCausalLM unchanged, and that transformers' NLLs equal `masa score`'s.

usage: .venv-bench/bin/python scripts/check_student_transformers.py STUDENT_DIR MASA_SCORE.json
(MASA_SCORE.json: output of `masa score STUDENT_DIR TEXTS.json --out MASA_SCORE.json`)
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

student, scored = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(student, torch_dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(student)
print(type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")
worst = 0.0
for entry in json.load(open(scored)):
    ids = tok(entry["text"], add_special_tokens=False)["input_ids"]
    assert ids == entry["ids"], f"token ids differ for {entry['text'][:40]!r}"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits[:-1].double(), -1)
    nll = (-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]).tolist()
    worst = max(worst, max(abs(a - b) for a, b in zip(nll, entry["nll"])))
print(f"max |nll_transformers - nll_masa| = {worst:.2e}")
assert worst < 2e-3
