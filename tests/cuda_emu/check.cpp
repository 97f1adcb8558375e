// Every kernel of src/cuda/kernels.cu, run on the CPU under src/cuda/emu.h with the block
// sizes src/cuda/llama.rs launches it with, against a reference written here from the kernel's
// definition in f64 (or, for backward kernels, against finite differences or the adjoint
// identity of the forward). Prints one line per check and exits 1 if any fails.
// Built and run by tests/cuda_emulated.rs.

#include "emu.h"
#include "kernels.cu"

#include <functional>
#include <numeric>
#include <random>

static int failures = 0;

static void check(const char* what, double err, double limit) {
    bool ok = err <= limit && std::isfinite(err);
    if (!ok) failures++;
    std::printf("%-58s %11.3e  (limit %.0e)  %s\n", what, err, limit, ok ? "ok" : "FAIL");
}

struct Rng {
    std::mt19937_64 g;
    explicit Rng(uint64_t seed) : g(seed) {}
    float normal() { return std::normal_distribution<float>(0.f, 1.f)(g); }
    float uniform(float a, float b) { return std::uniform_real_distribution<float>(a, b)(g); }
    unsigned below(unsigned n) { return (unsigned)(g() % n); }
    std::vector<float> normals(size_t n, float s = 1.f) {
        std::vector<float> v(n);
        for (auto& x : v) x = s * normal();
        return v;
    }
};

// Largest |a − b| / (|b| + floor) over the pair.
static double rel(const std::vector<float>& a, const std::vector<double>& b, double floor) {
    double e = 0;
    for (size_t i = 0; i < a.size(); i++) e = std::max(e, std::fabs((double)a[i] - b[i]) / (std::fabs(b[i]) + floor));
    return e;
}
static double max_abs(const std::vector<double>& v) {
    double m = 0;
    for (double x : v) m = std::max(m, std::fabs(x));
    return m;
}
// Largest |a − b| relative to the reference's largest magnitude.
static double rel_to_max(const std::vector<float>& a, const std::vector<double>& b) {
    double e = 0;
    for (size_t i = 0; i < a.size(); i++) e = std::max(e, std::fabs((double)a[i] - b[i]));
    return e / std::max(max_abs(b), 1e-30);
}

static const unsigned ROW_THREADS = 256;

// ---------------------------------------------------------------------------------------------

static void embedding() {
    Rng r(1);
    int n = 37, h = 80, vocab = 11;
    std::vector<unsigned> ids(n);
    for (auto& i : ids) i = r.below(vocab);
    auto emb = r.normals((size_t)vocab * h);
    std::vector<float> x((size_t)n * h);
    emu::launch({(unsigned)n}, ROW_THREADS, [&] { embed_fwd(ids.data(), emb.data(), x.data(), h); });
    double e = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < h; j++) e = std::max(e, (double)std::fabs(x[(size_t)i * h + j] - emb[(size_t)ids[i] * h + j]));
    check("embed_fwd: rows gathered exactly", e, 0);

    // Backward as the host prepares it: positions sorted by (id, position), one block per id.
    auto dx = r.normals((size_t)n * h);
    std::vector<unsigned> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](unsigned a, unsigned b) { return ids[a] < ids[b]; });
    std::vector<unsigned> uid, start;
    for (int s = 0; s < n; s++)
        if (s == 0 || ids[order[s]] != ids[order[s - 1]]) {
            uid.push_back(ids[order[s]]);
            start.push_back(s);
        }
    start.push_back(n);
    auto demb = r.normals((size_t)vocab * h);
    std::vector<double> want(demb.begin(), demb.end());
    for (int i = 0; i < n; i++)
        for (int j = 0; j < h; j++) want[(size_t)ids[i] * h + j] += dx[(size_t)i * h + j];
    emu::launch({(unsigned)uid.size()}, ROW_THREADS, [&] { embed_bwd(dx.data(), order.data(), uid.data(), start.data(), demb.data(), h); });
    check("embed_bwd: rows added per id", rel(demb, want, 1.0), 1e-6);
}

