//! Gene matrices and their alignment to a source FFN matrix (Sec. 3.1; design.md).
//!
//! The paper, function by function (equation numbers as docs/design.md gives them; where it
//! gives none, the section):
//!
//! | paper | here |
//! |---|---|
//! | f_c, Eq. (1)-(2); its index form, Eq. (10)-(14) | [`compress`], [`Layout::padded_index`] |
//! | f_d, Eq. (3); its index form, Eq. (10)-(14) | [`decompress`], [`Layout::chunk_row`] |
//! | `x̃ = f_d(M f_c(x))`, Eq. (1)-(3) | [`gene_apply`] |
//! | L_out, Sec. 3.1 (no equation number in design.md) | [`OutputAlignment::loss_grad`] |
//! | L_spec, Sec. 3.1 (no equation number in design.md) | [`SpectralAlignment::loss_grad`] |
//! | L_align = L_out + λ L_spec, Sec. 3.1 (no equation number in design.md) | [`crate::extract::align_with`] |
//! | r from the M/W ratio, Table 5 | [`rank_for_ratio`] |
//!
//! A gene `M ∈ R^{r×r}` stands in for `W ∈ R^{d_out×d_in}` through compression `f_c` (split
//! the tail-padded input into `n` chunks of `r`) and decompression `f_d` (concatenate
//! `M x^(i)`, truncate or tile to `d_out`). Output alignment is quadratic in `M` and depends
//! on the data only through `S = Σ x xᵀ / N`, so it is solved exactly from calibration
//! statistics (design.md "Output alignment, exactly"); spectral alignment matches the log
//! singular values of `M` to the top-r of `W`.

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

use serde::{Deserialize, Serialize};

use crate::error::{MasaError, Result};

/// Shapes of f_c / f_d for one (W, r) pair. Eq. (1)-(3), (10)-(14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub d_in: usize,
    pub d_out: usize,
    pub r: usize,
    /// Number of chunks, `ceil(d_in / r)`.
    pub n: usize,
    /// Entries duplicated from the tail, `n·r − d_in`.
    pub pad: usize,
}

impl Layout {
    pub fn new(d_out: usize, d_in: usize, r: usize) -> Result<Self> {
        if r == 0 || r > d_in.min(d_out) {
            return Err(MasaError::Invalid(format!(
                "gene rank r = {r} must be in 1..={} for a {d_out}x{d_in} matrix (W has only min(d_out, d_in) singular values)",
                d_in.min(d_out)
            )));
        }
        let n = d_in.div_ceil(r);
        Ok(Layout { d_in, d_out, r, n, pad: n * r - d_in })
    }

    /// Source index of padded coordinate `j` of `x̄ = [x ; x[d_in−pad..d_in]]`: the tail
    /// padding of f_c, Eq. (10)-(14) (design.md "Compression f_c and decompression f_d").
    pub fn padded_index(&self, j: usize) -> usize {
        if j < self.d_in {
            j
        } else {
            j - self.pad
        }
    }

    /// Output coordinate `p` reads chunk `i(p)` through row `a(p)` of M: `s = p mod nr`,
    /// `i = s div r`, `a = s mod r`. The truncate-or-tile of f_d as an index map, Eq. (10)-(14)
    /// (design.md "Compression f_c and decompression f_d").
    pub fn chunk_row(&self, p: usize) -> (usize, usize) {
        let s = p % (self.n * self.r);
        (s / self.r, s % self.r)
    }
}

/// How the gene rank is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankSpec {
    Rank(usize),
    /// `r = round(sqrt(ρ d_in d_out))`.
    Ratio(f64),
}

impl RankSpec {
    /// `--rank r` (r ≥ 1) or else `--ratio ρ` (ρ in (0, 1]); neither: `None`.
    pub fn from_options(rank: Option<usize>, ratio: Option<f64>) -> crate::Result<Option<RankSpec>> {
        match (rank, ratio) {
            (Some(r), _) => crate::limits::count("--rank", r, usize::MAX, "").map(|_| Some(RankSpec::Rank(r))),
            (None, Some(rho)) => crate::limits::ratio("--ratio", rho).map(|_| Some(RankSpec::Ratio(rho))),
            (None, None) => Ok(None),
        }
    }

    pub fn rank(&self, d_out: usize, d_in: usize) -> usize {
        match *self {
            RankSpec::Rank(r) => r,
            RankSpec::Ratio(rho) => rank_for_ratio(rho, d_out, d_in),
        }
    }
}

