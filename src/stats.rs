//! Calibration statistics: per FFN input site, the second-moment sum `Σ_t x_t x_tᵀ` (f64) and
//! the token count; per MoE layer, routing counts per expert per dataset. Statistics are sums,
//! so shards computed anywhere merge by addition (`masa stats merge`).
//!
//! File format: safetensors with tensors `layers.{l}.{site}.xxt` (F64, d×d),
//! `layers.{l}.{site}.count` (F64, [1]), `layers.{l}.routing.{dataset}` (F64, [experts]), where
//! site is `ffn_in`, `ffn_mid`, `experts.{e}.ffn_in`, `shared.ffn_mid`, ...; and a JSON
//! [`StatsMeta`] under the `masa` key of the safetensors metadata.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, MasaError, Result};

pub const FORMAT: &str = "masa-stats/1";

/// What produced a statistics file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsMeta {
    pub format: String,
    /// Fingerprint of the source model (see `SourceWeights::fingerprint`).
    pub source_hash: String,
    pub source: String,
    pub arch: String,
    /// Corpus description(s); one per merged shard.
    pub corpus: Vec<String>,
    pub tokens: u64,
    pub seq_len: usize,
    pub seeds: Vec<u64>,
    /// Tokens per dataset (corpus domain or task file).
    pub dataset_tokens: BTreeMap<String, u64>,
    pub masa_version: String,
    /// MoE sources calibrated with `--experts K`: only the K most-routed routed experts of each
    /// MoE layer ([`Stats::most_routed`]) have statistics; `None`: every expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<usize>,
}

/// The second-moment sum of one input site.
#[derive(Clone, Debug, PartialEq)]
pub struct Moment {
    pub dim: usize,
    /// Row-major `dim × dim`, symmetric.
    pub xxt: Vec<f64>,
    pub count: f64,
}

impl Moment {
    pub fn new(dim: usize) -> Self {
        Moment { dim, xxt: vec![0.0; dim * dim], count: 0.0 }
    }

    /// `S = Σ x xᵀ / N`, the mean second moment used by output alignment.
    pub fn mean(&self) -> Vec<f64> {
        let n = self.count.max(1.0);
        self.xxt.iter().map(|v| v / n).collect()
    }
}

#[derive(Clone, Debug)]
pub struct Stats {
    pub meta: StatsMeta,
    /// Key: `layers.{l}.{site}`.
    pub moments: BTreeMap<String, Moment>,
    /// Key: `layers.{l}.routing.{dataset}`.
    pub routing: BTreeMap<String, Vec<f64>>,
    /// Rank-specific mode: per matrix and rank, `{matrix}.r{r}.cross` (r × d_out, column p is
    /// `Σ_t x_t^(i(p)) y_tp`) and `{matrix}.r{r}.ysq` (`Σ_t ‖W x_t‖²`), beside the chunk blocks
    /// `{matrix}.r{r}.block{i}` kept as moments. Shape and row-major values.
    pub cross: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

pub fn moment_key(layer: usize, site: &str) -> String {
    format!("layers.{layer}.{site}")
}

pub fn routing_key(layer: usize, dataset: &str) -> String {
    format!("layers.{layer}.routing.{dataset}")
}

impl Stats {
    /// Write the statistics (atomically), streaming each sum from memory: no copy of the
    /// (possibly many-GB) statistics is made.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut data: Vec<(String, Vec<usize>, &[f64])> = Vec::new();
        for (k, m) in &self.moments {
            data.push((format!("{k}.xxt"), vec![m.dim, m.dim], &m.xxt));
            data.push((format!("{k}.count"), vec![1], std::slice::from_ref(&m.count)));
        }
        for (k, v) in &self.routing {
            data.push((k.clone(), vec![v.len()], v));
        }
        for (k, (shape, v)) in &self.cross {
            data.push((k.clone(), shape.clone(), v));
        }
        for (name, shape, v) in &data {
            if shape.iter().product::<usize>() != v.len() {
                return Err(MasaError::Shape(format!("statistics `{name}`: {} values for shape {shape:?}", v.len())));
            }
        }
        let entries: Vec<crate::tensorfile::Entry> = data
            .iter()
            .map(|(name, shape, _)| crate::tensorfile::Entry { name: name.clone(), dtype: safetensors::Dtype::F64, shape: shape.clone() })
            .collect();
        let meta_json = serde_json::to_string(&self.meta).map_err(|e| MasaError::Invalid(e.to_string()))?;
        let md: BTreeMap<String, String> = [("masa".to_string(), meta_json)].into();
        crate::tensorfile::write(path, &entries, &md, |i, out| out.write_all(&crate::tensorfile::f64_le_bytes(data[i].2)))
    }

