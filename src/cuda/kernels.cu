// CUDA kernels of the trainable Llama student, the device twin of src/kernels.rs: the same
// math in the same order of operations where that order is defined (RMSNorm, rotate-half RoPE,
// causal softmax, SwiGLU, cross-entropy with distillation, AdamW). Matrix products are cuBLAS
// calls made from src/cuda/llama.rs; everything here is row-wise or elementwise.
//
// Compiled at run time by NVRTC (src/cuda/mod.rs). Every reduction has a fixed shape (fixed
// block size, fixed chunking, partial sums added in order), and no kernel uses atomics on
// floats, so results do not change from run to run on the same card.

typedef unsigned int u32;
typedef unsigned char u8;
typedef unsigned long long u64;

// NVRTC compiles without the C library headers: infinities by bit pattern.
#define NEG_INF_F __int_as_float(0xff800000)
#define NEG_INF_D __longlong_as_double(0xfff0000000000000ULL)

#define WARP 32

// Sum / max over the block; every thread gets the result. `sh` holds 32 values. A fixed tree
// for a fixed block size, so the result does not change from run to run.
struct SumOp {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
template <class T, class Op>
__device__ T block_reduce(T v, T* sh, T identity, Op op) {
    int lane = threadIdx.x & (WARP - 1), w = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : identity;
    return warp_reduce(v, op);
}
__device__ float block_sum(float v, float* sh) { return block_reduce(v, sh, 0.f, SumOp()); }
__device__ float block_max(float v, float* sh) { return block_reduce(v, sh, NEG_INF_F, MaxOp()); }
__device__ double block_sum_d(double v, double* sh) { return block_reduce(v, sh, 0.0, SumOp()); }

// ---------------------------------------------------------------------------------------------
// Embedding: gather rows; the backward adds rows per distinct id in token order (the host sorts
// positions by (id, position)), one block per id, so no two blocks write the same row.

extern "C" __global__ void embed_fwd(const u32* ids, const float* emb, float* x, int h) {
    u64 row = blockIdx.x;
    const float* src = emb + (u64)ids[row] * h;
    float* dst = x + row * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void embed_bwd(const float* dx, const u32* order, const u32* uid, const u32* start, float* demb, int h) {
    int u = blockIdx.x;
    float* dst = demb + (u64)uid[u] * h;
    u32 s0 = start[u], s1 = start[u + 1];
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float acc = dst[i];
        for (u32 s = s0; s < s1; s++) acc += dx[(u64)order[s] * h + i];
        dst[i] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x · r · w, r = 1 / sqrt(mean(x²) + eps). One block per row.

extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd, int d, float eps) {
    __shared__ float sh[WARP];
    u64 row = blockIdx.x;
    const float* xr = x + row * d;
    float* yr = y + row * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, sh);
    float r = 1.f / sqrtf(ss / (float)d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

// dx += r (dy ⊙ w) − x r³ ((dy ⊙ w)·x) / d
extern "C" __global__ void rmsnorm_bwd_dx(const float* dy, const float* x, const float* w, const float* rstd, float* dx, int d) {
    __shared__ float sh[WARP];
    u64 row = blockIdx.x;
    const float* dyr = dy + row * d;
    const float* xr = x + row * d;
    float* dxr = dx + row * d;
    float dot = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dot += dyr[i] * w[i] * xr[i];
    dot = block_sum(dot, sh);
    float r = rstd[row];
    float c = r * r * r * dot / (float)d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dxr[i] += r * dyr[i] * w[i] - c * xr[i];
}

// dw partial sums over fixed blocks of `rows_per` rows: part[chunk][i] = Σ dy ⊙ x · r.
extern "C" __global__ void rmsnorm_dw_partial(const float* dy, const float* x, const float* rstd, float* part, int n, int d, int rows_per) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    int r0 = blockIdx.y * rows_per, r1 = min(n, r0 + rows_per);
    float acc = 0.f;
    for (int r = r0; r < r1; r++) acc += dy[(u64)r * d + i] * x[(u64)r * d + i] * rstd[r];
    part[(u64)blockIdx.y * d + i] = acc;
}

// out[i] += Σ_c part[c][i], chunks in order.
extern "C" __global__ void colsum_acc(const float* part, float* out, int chunks, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    float acc = 0.f;
    for (int c = 0; c < chunks; c++) acc += part[(u64)c * d + i];
    out[i] += acc;
}

// ---------------------------------------------------------------------------------------------
// Attention layout. The fused q/k/v projection gives rows [q heads | k heads | v heads]; the
// batched products want (b, nh, t, hd) per tensor. K and V are repeated for grouped-query
// attention (head h reads kv head h / (nh/nkv), HF repeat_kv); RoPE (rotate-half, cos/sin
// tables (t, hd/2)) is applied to q and k on the way. Grid (b·t, nh).

// One (row, head) of the packed q/k/v rows with RoPE applied to q and k, handed to
// `put(which, feature, value)` (which: 0 q, 1 k, 2 v); k and v from kv head h / (nh/nkv).
template <class Put>
__device__ __forceinline__ void split_rope_row(const float* qkv, const float* cos_t, const float* sin_t, int row, int h, int t, int nh, int nkv, int hd,
                                               Put put) {
    int p = row % t, kh = h / (nh / nkv), half = hd / 2;
    const float* src = qkv + (u64)row * (nh + 2 * nkv) * hd;
    const float* qs = src + h * hd;
    const float* ks = src + (u64)nh * hd + kh * hd;
    const float* vs = src + (u64)(nh + nkv) * hd + kh * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float c = cos_t[p * half + i], s = sin_t[p * half + i];
        float a = qs[i], b = qs[i + half];
        put(0, i, a * c - b * s);
        put(0, i + half, b * c + a * s);
        a = ks[i];
        b = ks[i + half];
        put(1, i, a * c - b * s);
        put(1, i + half, b * c + a * s);
        put(2, i, vs[i]);
        put(2, i + half, vs[i + half]);
    }
}

extern "C" __global__ void qkv_split_rope(const float* qkv, const float* cos_t, const float* sin_t, float* q, float* k, float* v,
                                          int t, int nh, int nkv, int hd) {
    int row = blockIdx.x, h = blockIdx.y;
    u64 dst = (((u64)(row / t) * nh + h) * t + row % t) * hd;
    float* out[3] = {q, k, v};
    split_rope_row(qkv, cos_t, sin_t, row, h, t, nh, nkv, hd, [&](int w, int i, float x) { out[w][dst + i] = x; });
}

// The backward of qkv_split_rope: dq, dk, dv (b, nh, t, hd) into packed rows dqkv, dk and dv
// summed over each kv head's group (in head order), RoPE transposed. Grid (b·t, nh + nkv).
extern "C" __global__ void qkv_merge_rope_bwd(const float* dq, const float* dk, const float* dv, const float* cos_t, const float* sin_t,
                                              float* dqkv, int t, int nh, int nkv, int hd) {
    int row = blockIdx.x, y = blockIdx.y;
    int bi = row / t, p = row % t;
    int g = nh / nkv, half = hd / 2;
    u64 ld = (u64)(nh + 2 * nkv) * hd;
    float* dst = dqkv + (u64)row * ld;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float c = cos_t[p * half + i], s = -sin_t[p * half + i];
        if (y < nh) {
            u64 src = (((u64)bi * nh + y) * t + p) * hd;
            float a = dq[src + i], b = dq[src + i + half];
            dst[y * hd + i] = a * c - b * s;
            dst[y * hd + i + half] = b * c + a * s;
        } else {
            int kh = y - nh;
            float ka = 0.f, kb = 0.f, va = 0.f, vb = 0.f;
            for (int j = 0; j < g; j++) {
                u64 src = (((u64)bi * nh + kh * g + j) * t + p) * hd;
                ka += dk[src + i];
                kb += dk[src + i + half];
                va += dv[src + i];
                vb += dv[src + i + half];
            }
            float* kd = dst + (u64)nh * hd + kh * hd;
            float* vd = dst + (u64)(nh + nkv) * hd + kh * hd;
            kd[i] = ka * c - kb * s;
            kd[i + half] = kb * c + ka * s;
            vd[i] = va;
            vd[i + half] = vb;
        }
    }
}