static void rmsnorm() {
    Rng r(2);
    int n = 9, d = 300;
    float eps = 1e-5f;
    auto x = r.normals((size_t)n * d), w = r.normals(d), dy = r.normals((size_t)n * d);
    std::vector<float> y((size_t)n * d), rstd(n);
    emu::launch({(unsigned)n}, ROW_THREADS, [&] { rmsnorm_fwd(x.data(), w.data(), y.data(), rstd.data(), d, eps); });
    std::vector<double> wy((size_t)n * d), wr(n);
    for (int i = 0; i < n; i++) {
        double ss = 0;
        for (int j = 0; j < d; j++) ss += (double)x[i * d + j] * x[i * d + j];
        wr[i] = 1 / std::sqrt(ss / d + eps);
        for (int j = 0; j < d; j++) wy[i * d + j] = x[i * d + j] * wr[i] * w[j];
    }
    check("rmsnorm_fwd: y", rel(y, wy, 1e-3), 1e-5);
    check("rmsnorm_fwd: 1/rms", rel(rstd, wr, 0), 1e-6);

    // dx (accumulated onto its input) and dw against central differences of L = Σ dy ⊙ y in f64.
    auto loss = [&](const std::vector<double>& xs, const std::vector<double>& ws) {
        double l = 0;
        for (int i = 0; i < n; i++) {
            double ss = 0;
            for (int j = 0; j < d; j++) ss += xs[i * d + j] * xs[i * d + j];
            double ri = 1 / std::sqrt(ss / d + eps);
            for (int j = 0; j < d; j++) l += dy[i * d + j] * xs[i * d + j] * ri * ws[j];
        }
        return l;
    };
    std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end());
    auto dx0 = r.normals((size_t)n * d);
    std::vector<float> dx = dx0;
    emu::launch({(unsigned)n}, ROW_THREADS, [&] { rmsnorm_bwd_dx(dy.data(), x.data(), w.data(), rstd.data(), dx.data(), d); });
    double e = 0, hstep = 1e-5;
    for (int k = 0; k < 40; k++) {
        size_t i = (size_t)(k * 67) % ((size_t)n * d);
        auto p = xd, m = xd;
        p[i] += hstep;
        m[i] -= hstep;
        double fd = (loss(p, wd) - loss(m, wd)) / (2 * hstep);
        e = std::max(e, std::fabs((dx[i] - dx0[i]) - fd) / (std::fabs(fd) + 1e-2));
    }
    check("rmsnorm_bwd_dx: against central differences", e, 1e-4);

    int rows = 4, chunks = (n + rows - 1) / rows;
    std::vector<float> part((size_t)chunks * d), dw = r.normals(d);
    auto dw0 = dw;
    emu::launch({(unsigned)((d + 127) / 128), (unsigned)chunks}, 128, [&] { rmsnorm_dw_partial(dy.data(), x.data(), rstd.data(), part.data(), n, d, rows); });
    emu::launch({(unsigned)((d + 127) / 128)}, 128, [&] { colsum_acc(part.data(), dw.data(), chunks, d); });
    e = 0;
    for (int j = 0; j < d; j += 7) {
        auto p = wd, m = wd;
        p[j] += hstep;
        m[j] -= hstep;
        double fd = (loss(xd, p) - loss(xd, m)) / (2 * hstep);
        e = std::max(e, std::fabs((dw[j] - dw0[j]) - fd) / (std::fabs(fd) + 1e-2));
    }
    check("rmsnorm_dw_partial + colsum_acc: against differences", e, 1e-4);
}

// Packed q/k/v rows (b·t, (nh + 2 nkv)·hd) → q, k, v (b, nh, t, hd) with rotate-half RoPE.
struct Rope {
    int b, t, nh, nkv, hd;
    std::vector<float> cos_t, sin_t;
    Rope(int b_, int t_, int nh_, int nkv_, int hd_) : b(b_), t(t_), nh(nh_), nkv(nkv_), hd(hd_) {
        int half = hd / 2;
        for (int p = 0; p < t; p++)
            for (int i = 0; i < half; i++) {
                double a = p * std::pow(10000.0, -2.0 * i / hd);
                cos_t.push_back((float)std::cos(a));
                sin_t.push_back((float)std::sin(a));
            }
    }
    size_t heads() const { return (size_t)b * nh * t * hd; }
    size_t packed() const { return (size_t)b * t * (nh + 2 * nkv) * hd; }
    // The f64 reference of qkv_split_rope.
    void split(const std::vector<float>& qkv, std::vector<double>& q, std::vector<double>& k, std::vector<double>& v) const {
        q.assign(heads(), 0);
        k.assign(heads(), 0);
        v.assign(heads(), 0);
        int half = hd / 2, w = (nh + 2 * nkv) * hd;
        for (int bi = 0; bi < b; bi++)
            for (int p = 0; p < t; p++)
                for (int h = 0; h < nh; h++) {
                    int kh = h / (nh / nkv);
                    const float* row = qkv.data() + (size_t)(bi * t + p) * w;
                    size_t o = (((size_t)bi * nh + h) * t + p) * hd;
                    for (int i = 0; i < hd; i++) {
                        int j = i < half ? i + half : i - half;
                        double c = cos_t[p * half + i % half], s = sin_t[p * half + i % half];
                        double sign = i < half ? -1 : 1;  // rotate_half: (−x2, x1)
                        q[o + i] = row[h * hd + i] * c + sign * row[h * hd + j] * s;
                        k[o + i] = row[nh * hd + kh * hd + i] * c + sign * row[nh * hd + kh * hd + j] * s;
                        v[o + i] = row[(nh + nkv) * hd + kh * hd + i];
                    }
                }
    }
};

