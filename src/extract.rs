//! `masa extract`: one gene matrix per aligned FFN matrix of the source (Sec. 3.1).
//!
//! Exact mode (default): output alignment L_out solved in closed form from the calibration
//! statistics, then `L_align = L_out + λ L_spec` (Sec. 3.1; design.md gives these losses no
//! equation numbers, see [`crate::align`]) minimised with full-batch exact gradients
//! (L-BFGS) until the relative improvement stalls. Minibatch mode (the paper's procedure):
//! Adam on streamed `(x, W x)` pairs; see [`MinibatchAligner`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use faer::Mat;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::align::{from_mat, lbfgs, to_mat, Layout, OutputAlignment, RankSpec, SpectralAlignment};
use crate::error::{IoContext, MasaError, Result};
use crate::source::{FfnKind, FfnMatrix, SourceWeights};
use crate::stats::Stats;

pub const FORMAT: &str = "masa-genes/1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExtractOptions {
    pub rank: RankSpec,
    /// Weight of spectral alignment: `L_align = L_out / E + λ L_spec / r`, with
    /// `E = tr(W S Wᵀ)/d_out` (design.md's `L_out + λ L_spec`, normalised per matrix so one λ
    /// fits matrices of any output scale and rank).
    pub lambda: f64,
    /// MoE layers without shared experts (OLMoE): routed experts kept per layer, the most
    /// frequently routed across the calibration datasets.
    pub experts: usize,
    /// MoE layers with shared experts (DeepSeekMoE): routed experts kept beside the shared
    /// experts (paper: 0, the shared experts only).
    #[serde(default)]
    pub routed_with_shared: usize,
    /// Ridge added to each `A_a`, relative to its mean diagonal.
    pub ridge: f64,
    pub max_iter: usize,
    /// Only these source layers (a subset for sweeps and comparisons); `None`: all.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// Stop when `L_align` improved by less than this fraction over 5 iterations.
    pub tol: f64,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            rank: RankSpec::Ratio(0.12),
            lambda: DEFAULT_LAMBDA,
            experts: 1,
            routed_with_shared: 0,
            ridge: 1e-6,
            max_iter: 300,
            layers: None,
            tol: 1e-5,
        }
    }
}

/// Default λ; chosen by the sweep documented in `docs/extraction.md`.
pub const DEFAULT_LAMBDA: f64 = 1e-2;

/// Per-matrix result: losses at the closed-form start and at the end.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MatrixReport {
    pub name: String,
    pub layer: usize,
    pub proj: String,
    pub kind: String,
    pub expert: Option<usize>,
    pub d_out: usize,
    pub d_in: usize,
    pub r: usize,
    /// `tr(W S Wᵀ) / d_out`: the loss of predicting zero. Minibatch mode: "start" is the random init.
    pub output_energy: f64,
    pub l_out_start: f64,
    pub l_out: f64,
    pub rel_l_out_start: f64,
    pub rel_l_out: f64,
    pub l_spec_start: f64,
    pub l_spec: f64,
    pub iterations: usize,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenesMeta {
    pub format: String,
    pub source: String,
    pub source_hash: String,
    pub arch: String,
    pub stats_tokens: u64,
    pub stats_corpus: Vec<String>,
    pub options: ExtractOptions,
    pub mode: String,
    pub matrices: Vec<MatrixReport>,
    /// MoE layers: the routed experts that have genes, most frequently routed first (the order
    /// in which `masa init` fills a dense student FFN from them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub experts_kept: BTreeMap<usize, Vec<usize>>,
    pub masa_version: String,
}

impl GenesMeta {
    /// Median over matrices of the relative L_out, and the mean over matrices of L_spec / r at
    /// the output-only optimum and after alignment: the one-line summary of an extraction.
    pub fn summary(&self) -> (f64, f64, f64) {
        let ms = &self.matrices;
        let mut rel: Vec<f64> = ms.iter().map(|m| m.rel_l_out).collect();
        rel.sort_by(|a, b| a.total_cmp(b));
        let per_r = |f: fn(&MatrixReport) -> f64| ms.iter().map(|m| f(m) / m.r as f64).sum::<f64>() / ms.len().max(1) as f64;
        (rel.get(rel.len() / 2).copied().unwrap_or(f64::NAN), per_r(|m| m.l_spec_start), per_r(|m| m.l_spec))
    }

