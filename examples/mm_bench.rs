//! Matmul micro-benchmark of the training shapes: gemm crate vs faer (AVX-512 kernels).
use std::time::Instant;

use faer::{Accum, MatMut, MatRef, Par};

fn faer_mm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    a: &[f32],
    a_rs: isize,
    a_cs: isize,
    b: &[f32],
    b_rs: isize,
    b_cs: isize,
    par: Par,
) {
    unsafe {
        let dst = MatMut::<f32>::from_raw_parts_mut(c.as_mut_ptr(), m, n, n as isize, 1);
        let lhs = MatRef::<f32>::from_raw_parts(a.as_ptr(), m, k, a_rs, a_cs);
        let rhs = MatRef::<f32>::from_raw_parts(b.as_ptr(), k, n, b_rs, b_cs);
        faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par);
    }
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    // (name, m, n, k, transposed-b (nt) or transposed-a (tn))
    // Extra arguments `MxNxK`: nt shapes to time instead (e.g. a forward pass's projections).
    let custom: Vec<(String, usize, usize, usize, u8)> = std::env::args()
        .skip(2)
        .filter_map(|a| {
            let d: Vec<usize> = a.split('x').filter_map(|v| v.parse().ok()).collect();
            (d.len() == 3).then(|| (format!("nt {a}"), d[0], d[1], d[2], 0))
        })
        .collect();
    let builtin = [
        ("nt 1024x256x256", 1024, 256, 256, 0),
        ("nt 1024x1536x256", 1024, 1536, 256, 0),
        ("tn 256x256x1024", 256, 256, 1024, 2),
        ("tn 1536x256x1024", 1536, 256, 1024, 2),
        ("nt 1024x768x256", 1024, 768, 256, 0),
        ("nt 1024x256x768", 1024, 256, 768, 0),
        ("nt 256x8192x256", 256, 8192, 256, 0),
        ("nn 1024x256x768", 1024, 256, 768, 1),
        ("tn 768x256x1024", 768, 256, 1024, 2),
        ("tn 8192x256x256", 8192, 256, 256, 2),
    ];
    let shapes: Vec<(String, usize, usize, usize, u8)> =
        if custom.is_empty() { builtin.iter().map(|&(n, m, nn, k, kind)| (n.to_string(), m, nn, k, kind)).collect() } else { custom };
    for (name, m, n, k, kind) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect();
        let mut c = vec![0f32; m * n];
        // strides: nt: a (m,k) rows, b given as (n,k) rows -> view (k,n) rs=1 cs=k
        let (ars, acs, brs, bcs) = match kind {
            0 => (k as isize, 1, 1, k as isize),
            1 => (k as isize, 1, n as isize, 1),
            _ => (1, m as isize, n as isize, 1),
        };
        let reps = ((8e9 / (2.0 * (m * n * k) as f64)) as usize).clamp(1, 20);
        let flops = 2.0 * (m * n * k) as f64 * reps as f64;
        let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        let mut best_g = f64::MAX;
        let mut best_f = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        acs,
                        ars,
                        b.as_ptr(),
                        bcs,
                        brs,
                        1.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        par,
                    )
                };
            }
            best_g = best_g.min(t.elapsed().as_secs_f64());
            let fp = if threads > 1 { Par::rayon(threads) } else { Par::Seq };
            let t = Instant::now();
            for _ in 0..reps {
                faer_mm(m, n, k, &mut c, &a, ars, acs, &b, brs, bcs, fp);
            }
            best_f = best_f.min(t.elapsed().as_secs_f64());
        }
        // masa's own entry point (data-parallel over output blocks), nt shapes only.
        let mut best_m = f64::MAX;
        if kind == 0 {
            for _ in 0..3 {
                let t = Instant::now();
                for _ in 0..reps {
                    masa::student::kernels::mm_nt(&mut c, &a, &b, m, n, k, false);
                }
                best_m = best_m.min(t.elapsed().as_secs_f64());
            }
        }
        println!(
            "{name:20} gemm {:6.1} GFLOP/s   faer {:6.1} GFLOP/s   masa mm_nt {:6.1} GFLOP/s",
            flops / best_g / 1e9,
            flops / best_f / 1e9,
            flops / best_m / 1e9
        );
    }
}