static void attention_layout() {
    Rng r(3);
    Rope rp(2, 5, 4, 2, 16);
    auto qkv = r.normals(rp.packed());
    std::vector<float> q(rp.heads()), k(rp.heads()), v(rp.heads());
    int n = rp.b * rp.t;
    emu::launch({(unsigned)n, (unsigned)rp.nh}, 64, [&] { qkv_split_rope(qkv.data(), rp.cos_t.data(), rp.sin_t.data(), q.data(), k.data(), v.data(), rp.t, rp.nh, rp.nkv, rp.hd); });
    std::vector<double> wq, wk, wv;
    rp.split(qkv, wq, wk, wv);
    check("qkv_split_rope: q (RoPE, rotate-half)", rel(q, wq, 1e-2), 1e-5);
    check("qkv_split_rope: k (RoPE, GQA repeat)", rel(k, wk, 1e-2), 1e-5);
    check("qkv_split_rope: v (GQA repeat)", rel(v, wv, 1e-2), 0);

    // The backward is the transpose of the (linear) split: <split(x), y> = <x, merge(y)>.
    auto dq = r.normals(rp.heads()), dk = r.normals(rp.heads()), dv = r.normals(rp.heads());
    std::vector<float> dqkv(rp.packed());
    emu::launch({(unsigned)n, (unsigned)(rp.nh + rp.nkv)}, 64,
                [&] { qkv_merge_rope_bwd(dq.data(), dk.data(), dv.data(), rp.cos_t.data(), rp.sin_t.data(), dqkv.data(), rp.t, rp.nh, rp.nkv, rp.hd); });
    double lhs = 0, rhs = 0, mag = 0;
    for (size_t i = 0; i < rp.heads(); i++) {
        lhs += wq[i] * dq[i] + wk[i] * dk[i] + wv[i] * dv[i];
        mag += std::fabs(wq[i] * dq[i]) + std::fabs(wk[i] * dk[i]) + std::fabs(wv[i] * dv[i]);
    }
    for (size_t i = 0; i < rp.packed(); i++) rhs += (double)qkv[i] * dqkv[i];
    check("qkv_merge_rope_bwd: adjoint of the split", std::fabs(lhs - rhs) / mag, 1e-6);

    // heads_rows: (b, nh, t, hd) → rows and back is the identity; rows are (b·t, nh·hd).
    std::vector<float> rows(rp.heads()), back(rp.heads());
    emu::launch({(unsigned)n, (unsigned)rp.nh}, 64, [&] { heads_rows(q.data(), rows.data(), rp.t, rp.nh, rp.hd, 1); });
    emu::launch({(unsigned)n, (unsigned)rp.nh}, 64, [&] { heads_rows(rows.data(), back.data(), rp.t, rp.nh, rp.hd, 0); });
    double e = 0;
    for (int bi = 0; bi < rp.b; bi++)
        for (int p = 0; p < rp.t; p++)
            for (int h = 0; h < rp.nh; h++)
                for (int i = 0; i < rp.hd; i++)
                    e = std::max(e, (double)std::fabs(rows[((size_t)(bi * rp.t + p) * rp.nh + h) * rp.hd + i] - q[(((size_t)bi * rp.nh + h) * rp.t + p) * rp.hd + i]));
    for (size_t i = 0; i < q.size(); i++) e = std::max(e, (double)std::fabs(back[i] - q[i]));
    check("heads_rows: both directions", e, 0);
}

// Causal attention in f64 over (b, nh, t, hd) tensors: o (b, nh, t, hd), lse (b·nh·t).
static void attention_ref(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v, int bh, int t, int hd, double scale,
                          std::vector<double>& o, std::vector<double>& lse) {
    o.assign((size_t)bh * t * hd, 0);
    lse.assign((size_t)bh * t, 0);
    for (int z = 0; z < bh; z++)
        for (int i = 0; i < t; i++) {
            std::vector<double> s(i + 1);
            double mx = -INFINITY;
            for (int j = 0; j <= i; j++) {
                double d = 0;
                for (int c = 0; c < hd; c++) d += q[((size_t)z * t + i) * hd + c] * k[((size_t)z * t + j) * hd + c];
                s[j] = d * scale;
                mx = std::max(mx, s[j]);
            }
            double sum = 0;
            for (double& x : s) sum += (x = std::exp(x - mx));
            lse[(size_t)z * t + i] = mx + std::log(sum);
            for (int j = 0; j <= i; j++)
                for (int c = 0; c < hd; c++) o[((size_t)z * t + i) * hd + c] += s[j] / sum * v[((size_t)z * t + j) * hd + c];
        }
}

