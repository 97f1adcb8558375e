//! CPU kernels of the trainable Llama student, each with its own backward: matmuls through
//! the `gemm` crate, and fused RMSNorm, rotate-half RoPE, causal softmax attention, SwiGLU and
//! cross-entropy over the vocabulary. Everything works on row-major slices, generic over f32
//! (training) and f64 (the finite-difference gradient test). Work is split over rows with
//! rayon; every reduction over rows adds fixed-size partial sums in a fixed order, so results
//! do not depend on the thread count or scheduling (same seed, same losses).

use num_traits::{Float, NumAssign};
use rayon::prelude::*;

/// The float types the kernels run in.
pub trait Real: Float + NumAssign + Send + Sync + Default + std::fmt::Debug + std::iter::Sum + 'static {
    fn of(x: f64) -> Self;
    /// `exp`, vectorizable in f32 ([`exp_f32`]); exact `exp` in f64.
    fn fast_exp(self) -> Self;
}
impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        exp_f32(self)
    }
}
impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        self.exp()
    }
}

/// `exp(x)` in f32 without a libm call, so loops over it vectorize: `2^k · p(r)` with
/// `k = round(x / ln 2)`, `r = x − k ln 2` (two-part ln 2) and `p` the degree-7 Taylor
/// polynomial (truncation < 1e-8 relative on |r| ≤ ln2/2). Relative error < 3e-7 (tested);
/// inputs are clamped to [−87, 88] (below: ~1.6e-38 instead of a denormal or 0).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding and subtracting rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    f32::from_bits(((k as i32 + 127) as u32) << 23) * p
}

/// Rows per partial sum in reductions over rows (fixed, so sums are order-stable).
const REDUCE_ROWS: usize = 64;

fn parallelism(work: usize) -> gemm::Parallelism {
    let n = rayon::current_num_threads();
    // Tiny products (attention heads, tests) are faster on one thread.
    if n <= 1 || work < 64 * 64 * 64 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(n)
    }
}

