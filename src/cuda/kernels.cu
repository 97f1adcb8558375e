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

// Sum / max over the block; every thread gets the result. `sh` holds 32 floats.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & (WARP - 1), w = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.f;
    v = warp_sum(v);
    return v;
}
__device__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & (WARP - 1), w = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : NEG_INF_F;
    v = warp_max(v);
    return v;
}
__device__ double block_sum_d(double v, double* sh) {
    int lane = threadIdx.x & (WARP - 1), w = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0;
    v = warp_sum_d(v);
    return v;
}

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

extern "C" __global__ void qkv_split_rope(const float* qkv, const float* cos_t, const float* sin_t, float* q, float* k, float* v,
                                          int t, int nh, int nkv, int hd) {
    int row = blockIdx.x, h = blockIdx.y;
    int bi = row / t, p = row % t;
    int kh = h / (nh / nkv), half = hd / 2;
    u64 ld = (u64)(nh + 2 * nkv) * hd;
    const float* src = qkv + (u64)row * ld;
    u64 dst = (((u64)bi * nh + h) * t + p) * hd;
    const float* qs = src + h * hd;
    const float* ks = src + (u64)nh * hd + kh * hd;
    const float* vs = src + (u64)(nh + nkv) * hd + kh * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float c = cos_t[p * half + i], s = sin_t[p * half + i];
        float a = qs[i], b = qs[i + half];
        q[dst + i] = a * c - b * s;
        q[dst + i + half] = b * c + a * s;
        a = ks[i];
        b = ks[i + half];
        k[dst + i] = a * c - b * s;
        k[dst + i + half] = b * c + a * s;
        v[dst + i] = vs[i];
        v[dst + i + half] = vs[i + half];
    }
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