static void softmax() {
    Rng r(4);
    int rows = 3 * 70, t = 70;
    float scale = 0.125f;
    auto s = r.normals((size_t)rows * t, 4.f), dp = r.normals((size_t)rows * t);
    std::vector<float> p = s;
    emu::launch({(unsigned)rows}, ROW_THREADS, [&] { softmax_causal(p.data(), t, scale); });
    std::vector<double> wp((size_t)rows * t, 0), wd((size_t)rows * t, 0);
    for (int rr = 0; rr < rows; rr++) {
        int i = rr % t;
        double mx = -INFINITY, sum = 0, dot = 0;
        for (int j = 0; j <= i; j++) mx = std::max(mx, (double)s[rr * t + j] * scale);
        for (int j = 0; j <= i; j++) sum += std::exp(s[rr * t + j] * scale - mx);
        for (int j = 0; j <= i; j++) wp[rr * t + j] = std::exp(s[rr * t + j] * scale - mx) / sum;
        for (int j = 0; j <= i; j++) dot += wp[rr * t + j] * dp[rr * t + j];
        for (int j = 0; j <= i; j++) wd[rr * t + j] = wp[rr * t + j] * (dp[rr * t + j] - dot) * scale;
    }
    check("softmax_causal: P (zero above the diagonal)", rel(p, wp, 1e-3), 1e-5);
    std::vector<float> ds = dp;
    emu::launch({(unsigned)rows}, ROW_THREADS, [&] { softmax_causal_bwd(p.data(), ds.data(), t, scale); });
    check("softmax_causal_bwd: dS = P ⊙ (dP − Σ P dP)·scale", rel_to_max(ds, wd), 1e-5);
}

static void decode() {
    // A prompt of t tokens through the prefill path (split + causal attention, K/V stored as cache
    // rows by heads_rows as llama.rs does), then one new token through the decode path: its
    // output must be the last row of causal attention over all t + 1 tokens.
    Rng r(5);
    int t = 9, nh = 4, nkv = 2, hd = 32, cap = 16;
    float scale = 1.f / std::sqrt((float)hd);
    Rope all(1, t + 1, nh, nkv, hd);
    auto qkv = r.normals(all.packed());
    std::vector<double> wq, wk, wv, wo, wlse;
    all.split(qkv, wq, wk, wv);
    attention_ref(wq, wk, wv, nh, t + 1, hd, scale, wo, wlse);

    Rope prompt(1, t, nh, nkv, hd);
    size_t w = (size_t)(nh + 2 * nkv) * hd;
    std::vector<float> pq(prompt.heads()), pk(prompt.heads()), pv(prompt.heads()), kc((size_t)cap * nh * hd), vc((size_t)cap * nh * hd);
    emu::launch({(unsigned)t, (unsigned)nh}, 64, [&] { qkv_split_rope(qkv.data(), all.cos_t.data(), all.sin_t.data(), pq.data(), pk.data(), pv.data(), t, nh, nkv, hd); });
    emu::launch({(unsigned)t, (unsigned)nh}, 64, [&] { heads_rows(pk.data(), kc.data(), t, nh, hd, 1); });
    emu::launch({(unsigned)t, (unsigned)nh}, 64, [&] { heads_rows(pv.data(), vc.data(), t, nh, hd, 1); });
    std::vector<float> q1((size_t)nh * hd), k1((size_t)nh * hd), v1((size_t)nh * hd), out((size_t)nh * hd);
    int p = t, half = hd / 2;
    emu::launch({1, (unsigned)nh}, 64, [&] {
        qkv_split_rope(qkv.data() + (size_t)p * w, all.cos_t.data() + p * half, all.sin_t.data() + p * half, q1.data(), k1.data(), v1.data(), 1, nh, nkv, hd);
    });
    std::copy(k1.begin(), k1.end(), kc.begin() + (size_t)p * nh * hd);
    std::copy(v1.begin(), v1.end(), vc.begin() + (size_t)p * nh * hd);
    emu::launch({(unsigned)nh}, 128, [&] { attn_decode(q1.data(), kc.data(), vc.data(), out.data(), p + 1, nh, hd, scale); });
    std::vector<double> want((size_t)nh * hd);
    for (int h = 0; h < nh; h++)
        for (int c = 0; c < hd; c++) want[(size_t)h * hd + c] = wo[(((size_t)h) * (t + 1) + t) * hd + c];
    check("attn_decode after a prefilled cache: last row of attention", rel_to_max(out, want), 1e-5);
}