/// `r = round(sqrt(ρ · d_in · d_out))`: the M/W ratio of Table 5 read as parameter share
/// (design.md "Gene matrix set G_M").
pub fn rank_for_ratio(ratio: f64, d_out: usize, d_in: usize) -> usize {
    (ratio * d_in as f64 * d_out as f64).sqrt().round() as usize
}

/// f_c: the `n` chunks of the tail-padded input. Eq. (1)-(2).
pub fn compress(x: &[f64], l: &Layout) -> Vec<Vec<f64>> {
    (0..l.n).map(|i| (0..l.r).map(|c| x[l.padded_index(i * l.r + c)]).collect()).collect()
}

/// f_d: concatenate `z_i = M x^(i)` and truncate (`nr ≥ d_out`) or tile (`nr < d_out`). Eq. (3).
pub fn decompress(z: &[Vec<f64>], l: &Layout) -> Vec<f64> {
    (0..l.d_out)
        .map(|p| {
            let (i, a) = l.chunk_row(p);
            z[i][a]
        })
        .collect()
}

/// `x̃ = f_d(M f_c(x))` for one input vector, Eq. (1)-(3); `m` row-major `r×r`.
pub fn gene_apply(m: &[f64], x: &[f64], l: &Layout) -> Vec<f64> {
    let z: Vec<Vec<f64>> =
        compress(x, l).iter().map(|chunk| (0..l.r).map(|a| (0..l.r).map(|c| m[a * l.r + c] * chunk[c]).sum()).collect()).collect();
    decompress(&z, l)
}

/// The output-alignment objective L_out for one W (Sec. 3.1; design.md gives no equation
/// number), in its exact quadratic form (design.md "Output alignment, exactly"):
/// `L_out(M) = (tr(W S Wᵀ) − 2 Σ_a m_aᵀ b_a + Σ_a m_aᵀ A_a m_a) / d_out` with
/// `A_a = Σ_i c_{a,i} S_ii` (S_ii the i-th diagonal r×r block of the padded moment, c_{a,i} how
/// many output coordinates read chunk i through row a) and `b_a = Σ_{p: a(p)=a} S̄_{i(p)} w_p`.
pub struct OutputAlignment {
    pub layout: Layout,
    /// The gene rows grouped by their chunk counts `c_{a,·}`, with the one `A_a` the rows of a
    /// group share. [`Layout::chunk_row`] gives every row `q` or `q + 1` readers per chunk, with
    /// the `+1` on a prefix of chunks whose length takes at most two values, so there are at
    /// most two groups: `L_out` and its gradient cost one r×r×r product, however many chunks.
    systems: Vec<(Vec<usize>, Mat<f64>)>,
    /// Row a is `b_a`.
    b: Mat<f64>,
    /// `tr(W S Wᵀ)`.
    pub trace_wsw: f64,
}

impl OutputAlignment {
    /// `w`: row-major `d_out×d_in`; `s`: row-major `d_in×d_in` mean second moment.
    pub fn new(w: &[f32], s: &[f64], layout: Layout) -> Self {
        let l = layout;
        let (d_in, r, n) = (l.d_in, l.r, l.n);
        let s_at = |i: usize, j: usize| s[i * d_in + j];
        let blocks: Vec<Mat<f64>> =
            (0..n).map(|i| Mat::from_fn(r, r, |u, v| s_at(l.padded_index(i * r + u), l.padded_index(i * r + v)))).collect();
        // b_a: for each chunk i, S̄_i = S[idx_i, :] (r×d_in) times the rows of W read through it.
        let mut b = Mat::<f64>::zeros(r, r);
        let wmat = Mat::from_fn(l.d_out, d_in, |p, j| w[p * d_in + j] as f64);
        for i in 0..n {
            let rows: Vec<usize> = (0..l.d_out).filter(|&p| l.chunk_row(p).0 == i).collect();
            if rows.is_empty() {
                continue;
            }
            let s_i = Mat::from_fn(r, d_in, |u, j| s_at(l.padded_index(i * r + u), j));
            let w_i = Mat::from_fn(d_in, rows.len(), |j, k| wmat[(rows[k], j)]);
            let sw = &s_i * &w_i;
            for (k, &p) in rows.iter().enumerate() {
                let a = l.chunk_row(p).1;
                for u in 0..r {
                    b[(a, u)] += sw[(u, k)];
                }
            }
        }
        let smat = Mat::from_fn(d_in, d_in, s_at);
        let ws = &wmat * &smat;
        let mut trace_wsw = 0.0;
        for p in 0..l.d_out {
            for j in 0..d_in {
                trace_wsw += ws[(p, j)] * wmat[(p, j)];
            }
        }
        OutputAlignment { layout, systems: systems(&blocks, layout), b, trace_wsw }
    }

