//! Efficient Expert Pruning (EEP; Liu et al., 2024, "Efficient Expert Pruning for Sparse
//! Mixture-of-Experts Language Models: Pruning 50% Parameters without Loss of Performance"),
//! the paper's Pruning-EEP baseline for MoE sources: a gradient-free evolutionary search over
//! expert-merging matrices, scored by the source's language-modelling loss on calibration
//! tokens.
//!
//! Adapted to a dense student as [`super::prune`] is: each MoE layer the student inherits
//! becomes one dense FFN holding the shared expert (if any) and `K` merged experts, `K` the
//! number of routed experts `prune` would concatenate for the student's FFN width. Merged
//! expert `j` is `θ'_j = Σ_i A[j, i] θ_i` over all `E` routed experts, the same coefficients
//! for gate, up and down (EEP's expert-merging matrix W_E, which merges expert parameters);
//! its output weight `c_j > 0` multiplies its down_proj (a dense student has no router: `c_j`
//! stands in for the routing weight EEP's pruned router would give it). The search starts at
//! `prune`'s choice (`A` one-hot on the most routed experts, `c` their routing shares), so its
//! first fitness is prune's, and runs an elitist (1+λ) evolution strategy: each generation
//! draws `population` candidates `θ + σ·z`, `z ~ N(0, I)` over all layers' `A` and `ln c` at
//! once (EEP searches all layers jointly), keeps the best if it beats the parent, and adapts
//! σ by the 1/5 success rule. Fitness is the mean next-token NLL of the source on the
//! calibration batches with every searched layer's FFN replaced by its candidate, so the
//! search sees how the merged FFNs work together inside the network. Needs the whole source in
//! memory in f32 (as `masa score` does).
//!
//! The student then keeps FFN neurons by energy, as `prune` does, from the merged FFN's own
//! activations on the calibration batches (`mean(mid_i²)·c_j²`), and its other weights exactly
//! as `prune` chooses them.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::prune::{source_ffn, Energies, SourceFfn};
use super::select::Matrix;
use crate::corpus::Batch;
use crate::error::{MasaError, Result};
use crate::source::model::{Hooks, MlpId, NoHooks, Site, Transformer};
use crate::source::{MoeConfig, SourceWeights};

/// The search's settings; recorded in `masa.json` and in `masa run`'s cache keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EepOptions {
    /// Candidates per generation (λ).
    pub population: usize,
    pub generations: usize,
    /// Calibration tokens the fitness is measured on (sequences of `seq_len`, all domains).
    pub tokens: u64,
    pub seq_len: usize,
    /// Initial mutation step σ (on `A`'s entries and on `ln c`).
    pub sigma: f64,
}

impl Default for EepOptions {
    fn default() -> Self {
        EepOptions { population: 8, generations: 20, tokens: 2048, seq_len: 256, sigma: 0.05 }
    }
}

impl EepOptions {
    /// Ranges, checked before any work.
    pub fn check(&self) -> Result<()> {
        use crate::limits::{count, in_range, MAX_TOKENS};
        count("--eep-population", self.population, 4096, "")?;
        in_range("--eep-generations", self.generations as u64, 0..=100_000, "")?;
        in_range("--eep-tokens", self.tokens, 1..=MAX_TOKENS, "")?;
        count("--eep-seq", self.seq_len, 1 << 20, "")?;
        if !(self.sigma.is_finite() && self.sigma > 0.0 && self.sigma <= 10.0) {
            return Err(MasaError::Invalid(format!("--eep-sigma {}: must be in (0, 10]", self.sigma)));
        }
        Ok(())
    }

    /// The fitness batches' stream: `tokens` over all domains, 4 sequences of `seq_len` a batch.
    pub fn stream(&self, seed: u64) -> crate::calibrate::CalibrateOptions {
        crate::calibrate::CalibrateOptions {
            tokens: self.tokens,
            seq_len: self.seq_len,
            batch: 4,
            seed,
            domains: None,
            rank: None,
            layers: None,
            shard: None,
            experts: None,
            device: Default::default(),
        }
    }
}