/// Whether the CPU runs AVX2 + FMA code (checked once).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// A per-row kernel body compiled twice: as built (the x86-64 baseline vectorizes 4 f32 wide)
/// and for AVX2 + FMA (8 wide), the latter run where the CPU has them. The results are the
/// same either way: Rust never reassociates or contracts float operations, so only the vector
/// width changes.
macro_rules! wide_fn {
    ($(#[$m:meta])* fn $name:ident<T: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[inline(always)]
        fn $name<T: Real>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<T: Real>($($arg: $ty),*) $(-> $ret)? $body
                if has_avx2() {
                    // SAFETY: the CPU has the enabled features (checked above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

/// A matrix view: base pointer plus row and column strides (in elements).
#[derive(Clone, Copy)]
pub struct View<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> View<T> {
    /// Row-major `(rows, cols)` with row stride `ld`.
    pub fn rows(s: &[T], ld: usize) -> Self {
        View { ptr: s.as_ptr(), rs: ld as isize, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `ld`.
    pub fn t(s: &[T], ld: usize) -> Self {
        View { ptr: s.as_ptr(), rs: 1, cs: ld as isize }
    }
}

/// `C (m×n) = [C +] A (m×k) · B (k×n)`; `C` row-major with row stride `ldc`.
///
/// # Safety
/// The views must address valid memory for the given sizes and not alias `c`.
pub unsafe fn gemm_raw<T: Real>(m: usize, n: usize, k: usize, c: *mut T, ldc: usize, acc: bool, a: View<T>, b: View<T>, par: bool) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    if par && threads > 1 && m * n * k >= 64 * 64 * 64 && split_mode() {
        // Data-parallel over blocks of output rows (or columns when there are few rows), each
        // a single-threaded gemm: no barrier inside a product; rayon balances the blocks.
        let cp = SendPtr(c);
        let (ap, bp) = (SendPtr(a.ptr as *mut T), SendPtr(b.ptr as *mut T));
        let (ars, acs, brs, bcs) = (a.rs, a.cs, b.rs, b.cs);
        if m >= n {
            let blk = m.div_ceil(4 * threads).max(32);
            (0..m.div_ceil(blk)).into_par_iter().for_each(|i| {
                let r0 = i * blk;
                let rows = blk.min(m - r0);
                let av = View { ptr: unsafe { ap.get().offset(r0 as isize * ars) } as *const T, rs: ars, cs: acs };
                let bv = View { ptr: bp.get() as *const T, rs: brs, cs: bcs };
                unsafe { gemm_raw(rows, n, k, cp.get().add(r0 * ldc), ldc, acc, av, bv, false) }
            });
        } else {
            let blk = n.div_ceil(4 * threads).max(32);
            (0..n.div_ceil(blk)).into_par_iter().for_each(|j| {
                let c0 = j * blk;
                let cols = blk.min(n - c0);
                let av = View { ptr: ap.get() as *const T, rs: ars, cs: acs };
                let bv = View { ptr: unsafe { bp.get().offset(c0 as isize * bcs) } as *const T, rs: brs, cs: bcs };
                unsafe { gemm_raw(m, cols, k, cp.get().add(c0), ldc, acc, av, bv, false) }
            });
        }
        return;
    }
    let p = if par { parallelism(m * n * k) } else { gemm::Parallelism::None };
    gemm::gemm(m, n, k, c, 1, ldc as isize, acc, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, T::one(), T::one(), false, false, false, p);
}

fn split_mode() -> bool {
    static MODE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| std::env::var("MASA_GEMM_SPLIT").map(|v| v != "0").unwrap_or(true))
}

/// Advise the kernel to back `buf` with transparent huge pages (Linux; elsewhere, or when
/// refused, nothing changes). For a large output allocated per call and written once, such as
/// the logits: its first touches then fault 2 MiB at a time instead of 4 KiB. Call it before
/// the first write.
pub fn advise_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside `buf`'s allocation, and MADV_HUGEPAGE changes no contents.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
}

/// `c (m×n) [+]= a (m×k) · bᵀ` where `b` is `(n×k)`: a linear layer `y = x Wᵀ`.
pub fn mm_nt<T: Real>(c: &mut [T], a: &[T], b: &[T], m: usize, n: usize, k: usize, acc: bool) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= n * k);
    unsafe { gemm_raw(m, n, k, c.as_mut_ptr(), n, acc, View::rows(a, k), View::t(b, k), true) }
}

/// `c (m×n) [+]= a (m×k) · b (k×n)`: the input gradient of a linear layer, `dx = dy W`.
pub fn mm_nn<T: Real>(c: &mut [T], a: &[T], b: &[T], m: usize, n: usize, k: usize, acc: bool) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    unsafe { gemm_raw(m, n, k, c.as_mut_ptr(), n, acc, View::rows(a, k), View::rows(b, n), true) }
}

/// `c (m×n) [+]= aᵀ · b` where `a` is `(k×m)`, `b` is `(k×n)`: a weight gradient, `dW = dyᵀ x`.
pub fn mm_tn<T: Real>(c: &mut [T], a: &[T], b: &[T], m: usize, n: usize, k: usize, acc: bool) {
    assert!(c.len() >= m * n && a.len() >= k * m && b.len() >= k * n);
    unsafe { gemm_raw(m, n, k, c.as_mut_ptr(), n, acc, View::t(a, m), View::rows(b, n), true) }
}

