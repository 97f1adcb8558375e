#!/usr/bin/env bash
# The PyTorch/torchrun checks (not part of CI: PyTorch is a large download): runs
# scripts/check_torchrun.py with the venv from scripts/setup_torch.sh. Needs target/release/masa
# (or MASA=path) and the default corpus (`masa fetch corpus`). About 20 min on 2 busy CPU cores.
#   scripts/test_torch.sh [--work DIR] [check_torchrun.py options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-bench}"
source "$ROOT/scripts/masa_bin.sh"
MASA="${MASA:-$MASA_BIN}"
[[ -x "$VENV/bin/torchrun" ]] || { echo "no $VENV/bin/torchrun: run scripts/setup_torch.sh first" >&2; exit 1; }
[[ -x "$MASA" ]] || { echo "no $MASA: cargo build --release (or MASA=path)" >&2; exit 1; }
args=("$@")
[[ " $* " == *" --work "* ]] || args=(--work "${TMPDIR:-/tmp}/masa-torchrun-check" "${args[@]}")
"$VENV/bin/python" "$ROOT/scripts/check_torchrun.py" --masa "$MASA" "${args[@]}"

# masa run with both engines (scripts/torchrun-e2e.toml): every strategy's final validation loss
# on torchrun within 0.02 nats of masa's (same init, tokens and schedule; f32 on both).
RUNS="${TMPDIR:-/tmp}/masa-torchrun-e2e"
cd "$ROOT"
"$MASA" run scripts/torchrun-e2e.toml --runs "$RUNS"
"$VENV/bin/python" - "$RUNS/torchrun-e2e/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
final = {t["strategy"]: t["curve"][-1]["val_mean"] for t in r["trainings"]}
bad = 0
for s, v in sorted(final.items()):
    if "@" in s:
        continue
    d = abs(final[s + "@torchrun"] - v)
    print(f"masa run, {s}: masa {v:.5f}  torchrun {final[s + '@torchrun']:.5f}  |diff| {d:.2e}  {'PASS' if d < 0.02 else 'FAIL'}")
    bad += d >= 0.02
assert all(len(t["downstream"]) == 1 for t in r["trainings"]), "every run, torchrun's too, is fine-tuned and evaluated"
sys.exit(1 if bad else 0)
PY
