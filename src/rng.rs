//! The crate's one random generator ([`SplitMix64`]), its one Gaussian sampler ([`normals`],
//! Box-Muller) and the one Scratch init of a tensor ([`scratch`]: HF Llama init, normal std
//! `initializer_range`, norms 1; design.md "Baselines"; a whole student's is
//! [`crate::student::StudentConfig::scratch_init`]) that `masa init`, the trainer's tests,
//! `masa bench` and the CUDA checks all use. A leaf: it imports nothing of the crate.
//!
//! Each student tensor gets its own stream seeded from `(seed, tensor name)`, so the Scratch part
//! of a student does not depend on the strategy or on the order tensors are built in: `masa` and
//! `scratch` with the same seed differ exactly in the tensors `masa` inherits.

/// SplitMix64: a small, fast, fully specified PRNG (Steele et al. 2014), so shuffles are
/// reproducible across platforms and crate versions.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `(0, 1]` (never 0, so `ln` is finite).
    pub fn uniform_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal pairs by Box-Muller.
    pub fn normal_pair(&mut self) -> (f64, f64) {
        let (u1, u2) = (self.uniform_open0(), self.uniform_open0());
        let rad = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        (rad * th.cos(), rad * th.sin())
    }

    /// Uniform-ish integer in `0..n` (multiply-shift; bias < n / 2^64).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// `n` standard normal draws from `rng`: Box-Muller pairs, in order.
pub fn normals(rng: &mut SplitMix64, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (a, b) = rng.normal_pair();
        out.push(a);
        out.push(b);
    }
    out.truncate(n);
    out
}

/// FNV-1a of a tensor name, mixed into the seed.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

/// The stream of one tensor.
pub fn tensor_rng(seed: u64, name: &str) -> SplitMix64 {
    let mut mix = SplitMix64::new(seed ^ name_hash(name));
    SplitMix64::new(mix.next_u64())
}

/// `n` draws of `N(0, std²)` for tensor `name`.
pub fn normal(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    normals(&mut tensor_rng(seed, name), n).into_iter().map(|z| (z * std) as f32).collect()
}

/// Scratch init of one student tensor (HF `LlamaPreTrainedModel._init_weights`): RMSNorm
/// weights (1-D) are ones, every matrix (linear or embedding) is `N(0, std²)`.
pub fn scratch(seed: u64, name: &str, shape: &[usize], std: f64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if shape.len() == 1 {
        vec![1.0; n]
    } else {
        normal(seed, name, n, std)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // Reference output of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220A8397B1DCDAF);
        assert_eq!(r.next_u64(), 0x6E789E6AA1B965F4);
    }

    #[test]
    fn normal_has_the_requested_moments_and_is_deterministic() {
        let v = normal(7, "model.layers.0.mlp.up_proj.weight", 200_000, 0.02);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 2e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
        assert_eq!(v, normal(7, "model.layers.0.mlp.up_proj.weight", 200_000, 0.02));
        assert_ne!(v[..10], normal(8, "model.layers.0.mlp.up_proj.weight", 10, 0.02)[..]);
        assert_ne!(v[..10], normal(7, "model.layers.1.mlp.up_proj.weight", 10, 0.02)[..]);
    }
}
