# Sourced by scripts/run.sh and scripts/test.sh: make `cargo` available, installing a minimal
# Rust toolchain with rustup (into ~/.cargo) when none is found, and check for a C/C++ compiler.
if ! command -v cargo >/dev/null; then
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    elif command -v curl >/dev/null; then
        echo "== cargo not found: installing a minimal Rust toolchain with rustup into ~/.cargo"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "error: cargo not found and curl missing; install Rust with rustup (https://rustup.rs)" >&2
        exit 1
    fi
fi
# Some dependencies (tokenizers' suffix arrays, oniguruma) and the emulated-device tests compile
# C and C++: say so up front rather than deep in a cargo error.
if ! command -v "${CXX:-c++}" >/dev/null || ! command -v "${CC:-cc}" >/dev/null; then
    echo "error: no C/C++ compiler (${CC:-cc}, ${CXX:-c++}) found; masa's build needs one:" \
        "install gcc and g++ (Debian/Ubuntu: apt-get install build-essential) or set CC and CXX" >&2
    exit 1
fi
