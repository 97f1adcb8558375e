//! Adaptive scaling (Sec. 3.2; design.md "Adaptive scaling"): a gene `M ∈ R^{r×r}` becomes a
//! student matrix `M̂ ∈ R^{p×q}` through its SVD. Rows and columns are scored by the norms of
//! their singular-vector coordinates, the best are kept (compression) or replicated cyclically
//! (expansion), and `M̂ = U_p Σ_{r'} V_qᵀ`. (The "w/o adaptive scaling" ablation, `naive`, is
//! placed by `masa init` itself.)
//!
//! design.md gives the equations of Sec. 3.2 no numbers, so the functions cite the section:
//! SVD [`gene_svd`], scores [`row_scores`], selection [`select_rows`] and composition
//! [`compose`], which `masa init` (`init::gene_ffn`) calls per gene. Beyond the paper: the
//! separation of repeated neurons ([`repeated_neurons`], [`separate`]) and the `masa-rotated`
//! control ([`rotate`]).

use faer::Mat;

use crate::error::{MasaError, Result};

/// `M = U Σ Vᵀ`, truncated to the `r'` leading components.
pub struct GeneSvd {
    /// `r × r'`.
    pub u: Mat<f64>,
    pub sigma: Vec<f64>,
    /// `r × r'`.
    pub v: Mat<f64>,
}

/// `r'` of Sec. 3.2, "the number of principal components retained" (the paper gives no
/// value; design.md "Adaptive scaling"): all `r` (then every row score is 1 and `M̂` is a
/// submatrix of `M`), a fixed count, or the smallest count whose singular values hold a
/// fraction of `Σσ²` (chosen per gene). Written `all`, `64`, `energy:0.9`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Components {
    All,
    Rank(usize),
    Energy(f64),
}

impl Components {
    /// A count capped at the gene's rank `r`: how every r' reaches a gene
    /// ([`crate::init::InitOptions::components_for`]); [`gene_svd`] itself refuses a count
    /// beyond the rank.
    pub fn capped(self, r: usize) -> Components {
        match self {
            Components::Rank(k) => Components::Rank(k.min(r)),
            c => c,
        }
    }

    /// `r'` for a gene with singular values `sigma` (descending).
    pub fn count(self, sigma: &[f64]) -> Result<usize> {
        let r = sigma.len();
        match self {
            Components::All => Ok(r),
            Components::Rank(k) if (1..=r).contains(&k) => Ok(k),
            Components::Rank(k) => Err(MasaError::Invalid(format!("--components {k} must be in 1..={r} (the gene rank r)"))),
            Components::Energy(e) => {
                let total: f64 = sigma.iter().map(|s| s * s).sum();
                let mut acc = 0.0;
                for (k, s) in sigma.iter().enumerate() {
                    acc += s * s;
                    if acc >= e * total {
                        return Ok(k + 1);
                    }
                }
                Ok(r)
            }
        }
    }
}

impl std::str::FromStr for Components {
    type Err = MasaError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || MasaError::Invalid(format!("components `{s}`: expected `all`, a count ≥ 1, or `energy:F` with F in (0, 1]"));
        if s == "all" {
            return Ok(Components::All);
        }
        if let Some(f) = s.strip_prefix("energy:") {
            let e: f64 = f.parse().map_err(|_| bad())?;
            return if e > 0.0 && e <= 1.0 { Ok(Components::Energy(e)) } else { Err(bad()) };
        }
        match s.parse::<usize>() {
            Ok(k) if k >= 1 => Ok(Components::Rank(k)),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Components {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Components::All => f.write_str("all"),
            Components::Rank(k) => write!(f, "{k}"),
            Components::Energy(e) => write!(f, "energy:{e}"),
        }
    }
}