    /// From rank-specific statistics (means over tokens): the chunk blocks `S_ii`, the cross
    /// moments (`cross[u][p] = E[x^(i(p))_u y_p]`, r × d_out row-major) and `E‖y‖²`. Equals
    /// [`OutputAlignment::new`] on the full moment of the same tokens.
    pub fn from_rank_stats(blocks: Vec<Mat<f64>>, cross: &[f64], mean_ysq: f64, layout: Layout) -> Self {
        let (r, d_out) = (layout.r, layout.d_out);
        let mut b = Mat::<f64>::zeros(r, r);
        for p in 0..d_out {
            let (_, a) = layout.chunk_row(p);
            for u in 0..r {
                b[(a, u)] += cross[u * d_out + p];
            }
        }
        OutputAlignment { layout, systems: systems(&blocks, layout), b, trace_wsw: mean_ysq }
    }

    /// Row a of the result is `A_a m_a` (as a row: `m_aᵀ A_a`, A_a symmetric).
    fn a_times(&self, m: &Mat<f64>) -> Mat<f64> {
        let r = self.layout.r;
        let mut out = Mat::<f64>::zeros(r, r);
        for (rows, a_mat) in &self.systems {
            let prod = Mat::from_fn(rows.len(), r, |k, u| m[(rows[k], u)]) * a_mat;
            for (k, &a) in rows.iter().enumerate() {
                for u in 0..r {
                    out[(a, u)] = prod[(k, u)];
                }
            }
        }
        out
    }

    /// `L_out(M)` (Sec. 3.1; no equation number in design.md) and its gradient
    /// `2 (A_a m_a − b_a) / d_out` (row a).
    pub fn loss_grad(&self, m: &Mat<f64>) -> (f64, Mat<f64>) {
        let am = self.a_times(m);
        let r = self.layout.r;
        let d_out = self.layout.d_out as f64;
        let (mut quad, mut lin) = (0.0, 0.0);
        let mut g = Mat::<f64>::zeros(r, r);
        for a in 0..r {
            for u in 0..r {
                quad += m[(a, u)] * am[(a, u)];
                lin += m[(a, u)] * self.b[(a, u)];
                g[(a, u)] = 2.0 * (am[(a, u)] - self.b[(a, u)]) / d_out;
            }
        }
        ((self.trace_wsw - 2.0 * lin + quad) / d_out, g)
    }

    /// The output-only optimum `m_a = (A_a + εI)⁻¹ b_a`, `ε = ridge · tr(A_a)/r`: one Cholesky
    /// factorisation per group of rows sharing `A_a`.
    pub fn closed_form(&self, ridge: f64) -> Result<Mat<f64>> {
        let r = self.layout.r;
        let mut m = Mat::<f64>::zeros(r, r);
        for (rows, a) in &self.systems {
            let mut a_mat = a.clone();
            let tr: f64 = (0..r).map(|u| a_mat[(u, u)]).sum();
            let eps = ridge * (tr / r as f64).max(f64::MIN_POSITIVE);
            for u in 0..r {
                a_mat[(u, u)] += eps;
            }
            let llt = a_mat
                .llt(Side::Lower)
                .map_err(|e| MasaError::Invalid(format!("output alignment system is not positive definite ({e:?}) at gene rank {r}: the statistics are empty or hold fewer tokens than r (the sums are then singular up to f32 rounding); calibrate on more tokens than r")))?;
            let rhs = Mat::from_fn(r, rows.len(), |u, k| self.b[(rows[k], u)]);
            let sol = llt.solve(&rhs);
            for (k, &a) in rows.iter().enumerate() {
                for u in 0..r {
                    m[(a, u)] = sol[(u, k)];
                }
            }
        }
        Ok(m)
    }
}