static void swiglu() {
    Rng r(6);
    int n = 5, f = 300;
    auto gu = r.normals((size_t)n * 2 * f, 2.f), da = r.normals((size_t)n * f);
    std::vector<float> a((size_t)n * f), dgu((size_t)n * 2 * f);
    size_t total = (size_t)n * f;
    unsigned grid = (unsigned)((total + 255) / 256);
    emu::launch({grid}, 256, [&] { swiglu_fwd(gu.data(), a.data(), total, f); });
    auto fwd = [](double g, double u) { return g / (1 + std::exp(-g)) * u; };
    std::vector<double> wa(total);
    for (int rr = 0; rr < n; rr++)
        for (int i = 0; i < f; i++) wa[(size_t)rr * f + i] = fwd(gu[(size_t)rr * 2 * f + i], gu[(size_t)rr * 2 * f + f + i]);
    check("swiglu_fwd: a = silu(g) u", rel(a, wa, 1e-3), 1e-5);
    emu::launch({grid}, 256, [&] { swiglu_bwd(gu.data(), da.data(), dgu.data(), total, f); });
    double e = 0, hs = 1e-6;
    for (int rr = 0; rr < n; rr++)
        for (int i = 0; i < f; i += 3) {
            double g = gu[(size_t)rr * 2 * f + i], u = gu[(size_t)rr * 2 * f + f + i], d = da[(size_t)rr * f + i];
            double fg = d * (fwd(g + hs, u) - fwd(g - hs, u)) / (2 * hs), fu = d * (fwd(g, u + hs) - fwd(g, u - hs)) / (2 * hs);
            e = std::max(e, std::fabs(dgu[(size_t)rr * 2 * f + i] - fg) / (std::fabs(fg) + 1e-2));
            e = std::max(e, std::fabs(dgu[(size_t)rr * 2 * f + f + i] - fu) / (std::fabs(fu) + 1e-2));
        }
    check("swiglu_bwd: against central differences", e, 1e-4);
}

// Loss of one row in f64: α·w·CE + w(1−α)τ²·KL(p_T ‖ softmax(z/τ)), p_T the teacher's top-k
// log-probs renormalised at τ (no teacher: k = 0, α = 1).
static double ce_ref(const std::vector<double>& z, int y, double w, const unsigned* ids, const float* lp, int k, double alpha, double tau, double* nll) {
    double mx = -INFINITY, s = 0;
    for (double x : z) mx = std::max(mx, x);
    for (double x : z) s += std::exp(x - mx);
    *nll = mx + std::log(s) - z[y];
    if (k == 0) return w * *nll;
    double smx = -INFINITY, ss = 0;
    for (double x : z) smx = std::max(smx, x / tau);
    for (double x : z) ss += std::exp(x / tau - smx);
    double slse = smx + std::log(ss), tmx = -INFINITY, tz = 0, kl = 0;
    for (int j = 0; j < k; j++) tmx = std::max(tmx, lp[j] / tau);
    for (int j = 0; j < k; j++) tz += std::exp(lp[j] / tau - tmx);
    for (int j = 0; j < k; j++) {
        double pt = std::exp(lp[j] / tau - tmx) / tz;
        kl += pt * (std::log(pt) - (z[ids[j]] / tau - slse));
    }
    return alpha * w * *nll + w * (1 - alpha) * tau * tau * kl;
}

static void cross_entropy() {
    Rng r(7);
    int rows = 4, vocab = 1000, k = 8;
    for (int teacher = 0; teacher < 2; teacher++) {
        auto z0 = r.normals((size_t)rows * vocab, 3.f);
        std::vector<unsigned> tgt(rows), tids((size_t)rows * k);
        std::vector<float> wts(rows), tlp((size_t)rows * k), loss(rows), nll(rows);
        for (int i = 0; i < rows; i++) {
            tgt[i] = r.below(vocab);
            wts[i] = r.uniform(0.2f, 1.5f);
            for (int j = 0; j < k; j++) {
                tids[(size_t)i * k + j] = (unsigned)((i * 131 + j * 97) % vocab);
                tlp[(size_t)i * k + j] = -0.5f - 0.7f * j + 0.1f * r.normal();
            }
        }
        int kk = teacher ? k : 0;
        float alpha = teacher ? 0.3f : 1.f, tau = teacher ? 2.f : 1.f;
        std::vector<float> g = z0;
        emu::launch({(unsigned)rows}, ROW_THREADS * 2,
                    [&] { ce_rows(g.data(), vocab, tgt.data(), wts.data(), loss.data(), nll.data(), 1, tids.data(), tlp.data(), kk, alpha, tau); });
        double el = 0, en = 0, eg = 0;
        for (int i = 0; i < rows; i++) {
            std::vector<double> z(z0.begin() + (size_t)i * vocab, z0.begin() + (size_t)(i + 1) * vocab);
            double wn, wl = ce_ref(z, tgt[i], wts[i], tids.data() + (size_t)i * k, tlp.data() + (size_t)i * k, kk, alpha, tau, &wn);
            el = std::max(el, std::fabs(loss[i] - wl) / (std::fabs(wl) + 1e-3));
            en = std::max(en, std::fabs(nll[i] - wn) / (std::fabs(wn) + 1e-3));
            // Gradient against central differences at the target, the teacher's ids and others.
            std::vector<int> at = {(int)tgt[i], 0, 1, vocab - 1, 500};
            for (int j = 0; j < kk; j++) at.push_back((int)tids[(size_t)i * k + j]);
            for (int j : at) {
                double hs = 1e-4, dummy;
                auto zp = z, zm = z;
                zp[j] += hs;
                zm[j] -= hs;
                double fd = (ce_ref(zp, tgt[i], wts[i], tids.data() + (size_t)i * k, tlp.data() + (size_t)i * k, kk, alpha, tau, &dummy) -
                             ce_ref(zm, tgt[i], wts[i], tids.data() + (size_t)i * k, tlp.data() + (size_t)i * k, kk, alpha, tau, &dummy)) /
                            (2 * hs);
                eg = std::max(eg, std::fabs(g[(size_t)i * vocab + j] - fd) / (std::fabs(fd) + 1e-4));
            }
        }
        check(teacher ? "ce_rows: with distillation KL, loss" : "ce_rows: loss", el, 1e-5);
        check(teacher ? "ce_rows: with distillation KL, plain NLL" : "ce_rows: NLL", en, 1e-5);
        check(teacher ? "ce_rows: with distillation KL, gradient vs differences" : "ce_rows: gradient vs differences", eg, 1e-3);
    }
}