// (b, nh, t, hd) <-> rows (b·t, nh·hd). Grid (b·t, nh); `to_rows` picks the direction.
extern "C" __global__ void heads_rows(const float* src, float* dst, int t, int nh, int hd, int to_rows) {
    int row = blockIdx.x, h = blockIdx.y;
    int bi = row / t, p = row % t;
    u64 hi = (((u64)bi * nh + h) * t + p) * hd;
    u64 ri = (u64)row * nh * hd + (u64)h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        if (to_rows) dst[ri + i] = src[hi + i];
        else dst[hi + i] = src[ri + i];
    }
}

// Generation with a KV cache: the attention of one new query per head over the cached keys and
// values of positions 0..len-1. q (nh, hd); kc, vc rows (cap, nh, hd), K/V already repeated
// for grouped-query attention as above; out (nh, hd). One block per head; the scores stay in
// shared memory (len <= DECODE_MAX, checked by the host).

#define DECODE_MAX 8192

extern "C" __global__ void attn_decode(const float* q, const float* kc, const float* vc, float* out, int len, int nh, int hd, float scale) {
    __shared__ float s[DECODE_MAX];
    __shared__ float sh[WARP];
    int h = blockIdx.x;
    const float* qh = q + (u64)h * hd;
    float mx = NEG_INF_F;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float* kj = kc + ((u64)j * nh + h) * hd;
        float d = 0.f;
        for (int i = 0; i < hd; i++) d += qh[i] * kj[i];
        d *= scale;
        s[j] = d;
        mx = fmaxf(mx, d);
    }
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        float e = expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    sum = block_sum(sum, sh);  // its barrier also orders every s[j] write before the reads below
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < len; j++) acc += s[j] * vc[((u64)j * nh + h) * hd + i];
        out[(u64)h * hd + i] = acc / sum;
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax over score rows (b·nh·t rows of t; row r is query position r % t), in place,
// scale folded in; entries above the diagonal are set to 0. One block per row.

