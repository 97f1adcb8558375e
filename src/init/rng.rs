//! Deterministic Scratch init (design.md "Baselines": HF Llama init, normal std 0.02, norms 1).
//!
//! A small generator, no dependency: the crate's SplitMix64 with Box-Muller normals. Each
//! tensor gets its own stream seeded from `(seed, tensor name)`, so the Scratch part of a
//! student does not depend on the strategy or on the order tensors are built in: `masa` and
//! `scratch` with the same seed differ exactly in the tensors `masa` inherits.

use crate::corpus::SplitMix64;

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
    let mut rng = tensor_rng(seed, name);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (a, b) = rng.normal_pair();
        out.push((a * std) as f32);
        out.push((b * std) as f32);
    }
    out.truncate(n);
    out
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