    fn new(
        source: &SourceWeights,
        source_hash: &str,
        stats: &Stats,
        opts: &ExtractOptions,
        mode: &str,
        sel: Selection,
        matrices: Vec<MatrixReport>,
    ) -> Self {
        GenesMeta {
            format: FORMAT.into(),
            source: source.path.display().to_string(),
            source_hash: source_hash.to_string(),
            arch: source.config.arch.name().into(),
            stats_tokens: stats.meta.tokens,
            stats_corpus: stats.meta.corpus.clone(),
            options: opts.clone(),
            mode: mode.into(),
            matrices,
            experts_kept: sel.experts,
            masa_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Gene matrices by name (`layers.{l}.mlp.{proj}.gene`, experts `layers.{l}.mlp.experts.{e}.{proj}.gene`,
/// shared experts `layers.{l}.mlp.shared_experts.{proj}.gene`), row-major r×r.
#[derive(Clone, Debug)]
pub struct Genes {
    pub meta: GenesMeta,
    pub genes: BTreeMap<String, (usize, Vec<f32>)>,
}

/// The matrices to align and, for MoE layers, which routed experts they cover.
pub struct Selection {
    pub matrices: Vec<FfnMatrix>,
    /// MoE layer -> the routed experts kept, most frequently routed first.
    pub experts: BTreeMap<usize, Vec<usize>>,
}

/// The matrices to align (design.md "Gene matrix set"): every dense FFN matrix; the shared
/// experts of MoE layers that have them (DeepSeekMoE), plus `opts.routed_with_shared` routed
/// experts (paper: none); in MoE layers without shared experts (OLMoE) the `opts.experts`
/// routed experts with the highest routing frequency, counted per dataset, normalised per
/// dataset, averaged over datasets, so an expert must be active across tasks, not in one.
pub fn select_matrices(source: &SourceWeights, stats: &Stats, opts: &ExtractOptions) -> Result<Selection> {
    let layers = opts.layers.as_deref();
    if let Some(bad) = layers.and_then(|ls| ls.iter().find(|&&l| l >= source.config.num_hidden_layers)) {
        return Err(MasaError::Invalid(format!("layer {bad} does not exist: the source has {} layers", source.config.num_hidden_layers)));
    }
    let all: Vec<FfnMatrix> = source.config.ffn_matrices().into_iter().filter(|m| layers.is_none_or(|ls| ls.contains(&m.layer))).collect();
    let mut keep_experts: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    if let Some(moe) = &source.config.moe {
        let k = if moe.n_shared_experts > 0 { opts.routed_with_shared } else { opts.experts.max(1) };
        for l in (0..source.config.num_hidden_layers).filter(|&l| source.config.is_moe_layer(l) && layers.is_none_or(|ls| ls.contains(&l)))
        {
            if k == 0 {
                continue;
            }
            if let Some(kept) = stats.meta.experts.filter(|&kept| k > kept) {
                return Err(MasaError::Invalid(format!(
                    "these statistics hold only the {kept} most-routed experts of each MoE layer (calibrate --experts {kept}) and extraction asks for {k}; extract with at most {kept}, or calibrate with --experts {k}"
                )));
            }
            keep_experts.insert(l, stats.most_routed(l, moe.n_routed_experts, k)?);
        }
    }
    let matrices = all
        .into_iter()
        .filter(|m| match (m.kind, m.expert) {
            (FfnKind::Expert, Some(e)) => keep_experts.get(&m.layer).is_some_and(|k| k.contains(&e)),
            _ => true,
        })
        .collect();
    Ok(Selection { matrices, experts: keep_experts })
}

/// Check that `stats` were computed for `source`.
pub fn check_stats_match(source: &SourceWeights, source_hash: &str, stats: &Stats, stats_path: &Path) -> Result<()> {
    if stats.meta.source_hash != source_hash {
        return Err(MasaError::bad_file(
            stats_path,
            format!(
                "statistics were computed for another model ({}, hash {}…), not {} (hash {}…); run `masa calibrate` on this model",
                stats.meta.source,
                &stats.meta.source_hash[..12.min(stats.meta.source_hash.len())],
                source.path.display(),
                &source_hash[..12.min(source_hash.len())]
            ),
        ));
    }
    Ok(())
}

/// Align one gene to `w` (row-major d_out×d_in f32) given its input's mean second moment `s`.
pub fn align_matrix(w: &[f32], s: &[f64], layout: Layout, opts: &ExtractOptions) -> Result<(Vec<f64>, MatrixReport)> {
    align_with(OutputAlignment::new(w, s, layout), w, layout, opts)
}

/// The output-alignment objective of one matrix from whichever statistics exist: the
/// rank-specific sums for this rank (`calibrate --rank/--ratio`) or the full moment.
pub fn output_alignment(stats: &Stats, m: &FfnMatrix, w: &[f32], layout: Layout) -> Result<OutputAlignment> {
    let key = format!("{}.r{}", m.gene_name().trim_end_matches(".gene"), layout.r);
    if let Some((_, cross)) = stats.cross.get(&format!("{key}.cross")) {
        let blocks = (0..layout.n)
            .map(|i| {
                let mo = stats
                    .moments
                    .get(&format!("{key}.block{i}"))
                    .ok_or_else(|| MasaError::Invalid(format!("statistics lack `{key}.block{i}`")))?;
                let mean = mo.mean();
                Ok(Mat::from_fn(layout.r, layout.r, |u, v| mean[u * layout.r + v]))
            })
            .collect::<Result<Vec<_>>>()?;
        let count = stats.moments.get(&format!("{key}.block0")).map_or(1.0, |m| m.count.max(1.0));
        let ysq = stats.cross.get(&format!("{key}.ysq")).map_or(0.0, |(_, v)| v[0]);
        let cross_mean: Vec<f64> = cross.iter().map(|v| v / count).collect();
        return Ok(OutputAlignment::from_rank_stats(blocks, &cross_mean, ysq / count, layout));
    }
    let moment = stats.moment(m.layer, &m.stats_site()).map_err(|_| {
        MasaError::Invalid(format!(
            "statistics have neither `{}` nor rank-specific sums `{key}.*` for {}: calibrate with this rank or in full mode",
            crate::stats::moment_key(m.layer, &m.stats_site()),
            m.name
        ))
    })?;
    if moment.dim != m.d_in {
        return Err(MasaError::Shape(format!(
            "statistics `{}` are {}x{} but {} reads {} inputs: statistics from another model?",
            crate::stats::moment_key(m.layer, &m.stats_site()),
            moment.dim,
            moment.dim,
            m.name,
            m.d_in
        )));
    }
    Ok(OutputAlignment::new(w, &moment.mean(), layout))
}

/// Alignment of one gene given its output-alignment objective (see [`align_matrix`]): start
/// at the output-only optimum, then minimise `L_align = L_out + λ L_spec` (Sec. 3.1; design.md
/// gives no equation number), each term normalised per matrix (design.md "Spectral
/// alignment").
pub fn align_with(out: OutputAlignment, w: &[f32], layout: Layout, opts: &ExtractOptions) -> Result<(Vec<f64>, MatrixReport)> {
    let t0 = Instant::now();
    let wmat = Mat::from_fn(layout.d_out, layout.d_in, |p, j| w[p * layout.d_in + j] as f64);
    let sigma = crate::align::singular_values(&wmat)?;
    let spec = SpectralAlignment::new(&sigma, layout.r);
    let m0 = out.closed_form(opts.ridge)?;
    let (l_out_start, _) = out.loss_grad(&m0);
    let l_spec_start = spec.loss(&m0)?;
    // Both terms are normalised so one λ means the same for every matrix: L_out by the
    // output energy tr(W S Wᵀ)/d_out (scale-free), L_spec by r (mean squared log-ratio).
    let energy = out.trace_wsw / layout.d_out as f64;
    let (w_out, w_spec) = (1.0 / energy.max(f64::MIN_POSITIVE), opts.lambda / layout.r as f64);
    let (m, iterations) = if opts.lambda > 0.0 {
        let r = layout.r;
        lbfgs(
            from_mat(&m0),
            |x| {
                let m = to_mat(x, r);
                let (lo, go) = out.loss_grad(&m);
                let (ls, gs) = spec.loss_grad(&m)?;
                let g = &go * faer::Scale(w_out) + &gs * faer::Scale(w_spec);
                Ok((w_out * lo + w_spec * ls, from_mat(&g)))
            },
            opts.max_iter,
            opts.tol,
        )
        .map(|(x, it)| (to_mat(&x, r), it))?
    } else {
        (m0, 0)
    };
    let (l_out, _) = out.loss_grad(&m);
    let l_spec = spec.loss(&m)?;
    let rel = |v: f64| if energy > 0.0 { v / energy } else { f64::NAN };
    let report = MatrixReport {
        name: String::new(),
        layer: 0,
        proj: String::new(),
        kind: String::new(),
        expert: None,
        d_out: layout.d_out,
        d_in: layout.d_in,
        r: layout.r,
        output_energy: energy,
        l_out_start,
        l_out,
        rel_l_out_start: rel(l_out_start),
        rel_l_out: rel(l_out),
        l_spec_start,
        l_spec,
        iterations,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((from_mat(&m), report))
}

/// Exact-mode extraction of every selected matrix, in parallel over matrices.
pub fn extract(
    source: &SourceWeights,
    source_hash: &str,
    stats: &Stats,
    opts: &ExtractOptions,
    on_matrix: &(dyn Fn(&MatrixReport) + Sync),
) -> Result<Genes> {
    opts.check()?;
    let mut sel = select_matrices(source, stats, opts)?;
    let matrices = std::mem::take(&mut sel.matrices);
    for m in &matrices {
        let r = opts.rank.rank(m.d_out, m.d_in);
        Layout::new(m.d_out, m.d_in, r).map_err(|e| MasaError::Invalid(format!("{}: {e}", m.name)))?;
    }
    // The first error stops the matrices not yet started (which one fails first may differ
    // between runs when several would).
    let results: Vec<(String, usize, Vec<f32>, MatrixReport)> = matrices
        .par_iter()
        .map(|m| {
            let layout = Layout::new(m.d_out, m.d_in, opts.rank.rank(m.d_out, m.d_in))?;
            let w = source.tensor_shaped(&m.name, &[m.d_out, m.d_in])?.flatten_all()?.to_vec1::<f32>()?;
            let (gene, mut rep) = align_with(output_alignment(stats, m, &w, layout)?, &w, layout, opts)?;
            rep.name = m.name.clone();
            rep.layer = m.layer;
            rep.proj = m.proj.to_string();
            rep.kind = m.kind.to_string();
            rep.expert = m.expert;
            on_matrix(&rep);
            Ok((m.gene_name(), layout.r, gene.iter().map(|&v| v as f32).collect(), rep))
        })
        .collect::<Result<_>>()?;
    let mut genes = BTreeMap::new();
    let mut reports = Vec::new();
    for (name, rank, g, rep) in results {
        genes.insert(name, (rank, g));
        reports.push(rep);
    }
    Ok(Genes { meta: GenesMeta::new(source, source_hash, stats, opts, "exact", sel, reports), genes })
}

/// The singular values of one source matrix W and of its gene M, to see how well spectral
/// alignment matched them (`results.json`'s `spectra`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spectrum {
    /// Label of the gene set (`masa run`'s extraction label).
    pub extraction: String,
    pub layer: usize,
    /// `gate_proj`, `up_proj` or `down_proj`.
    pub proj: String,
    /// Top-r singular values of W, descending.
    pub source: Vec<f64>,
    /// Singular values of M, descending.
    pub gene: Vec<f64>,
}

/// Spectra of W and M for every dense or shared-expert FFN matrix of `layers` (routed
/// experts left out), labelled `extraction`. Every such matrix must have a gene in `genes`.
pub fn spectra(source: &SourceWeights, genes: &Genes, layers: &[usize], extraction: &str) -> Result<Vec<Spectrum>> {
    let mut out = Vec::new();
    for m in source.config.ffn_matrices().into_iter().filter(|m| layers.contains(&m.layer) && m.kind != FfnKind::Expert) {
        let Some((r, g)) = genes.genes.get(&m.gene_name()) else {
            return Err(MasaError::Invalid(format!("layer {} has no gene `{}` in these genes", m.layer, m.gene_name())));
        };
        let w = source.tensor(&m.name)?.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
        let wm = Mat::<f64>::from_fn(m.d_out, m.d_in, |i, j| w[i][j]);
        let gm = Mat::<f64>::from_fn(*r, *r, |i, j| g[i * r + j] as f64);
        let mut sw = crate::align::singular_values(&wm)?;
        sw.truncate(*r);
        let gene = crate::align::singular_values(&gm)?;
        out.push(Spectrum { extraction: extraction.into(), layer: m.layer, proj: m.proj.into(), source: sw, gene });
    }
    Ok(out)
}

impl Genes {
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<(String, usize, Vec<u8>)> =
            self.genes.iter().map(|(n, (r, g))| (n.clone(), *r, g.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, r, b)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*r, *r], b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| MasaError::bad_file(path, e.to_string()))
            })
            .collect::<Result<_>>()?;
        let meta = serde_json::to_string(&self.meta).map_err(|e| MasaError::Invalid(e.to_string()))?;
        let md: std::collections::HashMap<String, String> = [("masa".to_string(), meta)].into();
        let out = safetensors::serialize(views, Some(md)).map_err(|e| MasaError::bad_file(path, e.to_string()))?;
        crate::home::write_atomic(path, &out)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let (meta_json, genes) = read_gene_file(path)?;
        let meta: GenesMeta =
            serde_json::from_str(&meta_json).map_err(|e| MasaError::bad_file(path, format!("invalid gene metadata: {e}")))?;
        Ok(Genes { meta, genes })
    }
}