extern "C" __global__ void softmax_causal(float* p, int t, float scale) {
    __shared__ float sh[WARP];
    u64 r = blockIdx.x;
    int i = (int)(r % t);
    float* row = p + r * t;
    float mx = NEG_INF_F;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, row[j] * scale);
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) {
        float e = expf(row[j] * scale - mx);
        row[j] = e;
        sum += e;
    }
    sum = block_sum(sum, sh);
    float inv = 1.f / sum;
    for (int j = threadIdx.x; j < t; j += blockDim.x) row[j] = j <= i ? row[j] * inv : 0.f;
}

// dS = P ⊙ (dP − Σ_j P dP) · scale, in place over dP.
extern "C" __global__ void softmax_causal_bwd(const float* p, float* dp, int t, float scale) {
    __shared__ float sh[WARP];
    u64 r = blockIdx.x;
    int i = (int)(r % t);
    const float* pr = p + r * t;
    float* dr = dp + r * t;
    float dot = 0.f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) dot += pr[j] * dr[j];
    dot = block_sum(dot, sh);
    for (int j = threadIdx.x; j < t; j += blockDim.x) dr[j] = j <= i ? pr[j] * (dr[j] - dot) * scale : 0.f;
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: a = silu(g) ⊙ u over rows [gate (f) | up (f)].

extern "C" __global__ void swiglu_fwd(const float* gu, float* a, u64 total, int f) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    u64 r = idx / f;
    int i = (int)(idx % f);
    float g = gu[r * 2 * f + i], u = gu[r * 2 * f + f + i];
    float s = 1.f / (1.f + expf(-g));
    a[idx] = g * s * u;
}

extern "C" __global__ void swiglu_bwd(const float* gu, const float* da, float* dgu, u64 total, int f) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    u64 r = idx / f;
    int i = (int)(idx % f);
    float g = gu[r * 2 * f + i], u = gu[r * 2 * f + f + i], d = da[idx];
    float s = 1.f / (1.f + expf(-g));
    dgu[r * 2 * f + f + i] = d * g * s;
    dgu[r * 2 * f + i] = d * u * s * (1.f + g * (1.f - s));
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over logit rows (one block per row), optionally with distillation against a
// teacher's top-k log-probabilities: loss_r = α·w·CE + w(1−α)τ²·KL(p_T ‖ softmax(z/τ)) with p_T
// the teacher's top-k renormalised at τ (α = 1, k = 0 without a teacher). Writes the weighted
// loss and the plain NLL of each row; with `want_grad`, overwrites the logits with ∂loss/∂z.