static void reductions() {
    Rng r(8);
    size_t n = 100003;
    auto x = r.normals(n);
    size_t blocks = 13, chunk = (n + blocks - 1) / blocks;
    std::vector<double> part(blocks), sums(2, 5.0);
    for (int sq = 0; sq < 2; sq++) {
        emu::launch({(unsigned)blocks}, 256, [&] { sumsq_partial(x.data(), n, chunk, part.data(), sq); });
        emu::launch({1}, 256, [&] { sum_partials(part.data(), (int)blocks, sums.data(), sq, 1); });
    }
    double s = 0, ss = 0;
    for (float v : x) {
        s += v;
        ss += (double)v * v;
    }
    check("sumsq_partial + sum_partials: sum (accumulated)", std::fabs(sums[0] - 5.0 - s) / ss, 1e-13);
    check("sumsq_partial + sum_partials: sum of squares (accumulated)", std::fabs(sums[1] - 5.0 - ss) / ss, 1e-13);

    auto acc = std::vector<double>(1000, 0.25);
    auto y = r.normals(1000);
    emu::launch({4}, 256, [&] { add_f64(acc.data(), y.data(), 1000); });
    double e = 0;
    for (int i = 0; i < 1000; i++) e = std::max(e, std::fabs(acc[i] - (0.25 + (double)y[i])));
    check("add_f64: acc + x in f64", e, 0);
}

static void topk() {
    Rng r(9);
    // Values on a coarse grid so that ties are common: ties must go to the lower id.
    int rows = 6, vocab = 1037;
    std::vector<float> z((size_t)rows * vocab);
    for (auto& v : z) v = std::round(r.normal() * 4.f) / 4.f;
    for (int k : {1, 7, 32, 64}) {
        std::vector<unsigned> ids((size_t)rows * k);
        std::vector<float> lp((size_t)rows * k);
        emu::launch({(unsigned)rows}, TOPK_THREADS, [&] { topk_rows(z.data(), vocab, k, ids.data(), lp.data()); });
        double eid = 0, elp = 0;
        for (int i = 0; i < rows; i++) {
            const float* row = z.data() + (size_t)i * vocab;
            std::vector<int> order(vocab);
            std::iota(order.begin(), order.end(), 0);
            std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });
            double mx = -INFINITY, s = 0;
            for (int j = 0; j < vocab; j++) mx = std::max(mx, (double)row[j]);
            for (int j = 0; j < vocab; j++) s += std::exp(row[j] - mx);
            double lse = mx + std::log(s);
            for (int j = 0; j < k; j++) {
                eid += ids[(size_t)i * k + j] != (unsigned)order[j];
                elp = std::max(elp, std::fabs(lp[(size_t)i * k + j] - (row[order[j]] - lse)));
            }
        }
        char what[80];
        std::snprintf(what, sizeof what, "topk_rows: k=%d, ids not the reference's (ties to lower id)", k);
        check(what, eid, 0);
        std::snprintf(what, sizeof what, "topk_rows: k=%d, log-prob error (nats)", k);
        check(what, elp, 1e-5);
    }
}

