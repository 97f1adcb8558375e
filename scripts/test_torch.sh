#!/usr/bin/env bash
# The PyTorch/torchrun checks (not part of CI: PyTorch is a large download): runs
# scripts/check_torchrun.py with the venv from scripts/setup_torch.sh. Needs target/release/masa
# (or MASA=path) and the default corpus (`masa fetch corpus`). About 10 min on 2 busy CPU cores.
#   scripts/test_torch.sh [--work DIR] [check_torchrun.py options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-bench}"
MASA="${MASA:-$ROOT/target/release/masa}"
[[ -x "$VENV/bin/torchrun" ]] || { echo "no $VENV/bin/torchrun: run scripts/setup_torch.sh first" >&2; exit 1; }
[[ -x "$MASA" ]] || { echo "no $MASA: cargo build --release (or MASA=path)" >&2; exit 1; }
args=("$@")
[[ " $* " == *" --work "* ]] || args=(--work "${TMPDIR:-/tmp}/masa-torchrun-check" "${args[@]}")
exec "$VENV/bin/python" "$ROOT/scripts/check_torchrun.py" --masa "$MASA" "${args[@]}"