extern "C" __global__ void ce_rows(float* logits, int vocab, const u32* tgt, const float* wts, float* loss, float* nll, int want_grad,
                                   const u32* tids, const float* tlogp, int k, float alpha, float tau) {
    __shared__ float sh[WARP];
    __shared__ double tsh[4];
    u64 r = blockIdx.x;
    float* row = logits + r * vocab;
    int y = (int)tgt[r];
    float w = wts[r];
    float zy = row[y];
    float mx = NEG_INF_F;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(row[j] - mx);
    sum = block_sum(sum, sh);
    float rn = mx + logf(sum) - zy;
    double l = (double)w * (double)rn;
    double slse = 0.0, wk = 0.0;
    if (k > 0) {
        // Student log-partition at temperature τ.
        float smx = mx / tau;
        float sz = 0.f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) sz += expf(row[j] / tau - smx);
        sz = block_sum(sz, sh);
        slse = (double)smx + log((double)sz);
        wk = (double)w * (1.0 - (double)alpha) * (double)tau * (double)tau;
        if (threadIdx.x == 0) {
            const float* lp = tlogp + r * k;
            const u32* ids = tids + r * k;
            double tmx = NEG_INF_D;
            for (int j = 0; j < k; j++) tmx = fmax(tmx, (double)lp[j] / tau);
            double tz = 0.0;
            for (int j = 0; j < k; j++) tz += exp((double)lp[j] / tau - tmx);
            double kl = 0.0;
            for (int j = 0; j < k; j++) {
                double pt = exp((double)lp[j] / tau - tmx) / tz;
                if (pt > 0.0) kl += pt * (log(pt) - ((double)row[ids[j]] / tau - slse));
            }
            tsh[0] = (double)alpha * l + wk * kl;
            tsh[1] = tmx;
            tsh[2] = tz;
        }
        __syncthreads();
        l = tsh[0];
    }
    if (threadIdx.x == 0) {
        loss[r] = (float)l;
        nll[r] = rn;
    }
    if (!want_grad) return;
    float wce = k > 0 ? w * alpha : w;
    float inv = 1.f / sum;
    __syncthreads();  // row[y] and the teacher's reads above happen before the overwrite
    if (k > 0) {
        double c = wk / tau;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            double qs = exp((double)row[j] / tau - slse);
            row[j] = wce * expf(row[j] - mx) * inv + (float)(c * qs);
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = wce * expf(row[j] - mx) * inv;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        row[y] -= wce;
        if (k > 0) {
            double c = wk / tau, tmx = tsh[1], tz = tsh[2];
            const float* lp = tlogp + r * k;
            const u32* ids = tids + r * k;
            for (int j = 0; j < k; j++) row[ids[j]] -= (float)(c * (exp((double)lp[j] / tau - tmx) / tz));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reductions in f64 with a fixed shape: `blocks` blocks each sum a fixed contiguous chunk
// (thread-strided, then a tree), then one block adds the partials in order.

extern "C" __global__ void sumsq_partial(const float* x, u64 n, u64 chunk, double* part, int square) {
    __shared__ double sh[WARP];
    u64 s0 = (u64)blockIdx.x * chunk, s1 = s0 + chunk < n ? s0 + chunk : n;
    double acc = 0.0;
    for (u64 i = s0 + threadIdx.x; i < s1; i += blockDim.x) {
        double v = (double)x[i];
        acc += square ? v * v : v;
    }
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

// out[slot] (+)= Σ part[0..m], one block.
extern "C" __global__ void sum_partials(const double* part, int m, double* out, int slot, int accumulate) {
    __shared__ double sh[WARP];
    double acc = 0.0;
    for (int i = threadIdx.x; i < m; i += blockDim.x) acc += part[i];
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) out[slot] = accumulate ? out[slot] + acc : acc;
}

// acc[i] += x[i] in f64: per-batch f32 products summed across batches in f64, as the CPU
// calibration does (src/calibrate.rs).
extern "C" __global__ void add_f64(double* acc, const float* x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] += (double)x[i];
}

// ---------------------------------------------------------------------------------------------
// Teacher top-k (distillation, src/distill.rs): the k largest log-softmax entries of each row,
// in descending order, ties to the lower id (the CPU's order). One block of TOPK_THREADS per
// row: each thread keeps the k largest of its strided share, sorted; then k rounds of a block
// arg-max over the lists' heads merge them. Log-probs are z − (max + log Σ exp(z − max)).

#define TOPK_MAX 64
#define TOPK_THREADS 128

extern "C" __global__ void topk_rows(const float* logits, int vocab, int k, u32* ids, float* lp) {
    __shared__ float sh[WARP];
    __shared__ float cand_v[TOPK_THREADS / WARP];
    __shared__ int cand_i[TOPK_THREADS / WARP];
    __shared__ int winner;
    const float* row = logits + (u64)blockIdx.x * vocab;
    float tv[TOPK_MAX];
    int ti[TOPK_MAX];
    int cnt = 0;
    float mx = NEG_INF_F;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float z = row[j];
        mx = fmaxf(mx, z);
        if (cnt < k || z > tv[cnt - 1]) {
            // Insert keeping descending order; an equal value stays ahead (it has the lower id).
            int p = cnt < k ? cnt++ : k - 1;
            while (p > 0 && tv[p - 1] < z) {
                tv[p] = tv[p - 1];
                ti[p] = ti[p - 1];
                p--;
            }
            tv[p] = z;
            ti[p] = j;
        }
    }
    mx = block_max(mx, sh);
    float s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(row[j] - mx);
    s = block_sum(s, sh);
    float lse = mx + logf(s);
    int lane = threadIdx.x & (WARP - 1), w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    int head = 0;
    for (int r = 0; r < k; r++) {
        float v = head < cnt ? tv[head] : NEG_INF_F;
        int id = head < cnt ? ti[head] : 0x7fffffff;
        for (int o = WARP / 2; o > 0; o >>= 1) {
            float v2 = __shfl_xor_sync(0xffffffffu, v, o);
            int i2 = __shfl_xor_sync(0xffffffffu, id, o);
            if (v2 > v || (v2 == v && i2 < id)) {
                v = v2;
                id = i2;
            }
        }
        if (lane == 0) {
            cand_v[w] = v;
            cand_i[w] = id;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int q = 1; q < nw; q++)
                if (cand_v[q] > v || (cand_v[q] == v && cand_i[q] < id)) {
                    v = cand_v[q];
                    id = cand_i[q];
                }
            u64 o = (u64)blockIdx.x * k + r;
            ids[o] = (u32)id;
            lp[o] = v - lse;
            winner = id;
        }
        __syncthreads();
        if (head < cnt && ti[head] == winner) head++;
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW as torch.optim.AdamW (decoupled decay where decay[i] = 1), gradient scaled by the clip
// factor; the same expression order as src/optim.rs. Sets *bad when a parameter is not finite.

extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, const u8* decay, u64 n, float gscale, float b1, float b2,
                                 float eps, float shrink, float step, float bc2_sqrt, int* bad) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * gscale;
    float mi = b1 * m[i] + (1.f - b1) * gi;
    float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    float pi = p[i] * (decay[i] ? shrink : 1.f) - step * mi / denom;
    p[i] = pi;
    if (!(fabsf(pi) <= 3.402823466e38f)) *bad = 1;  // NaN or Inf
}

