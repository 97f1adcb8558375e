//! Structured pruning (design.md "Baselines"): importance from the calibration statistics
//! (activation energy, the diagonal of `Σ x xᵀ / N`), attention heads by weight norm, and for
//! MoE sources the most frequently routed experts merged into one dense FFN.

use std::collections::BTreeMap;

use super::select::{attention_rows, top_k_in_order, uniform_attention_rows, AttnRows, Heads, Matrix};
use crate::error::{MasaError, Result};
use crate::source::{ModelConfig, SourceWeights};
use crate::stats::Stats;

/// The importance numbers pruning needs, reduced from a statistics file to diagonals.
#[derive(Clone, Debug, Default)]
pub struct Energies {
    /// Hidden channel `c`: `Σ_l S_l[c, c]`, `S_l` the mean second moment of layer l's FFN input
    /// (`ffn_in`, the post-norm hidden state; the shared expert's for MoE layers, else the
    /// routed experts' pooled). Summing over layers ranks channels by how much signal they carry
    /// into the FFNs anywhere in the network.
    pub hidden: Vec<f64>,
    /// Neuron energy `S[i, i]` of each down_proj input (`ffn_mid`), keyed by the statistics
    /// site key (`layers.{l}.ffn_mid`, `layers.{l}.experts.{e}.ffn_mid`, `layers.{l}.shared.ffn_mid`),
    /// with the site's token count.
    pub neurons: BTreeMap<String, (Vec<f64>, f64)>,
    /// MoE layers: routing share per expert (each dataset's counts normalised to sum 1, then
    /// averaged over datasets, as design.md "Gene matrix set" chooses experts).
    pub routing: BTreeMap<usize, Vec<f64>>,
    /// Tokens the statistics saw.
    pub tokens: f64,
}

fn diag(m: &crate::stats::Moment) -> Vec<f64> {
    (0..m.dim).map(|i| m.xxt[i * m.dim + i]).collect()
}

impl Energies {
    pub fn from_stats(stats: &Stats, cfg: &ModelConfig) -> Result<Self> {
        let mut hidden = vec![0.0; cfg.hidden_size];
        for l in 0..cfg.num_hidden_layers {
            let pre = format!("layers.{l}.");
            let direct = [format!("{pre}ffn_in"), format!("{pre}shared.ffn_in")];
            let sites: Vec<&crate::stats::Moment> = match direct.iter().find_map(|k| stats.moments.get(k)) {
                Some(m) => vec![m],
                None => stats.moments.iter().filter(|(k, _)| k.starts_with(&pre) && k.ends_with(".ffn_in")).map(|(_, m)| m).collect(),
            };
            if sites.is_empty() {
                return Err(MasaError::Invalid(format!("statistics have no `{pre}ffn_in`: were they computed for this source?")));
            }
            let count: f64 = sites.iter().map(|m| m.count).sum();
            for m in sites {
                if m.dim != cfg.hidden_size {
                    return Err(MasaError::Shape(format!(
                        "statistics `{pre}ffn_in` are {0}x{0}, the source's hidden size is {1}",
                        m.dim, cfg.hidden_size
                    )));
                }
                for (h, d) in hidden.iter_mut().zip(diag(m)) {
                    *h += d / count.max(1.0);
                }
            }
        }
        let neurons = stats.moments.iter().filter(|(k, _)| k.ends_with("ffn_mid")).map(|(k, m)| (k.clone(), (diag(m), m.count))).collect();
        let mut routing: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut n_ds: BTreeMap<usize, f64> = BTreeMap::new();
        for (k, counts) in &stats.routing {
            let Some(l) = k.strip_prefix("layers.").and_then(|r| r.split('.').next()).and_then(|s| s.parse::<usize>().ok()) else {
                continue;
            };
            let total: f64 = counts.iter().sum();
            if total <= 0.0 {
                continue;
            }
            let acc = routing.entry(l).or_insert_with(|| vec![0.0; counts.len()]);
            acc.iter_mut().zip(counts).for_each(|(a, c)| *a += c / total);
            *n_ds.entry(l).or_insert(0.0) += 1.0;
        }
        for (l, v) in routing.iter_mut() {
            let n = n_ds[l];
            v.iter_mut().for_each(|x| *x /= n);
        }
        Ok(Energies { hidden, neurons, routing, tokens: stats.meta.tokens as f64 })
    }

