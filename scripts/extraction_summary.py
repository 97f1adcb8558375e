"""Summarise runs/extraction/*.report.json (written by `masa extract`) as Markdown tables."""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    p = out / f"{name}.report.json"
    return json.loads(p.read_text()) if p.exists() else None


def row(label, rep):
    ms = rep["matrices"]
    med = lambda k: statistics.median(m[k] for m in ms)
    mean_spec = lambda k: statistics.mean(m[k] / m["r"] for m in ms)
    secs = max(m["seconds"] for m in ms) if rep["mode"] == "minibatch" else sum(m["seconds"] for m in ms)
    return (f"| {label} | {len(ms)} | {ms[0]['r']} | {med('rel_l_out_start'):.4f} | {med('rel_l_out'):.4f} | "
            f"{mean_spec('l_spec_start'):.3f} | {mean_spec('l_spec'):.3f} | {secs:.1f} |")


head = ("| run | matrices | r (gate) | median rel. L_out (closed form) | median rel. L_out (final) | "
        "mean L_spec/r (closed form) | mean L_spec/r (final) | seconds (sum over matrices) |\n|---|---|---|---|---|---|---|---|")
print("## Extraction of SmolLM2-135M\n")
print(head)
for ratio in ("0.12", "0.23"):
    rep = load(f"genes-{ratio}")
    if rep:
        print(row(f"ratio {ratio}, λ {rep['options']['lambda']}", rep))
print("\n## λ sweep (ratio 0.12, a subset of layers)\n")
print(head)
for lam in ("0", "0.001", "0.01", "0.1", "1"):
    rep = load(f"sweep-lambda-{lam}")
    if rep:
        print(row(f"λ = {lam}", rep))
mb, ex = load("minibatch-16k-layer15"), load("exact-16k-layer15")
trace = out / "minibatch-16k-layer15.trace.json"
if mb and ex and trace.exists():
    print("\n## Exact vs the paper's minibatch mode (layer 15, λ = 0, the same 16,384 tokens)\n")
    print("| mode | median rel. L_out | seconds |\n|---|---|---|")
    print(f"| exact | {statistics.median(m['rel_l_out'] for m in ex['matrices']):.4f} | {sum(m['seconds'] for m in ex['matrices']):.1f} |")
    for p in [q for q in json.loads(trace.read_text()) if q["epoch"] in (1, 5, 10, 20, 30, 40, 60, 80)]:
        print(f"| minibatch, epoch {p['epoch']} | {p['median_rel_l_out']:.4f} | {p['seconds']:.1f} |")