// ---------------------------------------------------------------------------------------------
// Flash attention (bf16 tensor cores, f32 accumulation and softmax), head_dim 64, causal, for
// the bf16 engine: the (t × t) probabilities are never stored. Forward as FlashAttention-2
// (online softmax, log-sum-exp kept per row); backward recomputes P from the log-sum-exp in two
// kernels, one over query slabs (dQ) and one over key slabs (dK, dV), so every output element is
// written by one warp and nothing is added atomically. One warp owns 16 rows; a block of 4 warps
// owns 64; key/query tiles are 64 wide. Matrix products are `mma.sync.m16n8k16` in inline PTX
// (no CUDA headers needed at run time); operand layouts per the PTX ISA: with g = lane / 4 and
// c = lane % 4, A registers hold (row g | g+8, cols 2c..2c+1 | 2c+8..2c+9), B registers
// (k 2c..2c+1 | 2c+8..2c+9, col g), C (row g | g+8, cols 2c..2c+1). The C layout of two
// adjacent 8-wide tiles is the A layout of one 16-wide k-step, so P and dS feed the next product
// straight from registers.

#define HD 64
typedef unsigned short u16;

// Two adjacent bf16 (4-byte aligned).
__device__ __forceinline__ u32 ld2(const u16* p) {
    return *(const u32*)p;
}
// The three inline-PTX operations. Under MASA_EMU (tests/cuda_emu: the kernels on the CPU)
// the emulator defines them from the PTX ISA's description instead.
#ifndef MASA_EMU
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u16 to_bf16(float x) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif
// A operand (16 rows × 64) of rows r0..r0+15 of a row-major (·, 64) bf16 matrix, 4 k-steps.
__device__ __forceinline__ void load_a_rows(u32 a[4][4], const u16* m, int r0, int g, int c) {
    for (int kk = 0; kk < 4; kk++) {
        a[kk][0] = ld2(m + (u64)(r0 + g) * HD + kk * 16 + 2 * c);
        a[kk][1] = ld2(m + (u64)(r0 + g + 8) * HD + kk * 16 + 2 * c);
        a[kk][2] = ld2(m + (u64)(r0 + g) * HD + kk * 16 + 8 + 2 * c);
        a[kk][3] = ld2(m + (u64)(r0 + g + 8) * HD + kk * 16 + 8 + 2 * c);
    }
}
__device__ __forceinline__ void zero_acc(float acc[8][4]) {
    for (int dt = 0; dt < 8; dt++) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
}
// acc (16 × 64, 8 tiles) = A (16 × 64) · Bᵀ where B is rows n0..n0+63 of a row-major (·, 64)
// matrix (the products Q Kᵀ, dO Vᵀ, K Qᵀ, V dOᵀ).
__device__ __forceinline__ void mma_abt(float acc[8][4], const u32 a[4][4], const u16* b, int n0, int g, int c) {
    zero_acc(acc);
    for (int nt = 0; nt < 8; nt++) {
        const u16* row = b + (u64)(n0 + nt * 8 + g) * HD;
        for (int kk = 0; kk < 4; kk++) mma16816(acc[nt], a[kk], ld2(row + kk * 16 + 2 * c), ld2(row + kk * 16 + 8 + 2 * c));
    }
}
// acc (16 × 64) += X (16 × 64, in C-layout registers x) · M where M (64 × 64) is columns
// k0..k0+63 of a transposed (64, len) bf16 matrix mt (row d = feature d).
__device__ __forceinline__ void mma_xm(float acc[8][4], float x[8][4], const u16* mt, int len, int k0, int g, int c) {
    for (int ks = 0; ks < 4; ks++) {
        u32 a[4] = {pack_bf16(x[2 * ks][0], x[2 * ks][1]), pack_bf16(x[2 * ks][2], x[2 * ks][3]), pack_bf16(x[2 * ks + 1][0], x[2 * ks + 1][1]),
                    pack_bf16(x[2 * ks + 1][2], x[2 * ks + 1][3])};
        for (int dt = 0; dt < 8; dt++) {
            const u16* col = mt + (u64)(dt * 8 + g) * len + k0 + ks * 16;
            mma16816(acc[dt], a, ld2(col + 2 * c), ld2(col + 8 + 2 * c));
        }
    }
}

