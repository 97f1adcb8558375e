#!/usr/bin/env python3
"""Print masa vs PyTorch from the two JSON result files of one benchmark.

usage: bench_compare.py MASA_JSON TORCH_JSON [LABEL]
Reads `tokens_per_s` and `peak_rss_mb` from each (the last JSON line of each file).
"""
import json
import os
import sys


def load(path):
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.strip().startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON object in {path}")
    return json.loads(lines[-1])


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    missing = [p for p in sys.argv[1:3] if not os.path.exists(p)]
    for p in sys.argv[1:3]:
        if os.path.exists(p) and missing:
            r = load(p)
            print(f"{p}: {float(r['tokens_per_s']):,.1f} tokens/s, peak RSS {r.get('peak_rss_mb')} MB")
    if missing:
        raise SystemExit(f"no result in {', '.join(missing)}: no comparison")
    m, t = load(sys.argv[1]), load(sys.argv[2])
    label = sys.argv[3] if len(sys.argv) > 3 else t.get("bench", "bench")
    mt, tt = float(m["tokens_per_s"]), float(t["tokens_per_s"])
    mr, tr = m.get("peak_rss_mb"), t.get("peak_rss_mb")
    print(f"== {label}")
    print(f"masa  : {mt:12,.1f} tokens/s   peak RSS {mr if mr is None else f'{float(mr):,.0f}'} MB")
    print(f"torch : {tt:12,.1f} tokens/s   peak RSS {tr if tr is None else f'{float(tr):,.0f}'} MB"
          f"   (torch {t.get('torch', '?')}, attn {t.get('attn', '?')})")
    print(f"ratio masa/torch tokens/s: {mt / tt:.3f}")
    if mr is not None and tr is not None:
        print(f"ratio masa/torch peak RSS: {float(mr) / float(tr):.3f}")
    load1 = os.getloadavg()[0]
    if load1 > (os.cpu_count() or 1) + 0.5:
        print(f"WARNING: 1-min load average is {load1:.1f} on {os.cpu_count()} cores: "
              f"other processes competed for the CPU, timings are noisy")


if __name__ == "__main__":
    main()
