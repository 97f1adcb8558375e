#!/usr/bin/env python3
"""Print training curves of several `masa train` runs side by side.

usage: scripts/compare_curves.py NAME=RUN_DIR [NAME=RUN_DIR ...]

For every step with validation in all runs: mean validation loss (over domains) of each run;
then the per-domain validation losses at the last common step, and the train loss averaged
over windows of 20 steps.
"""
import json
import sys


def load(d):
    rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if l.strip()]
    return rows


def main():
    runs = [a.split("=", 1) for a in sys.argv[1:]]
    if not runs:
        sys.exit(__doc__)
    data = {n: load(d) for n, d in runs}
    names = [n for n, _ in runs]
    val = {n: {r["step"]: r for r in rows if "val" in r} for n, rows in data.items()}
    steps = sorted(set.intersection(*(set(v) for v in val.values())))
    print("validation loss (mean over domains)")
    print(f"{'step':>6} {'tokens':>9} " + " ".join(f"{n:>10}" for n in names))
    for s in steps:
        tok = val[names[0]][s]["tokens"]
        print(f"{s:>6} {tok:>9} " + " ".join(f"{val[n][s]['val_mean']:>10.4f}" for n in names))
    if steps:
        last = steps[-1]
        doms = sorted(val[names[0]][last]["val"])
        print(f"\nper-domain validation loss at step {last}")
        print(f"{'domain':>12} " + " ".join(f"{n:>10}" for n in names))
        for d in doms:
            print(f"{d:>12} " + " ".join(f"{val[n][last]['val'][d]:>10.4f}" for n in names))
    print("\ntrain loss, mean over windows of 20 steps")
    tr = {n: [r for r in rows if "loss" in r] for n, rows in data.items()}
    m = min(len(v) for v in tr.values())
    print(f"{'steps':>10} " + " ".join(f"{n:>10}" for n in names))
    for a in range(0, m, 20):
        b = min(a + 20, m)
        cells = " ".join(f"{sum(r['loss'] for r in tr[n][a:b]) / (b - a):>10.4f}" for n in names)
        print(f"{a + 1:>4}-{b:<5} {cells}")


if __name__ == "__main__":
    main()