/// Records and spec files: a count as a number (as `--components N` always was), the rest as
/// their string form.
impl serde::Serialize for Components {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Components::Rank(k) => s.serialize_u64(*k as u64),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Components {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(k) => format!("{k}").parse(),
            Raw::S(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// Sec. 3.2: `M = U Σ Vᵀ`, keeping `r'` components ([`Components`]).
pub fn gene_svd(m: &Mat<f64>, components: Components) -> Result<GeneSvd> {
    let r = m.nrows();
    let svd = m.thin_svd().map_err(|e| MasaError::Invalid(format!("SVD of a gene matrix failed: {e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let rp = components.count(&(0..r).map(|k| s[k]).collect::<Vec<_>>())?;
    Ok(GeneSvd {
        u: Mat::from_fn(r, rp, |i, k| u[(i, k)]),
        sigma: (0..rp).map(|k| s[k]).collect(),
        v: Mat::from_fn(r, rp, |j, k| v[(j, k)]),
    })
}

/// Row scores `s_i = ‖U[i, :r']‖₂` (Sec. 3.2); with V, the column scores `t_j = ‖V[j, :r']‖₂`.
pub fn row_scores(u: &Mat<f64>) -> Vec<f64> {
    (0..u.nrows()).map(|i| (0..u.ncols()).map(|k| u[(i, k)] * u[(i, k)]).sum::<f64>().sqrt()).collect()
}

/// Indices by descending score, ties to the lower index.
pub fn ranking(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx
}

/// Which `p` of the `r` rows make the target (Sec. 3.2; design.md "Adaptive scaling"): `p ≤ r`
/// keeps the `p` highest-scoring rows in their original order (compression); `p > r` keeps all
/// `r` and appends the highest scoring rows again, cycling through the ranking, until there
/// are `p` (expansion: the paper's rule for `p − r ≤ r`, cycled beyond it). A neuron that this
/// makes a copy of another is separated afterwards ([`repeated_neurons`], [`separate`]).
pub fn select_rows(scores: &[f64], p: usize) -> Vec<usize> {
    let r = scores.len();
    let rank = ranking(scores);
    if p <= r {
        let mut keep = rank[..p].to_vec();
        keep.sort_unstable();
        keep
    } else {
        (0..r).chain((0..p - r).map(|k| rank[k % r])).collect()
    }
}

/// `M̂ = U_p Σ_{r'} V_qᵀ` (Sec. 3.2), row-major `p × q`, from the selected rows of U (`rows`)
/// and of V (`cols`): adaptive scaling of one gene once its selections are made
/// ([`select_rows`]; `--coupled` shares one selection of the intermediate dimension,
/// [`coupled_scores`]; the hybrid takes the columns its inherited hidden channels fold to).
pub fn compose(svd: &GeneSvd, rows: &[usize], cols: &[usize]) -> Vec<f64> {
    let rp = svd.sigma.len();
    let us = Mat::from_fn(rows.len(), rp, |i, k| svd.u[(rows[i], k)] * svd.sigma[k]);
    let vq = Mat::from_fn(rp, cols.len(), |k, j| svd.v[(cols[j], k)]);
    let m = &us * &vq;
    let q = cols.len();
    (0..rows.len() * q).map(|x| m[(x / q, x % q)]).collect()
}

/// The neurons of an FFN whose gate row, up row and down column come from the same gene rows
/// as an earlier neuron's: `selections` holds, per matrix, the gene row each neuron takes
/// (gate's and up's rows of U, down's rows of V). Expansion past `2r` (and `--coupled`
/// expansion at any width) makes such copies; they would receive identical gradients and
/// never separate.
pub fn repeated_neurons(selections: &[&[usize]]) -> Vec<bool> {
    let n = selections.first().map_or(0, |s| s.len());
    let mut seen = std::collections::HashSet::new();
    (0..n).map(|i| !seen.insert(selections.iter().map(|s| s[i]).collect::<Vec<_>>())).collect()
}

/// masa's extension beyond the paper (design.md "Adaptive scaling"): the weights `v` of a
/// repeated neuron (its gate row, up row or down column) become
/// `sqrt(1 − a²) · v + a · rms(v) · z` with `z ~ N(0, I)` (`noise`, seeded per neuron and
/// matrix): the same expected norm, cosine ≈ `sqrt(1 − a²)` to the original. `a` is
/// `--replica-noise` ([`DEFAULT_REPLICA_NOISE`], in (0, 1]; 1 keeps only the norm).
pub fn separate(v: &mut [f64], a: f64, noise: &[f32]) {
    let rms = (v.iter().map(|x| x * x).sum::<f64>() / v.len().max(1) as f64).sqrt();
    let keep = (1.0 - a * a).max(0.0).sqrt();
    for (x, z) in v.iter_mut().zip(noise) {
        *x = keep * *x + a * rms * *z as f64;
    }
}

/// `--replica-noise` when not given: the lowest training loss of 0.02, 0.5 and 1.0 on tuning
/// seeds (docs/scaling.md "Repeated neurons", `results/replica-noise/`).
pub const DEFAULT_REPLICA_NOISE: f64 = 0.02;

/// A seeded Haar-random orthogonal `r × r` matrix: the Q of the QR factorisation of a Gaussian
/// matrix with its columns' signs fixed by R's diagonal (Mezzadri 2007), so the distribution is
/// uniform over O(r).
pub fn random_orthogonal(r: usize, seed: u64, label: &str) -> Mat<f64> {
    let g = crate::rng::normal(seed, label, r * r, 1.0);
    let qr = Mat::from_fn(r, r, |i, j| g[i * r + j] as f64).qr();
    let (q, rr) = (qr.compute_Q(), qr.R());
    Mat::from_fn(r, r, |i, j| if rr[(j, j)] < 0.0 { -q[(i, j)] } else { q[(i, j)] })
}

/// The `masa-rotated` control (issue 31): `Q₁ M Q₂` with seeded Haar-random orthogonal `Q₁`,
/// `Q₂`: exactly M's singular values (spectrum, rank, norm) with singular vectors that carry no
/// information from the source.
pub fn rotate(m: &Mat<f64>, seed: u64, label: &str) -> Mat<f64> {
    let r = m.nrows();
    let (q1, q2) = (random_orthogonal(r, seed, &format!("{label}.q1")), random_orthogonal(r, seed, &format!("{label}.q2")));
    &(&q1 * m) * &q2
}

/// `--coupled` (design.md "Adaptive scaling", an experiment, not the paper): one score per
/// intermediate neuron `i`, `sqrt(s_gate,i² + s_up,i² + t_down,i²)`, from the row scores of gate's
/// and up's U and the column scores of down's V. `None` when the three genes differ in rank.
pub fn coupled_scores(gate: &GeneSvd, up: &GeneSvd, down: &GeneSvd) -> Option<Vec<f64>> {
    let r = gate.u.nrows();
    if up.u.nrows() != r || down.v.nrows() != r {
        return None;
    }
    let (sg, su, td) = (row_scores(&gate.u), row_scores(&up.u), row_scores(&down.v));
    Some((0..r).map(|i| (sg[i].powi(2) + su[i].powi(2) + td[i].powi(2)).sqrt()).collect())
}

/// With expansion off, a target side longer than the gene rank is an error.
pub fn check_expansion(r: usize, p: usize, q: usize, expand: bool) -> Result<()> {
    if !expand && (p > r || q > r) {
        return Err(MasaError::Invalid(format!(
            "the student needs a {p}x{q} matrix but the genes have rank r = {r}: wider than the genes allow without expansion; \
             use `--expand cyclic` (Sec. 3.2 replication), genes of rank ≥ {}, or a smaller student",
            p.max(q)
        )));
    }
    Ok(())
}

/// `--gene-scale frobenius` (design.md "Init scale"): the factor that brings `x` to the
/// Frobenius norm a Scratch init of `n` entries has in expectation, `std · sqrt(n)`.
pub fn frobenius_factor(x: impl Iterator<Item = f64>, n: usize, std: f64) -> f64 {
    let norm = x.map(|v| v * v).sum::<f64>().sqrt();
    if norm > 0.0 {
        std * (n as f64).sqrt() / norm
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gene(r: usize, seed: u64) -> Mat<f64> {
        let v = crate::rng::normal(seed, "gene", r * r, 1.0);
        Mat::from_fn(r, r, |i, j| v[i * r + j] as f64)
    }

    #[test]
    fn full_rank_identity_selection_gives_m_back() {
        let m = gene(7, 1);
        let svd = gene_svd(&m, Components::All).unwrap();
        let out = compose(&svd, &select_rows(&row_scores(&svd.u), 7), &select_rows(&row_scores(&svd.v), 7));
        for i in 0..7 {
            for j in 0..7 {
                assert!((out[i * 7 + j] - m[(i, j)]).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn compression_keeps_top_rows_in_original_order() {
        let scores = [0.5, 0.9, 0.1, 0.9, 0.3];
        // ranking: 1, 3 (tie → lower index first), 0, 4, 2
        assert_eq!(ranking(&scores), vec![1, 3, 0, 4, 2]);
        assert_eq!(select_rows(&scores, 3), vec![0, 1, 3]);
        assert_eq!(select_rows(&scores, 1), vec![1]);
        assert_eq!(select_rows(&scores, 5), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn expansion_appends_top_rows_cyclically() {
        let scores = [0.5, 0.9, 0.1];
        assert_eq!(select_rows(&scores, 5), vec![0, 1, 2, 1, 0]);
        // p > 2r: cycles through the ranking more than once.
        assert_eq!(select_rows(&scores, 8), vec![0, 1, 2, 1, 0, 2, 1, 0]);
    }

    #[test]
    fn compressed_rows_match_rows_of_m_when_all_components_kept() {
        // With r' = r and all columns, row i of M̂ is row rows[i] of M.
        let m = gene(6, 2);
        let svd = gene_svd(&m, Components::All).unwrap();
        let rows = select_rows(&row_scores(&svd.u), 4);
        let cols: Vec<usize> = (0..6).collect();
        let out = compose(&svd, &rows, &cols);
        for (i, &ri) in rows.iter().enumerate() {
            for j in 0..6 {
                assert!((out[i * 6 + j] - m[(ri, j)]).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn result_has_rank_at_most_components() {
        let m = gene(8, 3);
        let (p, q, rp) = (20, 13, 3);
        let svd = gene_svd(&m, Components::Rank(rp)).unwrap();
        let out = compose(&svd, &select_rows(&row_scores(&svd.u), p), &select_rows(&row_scores(&svd.v), q));
        let mh = Mat::from_fn(p, q, |i, j| out[i * q + j]);
        let s = mh.singular_values().unwrap();
        assert!(s[rp - 1] > 1e-6 * s[0]);
        assert!(s[rp..].iter().all(|&x| x < 1e-9 * s[0]), "{s:?}");
    }

    #[test]
    fn components_beyond_rank_and_expansion_off_are_errors() {
        let m = gene(4, 4);
        assert!(gene_svd(&m, Components::Rank(5)).err().unwrap().to_string().contains("--components"));
        let e = check_expansion(4, 6, 4, false).unwrap_err().to_string();
        assert!(e.contains("without expansion") && e.contains("r = 4"), "{e}");
    }

    #[test]
    fn given_rows_and_columns_make_that_submatrix_at_full_rank() {
        // With r' = r, M̂ is exactly the selected submatrix of M, repeats included.
        let m = gene(5, 5);
        let svd = gene_svd(&m, Components::All).unwrap();
        let (rows, cols) = ([4, 0, 4], [1, 3]);
        let out = compose(&svd, &rows, &cols);
        for (i, &ri) in rows.iter().enumerate() {
            for (j, &cj) in cols.iter().enumerate() {
                assert!((out[i * 2 + j] - m[(ri, cj)]).abs() < 1e-10);
            }
        }
    }

    /// A neuron repeats when all its matrices take the same gene rows as an earlier one; the
    /// separation keeps the expected norm and leaves cosine ≈ sqrt(1 − a²).
    #[test]
    fn repeated_neurons_are_found_and_separated() {
        let (g, u, d) = ([0, 1, 2, 0, 1, 0], [0, 1, 2, 1, 1, 0], [0, 1, 2, 0, 1, 0]);
        assert_eq!(repeated_neurons(&[&g, &u, &d]), vec![false, false, false, false, true, true]);
        let v: Vec<f64> = crate::rng::normal(3, "v", 4096, 1.0).iter().map(|&x| x as f64).collect();
        for a in [0.05, 0.5, 1.0] {
            let mut w = v.clone();
            separate(&mut w, a, &crate::rng::normal(4, "z", 4096, 1.0));
            let dot: f64 = v.iter().zip(&w).map(|(x, y)| x * y).sum();
            let (nv, nw) = (v.iter().map(|x| x * x).sum::<f64>().sqrt(), w.iter().map(|x| x * x).sum::<f64>().sqrt());
            assert!((nw / nv - 1.0).abs() < 0.05, "a = {a}: norm ratio {}", nw / nv);
            assert!((dot / (nv * nw) - (1.0 - a * a).sqrt()).abs() < 0.05, "a = {a}: cosine {}", dot / (nv * nw));
        }
    }

    /// The control keeps the gene's singular values exactly and draws new singular vectors:
    /// Q is orthogonal, different seeds give different rotations.
    #[test]
    fn rotation_keeps_the_spectrum_and_nothing_else() {
        let m = gene(12, 6);
        let q = random_orthogonal(12, 1, "q");
        let qtq = q.transpose() * &q;
        for i in 0..12 {
            for j in 0..12 {
                assert!((qtq[(i, j)] - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        let (a, b) = (rotate(&m, 1, "g"), rotate(&m, 2, "g"));
        let (sm, sa) = (m.singular_values().unwrap(), a.singular_values().unwrap());
        for k in 0..12 {
            assert!((sm[k] - sa[k]).abs() < 1e-10 * sm[0]);
        }
        assert!((0..144).any(|x| (a[(x / 12, x % 12)] - b[(x / 12, x % 12)]).abs() > 1e-3));
        assert!((0..144).any(|x| (a[(x / 12, x % 12)] - m[(x / 12, x % 12)]).abs() > 1e-3));
    }

    #[test]
    fn coupled_scores_add_the_squared_scores_of_the_three_genes() {
        let (g, u, d) = (
            gene_svd(&gene(4, 6), Components::Rank(2)).unwrap(),
            gene_svd(&gene(4, 7), Components::Rank(2)).unwrap(),
            gene_svd(&gene(4, 8), Components::Rank(2)).unwrap(),
        );
        let joint = coupled_scores(&g, &u, &d).unwrap();
        let (sg, su, td) = (row_scores(&g.u), row_scores(&u.u), row_scores(&d.v));
        for i in 0..4 {
            assert!((joint[i] * joint[i] - (sg[i] * sg[i] + su[i] * su[i] + td[i] * td[i])).abs() < 1e-12);
        }
        assert!(coupled_scores(&g, &u, &gene_svd(&gene(3, 9), Components::All).unwrap()).is_none());
    }

    /// `r'` parses from `all`, a count and `energy:F`; the energy rule keeps the fewest leading
    /// components whose σ² reach the fraction; records write a count as a number.
    #[test]
    fn components_parse_count_and_serialise() {
        assert_eq!("all".parse::<Components>().unwrap(), Components::All);
        assert_eq!("64".parse::<Components>().unwrap(), Components::Rank(64));
        assert_eq!("energy:0.9".parse::<Components>().unwrap(), Components::Energy(0.9));
        for bad in ["0", "energy:0", "energy:1.5", "energy:x", "-3", "most"] {
            assert!(bad.parse::<Components>().is_err(), "{bad}");
        }
        let sigma = [4.0, 2.0, 1.0, 1.0]; // σ²: 16, 4, 1, 1 of 22
        assert_eq!(Components::Energy(0.7).count(&sigma).unwrap(), 1);
        assert_eq!(Components::Energy(0.9).count(&sigma).unwrap(), 2);
        assert_eq!(Components::Energy(0.95).count(&sigma).unwrap(), 3);
        assert_eq!(Components::Energy(1.0).count(&sigma).unwrap(), 4);
        assert_eq!(Components::All.count(&sigma).unwrap(), 4);
        assert!(Components::Rank(5).count(&sigma).is_err());
        assert_eq!(serde_json::to_string(&Components::Rank(32)).unwrap(), "32");
        assert_eq!(serde_json::to_string(&Components::Energy(0.9)).unwrap(), "\"energy:0.9\"");
        assert_eq!(serde_json::from_str::<Components>("\"all\"").unwrap(), Components::All);
        assert_eq!(serde_json::from_str::<Components>("16").unwrap(), Components::Rank(16));
    }

    /// Eq. 6's row scores: all 1 at r' = r (the selection falls to rounding), spread out and
    /// informative at r' < r.
    #[test]
    fn row_scores_are_degenerate_at_full_rank_and_informative_below() {
        let m = gene(40, 5);
        let full = row_scores(&gene_svd(&m, Components::All).unwrap().u);
        assert!(full.iter().all(|s| (s - 1.0).abs() < 1e-12), "{full:?}");
        let part = row_scores(&gene_svd(&m, Components::Rank(8)).unwrap().u);
        let (lo, hi) = part.iter().fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(hi - lo > 0.2, "scores {lo}..{hi}");
        // Σ s_i² = r' (U has r' orthonormal columns).
        assert!((part.iter().map(|s| s * s).sum::<f64>() - 8.0).abs() < 1e-9);
    }
}