/// The raw content of a gene file: its `masa` metadata JSON and the genes (square, F32,
/// finite, row-major), each checked with the file named in errors.
pub fn read_gene_file(path: &Path) -> Result<(String, BTreeMap<String, (usize, Vec<f32>)>)> {
    crate::error::regular_file(path)?;
    let bytes = std::fs::read(path).at(path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| MasaError::bad_file(path, format!("not a safetensors gene file: {e}")))?;
    let meta_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("masa"))
        .ok_or_else(|| MasaError::bad_file(path, "no `masa` metadata: not a gene file written by `masa extract`"))?
        .clone();
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| MasaError::bad_file(path, e.to_string()))?;
    let mut genes = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape();
        if view.dtype() != safetensors::Dtype::F32 || shape.len() != 2 || shape[0] != shape[1] {
            return Err(MasaError::bad_file(path, format!("gene `{name}` must be a square F32 matrix, is {:?} {shape:?}", view.dtype())));
        }
        let g: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if g.iter().any(|v| !v.is_finite()) {
            return Err(MasaError::bad_file(path, format!("gene `{name}` holds NaN or Inf")));
        }
        genes.insert(name, (shape[0], g));
    }
    if genes.is_empty() {
        return Err(MasaError::bad_file(path, "no gene tensors (`layers.{l}.mlp.{proj}.gene`)"));
    }
    Ok((meta_json, genes))
}

