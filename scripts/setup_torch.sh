#!/usr/bin/env bash
# One command: the Python environment for python/masa_torch/pretrain.py (PyTorch + transformers
# from PyPI), checked for what the trainer needs (torch.distributed with gloo, FSDP2
# fully_shard, transformers' LlamaForCausalLM), then prints how to run it.
#
#   scripts/setup_torch.sh            # venv at .venv-bench (shared with the benchmarks)
#   VENV=/path/to/venv scripts/setup_torch.sh
#
# Without an NVIDIA GPU (no working nvidia-smi) it reuses scripts/setup_bench_env.sh, which
# installs the PyPI torch wheel with --no-deps plus only the CUDA libraries it links against
# (the pytorch.org CPU index is not reachable from here; see that script's header). With a GPU,
# or with TORCH_FULL=1, it runs `pip install -r python/requirements.txt` (the complete CUDA
# build: nccl, triton, cusolver, ...). Idempotent. Overrides: VENV, PYTHON, TORCH_VERSION,
# TRANSFORMERS_VERSION, TORCH_FULL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VENV="${VENV:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"
say() { echo "[setup_torch] $*"; }

if [[ "${TORCH_FULL:-}" == 1 ]] || nvidia-smi -L >/dev/null 2>&1; then
    say "GPU (or TORCH_FULL=1): full CUDA torch from PyPI via python/requirements.txt into $VENV"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip --disable-pip-version-check install -q \
        ${TORCH_VERSION:+"torch==$TORCH_VERSION"} -r "$ROOT/python/requirements.txt"
else
    say "no GPU: CPU setup through scripts/setup_bench_env.sh into $VENV"
    "$ROOT/scripts/setup_bench_env.sh"
fi

say "checking what the trainer needs"
"$VENV/bin/python" - <<'PY'
import torch, torch.distributed as dist, transformers, numpy, safetensors
from transformers import LlamaForCausalLM  # noqa: F401
assert dist.is_available(), "torch.distributed is not available in this torch build"
assert dist.is_gloo_available(), "torch.distributed has no gloo backend"
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    fsdp = "FSDP2 (fully_shard)"
except ImportError:
    fsdp = "FSDP1 only (torch < 2.6: --fsdp falls back to FullyShardedDataParallel)"
cuda = torch.cuda.is_available()
nccl = dist.is_nccl_available() if cuda else False
print(f"[setup_torch] ok: torch {torch.__version__}, transformers {transformers.__version__}, gloo yes, "
      f"nccl {'yes' if nccl else 'n/a'}, cuda {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'}, {fsdp}")
PY

cat <<EOF
[setup_torch] run it (docs/torch.md):
  masa tokens STUDENT --corpus CORPUS --tokens N --batch B --seq T --seed S --eval-seqs E --out DATA
  $VENV/bin/torchrun --nproc_per_node=2 $ROOT/python/masa_torch/pretrain.py STUDENT --data DATA --out RUN \\
      --lr 4e-4 --warmup 100 --eval-every 100 [--fsdp] [--device cuda]
  check against masa train: $ROOT/scripts/test_torch.sh
EOF
