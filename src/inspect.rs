//! `masa inspect`: what a model file holds and what MASA would do with it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::source::{FfnMatrix, ModelConfig, SourceWeights, TensorEntry};

#[derive(Serialize)]
pub struct ModelSummary {
    pub path: String,
    pub format: &'static str,
    pub config: ModelConfig,
    pub parameters: u64,
    pub embedding_parameters: u64,
    pub ffn_parameters: u64,
    /// Stored tensor type -> number of tensors.
    pub tensor_types: BTreeMap<String, usize>,
    pub ffn_matrices: Vec<FfnMatrix>,
    pub tensors: Vec<TensorEntry>,
}

pub fn summarize(w: &SourceWeights) -> ModelSummary {
    let tensors = w.entries();
    let count = |e: &TensorEntry| e.shape.iter().product::<usize>() as u64;
    let mut tensor_types = BTreeMap::new();
    for t in &tensors {
        *tensor_types.entry(t.dtype.clone()).or_insert(0) += 1;
    }
    let ffn_matrices = w.config.ffn_matrices();
    ModelSummary {
        path: w.path.display().to_string(),
        format: if w.gguf().is_some() { "gguf" } else { "hf-safetensors" },
        parameters: tensors.iter().map(count).sum(),
        embedding_parameters: tensors.iter().filter(|t| t.name.contains("embed_tokens") || t.name == "lm_head.weight").map(count).sum(),
        ffn_parameters: ffn_matrices.iter().map(|m| (m.d_out * m.d_in) as u64).sum(),
        config: w.config.clone(),
        tensor_types,
        ffn_matrices,
        tensors,
    }
}

/// Human-readable rendering: the config, counts, and the FFN matrices grouped by shape.
pub fn render(s: &ModelSummary) -> String {
    let c = &s.config;
    let mut o = String::new();
    let m = |x: u64| format!("{:.1}M", x as f64 / 1e6);
    o += &format!("{} ({})\n", s.path, s.format);
    o += &format!("architecture   {}\n", c.arch.name());
    o += &format!("layers         {}\n", c.num_hidden_layers);
    o += &format!("hidden         {}\n", c.hidden_size);
    o += &format!("ffn            {} ({:?})\n", c.intermediate_size, c.activation);
    o += &format!("heads          {} q / {} kv, head dim {}\n", c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    o += &format!("vocab          {}{}\n", c.vocab_size, if c.tie_word_embeddings { " (tied embeddings)" } else { "" });
    o += &format!("rope theta     {}{}\n", c.rope_theta, c.rope_local_theta.map(|t| format!(" (local layers {t})")).unwrap_or_default());
    o += &format!("norm           {:?}, eps {:e}\n", c.norm, c.norm_eps);
    if let Some(w) = c.sliding_window {
        o += &format!("sliding window {} (every {}th layer global)\n", w, c.sliding_window_pattern.unwrap_or(1));
    }
    if let Some(moe) = &c.moe {
        o += &format!(
            "experts        {} routed, top-{}{}, width {}, {} shared, first {} layers dense\n",
            moe.n_routed_experts,
            moe.top_k,
            if moe.norm_topk_prob { " (renormalised)" } else { "" },
            moe.moe_intermediate_size,
            moe.n_shared_experts,
            moe.first_k_dense_replace
        );
    }
    o += &format!("parameters     {} (embeddings {}, FFN {})\n", m(s.parameters), m(s.embedding_parameters), m(s.ffn_parameters));
    let types: Vec<String> = s.tensor_types.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    o += &format!("tensor types   {}\n", types.join(", "));
    let mut by_kind: BTreeMap<(String, &str, usize, usize), usize> = BTreeMap::new();
    for f in &s.ffn_matrices {
        *by_kind.entry((f.kind.to_string(), f.proj, f.d_out, f.d_in)).or_insert(0) += 1;
    }
    o += &format!("FFN matrices MASA aligns ({}):\n", s.ffn_matrices.len());
    for ((kind, proj, d_out, d_in), n) in by_kind {
        o += &format!("  {n:4} x {kind:6} {proj:9} {d_out}x{d_in}\n");
    }
    if c.moe.is_some() {
        o += "  (routed experts: extraction keeps the most frequently routed per layer, counted by `masa calibrate`)\n";
    }
    o
}

/// Which kind of masa artifact a safetensors file is, from its `masa` metadata.
pub fn artifact_kind(path: &std::path::Path) -> Option<&'static str> {
    crate::error::regular_file(path).ok()?;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    std::io::Read::read_exact(&mut f, &mut len).ok()?;
    let n = u64::from_le_bytes(len).min(100_000_000) as usize;
    let mut header = vec![0u8; n];
    std::io::Read::read_exact(&mut f, &mut header).ok()?;
    let text = String::from_utf8_lossy(&header);
    if text.contains(crate::stats::FORMAT) {
        Some("stats")
    } else if text.contains(crate::extract::FORMAT) {
        Some("genes")
    } else {
        None
    }
}

