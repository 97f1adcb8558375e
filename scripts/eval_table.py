#!/usr/bin/env python3
"""Markdown table of a `masa eval` results JSON: task, items, acc, acc_norm / Rouge-L, seconds.

    python3 scripts/eval_table.py runs/eval/smollm2_test.json
"""
import json
import sys


def main(path):
    r = json.load(open(path))
    print(f"model `{r['model']['spec']}` (sha256 {r['model']['fingerprint'][:12]}…), split `{r['split']}`, "
          f"limit `{r['limit']}`, {r['threads']} threads, {r['prompt_format_version']}\n")
    print("| task | items | acc ± se | acc_norm ± se | Rouge-L ± se | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    ppl = None
    for name, t in r["tasks"].items():
        m = t["metrics"]
        if t["kind"] == "multiple_choice":
            print(f"| {name} | {t['n_items']} | {m['acc']:.3f} ± {m['acc_stderr']:.3f} | "
                  f"{m['acc_norm']:.3f} ± {m['acc_norm_stderr']:.3f} | | {t['seconds']:.0f} |")
        elif t["kind"] == "generation":
            print(f"| {name} ({t['n_subtasks']} subtasks) | {t['n_items']} | | | "
                  f"{m['rouge_l']:.1f} ± {m['rouge_l_stderr']:.1f} (macro {m['rouge_l_macro']:.1f}) | {t['seconds']:.0f} |")
        else:
            ppl = t
    if ppl:
        print(f"\nPerplexity ({ppl['source']['split']} split of the default corpus, {ppl['source']['seq_len']}-token "
              f"sequences, {ppl['seconds']:.0f} s):\n")
        print("| domain | sequences | tokens | mean NLL | perplexity |")
        print("|---|---:|---:|---:|---:|")
        for d, v in ppl["metrics"].items():
            print(f"| {d} | {v['sequences']} | {v['tokens']} | {v['mean_nll']:.3f} | {v['ppl']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
