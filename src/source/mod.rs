//! Source models behind one abstraction: a normalised [`ModelConfig`] plus named f32 tensors in
//! HF layout and naming, read lazily from a GGUF file or an HF safetensors directory.

pub mod config;
pub mod gguf;
pub mod hf;
pub mod model;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

pub use config::{Activation, Arch, ModelConfig, MoeConfig, NormKind, QkNorm};
use gguf::GgufFile;
use hf::HfTensors;

use crate::error::{IoContext, MasaError, Result};

enum Backing {
    Gguf { file: GgufFile, hf_to_gguf: BTreeMap<String, String> },
    Hf(HfTensors),
}

/// Weights of a source model. Tensors are read (and dequantized) one at a time on request, so
/// the f32 model is held once, by whoever builds from it.
pub struct SourceWeights {
    pub path: PathBuf,
    pub config: ModelConfig,
    backing: Backing,
}

/// One entry of the tensor directory, for `masa inspect`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

impl SourceWeights {
    /// Open a GGUF file or an HF directory (a directory with `config.json`).
    pub fn open(path: &Path) -> Result<Self> {
        let w = if path.is_dir() {
            Self::open_hf(path)?
        } else if path.exists() {
            crate::error::regular_file(path)?;
            Self::open_gguf(path)?
        } else {
            return Err(MasaError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")));
        };
        w.check_counts()?;
        Ok(w)
    }

    /// Every layer and every expert has tensors of its own, so neither count can exceed the
    /// tensor directory's length: a config claiming more (corrupt, hostile) is refused before
    /// anything is sized by it.
    fn check_counts(&self) -> Result<()> {
        let tensors = self.entries().len();
        let c = &self.config;
        let experts = c.moe.as_ref().map_or(0, |m| m.n_routed_experts);
        for (field, n) in [("num_hidden_layers", c.num_hidden_layers), ("num_experts", experts)] {
            if n > tensors {
                return Err(MasaError::bad_file(&self.path, format!("the config's {field} is {n}, but the weights hold only {tensors} tensors: the config does not describe these weights")));
            }
        }
        Ok(())
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let arch = file.architecture()?;
        let hf_to_gguf = file.content.tensor_infos.keys().filter_map(|g| gguf::hf_name(&arch, g).map(|h| (h, g.clone()))).collect();
        Ok(SourceWeights { path: path.to_path_buf(), config, backing: Backing::Gguf { file, hf_to_gguf } })
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| MasaError::bad_file(&cfg_path, format!("invalid JSON: {e}")))?;
        let config = ModelConfig::from_hf_config(&cfg_path, &json)?;
        let tensors = HfTensors::open(dir)?;
        Ok(SourceWeights { path: dir.to_path_buf(), config, backing: Backing::Hf(tensors) })
    }

    /// The safetensors files an HF directory's weights are read from (none for GGUF).
    fn hf_weight_files(&self) -> Vec<PathBuf> {
        match &self.backing {
            Backing::Hf(t) => t.paths().map(Path::to_path_buf).collect(),
            _ => Vec::new(),
        }
    }

    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.backing {
            Backing::Gguf { file, .. } => Some(file),
            Backing::Hf(_) => None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.backing {
            Backing::Gguf { hf_to_gguf, .. } => hf_to_gguf.contains_key(name),
            Backing::Hf(t) => t.info(name).is_some(),
        }
    }

    /// All tensors with HF names, shapes and stored types.
    pub fn entries(&self) -> Vec<TensorEntry> {
        match &self.backing {
            Backing::Gguf { file, hf_to_gguf } => hf_to_gguf
                .iter()
                .filter_map(|(h, g)| {
                    file.tensor_info(g).map(|(shape, dt)| TensorEntry { name: h.clone(), shape, dtype: gguf::ggml_type_name(dt).into() })
                })
                .collect(),
            Backing::Hf(t) => {
                t.names().filter_map(|n| t.info(n).map(|(shape, dtype)| TensorEntry { name: n.clone(), shape, dtype })).collect()
            }
        }
    }

