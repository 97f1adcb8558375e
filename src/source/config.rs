//! The architecture description every source model is normalised to, built from GGUF metadata
//! or from an HF `config.json`. One `Arch` variant per supported family (mistral.rs style):
//! adding an architecture is one variant, its `from_*` branch, and its layer recipe in `model`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::gguf::GgufFile;
use crate::error::{MasaError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama / SmolLM2 (`LlamaForCausalLM`).
    Llama,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): QKV bias.
    Qwen2,
    /// Gemma 3 text (`Gemma3ForCausalLM`): (1+w) RMSNorms, q/k norms, post-norms, GELU-tanh,
    /// sliding-window layers, scaled embeddings.
    Gemma3,
    /// OLMo (`OlmoForCausalLM`, OLMo-7B-hf layout): LayerNorm without parameters, optional clip_qkv.
    Olmo,
    /// OLMoE (`OlmoeForCausalLM`): routed experts, top-k, optional `norm_topk_prob`, full-width q/k RMSNorm.
    Olmoe,
    /// DeepSeekMoE v1 (`DeepseekForCausalLM`): leading dense layers, shared + routed experts.
    Deepseek,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
            Arch::Olmo => "olmo",
            Arch::Olmoe => "olmoe",
            Arch::Deepseek => "deepseek",
        }
    }

    /// From an HF `architectures[0]` or `model_type` string.
    pub fn from_hf(name: &str) -> Option<Arch> {
        Some(match name {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
            "Gemma3ForCausalLM" | "gemma3_text" | "gemma3" => Arch::Gemma3,
            "OlmoForCausalLM" | "olmo" => Arch::Olmo,
            "OlmoeForCausalLM" | "olmoe" => Arch::Olmoe,
            "DeepseekForCausalLM" | "deepseek" => Arch::Deepseek,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    GeluTanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `x / rms(x) * w`.
    Rms,
    /// Gemma: `x / rms(x) * (1 + w)`.
    RmsOnePlus,
    /// OLMo: `(x - mean) / std`, no weight or bias.
    LayerNormNoParams,
}

/// Routed-expert FFN layers (OLMoE, DeepSeekMoE).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub moe_intermediate_size: usize,
    /// DeepSeekMoE: shared experts, fused into one MLP of width `n_shared * moe_intermediate`.
    pub n_shared_experts: usize,
    /// DeepSeekMoE: layers `< first_k_dense_replace` are dense.
    pub first_k_dense_replace: usize,
    /// DeepSeekMoE: a layer `l >= first_k_dense_replace` is MoE when `l % moe_layer_freq == 0`.
    pub moe_layer_freq: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    /// Gemma 3: RoPE base of the sliding-window (local) layers.
    pub rope_local_theta: Option<f64>,
    pub norm_eps: f64,
    pub norm: NormKind,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Multiply the token embeddings by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// Softmax scale of attention scores.
    pub attn_scale: f64,
    /// Gemma 3: per-head RMSNorm of q and k. OLMoE: full-width RMSNorm of q and k.
    pub qk_norm: QkNorm,
    /// Gemma 3: extra norms after attention and after the FFN.
    pub post_norms: bool,
    pub clip_qkv: Option<f64>,
    /// Gemma 3: window of the local layers and the period of global layers
    /// (layer `l` is global when `(l + 1) % pattern == 0`).
    pub sliding_window: Option<usize>,
    pub sliding_window_pattern: Option<usize>,
    pub moe: Option<MoeConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub max_position_embeddings: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    None,
    PerHead,
    Full,
}

impl ModelConfig {
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        match &self.moe {
            None => false,
            Some(m) => layer >= m.first_k_dense_replace && layer % m.moe_layer_freq.max(1) == 0,
        }
    }

    pub fn is_sliding_layer(&self, layer: usize) -> bool {
        match (self.sliding_window, self.sliding_window_pattern) {
            (Some(_), Some(p)) => (layer + 1) % p != 0,
            (Some(_), None) => true,
            _ => false,
        }
    }

    pub fn rope_theta_for(&self, layer: usize) -> f64 {
        match self.rope_local_theta {
            Some(local) if self.is_sliding_layer(layer) => local,
            _ => self.rope_theta,
        }
    }

    /// Shape checks that every architecture shares; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| Err(MasaError::field(path, field, msg));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("num_attention_heads", "heads must be positive".into());
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(
                "num_key_value_heads",
                format!("{} attention heads are not a multiple of {} key/value heads", self.num_attention_heads, self.num_key_value_heads),
            );
        }
        if self.head_dim % 2 != 0 {
            return bad("head_dim", format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 || self.intermediate_size == 0 || self.head_dim == 0
        {
            return bad(
                "hidden_size",
                format!(
                    "sizes must be positive (hidden {}, layers {}, vocab {}, FFN {}, head_dim {})",
                    self.hidden_size, self.num_hidden_layers, self.vocab_size, self.intermediate_size, self.head_dim
                ),
            );
        }
        // Far beyond any real model: a corrupt or hostile size would otherwise size allocations
        // (a layer count of 2³² exhausted memory before any tensor was read).
        let experts = self.moe.as_ref().map_or(0, |m| m.n_routed_experts);
        for (field, v, max) in [
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 22),
            ("num_hidden_layers", self.num_hidden_layers, 4096),
            ("num_attention_heads", self.num_attention_heads, 1 << 14),
            ("head_dim", self.head_dim, 1 << 14),
            ("vocab_size", self.vocab_size, 1 << 24),
            ("num_experts", experts, 1 << 14),
        ] {
            if v > max {
                return bad(field, format!("{v} is beyond any real model (at most {max}): the file is corrupt"));
            }
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return bad("rms_norm_eps", format!("{}: the normalisation epsilon must be positive and finite", self.norm_eps));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad("rope_theta", format!("{}: the RoPE base must be positive and finite", self.rope_theta));
        }
        if let Some(m) = &self.moe {
            if m.top_k == 0 || m.top_k > m.n_routed_experts {
                return bad("num_experts_per_tok", format!("top-k {} must be in 1..={}", m.top_k, m.n_routed_experts));
            }
        }
        Ok(())
    }

    /// Build from GGUF metadata (`{arch}.*` keys). Supports the architectures llama.cpp writes
    /// for the packaged sources: `llama`, `qwen2`, `gemma3`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch_name = g.architecture()?;
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(MasaError::unsupported(
                    &g.path,
                    "architecture",
                    format!("`{other}` (GGUF general.architecture); masa reads llama, qwen2 and gemma3 GGUF files, and olmo/olmoe/deepseek as HF directories"),
                ))
            }
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let hidden = g.get_usize(&k("embedding_length"))?;
        let heads = g.get_usize(&k("attention.head_count"))?;
        let kv_heads = g.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
        let head_dim = g.opt_usize(&k("attention.key_length"))?.unwrap_or(hidden / heads.max(1));
        let vocab = match g.opt_usize(&k("vocab_size"))? {
            Some(v) => v,
            None => g
                .tensor_info("token_embd.weight")
                .map(|(s, _)| s[0])
                .ok_or_else(|| MasaError::bad_file(&g.path, "no `token_embd.weight` tensor and no vocab_size metadata"))?,
        };
        let gemma = arch == Arch::Gemma3;
        let cfg = ModelConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: g.get_usize(&k("feed_forward_length"))?,
            num_hidden_layers: g.get_usize(&k("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rope_theta: {
                // llama.cpp writes `rope.scaling.type` (none, linear, yarn, ...) for scaled RoPE;
                // masa implements the unscaled one only.
                if let Some(t) = g.opt_str(&k("rope.scaling.type"))? {
                    if t != "none" {
                        return Err(MasaError::unsupported(
                            &g.path,
                            "RoPE scaling",
                            format!("`{t}` ({}); masa implements the unscaled RoPE only", k("rope.scaling.type")),
                        ));
                    }
                }
                g.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0)
            },
            rope_local_theta: gemma.then_some(10_000.0),
            norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
            norm: if gemma { NormKind::RmsOnePlus } else { NormKind::Rms },
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
            tie_word_embeddings: g.tensor_info("output.weight").is_none(),
            attention_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
            scale_embeddings: gemma,
            // Gemma 3 uses query_pre_attn_scalar = head_dim for the released text models.
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            qk_norm: if gemma { QkNorm::PerHead } else { QkNorm::None },
            post_norms: gemma,
            clip_qkv: None,
            sliding_window: if gemma { g.opt_usize(&k("attention.sliding_window"))? } else { None },
            sliding_window_pattern: if gemma { Some(g.opt_usize(&k("attention.sliding_window_pattern"))?.unwrap_or(6)) } else { None },
            moe: None,
            bos_token_id: g.opt_usize("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
            eos_token_id: g.opt_usize("tokenizer.ggml.eos_token_id")?.map(|x| x as u32),
            max_position_embeddings: g.opt_usize(&k("context_length"))?.unwrap_or(2048),
        };
        cfg.validate(&g.path)?;
        Ok(cfg)
    }

    /// Build from an HF `config.json`.
    pub fn from_hf_config(path: &Path, json: &serde_json::Value) -> Result<Self> {
        let f = HfFields { path, json };
        let arch_name = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| json.get("model_type").and_then(|m| m.as_str()))
            .ok_or_else(|| MasaError::field(path, "architectures", "missing (and no `model_type` either)"))?;
        let arch = Arch::from_hf(arch_name).ok_or_else(|| {
            MasaError::unsupported(
                path,
                "architecture",
                format!("`{arch_name}`; masa supports LlamaForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM, OlmoForCausalLM, OlmoeForCausalLM, DeepseekForCausalLM"),
            )
        })?;
        let hidden = f.usize("hidden_size")?;
        let heads = f.usize("num_attention_heads")?;
        let kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden / heads.max(1));
        let gemma = arch == Arch::Gemma3;
        let moe = match arch {
            Arch::Olmoe => Some(MoeConfig {
                n_routed_experts: f.usize("num_experts")?,
                top_k: f.usize("num_experts_per_tok")?,
                norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(false),
                moe_intermediate_size: f.usize("intermediate_size")?,
                n_shared_experts: 0,
                first_k_dense_replace: 0,
                moe_layer_freq: 1,
            }),
            Arch::Deepseek => Some(MoeConfig {
                n_routed_experts: f.usize("n_routed_experts")?,
                top_k: f.usize("num_experts_per_tok")?,
                // `MoEGate` renormalises only when top_k > 1 (OLMoE does so for any k).
                norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(false) && f.usize("num_experts_per_tok")? > 1,
                moe_intermediate_size: f.usize("moe_intermediate_size")?,
                n_shared_experts: f.opt_usize("n_shared_experts")?.unwrap_or(0),
                first_k_dense_replace: f.opt_usize("first_k_dense_replace")?.unwrap_or(0),
                moe_layer_freq: f.opt_usize("moe_layer_freq")?.unwrap_or(1),
            }),
            _ => None,
        };
        if arch == Arch::Deepseek {
            if let Some(s) = json.get("scoring_func").and_then(|s| s.as_str()) {
                if s != "softmax" {
                    return Err(MasaError::field(path, "scoring_func", format!("`{s}` is not supported (DeepSeekMoE v1 uses softmax)")));
                }
            }
        }
        let cfg = ModelConfig {
            arch,
            vocab_size: f.usize("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rope_theta: f.rope_theta("full_attention", "rope_theta")?.unwrap_or(10_000.0),
            rope_local_theta: if gemma {
                Some(f.rope_theta("sliding_attention", "rope_local_base_freq")?.unwrap_or(10_000.0))
            } else {
                None
            },
            norm_eps: match arch {
                // `OlmoLayerNorm` hard-codes eps = 1e-5 and reads no config field.
                Arch::Olmo => 1e-5,
                // Defaults of each HF config class when the field is absent.
                _ => f.opt_f64("rms_norm_eps")?.unwrap_or(if arch == Arch::Olmoe { 1e-5 } else { 1e-6 }),
            },
            norm: match arch {
                Arch::Gemma3 => NormKind::RmsOnePlus,
                Arch::Olmo => NormKind::LayerNormNoParams,
                _ => NormKind::Rms,
            },
            activation: match json.get("hidden_activation").or(json.get("hidden_act")).and_then(|a| a.as_str()) {
                None | Some("silu") | Some("swish") => Activation::Silu,
                Some("gelu_pytorch_tanh") | Some("gelu_tanh") => Activation::GeluTanh,
                Some(other) => {
                    return Err(MasaError::field(path, "hidden_act", format!("`{other}` is not supported (silu, gelu_pytorch_tanh)")))
                }
            },
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(arch == Arch::Gemma3),
            attention_bias: f.opt_bool("attention_bias")?.unwrap_or(arch == Arch::Qwen2),
            scale_embeddings: gemma,
            attn_scale: match f.opt_f64("query_pre_attn_scalar")? {
                Some(s) if gemma => 1.0 / s.sqrt(),
                _ => 1.0 / (head_dim as f64).sqrt(),
            },
            qk_norm: match arch {
                Arch::Gemma3 => QkNorm::PerHead,
                Arch::Olmoe => QkNorm::Full,
                _ => QkNorm::None,
            },
            post_norms: gemma,
            clip_qkv: f.opt_f64("clip_qkv")?,
            sliding_window: if gemma { f.opt_usize("sliding_window")? } else { None },
            sliding_window_pattern: if gemma { Some(f.opt_usize("sliding_window_pattern")?.unwrap_or(6)) } else { None },
            moe,
            bos_token_id: f.opt_usize("bos_token_id")?.map(|x| x as u32),
            eos_token_id: f.opt_usize("eos_token_id")?.map(|x| x as u32),
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

/// Typed access to `config.json` fields with errors that name the file and field.
struct HfFields<'a> {
    path: &'a Path,
    json: &'a serde_json::Value,
}

impl HfFields<'_> {
    fn present(&self, key: &str) -> Option<&serde_json::Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    /// The RoPE base, from the top-level key `old` (transformers ≤ 4) or from `rope_parameters`
    /// (transformers 5: `{"rope_theta": ..., "rope_type": ...}`, or for Gemma 3 one such object
    /// per layer type, of which `layer_type`'s is read). masa implements only the unscaled
    /// ("default") RoPE: any other `rope_type`, or a `rope_scaling` object (the older key for
    /// the same thing), is refused naming the field, never silently ignored. Two different
    /// bases in the two places are an error too.
    fn rope_theta(&self, layer_type: &str, old: &str) -> Result<Option<f64>> {
        let check_type = |field: &str, v: &serde_json::Value| -> Result<()> {
            let ty = v.get("rope_type").or_else(|| v.get("type")).filter(|t| !t.is_null());
            match ty.map(|t| t.as_str()) {
                None | Some(Some("default")) => Ok(()),
                Some(Some(other)) => Err(MasaError::field(
                    self.path,
                    field,
                    format!(
                        "RoPE scaling `{other}` is not supported: masa implements the unscaled (`default`) RoPE only, \
                         so this model's positions would be encoded wrongly; remove the scaling only if the checkpoint was trained without it"
                    ),
                )),
                Some(None) => Err(MasaError::field(self.path, field, format!("expected a string rope_type, found {v}"))),
            }
        };
        if let Some(scaling) = self.present("rope_scaling") {
            let scaled = |v: &serde_json::Value| v.as_object().is_some_and(|o| !o.is_empty());
            if scaled(scaling) {
                // Gemma 3 style: one object per layer type.
                match scaling.get(layer_type) {
                    Some(v) if scaled(v) => check_type(&format!("rope_scaling.{layer_type}"), v)?,
                    _ => check_type("rope_scaling", scaling)?,
                }
            }
        }
        let top = self.opt_f64(old)?;
        let Some(params) = self.present("rope_parameters") else { return Ok(top) };
        let (field, params) = match params.get(layer_type).filter(|v| v.is_object()) {
            Some(v) => (format!("rope_parameters.{layer_type}"), v),
            None => ("rope_parameters".to_string(), params),
        };
        if !params.is_object() {
            return Err(MasaError::field(self.path, &field, format!("expected an object, found {params}")));
        }
        check_type(&field, params)?;
        let nested = match params.get("rope_theta").filter(|v| !v.is_null()) {
            None => None,
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| MasaError::field(self.path, format!("{field}.rope_theta"), format!("expected a number, found {v}")))?,
            ),
        };
        match (top, nested) {
            (Some(a), Some(b)) if a != b => Err(MasaError::field(
                self.path,
                format!("{field}.rope_theta"),
                format!("{b} disagrees with the top-level `{old}` {a}; say the RoPE base once"),
            )),
            (a, b) => Ok(b.or(a)),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| MasaError::field(self.path, key, "required field is missing"))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            // eos_token_id may be a list in HF configs; take the first.
            Some(serde_json::Value::Array(a)) => Ok(a.first().and_then(|v| v.as_u64()).map(|v| v as usize)),
            Some(v) => v
                .as_u64()
                .map(|v| Some(v as usize))
                .ok_or_else(|| MasaError::field(self.path, key, format!("expected a non-negative integer, found {v}"))),
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| MasaError::field(self.path, key, format!("expected a number, found {v}"))),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| MasaError::field(self.path, key, format!("expected true/false, found {v}"))),
        }
    }
}
