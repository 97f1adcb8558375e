//! Gene alignment against independent computations: an explicit matrix for f_d∘M∘f_c,
//! brute-force least squares over explicit activations, losses over explicit activations,
//! finite differences for the spectral gradient, and the paper's minibatch procedure.

use candle_core::{Device, Tensor};
use faer::Mat;
use masa::align::RankSpec;
use masa::align::{compress, decompress, from_mat, gene_apply, to_mat, Layout, OutputAlignment, SpectralAlignment};
use masa::extract::{align_matrix, ExtractOptions, MinibatchAligner};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next().max(1e-300), self.next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// The linear map x ↦ f_d(M f_c(x)) written out as a d_out×d_in matrix, straight from the
/// definitions (pad by repeating the tail, chunk, multiply, concatenate, truncate/tile).
fn explicit_map(m: &[f64], l: &Layout) -> Vec<Vec<f64>> {
    let mut big = vec![vec![0.0; l.d_in]; l.d_out];
    let nr = l.n * l.r;
    for (p, row) in big.iter_mut().enumerate() {
        let s = p % nr;
        let (i, a) = (s / l.r, s % l.r);
        for c in 0..l.r {
            let j = i * l.r + c;
            let src = if j < l.d_in { j } else { l.d_in - l.pad + (j - l.d_in) };
            row[src] += m[a * l.r + c];
        }
    }
    big
}

#[test]
fn compression_layouts() {
    // (d_out, d_in, r): d_in divisible by r or not; nr > d_out, nr < d_out, nr = d_out.
    let cases = [(12, 12, 4), (12, 10, 4), (5, 12, 4), (20, 10, 4), (12, 10, 3), (7, 7, 7), (30, 9, 2)];
    let mut rng = Rng(7);
    for (d_out, d_in, r) in cases {
        let l = Layout::new(d_out, d_in, r).unwrap();
        assert_eq!(l.n, d_in.div_ceil(r));
        assert_eq!(l.pad, l.n * r - d_in);
        let x = rng.vec(d_in);
        let chunks = compress(&x, &l);
        // The padding repeats the last `pad` inputs, in order.
        let flat: Vec<f64> = chunks.concat();
        assert_eq!(&flat[..d_in], &x[..]);
        assert_eq!(&flat[d_in..], &x[d_in - l.pad..]);
        // Decompression truncates or tiles.
        let z: Vec<Vec<f64>> = (0..l.n).map(|i| (0..r).map(|a| (i * r + a) as f64).collect()).collect();
        let out = decompress(&z, &l);
        for (p, v) in out.iter().enumerate() {
            assert_eq!(*v, (p % (l.n * r)) as f64);
        }
        let m = rng.vec(r * r);
        let big = explicit_map(&m, &l);
        let want: Vec<f64> = big.iter().map(|row| row.iter().zip(&x).map(|(a, b)| a * b).sum()).collect();
        let got = gene_apply(&m, &x, &l);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "({d_out},{d_in},{r}): {g} vs {w}");
        }
    }
}

#[test]
fn rank_larger_than_matrix_is_refused() {
    let err = Layout::new(8, 6, 7).unwrap_err().to_string();
    assert!(err.contains("r = 7") && err.contains("1..=6"), "{err}");
}

/// Correlated activations: x = B z with a random mixing B, so S is far from identity.
fn activations(rng: &mut Rng, n: usize, d: usize) -> Vec<Vec<f64>> {
    let b: Vec<f64> = rng.vec(d * d);
    (0..n)
        .map(|_| {
            let z = rng.vec(d);
            (0..d).map(|i| (0..d).map(|j| b[i * d + j] * z[j] * if j < 3 { 3.0 } else { 1.0 }).sum()).collect()
        })
        .collect()
}

fn second_moment(xs: &[Vec<f64>]) -> Vec<f64> {
    let d = xs[0].len();
    let mut s = vec![0.0; d * d];
    for x in xs {
        for i in 0..d {
            for j in 0..d {
                s[i * d + j] += x[i] * x[j];
            }
        }
    }
    s.iter().map(|v| v / xs.len() as f64).collect()
}

fn explicit_loss(m: &[f64], w: &[f32], xs: &[Vec<f64>], l: &Layout) -> f64 {
    let mut total = 0.0;
    for x in xs {
        let approx = gene_apply(m, x, l);
        for p in 0..l.d_out {
            let y: f64 = (0..l.d_in).map(|j| w[p * l.d_in + j] as f64 * x[j]).sum();
            total += (y - approx[p]).powi(2);
        }
    }
    total / (xs.len() as f64 * l.d_out as f64)
}

