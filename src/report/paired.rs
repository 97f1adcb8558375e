//! Paired statistics over seeds (issue 31): the same seed gives two arms the same rest of the
//! student and the same data order, so an arm is compared with another through the per-seed
//! differences `d_s = x_A,s − x_B,s`: their mean, a Student-t 95% interval and a two-sided
//! paired sign-flip (permutation) p-value, exact up to 2^20 sign patterns and Monte Carlo
//! (seeded, 2^20 draws) beyond.

/// Paired comparison of two arms on the seeds both have.
#[derive(Clone, Debug, PartialEq)]
pub struct Paired {
    /// The seeds both arms have, ascending, and `A − B` on each.
    pub seeds: Vec<u64>,
    pub diffs: Vec<f64>,
    pub mean: f64,
    /// Student-t interval of the mean at `level` (`None` for fewer than 2 pairs).
    pub interval: Option<(f64, f64)>,
    /// Two-sided sign-flip p-value (`None` for no pairs).
    pub p_value: Option<f64>,
}

/// `A − B` over the seeds both `a` and `b` have (finite values only), at confidence `level`.
pub fn paired(a: &[(u64, f64)], b: &[(u64, f64)], level: f64) -> Option<Paired> {
    let mut pairs: Vec<(u64, f64)> = a
        .iter()
        .filter(|(_, x)| x.is_finite())
        .filter_map(|&(s, x)| b.iter().find(|(t, y)| *t == s && y.is_finite()).map(|&(_, y)| (s, x - y)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    pairs.sort_by_key(|p| p.0);
    let diffs: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let n = diffs.len();
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let interval = (n > 1).then(|| {
        let sd = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let half = t_quantile(0.5 + level / 2.0, (n - 1) as f64) * sd / (n as f64).sqrt();
        (mean - half, mean + half)
    });
    Some(Paired { seeds: pairs.iter().map(|p| p.0).collect(), mean, interval, p_value: Some(sign_flip_p(&diffs)), diffs })
}

/// Two-sided paired sign-flip p-value of the mean of `d`: the share of sign patterns (the
/// observed one included) whose mean is at least as far from 0 as the observed one.
pub fn sign_flip_p(d: &[f64]) -> f64 {
    let n = d.len();
    let observed = d.iter().sum::<f64>().abs();
    // A relative tolerance so that patterns equal to the observed one up to rounding count.
    let tol = 1e-12 * d.iter().map(|x| x.abs()).sum::<f64>();
    let at_least = |flip: &mut dyn FnMut(usize) -> bool| -> bool {
        let s: f64 = d.iter().enumerate().map(|(i, x)| if flip(i) { -x } else { *x }).sum();
        s.abs() >= observed - tol
    };
    if n <= 20 {
        let total = 1u64 << n;
        (0..total).filter(|&m| at_least(&mut |i| m >> i & 1 == 1)).count() as f64 / total as f64
    } else {
        let draws = 1u64 << 20;
        let mut rng = crate::rng::SplitMix64::new(31);
        let hits = (0..draws).filter(|_| at_least(&mut |_| rng.next_u64() & 1 == 1)).count() as f64;
        (hits + 1.0) / (draws as f64 + 1.0)
    }
}

/// The `p`-quantile of Student's t with `df` degrees of freedom, by bisection on
/// [`t_cdf`].
pub fn t_quantile(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e3, 1e3);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Student's t CDF: `1 − I_x(df/2, 1/2) / 2` for `t > 0` with `x = df / (df + t²)`.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * incomplete_beta(df / (df + t * t), df / 2.0, 0.5);
    if t > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The regularised incomplete beta function `I_x(a, b)` (Lentz's continued fraction, as in
/// Numerical Recipes §6.4).
fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_fraction(1.0 - x, b, a) / b
    }
}

fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    d = if d.abs() < TINY { TINY } else { d };
    d = 1.0 / d;
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        for aa in [m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))] {
            d = 1.0 + aa * d;
            d = if d.abs() < TINY { TINY } else { d };
            c = 1.0 + aa / c;
            c = if c.abs() < TINY { TINY } else { c };
            d = 1.0 / d;
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let s = G[0] + (1..9).map(|i| G[i] / (x + i as f64)).sum::<f64>();
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against R's `qt` / scipy's `t.ppf`.
    #[test]
    fn t_quantiles_match_published_values() {
        for (df, q) in [(1.0, 12.706_204_736), (2.0, 4.302_652_730), (9.0, 2.262_157_163), (29.0, 2.045_229_642), (1000.0, 1.962_339_081)] {
            assert!((t_quantile(0.975, df) - q).abs() < 1e-6, "df {df}: {} vs {q}", t_quantile(0.975, df));
        }
        assert!((t_cdf(0.0, 5.0) - 0.5).abs() < 1e-12);
        assert!((t_cdf(2.015_048_373, 5.0) - 0.95).abs() < 1e-8);
    }

    /// Exact sign-flip p-values counted by hand: all 3 differences of one sign give 2/8 (the
    /// pattern and its mirror); differences that cancel give 1.
    #[test]
    fn sign_flip_p_values_count_patterns() {
        assert!((sign_flip_p(&[1.0, 2.0, 3.0]) - 0.25).abs() < 1e-12);
        // |±1 ± 2 ± 3| ≥ 0 always.
        assert!((sign_flip_p(&[1.0, 2.0, -3.0]) - 1.0).abs() < 1e-12);
        // [−0.010, −0.015, −0.061] (results/medium's MASA − Scratch): 2 of 8.
        assert!((sign_flip_p(&[-0.010, -0.015, -0.061]) - 0.25).abs() < 1e-12);
        // 10 negative differences: 2 / 1024.
        assert!((sign_flip_p(&[-1.0; 10]) - 2.0 / 1024.0).abs() < 1e-12);
        // Beyond 2^20 patterns: Monte Carlo, close to the exact 2 / 2^25.
        let p = sign_flip_p(&[-1.0; 25]);
        assert!(p > 0.0 && p < 1e-5, "{p}");
    }

    /// Pairs by seed (unmatched and non-finite values left out); the interval is
    /// mean ± t·sd/√n.
    #[test]
    fn pairs_by_seed_with_a_t_interval() {
        let a = [(0, 1.0), (1, 2.0), (2, 4.0), (7, 9.0), (3, f64::NAN)];
        let b = [(2, 3.0), (1, 1.0), (0, 1.5), (3, 1.0)];
        let p = paired(&a, &b, 0.95).unwrap();
        assert_eq!(p.seeds, vec![0, 1, 2]);
        assert_eq!(p.diffs, vec![-0.5, 1.0, 1.0]);
        let sd = (((-0.5f64 - 0.5).powi(2) + 2.0 * 0.25) / 2.0).sqrt();
        let half = 4.302_652_730 * sd / 3f64.sqrt();
        let (lo, hi) = p.interval.unwrap();
        assert!((p.mean - 0.5).abs() < 1e-12 && (lo - (0.5 - half)).abs() < 1e-6 && (hi - (0.5 + half)).abs() < 1e-6);
        assert!(paired(&a[..1], &b[..1], 0.95).is_none());
        assert_eq!(paired(&a[..1], &b[2..3], 0.95).unwrap().interval, None);
    }
}