    fn neuron_energy(&self, key: &str) -> Result<(&[f64], f64)> {
        self.neurons
            .get(key)
            .map(|(v, c)| (v.as_slice(), *c))
            .ok_or_else(|| MasaError::Invalid(format!("statistics have no `{key}` (FFN neuron energies); recompute them for this source")))
    }
}

/// One source layer's FFN as a dense SwiGLU block, with a per-neuron importance if known.
pub struct SourceFfn {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
    pub energy: Option<Vec<f64>>,
    /// What it is made of: `dense`, or the merged experts with their output weights.
    pub parts: Vec<(String, f64)>,
}

/// The FFN of source layer `l`. Dense layers as they are. MoE layers: the shared expert (if
/// any) plus the routed experts in order of routing share until the merged width reaches
/// `width` (at least one routed expert), concatenated along the neuron dimension into one
/// dense FFN. Routed expert `e`'s down_proj columns are multiplied by its routing share `w_e`
/// (its expected weight in the layer output, `P(e chosen)·E[gate | chosen] ≈ w_e` when top-k
/// probabilities are normalised); its neuron energy is the mean over *all* tokens,
/// `S_e[i,i] · P(e chosen) · w_e²` with `P(e chosen) = min(1, top_k·w_e)`.
pub fn source_ffn(src: &SourceWeights, l: usize, width: usize, energies: Option<&Energies>) -> Result<SourceFfn> {
    let cfg = &src.config;
    let load = |prefix: &str| -> Result<(Matrix, Matrix, Matrix)> {
        Ok((
            Matrix::from_tensor(&src.tensor(&format!("{prefix}.gate_proj.weight"))?)?,
            Matrix::from_tensor(&src.tensor(&format!("{prefix}.up_proj.weight"))?)?,
            Matrix::from_tensor(&src.tensor(&format!("{prefix}.down_proj.weight"))?)?,
        ))
    };
    let p = format!("model.layers.{l}.mlp");
    let Some(moe) = cfg.moe.as_ref().filter(|_| cfg.is_moe_layer(l)) else {
        let (gate, up, down) = load(&p)?;
        let energy = match energies {
            Some(e) => Some(e.neuron_energy(&format!("layers.{l}.ffn_mid"))?.0.to_vec()),
            None => None,
        };
        return Ok(SourceFfn { gate, up, down, energy, parts: vec![("dense".into(), 1.0)] });
    };
    let e = energies.ok_or_else(|| {
        MasaError::Invalid(format!("layer {l} of the source is a mixture of experts: choosing experts needs routing counts; pass --stats"))
    })?;
    let share = e.routing.get(&l).ok_or_else(|| MasaError::Invalid(format!("statistics have no routing counts for layer {l}")))?;
    let mut blocks: Vec<(String, String, f64, f64)> = Vec::new(); // (label, prefix, weight, P(chosen))
    if moe.n_shared_experts > 0 {
        blocks.push(("shared".into(), format!("{p}.shared_experts"), 1.0, 1.0));
    }
    let mut have = moe.n_shared_experts * moe.moe_intermediate_size;
    for ex in super::scale::ranking(share) {
        if have >= width && blocks.iter().any(|b| b.0 != "shared") {
            break;
        }
        let w = share[ex];
        blocks.push((format!("experts.{ex}"), format!("{p}.experts.{ex}"), w, (moe.top_k as f64 * w).min(1.0)));
        have += moe.moe_intermediate_size;
    }
    let (mut gate, mut up, mut down) = (Vec::new(), Vec::new(), Vec::<Matrix>::new());
    let mut energy = Vec::new();
    for (label, prefix, w, p_chosen) in &blocks {
        let (g, u, d) = load(prefix)?;
        let (diag, count) = e.neuron_energy(&format!("layers.{l}.{label}.ffn_mid"))?;
        energy.extend(diag.iter().map(|v| v / count.max(1.0) * p_chosen * w * w));
        gate.push(g);
        up.push(u);
        down.push(Matrix { data: d.data.iter().map(|v| v * *w as f32).collect(), ..d });
    }
    let vcat = |ms: &[Matrix]| Matrix {
        rows: ms.iter().map(|m| m.rows).sum(),
        cols: ms[0].cols,
        data: ms.iter().flat_map(|m| m.data.iter().copied()).collect(),
    };
    let hcat = |ms: &[Matrix]| {
        let rows = ms[0].rows;
        let cols: usize = ms.iter().map(|m| m.cols).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for m in ms {
                data.extend_from_slice(&m.data[r * m.cols..(r + 1) * m.cols]);
            }
        }
        Matrix { rows, cols, data }
    };
    Ok(SourceFfn {
        gate: vcat(&gate),
        up: vcat(&up),
        down: hcat(&down),
        energy: Some(energy),
        parts: blocks.into_iter().map(|b| (b.0, b.2)).collect(),
    })
}