    /// One tensor as f32 in HF layout and semantics. GGUF tensors are converted back from
    /// llama.cpp's conventions: llama q/k rows un-permuted (the converter interleaves RoPE
    /// halves), Gemma norm weights shifted back by −1 (the converter stores `1 + w`).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.tensor_unchecked(name)?;
        // NaN or Inf weights would flow silently into scores, statistics and students: refuse
        // them here, where every consumer reads. A sum is cheap; an exact scan confirms.
        let sum = t.sum_all()?.to_scalar::<f32>()?;
        if !sum.is_finite() {
            if let Some(i) = t.flatten_all()?.to_vec1::<f32>()?.iter().position(|v| !v.is_finite()) {
                return Err(MasaError::bad_file(
                    &self.path,
                    format!("tensor `{name}` holds NaN or Inf (element {i}): the weights are corrupt"),
                ));
            }
        }
        Ok(t)
    }

    fn tensor_unchecked(&self, name: &str) -> Result<Tensor> {
        match &self.backing {
            Backing::Hf(t) => t.tensor_f32(name),
            Backing::Gguf { file, hf_to_gguf } => {
                let g = hf_to_gguf.get(name).ok_or_else(|| MasaError::bad_file(&self.path, format!("tensor `{name}` not found")))?;
                let t = file.tensor_f32(g)?;
                let cfg = &self.config;
                match cfg.arch {
                    Arch::Llama if name.ends_with("q_proj.weight") => unpermute_rope_rows(&t, cfg.num_attention_heads),
                    Arch::Llama if name.ends_with("k_proj.weight") => unpermute_rope_rows(&t, cfg.num_key_value_heads),
                    Arch::Gemma3 if name.ends_with("norm.weight") => Ok((t - 1.0)?),
                    _ => Ok(t),
                }
            }
        }
    }

    /// Like [`tensor`](Self::tensor) but checks the shape, naming the tensor on mismatch.
    pub fn tensor_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.dims() != shape {
            return Err(MasaError::bad_file(
                &self.path,
                format!("tensor `{name}` has shape {:?}, the config implies {:?}", t.dims(), shape),
            ));
        }
        Ok(t)
    }
}

/// Inverse of llama.cpp's `permute(w, n_head)`: GGUF stores each head's rows as interleaved
/// (x0, x_{d/2}, x1, ...) pairs; HF's rotate-half RoPE wants the two halves contiguous.
fn unpermute_rope_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// llama.cpp's forward permutation, written independently, to check the inverse.
    fn permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let hd = rows / n_head;
        let mut out = vec![0.0; rows * cols];
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for two in 0..2 {
                    let src = h * hd + two * (hd / 2) + i;
                    let dst = h * hd + i * 2 + two;
                    out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (rows, cols, heads) = (12, 3, 2);
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let p = permute(&w, rows, cols, heads);
        let t = Tensor::from_vec(p, (rows, cols), &Device::Cpu).unwrap();
        let back = unpermute_rope_rows(&t, heads).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(back, w);
    }
}

/// Which kind of FFN a matrix belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    Dense,
    /// A routed expert of an MoE layer.
    Expert,
    /// A shared expert of an MoE layer (DeepSeekMoE).
    Shared,
}

impl std::fmt::Display for FfnKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FfnKind::Dense => "dense",
            FfnKind::Expert => "expert",
            FfnKind::Shared => "shared",
        })
    }
}

/// One FFN weight matrix that MASA aligns a gene matrix to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FfnMatrix {
    pub layer: usize,
    /// HF tensor name, e.g. `model.layers.3.mlp.gate_proj.weight`.
    pub name: String,
    pub kind: FfnKind,
    pub expert: Option<usize>,
    /// `gate_proj`, `up_proj` or `down_proj`.
    pub proj: &'static str,
    pub d_out: usize,
    pub d_in: usize,
}

/// The gene tensor name for an FFN weight's HF name: `model.layers.3.mlp.up_proj.weight` →
/// `layers.3.mlp.up_proj.gene` (experts: `layers.L.mlp.experts.E.up_proj.gene`). The one naming
/// rule extraction writes and initialisation reads.
pub fn gene_name_of(weight: &str) -> String {
    format!("{}.gene", weight.trim_start_matches("model.").trim_end_matches(".weight"))
}

impl FfnMatrix {
    /// The FFN this matrix belongs to, as the source forward's hooks name it.
    pub fn mlp(&self) -> model::MlpId {
        match (self.kind, self.expert) {
            (FfnKind::Expert, Some(e)) => model::MlpId::Expert(e),
            (FfnKind::Shared, _) => model::MlpId::Shared,
            _ => model::MlpId::Dense,
        }
    }