/// `c (d×d) = xᵀ x` for `x (n×d)` row-major, the sum of the rows' outer products (the
/// calibration statistics' `Σ x xᵀ`), as a symmetric rank-k update: only the blocks on and
/// above the diagonal are multiplied (about half the flops of a general product), in parallel
/// over block pairs, then the lower triangle is mirrored from the upper (exactly symmetric).
pub fn gram<T: Real>(c: &mut [T], x: &[T], n: usize, d: usize) {
    const B: usize = 128;
    assert!(c.len() >= d * d && x.len() >= n * d);
    let nb = d.div_ceil(B);
    let pairs: Vec<(usize, usize)> = (0..nb).flat_map(|i| (i..nb).map(move |j| (i, j))).collect();
    let cp = SendPtr(c.as_mut_ptr());
    pairs.par_iter().for_each(|&(i, j)| {
        let (r0, c0) = (i * B, j * B);
        let (rows, cols) = (B.min(d - r0), B.min(d - c0));
        // Rows r0.. of xᵀ (element (a, k) = x[k, r0 + a]) times columns c0.. of x.
        let a = View { ptr: x[r0..].as_ptr(), rs: 1, cs: d as isize };
        let b = View { ptr: x[c0..].as_ptr(), rs: d as isize, cs: 1 };
        // Block pairs write disjoint blocks of c.
        unsafe { gemm_raw(rows, cols, n, cp.get().add(r0 * d + c0), d, false, a, b, false) }
    });
    for r in 1..d {
        for col in 0..r {
            c[r * d + col] = c[col * d + r];
        }
    }
}

/// A raw pointer that may cross threads; users write disjoint parts only.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    pub fn get(&self) -> *mut T {
        self.0
    }
}

/// Sum per-row contributions `f(row, acc)` into `out` (length `d`) deterministically: fixed
/// blocks of rows in parallel, then the block sums in order.
fn reduce_rows<T: Real>(rows: usize, d: usize, out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    let blocks = rows.div_ceil(REDUCE_ROWS);
    let partial: Vec<Vec<T>> = (0..blocks)
        .into_par_iter()
        .map(|blk| {
            let mut acc = vec![T::zero(); d];
            for r in blk * REDUCE_ROWS..((blk + 1) * REDUCE_ROWS).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    for p in partial {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x · r · w, r = 1 / sqrt(mean(x²) + eps)

pub fn rmsnorm_fwd<T: Real>(x: &[T], w: &[T], y: &mut [T], rstd: &mut [T], d: usize, eps: f64) {
    let eps = T::of(eps);
    let dn = T::of(d as f64);
    y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(rstd.par_iter_mut()).for_each(|((y, x), r)| *r = rmsnorm_row(x, w, y, dn, eps));
}

wide_fn! {
    /// One row of [`rmsnorm_fwd`]; returns its `r`.
    fn rmsnorm_row<T: Real>(x: &[T], w: &[T], y: &mut [T], dn: T, eps: T) -> T {
        let ss: T = x.iter().map(|&v| v * v).sum();
        let rs = T::one() / (ss / dn + eps).sqrt();
        for ((yo, &xi), &wi) in y.iter_mut().zip(x).zip(w) {
            *yo = xi * rs * wi;
        }
        rs
    }
}

/// `dx += ∂/∂x`, `dw += ∂/∂w` for upstream `dy`: with `g = dy ⊙ w`,
/// `dx = r g − x r³ (g·x)/d`, `dw = Σ_rows dy ⊙ x r`.
pub fn rmsnorm_bwd<T: Real>(dy: &[T], x: &[T], w: &[T], rstd: &[T], dx: &mut [T], dw: &mut [T], d: usize) {
    let dn = T::of(d as f64);
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d))
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter())
        .for_each(|(((dx, dy), x), &r)| rmsnorm_bwd_row(dy, x, w, dx, r, dn));
    let rows = rstd.len();
    reduce_rows(rows, d, dw, |n, acc| axpy_product(acc, &dy[n * d..(n + 1) * d], &x[n * d..(n + 1) * d], rstd[n]));
}

wide_fn! {
    /// One row of [`rmsnorm_bwd`]'s `dx`.
    fn rmsnorm_bwd_row<T: Real>(dy: &[T], x: &[T], w: &[T], dx: &mut [T], r: T, dn: T) {
        let dot: T = dy.iter().zip(w).zip(x).map(|((&a, &b), &c)| a * b * c).sum();
        let c = r * r * r * dot / dn;
        for i in 0..dx.len() {
            dx[i] += r * dy[i] * w[i] - c * x[i];
        }
    }
}

wide_fn! {
    /// `acc += a ⊙ b · r`.
    fn axpy_product<T: Real>(acc: &mut [T], a: &[T], b: &[T], r: T) {
        for i in 0..acc.len() {
            acc[i] += a[i] * b[i] * r;
        }
    }
}

/// `log Σ exp(z)` of one row in f64, max-shifted: the reference log-partition of the checks
/// that compare an engine's log-probs with the f64 engine's logits.
pub fn log_sum_exp(row: &[f64]) -> f64 {
    let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    mx + row.iter().map(|z| (z - mx).exp()).sum::<f64>().ln()
}

// ---------------------------------------------------------------------------------------------
// RoPE, HF rotate-half convention: for i < d/2, with angle a = pos · θ^(−2i/d),
// y[i] = x[i] cos a − x[i+d/2] sin a, y[i+d/2] = x[i+d/2] cos a + x[i] sin a.

/// cos and sin tables `(t, d/2)`.
pub fn rope_tables<T: Real>(head_dim: usize, t: usize, theta: f64) -> (Vec<T>, Vec<T>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for i in 0..half {
            // f32 inverse frequencies as HF computes them, angle in f64.
            let inv = (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32 as f64;
            let a = p as f64 * inv;
            cos.push(T::of(a.cos()));
            sin.push(T::of(a.sin()));
        }
    }
    (cos, sin)
}

/// Rotate the first `heads` heads of every row of `x` (`b·t` rows of stride `ld`) in place;
/// position of row n is `n % t`. `inverse` applies the transpose (the backward pass).
#[allow(clippy::too_many_arguments)]
pub fn rope<T: Real>(x: &mut [T], ld: usize, cos: &[T], sin: &[T], t: usize, heads: usize, head_dim: usize, inverse: bool) {
    let half = head_dim / 2;
    x.par_chunks_mut(ld).enumerate().for_each(|(n, row)| {
        let p = n % t;
        rope_row(&mut row[..heads * head_dim], &cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half], head_dim, inverse)
    });
}