/// The paper's procedure (Sec. 3.1), kept for comparison: Adam on minibatches of streamed
/// `(x, W x)` pairs, minimising `L_out / E + λ L_spec / r` (the exact mode's objective, so one
/// `--lambda` means the same trade-off in both modes), L_out the mean of
/// `‖W x − f_d(M f_c(x))‖² / d_out` with f_c, f_d of Eq. (1)-(3) and `E = tr(W S Wᵀ)/d_out`
/// from the calibration statistics (L_out and L_spec: no equation numbers in design.md).
pub struct MinibatchAligner {
    pub layout: Layout,
    w_t: Tensor,
    /// Column indices of each chunk of the padded input.
    chunk_idx: Vec<Tensor>,
    /// For chunk i: (output coordinates p with i(p) = i, their rows a(p)).
    chunk_outputs: Vec<(Tensor, Vec<usize>)>,
    pub m: Vec<f64>,
    adam_m: Vec<f64>,
    adam_v: Vec<f64>,
    step: usize,
    pub lr: f64,
    /// Weight of L_out's gradient (`1 / E`).
    out_weight: f64,
    /// L_spec and its weight (`λ / r`).
    spec: Option<(SpectralAlignment, f64)>,
}

impl MinibatchAligner {
    /// `w`: (d_out, d_in) f32; `m0`: starting gene (the paper starts from random init);
    /// `out_weight`: the weight of L_out (`1 / E`); `spec`: L_spec's target and weight (`λ / r`).
    pub fn new(w: &Tensor, layout: Layout, m0: Vec<f64>, lr: f64, out_weight: f64, spec: Option<(SpectralAlignment, f64)>) -> Result<Self> {
        let dev = w.device();
        let chunk_idx = (0..layout.n)
            .map(|i| {
                let idx: Vec<u32> = (0..layout.r).map(|c| layout.padded_index(i * layout.r + c) as u32).collect();
                Tensor::new(idx.as_slice(), dev)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let chunk_outputs = (0..layout.n)
            .map(|i| {
                let ps: Vec<u32> = (0..layout.d_out).filter(|&p| layout.chunk_row(p).0 == i).map(|p| p as u32).collect();
                let rows = ps.iter().map(|&p| layout.chunk_row(p as usize).1).collect();
                Ok((Tensor::new(ps.as_slice(), dev)?, rows))
            })
            .collect::<Result<Vec<_>>>()?;
        let k = layout.r * layout.r;
        Ok(MinibatchAligner {
            layout,
            w_t: w.t()?.contiguous()?,
            chunk_idx,
            chunk_outputs,
            m: m0,
            adam_m: vec![0.0; k],
            adam_v: vec![0.0; k],
            step: 0,
            lr,
            out_weight,
            spec,
        })
    }

    /// One Adam step on the batch `x` (n, d_in); returns the batch's L_out before the step.
    pub fn step(&mut self, x: &Tensor) -> Result<f64> {
        let l = self.layout;
        let n = x.dim(0)?;
        let y = x.matmul(&self.w_t)?.to_vec2::<f32>()?; // (n, d_out)
        let mt = Tensor::from_vec(self.m.iter().map(|&v| v as f32).collect::<Vec<_>>(), (l.r, l.r), x.device())?.t()?;
        let mut grad = vec![0.0f64; l.r * l.r];
        let mut loss = 0.0;
        let scale = 2.0 * self.out_weight / (l.d_out as f64 * n as f64);
        for (i, idx) in self.chunk_idx.iter().enumerate() {
            let (ps, rows) = &self.chunk_outputs[i];
            if rows.is_empty() {
                continue;
            }
            let xi = x.index_select(idx, 1)?; // (n, r)
            let zi = xi.matmul(&mt)?.to_vec2::<f32>()?; // (n, r): z[t][a] = m_a · x_i
            let ps_v = ps.to_vec1::<u32>()?;
            // G_i[t][a] = Σ_{p in chunk i, a(p)=a} dL/dŷ_p
            let mut g = vec![0.0f32; n * l.r];
            for t in 0..n {
                for (&p, &a) in ps_v.iter().zip(rows) {
                    let diff = zi[t][a] as f64 - y[t][p as usize] as f64;
                    loss += diff * diff;
                    g[t * l.r + a] += (scale * diff) as f32;
                }
            }
            let gt = Tensor::from_vec(g, (n, l.r), x.device())?;
            let dm = gt.t()?.matmul(&xi)?.flatten_all()?.to_vec1::<f32>()?; // (r, r)
            grad.iter_mut().zip(&dm).for_each(|(a, b)| *a += *b as f64);
        }
        if let Some((spec, lambda)) = &self.spec {
            let (_, gs) = spec.loss_grad(&to_mat(&self.m, l.r))?;
            grad.iter_mut().zip(from_mat(&gs)).for_each(|(a, b)| *a += lambda * b);
        }
        self.adam_update(&grad);
        Ok(loss / (l.d_out as f64 * n as f64))
    }

    pub fn steps(&self) -> usize {
        self.step
    }

    fn adam_update(&mut self, grad: &[f64]) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        self.step += 1;
        let (c1, c2) = (1.0 - B1.powi(self.step as i32), 1.0 - B2.powi(self.step as i32));
        for k in 0..grad.len() {
            self.adam_m[k] = B1 * self.adam_m[k] + (1.0 - B1) * grad[k];
            self.adam_v[k] = B2 * self.adam_v[k] + (1.0 - B2) * grad[k] * grad[k];
            self.m[k] -= self.lr * (self.adam_m[k] / c1) / ((self.adam_v[k] / c2).sqrt() + 1e-12);
        }
    }
}

impl ExtractOptions {
    /// The options' ranges, checked before any work.
    pub fn check(&self) -> Result<()> {
        crate::limits::count("--max-iter", self.max_iter, crate::limits::MAX_STEPS, "")?;
        crate::limits::non_negative("--lambda", self.lambda)
    }
}

/// Std of the paper's random gene init in minibatch mode.
pub const MINIBATCH_INIT_STD: f64 = 0.02;

/// Options of the paper's minibatch procedure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MinibatchOptions {
    pub epochs: usize,
    pub lr: f64,
    /// Std of the random gene init.
    pub init_std: f64,
    pub seed: u64,
}

