//! AdamW (decoupled weight decay, as `torch.optim.AdamW`), global-norm gradient clipping and
//! the learning-rate schedule (linear warmup, cosine decay).

use rayon::prelude::*;

/// AdamW hyper-parameters of a run (both engines).
#[derive(Clone, Copy, Debug)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Elements per parallel chunk of the optimizer update.
const CHUNK: usize = 1 << 14;

#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// First and second moments, one per parameter.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates taken so far (bias correction).
    pub t: u64,
    /// Per parameter: whether weight decay applies (matrices yes, norm weights no).
    pub decay: Vec<(usize, usize, bool)>,
}

impl AdamW {
    /// `decay`: `(offset, len, decayed)` ranges covering the parameter vector.
    pub fn new(n: usize, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, decay: Vec<(usize, usize, bool)>) -> Self {
        AdamW { beta1, beta2, eps, weight_decay, m: vec![0.0; n], v: vec![0.0; n], t: 0, decay }
    }

    /// One update with learning rate `lr` from gradient `g` times `gscale` (the clip factor).
    pub fn step(&mut self, params: &mut [f32], g: &[f32], gscale: f32, lr: f64) {
        self.t += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let step = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.eps as f32;
        for &(off, len, decayed) in &self.decay {
            let shrink = if decayed { (1.0 - lr * self.weight_decay) as f32 } else { 1.0 };
            let r = off..off + len;
            params[r.clone()]
                .par_chunks_mut(CHUNK)
                .zip(self.m[r.clone()].par_chunks_mut(CHUNK))
                .zip(self.v[r.clone()].par_chunks_mut(CHUNK))
                .zip(g[r].par_chunks(CHUNK))
                .for_each(|(((p, m), v), g)| {
                    for i in 0..p.len() {
                        let gi = g[i] * gscale;
                        m[i] = b1 * m[i] + (1.0 - b1) * gi;
                        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                        let denom = v[i].sqrt() / bc2_sqrt + eps;
                        p[i] = p[i] * shrink - step * m[i] / denom;
                    }
                });
        }
    }
}

/// Global L2 norm of `g`, summed in f64 over fixed chunks in order (deterministic).
pub fn grad_norm(g: &[f32]) -> f64 {
    let parts: Vec<f64> = g.par_chunks(CHUNK).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum()).collect();
    parts.iter().sum::<f64>().sqrt()
}

/// Clip factor for max norm `clip` (`clip <= 0`: no clipping), as `clip_grad_norm_`.
pub fn clip_factor(norm: f64, clip: f64) -> f32 {
    if clip > 0.0 && norm > clip {
        (clip / (norm + 1e-6)) as f32
    } else {
        1.0
    }
}

/// Linear warmup over `warmup` steps to `peak`, then cosine decay to `min_lr` at `total`.
/// `step` is 0-based (the update about to be taken).
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min_lr + 0.5 * (peak - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One AdamW step by hand (torch's formula) on two parameters.
    #[test]
    fn adamw_matches_torch_formula() {
        let mut p = vec![1.0f32, -2.0];
        let g = vec![0.5f32, 0.25];
        let mut opt = AdamW::new(2, 0.9, 0.95, 1e-8, 0.1, vec![(0, 1, true), (1, 1, false)]);
        for _ in 0..2 {
            opt.step(&mut p, &g, 1.0, 1e-2);
        }
        // torch: p *= 1 - lr*wd; m,v EMA; p -= lr * m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps)
        let mut q = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            for i in 0..2 {
                let gi = g[i] as f64;
                if i == 0 {
                    q[i] *= 1.0 - 1e-2 * 0.1;
                }
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.95 * v[i] + 0.05 * gi * gi;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.95f64.powi(t));
                q[i] -= 1e-2 * mh / (vh.sqrt() + 1e-8);
            }
        }
        for i in 0..2 {
            assert!((p[i] as f64 - q[i]).abs() < 1e-6, "{} vs {}", p[i], q[i]);
        }
    }

    #[test]
    fn schedule_warms_up_and_decays() {
        assert!((lr_at(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        let mut last = f64::INFINITY;
        for s in 10..100 {
            let l = lr_at(s, 100, 10, 1.0, 0.1);
            assert!(l <= last);
            last = l;
        }
    }
}
