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
