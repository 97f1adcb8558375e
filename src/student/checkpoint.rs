//! The HF-format checkpoint directory every strategy and trainer writes (`config.json`,
//! `model.safetensors` with HF key names, `tokenizer.json`, `tokenizer_config.json`, and
//! `masa.json` saying what produced it), and reading one back as flat trainable parameters.
//! HF transformers loads it as `LlamaForCausalLM`; masa loads it back as a source model
//! (`SourceModel::open(dir)`).

use std::path::{Path, PathBuf};

use candle_core::{Device as CpuDevice, Tensor};

use crate::error::{IoContext, MasaError, Result};
use crate::source::tokenizer::Tokenizer;
use crate::source::{Activation, Arch, ModelConfig, NormKind, QkNorm, SourceWeights};
use crate::student::StudentConfig;

/// The student config of a plain Llama model directory, or an error naming what differs.
pub fn student_config_of(path: &Path, c: &ModelConfig) -> Result<StudentConfig> {
    let cfg = llama_shape(c).ok_or_else(|| {
        MasaError::unsupported(
            path,
            "student architecture",
            "masa trains plain Llama students (RMSNorm, SwiGLU, RoPE, no biases, head_dim × heads = hidden); \
             write one with `masa init`",
        )
    })?;
    cfg.validate()?;
    Ok(cfg)
}

/// The student config of a model the training engine can run: plain Llama (RMSNorm, SwiGLU,
/// rotate-half RoPE, no biases, q/k norms, post-norms, sliding windows or experts, head_dim ×
/// heads = hidden), e.g. SmolLM2 and every masa student; `None` otherwise.
pub fn plain_llama(c: &ModelConfig) -> Option<StudentConfig> {
    llama_shape(c).filter(|cfg| cfg.validate().is_ok())
}

fn llama_shape(c: &ModelConfig) -> Option<StudentConfig> {
    let plain = c.arch == Arch::Llama
        && c.norm == NormKind::Rms
        && c.activation == Activation::Silu
        && !c.attention_bias
        && !c.scale_embeddings
        && c.qk_norm == QkNorm::None
        && !c.post_norms
        && c.clip_qkv.is_none()
        && c.sliding_window.is_none()
        && c.moe.is_none()
        && c.rope_local_theta.is_none()
        && (c.attn_scale * (c.head_dim as f64).sqrt() - 1.0).abs() < 1e-9
        && c.head_dim * c.num_attention_heads == c.hidden_size;
    if !plain {
        return None;
    }
    Some(StudentConfig {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        rope_theta: c.rope_theta,
        rms_norm_eps: c.norm_eps,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: c.bos_token_id,
        eos_token_id: c.eos_token_id,
        initializer_range: 0.02,
    })
}