wide_fn! {
    /// Rotate every head (`head_dim` wide) of `v` by the angles of one position.
    fn rope_row<T: Real>(v: &mut [T], c: &[T], s: &[T], head_dim: usize, inverse: bool) {
        let half = head_dim / 2;
        for v in v.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (v[i], v[i + half]);
                let sn = if inverse { -s[i] } else { s[i] };
                v[i] = a * c[i] - b * sn;
                v[i + half] = b * c[i] + a * sn;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Causal attention over a packed `qkv` (b·t rows of stride ld = (nh + 2·nkv)·hd: q heads, then
// k heads, then v heads, the output of the fused q/k/v projection). Head h reads kv head
// h / (nh/nkv) (HF repeat_kv). p: (b, nh, t, t) softmax probabilities, kept for the backward.

pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

pub fn attention_fwd<T: Real>(s: &AttnShape, qkv: &[T], p: &mut [T], o: &mut [T]) {
    let (t, nh, nkv, hd) = (s.t, s.nh, s.nkv, s.hd);
    let (qd, kd, g) = (nh * hd, nkv * hd, nh / nkv);
    let ld = qd + 2 * kd;
    let scale = T::of(1.0 / (hd as f64).sqrt());
    let optr = SendPtr(o.as_mut_ptr());
    p.par_chunks_mut(t * t).enumerate().for_each(|(bh, pm)| {
        let (bi, h) = (bh / nh, bh % nh);
        let kh = h / g;
        let qb = &qkv[bi * t * ld + h * hd..];
        let kb = &qkv[bi * t * ld + qd + kh * hd..];
        let vb = &qkv[bi * t * ld + qd + kd + kh * hd..];
        let ob = unsafe { optr.get().add(bi * t * qd + h * hd) };
        // Causal blocks of query rows: rows r0..r1 attend to keys 0..r1 only, so the products
        // skip the masked upper triangle beyond each block (about 3/8 of the full t×t work at
        // t = 256).
        for r0 in (0..t).step_by(ATTN_ROWS) {
            let r1 = (r0 + ATTN_ROWS).min(t);
            let q = View { ptr: qb[r0 * ld..].as_ptr(), rs: ld as isize, cs: 1 };
            unsafe {
                gemm_raw(r1 - r0, r1, hd, pm[r0 * t..].as_mut_ptr(), t, false, q, View { ptr: kb.as_ptr(), rs: 1, cs: ld as isize }, false)
            }
            for i in r0..r1 {
                let row = &mut pm[i * t..(i + 1) * t];
                softmax_causal_row(row, i + 1, scale)
            }
            unsafe {
                gemm_raw(
                    r1 - r0,
                    hd,
                    r1,
                    ob.add(r0 * qd),
                    qd,
                    false,
                    View::rows(&pm[r0 * t..], t),
                    View { ptr: vb.as_ptr(), rs: ld as isize, cs: 1 },
                    false,
                )
            }
        }
    });
}

wide_fn! {
/// `row[..n] = softmax(scale · row[..n])`, `row[n..] = 0`. The max and the sum run in 8
/// fixed lanes (vectorizable: a scalar float reduction is not), combined in lane order.
fn softmax_causal_row<T: Real>(row: &mut [T], n: usize, scale: T) {
    const L: usize = 8;
    let (live, masked) = row.split_at_mut(n);
    let mut lanes = [T::neg_infinity(); L];
    let mut chunks = live.chunks_exact_mut(L);
    for c in &mut chunks {
        for j in 0..L {
            c[j] *= scale;
            lanes[j] = lanes[j].max(c[j]);
        }
    }
    for (j, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x *= scale;
        lanes[j] = lanes[j].max(*x);
    }
    let mx = lanes.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
    let mut sums = [T::zero(); L];
    let mut chunks = live.chunks_exact_mut(L);
    for c in &mut chunks {
        for j in 0..L {
            c[j] = (c[j] - mx).fast_exp();
            sums[j] += c[j];
        }
    }
    for (j, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x = (*x - mx).fast_exp();
        sums[j] += *x;
    }
    let inv = T::one() / sums.iter().fold(T::zero(), |a, &v| a + v);
    for x in live.iter_mut() {
        *x *= inv;
    }
    masked.fill(T::zero());
}
}

/// Query rows per causal block of [`attention_fwd`].
const ATTN_ROWS: usize = 64;

/// From `dout` (b·t, nh·hd): `dqkv` (overwritten, packed like `qkv`). `scratch`: b·nkv·t·t.
pub fn attention_bwd<T: Real>(s: &AttnShape, qkv: &[T], p: &[T], dout: &[T], dqkv: &mut [T], scratch: &mut [T]) {
    let (t, nh, nkv, hd) = (s.t, s.nh, s.nkv, s.hd);
    let (qd, kd, g) = (nh * hd, nkv * hd, nh / nkv);
    let ld = qd + 2 * kd;
    let scale = T::of(1.0 / (hd as f64).sqrt());
    let dp = SendPtr(dqkv.as_mut_ptr());
    scratch.par_chunks_mut(t * t).enumerate().for_each(|(bk, ds)| {
        let (bi, kh) = (bk / nkv, bk % nkv);
        let base = bi * t * ld;
        let kb = &qkv[base + qd + kh * hd..];
        let vb = &qkv[base + qd + kd + kh * hd..];
        let dkb = unsafe { dp.get().add(base + qd + kh * hd) };
        let dvb = unsafe { dp.get().add(base + qd + kd + kh * hd) };
        let packed = |ptr: *const T| View { ptr, rs: ld as isize, cs: 1 };
        for j in 0..g {
            let h = kh * g + j;
            let pm = &p[(bi * nh + h) * t * t..(bi * nh + h + 1) * t * t];
            let qb = &qkv[base + h * hd..];
            let dob = View { ptr: dout[bi * t * qd + h * hd..].as_ptr(), rs: qd as isize, cs: 1 };
            unsafe {
                // dV += Pᵀ dO
                gemm_raw(t, hd, t, dvb, ld, j > 0, View::t(pm, t), dob, false);
                // dP = dO Vᵀ
                gemm_raw(t, t, hd, ds.as_mut_ptr(), t, false, dob, View { ptr: vb.as_ptr(), rs: 1, cs: ld as isize }, false);
            }
            // dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
            for i in 0..t {
                let pr = &pm[i * t..(i + 1) * t];
                let dr = &mut ds[i * t..(i + 1) * t];
                let dot: T = pr[..=i].iter().zip(&dr[..=i]).map(|(&a, &b)| a * b).sum();
                for c in 0..=i {
                    dr[c] = pr[c] * (dr[c] - dot) * scale;
                }
                for x in dr[i + 1..].iter_mut() {
                    *x = T::zero();
                }
            }
            unsafe {
                // dQ = dS K
                gemm_raw(t, hd, t, dp.get().add(base + h * hd), ld, false, View::rows(ds, t), packed(kb.as_ptr()), false);
                // dK += dSᵀ Q
                gemm_raw(t, hd, t, dkb, ld, j > 0, View::t(ds, t), packed(qb.as_ptr()), false);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: a = silu(g) ⊙ u

/// `gu`: rows of `[gate (f) | up (f)]` (the fused gate/up projection); `a`: rows of f.
pub fn swiglu_fwd<T: Real>(gu: &[T], a: &mut [T], f: usize) {
    a.par_chunks_mut(f).zip(gu.par_chunks(2 * f)).for_each(|(a, gu)| swiglu_row(a, gu));
}

wide_fn! {
    /// One row of [`swiglu_fwd`]: `a = silu(g) ⊙ u` for `gu = [g | u]`.
    fn swiglu_row<T: Real>(a: &mut [T], gu: &[T]) {
        let (g, u) = gu.split_at(a.len());
        for i in 0..a.len() {
            let s = T::one() / (T::one() + (-g[i]).fast_exp());
            a[i] = g[i] * s * u[i];
        }
    }
}

/// From `da` (rows of f): `dgu` (overwritten, rows of `[dgate | dup]`).
pub fn swiglu_bwd<T: Real>(gu: &[T], da: &[T], dgu: &mut [T], f: usize) {
    dgu.par_chunks_mut(2 * f).zip(gu.par_chunks(2 * f)).zip(da.par_chunks(f)).for_each(|((dgu, gu), da)| swiglu_bwd_row(dgu, gu, da));
}

wide_fn! {
    /// One row of [`swiglu_bwd`].
    fn swiglu_bwd_row<T: Real>(dgu: &mut [T], gu: &[T], da: &[T]) {
        let f = da.len();
        let (g, u) = gu.split_at(f);
        let (dg, du) = dgu.split_at_mut(f);
        for i in 0..f {
            let (gi, ui, d) = (g[i], u[i], da[i]);
            let s = T::one() / (T::one() + (-gi).fast_exp());
            du[i] = d * gi * s;
            dg[i] = d * ui * s * (T::one() + gi * (T::one() - s));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy fused with the lm head, in row chunks so the (rows × vocab) logits are never
// all held at once.

/// Per-row targets for the loss: `weight` 0 skips a row (prompt tokens in fine-tuning).
pub struct Targets<'a, T> {
    pub ids: &'a [u32],
    pub weights: &'a [T],
}

/// A teacher's top-k distribution per row, for distillation: `ids`/`logp` `(rows, k)`.
pub struct Teacher<'a> {
    pub k: usize,
    pub ids: &'a [u32],
    pub logp: &'a [f32],
    /// Loss = α·CE + (1−α)·τ²·KL(teacher ‖ student at temperature τ).
    pub alpha: f64,
    pub temperature: f64,
}

/// `Σ_n w_n · (−log softmax(x_n Eᵀ)[y_n])` (+ distillation), and, with `grad`, `dx` (overwritten)
/// and `dE +=`. `x`: (rows, h), `e`: (vocab, h), `logits`: scratch (chunk × vocab).
/// Returns (weighted loss, per-row NLL written to `nll` if given).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_loss<T: Real>(
    x: &[T],
    e: &[T],
    rows: usize,
    h: usize,
    vocab: usize,
    tg: &Targets<T>,
    teacher: Option<&Teacher>,
    logits: &mut [T],
    mut grad: Option<(&mut [T], &mut [T])>,
    mut nll: Option<&mut [T]>,
) -> f64 {
    let chunk = (logits.len() / vocab).max(1);
    let mut total = 0f64;
    let mut r0 = 0;
    while r0 < rows {
        let n = chunk.min(rows - r0);
        let lg = &mut logits[..n * vocab];
        mm_nt(lg, &x[r0 * h..(r0 + n) * h], e, n, vocab, h, false);
        let want_grad = grad.is_some();
        let losses: Vec<(f64, f64)> = lg
            .par_chunks_mut(vocab)
            .enumerate()
            .map(|(i, row)| {
                let r = r0 + i;
                let w = tg.weights[r];
                let y = tg.ids[r] as usize;
                if teacher.is_none() {
                    // Plain CE: one exp per logit, the softmax left in place for the gradient.
                    let zy = row[y];
                    let mx = row.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                    for z in row.iter_mut() {
                        *z = (*z - mx).fast_exp();
                    }
                    let sum: T = row.iter().copied().sum();
                    let row_nll = (mx + sum.ln() - zy).to_f64().unwrap_or(f64::NAN);
                    if want_grad {
                        let c = w / sum;
                        for z in row.iter_mut() {
                            *z *= c;
                        }
                        row[y] -= w;
                    }
                    return (w.to_f64().unwrap_or(0.0) * row_nll, row_nll);
                }
                let mx = row.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                let sum: T = row.iter().map(|&z| (z - mx).exp()).sum();
                let lse = mx + sum.ln();
                let row_nll = (lse - row[y]).to_f64().unwrap_or(f64::NAN);
                let mut loss = w.to_f64().unwrap_or(0.0) * row_nll;
                let mut kl_part = None;
                if let Some(te) = teacher {
                    // KL(p_T ‖ q_S,τ) over the teacher's top-k (renormalised), per row.
                    let tau = te.temperature;
                    let ids = &te.ids[r * te.k..(r + 1) * te.k];
                    let lp = &te.logp[r * te.k..(r + 1) * te.k];
                    let tmx = lp.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64 / tau));
                    let tz: f64 = lp.iter().map(|&l| (l as f64 / tau - tmx).exp()).sum();
                    let pt: Vec<f64> = lp.iter().map(|&l| (l as f64 / tau - tmx).exp() / tz).collect();
                    let smx = row.iter().fold(T::neg_infinity(), |a, &b| a.max(b)).to_f64().unwrap() / tau;
                    let sz: f64 = row.iter().map(|&z| (z.to_f64().unwrap() / tau - smx).exp()).sum();
                    let slse = smx + sz.ln();
                    let mut kl = 0.0;
                    for (j, &id) in ids.iter().enumerate() {
                        if pt[j] > 0.0 {
                            kl += pt[j] * (pt[j].ln() - (row[id as usize].to_f64().unwrap() / tau - slse));
                        }
                    }
                    let wk = w.to_f64().unwrap_or(0.0) * (1.0 - te.alpha) * tau * tau;
                    loss = te.alpha * loss + wk * kl;
                    kl_part = Some((slse, pt, wk));
                }
                if want_grad {
                    let wce = match teacher {
                        Some(te) => w * T::of(te.alpha),
                        None => w,
                    };
                    let inv = T::one() / sum;
                    match &kl_part {
                        None => {
                            for z in row.iter_mut() {
                                *z = wce * (*z - mx).exp() * inv;
                            }
                        }
                        Some((slse, _, wk)) => {
                            let tau = teacher.unwrap().temperature;
                            // d/dz of wk·KL = wk/τ · (softmax(z/τ) − p_T)
                            let c = wk / tau;
                            for z in row.iter_mut() {
                                let zf = z.to_f64().unwrap();
                                let qs = (zf / tau - slse).exp();
                                *z = wce * (*z - mx).exp() * inv + T::of(c * qs);
                            }
                        }
                    }
                    row[y] -= wce;
                    if let (Some(te), Some((_, pt, wk))) = (teacher, &kl_part) {
                        let c = wk / te.temperature;
                        for (j, &id) in te.ids[r * te.k..(r + 1) * te.k].iter().enumerate() {
                            row[id as usize] -= T::of(c * pt[j]);
                        }
                    }
                }
                (loss, row_nll)
            })
            .collect();
        for (i, (l, rn)) in losses.iter().enumerate() {
            total += l;
            if let Some(out) = nll.as_deref_mut() {
                out[r0 + i] = T::of(*rn);
            }
        }
        if let Some((dx, de)) = grad.as_mut() {
            mm_nn(&mut dx[r0 * h..(r0 + n) * h], lg, e, n, h, vocab, false);
            mm_tn(de, lg, &x[r0 * h..(r0 + n) * h], vocab, h, n, true);
        }
        r0 += n;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: impl Fn(usize, usize) -> f64, b: impl Fn(usize, usize) -> f64) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e30) < 1e-37 && exp_f32(-1e30) >= 0.0);
    }

    /// The three matmul forms against a naive triple loop, on shapes that take the
    /// single-threaded path, the row-split path and the column-split path, with accumulation.
    #[test]
    fn matmuls_match_naive() {
        for &(m, n, k) in &[(3, 5, 7), (300, 70, 40), (40, 300, 70), (129, 257, 33)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
            let b: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.1).collect();
            let init: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
            let check = |got: &[f32], want: &[f64], what: &str| {
                for (g, w) in got.iter().zip(want) {
                    assert!((*g as f64 - w).abs() < 1e-3, "{what} {m}x{n}x{k}: {g} vs {w}");
                }
            };
            // nt: a (m,k), b (n,k)
            let want = naive(m, n, k, |i, p| a[i * k + p] as f64, |p, j| b[j * k + p] as f64);
            let mut c = init.clone();
            mm_nt(&mut c, &a, &b, m, n, k, true);
            let want_acc: Vec<f64> = want.iter().zip(&init).map(|(w, i)| w + *i as f64).collect();
            check(&c, &want_acc, "nt");
            // nn: a (m,k), b (k,n)
            let want = naive(m, n, k, |i, p| a[i * k + p] as f64, |p, j| b[p * n + j] as f64);
            let mut c = init.clone();
            mm_nn(&mut c, &a, &b, m, n, k, false);
            check(&c, &want, "nn");
            // tn: a (k,m), b (k,n)
            let want = naive(m, n, k, |i, p| a[p * m + i] as f64, |p, j| b[p * n + j] as f64);
            let mut c = init.clone();
            mm_tn(&mut c, &a, &b, m, n, k, false);
            check(&c, &want, "tn");
            // gram: xᵀx of a (m rows, k columns), symmetric
            let want = naive(k, k, m, |i, p| a[p * k + i] as f64, |p, j| a[p * k + j] as f64);
            let mut g = vec![f32::NAN; k * k];
            gram(&mut g, &a, m, k);
            check(&g, &want, "gram");
            assert!((0..k).all(|i| (0..k).all(|j| g[i * k + j] == g[j * k + i])), "gram not symmetric");
        }
        // Several 128-blocks, a partial last block.
        let (n, d) = (37, 300);
        let x: Vec<f32> = (0..n * d).map(|i| ((i * 7 % 17) as f32 - 8.0) * 0.05).collect();
        let want = naive(d, d, n, |i, p| x[p * d + i] as f64, |p, j| x[p * d + j] as f64);
        let mut g = vec![f32::NAN; d * d];
        gram(&mut g, &x, n, d);
        for (got, w) in g.iter().zip(&want) {
            assert!((*got as f64 - w).abs() < 1e-3, "gram {n}x{d}: {got} vs {w}");
        }
    }
}