/// Attention heads by weight norm: head h scores `‖W_q[h]‖² + ‖W_o[:, h]‖²_F`, a KV group the
/// sum of its heads plus `‖W_k[g]‖² + ‖W_v[g]‖²`. When the student's GQA shape fits inside the
/// source's (no more KV heads, no larger groups, head dim no larger), the best KV groups are
/// kept and within each the best query heads, so the grouping stays exact; otherwise the best
/// query heads overall (KV heads follow [`attention_rows`]); with more student heads than
/// source heads, uniform selection along the flattened dimension.
pub fn prune_heads(q: &Matrix, k: &Matrix, v: &Matrix, o: &Matrix, src: Heads, dst: Heads) -> Result<AttnRows> {
    let head_score: Vec<f64> =
        (0..src.n).map(|h| (h * src.dim..(h + 1) * src.dim).map(|r| q.row_sq_norm(r) + o.col_sq_norm(r)).sum()).collect();
    if dst.dim > src.dim || dst.n > src.n {
        return uniform_attention_rows(src, dst);
    }
    let (sg, dg) = (src.n / src.kv, dst.n / dst.kv);
    if dst.kv <= src.kv && dg <= sg {
        let group_score: Vec<f64> = (0..src.kv)
            .map(|g| {
                let heads: f64 = head_score[g * sg..(g + 1) * sg].iter().sum();
                heads + (g * src.dim..(g + 1) * src.dim).map(|r| k.row_sq_norm(r) + v.row_sq_norm(r)).sum::<f64>()
            })
            .collect();
        let mut q_heads = Vec::with_capacity(dst.n);
        for g in top_k_in_order(&group_score, dst.kv, "KV head groups")? {
            let within = top_k_in_order(&head_score[g * sg..(g + 1) * sg], dg, "query heads of a KV group")?;
            q_heads.extend(within.into_iter().map(|h| g * sg + h));
        }
        return attention_rows(src, dst, &q_heads);
    }
    attention_rows(src, dst, &top_k_in_order(&head_score, dst.n, "attention heads")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_heads_keeps_the_strongest_group_and_heads() {
        // 4 heads, 2 KV (group 2), dim 2, hidden 3. Head 3 (group 1) is strongest, then head 2.
        let src = Heads { n: 4, kv: 2, dim: 2 };
        let mut q = Matrix { rows: 8, cols: 3, data: vec![0.1; 24] };
        for r in 6..8 {
            q.data[r * 3] = 5.0;
        }
        for r in 4..6 {
            q.data[r * 3] = 3.0;
        }
        let kv = Matrix { rows: 4, cols: 3, data: vec![0.1; 12] };
        let o = Matrix { rows: 3, cols: 8, data: vec![0.1; 24] };
        // Student: 1 head, 1 KV head.
        let a = prune_heads(&q, &kv, &kv, &o, src, Heads { n: 1, kv: 1, dim: 2 }).unwrap();
        assert_eq!(a.q, vec![6, 7]);
        assert_eq!(a.kv, vec![2, 3]);
        // Student: 2 heads, 1 KV head: both heads of group 1, in order.
        let a = prune_heads(&q, &kv, &kv, &o, src, Heads { n: 2, kv: 1, dim: 2 }).unwrap();
        assert_eq!(a.q, vec![4, 5, 6, 7]);
        assert_eq!(a.kv, vec![2, 3]);
    }
}