/// Summary of a statistics file: provenance, tokens per dataset, and per site the token count
/// and the spectrum of the second moment (largest/median/smallest eigenvalue, effective rank).
pub fn render_stats(s: &crate::stats::Stats) -> crate::Result<String> {
    let m = &s.meta;
    let mut o = format!(
        "statistics ({})\nsource  {} ({}, hash {}…)\n",
        m.format,
        m.source,
        m.arch,
        m.source_hash.chars().take(12).collect::<String>()
    );
    o += &format!("tokens  {} (sequence length {}, seeds {:?})\n", m.tokens, m.seq_len, m.seeds);
    for c in &m.corpus {
        o += &format!("corpus  {c}\n");
    }
    for (d, n) in &m.dataset_tokens {
        o += &format!("  {d:12} {n:>10} tokens\n");
    }
    o += "sites (eigenvalues of the mean second moment S: max / median / min, effective rank exp(entropy))\n";
    for (k, mo) in &s.moments {
        if mo.dim == 0 || mo.xxt.len() != mo.dim * mo.dim {
            o += &format!("  {k:32} no second moment (d={}, {} values)\n", mo.dim, mo.xxt.len());
            continue;
        }
        let sm = mo.mean();
        let mat = faer::Mat::from_fn(mo.dim, mo.dim, |i, j| sm[i * mo.dim + j]);
        let mut ev = mat
            .self_adjoint_eigenvalues(faer::Side::Lower)
            .map_err(|e| crate::MasaError::Invalid(format!("{k}: eigenvalues failed: {e:?}")))?;
        ev.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = ev.iter().map(|v| v.max(0.0)).sum();
        let entropy: f64 = ev.iter().map(|v| v.max(0.0) / total).filter(|p| *p > 0.0).map(|p| -p * p.ln()).sum();
        o += &format!(
            "  {k:32} d={:5} tokens={:>9} λ {:.3e} / {:.3e} / {:.3e}  eff.rank {:.0}\n",
            mo.dim,
            mo.count,
            ev[0],
            ev[ev.len() / 2],
            ev[ev.len() - 1],
            entropy.exp()
        );
    }
    for (k, v) in &s.routing {
        let total: f64 = v.iter().sum();
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        let top: Vec<String> = idx.iter().take(4).map(|&e| format!("e{e} {:.1}%", 100.0 * v[e] / total.max(1.0))).collect();
        o += &format!("  {k:32} {}\n", top.join(", "));
    }
    Ok(o)
}

/// Summary of a gene file: provenance, options, and per matrix r, relative L_out and L_spec.
pub fn render_genes(g: &crate::extract::Genes) -> String {
    let m = &g.meta;
    let mut o = format!(
        "genes ({}, {} mode)\nsource  {} ({}, hash {}…)\n",
        m.format,
        m.mode,
        m.source,
        m.arch,
        m.source_hash.chars().take(12).collect::<String>()
    );
    o += &format!(
        "options rank {:?}, λ {}, experts {}\nstats   {} tokens\n",
        m.options.rank, m.options.lambda, m.options.experts, m.stats_tokens
    );
    o += &format!(
        "{:44} {:>5} {:>9} {:>9} {:>9} {:>9} {:>5} {:>7}\n",
        "matrix", "r", "relLout0", "relLout", "Lspec0/r", "Lspec/r", "iters", "secs"
    );
    for r in &m.matrices {
        o += &format!(
            "{:44} {:>5} {:>9.4} {:>9.4} {:>9.3} {:>9.3} {:>5} {:>7.2}\n",
            r.name.trim_start_matches("model.").trim_end_matches(".weight"),
            r.r,
            r.rel_l_out_start,
            r.rel_l_out,
            r.l_spec_start / r.r as f64,
            r.l_spec / r.r as f64,
            r.iterations,
            r.seconds
        );
    }
    o
}