static void adam() {
    Rng r(10);
    size_t n = 1000;
    auto p = r.normals(n), g = r.normals(n), m = r.normals(n, 0.1f), v = r.normals(n, 0.1f);
    for (auto& x : v) x = x * x;
    std::vector<unsigned char> decay(n);
    for (size_t i = 0; i < n; i++) decay[i] = i % 3 != 0;
    float gscale = 0.7f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, lr = 1e-3f, wd = 0.1f;
    int t = 5;
    float shrink = 1 - lr * wd, step = lr / (1 - std::pow(b1, t)), bc2 = std::sqrt(1 - std::pow(b2, t));
    std::vector<double> wp(n), wm(n), wv(n);
    for (size_t i = 0; i < n; i++) {
        double gi = (double)g[i] * gscale;
        wm[i] = b1 * (double)m[i] + (1 - b1) * gi;
        wv[i] = b2 * (double)v[i] + (1 - b2) * gi * gi;
        // torch.optim.AdamW: p ← p(1 − lr·wd) − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
        wp[i] = p[i] * (decay[i] ? 1 - (double)lr * wd : 1) - lr / (1 - std::pow(b1, t)) * wm[i] / (std::sqrt(wv[i]) / std::sqrt(1 - std::pow(b2, t)) + eps);
    }
    int bad = 0;
    unsigned grid = (unsigned)((n + 255) / 256);
    emu::launch({grid}, 256, [&] { adamw(p.data(), g.data(), m.data(), v.data(), decay.data(), n, gscale, b1, b2, eps, shrink, step, bc2, &bad); });
    check("adamw: parameters (torch.optim.AdamW)", rel(p, wp, 1e-2), 1e-5);
    check("adamw: first moments", rel(m, wm, 1e-2), 1e-6);
    check("adamw: second moments", rel(v, wv, 1e-4), 1e-6);
    check("adamw: finite step raises no flag", bad, 0);
    g[17] = NAN;
    emu::launch({grid}, 256, [&] { adamw(p.data(), g.data(), m.data(), v.data(), decay.data(), n, gscale, b1, b2, eps, shrink, step, bc2, &bad); });
    check("adamw: a NaN gradient raises the flag", bad == 1 ? 0 : 1, 0);
}

