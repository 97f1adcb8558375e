# Sourced by the GPU scripts: put the CUDA driver, cuBLAS and NVRTC libraries on LD_LIBRARY_PATH
# (masa loads them at run time). Looks in the usual toolkit and driver folders and in the
# NVIDIA pip wheels that PyTorch brings.
_masa_lib_dirs=""
for pat in 'libcuda.so*' 'libcublas.so*' 'libcublasLt.so*' 'libnvrtc.so*'; do
    # `|| true`: find exits 1 for the folders that do not exist, which would end a caller
    # running under `set -e -o pipefail` (scripts/gpu_run.sh).
    d=$(find /usr/local/nvidia /usr/local/cuda /usr/local/cuda-* /usr/lib/x86_64-linux-gnu /opt /usr/local/lib \
            -maxdepth 8 -name "$pat" -print -quit 2>/dev/null | xargs -r dirname) || true
    if [ -n "$d" ]; then _masa_lib_dirs="$_masa_lib_dirs:$d"; fi
done
export LD_LIBRARY_PATH="${_masa_lib_dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
