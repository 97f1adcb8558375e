//! Gene files as `masa extract` writes them: safetensors with F32 `r×r` tensors
//! `layers.{l}.mlp.{gate,up,down}_proj.gene` (MoE: `layers.{l}.mlp.shared_experts.…`,
//! `layers.{l}.mlp.experts.{e}.…`) and JSON metadata under the `masa` key holding at
//! least `source_hash` (the source's `fingerprint()`) and `rank`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use faer::Mat;

use crate::error::{MasaError, Result};

/// The gene name of matrix `proj` of the FFN at HF prefix `mlp` (`model.layers.3.mlp`,
/// `model.layers.3.mlp.experts.5`, ...), by [`crate::source::gene_name_of`].
pub fn gene_key(mlp: &str, proj: &str) -> String {
    crate::source::gene_name_of(&format!("{mlp}.{proj}.weight"))
}

/// The three genes (gate, up, down) of one source FFN, and the HF prefix it came from.
pub struct FfnGenes<'a> {
    pub mlp: String,
    pub gate: &'a Mat<f64>,
    pub up: &'a Mat<f64>,
    pub down: &'a Mat<f64>,
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

    /// The gene of matrix `proj` (`gate_proj`, `up_proj`, `down_proj`) of the FFN at `mlp`.
    fn get(&self, mlp: &str, proj: &str) -> Result<&Mat<f64>> {
        let k = gene_key(mlp, proj);
        self.genes.get(&k).ok_or_else(|| {
            MasaError::bad_file(&self.path, format!("no gene `{k}`: the file holds gate, up and down genes of every FFN it covers"))
        })
    }

    /// The source FFNs whose genes feed a student FFN mapped to source layer `layer`, in the
    /// order they fill it: the dense FFN; else (MoE layers) the shared experts (DeepSeekMoE),
    /// then the routed experts kept by extraction, most frequently routed first (the file's
    /// `experts_kept`; expert index order in files without it).
    pub fn ffn_genes(&self, layer: usize) -> Result<Vec<FfnGenes<'_>>> {
        let dense = format!("model.layers.{layer}.mlp");
        let has = |mlp: &str| self.genes.contains_key(&gene_key(mlp, "gate_proj"));
        let mut mlps = Vec::new();
        if has(&dense) {
            mlps.push(dense.clone());
        } else {
            let shared = format!("{dense}.shared_experts");
            if has(&shared) {
                mlps.push(shared);
            }
            let ranked: Vec<usize> = match self.meta.get("experts_kept").and_then(|m| m.get(layer.to_string())) {
                Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                    MasaError::field(&self.path, &format!("masa.experts_kept.{layer}"), format!("not a list of expert indices: {e}"))
                })?,
                None => {
                    let prefix = format!("layers.{layer}.mlp.experts.");
                    let mut found: Vec<usize> =
                        self.genes.keys().filter_map(|k| k.strip_prefix(&prefix)?.split('.').next()?.parse().ok()).collect();
                    found.sort_unstable();
                    found.dedup();
                    found
                }
            };
            mlps.extend(ranked.iter().map(|e| format!("{dense}.experts.{e}")));
        }
        if mlps.is_empty() {
            return Err(MasaError::bad_file(
                &self.path,
                format!("no genes for source layer {layer}: extract genes for every source layer the layer mapping uses"),
            ));
        }
        mlps.into_iter()
            .map(|mlp| {
                Ok(FfnGenes { gate: self.get(&mlp, "gate_proj")?, up: self.get(&mlp, "up_proj")?, down: self.get(&mlp, "down_proj")?, mlp })
            })
            .collect()
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
