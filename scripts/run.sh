#!/usr/bin/env bash
# The main job: build masa, then `masa run` the default experiment (or the spec given:
# quick, extended, paper, or a TOML file). Fetches the source model, the corpus and the
# evaluation data on first use; finished stages are reused on a rerun. Report:
# runs/<name>/report.html and report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_rust.sh
source scripts/masa_bin.sh
echo "== building masa (release; the first build takes ~10-15 min on 2 cores)"
cargo build --release
exec "$MASA_BIN" run "$@"
