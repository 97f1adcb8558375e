// A CPU emulator of the part of the CUDA execution model that src/cuda/kernels.cu uses, so the
// kernels can be checked against references on a machine without a GPU: on their own
// (tests/cuda_emu/check.cpp) and inside the whole engine (the `cuda-emu` build, src/cuda/emu.rs).
//
// - A launch runs the grid's blocks one after another. A block's threads are cooperative
//   contexts on one OS thread (a few lines of assembly on x86-64 Linux, ucontext elsewhere), scheduled
//   round-robin, forward on even blocks and backward on odd ones: each runs until it reaches a
//   barrier or ends. `threadIdx` and `blockIdx` are set on every switch; `__shared__` variables
//   are function statics (blocks never overlap in time, and CUDA shared memory starts
//   uninitialised).
// - `__syncthreads()` releases the block when all its threads wait there; `__shfl_xor_sync`
//   exchanges through per-warp slots between two warp-wide barriers. A kernel whose threads do
//   not all reach a `__syncthreads`, or whose lanes do not all reach a shuffle, is reported as a
//   deadlock (exit 3), where a GPU would hang or misbehave.
// - The three inline-PTX operations (`cvt.rn.bf16.f32`, `cvt.rn.bf16x2.f32`,
//   `mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32`) are written from the PTX ISA's description of
//   their semantics and fragment layouts, not from the kernels' comments.
//
// What it cannot show: timing, memory-model effects of real concurrency across blocks, bank
// conflicts, or NVRTC/driver behaviour. Those are `masa bench cuda-check` on a device.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#if !(defined(__x86_64__) && defined(__linux__))
#include <ucontext.h>
#endif

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

using std::max;
using std::min;

inline float __int_as_float(unsigned v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline double __longlong_as_double(unsigned long long v) {
    double d;
    std::memcpy(&d, &v, 8);
    return d;
}

namespace emu {
enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

inline std::vector<State> states;
inline std::function<void()> kernel;
inline uint64_t shuffle_slot[1024];
inline uint32_t mma_slot[1024][6];

#if defined(__x86_64__) && defined(__linux__)
// A context is its saved stack pointer; switching pushes the callee-saved registers (System V
// ABI), swaps stacks and pops the other side's (~10 ns, where swapcontext makes a system call).
using Context = void*;
extern "C" void masa_emu_switch(Context* save, Context to);
asm(R"(
    .text
    .globl masa_emu_switch
    .type masa_emu_switch, @function
masa_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size masa_emu_switch, .-masa_emu_switch
)");
inline Context scheduler;
inline std::vector<Context> contexts;
inline void thread_main();
[[noreturn]] inline void entry() {
    thread_main();
    __builtin_unreachable();
}
// A fresh context on `stack` that starts in `entry`, its stack aligned as the ABI expects on
// entry to a function (16 bytes, less the return address).
inline Context make_context(char* stack, size_t size) {
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;                    // entry's return address slot: entry never returns
    *--sp = (void*)&entry;              // popped by masa_emu_switch's ret
    for (int i = 0; i < 6; i++) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    return (Context)sp;
}
inline void to_thread(unsigned t) { masa_emu_switch(&scheduler, contexts[t]); }
inline void to_scheduler(unsigned t) { masa_emu_switch(&contexts[t], scheduler); }
#else
using Context = ucontext_t;
inline Context scheduler;
inline std::vector<Context> contexts;
inline void thread_main();
inline void make_context_at(Context& c, char* stack, size_t size) {
    getcontext(&c);
    c.uc_stack.ss_sp = stack;
    c.uc_stack.ss_size = size;
    c.uc_link = &scheduler;
    makecontext(&c, thread_main, 0);
}
inline void to_thread(unsigned t) { swapcontext(&scheduler, &contexts[t]); }
inline void to_scheduler(unsigned t) { swapcontext(&contexts[t], &scheduler); }
#endif

inline void thread_main() {
    kernel();
    unsigned t = threadIdx.x;
    states[t] = State::Done;
    to_scheduler(t);  // never resumed
}

inline void wait(State at) {
    unsigned t = threadIdx.x;
    states[t] = at;
    to_scheduler(t);
}

/// Run `body` (a call of one kernel) on `grid` blocks of `threads` threads.
template <class F>
void launch(dim3 grid, unsigned threads, F body) {
    if (threads == 0 || threads > 1024 || threads % 32 != 0) {
        std::fprintf(stderr, "emu: block of %u threads (the kernels' launches use multiples of 32 up to 1024)\n", threads);
        std::exit(2);
    }
    const size_t stack = 256 << 10;
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    kernel = body;
    std::unique_ptr<char[]> stacks(new char[threads * stack]);  // untouched pages stay unmapped
    contexts.assign(threads, Context{});
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = dim3{x, y, z};
                states.assign(threads, State::Runnable);
                for (unsigned t = 0; t < threads; t++) {
#if defined(__x86_64__) && defined(__linux__)
                    contexts[t] = make_context(stacks.get() + t * stack, stack);
#else
                    make_context_at(contexts[t], stacks.get() + t * stack, stack);
#endif
                }
                for (;;) {
                    // Run every runnable thread until it finishes or waits at a barrier: in
                    // thread order on even blocks, in reverse on odd ones, so that a missing
                    // barrier shows whichever side of it the racing threads are.
                    bool reverse = (x + y + z) % 2 == 1;
                    for (unsigned i = 0; i < threads; i++) {
                        unsigned t = reverse ? threads - 1 - i : i;
                        if (states[t] == State::Runnable) {
                            threadIdx = dim3{t, 0, 0};
                            to_thread(t);
                        }
                    }
                    // Release a warp whose 32 lanes all wait at a shuffle, or the block when every
                    // thread waits at __syncthreads.
                    bool released = false, done = true;
                    for (unsigned w = 0; w < threads / 32; w++) {
                        bool all = true;
                        for (unsigned l = 0; l < 32; l++) all = all && states[w * 32 + l] == State::AtWarpBarrier;
                        if (all) {
                            for (unsigned l = 0; l < 32; l++) states[w * 32 + l] = State::Runnable;
                            released = true;
                        }
                    }
                    bool block = true;
                    for (unsigned t = 0; t < threads; t++) {
                        block = block && states[t] == State::AtBlockBarrier;
                        done = done && states[t] == State::Done;
                    }
                    if (block) {
                        states.assign(threads, State::Runnable);
                        released = true;
                    }
                    if (done) break;
                    if (!released) {
                        unsigned n[4] = {0, 0, 0, 0};
                        for (State st : states) n[(int)st]++;
                        std::fprintf(stderr, "emu: deadlock in block (%u,%u,%u): %u threads at __syncthreads, %u at a warp shuffle, %u finished\n", x, y, z, n[1], n[2], n[3]);
                        std::exit(3);
                    }
                }
            }
}
}  // namespace emu

