#!/usr/bin/env python3
"""Compile src/cuda/kernels.cu with NVRTC as `masa` does at run time (no GPU needed, only
libnvrtc), and check that every kernel named in src/cuda/mod.rs's KERNELS is an entry of the
PTX. Catches compile errors and name mismatches of kernel edits made without a device.

Usage: scripts/nvrtc_check.py [--arch sm_90] [--lib /path/to/libnvrtc.so.13]
The library is found via --lib, $NVRTC_LIB, or a pip `nvidia-cuda-nvrtc` wheel under a venv
(e.g. .venv-bench from scripts/setup_bench_env.sh)."""
import argparse, ctypes, glob, os, re, sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--arch", default="sm_90")
ap.add_argument("--lib", default=os.environ.get("NVRTC_LIB"))
a = ap.parse_args()
lib = a.lib or next(iter(sorted(glob.glob(os.path.join(root, ".venv*/lib/python3*/site-packages/nvidia/cu1*/lib/libnvrtc.so.1*")))), None)
if not lib:
    sys.exit("nvrtc_check: no libnvrtc found; pass --lib or set NVRTC_LIB (pip install nvidia-cuda-nvrtc gives one)")
# NVRTC dlopens its builtins by name: load them first from the same folder.
for b in sorted(glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so.*"))):
    if ".alt." not in b:
        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
nv = ctypes.CDLL(lib)
src = open(os.path.join(root, "src/cuda/kernels.cu"), "rb").read()
prog = ctypes.c_void_p()
def ok(rc, what):
    if rc != 0:
        nv.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"nvrtc_check: {what}: {nv.nvrtcGetErrorString(rc).decode()}")
ok(nv.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None), "create")
opts = [f"--gpu-architecture={a.arch}".encode(), b"--std=c++17"]
rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
nv.nvrtcGetProgramLog(prog, log)
if log.value.strip():
    print(log.value.decode())
ok(rc, "compile")
nv.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
ok(nv.nvrtcGetPTX(prog, ptx), "PTX")
entries = set(re.findall(r"\.entry\s+(\w+)", ptx.value.decode()))
mod = open(os.path.join(root, "src/cuda/mod.rs")).read()
names = re.findall(r'"(\w+)"', re.search(r"const KERNELS: &\[&str\] = &\[(.*?)\];", mod, re.S).group(1))
missing = [k for k in names if k not in entries]
unlisted = sorted(entries - set(names))
print(f"nvrtc_check: {os.path.basename(lib)}, {a.arch}: {len(entries)} kernels compiled, {len(names)} listed in KERNELS")
if missing or unlisted:
    sys.exit(f"nvrtc_check: listed but not compiled: {missing}; compiled but not listed: {unlisted}")