impl MinibatchOptions {
    /// The options' ranges, checked before any work.
    pub fn check(&self) -> Result<()> {
        crate::limits::count("--epochs", self.epochs, crate::limits::MAX_STEPS, "")?;
        crate::limits::positive("--lr", self.lr)?;
        crate::limits::positive("init std", self.init_std)
    }
}

/// Progress of minibatch extraction after an epoch, measured with the exact objective.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochTrace {
    pub epoch: usize,
    pub seconds: f64,
    pub median_rel_l_out: f64,
}

/// Records the inputs of the sites some aligner reads, batch by batch (the paper stores the
/// activations once and trains on them for many epochs).
struct ActivationCache {
    sites: BTreeMap<(usize, String), Vec<Tensor>>,
    last_layer: usize,
}

impl crate::source::model::Hooks for ActivationCache {
    fn ffn_input(&mut self, layer: usize, mlp: crate::source::model::MlpId, site: crate::source::model::Site, x: &Tensor) -> Result<()> {
        if let Some(v) = self.sites.get_mut(&(layer, mlp.site_name(site))) {
            v.push(x.copy()?);
        }
        Ok(())
    }
    fn last_layer(&self) -> Option<usize> {
        Some(self.last_layer)
    }
}

/// [`extract_minibatch`] on the calibration stream `copts` draws from `corpus`, replayed exactly
/// as calibration saw it ([`crate::calibrate::corpus_batches`]).
#[allow(clippy::too_many_arguments)]
pub fn extract_minibatch_on_corpus(
    source: &crate::source::SourceModel,
    source_hash: &str,
    stats: &Stats,
    opts: &ExtractOptions,
    mb: &MinibatchOptions,
    corpus: &crate::corpus::Corpus,
    copts: &crate::calibrate::CalibrateOptions,
    on_epoch: &mut dyn FnMut(&EpochTrace),
) -> Result<(Genes, Vec<EpochTrace>)> {
    let model = crate::source::model::Transformer::load(&source.weights)?;
    let batches = crate::calibrate::corpus_batches(source, corpus, copts)?;
    extract_minibatch(&model, &source.weights, source_hash, stats, opts, mb, &batches, on_epoch)
}

