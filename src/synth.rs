//! `masa synth`: a synthetic HF checkpoint (`config.json`, bf16 safetensors shards with
//! `model.safetensors.index.json`, a tokenizer) of any configuration masa reads, with seeded
//! random weights. The presets are the exact published configurations of the paper's sources,
//! so users (and masa's benchmarks, docs/extraction.md "Paper-size sources") can size and dry-run
//! calibration and extraction without the real weights.
//!
//! Weights are generated and written tensor by tensor in fixed-size chunks (in parallel, each
//! chunk from its own seeded stream), so memory stays bounded whatever the model size. Scales
//! keep activations finite through every layer: linear weights `U(−a, a)` with
//! `a = 1.7 / √fan_in` (unit-variance outputs for unit-variance inputs), embeddings `U(−1, 1)`,
//! norm scales `1 ± 0.3` (`±0.3` around 0 for Gemma's `1 + w` norms), routers 3× the linear
//! scale so that routing is far from uniform, biases `±0.1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{IoContext, MasaError, Result};
use crate::source::{ModelConfig, NormKind};
use crate::tensorfile::Entry;

/// A published model configuration, kept as data.
pub struct Preset {
    pub name: &'static str,
    /// Where the configuration was published (the `config.json` of the HF repository).
    pub url: &'static str,
    pub config: &'static str,
}

/// The paper's three sources (Sec. 4), each `config.json` verbatim from its HF repository.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "olmo-7b",
        url: "https://huggingface.co/allenai/OLMo-7B-hf/blob/main/config.json",
        config: r#"{
  "architectures": ["OlmoForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": null,
  "clip_qkv": null,
  "eos_token_id": 50279,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 11008,
  "max_position_embeddings": 2048,
  "model_type": "olmo",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 32,
  "pad_token_id": 1,
  "pretraining_tp": 1,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "float32",
  "transformers_version": "4.40.0.dev0",
  "use_cache": true,
  "vocab_size": 50304
}"#,
    },
    Preset {
        name: "olmoe-1b-7b",
        url: "https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json",
        config: r#"{
  "architectures": ["OlmoeForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": null,
  "clip_qkv": null,
  "eos_token_id": 50279,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 1024,
  "max_position_embeddings": 4096,
  "model_type": "olmoe",
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts": 64,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 16,
  "num_key_value_heads": 16,
  "output_router_logits": false,
  "pad_token_id": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "router_aux_loss_coef": 0.01,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 50304
}"#,
    },
    Preset {
        name: "deepseek-moe-16b",
        url: "https://huggingface.co/deepseek-ai/deepseek-moe-16b-base/blob/main/config.json",
        config: r#"{
  "architectures": ["DeepseekForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "auto_map": {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"
  },
  "aux_loss_alpha": 0.001,
  "bos_token_id": 100000,
  "eos_token_id": 100001,
  "first_k_dense_replace": 1,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 10944,
  "max_position_embeddings": 4096,
  "model_type": "deepseek",
  "moe_intermediate_size": 1408,
  "moe_layer_freq": 1,
  "n_routed_experts": 64,
  "n_shared_experts": 2,
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts_per_tok": 6,
  "num_hidden_layers": 28,
  "num_key_value_heads": 16,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 10000,
  "scoring_func": "softmax",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0",
  "use_cache": true,
  "vocab_size": 102400
}"#,
    },
];

/// HF's default `max_shard_size` of `save_pretrained` (5 GB).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// Elements generated per chunk (one seeded stream each).
const CHUNK: usize = 1 << 20;

/// What `masa synth` writes.
pub struct SynthOptions {
    /// A preset name ([`PRESETS`]) or the path of an HF `config.json`.
    pub config: String,
    pub out: PathBuf,
    pub seed: u64,
    pub max_shard_bytes: u64,
}

/// A preset's configuration, or the `config.json` at `spec`.
pub fn config_json(spec: &str) -> Result<(serde_json::Value, PathBuf)> {
    if let Some(p) = PRESETS.iter().find(|p| p.name == spec) {
        let json = serde_json::from_str(p.config).map_err(|e| MasaError::Invalid(format!("preset {}: {e}", p.name)))?;
        return Ok((json, PathBuf::from(p.url)));
    }
    let path = Path::new(spec);
    if !path.is_file() {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        return Err(MasaError::Invalid(format!("--config {spec}: neither a preset ({}) nor a config.json file", names.join(", "))));
    }
    let text = std::fs::read_to_string(path).at(path)?;
    let json = serde_json::from_str(&text).map_err(|e| MasaError::bad_file(path, format!("invalid JSON: {e}")))?;
    Ok((json, path.to_path_buf()))
}

