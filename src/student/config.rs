//! Student configs: Llama-architecture fields (HF `LlamaConfig` names), the named presets, the
//! HF tensor names and shapes of a student, and its `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, MasaError, Result};

/// A Llama student: RMSNorm, RoPE, SwiGLU, MHA/GQA, tied embeddings by default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudentConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Set from the source tokenizer when the student is built for a source.
    #[serde(default)]
    pub vocab_size: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Std of HF's normal init (Scratch).
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

fn default_max_pos() -> usize {
    2048
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_init_range() -> f64 {
    0.02
}

/// Named shapes: `(name, layers, hidden, ffn, heads, kv_heads, what it is)`. The paper's four
/// shapes, the same layer and width ratios scaled down for 2-core CPUs, and `tiny` for tests.
pub const PRESETS: &[(&str, usize, usize, usize, usize, usize, &str)] = &[
    ("tiny", 2, 64, 192, 4, 2, "seconds to train; tests and quick checks"),
    ("cpu-6l-256", 6, 256, 768, 4, 4, "paper's 12L-1024x3072 at half depth and quarter width"),
    ("cpu-8l-256", 8, 256, 768, 4, 4, "paper's 16L-1024x3072 at half depth and quarter width"),
    ("cpu-6l-512", 6, 512, 1024, 8, 8, "paper's 12L-2048x4096 at half depth and quarter width"),
    ("cpu-8l-512", 8, 512, 1024, 8, 8, "paper's 16L-2048x4096 at half depth and quarter width"),
    ("paper-12l-1024", 12, 1024, 3072, 16, 16, "paper shape (267M with its vocabulary)"),
    ("paper-16l-1024", 16, 1024, 3072, 16, 16, "paper shape (321M)"),
    ("paper-12l-2048", 12, 2048, 4096, 32, 32, "paper shape (709M)"),
    ("paper-16l-2048", 16, 2048, 4096, 32, 32, "paper shape (877M)"),
];

/// The presets as a table for `masa init --student list`.
pub fn presets_table() -> String {
    let mut out =
        format!("{:<16} {:>6} {:>6} {:>6} {:>5} {:>8}  {}\n", "preset", "layers", "hidden", "ffn", "heads", "kv_heads", "what it is");
    for (name, layers, hidden, ffn, heads, kv, what) in PRESETS {
        out += &format!("{name:<16} {layers:>6} {hidden:>6} {ffn:>6} {heads:>5} {kv:>8}  {what}\n");
    }
    out
}

impl StudentConfig {
    pub fn preset(name: &str) -> Result<Self> {
        let (_, layers, hidden, ffn, heads, kv, _) = PRESETS.iter().find(|p| p.0 == name).ok_or_else(|| {
            MasaError::Invalid(format!(
                "unknown student preset `{name}`; presets: {} (or a student.toml path)",
                PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
            ))
        })?;
        Ok(StudentConfig {
            hidden_size: *hidden,
            intermediate_size: *ffn,
            num_hidden_layers: *layers,
            num_attention_heads: *heads,
            num_key_value_heads: *kv,
            vocab_size: 0,
            max_position_embeddings: default_max_pos(),
            rope_theta: default_rope_theta(),
            rms_norm_eps: default_eps(),
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            initializer_range: default_init_range(),
        })
    }

    /// A preset name, or a TOML/JSON file with these fields.
    pub fn from_spec(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if !p.exists() {
            return Self::preset(spec);
        }
        let text = std::fs::read_to_string(p).at(p)?;
        let cfg: StudentConfig = if spec.ends_with(".json") {
            serde_json::from_str(&text).map_err(|e| MasaError::bad_file(p, format!("invalid student config: {e}")))?
        } else {
            // A misspelt key would otherwise fall back to its default without a word.
            let table: toml::Table = toml::from_str(&text).map_err(|e| MasaError::bad_file(p, format!("invalid student config: {e}")))?;
            let known = serde_json::to_value(Self::preset("cpu-6l-256")?).map_err(|e| MasaError::Invalid(e.to_string()))?;
            if let Some(k) = table.keys().find(|k| known.get(k.as_str()).is_none()) {
                let names: Vec<&String> = known.as_object().map(|o| o.keys().collect()).unwrap_or_default();
                return Err(MasaError::field(
                    p,
                    k,
                    format!("unknown key; a student config has {}", names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")),
                ));
            }
            toml::from_str(&text).map_err(|e| MasaError::bad_file(p, format!("invalid student config: {e}")))?
        };
        cfg.validate().map_err(|e| MasaError::bad_file(p, e.to_string()))?;
        Ok(cfg)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(MasaError::Invalid(format!("invalid student shape: {msg}")));
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.num_hidden_layers == 0 {
            return bad("hidden_size, intermediate_size and num_hidden_layers must be positive".into());
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!("hidden_size {} is not divisible by num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!("head dim {} must be even for RoPE", self.head_dim()));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope_theta {}: the RoPE base must be positive and finite", self.rope_theta));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!("rms_norm_eps {}: the norm epsilon must be positive and finite", self.rms_norm_eps));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings 0: a student needs at least one position".into());
        }
        if !(self.initializer_range >= 0.0 && self.initializer_range.is_finite()) {
            return bad(format!("initializer_range {}: must be a finite, non-negative std", self.initializer_range));
        }
        // The weights alone (f32) must fit in this machine's memory; checked in u128 so that no
        // shape overflows the count.
        let (h, f, l, v) =
            (self.hidden_size as u128, self.intermediate_size as u128, self.num_hidden_layers as u128, self.vocab_size.max(1) as u128);
        let params = v * h * 2 + l * (4 * h * h + 3 * h * f + 2 * h) + h;
        let bytes = params * 4;
        if let Some(total) = crate::limits::memory_bytes() {
            if bytes > total as u128 {
                return bad(format!(
                    "about {:.3e} parameters ({:.1} GB of f32 weights alone) cannot fit in this machine's {:.1} GB of memory",
                    params as f64,
                    bytes as f64 / 1e9,
                    total as f64 / 1e9
                ));
            }
        }
        Ok(())
    }

    /// The whole student's Scratch init, flat in [`crate::student::llama::Layout`] order: every
    /// tensor exactly as [`crate::rng::scratch`] makes it (so as `masa init --strategy scratch
    /// --seed SEED` writes it).
    pub fn scratch_init(&self, seed: u64) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.num_parameters());
        for (name, shape) in self.tensor_shapes() {
            out.extend(crate::rng::scratch(seed, &name, &shape, self.initializer_range));
        }
        out
    }

    /// Parameter count with tied or untied embeddings.
    pub fn num_parameters(&self) -> usize {
        let (h, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.num_key_value_heads * self.head_dim();
        let layer = h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h;
        v * h * if self.tie_word_embeddings { 1 } else { 2 } + self.num_hidden_layers * layer + h
    }

    /// Every parameter tensor of the student with its HF name and shape, in a stable order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.num_key_value_heads * self.head_dim();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// HF `config.json` for `LlamaForCausalLM`.
    pub fn hf_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
            "pretraining_tp": 1,
            "use_cache": true,
            "torch_dtype": "float32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A misspelt key in a student TOML is an error naming it, not a silent default; a shape
    /// whose weights cannot fit in memory is refused before anything is allocated.
    #[test]
    fn unknown_keys_and_impossible_shapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "hidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 2\ntie_embeddings = false\n").unwrap();
        let e = StudentConfig::from_spec(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("tie_embeddings") && e.contains("unknown key") && e.contains("tie_word_embeddings"), "{e}");
        std::fs::write(&p, "hidden_size = 64\nintermediate_size = 9223372036854775807\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 2\n").unwrap();
        let e = StudentConfig::from_spec(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("cannot fit in this machine's") && e.contains("GB"), "{e}");
        for (line, needle) in
            [("rms_norm_eps = -1.0", "rms_norm_eps"), ("rope_theta = 0.0", "RoPE base"), ("max_position_embeddings = 0", "position")]
        {
            std::fs::write(&p, format!("hidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 2\n{line}\n")).unwrap();
            let e = StudentConfig::from_spec(p.to_str().unwrap()).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("s.toml"), "{line}: {e}");
        }
    }
}