/// Whether EEP can run on `src` with `opts`: a mixture-of-experts source, options in range,
/// fitness sequences no longer than the source's positions. Checked before any work. Returns
/// the source's expert configuration.
pub fn check_source<'a>(src: &'a SourceWeights, opts: &EepOptions) -> Result<&'a MoeConfig> {
    opts.check()?;
    let cfg = &src.config;
    let moe = cfg.moe.as_ref().ok_or_else(|| {
        MasaError::Invalid(format!(
            "--strategy eep prunes the experts of a mixture-of-experts source; {} is dense ({}): use --strategy prune",
            src.path.display(),
            cfg.arch.name()
        ))
    })?;
    crate::limits::count("--eep-seq", opts.seq_len, cfg.max_position_embeddings, "the source's positions")?;
    Ok(moe)
}

/// One searched layer: its experts stacked for merging, its shared expert, where its
/// parameters sit in the search vector.
struct LayerSpace {
    layer: usize,
    /// Routed experts' gate and up `(E, f_e·h)`, down `(E, h·f_e)`.
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    shared: Option<(Tensor, Tensor, Tensor)>,
    shared_width: usize,
    /// Merged experts K, routed experts E, expert width f_e.
    k: usize,
    e: usize,
    fe: usize,
    /// `A` (K·E, row-major) then `ln c` (K) start here in the search vector.
    offset: usize,
}

impl LayerSpace {
    fn len(&self) -> usize {
        self.k * self.e + self.k
    }

    /// `c_j` of candidate `theta`.
    fn weights(&self, theta: &[f64]) -> Vec<f64> {
        theta[self.offset + self.k * self.e..self.offset + self.len()].iter().map(|v| v.exp()).collect()
    }

    /// The dense FFN `(gate, up, down)` of candidate `theta`: shared expert first, then the K
    /// merged experts, `c_j` folded into down's columns.
    fn dense(&self, theta: &[f64], h: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (k, e, fe) = (self.k, self.e, self.fe);
        let a: Vec<f32> = theta[self.offset..self.offset + k * e].iter().map(|&v| v as f32).collect();
        let a = Tensor::from_vec(a, (k, e), &Device::Cpu)?;
        let gate = a.matmul(&self.gate)?.reshape((k * fe, h))?;
        let up = a.matmul(&self.up)?.reshape((k * fe, h))?;
        let c: Vec<f32> = self.weights(theta).iter().map(|&v| v as f32).collect();
        let c = Tensor::from_vec(c, (k, 1, 1), &Device::Cpu)?;
        let down = a.matmul(&self.down)?.reshape((k, h, fe))?.broadcast_mul(&c)?.permute((1, 0, 2))?.contiguous()?.reshape((h, k * fe))?;
        Ok(match &self.shared {
            Some((sg, su, sd)) => (Tensor::cat(&[sg, &gate], 0)?, Tensor::cat(&[su, &up], 0)?, Tensor::cat(&[sd, &down], 1)?),
            None => (gate, up, down),
        })
    }
}

/// The searched layers' dense FFNs and what the search did (for `masa.json`).
pub struct Merged {
    pub ffns: BTreeMap<usize, SourceFfn>,
    pub record: serde_json::Value,
}