/// The paper's extraction: genes from random init, Adam on minibatches of `(x, W x)` pairs.
/// One forward pass over `batches` stores the inputs of the needed sites (stopping after the
/// last needed layer); then `epochs` passes of Adam over the stored batches. After every epoch
/// the genes are scored with the exact objective from `stats`, so the trace is comparable with
/// exact mode; trace times include the activation pass.
#[allow(clippy::too_many_arguments)]
fn extract_minibatch(
    model: &crate::source::model::Transformer,
    source: &SourceWeights,
    source_hash: &str,
    stats: &Stats,
    opts: &ExtractOptions,
    mb: &MinibatchOptions,
    batches: &[crate::corpus::Batch],
    on_epoch: &mut dyn FnMut(&EpochTrace),
) -> Result<(Genes, Vec<EpochTrace>)> {
    opts.check()?;
    mb.check()?;
    let mut sel = select_matrices(source, stats, opts)?;
    let matrices = std::mem::take(&mut sel.matrices);
    let mut rng = crate::rng::SplitMix64(mb.seed ^ 0x5eed_9e7e);
    let mut aligners = Vec::new();
    let mut exact = Vec::new();
    let mut start = Vec::new();
    let mut targets = Vec::new();
    let mut cache = ActivationCache { sites: BTreeMap::new(), last_layer: 0 };
    for m in &matrices {
        let layout =
            Layout::new(m.d_out, m.d_in, opts.rank.rank(m.d_out, m.d_in)).map_err(|e| MasaError::Invalid(format!("{}: {e}", m.name)))?;
        let w = source.tensor_shaped(&m.name, &[m.d_out, m.d_in])?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let moment = stats.moment(m.layer, &m.stats_site())?;
        exact.push(OutputAlignment::new(&wv, &moment.mean(), layout));
        let sigma = crate::align::singular_values(&Mat::from_fn(m.d_out, m.d_in, |p, j| wv[p * m.d_in + j] as f64))?;
        let target = SpectralAlignment::new(&sigma, layout.r);
        let m0: Vec<f64> = crate::rng::normals(&mut rng, layout.r * layout.r).into_iter().map(|z| z * mb.init_std).collect();
        let ex = exact.last().ok_or_else(|| MasaError::Invalid("no exact objective".into()))?;
        start.push((ex.loss_grad(&to_mat(&m0, layout.r)).0, target.loss(&to_mat(&m0, layout.r))?));
        let spec = (opts.lambda > 0.0).then(|| (target, opts.lambda / layout.r as f64));
        let energy = ex.trace_wsw / layout.d_out as f64;
        aligners.push(MinibatchAligner::new(&w, layout, m0, mb.lr, 1.0 / energy.max(f64::MIN_POSITIVE), spec)?);
        targets.push(SpectralAlignment::new(&sigma, layout.r));
        cache.sites.entry((m.layer, m.stats_site())).or_default();
        cache.last_layer = cache.last_layer.max(m.layer);
    }
    let t0 = Instant::now();
    for b in batches {
        let x = Tensor::from_slice(&b.ids, (b.batch, b.seq_len), &candle_core::Device::Cpu)?;
        model.hidden_states(&x, &mut cache)?;
    }
    let mut trace = Vec::new();
    for epoch in 1..=mb.epochs {
        for k in 0..batches.len() {
            for (m, a) in matrices.iter().zip(aligners.iter_mut()) {
                a.step(&cache.sites[&(m.layer, m.stats_site())][k])?;
            }
        }
        let mut rel: Vec<f64> = aligners
            .iter()
            .zip(&exact)
            .map(|(a, e)| e.loss_grad(&to_mat(&a.m, a.layout.r)).0 / (e.trace_wsw / a.layout.d_out as f64))
            .collect();
        rel.sort_by(|a, b| a.total_cmp(b));
        let point = EpochTrace { epoch, seconds: t0.elapsed().as_secs_f64(), median_rel_l_out: rel[rel.len() / 2] };
        on_epoch(&point);
        trace.push(point);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mut genes = BTreeMap::new();
    let mut reports = Vec::new();
    for (i, ((m, a), e)) in matrices.iter().zip(&aligners).zip(&exact).enumerate() {
        let mm = to_mat(&a.m, a.layout.r);
        let (l_out, _) = e.loss_grad(&mm);
        let energy = e.trace_wsw / a.layout.d_out as f64;
        let (l_out_start, l_spec_start) = start[i];
        reports.push(MatrixReport {
            name: m.name.clone(),
            layer: m.layer,
            proj: m.proj.into(),
            kind: m.kind.to_string(),
            expert: m.expert,
            d_out: m.d_out,
            d_in: m.d_in,
            r: a.layout.r,
            output_energy: energy,
            l_out_start,
            l_out,
            rel_l_out_start: l_out_start / energy,
            rel_l_out: l_out / energy,
            l_spec_start,
            l_spec: targets[i].loss(&mm)?,
            iterations: a.steps(),
            seconds,
        });
        genes.insert(m.gene_name(), (a.layout.r, a.m.iter().map(|&v| v as f32).collect()));
    }
    let meta = GenesMeta::new(source, source_hash, stats, opts, "minibatch", sel, reports);
    Ok((Genes { meta, genes }, trace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_options_have_ranges() {
        ExtractOptions::default().check().unwrap();
        let e = ExtractOptions { max_iter: 0, ..Default::default() }.check().unwrap_err().to_string();
        assert!(e.contains("--max-iter 0"), "{e}");
        let e = ExtractOptions { lambda: f64::NAN, ..Default::default() }.check().unwrap_err().to_string();
        assert!(e.contains("--lambda"), "{e}");
        let mb = MinibatchOptions { epochs: 10, lr: 1e-3, init_std: MINIBATCH_INIT_STD, seed: 0 };
        mb.check().unwrap();
        let e = MinibatchOptions { epochs: 0, ..mb.clone() }.check().unwrap_err().to_string();
        assert!(e.contains("--epochs 0: must be in 1..="), "{e}");
        let e = MinibatchOptions { lr: f64::NAN, ..mb }.check().unwrap_err().to_string();
        assert!(e.contains("--lr NaN"), "{e}");
    }
}