inline void __syncthreads() { emu::wait(emu::State::AtBlockBarrier); }

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8);
    if (mask != 0xffffffffu) {
        std::fprintf(stderr, "emu: __shfl_xor_sync with a partial mask\n");
        std::exit(2);
    }
    unsigned tid = threadIdx.x, lane = tid % 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu::shuffle_slot[tid] = bits;
    emu::wait(emu::State::AtWarpBarrier);
    uint64_t other = emu::shuffle_slot[tid - lane + (lane ^ (unsigned)lane_mask)];
    emu::wait(emu::State::AtWarpBarrier);
    T r;
    std::memcpy(&r, &other, sizeof(T));
    return r;
}

// cvt.rn.bf16.f32: round to nearest, ties to even; NaN stays NaN (canonical quiet NaN).
inline unsigned short to_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float bf16_to_f32(unsigned short h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
// cvt.rn.bf16x2.f32 d, a, b: a (the kernel passes `hi`) to the upper half, b (`lo`) to the lower.
inline uint32_t pack_bf16(float lo, float hi) { return (uint32_t)to_bf16(lo) | ((uint32_t)to_bf16(hi) << 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, D = A·B + C over one warp. Fragments (PTX
// ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), groupID = lane >> 2,
// threadID_in_group = lane % 4: A (16 × 16) register i holds elements a_{2i}, a_{2i+1} (lower half
// first) with row = groupID for element j in {0..1, 4..5}, else groupID + 8, and col =
// threadID_in_group·2 + (j & 1), + 8 for j >= 4; B (16 × 8) register i holds b_{2i}, b_{2i+1} with
// row = threadID_in_group·2 + (j & 1), + 8 for j >= 2, col = groupID; C/D (16 × 8) element j at
// row = groupID (j < 2) or groupID + 8, col = threadID_in_group·2 + (j & 1).
inline void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    unsigned tid = threadIdx.x, lane = tid % 32, base = tid - lane;
    for (int i = 0; i < 4; i++) emu::mma_slot[tid][i] = a[i];
    emu::mma_slot[tid][4] = b0;
    emu::mma_slot[tid][5] = b1;
    emu::wait(emu::State::AtWarpBarrier);
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; l++) {
        unsigned g = l >> 2, t = l % 4;
        const uint32_t* s = emu::mma_slot[base + l];
        for (int j = 0; j < 8; j++) {
            unsigned short h = (unsigned short)(s[j / 2] >> (16 * (j & 1)));
            int row = (j < 2 || (j >= 4 && j < 6)) ? g : g + 8;
            int col = t * 2 + (j & 1) + (j >= 4 ? 8 : 0);
            A[row][col] = bf16_to_f32(h);
        }
        for (int j = 0; j < 4; j++) {
            unsigned short h = (unsigned short)(s[4 + j / 2] >> (16 * (j & 1)));
            B[t * 2 + (j & 1) + (j >= 2 ? 8 : 0)][g] = bf16_to_f32(h);
        }
    }
    emu::wait(emu::State::AtWarpBarrier);
    unsigned g = lane >> 2, t = lane % 4;
    for (int j = 0; j < 4; j++) {
        int row = j < 2 ? g : g + 8, col = t * 2 + (j & 1);
        float acc = c[j];
        for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
        c[j] = acc;
    }
}
