#!/usr/bin/env bash
# Create .venv-bench (repo root) with a CPU-only PyTorch + transformers + gguf,
# from PyPI only, for the PyTorch side of masa's benchmarks.
#
# How torch is installed (the pytorch.org CPU index is not reachable from here):
# the Linux x86_64 torch wheel on PyPI is a CUDA build. `pip install torch` pulls
# ~20 cuda-*/nvidia-*/triton packages. `pip install --no-deps torch` alone does NOT
# import: libtorch_cpu.so / libtorch_cuda.so / libtorch_python.so have hard ELF
# NEEDED entries on libcudart, libcublas, libcudnn, libnccl, libcusparse(Lt), libcufft,
# libcufile, libcurand, libnvrtc, libcupti and libnvshmem_host. So we install:
#   1. torch==$TORCH_VERSION with --no-deps,
#   2. only the nvidia-* wheels that provide those linked libraries (exact versions
#      taken from pip's resolution of torch's own requirements), with --no-deps,
#      skipping what is never loaded on CPU: triton, nvidia-cusolver (only the
#      lazily loaded libtorch_cuda_linalg.so needs it), nvidia-nvtx, cuda-bindings,
#      cuda-pathfinder and the cuda-toolkit meta package,
#   3. torch's pure-Python deps (filelock, typing-extensions, sympy, networkx,
#      jinja2, fsspec, setuptools).
# No GPU is used: the CUDA libraries are only there to satisfy the dynamic loader.
#
# Idempotent: re-running checks the venv and only installs what is missing.
# Overrides: TORCH_VERSION, TRANSFORMERS_VERSION, GGUF_VERSION, VENV, PYTHON.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"          # the version docs/assets.md measured
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.24.0}"
GGUF_VERSION="${GGUF_VERSION:-0.19.0}"

say() { echo "[setup_bench_env] $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtualenv $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
else
    say "virtualenv $VENV exists"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

installed() {  # installed NAME VERSION -> 0 if NAME==VERSION is installed
    local v
    v="$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true)"
    [[ -n "$v" && ( -z "${2:-}" || "$v" == "$2" ) ]]
}

start=$(date +%s)

if installed torch "$TORCH_VERSION"; then
    say "torch $TORCH_VERSION already installed"
else
    say "installing torch==$TORCH_VERSION from PyPI with --no-deps"
    "${PIP[@]}" install --no-deps "torch==$TORCH_VERSION"
fi

# torch's pure-Python runtime deps (from its Requires-Dist, minus cuda/nvidia/triton).
say "installing torch's pure-Python deps: filelock typing-extensions sympy networkx jinja2 fsspec setuptools"
"${PIP[@]}" install -q filelock 'typing-extensions>=4.10' 'sympy>=1.13.3' 'networkx>=2.5.1' jinja2 'fsspec>=0.8.5' 'setuptools>=77.0.3'

if "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    say "torch imports (its linked CUDA libraries are present)"
else
    say "torch does not import without the CUDA libraries it links against; resolving torch's requirements (dry run)"
    REPORT="$(mktemp)"
    "${PIP[@]}" install -q --dry-run --ignore-installed --report "$REPORT" "torch==$TORCH_VERSION"
    mapfile -t NV < <("$VENV/bin/python" - "$REPORT" <<'PY'
import json, sys
skip = {"torch", "triton", "nvidia-cusolver", "nvidia-nvtx", "cuda-bindings",
        "cuda-pathfinder", "cuda-toolkit"}
for item in json.load(open(sys.argv[1]))["install"]:
    name = item["metadata"]["name"].lower().replace("_", "-")
    if name.startswith("nvidia-") and not any(name.startswith(s) for s in skip):
        print(f"{name}=={item['metadata']['version']}")
PY
)
    rm -f "$REPORT"
    say "installing with --no-deps only the linked CUDA libraries: ${NV[*]}"
    "${PIP[@]}" install --no-deps "${NV[@]}"
fi

# transformers does not require torch (only via its [torch] extra), so this does
# not drag the CUDA packages back in.
say "installing transformers==$TRANSFORMERS_VERSION gguf==$GGUF_VERSION numpy safetensors"
"${PIP[@]}" install -q "transformers==$TRANSFORMERS_VERSION" "gguf==$GGUF_VERSION" numpy safetensors
# transformers' GGUF loader needs accelerate; it requires torch, so install it with
# --no-deps (else pip would resolve torch's CUDA requirements again) plus its other deps.
say "installing accelerate (--no-deps) and its non-torch deps psutil pyyaml"
"${PIP[@]}" install -q psutil pyyaml
"${PIP[@]}" install -q --no-deps accelerate


say "checking that torch runs on CPU"
"$VENV/bin/python" - <<'PY'
import torch, transformers, gguf, numpy, safetensors, accelerate
a = torch.randn(256, 256)
assert torch.allclose(a @ torch.eye(256), a)
print(f"[setup_bench_env] ok: torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"threads {torch.get_num_threads()}, transformers {transformers.__version__}, "
      f"numpy {numpy.__version__}, safetensors {safetensors.__version__}")
PY
say "venv size: $(du -sh "$VENV" | cut -f1); took $(( $(date +%s) - start )) s"
say "activate with: source $VENV/bin/activate"