/// Run EEP for the MoE layers among `layers` (source layer indices a student inherits) of
/// `src`, each merged to the width `prune` would give a student FFN of `width`; `energies`
/// gives the routing shares of the starting point. Dense layers among `layers` are left out
/// (the caller takes them as they are).
pub fn search(
    src: &SourceWeights,
    layers: &[usize],
    width: usize,
    energies: &Energies,
    batches: &[Batch],
    opts: &EepOptions,
    seed: u64,
) -> Result<Merged> {
    let moe = check_source(src, opts)?;
    let cfg = &src.config;
    let mut wanted: Vec<usize> = layers.iter().copied().filter(|&l| cfg.is_moe_layer(l)).collect();
    wanted.sort_unstable();
    wanted.dedup();
    if wanted.is_empty() {
        return Err(MasaError::Invalid(
            "--strategy eep: none of the layers the student inherits is a mixture of experts; use --strategy prune".into(),
        ));
    }
    if batches.is_empty() {
        return Err(MasaError::Invalid("--strategy eep needs calibration tokens for its fitness (--eep-tokens)".into()));
    }
    let h = cfg.hidden_size;
    let (e, fe) = (moe.n_routed_experts, moe.moe_intermediate_size);
    // The starting point and search space of each layer.
    let mut spaces = Vec::new();
    let mut theta0 = Vec::new();
    for &l in &wanted {
        let start = source_ffn(src, l, width, Some(energies))?;
        let routed: Vec<(usize, f64)> = start
            .parts
            .iter()
            .filter_map(|(label, w)| label.strip_prefix("experts.").and_then(|x| x.parse().ok()).map(|x: usize| (x, *w)))
            .collect();
        let k = routed.len();
        let p = format!("model.layers.{l}.mlp");
        let stack = |proj: &str| -> Result<Tensor> {
            let ts = (0..e)
                .map(|x| src.tensor(&format!("{p}.experts.{x}.{proj}.weight"))?.flatten_all().map_err(Into::into))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&ts, 0)?)
        };
        let shared = if moe.n_shared_experts > 0 {
            let t = |proj: &str| src.tensor(&format!("{p}.shared_experts.{proj}.weight"));
            Some((t("gate_proj")?, t("up_proj")?, t("down_proj")?))
        } else {
            None
        };
        let space = LayerSpace {
            layer: l,
            gate: stack("gate_proj")?,
            up: stack("up_proj")?,
            down: stack("down_proj")?,
            shared,
            shared_width: moe.n_shared_experts * fe,
            k,
            e,
            fe,
            offset: theta0.len(),
        };
        let mut a = vec![0.0; k * e];
        for (j, (x, _)) in routed.iter().enumerate() {
            a[j * e + x] = 1.0;
        }
        theta0.extend(a);
        // A share of 0 (an expert never routed to) starts at a small weight, not ln 0.
        theta0.extend(routed.iter().map(|(_, w)| w.max(1e-4).ln()));
        spaces.push(space);
    }

    let mut model = Transformer::load(src)?;
    let first = wanted[0];
    let seq = batches[0].seq_len;
    let pos = model.positions(seq, &Device::Cpu)?;
    let prefix = batches
        .iter()
        .map(|b| {
            let ids = Tensor::from_vec(b.ids.clone(), (b.batch, b.seq_len), &Device::Cpu)?;
            Ok((model.hidden_before(&ids, first, &pos, &mut NoHooks)?, b))
        })
        .collect::<Result<Vec<_>>>()?;
    let fitness = |theta: &[f64], model: &mut Transformer, hooks: &mut dyn Hooks| -> Result<f64> {
        for s in &spaces {
            let (g, u, d) = s.dense(theta, h)?;
            model.set_dense_ffn(s.layer, g, u, d)?;
        }
        let (mut sum, mut n) = (0.0f64, 0usize);
        for (x, b) in &prefix {
            let logits = model.logits_from(first, x, b.batch, &pos, hooks)?;
            for i in 0..b.batch {
                let nll = crate::source::model::next_token_nll(
                    &logits.narrow(0, i * b.seq_len, b.seq_len)?,
                    &b.ids[i * b.seq_len..(i + 1) * b.seq_len],
                )?;
                sum += nll.iter().map(|&v| v as f64).sum::<f64>();
                n += nll.len();
            }
        }
        let f = sum / n.max(1) as f64;
        Ok(if f.is_finite() { f } else { f64::INFINITY })
    };

    let mut rng = crate::rng::tensor_rng(seed, "eep");
    let mut parent = theta0;
    let mut f_parent = fitness(&parent, &mut model, &mut NoHooks)?;
    if !f_parent.is_finite() {
        return Err(MasaError::Invalid("EEP: the pruned starting point already gives a non-finite loss on the calibration tokens".into()));
    }
    let mut curve = vec![f_parent];
    let mut sigma = opts.sigma;
    let bar = crate::progress::count_bar((opts.generations * opts.population) as u64, "EEP search", "candidates");
    for _ in 0..opts.generations {
        let mut best: Option<(Vec<f64>, f64)> = None;
        let mut successes = 0usize;
        for _ in 0..opts.population {
            let z = crate::rng::normals(&mut rng, parent.len());
            let child: Vec<f64> = parent.iter().zip(&z).map(|(p, z)| p + sigma * z).collect();
            let f = fitness(&child, &mut model, &mut NoHooks)?;
            successes += usize::from(f < f_parent);
            if best.as_ref().is_none_or(|b| f < b.1) {
                best = Some((child, f));
            }
            bar.inc(1);
        }
        if let Some((child, f)) = best.filter(|b| b.1 < f_parent) {
            parent = child;
            f_parent = f;
        }
        // 1/5 success rule: grow σ when more than a fifth of the candidates improve.
        sigma *= ((successes as f64 / opts.population as f64 - 0.2) / 0.8).exp();
        curve.push(f_parent);
        bar.set_message(format!("EEP search (loss {f_parent:.4})"));
    }
    bar.finish_and_clear();

    // Neuron energies of the chosen FFNs on the calibration batches.
    let mut energy = MidEnergy { layers: spaces.iter().map(|s| (s.layer, (vec![0.0; s.shared_width + s.k * s.fe], 0usize))).collect() };
    let final_fitness = fitness(&parent, &mut model, &mut energy)?;
    let mut ffns = BTreeMap::new();
    let mut rec_layers = Vec::new();
    for s in &spaces {
        let c = s.weights(&parent);
        let (g, u, d) = s.dense(&parent, h)?;
        let (sq, rows) = &energy.layers[&s.layer];
        let scale = |i: usize| {
            if i < s.shared_width {
                1.0
            } else {
                c[(i - s.shared_width) / s.fe]
            }
        };
        let e: Vec<f64> = sq.iter().enumerate().map(|(i, v)| v / (*rows).max(1) as f64 * scale(i).powi(2)).collect();
        let mut parts: Vec<(String, f64)> = Vec::new();
        if s.shared.is_some() {
            parts.push(("shared".into(), 1.0));
        }
        let mut slots = Vec::new();
        for (j, cj) in c.iter().enumerate() {
            let row = &parent[s.offset + j * s.e..s.offset + (j + 1) * s.e];
            let mut order: Vec<usize> = (0..s.e).collect();
            order.sort_by(|&x, &y| row[y].abs().total_cmp(&row[x].abs()).then(x.cmp(&y)));
            let top: Vec<(usize, f64)> = order.iter().take(4).map(|&x| (x, row[x])).collect();
            parts.push((format!("merged.{j}"), *cj));
            slots.push(serde_json::json!({ "weight": cj, "experts": top }));
        }
        rec_layers.push(serde_json::json!({ "layer": s.layer, "merged": slots }));
        ffns.insert(
            s.layer,
            SourceFfn {
                gate: Matrix::from_tensor(&g)?,
                up: Matrix::from_tensor(&u)?,
                down: Matrix::from_tensor(&d)?,
                energy: Some(e),
                parts,
            },
        );
    }
    let tokens: usize = batches.iter().map(|b| b.ids.len()).sum();
    let record = serde_json::json!({
        "method": "EEP: (1+λ) evolution strategy over expert-merging matrices, fitness = source NLL with the merged dense FFNs",
        "options": opts,
        "seed": seed,
        "tokens": tokens,
        "fitness": curve,
        "final_fitness": final_fitness,
        "sigma": sigma,
        "layers": rec_layers,
    });
    Ok(Merged { ffns, record })
}

/// Hooks that sum `mid²` per neuron of the dense FFNs of the searched layers.
struct MidEnergy {
    layers: BTreeMap<usize, (Vec<f64>, usize)>,
}

impl Hooks for MidEnergy {
    fn ffn_input(&mut self, layer: usize, mlp: MlpId, site: Site, x: &Tensor) -> Result<()> {
        if mlp != MlpId::Dense || site != Site::FfnMid {
            return Ok(());
        }
        if let Some((sq, rows)) = self.layers.get_mut(&layer) {
            let v = x.to_vec2::<f32>()?;
            for r in &v {
                sq.iter_mut().zip(r).for_each(|(s, &m)| *s += (m as f64) * (m as f64));
            }
            *rows += v.len();
        }
        Ok(())
    }
}
