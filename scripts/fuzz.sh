#!/usr/bin/env bash
# Longer run of the seeded mutation harness (tests/fuzz.rs): mutated GGUF, HF config and
# safetensors, statistics and gene files through masa's readers, for SECONDS of wall clock
# (default 600), seed SEED (default: the current time). Prints the counts: accepted, refused
# with an error, panics, hangs. Failing cases are kept under $CARGO_TARGET_DIR/fuzz-failures/ (default target/); rerun one
# with MASA_FUZZ_SEED=s MASA_FUZZ_CASE=i cargo test --release --test fuzz -- --nocapture.
#
# The run is capped at MASA_FUZZ_MEM_GB of address space (default 8): a case that allocates
# without bound aborts the harness (reported below with its case number) instead of pushing
# the machine into the OOM killer.
#
#     scripts/fuzz.sh 600          # 10 minutes
#     scripts/fuzz.sh 3600 12345   # an hour, seed 12345
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
seed=${2:-$(date +%s)}
mem_gb=${MASA_FUZZ_MEM_GB:-8}
cargo test --release --test fuzz --no-run >&2
status=0
(
    ulimit -v $((mem_gb * 1024 * 1024))
    MASA_FUZZ_SECS=$secs MASA_FUZZ_SEED=$seed exec cargo test --release --test fuzz -- --nocapture
) || status=$?
if [ $status -ne 0 ]; then
    current=${CARGO_TARGET_DIR:-target}/fuzz-failures/current-seed$seed
    if [ -f "$current" ]; then
        echo "fuzz: the harness died (status $status) during seed $seed case $(cat "$current");" \
             "rerun it with MASA_FUZZ_SEED=$seed MASA_FUZZ_CASE=$(cat "$current") cargo test --release --test fuzz -- --nocapture" >&2
    fi
fi
exit $status
