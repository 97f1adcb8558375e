#!/usr/bin/env python3
"""The tuning criterion of results/replica-noise/spec.toml: for every training run of a runs
directory, the mean training loss of its last 20 steps (train-split batches, each seen once),
by replica noise and seed. Usage: tail_loss.py RUNS_DIR"""
import glob
import os
import json
import sys
from collections import defaultdict

rows = defaultdict(dict)
for run in glob.glob(f"{sys.argv[1]}/artifacts/train-*"):
    if not os.path.exists(f"{run}/record.json"):
        continue  # not finished
    latest = open(f"{run}/latest").read().strip()
    d = json.load(open(f"{run}/{latest}/masa.json"))
    init = json.load(open(d["init"] + "/masa.json"))["options"]
    steps = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
    losses = [s["loss"] for s in steps if "loss" in s]
    tail = losses[-20:]
    rows[init["replica_noise"]][d["options"]["seed"]] = sum(tail) / len(tail)
seeds = sorted({s for r in rows.values() for s in r})
print("| replica noise a | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
print("|---:|" + "---:|" * (len(seeds) + 1))
for a in sorted(rows):
    v = [rows[a].get(s) for s in seeds]
    mean = sum(x for x in v if x is not None) / max(1, sum(x is not None for x in v))
    print(f"| {a} | " + " | ".join("–" if x is None else f"{x:.4f}" for x in v) + f" | {mean:.4f} |")
