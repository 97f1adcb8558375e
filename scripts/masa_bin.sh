# Sourced by the scripts that run masa: sets MASA_BIN to the binary `cargo build --release`
# writes when run from the repository root, honouring CARGO_TARGET_DIR (absolute, or relative
# to the repository root, as cargo reads it there).
MASA_BIN="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && realpath -m "${CARGO_TARGET_DIR:-target}")/release/masa"