static void flash() {
    // The bf16 flash path: qkv_split_rope16 against the f32 split rounded to bf16, flash_fwd and
    // its backward (flash_bwd_prep, flash_bwd_dq, flash_bwd_dkdv) against f64 attention on the
    // same bf16-rounded q, k, v. Two query slabs, so the off-diagonal tiles run too.
    Rng r(11);
    int b = 1, t = 128, nh = 2, nkv = 1, hd = HD, bh = b * nh, n = b * t;
    float scale = 1.f / 8.f;
    Rope rp(b, t, nh, nkv, hd);
    auto qkv = r.normals(rp.packed());
    size_t sz = rp.heads();
    std::vector<unsigned short> q(sz), qT(sz), k(sz), kT(sz), v(sz), vT(sz);
    emu::launch({(unsigned)n, (unsigned)nh}, 32,
                [&] { qkv_split_rope16(qkv.data(), rp.cos_t.data(), rp.sin_t.data(), q.data(), qT.data(), k.data(), kT.data(), v.data(), vT.data(), t, nh, nkv); });
    std::vector<float> fq(sz), fk(sz), fv(sz);
    emu::launch({(unsigned)n, (unsigned)nh}, 64, [&] { qkv_split_rope(qkv.data(), rp.cos_t.data(), rp.sin_t.data(), fq.data(), fk.data(), fv.data(), t, nh, nkv, hd); });
    double e = 0;
    for (int z = 0; z < bh; z++)
        for (int p = 0; p < t; p++)
            for (int i = 0; i < hd; i++) {
                size_t a = ((size_t)z * t + p) * hd + i, tr = (size_t)z * hd * t + (size_t)i * t + p;
                e += q[a] != to_bf16(fq[a]) || k[a] != to_bf16(fk[a]) || v[a] != to_bf16(fv[a]);
                e += qT[tr] != q[a] || kT[tr] != k[a] || vT[tr] != v[a];
            }
    check("qkv_split_rope16: bf16 of the f32 split, and transposes", e, 0);

    std::vector<double> dq(sz), dk(sz), dv(sz);
    for (size_t i = 0; i < sz; i++) {
        dq[i] = bf16_to_f32(q[i]);
        dk[i] = bf16_to_f32(k[i]);
        dv[i] = bf16_to_f32(v[i]);
    }
    std::vector<double> wo, wlse;
    attention_ref(dq, dk, dv, bh, t, hd, scale, wo, wlse);
    std::vector<float> o((size_t)n * nh * hd), lse((size_t)bh * t);
    emu::launch({(unsigned)(t / 64), (unsigned)bh}, 128, [&] { flash_fwd(q.data(), k.data(), vT.data(), o.data(), lse.data(), t, nh, scale); });
    // o is in rows (b·t, nh·64); the reference in (b, nh, t, 64).
    std::vector<double> wo_rows(o.size());
    for (int z = 0; z < bh; z++)
        for (int p = 0; p < t; p++)
            for (int i = 0; i < hd; i++) wo_rows[((size_t)(z / nh * t + p) * nh + z % nh) * hd + i] = wo[((size_t)z * t + p) * hd + i];
    // P is rounded to bf16 before P·V: ~3 significant digits.
    check("flash_fwd: O against f64 attention (bf16 P)", rel_to_max(o, wo_rows), 1e-2);
    check("flash_fwd: log-sum-exp", rel(lse, wlse, 1.0), 1e-5);

    // Backward: dQ, dK, dV of L = Σ dO ⊙ O, in f64 from the definitions.
    auto dout = r.normals(o.size());
    std::vector<double> gq(sz, 0), gk(sz, 0), gv(sz, 0);
    for (int z = 0; z < bh; z++)
        for (int i = 0; i < t; i++) {
            auto at = [&](const std::vector<double>& m, int row, int c) { return m[((size_t)z * t + row) * hd + c]; };
            auto go = [&](int c) { return (double)dout[((size_t)(z / nh * t + i) * nh + z % nh) * hd + c]; };
            std::vector<double> pr(i + 1), dpr(i + 1);
            double dsum = 0;
            for (int j = 0; j <= i; j++) {
                double s = 0, d = 0;
                for (int c = 0; c < hd; c++) s += at(dq, i, c) * at(dk, j, c);
                pr[j] = std::exp(s * scale - wlse[(size_t)z * t + i]);
                for (int c = 0; c < hd; c++) d += go(c) * at(dv, j, c);
                dpr[j] = d;
                dsum += pr[j] * d;
            }
            for (int j = 0; j <= i; j++) {
                double ds = pr[j] * (dpr[j] - dsum) * scale;
                for (int c = 0; c < hd; c++) {
                    gv[((size_t)z * t + j) * hd + c] += pr[j] * go(c);
                    gq[((size_t)z * t + i) * hd + c] += ds * at(dk, j, c);
                    gk[((size_t)z * t + j) * hd + c] += ds * at(dq, i, c);
                }
            }
        }
    std::vector<unsigned short> dO(sz), dOT(sz);
    std::vector<float> dd((size_t)bh * t), gdq(sz), gdk(sz), gdv(sz);
    emu::launch({(unsigned)n, (unsigned)nh}, 64, [&] { flash_bwd_prep(dout.data(), o.data(), dO.data(), dOT.data(), dd.data(), t, nh); });
    emu::launch({(unsigned)(t / 64), (unsigned)bh}, 128,
                [&] { flash_bwd_dq(q.data(), k.data(), kT.data(), v.data(), dO.data(), lse.data(), dd.data(), gdq.data(), t, scale); });
    emu::launch({(unsigned)(t / 64), (unsigned)bh}, 128,
                [&] { flash_bwd_dkdv(q.data(), qT.data(), k.data(), v.data(), dO.data(), dOT.data(), lse.data(), dd.data(), gdk.data(), gdv.data(), t, scale); });
    // dO, P and dS are rounded to bf16 on the way: a few parts in a thousand of the largest entry.
    check("flash_bwd_prep + flash_bwd_dq: dQ against f64 gradients", rel_to_max(gdq, gq), 2e-2);
    check("flash_bwd_dkdv: dK against f64 gradients", rel_to_max(gdk, gk), 2e-2);
    check("flash_bwd_dkdv: dV against f64 gradients", rel_to_max(gdv, gv), 2e-2);
}

static void bf16_copies() {
    Rng r(12);
    auto x = r.normals(1000);
    x[3] = 1.00390625f;  // exactly halfway between two bf16 values: rounds to even (1.0)
    x[4] = 1.01171875f;  // halfway, rounds up to the even neighbour 1.015625
    std::vector<unsigned short> y(1000);
    emu::launch({4}, 256, [&] { f32_to_bf16(x.data(), y.data(), 1000); });
    double e = 0;
    for (int i = 0; i < 1000; i++) {
        // The nearest bf16 by search, independent of the bit trick.
        double best = INFINITY;
        float want = 0;
        for (int d = -1; d <= 1; d++) {
            uint32_t u;
            std::memcpy(&u, &x[i], 4);
            uint32_t c = ((u >> 16) + d) << 16;
            float cand;
            std::memcpy(&cand, &c, 4);
            double err = std::fabs((double)cand - x[i]);
            if (err < best || (err == best && ((c >> 16) & 1) == 0)) best = err, want = cand;
        }
        e = std::max(e, (double)std::fabs(bf16_to_f32(y[i]) - want));
    }
    check("f32_to_bf16: the emulated cvt.rn, nearest, ties to even", e, 0);
}

int main() {
    embedding();
    rmsnorm();
    attention_layout();
    softmax();
    decode();
    swiglu();
    cross_entropy();
    reductions();
    topk();
    adam();
    flash();
    bf16_copies();
    std::printf("%s: %d check(s) failed\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