    pub fn load(path: &Path) -> Result<Self> {
        Self::load_layers(path, None)
    }

    /// [`Stats::load`] keeping only the sums of `layers` (every key starts `layers.{l}.`), so
    /// extracting a few layers of a large source needs only their statistics in memory.
    pub fn load_layers(path: &Path, layers: Option<&[usize]>) -> Result<Self> {
        let wanted = |name: &str| {
            layers.is_none_or(|ls| ls.iter().any(|l| name.strip_prefix("layers.").and_then(|r| r.strip_prefix(&format!("{l}."))).is_some()))
        };
        crate::error::regular_file(path)?;
        let file = std::fs::File::open(path).at(path)?;
        // Mapped, not read: the values are copied out once, so loading needs the statistics'
        // size in memory, not twice that.
        // SAFETY: opened read-only; masa replaces statistics files by rename, never in place.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| MasaError::bad_file(path, format!("not a safetensors statistics file: {e}")))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("masa"))
            .ok_or_else(|| MasaError::bad_file(path, "no `masa` metadata: not a statistics file written by `masa calibrate`"))?;
        let meta: StatsMeta =
            serde_json::from_str(meta_json).map_err(|e| MasaError::bad_file(path, format!("invalid statistics metadata: {e}")))?;
        if meta.format != FORMAT {
            return Err(MasaError::bad_file(path, format!("statistics format `{}`, this masa reads `{FORMAT}`", meta.format)));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| MasaError::bad_file(path, e.to_string()))?;
        let mut moments: BTreeMap<String, Moment> = BTreeMap::new();
        let mut routing = BTreeMap::new();
        let mut cross = BTreeMap::new();
        for (name, view) in st.tensors().into_iter().filter(|(name, _)| wanted(name)) {
            if view.dtype() != safetensors::Dtype::F64 {
                return Err(MasaError::bad_file(path, format!("tensor `{name}` is {:?}, expected F64", view.dtype())));
            }
            let data = f64_from_bytes(view.data());
            if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
                return Err(MasaError::bad_file(
                    path,
                    format!("tensor `{name}` holds a non-finite value at index {bad}; recompute the statistics"),
                ));
            }
            if let Some(k) = name.strip_suffix(".xxt") {
                let d = match view.shape() {
                    [a, b] if a == b && a * b == data.len() => *a,
                    sh => {
                        return Err(MasaError::bad_file(
                            path,
                            format!("tensor `{name}` has shape {sh:?}; a second moment is square (d, d)"),
                        ))
                    }
                };
                let m = moments.entry(k.to_string()).or_insert_with(|| Moment::new(d));
                m.dim = d;
                m.xxt = data;
            } else if let Some(k) = name.strip_suffix(".count") {
                let [count] = data[..] else {
                    return Err(MasaError::bad_file(path, format!("tensor `{name}` holds {} values; a token count is one", data.len())));
                };
                moments.entry(k.to_string()).or_insert_with(|| Moment::new(0)).count = count;
            } else if name.contains(".routing.") {
                routing.insert(name.clone(), data);
            } else if name.ends_with(".cross") || name.ends_with(".ysq") {
                cross.insert(name.clone(), (view.shape().to_vec(), data));
            } else {
                return Err(MasaError::bad_file(path, format!("unexpected tensor `{name}`")));
            }
        }
        for (k, m) in &moments {
            if m.xxt.len() != m.dim * m.dim {
                return Err(MasaError::bad_file(path, format!("`{k}` has a count but no xxt")));
            }
        }
        Ok(Stats { meta, moments, routing, cross })
    }

    /// `masa stats merge`: the sum of the shards in `paths`. The same file (by content) given
    /// twice is refused: it would count its tokens twice.
    pub fn merge_files(paths: &[std::path::PathBuf]) -> Result<Stats> {
        let mut seen: Vec<(String, &std::path::PathBuf)> = Vec::new();
        for p in paths {
            let h = crate::fetch::sha256_file(p)?;
            if let Some((_, first)) = seen.iter().find(|(x, _)| *x == h) {
                return Err(MasaError::bad_file(
                    p,
                    format!(
                        "is the same statistics as {} (identical content): a shard given twice would count its tokens twice",
                        first.display()
                    ),
                ));
            }
            seen.push((h, p));
        }
        let (first, rest) = paths.split_first().ok_or_else(|| MasaError::Invalid("name the statistics files to merge".into()))?;
        let mut acc = Stats::load(first)?;
        for p in rest {
            acc.merge(&Stats::load(p)?, &p.display().to_string())?;
        }
        Ok(acc)
    }

    /// Add another shard of statistics of the same source model.
    /// The `k` routed experts of MoE layer `layer` that receive the largest share of tokens,
    /// the shares averaged over datasets (each dataset weighs the same, whatever its size); ties
    /// go to the lower index. Extraction keeps these, and `calibrate --experts` accumulates
    /// statistics for these only.
    pub fn most_routed(&self, layer: usize, n_experts: usize, k: usize) -> Result<Vec<usize>> {
        let prefix = format!("layers.{layer}.routing.");
        let mut freq = vec![0.0; n_experts];
        let mut datasets = 0.0;
        for (_, counts) in self.routing.iter().filter(|(key, _)| key.starts_with(&prefix)) {
            let total: f64 = counts.iter().sum();
            if total > 0.0 {
                freq.iter_mut().zip(counts).for_each(|(f, c)| *f += c / total);
                datasets += 1.0;
            }
        }
        if datasets == 0.0 {
            return Err(MasaError::Invalid(format!("statistics hold no routing counts for MoE layer {layer}; calibrate this model first")));
        }
        let mut order: Vec<usize> = (0..n_experts).collect();
        order.sort_by(|&a, &b| freq[b].total_cmp(&freq[a]).then(a.cmp(&b)));
        order.truncate(k);
        Ok(order)
    }

    pub fn merge(&mut self, other: &Stats, other_name: &str) -> Result<()> {
        if self.meta.experts.is_some() || other.meta.experts.is_some() {
            return Err(MasaError::Invalid(format!(
                "{other_name}: statistics calibrated with --experts hold only the experts their own tokens routed to most, which differ between shards; calibrate the shards without --experts"
            )));
        }
        if other.meta.source_hash != self.meta.source_hash {
            return Err(MasaError::Invalid(format!(
                "{other_name}: statistics of a different source model ({} vs {}); shards must come from the same model",
                other.meta.source, self.meta.source
            )));
        }
        for (k, m) in &other.moments {
            match self.moments.get_mut(k) {
                Some(mine) if mine.dim == m.dim => {
                    mine.xxt.iter_mut().zip(&m.xxt).for_each(|(a, b)| *a += b);
                    mine.count += m.count;
                }
                Some(mine) => {
                    return Err(MasaError::Shape(format!("{other_name}: `{k}` is {}x{}, expected {}x{}", m.dim, m.dim, mine.dim, mine.dim)))
                }
                None => {
                    self.moments.insert(k.clone(), m.clone());
                }
            }
        }
        for (k, v) in &other.routing {
            let mine = self.routing.entry(k.clone()).or_insert_with(|| vec![0.0; v.len()]);
            mine.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        for (k, (shape, v)) in &other.cross {
            match self.cross.get_mut(k) {
                Some((s, mine)) if s == shape => mine.iter_mut().zip(v).for_each(|(a, b)| *a += b),
                Some((s, _)) => return Err(MasaError::Shape(format!("{other_name}: `{k}` is {shape:?}, expected {s:?}"))),
                None => {
                    self.cross.insert(k.clone(), (shape.clone(), v.clone()));
                }
            }
        }
        self.meta.tokens += other.meta.tokens;
        self.meta.corpus.extend(other.meta.corpus.iter().cloned());
        self.meta.seeds.extend(other.meta.seeds.iter().cloned());
        for (d, n) in &other.meta.dataset_tokens {
            *self.meta.dataset_tokens.entry(d.clone()).or_insert(0) += n;
        }
        Ok(())
    }

    pub fn moment(&self, layer: usize, site: &str) -> Result<&Moment> {
        self.moments.get(&moment_key(layer, site)).ok_or_else(|| {
            MasaError::Invalid(format!("statistics have no `{}`; were they computed for this model and site?", moment_key(layer, site)))
        })
    }
}

fn f64_from_bytes(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
}