    /// The gene tensor name of this matrix (`layers.L.mlp.gate_proj.gene`, ...).
    pub fn gene_name(&self) -> String {
        gene_name_of(&self.name)
    }

    /// The calibration site whose second moment this matrix's input has.
    pub fn stats_site(&self) -> String {
        let site = if self.proj == "down_proj" { model::Site::FfnMid } else { model::Site::FfnIn };
        self.mlp().site_name(site)
    }
}

impl ModelConfig {
    /// Every FFN matrix MASA could align, layer by layer (design.md "Gene matrix set"): dense
    /// layers' gate/up/down; for MoE layers every routed expert (extraction keeps the most
    /// frequently routed ones) and the shared experts.
    pub fn ffn_matrices(&self) -> Vec<FfnMatrix> {
        let mut out = Vec::new();
        let h = self.hidden_size;
        let mut push = |layer: usize, prefix: String, kind: FfnKind, expert: Option<usize>, ffn: usize| {
            for (proj, d_out, d_in) in [("gate_proj", ffn, h), ("up_proj", ffn, h), ("down_proj", h, ffn)] {
                out.push(FfnMatrix { layer, name: format!("{prefix}.{proj}.weight"), kind, expert, proj, d_out, d_in });
            }
        };
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}.mlp");
            match &self.moe {
                Some(m) if self.is_moe_layer(l) => {
                    for e in 0..m.n_routed_experts {
                        push(l, format!("{p}.experts.{e}"), FfnKind::Expert, Some(e), m.moe_intermediate_size);
                    }
                    if m.n_shared_experts > 0 {
                        push(l, format!("{p}.shared_experts"), FfnKind::Shared, None, m.moe_intermediate_size * m.n_shared_experts);
                    }
                }
                _ => push(l, p, FfnKind::Dense, None, self.intermediate_size),
            }
        }
        out
    }
}

/// A source model as a user names it: weights plus the tokenizer its authors use.
pub struct SourceModel {
    pub weights: SourceWeights,
    pub tokenizer: crate::source::tokenizer::Tokenizer,
}

impl SourceModel {
    /// Open a GGUF file (tokenizer from its metadata) or an HF directory (`tokenizer.json`).
    pub fn open(path: &Path) -> Result<Self> {
        let weights = SourceWeights::open(path)?;
        let tokenizer = match weights.gguf() {
            Some(g) => crate::source::tokenizer::Tokenizer::from_gguf_metadata(g.metadata(), path)?,
            None => crate::source::tokenizer::Tokenizer::from_hf_dir(path)?,
        };
        if tokenizer.vocab_size() > weights.config.vocab_size {
            return Err(MasaError::bad_file(
                path,
                format!(
                    "the tokenizer has {} tokens but the model's embedding has only {} rows: tokenizer and weights do not belong together",
                    tokenizer.vocab_size(),
                    weights.config.vocab_size
                ),
            ));
        }
        Ok(SourceModel { weights, tokenizer })
    }

    /// A content fingerprint that identifies the model in downstream artifacts: sha256 of the
    /// GGUF file, or of `config.json` plus every safetensors header for HF directories.
    /// The identity of the model for caches and provenance: a GGUF file's sha256 (its
    /// tokenizer is inside); for an HF directory, the weights' fingerprint with the tokenizer's.
    pub fn fingerprint(&self) -> Result<String> {
        let weights = self.weights.fingerprint()?;
        if self.weights.gguf().is_some() {
            return Ok(weights);
        }
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(weights.as_bytes());
        h.update(self.tokenizer.fingerprint()?.as_bytes());
        Ok(crate::fetch::hex(&h.finalize()))
    }
}

impl SourceWeights {
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        if self.gguf().is_some() {
            return crate::fetch::sha256_file(&self.path);
        }
        let mut h = Sha256::new();
        let cfg = self.path.join("config.json");
        h.update(std::fs::read(&cfg).at(&cfg)?);
        for e in self.entries() {
            h.update(format!("{} {:?} {}\n", e.name, e.shape, e.dtype).as_bytes());
        }
        // The weights' content, not only their size: the files the weights are read from, not
        // other safetensors beside them (statistics, genes) (hashed once per size and
        // modification time, [`crate::fetch::sha256_file_cached`]).
        for p in self.hf_weight_files() {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            h.update(format!("{name} {}\n", crate::fetch::sha256_file_cached(&p)?).as_bytes());
        }
        Ok(crate::fetch::hex(&h.finalize()))
    }
}
