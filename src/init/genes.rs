//! Gene files as `masa extract` writes them: safetensors with F32 `r×r` tensors
//! `layers.{l}.mlp.{gate,up,down}_proj.gene` and JSON metadata under the `masa` key holding at
//! least `source_hash` (the source's `fingerprint()`) and `rank`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use faer::Mat;

use crate::error::{MasaError, Result};

/// The gene name of a dense layer's FFN matrix ([`crate::source::gene_name_of`]).
pub fn gene_key(layer: usize, proj: &str) -> String {
    crate::source::gene_name_of(&format!("model.layers.{layer}.mlp.{proj}.weight"))
}

pub struct Genes {
    pub path: PathBuf,
    /// The `masa` metadata, verbatim.
    pub meta: serde_json::Value,
    pub source_hash: String,
    /// sha256 of the file.
    pub sha256: String,
    genes: BTreeMap<String, Mat<f64>>,
}

impl Genes {
    pub fn load(path: &Path) -> Result<Self> {
        let (meta_json, raw) = crate::extract::read_gene_file(path)?;
        let meta: serde_json::Value =
            serde_json::from_str(&meta_json).map_err(|e| MasaError::bad_file(path, format!("invalid gene metadata JSON: {e}")))?;
        let source_hash = meta
            .get("source_hash")
            .and_then(|v| v.as_str())
            .ok_or_else(|| MasaError::field(path, "masa.source_hash", "missing: the gene file must say which source it came from"))?
            .to_string();
        let genes: BTreeMap<String, Mat<f64>> = raw
            .into_iter()
            .filter(|(name, _)| name.ends_with(".gene"))
            .map(|(name, (r, data))| (name, Mat::from_fn(r, r, |i, j| data[i * r + j] as f64)))
            .collect();
        let sha256 = crate::fetch::sha256_file(path)?;
        Ok(Genes { path: path.to_path_buf(), meta, source_hash, sha256, genes })
    }

    /// The gene of one source FFN matrix (`proj`: `gate_proj`, `up_proj`, `down_proj`).
    pub fn get(&self, layer: usize, proj: &str) -> Result<&Mat<f64>> {
        let k = gene_key(layer, proj);
        self.genes.get(&k).ok_or_else(|| {
            MasaError::bad_file(&self.path, format!("no gene `{k}`: extract genes for every source layer the layer mapping uses"))
        })
    }

    /// Write a gene file (for tests and tools; `masa extract` owns the real writer). `meta` is
    /// stored under `masa` and must hold `source_hash`.
    pub fn write(path: &Path, genes: &[(String, Mat<f64>)], meta: &serde_json::Value) -> Result<()> {
        let bufs: Vec<(String, usize, Vec<u8>)> = genes
            .iter()
            .map(|(n, m)| {
                let r = m.nrows();
                (n.clone(), r, (0..r * r).flat_map(|x| (m[(x / r, x % r)] as f32).to_le_bytes()).collect())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
            .iter()
            .map(|(n, r, d)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*r, *r], d)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| MasaError::bad_file(path, e.to_string()))
            })
            .collect::<Result<_>>()?;
        let md: HashMap<String, String> = [("masa".to_string(), meta.to_string())].into();
        let bytes = safetensors::serialize(views, Some(md)).map_err(|e| MasaError::bad_file(path, e.to_string()))?;
        crate::home::write_atomic(path, &bytes)
    }
}