/// The gene rows grouped by their chunk counts `c_{a,i}` (how many output coordinates read
/// chunk i through row a, [`Layout::chunk_row`]), each group with its `A = Σ_i c_{a,i} S_ii`.
fn systems(blocks: &[Mat<f64>], layout: Layout) -> Vec<(Vec<usize>, Mat<f64>)> {
    let (r, n) = (layout.r, layout.n);
    let mut counts = vec![vec![0.0; n]; r];
    for p in 0..layout.d_out {
        let (i, a) = layout.chunk_row(p);
        counts[a][i] += 1.0;
    }
    let mut groups: Vec<(Vec<f64>, Vec<usize>)> = Vec::new();
    for (a, c) in counts.into_iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| *g == c) {
            Some((_, rows)) => rows.push(a),
            None => groups.push((c, vec![a])),
        }
    }
    groups
        .into_iter()
        .map(|(c, rows)| {
            let mut a_mat = Mat::<f64>::zeros(r, r);
            for (block, &ci) in blocks.iter().zip(&c) {
                if ci != 0.0 {
                    a_mat += block * faer::Scale(ci);
                }
            }
            (rows, a_mat)
        })
        .collect()
}

/// Spectral alignment L_spec (Sec. 3.1; design.md "Spectral alignment" gives no equation
/// number): `L_spec = Σ_i (log σ_i − log σ'_i)²` between the top-r singular values of W and
/// those of M, gradient `Σ_i 2 (log σ'_i − log σ_i)/σ'_i · u'_i v'_iᵀ`.
///
/// M's spectrum comes from the symmetric eigendecomposition `MᵀM = V' Λ V'ᵀ` (σ'² = λ) rather
/// than an SVD, and since `u'_i = M v'_i / σ'_i` the gradient is `M · V' diag(2 (log σ'_i −
/// log σ_i)/σ'_i²) V'ᵀ`: no left singular vectors. At r = 2324 that is 2.2 s instead of 5.0 s
/// per evaluation (2 threads). Squaring loses accuracy only in singular values below ~1e-8 of
/// the largest (relative error ε·(σ'_max/σ'_i)²), far from any gene's spectrum; a test checks
/// loss and gradient against the SVD.
pub struct SpectralAlignment {
    pub log_sigma: Vec<f64>,
}

/// Smallest singular value of M used in logs and divisions.
const SIGMA_FLOOR: f64 = 1e-12;

impl SpectralAlignment {
    pub fn new(w_singular_values: &[f64], r: usize) -> Self {
        SpectralAlignment { log_sigma: w_singular_values[..r].iter().map(|s| s.max(SIGMA_FLOOR).ln()).collect() }
    }

    /// `(log σ'_i − log σ_i)` for M's singular values in descending order.
    fn log_ratios(&self, eigenvalues_ascending: impl DoubleEndedIterator<Item = f64>) -> Vec<f64> {
        eigenvalues_ascending.rev().zip(&self.log_sigma).map(|(l, ls)| 0.5 * l.max(SIGMA_FLOOR * SIGMA_FLOOR).ln() - ls).collect()
    }

    pub fn loss(&self, m: &Mat<f64>) -> Result<f64> {
        let lam = (m.transpose() * m)
            .self_adjoint_eigenvalues(Side::Lower)
            .map_err(|e| MasaError::Invalid(format!("eigenvalues of a gene's MᵀM failed: {e:?}")))?;
        Ok(self.log_ratios(lam.into_iter()).iter().map(|d| d * d).sum())
    }

    pub fn loss_grad(&self, m: &Mat<f64>) -> Result<(f64, Mat<f64>)> {
        let eig = (m.transpose() * m)
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| MasaError::Invalid(format!("eigendecomposition of a gene's MᵀM failed: {e:?}")))?;
        let (v, lam) = (eig.U(), eig.S().column_vector());
        let r = m.nrows();
        // Ascending eigenvalues: column j of V' pairs with singular value r − 1 − j.
        let diff = self.log_ratios((0..r).map(|j| lam[j]));
        let coef: Vec<f64> = (0..r).map(|j| 2.0 * diff[r - 1 - j] / lam[j].max(SIGMA_FLOOR * SIGMA_FLOOR)).collect();
        let vc = Mat::from_fn(r, r, |a, j| v[(a, j)] * coef[j]);
        Ok((diff.iter().map(|d| d * d).sum(), m * (vc * v.transpose())))
    }
}

/// Singular values of `m`, descending: square roots of the eigenvalues of the Gram matrix of
/// its smaller side (`m mᵀ` or `mᵀ m`, one matrix product and a symmetric eigenproblem of
/// size min(rows, cols)), about twice as fast as an SVD at OLMo-7B's 4096×11008. Values
/// below ~1e-8 of the largest lose accuracy to the squaring (relative error ε·(σ_max/σ)²);
/// a test checks agreement with the SVD.
pub fn singular_values(m: &Mat<f64>) -> Result<Vec<f64>> {
    let gram = if m.nrows() <= m.ncols() { m * m.transpose() } else { m.transpose() * m };
    let lam = gram
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| MasaError::Invalid(format!("eigenvalues of a {}x{} Gram matrix failed: {e:?}", gram.nrows(), gram.ncols())))?;
    Ok(lam.into_iter().rev().map(|l| l.max(0.0).sqrt()).collect())
}