#[test]
fn loss_from_statistics_equals_loss_over_activations() {
    let mut rng = Rng(11);
    for (d_out, d_in, r) in [(10, 7, 3), (5, 12, 4), (9, 9, 3)] {
        let l = Layout::new(d_out, d_in, r).unwrap();
        let xs = activations(&mut rng, 200, d_in);
        let w: Vec<f32> = rng.vec(d_out * d_in).iter().map(|&v| v as f32).collect();
        let oa = OutputAlignment::new(&w, &second_moment(&xs), l);
        let m = rng.vec(r * r);
        let (from_stats, _) = oa.loss_grad(&to_mat(&m, r));
        let explicit = explicit_loss(&m, &w, &xs, &l);
        assert!((from_stats - explicit).abs() < 1e-9 * explicit.max(1.0), "{from_stats} vs {explicit}");
    }
}

#[test]
fn closed_form_equals_brute_force_least_squares() {
    let mut rng = Rng(5);
    for (d_out, d_in, r) in [(10, 7, 3), (5, 12, 4), (16, 6, 2)] {
        let l = Layout::new(d_out, d_in, r).unwrap();
        let xs = activations(&mut rng, 300, d_in);
        let w: Vec<f32> = rng.vec(d_out * d_in).iter().map(|&v| v as f32).collect();
        let m = OutputAlignment::new(&w, &second_moment(&xs), l).closed_form(0.0).unwrap();
        // Brute force: row a of M regresses, over all tokens and all outputs p with a(p) = a,
        // y_p on the chunk x^(i(p)). Solve each stacked least-squares problem by QR.
        for a in 0..r {
            let mut rows: Vec<Vec<f64>> = Vec::new();
            let mut rhs: Vec<f64> = Vec::new();
            for x in &xs {
                let chunks = compress(x, &l);
                for p in 0..d_out {
                    let (i, ap) = l.chunk_row(p);
                    if ap == a {
                        rows.push(chunks[i].clone());
                        rhs.push((0..d_in).map(|j| w[p * d_in + j] as f64 * x[j]).sum());
                    }
                }
            }
            let design = Mat::from_fn(rows.len(), r, |t, c| rows[t][c]);
            let target = Mat::from_fn(rhs.len(), 1, |t, _| rhs[t]);
            let qr = design.qr();
            use faer::linalg::solvers::SolveLstsq;
            let sol = qr.solve_lstsq(&target);
            for c in 0..r {
                let (got, want) = (m[(a, c)], sol[(c, 0)]);
                assert!((got - want).abs() < 1e-7 * want.abs().max(1.0), "row {a}, col {c}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn spectral_gradient_matches_finite_differences() {
    let mut rng = Rng(3);
    let r = 5;
    let m = rng.vec(r * r);
    let target: Vec<f64> = vec![9.0, 4.0, 2.0, 1.0, 0.5, 0.1];
    let spec = SpectralAlignment::new(&target, r);
    let (_, g) = spec.loss_grad(&to_mat(&m, r)).unwrap();
    let g = from_mat(&g);
    let h = 1e-6;
    for k in 0..r * r {
        let (mut plus, mut minus) = (m.clone(), m.clone());
        plus[k] += h;
        minus[k] -= h;
        let fd = (spec.loss(&to_mat(&plus, r)).unwrap() - spec.loss(&to_mat(&minus, r)).unwrap()) / (2.0 * h);
        assert!((fd - g[k]).abs() < 1e-5 * fd.abs().max(1.0), "entry {k}: analytic {} vs fd {fd}", g[k]);
    }
}

/// The spectral term (computed from the eigendecomposition of MᵀM) equals the same loss and
/// gradient computed from an SVD of M, `Σ (log σ'_i − log σ_i)²` and `U' diag(2 (log σ'_i −
/// log σ_i)/σ'_i) V'ᵀ`, on genes whose singular values span 4 orders of magnitude.
#[test]
fn spectral_term_equals_its_svd_form() {
    let mut rng = Rng(21);
    for (r, spread) in [(6, 1e-1f64), (12, 1e-4), (40, 1e-2)] {
        let target: Vec<f64> = (0..r).map(|i| 5.0 * (0.7f64).powi(i as i32)).collect();
        let spec = SpectralAlignment::new(&target, r);
        // M = Q1 diag(s) Q2ᵀ with orthogonal Q1, Q2 from QR of random matrices.
        let q = |rng: &mut Rng| to_mat(&rng.vec(r * r), r).qr().compute_Q();
        let (q1, q2) = (q(&mut rng), q(&mut rng));
        let s: Vec<f64> = (0..r).map(|i| 3.0 * spread.powf(i as f64 / (r - 1) as f64)).collect();
        let m = &q1 * faer::Mat::from_fn(r, r, |a, b| if a == b { s[a] } else { 0.0 }) * q2.transpose();
        let svd = m.thin_svd().unwrap();
        let (u, sv, v) = (svd.U(), svd.S().column_vector(), svd.V());
        let diff: Vec<f64> = (0..r).map(|i| sv[i].ln() - target[i].ln()).collect();
        let want_loss: f64 = diff.iter().map(|d| d * d).sum();
        let want_grad = faer::Mat::from_fn(r, r, |a, i| u[(a, i)] * 2.0 * diff[i] / sv[i]) * v.transpose();
        let (loss, grad) = spec.loss_grad(&m).unwrap();
        assert!((loss - want_loss).abs() < 1e-9 * want_loss.max(1.0), "r={r}: loss {loss} vs {want_loss}");
        assert!((spec.loss(&m).unwrap() - want_loss).abs() < 1e-9 * want_loss.max(1.0));
        let scale = (0..r * r).map(|k| want_grad[(k / r, k % r)].abs()).fold(0.0, f64::max);
        for k in 0..r * r {
            let (got, want) = (grad[(k / r, k % r)], want_grad[(k / r, k % r)]);
            assert!((got - want).abs() < 1e-7 * scale, "r={r} entry {k}: {got} vs {want} (largest {scale})");
        }
    }
}

/// `align::singular_values` (eigenvalues of the smaller Gram matrix) equals faer's SVD on wide,
/// tall and square matrices, to 1e-9 of the largest value.
#[test]
fn singular_values_equal_the_svd() {
    let mut rng = Rng(5);
    for (rows, cols) in [(7, 19), (19, 7), (12, 12), (64, 160)] {
        let m = faer::Mat::from_fn(rows, cols, |_, _| rng.vec(1)[0]);
        let got = masa::align::singular_values(&m).unwrap();
        let want = m.singular_values().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9 * want[0], "{rows}x{cols}: {g} vs {w}");
        }
    }
}

#[test]
fn output_gradient_matches_finite_differences() {
    let mut rng = Rng(9);
    let l = Layout::new(7, 10, 3).unwrap();
    let xs = activations(&mut rng, 50, 10);
    let w: Vec<f32> = rng.vec(70).iter().map(|&v| v as f32).collect();
    let oa = OutputAlignment::new(&w, &second_moment(&xs), l);
    let m = rng.vec(9);
    let g = from_mat(&oa.loss_grad(&to_mat(&m, 3)).1);
    for k in 0..9 {
        let (mut p, mut q) = (m.clone(), m.clone());
        p[k] += 1e-6;
        q[k] -= 1e-6;
        let fd = (oa.loss_grad(&to_mat(&p, 3)).0 - oa.loss_grad(&to_mat(&q, 3)).0) / 2e-6;
        assert!((fd - g[k]).abs() < 1e-5 * fd.abs().max(1.0));
    }
}

#[test]
fn spectral_alignment_trades_output_loss_for_spectrum() {
    let mut rng = Rng(21);
    let (d_out, d_in, r) = (24, 16, 6);
    let xs = activations(&mut rng, 400, d_in);
    let w: Vec<f32> = rng.vec(d_out * d_in).iter().map(|&v| v as f32).collect();
    let s = second_moment(&xs);
    let l = Layout::new(d_out, d_in, r).unwrap();
    let base = ExtractOptions { rank: RankSpec::Rank(r), lambda: 0.0, ..Default::default() };
    let (_, r0) = align_matrix(&w, &s, l, &base).unwrap();
    let (_, r1) = align_matrix(&w, &s, l, &ExtractOptions { lambda: 1.0, ..base.clone() }).unwrap();
    let (_, r2) = align_matrix(&w, &s, l, &ExtractOptions { lambda: 1e4, max_iter: 2000, tol: 1e-9, ..base }).unwrap();

    assert_eq!(r0.l_out, r0.l_out_start, "λ = 0 keeps the closed-form optimum");
    assert!(r1.l_spec < r0.l_spec, "spectral loss should drop: {} -> {}", r0.l_spec, r1.l_spec);
    assert!(r2.l_spec < 1e-2 * r0.l_spec, "a large λ matches the spectrum: {} -> {}", r0.l_spec, r2.l_spec);
    assert!(r2.l_out >= r1.l_out, "more weight on the spectrum costs output fidelity");
    assert!(r1.l_out >= r0.l_out - 1e-12, "the closed form is the output optimum");
    let align = |rep: &masa::extract::MatrixReport| rep.rel_l_out + 1.0 * rep.l_spec / r as f64;
    assert!(align(&r1) <= align(&r0), "L_align (λ = 1) must not increase from the closed-form start");
}

#[test]
fn minibatch_adam_reaches_the_exact_loss_on_the_same_tokens() {
    let mut rng = Rng(42);
    let (d_out, d_in, r) = (24, 16, 6);
    let xs = activations(&mut rng, 512, d_in);
    let w: Vec<f32> = rng.vec(d_out * d_in).iter().map(|&v| v as f32 * 0.1).collect();
    let l = Layout::new(d_out, d_in, r).unwrap();
    let opts = ExtractOptions { rank: RankSpec::Rank(r), lambda: 0.0, ..Default::default() };
    let (_, exact) = align_matrix(&w, &second_moment(&xs), l, &opts).unwrap();
    let dev = Device::Cpu;
    let wt = Tensor::from_vec(w.clone(), (d_out, d_in), &dev).unwrap();
    let m0: Vec<f64> = (0..r * r).map(|_| rng.normal() * 0.01).collect();
    let mut mb = MinibatchAligner::new(&wt, l, m0, 3e-3, 1.0, None).unwrap();
    let batches: Vec<Tensor> = xs
        .chunks(64)
        .map(|c| Tensor::from_vec(c.concat().iter().map(|&v| v as f32).collect::<Vec<_>>(), (c.len(), d_in), &dev).unwrap())
        .collect();
    for epoch in 0..600 {
        if epoch == 400 {
            mb.lr = 3e-4;
        }
        for b in &batches {
            mb.step(b).unwrap();
        }
    }
    let final_loss = explicit_loss(&mb.m, &w, &xs, &l);
    eprintln!("exact L_out {:.6}, minibatch L_out {:.6}", exact.l_out, final_loss);
    assert!(final_loss <= exact.l_out * 1.02, "minibatch {final_loss} vs exact {}", exact.l_out);
    assert!(final_loss >= exact.l_out * (1.0 - 1e-6), "nothing beats the exact optimum");
}

/// With λ > 0 both extraction modes minimise one objective, `L_out / E + λ L_spec / r`: the
/// paper's minibatch Adam ends where the exact mode's closed form + L-BFGS does (a second
/// implementation of the same objective; before, the same `--lambda` meant two trade-offs).
#[test]
fn minibatch_and_exact_modes_minimise_the_same_objective() {
    let mut rng = Rng(7);
    let (d_out, d_in, r) = (24, 16, 6);
    let xs = activations(&mut rng, 512, d_in);
    let w: Vec<f32> = rng.vec(d_out * d_in).iter().map(|&v| v as f32 * 0.1).collect();
    let l = Layout::new(d_out, d_in, r).unwrap();
    let lambda = 0.5;
    let opts = ExtractOptions { rank: RankSpec::Rank(r), lambda, ..Default::default() };
    let (_, exact) = align_matrix(&w, &second_moment(&xs), l, &opts).unwrap();
    let energy = exact.output_energy;
    let sigma = Mat::from_fn(d_out, d_in, |p, j| w[p * d_in + j] as f64).singular_values().unwrap();
    let target = SpectralAlignment::new(&sigma, r);
    let objective = |m: &[f64]| explicit_loss(m, &w, &xs, &l) / energy + lambda * target.loss(&to_mat(m, r)).unwrap() / r as f64;
    let j_exact = exact.l_out / energy + lambda * exact.l_spec / r as f64;
    let dev = Device::Cpu;
    let wt = Tensor::from_vec(w.clone(), (d_out, d_in), &dev).unwrap();
    let m0: Vec<f64> = (0..r * r).map(|_| rng.normal() * 0.01).collect();
    let mut mb =
        MinibatchAligner::new(&wt, l, m0, 3e-3, 1.0 / energy, Some((SpectralAlignment::new(&sigma, r), lambda / r as f64))).unwrap();
    let batches: Vec<Tensor> = xs
        .chunks(64)
        .map(|c| Tensor::from_vec(c.concat().iter().map(|&v| v as f32).collect::<Vec<_>>(), (c.len(), d_in), &dev).unwrap())
        .collect();
    for epoch in 0..600 {
        if epoch == 400 {
            mb.lr = 3e-4;
        }
        for b in &batches {
            mb.step(b).unwrap();
        }
    }
    let j_mb = objective(&mb.m);
    eprintln!("objective: exact {j_exact:.6}, minibatch {j_mb:.6}; L_spec/r exact {:.4}", exact.l_spec / r as f64);
    assert!((j_mb / j_exact - 1.0).abs() < 0.02, "minibatch {j_mb} vs exact {j_exact}");
    // λ mattered: the exact optimum of L_out alone scores worse on this objective.
    let (m_out, _) = align_matrix(&w, &second_moment(&xs), l, &ExtractOptions { lambda: 0.0, ..opts }).unwrap();
    assert!(objective(&m_out) > j_exact * 1.01, "{} vs {j_exact}", objective(&m_out));
}