// Store a 16 × 64 C-layout accumulator: row g to `row0`, row g+8 to `row1`, scaled per row.
__device__ __forceinline__ void store_rows(float acc[8][4], float* row0, float* row1, float s0, float s1, int c) {
    for (int dt = 0; dt < 8; dt++) {
        int col = dt * 8 + 2 * c;
        row0[col] = acc[dt][0] * s0;
        row0[col + 1] = acc[dt][1] * s0;
        row1[col] = acc[dt][2] * s1;
        row1[col + 1] = acc[dt][3] * s1;
    }
}

// From scores S and dP of one 16 × 64 tile, P = exp(S·scale − lse) and dS = P ⊙ (dP − D)·scale
// in place (s ← P, dp ← dS), zero where key > query. Queries are the rows (`QROWS`, the dQ
// kernel) or the columns (the dK/dV kernel); `lse` and `dd` are indexed by query.
template <bool QROWS>
__device__ __forceinline__ void p_ds(float s[8][4], float dp[8][4], int col0, int r0, int r1, const float* lse, const float* dd, float scale, int c) {
    for (int nt = 0; nt < 8; nt++)
        for (int e = 0; e < 2; e++) {
            int col = col0 + nt * 8 + 2 * c + e;
            for (int half = 0; half < 2; half++) {
                int r = half ? r1 : r0, i = 2 * half + e;
                int q = QROWS ? r : col;
                bool masked = QROWS ? col > r : r > col;
                float p = masked ? 0.f : expf(s[nt][i] * scale - lse[q]);
                s[nt][i] = p;
                dp[nt][i] = p * (dp[nt][i] - dd[q]) * scale;
            }
        }
}