/// Write `config.json` and the bf16 safetensors weights of `config` into `out`; returns the
/// parsed configuration and the bytes of weights written. `on_bytes` reports progress.
pub fn write_checkpoint(
    config: &serde_json::Value,
    origin: &Path,
    out: &Path,
    seed: u64,
    max_shard_bytes: u64,
    on_bytes: &dyn Fn(u64),
) -> Result<(ModelConfig, u64)> {
    let cfg = ModelConfig::from_hf_config(origin, config)?;
    std::fs::create_dir_all(out).at(out)?;
    let entries: Vec<Entry> = cfg.hf_tensors().into_iter().map(|(name, shape)| Entry { name, dtype: Dtype::BF16, shape }).collect();
    // Greedy shards in tensor order, as `save_pretrained` fills them.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let b = e.bytes() as u64;
        if size > 0 && size + b > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
        size += b;
    }
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut weight_map = serde_json::Map::new();
    let total: u64 = entries.iter().map(|e| e.bytes() as u64).sum();
    for (s, idx) in shards.iter().enumerate() {
        let file = if shards.len() == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards.len())
        };
        let part: Vec<Entry> = idx.iter().map(|&i| entries[i].clone()).collect();
        crate::tensorfile::write(&out.join(&file), &part, &meta, |i, w| {
            let e = &part[i];
            let (scale, offset) = init_scale(&cfg, &e.name, &e.shape);
            write_uniform_bf16(w, seed, &e.name, e.shape.iter().product(), scale, offset)?;
            on_bytes(e.bytes() as u64);
            Ok(())
        })?;
        for e in &part {
            weight_map.insert(e.name.clone(), file.clone().into());
        }
    }
    if shards.len() > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let p = out.join("model.safetensors.index.json");
        crate::home::write_atomic(&p, serde_json::to_string_pretty(&index).map_err(|e| MasaError::Invalid(e.to_string()))?.as_bytes())?;
    }
    let mut written = config.clone();
    written["torch_dtype"] = "bfloat16".into();
    let p = out.join("config.json");
    crate::home::write_atomic(&p, serde_json::to_string_pretty(&written).map_err(|e| MasaError::Invalid(e.to_string()))?.as_bytes())?;
    Ok((cfg, total))
}

/// `(a, offset)` of the `offset + U(−a, a)` init of one tensor (module doc).
fn init_scale(cfg: &ModelConfig, name: &str, shape: &[usize]) -> (f32, f32) {
    let linear = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
    match shape {
        [_] if name.contains("norm") => (0.3, if cfg.norm == NormKind::RmsOnePlus { 0.0 } else { 1.0 }),
        [_] => (0.1, 0.0),
        _ if name == "model.embed_tokens.weight" => (1.0, 0.0),
        [_, fan_in] if name.ends_with("mlp.gate.weight") => (3.0 * linear(*fan_in), 0.0),
        [_, fan_in] => (linear(*fan_in), 0.0),
        _ => (0.0, 0.0),
    }
}

/// `n` values `offset + scale·U(−1, 1)` as bf16 bytes, generated in parallel [`CHUNK`]s (chunk
/// `c` of tensor `name` from the stream `tensor_rng(seed, "name#c")`) and written in order.
fn write_uniform_bf16(w: &mut dyn std::io::Write, seed: u64, name: &str, n: usize, scale: f32, offset: f32) -> std::io::Result<()> {
    let chunks = n.div_ceil(CHUNK);
    let per_round = 2 * rayon::current_num_threads().max(1);
    for first in (0..chunks).step_by(per_round) {
        let bufs: Vec<Vec<u8>> = (first..(first + per_round).min(chunks))
            .into_par_iter()
            .map(|c| {
                let len = CHUNK.min(n - c * CHUNK);
                let mut rng = crate::rng::tensor_rng(seed, &format!("{name}#{c}"));
                let mut buf = Vec::with_capacity(2 * len);
                for _ in 0..len {
                    let u = ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    buf.extend_from_slice(&half::bf16::from_f32(offset + scale * u).to_le_bytes());
                }
                buf
            })
            .collect();
        for b in &bufs {
            w.write_all(b)?;
        }
    }
    Ok(())
}

/// `masa synth`: the checkpoint plus the tokenizer of `tokenizer` (a GGUF file or HF directory)
/// saved as `tokenizer.json`. Refuses a tokenizer with more tokens than the embedding has rows.
pub fn run(opts: &SynthOptions, tokenizer: &crate::source::tokenizer::Tokenizer) -> Result<u64> {
    let (json, origin) = config_json(&opts.config)?;
    let cfg = ModelConfig::from_hf_config(&origin, &json)?;
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(MasaError::Invalid(format!(
            "the tokenizer has {} tokens, the configuration's vocab_size is {}: choose a tokenizer with at most {} tokens (--tokenizer)",
            tokenizer.vocab_size(),
            cfg.vocab_size,
            cfg.vocab_size
        )));
    }
    let total: u64 = cfg.hf_tensors().iter().map(|(_, s)| 2 * s.iter().product::<usize>() as u64).sum();
    let bar = crate::progress::bytes_bar(total, "writing weights");
    let (_, written) = write_checkpoint(&json, &origin, &opts.out, opts.seed, opts.max_shard_bytes, &|b| bar.inc(b))?;
    bar.finish_and_clear();
    tokenizer.save_hf(&opts.out)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_with_the_published_shapes() {
        let params = |name: &str| {
            let (json, origin) = config_json(name).unwrap();
            let cfg = ModelConfig::from_hf_config(&origin, &json).unwrap();
            cfg.hf_tensors().iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum::<u64>()
        };
        // Parameter counts of the released checkpoints (HF model cards: 6.9B, 6.9B, 16.4B).
        assert_eq!(params("olmo-7b"), 6_888_095_744);
        assert_eq!(params("olmoe-1b-7b"), 6_919_161_856);
        assert_eq!(params("deepseek-moe-16b"), 16_375_728_128);
        let e = config_json("olmo-70b").err().unwrap().to_string();
        assert!(e.contains("olmo-7b") && e.contains("config.json"), "{e}");
    }
}