/// Flat f32 parameters of `cfg` read from an opened model (HF names, `tensor_shapes()` order).
pub fn load_params(weights: &SourceWeights, cfg: &StudentConfig) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(cfg.num_parameters());
    for (name, shape) in cfg.tensor_shapes() {
        let t = weights.tensor_shaped(&name, &shape)?;
        out.extend(t.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Flat parameters (`tensor_shapes()` order) as named tensors.
pub fn student_tensors(cfg: &StudentConfig, params: &[f32]) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::new();
    let mut off = 0;
    for (name, shape) in cfg.tensor_shapes() {
        let n: usize = shape.iter().product();
        tensors.push((name, Tensor::from_slice(&params[off..off + n], shape.as_slice(), &CpuDevice::Cpu)?));
        off += n;
    }
    Ok(tensors)
}

/// Write flat parameters as an HF checkpoint directory (atomic, via [`save_checkpoint`]).
pub fn save_student(dir: &Path, cfg: &StudentConfig, params: &[f32], tok: &Tokenizer, provenance: &serde_json::Value) -> Result<()> {
    save_checkpoint(dir, cfg, &student_tensors(cfg, params)?, tok, provenance)
}

/// Write an HF-format checkpoint directory atomically: everything goes to a staging directory
/// beside `dir`, which then replaces `dir`. `tensors` must match `cfg.tensor_shapes()` (names
/// and shapes), be f32 and finite. `provenance` becomes `masa.json`.
pub fn save_checkpoint(
    dir: &Path,
    cfg: &StudentConfig,
    tensors: &[(String, Tensor)],
    tokenizer: &Tokenizer,
    provenance: &serde_json::Value,
) -> Result<()> {
    check_tensors(cfg, tensors)?;
    check_replaceable(dir)?;
    let stage = sibling(dir, "staging");
    if stage.exists() {
        std::fs::remove_dir_all(&stage).at(&stage)?;
    }
    let staged = (|| {
        std::fs::create_dir_all(&stage).at(&stage)?;
        let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).unwrap_or_default();
        std::fs::write(stage.join("config.json"), json(&cfg.hf_config_json())).at(stage.join("config.json"))?;
        std::fs::write(stage.join("masa.json"), json(provenance)).at(stage.join("masa.json"))?;
        let st = stage.join("model.safetensors");
        let map: std::collections::HashMap<&str, Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        candle_core::safetensors::save(&map, &st).map_err(|e| MasaError::bad_file(&st, e.to_string()))?;
        tokenizer.save_hf(&stage)
    })();
    if let Err(e) = staged {
        // Disk full, read-only: the half-written staging directory goes, the old output stays.
        let _ = std::fs::remove_dir_all(&stage);
        return Err(e);
    }
    if dir.exists() {
        // Moved aside under a name masa owns (never `dir.with_extension(..)`, which can name a
        // user's directory), then deleted once the new checkpoint is in place.
        let old = sibling(dir, "replaced");
        if old.exists() {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        std::fs::rename(dir, &old).at(dir)?;
        std::fs::rename(&stage, dir).at(dir)?;
        std::fs::remove_dir_all(&old).at(&old)?;
    } else {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).at(parent)?;
        }
        std::fs::rename(&stage, dir).at(dir)?;
    }
    Ok(())
}

/// `.{name}.{what}` beside `dir`: the scratch names masa owns.
fn sibling(dir: &Path, what: &str) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    dir.with_file_name(format!(".{name}.{what}"))
}

/// `dir` may be written: absent, an empty directory, or a checkpoint masa wrote (`masa.json`).
/// Anything else is the user's, and masa does not replace it.
fn check_replaceable(dir: &Path) -> Result<()> {
    let Ok(md) = std::fs::symlink_metadata(dir) else { return Ok(()) };
    if !md.is_dir() {
        return Err(MasaError::bad_file(
            dir,
            "exists and is not a directory: masa writes a checkpoint directory here and will not replace it; choose another output path",
        ));
    }
    let empty = std::fs::read_dir(dir).at(dir)?.next().is_none();
    if empty || dir.join("masa.json").is_file() {
        Ok(())
    } else {
        Err(MasaError::bad_file(
            dir,
            "is not empty and holds no masa.json (not a checkpoint masa wrote): masa will not replace it; choose another output path or remove it yourself",
        ))
    }
}

fn check_tensors(cfg: &StudentConfig, tensors: &[(String, Tensor)]) -> Result<()> {
    let want = cfg.tensor_shapes();
    if want.len() != tensors.len() {
        return Err(MasaError::Shape(format!("checkpoint has {} tensors, the student config needs {}", tensors.len(), want.len())));
    }
    for ((wn, ws), (n, t)) in want.iter().zip(tensors) {
        if wn != n || t.dims() != ws.as_slice() {
            return Err(MasaError::Shape(format!("tensor `{n}` {:?} where the config needs `{wn}` {ws:?}", t.dims())));
        }
        if t.dtype() != candle_core::DType::F32 {
            return Err(MasaError::Shape(format!("tensor `{n}` is {:?}, checkpoints are f32", t.dtype())));
        }
        let finite = t.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
        if !finite {
            return Err(MasaError::Invalid(format!("tensor `{n}` holds NaN or Inf; refusing to write a broken checkpoint")));
        }
    }
    Ok(())
}
