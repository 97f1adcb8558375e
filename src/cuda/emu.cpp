// The kernels of kernels.cu under the CPU emulator (emu.h), callable from Rust as the launch
// function of the `cuda-emu` build (src/cuda/emu.rs): `masa_emu_launch(name, grid, block, args)`
// with `args` as cuLaunchKernel takes them (a pointer to each argument's value, in order).

#include "emu.h"
#include "kernels.cu"

#include <cstring>
#include <tuple>
#include <utility>

template <class... A, size_t... I>
static void call(void (*k)(A...), void** args, dim3 grid, unsigned block, std::index_sequence<I...>) {
    std::tuple<A...> vals{*static_cast<A*>(args[I])...};
    emu::launch(grid, block, [&] { std::apply(k, vals); });
}
template <class... A>
static void call(void (*k)(A...), void** args, dim3 grid, unsigned block) {
    call(k, args, grid, block, std::index_sequence_for<A...>{});
}

#define KERNEL(k)                         \
    if (std::strcmp(name, #k) == 0) {     \
        call(k, args, grid, block);       \
        return 0;                         \
    }

extern "C" int masa_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned block, void** args) {
    dim3 grid{gx, gy, gz};
    KERNEL(embed_fwd)
    KERNEL(embed_bwd)
    KERNEL(rmsnorm_fwd)
    KERNEL(rmsnorm_bwd_dx)
    KERNEL(rmsnorm_dw_partial)
    KERNEL(colsum_acc)
    KERNEL(qkv_split_rope)
    KERNEL(qkv_merge_rope_bwd)
    KERNEL(heads_rows)
    KERNEL(softmax_causal)
    KERNEL(softmax_causal_bwd)
    KERNEL(swiglu_fwd)
    KERNEL(swiglu_bwd)
    KERNEL(ce_rows)
    KERNEL(sumsq_partial)
    KERNEL(sum_partials)
    KERNEL(adamw)
    KERNEL(qkv_split_rope16)
    KERNEL(flash_fwd)
    KERNEL(flash_bwd_prep)
    KERNEL(flash_bwd_dq)
    KERNEL(flash_bwd_dkdv)
    KERNEL(f32_to_bf16)
    KERNEL(add_f64)
    KERNEL(topk_rows)
    KERNEL(attn_decode)
    return 1;
}