// qkv_split_rope for the flash path: bf16 q, k, v (b, nh, t, 64) and their transposes
// (b, nh, 64, t). Grid (b·t, nh), block 32.
extern "C" __global__ void qkv_split_rope16(const float* qkv, const float* cos_t, const float* sin_t, u16* q, u16* qT, u16* k, u16* kT, u16* v,
                                            u16* vT, int t, int nh, int nkv) {
    int row = blockIdx.x, h = blockIdx.y, p = row % t;
    u64 bh = (u64)(row / t) * nh + h;
    u64 dst = (bh * t + p) * HD, tb = bh * HD * t;
    u16* out[3] = {q, k, v};
    u16* outT[3] = {qT, kT, vT};
    split_rope_row(qkv, cos_t, sin_t, row, h, t, nh, nkv, HD, [&](int w, int i, float x) {
        u16 y = to_bf16(x);
        out[w][dst + i] = y;
        outT[w][tb + (u64)i * t + p] = y;
    });
}

// O (rows (b·t, nh·64), f32) and log-sum-exp (b·nh·t). Grid (t/64, b·nh), block 128.
extern "C" __global__ void flash_fwd(const u16* q, const u16* k, const u16* vT, float* o, float* lse, int t, int nh, float scale) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    int qb = blockIdx.x, bh = blockIdx.y;
    int q0 = qb * 64 + w * 16;
    const u16* Q = q + (u64)bh * t * HD;
    const u16* K = k + (u64)bh * t * HD;
    const u16* VT = vT + (u64)bh * HD * t;
    u32 qa[4][4];
    load_a_rows(qa, Q, q0, g, c);
    float oacc[8][4];
    zero_acc(oacc);
    float m0 = NEG_INF_F, m1 = NEG_INF_F, l0 = 0.f, l1 = 0.f;
    int r0 = q0 + g, r1 = q0 + g + 8;
    for (int kb = 0; kb <= qb; kb++) {
        float s[8][4];
        mma_abt(s, qa, K, kb * 64, g, c);
        float mx0 = NEG_INF_F, mx1 = NEG_INF_F;
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 2; e++) {
                int col = kb * 64 + nt * 8 + 2 * c + e;
                float v0 = col > r0 ? NEG_INF_F : s[nt][e] * scale;
                float v1 = col > r1 ? NEG_INF_F : s[nt][2 + e] * scale;
                s[nt][e] = v0;
                s[nt][2 + e] = v1;
                mx0 = fmaxf(mx0, v0);
                mx1 = fmaxf(mx1, v1);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        float al0 = expf(m0 - mn0), al1 = expf(m1 - mn1);
        float rs0 = 0.f, rs1 = 0.f;
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 2; e++) {
                float p0 = expf(s[nt][e] - mn0), p1 = expf(s[nt][2 + e] - mn1);
                s[nt][e] = p0;
                s[nt][2 + e] = p1;
                rs0 += p0;
                rs1 += p1;
            }
        rs0 += __shfl_xor_sync(0xffffffffu, rs0, 1);
        rs0 += __shfl_xor_sync(0xffffffffu, rs0, 2);
        rs1 += __shfl_xor_sync(0xffffffffu, rs1, 1);
        rs1 += __shfl_xor_sync(0xffffffffu, rs1, 2);
        l0 = l0 * al0 + rs0;
        l1 = l1 * al1 + rs1;
        m0 = mn0;
        m1 = mn1;
        for (int dt = 0; dt < 8; dt++) {
            oacc[dt][0] *= al0;
            oacc[dt][1] *= al0;
            oacc[dt][2] *= al1;
            oacc[dt][3] *= al1;
        }
        mma_xm(oacc, s, VT, t, kb * 64, g, c);
    }
    int bi = bh / nh, h = bh % nh;
    u64 qd = (u64)nh * HD;
    store_rows(oacc, o + ((u64)bi * t + r0) * qd + h * HD, o + ((u64)bi * t + r1) * qd + h * HD, 1.f / l0, 1.f / l1, c);
    if (c == 0) {
        lse[(u64)bh * t + r0] = m0 + logf(l0);
        lse[(u64)bh * t + r1] = m1 + logf(l1);
    }
}