/// Minimise a smooth function with L-BFGS (memory `hist`) and a backtracking Armijo line
/// search, until the relative decrease over `patience` iterations is below `tol` or
/// `max_iter` is reached. Returns the minimiser and the iteration count.
pub fn lbfgs(x0: Vec<f64>, mut f: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>)>, max_iter: usize, tol: f64) -> Result<(Vec<f64>, usize)> {
    const HIST: usize = 8;
    const PATIENCE: usize = 5;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut x = x0;
    let (mut fx, mut g) = f(&x)?;
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let mut recent = vec![fx];
    let mut iters = 0;
    while iters < max_iter {
        iters += 1;
        // Two-loop recursion for the search direction d = −H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(s_hist.len());
        for (s, y) in s_hist.iter().zip(&y_hist).rev() {
            let rho = 1.0 / dot(y, s);
            let alpha = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= alpha * yi);
            alphas.push((alpha, rho));
        }
        if let (Some(s), Some(y)) = (s_hist.last(), y_hist.last()) {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|v| *v *= gamma);
        } else {
            let gn = dot(&g, &g).sqrt().max(1e-300);
            let xn = dot(&x, &x).sqrt().max(1.0);
            q.iter_mut().for_each(|v| *v *= 1e-3 * xn / gn);
        }
        for ((s, y), (alpha, rho)) in s_hist.iter().zip(&y_hist).zip(alphas.into_iter().rev()) {
            let beta = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (alpha - beta) * si);
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            // Not a descent direction: restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            d = g.iter().map(|v| -v).collect();
            slope = -dot(&g, &g);
        }
        let mut step = 1.0;
        let mut accepted = None;
        for _ in 0..40 {
            let xn: Vec<f64> = x.iter().zip(&d).map(|(xi, di)| xi + step * di).collect();
            let (fn_, gn) = f(&xn)?;
            if fn_.is_finite() && fn_ <= fx + 1e-4 * step * slope {
                accepted = Some((xn, fn_, gn));
                break;
            }
            step *= 0.5;
        }
        let Some((xn, fn_, gn)) = accepted else { break };
        let s: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = gn.iter().zip(&g).map(|(a, b)| a - b).collect();
        if dot(&s, &y) > 1e-12 * dot(&y, &y).sqrt() * dot(&s, &s).sqrt() {
            s_hist.push(s);
            y_hist.push(y);
            if s_hist.len() > HIST {
                s_hist.remove(0);
                y_hist.remove(0);
            }
        }
        x = xn;
        fx = fn_;
        g = gn;
        recent.push(fx);
        if recent.len() > PATIENCE {
            let old = recent[recent.len() - 1 - PATIENCE];
            if (old - fx) <= tol * old.abs().max(1e-300) {
                break;
            }
        }
    }
    Ok((x, iters))
}

/// Row-major `Vec` <-> faer matrix.
pub fn to_mat(v: &[f64], r: usize) -> Mat<f64> {
    Mat::from_fn(r, r, |a, b| v[a * r + b])
}

pub fn from_mat(m: &Mat<f64>) -> Vec<f64> {
    let (rows, cols) = (m.nrows(), m.ncols());
    (0..rows * cols).map(|k| m[(k / cols, k % cols)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout groups the gene rows into at most two systems (the bound the cost of
    /// `OutputAlignment` relies on), and the groups partition the rows.
    #[test]
    fn gene_rows_fall_into_at_most_two_systems() {
        for (d_out, d_in) in [(7, 10), (10, 7), (576, 1536), (1536, 576), (4096, 11008), (11008, 4096), (5, 5), (100, 3)] {
            for r in [1, 2, 3, 5, 64, 634, 2324].into_iter().filter(|&r| r <= d_out.min(d_in)) {
                let l = Layout::new(d_out, d_in, r).unwrap();
                let blocks = vec![Mat::<f64>::zeros(r, r); l.n];
                let sys = systems(&blocks, l);
                assert!(sys.len() <= 2, "{d_out}x{d_in} r={r}: {} groups", sys.len());
                let mut rows: Vec<usize> = sys.iter().flat_map(|(rows, _)| rows.clone()).collect();
                rows.sort();
                assert_eq!(rows, (0..r).collect::<Vec<_>>());
            }
        }
    }
}
