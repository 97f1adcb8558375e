//! Times the pieces of one gene's extraction at a given shape and rank on synthetic data, to
//! project the cost of a whole source (docs/extraction.md, issue 14): the top-r singular
//! values of W (once per matrix), the closed form, and one evaluation of each term of the
//! L-BFGS objective (L_out from rank-specific statistics, L_spec with its gradient).
//!
//!     cargo run --release --example align_bench -- THREADS D_OUT D_IN R
//!     cargo run --release --example align_bench -- 2 4096 11008 2324
use std::time::Instant;

use faer::Mat;
use masa::align::{Layout, OutputAlignment, SpectralAlignment};

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (threads, d_out, d_in, r) = (arg(1, 2), arg(2, 4096), arg(3, 11008), arg(4, 2324));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let layout = Layout::new(d_out, d_in, r).unwrap();
    let w: Vec<f32> = (0..d_out * d_in).map(|_| 0.02 * next() as f32).collect();
    // Chunk blocks: covariances of 2r random samples (symmetric positive definite).
    let blocks: Vec<Mat<f64>> = (0..layout.n)
        .map(|_| {
            let x = Mat::from_fn(2 * r, r, |_, _| next());
            let mut b = x.transpose() * &x;
            b *= faer::Scale(1.0 / (2 * r) as f64);
            b
        })
        .collect();
    let cross: Vec<f64> = (0..r * d_out).map(|_| 0.01 * next()).collect();
    let out = OutputAlignment::from_rank_stats(blocks, &cross, 1.0, layout);
    println!("{d_out}x{d_in}, r = {r}, {} chunks, {threads} threads", layout.n);

    let t = Instant::now();
    let wmat = Mat::from_fn(d_out, d_in, |p, j| w[p * d_in + j] as f64);
    let sigma = masa::align::singular_values(&wmat).unwrap();
    println!("{:<36} {:8.2} s", "singular values of W (once)", t.elapsed().as_secs_f64());
    let spec = SpectralAlignment::new(&sigma, r);

    let t = Instant::now();
    let m = out.closed_form(1e-6).unwrap();
    println!("{:<36} {:8.2} s", "closed form (once)", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let (lo, _) = out.loss_grad(&m);
    println!("{:<36} {:8.2} s", "L_out and gradient (per evaluation)", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let (ls, _) = spec.loss_grad(&m).unwrap();
    println!("{:<36} {:8.2} s", "L_spec and gradient (per evaluation)", t.elapsed().as_secs_f64());
    println!("(L_out {lo:.4e}, L_spec {ls:.4e})");
}