// Backward preparation: dO in bf16 (b, nh, t, 64) and transposed, and D = rowsum(dO ⊙ O) from the
// f32 rows. Grid (b·t, nh), block 64.
extern "C" __global__ void flash_bwd_prep(const float* dout, const float* o, u16* dO, u16* dOT, float* dd, int t, int nh) {
    __shared__ float sh[WARP];
    int row = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    int bi = row / t, p = row % t;
    u64 bh = (u64)bi * nh + h;
    u64 ri = (u64)row * nh * HD + (u64)h * HD + i;
    float d = dout[ri];
    u16 x = to_bf16(d);
    dO[(bh * t + p) * HD + i] = x;
    dOT[bh * HD * t + (u64)i * t + p] = x;
    float s = block_sum(d * o[ri], sh);
    if (i == 0) dd[bh * t + p] = s;
}

// dQ (b, nh, t, 64) f32 over query slabs. Grid (t/64, b·nh), block 128.
extern "C" __global__ void flash_bwd_dq(const u16* q, const u16* k, const u16* kT, const u16* v, const u16* dO, const float* lse, const float* dd, float* dq,
                                        int t, float scale) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    int qb = blockIdx.x, bh = blockIdx.y;
    int q0 = qb * 64 + w * 16, r0 = q0 + g, r1 = q0 + g + 8;
    u64 off = (u64)bh * t * HD;
    u32 qa[4][4], da[4][4];
    load_a_rows(qa, q + off, q0, g, c);
    load_a_rows(da, dO + off, q0, g, c);
    float acc[8][4];
    zero_acc(acc);
    for (int kb = 0; kb <= qb; kb++) {
        float s[8][4], dp[8][4];
        mma_abt(s, qa, k + off, kb * 64, g, c);
        mma_abt(dp, da, v + off, kb * 64, g, c);
        p_ds<true>(s, dp, kb * 64, r0, r1, lse + (u64)bh * t, dd + (u64)bh * t, scale, c);
        mma_xm(acc, dp, kT + off, t, kb * 64, g, c);
    }
    store_rows(acc, dq + off + (u64)r0 * HD, dq + off + (u64)r1 * HD, 1.f, 1.f, c);
}

// dK, dV (b, nh, t, 64) f32 over key slabs. Grid (t/64, b·nh), block 128.
extern "C" __global__ void flash_bwd_dkdv(const u16* q, const u16* qT, const u16* k, const u16* v, const u16* dO, const u16* dOT, const float* lse,
                                          const float* dd, float* dk, float* dv, int t, float scale) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    int kb = blockIdx.x, bh = blockIdx.y;
    int k0 = kb * 64 + w * 16, r0 = k0 + g, r1 = k0 + g + 8;
    u64 off = (u64)bh * t * HD;
    const float* LS = lse + (u64)bh * t;
    const float* DD = dd + (u64)bh * t;
    u32 ka[4][4], va[4][4];
    load_a_rows(ka, k + off, k0, g, c);
    load_a_rows(va, v + off, k0, g, c);
    float dka[8][4], dva[8][4];
    zero_acc(dka);
    zero_acc(dva);
    for (int qb = kb; qb < t / 64; qb++) {
        float st[8][4], dpt[8][4];
        mma_abt(st, ka, q + off, qb * 64, g, c);
        mma_abt(dpt, va, dO + off, qb * 64, g, c);
        p_ds<false>(st, dpt, qb * 64, r0, r1, LS, DD, scale, c);
        mma_xm(dva, st, dOT + off, t, qb * 64, g, c);
        mma_xm(dka, dpt, qT + off, t, qb * 64, g, c);
    }
    store_rows(dka, dk + off + (u64)r0 * HD, dk + off + (u64)r1 * HD, 1.f, 1.f, c);
    store_rows(dva, dv + off + (u64)r0 * HD, dv + off + (u64)r1 * HD, 1.f, 1.f, c);
}

// ---------------------------------------------------------------------------------------------
// bf16 copies of product operands (round to nearest even), for cuBLAS's bf16 kernels.
extern "C" __global__ void f32_to_bf16(const float* x, u16* y, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = to_bf16(x[i]);
}
