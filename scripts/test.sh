#!/usr/bin/env bash
# The test command: builds masa, fetches the real SmolLM2-135M file that the parity tests use
# (cached in $MASA_HOME, default ~/.cache/masa; a second run downloads nothing), runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_rust.sh
echo "== building masa (release)"
cargo build --release
echo "== fetching the SmolLM2-135M source model used by the parity tests"
./target/release/masa fetch smollm2-135m
echo "== running the tests"
cargo test --release "$@"
