//! `masa calibrate`: a streaming pass over a corpus that accumulates, per layer and FFN input
//! site, `Σ x xᵀ` and token counts (Sec. 3.1's output alignment needs nothing else), tokens per
//! dataset, and for MoE layers routing counts per expert per dataset. Expert sites see only the
//! tokens routed to them.
//!
//! The pass is layer-sequential (as GPTQ-style quantizers run): the calibration stream is cut
//! into blocks of tokens; for each block the hidden states are kept, each decoder layer in turn
//! is brought in from the (memory-mapped) source, run on the block, its statistics accumulated,
//! and dropped. Memory is the embedding, one layer, one block of hidden states and the
//! statistics, whatever the depth, and the sums are those of a whole-model pass over the same
//! batches: each site receives the same per-batch products in the same order (test
//! `layer_sequential_statistics_equal_the_whole_model_pass`).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::corpus::Batch;
use crate::error::{MasaError, Result};
use crate::source::model::{Hooks, Layer, MlpId, NoHooks, Positions, Site, Transformer};
use crate::source::{ModelConfig, SourceWeights};
use crate::stats::{moment_key, routing_key, Moment, Stats, StatsMeta, FORMAT};

/// Hooks that add each FFN input's `xᵀx` (computed in f32 per batch, summed in f64), route
/// counts per dataset and token counts. [`calibrate_with`] drives it layer by layer; any
/// forward pass that calls the hooks (e.g. [`Transformer::hidden_states`]) can drive it.
pub struct Accumulator<'a> {
    /// Rank-specific mode: the matrices of the layers being run to accumulate r×r sums for, by
    /// input site; `None`: full `Σ x xᵀ` per site.
    rank_targets: Option<BTreeMap<(usize, String), Vec<RankTarget>>>,
    cross: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    moments: BTreeMap<String, Moment>,
    routing: BTreeMap<String, Vec<f64>>,
    datasets: &'a [String],
    /// Dataset of each token of the current batch.
    token_dataset: Vec<usize>,
    n_experts: usize,
    /// Routed experts whose statistics are kept, by MoE layer (`calibrate --experts`); an
    /// expert of a layer listed here but not in its list is skipped. `None`: all.
    keep: Option<BTreeMap<usize, Vec<usize>>>,
    /// Count routing only (the first pass of `calibrate --experts`).
    routing_only: bool,
    tokens: u64,
    dataset_tokens: BTreeMap<String, u64>,
    seq_len: usize,
}

impl<'a> Accumulator<'a> {
    pub fn new(config: &ModelConfig, datasets: &'a [String]) -> Self {
        Accumulator {
            rank_targets: None,
            cross: BTreeMap::new(),
            moments: BTreeMap::new(),
            routing: BTreeMap::new(),
            datasets,
            token_dataset: Vec::new(),
            n_experts: config.moe.as_ref().map_or(0, |m| m.n_routed_experts),
            keep: None,
            routing_only: false,
            tokens: 0,
            dataset_tokens: BTreeMap::new(),
            seq_len: 0,
        }
    }

    /// Check and count a batch entering the pass (once per batch).
    pub fn count(&mut self, b: &Batch) -> Result<()> {
        if b.ids.len() != b.batch * b.seq_len || b.dataset.len() != b.batch || b.dataset.iter().any(|&d| d >= self.datasets.len()) {
            return Err(MasaError::Shape(format!(
                "calibration batch of {} ids is not {}x{} of known datasets",
                b.ids.len(),
                b.batch,
                b.seq_len
            )));
        }
        for &d in &b.dataset {
            *self.dataset_tokens.entry(self.datasets[d].clone()).or_insert(0) += b.seq_len as u64;
        }
        self.tokens += (b.batch * b.seq_len) as u64;
        self.seq_len = b.seq_len;
        Ok(())
    }

    /// Add `xᵀx` of one FFN input site's rows `x` (`n × d`, row-major): computed in f32 per
    /// batch as a symmetric rank-k product, summed in f64.
    fn add_moment(&mut self, layer: usize, mlp: MlpId, site: Site, x: &[f32], n: usize, d: usize) {
        let mut gram = vec![0f32; d * d];
        crate::student::kernels::gram(&mut gram, x, n, d);
        let m = self.moments.entry(moment_key(layer, &mlp.site_name(site))).or_insert_with(|| Moment::new(d));
        m.xxt.iter_mut().zip(&gram).for_each(|(acc, g)| *acc += *g as f64);
        m.count += n as f64;
    }

    /// The batch whose hidden states the next hook calls see.
    pub fn observe(&mut self, b: &Batch) {
        self.token_dataset = b.dataset.iter().flat_map(|&d| std::iter::repeat_n(d, b.seq_len)).collect();
    }

    /// The statistics; `meta` supplies the provenance fields, token counts are filled in here.
    pub fn into_stats(self, mut meta: StatsMeta) -> Result<Stats> {
        if self.tokens == 0 {
            return Err(MasaError::Invalid("calibration saw no tokens: the corpus is empty or shorter than one sequence".into()));
        }
        meta.tokens = self.tokens;
        meta.seq_len = self.seq_len;
        meta.dataset_tokens = self.dataset_tokens;
        meta.format = FORMAT.to_string();
        Ok(Stats { meta, moments: self.moments, routing: self.routing, cross: self.cross })
    }
}

impl Hooks for Accumulator<'_> {
    fn ffn_input(&mut self, layer: usize, mlp: MlpId, site: Site, x: &Tensor) -> Result<()> {
        let skipped = match (mlp, &self.keep) {
            (MlpId::Expert(e), Some(keep)) => keep.get(&layer).is_some_and(|k| !k.contains(&e)),
            _ => false,
        };
        if self.routing_only || skipped {
            return Ok(());
        }
        if let Some(plan) = &self.rank_targets {
            if let Some(targets) = plan.get(&(layer, mlp.site_name(site))) {
                for t in targets {
                    t.accumulate(x, &mut self.moments, &mut self.cross)?;
                }
            }
            return Ok(());
        }
        let (n, d) = x.dims2()?;
        self.add_moment(layer, mlp, site, &x.flatten_all()?.to_vec1::<f32>()?, n, d);
        Ok(())
    }

    fn routing(&mut self, layer: usize, experts: &[u32], top_k: usize) -> Result<()> {
        for (i, &e) in experts.iter().enumerate() {
            let ds = &self.datasets[self.token_dataset[i / top_k]];
            let counts = self.routing.entry(routing_key(layer, ds)).or_insert_with(|| vec![0.0; self.n_experts]);
            counts[e as usize] += 1.0;
        }
        Ok(())
    }
}

/// One matrix of the rank-specific mode (design.md "Statistics"): instead of the d×d moment it
/// accumulates exactly what output alignment at rank r reads: the chunk blocks
/// `Σ x^(i) x^(i)ᵀ` (r×r each), `Σ x^(i(p)) y_p` for every output p (r × d_out) and `Σ ‖y‖²`,
/// with `y = W x`. Memory `n r² + r d_out` instead of `d_in²`.
pub struct RankTarget {
    /// Statistics key prefix, `{gene base}.r{r}`.
    pub key: String,
    pub layout: crate::align::Layout,
    /// `W` `(d_out, d_in)`, sharing the layer's storage.
    w: Tensor,
    chunk_idx: Vec<Tensor>,
}

impl RankTarget {
    pub fn new(base: &str, w: &Tensor, layout: crate::align::Layout) -> Result<Self> {
        let chunk_idx = (0..layout.n)
            .map(|i| {
                let idx: Vec<u32> = (0..layout.r).map(|c| layout.padded_index(i * layout.r + c) as u32).collect();
                Tensor::new(idx.as_slice(), w.device())
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(RankTarget { key: format!("{base}.r{}", layout.r), layout, w: w.clone(), chunk_idx })
    }

    fn accumulate(
        &self,
        x: &Tensor,
        moments: &mut BTreeMap<String, Moment>,
        cross: &mut BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    ) -> Result<()> {
        let l = self.layout;
        let n = x.dim(0)?;
        let y = x.matmul(&self.w.t()?)?; // (n, d_out), no transposed copy of W
        let ysq = y.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let c = cross.entry(format!("{}.cross", self.key)).or_insert_with(|| (vec![l.r, l.d_out], vec![0.0; l.r * l.d_out]));
        for (i, idx) in self.chunk_idx.iter().enumerate() {
            let xi = x.index_select(idx, 1)?; // (n, r)
            let gram = xi.t()?.matmul(&xi)?.flatten_all()?.to_vec1::<f32>()?;
            let m = moments.entry(format!("{}.block{i}", self.key)).or_insert_with(|| Moment::new(l.r));
            m.xxt.iter_mut().zip(&gram).for_each(|(a, g)| *a += *g as f64);
            m.count += n as f64;
            let xy = xi.t()?.matmul(&y)?.to_vec2::<f32>()?; // (r, d_out)
            for p in (0..l.d_out).filter(|&p| l.chunk_row(p).0 == i) {
                for u in 0..l.r {
                    c.1[u * l.d_out + p] += xy[u][p] as f64;
                }
            }
        }
        let ys = cross.entry(format!("{}.ysq", self.key)).or_insert_with(|| (vec![1], vec![0.0]));
        ys.1[0] += ysq;
        Ok(())
    }
}

/// Tokens per block of the layer-sequential pass for `config`: 1 GiB of f32 hidden states
/// (65,536 tokens at OLMo-7B's width), so each layer's weights are read once per block.
pub fn block_tokens(config: &ModelConfig) -> usize {
    ((1usize << 28) / config.hidden_size.max(1)).max(1)
}

/// How [`calibrate_with`] runs.
#[derive(Clone, Debug, Default)]
pub struct PassOptions {
    /// Rank-specific mode at this rank; `None`: full `Σ x xᵀ`.
    pub rank: Option<crate::align::RankSpec>,
    /// Tokens per block (whole batches; at least one batch); see [`block_tokens`].
    pub block_tokens: usize,
    /// Accumulate statistics of these layers only (the pass stops after the last of them), so
    /// statistics too large for one machine are computed in layer ranges; `None`: all layers.
    pub layers: Option<Vec<usize>>,
    /// MoE sources: statistics of only the `k` most-routed routed experts of each MoE layer
    /// ([`Stats::most_routed`], as extraction chooses them), found by a first pass that counts
    /// routing only; shared experts and dense layers always. `None`: every expert.
    pub experts: Option<usize>,
    /// Where the forward runs: the CPU, or a CUDA device (plain Llama sources, full mode).
    pub device: crate::engine::Device,
}

impl PassOptions {
    /// The last layer the pass must run for `config`; an error names a layer it does not have.
    pub fn last_layer(&self, config: &ModelConfig) -> Result<usize> {
        let n = config.num_hidden_layers;
        match &self.layers {
            None => Ok(n - 1),
            Some(ls) => match ls.iter().max() {
                None => Err(MasaError::Invalid("--layers: name at least one layer".into())),
                Some(&l) if l >= n => Err(MasaError::Invalid(format!("--layers {l}: the source has layers 0..{}", n - 1))),
                Some(&l) => Ok(l),
            },
        }
    }
}

/// Bytes of the f64 statistics a pass accumulates for `config`, counting every routed expert
/// it keeps (an expert no token reaches adds nothing, so this is an upper bound for MoE sources).
pub fn stats_bytes(config: &ModelConfig, pass: &PassOptions) -> u64 {
    let wanted = |l: usize| pass.layers.as_ref().is_none_or(|ls| ls.contains(&l));
    let mut sites = std::collections::BTreeSet::new();
    let mut values = 0u64;
    let kept = |m: &crate::source::FfnMatrix| match (m.kind, m.expert, pass.experts) {
        (crate::source::FfnKind::Expert, Some(e), Some(k)) => e < k,
        _ => true,
    };
    for m in config.ffn_matrices().into_iter().filter(|m| wanted(m.layer) && kept(m)) {
        match pass.rank {
            // One d×d sum and a count per input site (gate and up share theirs).
            None if sites.insert((m.layer, m.stats_site())) => values += (m.d_in * m.d_in + 1) as u64,
            None => {}
            Some(spec) => {
                let r = spec.rank(m.d_out, m.d_in).min(m.d_in);
                values += (m.d_in.div_ceil(r.max(1)) * (r * r + 1) + r * m.d_out + 1) as u64;
            }
        }
    }
    8 * values
}

/// Refuse a pass whose statistics cannot fit in this machine's memory (Linux: `MemTotal`),
/// naming the ways to shrink them; warn when they exceed the memory available now.
fn check_memory(config: &ModelConfig, pass: &PassOptions) -> Result<()> {
    let need = stats_bytes(config, pass) as f64 / 1e9;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |key: &str| {
        meminfo.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok()).map(|kb| kb * 1024.0 / 1e9)
    };
    let shrink = "use --rank or --ratio (only the sums extraction at that rank reads) or --layers (a range of layers per run; `masa stats merge` adds runs)";
    match (field("MemTotal:"), field("MemAvailable:")) {
        (Some(total), _) if need > total => Err(MasaError::Invalid(format!(
            "the statistics of this pass need {need:.1} GB (f64) and this machine has {total:.1} GB of memory: {shrink}"
        ))),
        (_, Some(avail)) if need > avail => {
            eprintln!("warning: the statistics of this pass need {need:.1} GB (f64), {avail:.1} GB of memory is available now; if it runs out, {shrink}");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Run `source` over `batches`, layer-sequentially in blocks of whole batches, and return the
/// accumulated statistics. `meta` supplies the provenance fields. `on_progress(n)` reports `n`
/// tokens through one layer (a whole pass is tokens × layers run).
pub fn calibrate_with(
    source: &SourceWeights,
    batches: impl Iterator<Item = Result<Batch>>,
    datasets: &[String],
    meta: StatsMeta,
    pass: &PassOptions,
    on_progress: &mut dyn FnMut(usize),
) -> Result<Stats> {
    if let crate::engine::Device::Cuda(ordinal) = pass.device {
        let cfg = crate::student::plain_llama(&source.config).filter(|_| pass.rank.is_none() && pass.experts.is_none()).ok_or_else(|| {
            MasaError::Invalid(format!(
                "--device {}: calibration on CUDA runs plain Llama sources (SmolLM2, masa's students) in the full mode; this is a {} source{}: use --device cpu",
                pass.device,
                source.config.arch.name(),
                if pass.rank.is_some() { " in rank-specific mode" } else { "" }
            ))
        })?;
        #[cfg(feature = "cuda")]
        return calibrate_cuda(source, &cfg, ordinal, batches, datasets, meta, pass, on_progress);
        #[cfg(not(feature = "cuda"))]
        return Err({
            let _ = (cfg, ordinal);
            crate::engine::no_cuda()
        });
    }
    if let Some(cfg) = fused_calibration(&source.config, pass) {
        return calibrate_fused(source, &cfg, batches, datasets, meta, pass, on_progress);
    }
    let model = Transformer::load_without_layers(source)?;
    let mut acc = Accumulator::new(&model.config, datasets);
    let (Some(k), Some(moe)) = (pass.experts, &model.config.moe) else {
        sequential(source, &model, batches, &mut acc, pass, on_progress)?;
        return acc.into_stats(meta);
    };
    // `--experts k`: a routing-only pass over the same batches finds each MoE layer's k
    // most-routed experts (not needed for k = 0), then the pass with statistics keeps only them.
    let batches: Vec<Batch> = batches.collect::<Result<_>>()?;
    let wanted = |l: usize| model.config.is_moe_layer(l) && pass.layers.as_ref().is_none_or(|ls| ls.contains(&l));
    let moe_layers: Vec<usize> = (0..=pass.last_layer(&model.config)?).filter(|&l| wanted(l)).collect();
    let mut keep = BTreeMap::new();
    if k > 0 {
        let mut routing = Accumulator::new(&model.config, datasets);
        routing.routing_only = true;
        sequential(source, &model, batches.iter().cloned().map(Ok), &mut routing, pass, on_progress)?;
        let counts = routing.into_stats(meta.clone())?;
        for &l in &moe_layers {
            keep.insert(l, counts.most_routed(l, moe.n_routed_experts, k)?);
        }
    } else {
        keep.extend(moe_layers.iter().map(|&l| (l, Vec::new())));
    }
    acc.keep = Some(keep);
    sequential(source, &model, batches.into_iter().map(Ok), &mut acc, pass, on_progress)?;
    let mut stats = acc.into_stats(meta)?;
    stats.meta.experts = Some(k);
    Ok(stats)
}

/// The layer-sequential pass of [`calibrate_with`], feeding `acc`.
fn sequential(
    source: &SourceWeights,
    model: &Transformer,
    batches: impl Iterator<Item = Result<Batch>>,
    acc: &mut Accumulator,
    pass: &PassOptions,
    on_progress: &mut dyn FnMut(usize),
) -> Result<()> {
    let last = pass.last_layer(&model.config)?;
    let mut batches = batches.peekable();
    while batches.peek().is_some() {
        // One block: its batches and their hidden states, embedded.
        let mut block: Vec<(Batch, Tensor)> = Vec::new();
        let mut n = 0;
        while n < pass.block_tokens.max(1) {
            let Some(b) = batches.next() else { break };
            let b = b?;
            acc.count(&b)?;
            let x = model.embed(&Tensor::from_slice(&b.ids, (b.batch, b.seq_len), &Device::Cpu)?)?;
            n += b.ids.len();
            block.push((b, x));
        }
        let mut positions: Vec<Positions> = Vec::new();
        for (b, _) in &block {
            if !positions.iter().any(|p| p.seq_len() == b.seq_len) {
                positions.push(model.positions(b.seq_len, &Device::Cpu)?);
            }
        }
        for l in 0..=last {
            let layer = model.load_layer(source, l)?;
            let wanted = pass.layers.as_ref().is_none_or(|ls| ls.contains(&l));
            acc.rank_targets = match pass.rank {
                Some(r) if wanted && !acc.routing_only => Some(rank_targets(&model.config, l, &layer, r)?),
                _ => None,
            };
            for (b, x) in block.iter_mut() {
                let pos = positions.iter().find(|p| p.seq_len() == b.seq_len).ok_or_else(|| MasaError::Shape("positions".into()))?;
                acc.observe(b);
                let hooks: &mut dyn Hooks = if wanted { &mut *acc } else { &mut NoHooks };
                *x = model.run_layer(&layer, l, x, b.batch, pos, hooks)?;
                on_progress(b.ids.len());
            }
            // The targets share the layer's weights: release both before the next layer loads.
            acc.rank_targets = None;
        }
    }
    Ok(())
}

/// Plain Llama sources up to this many bytes of f32 weights (SmolLM2-135M: 0.54 GB) calibrate
/// whole on the training engine's fused kernels; larger ones layer-sequentially.
pub const FUSED_CALIBRATION_BYTES: usize = 2 << 30;

/// The engine config of `config` when its full-mode calibration runs fused
/// ([`FUSED_CALIBRATION_BYTES`]; rank-specific mode always runs layer-sequentially).
fn fused_calibration(config: &ModelConfig, pass: &PassOptions) -> Option<crate::student::StudentConfig> {
    let cfg = crate::student::plain_llama(config)?;
    (pass.rank.is_none() && cfg.num_parameters() * 4 <= FUSED_CALIBRATION_BYTES).then_some(cfg)
}

/// [`calibrate_with`] for a plain Llama source held whole: each batch runs through the
/// training engine's fused forward ([`crate::student::llama::Llama::forward_observed`]),
/// which hands every layer's FFN inputs to the accumulator as they are computed. The sums
/// equal a pass through candle's forward to f32 rounding (test
/// `layer_sequential_statistics_equal_the_whole_model_pass`, its `llama` case).
fn calibrate_fused(
    source: &SourceWeights,
    cfg: &crate::student::StudentConfig,
    batches: impl Iterator<Item = Result<Batch>>,
    datasets: &[String],
    meta: StatsMeta,
    pass: &PassOptions,
    on_progress: &mut dyn FnMut(usize),
) -> Result<Stats> {
    use crate::student::llama::{Llama, Workspace};
    let last = pass.last_layer(&source.config)?;
    let params = crate::student::load_params(source, cfg)?;
    let model = Llama::new(cfg);
    let mut acc = Accumulator::new(&source.config, datasets);
    let mut ws: Option<Workspace<f32>> = None;
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    for b in batches {
        let b = b?;
        acc.count(&b)?;
        acc.observe(&b);
        let n = b.ids.len();
        model.infer(&params, &mut ws, &b.ids, b.batch, b.seq_len, &mut |l, ffn_in, ffn_mid| {
            if pass.layers.as_ref().is_none_or(|ls| ls.contains(&l)) {
                acc.add_moment(l, MlpId::Dense, Site::FfnIn, ffn_in, n, h);
                acc.add_moment(l, MlpId::Dense, Site::FfnMid, ffn_mid, n, f);
            }
            on_progress(n);
            l < last
        })?;
    }
    acc.into_stats(meta)
}

/// [`calibrate_with`] on CUDA device `ordinal` for a plain Llama source: each batch runs the
/// GPU engine's forward in f32 (cuBLAS pedantic, no TF32), and each layer's two FFN-input
/// `xᵀx` are one f32 product per batch added in f64 on the device, as [`calibrate_fused`] does
/// on the CPU (`masa bench cuda-check` compares the two).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn calibrate_cuda(
    source: &SourceWeights,
    cfg: &crate::student::StudentConfig,
    ordinal: usize,
    batches: impl Iterator<Item = Result<Batch>>,
    datasets: &[String],
    meta: StatsMeta,
    pass: &PassOptions,
    on_progress: &mut dyn FnMut(usize),
) -> Result<Stats> {
    let layers = pass.last_layer(&source.config)? + 1;
    let mut model = crate::cuda::llama::GpuLlama::load_frozen(source, cfg, ordinal, false)?;
    let mut sums = model.ffn_grams(pass.layers.as_deref())?;
    let mut acc = Accumulator::new(&source.config, datasets);
    for b in batches {
        let b = b?;
        acc.count(&b)?;
        model.forward(&b.ids, b.batch, b.seq_len)?;
        model.add_ffn_grams(&mut sums)?;
        on_progress(b.ids.len() * layers);
    }
    let count = sums.rows as f64;
    for (l, xin, xmid) in model.read_ffn_grams(&sums)? {
        for (site, xxt, dim) in [(Site::FfnIn, xin, cfg.hidden_size), (Site::FfnMid, xmid, cfg.intermediate_size)] {
            acc.moments.insert(moment_key(l, &MlpId::Dense.site_name(site)), Moment { dim, xxt, count });
        }
    }
    acc.into_stats(meta)
}

/// [`calibrate_with`] in the full mode with the default [`block_tokens`].
pub fn calibrate(
    source: &SourceWeights,
    batches: impl Iterator<Item = Result<Batch>>,
    datasets: &[String],
    meta: StatsMeta,
    on_progress: &mut dyn FnMut(usize),
) -> Result<Stats> {
    let pass = PassOptions { block_tokens: block_tokens(&source.config), ..Default::default() };
    calibrate_with(source, batches, datasets, meta, &pass, on_progress)
}

/// Options of a calibration run over a corpus (serialized into `masa run`'s cache keys).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CalibrateOptions {
    pub tokens: u64,
    pub seq_len: usize,
    pub batch: usize,
    pub seed: u64,
    /// Restrict to these domains (e.g. a single-domain ablation); `None`: all.
    pub domains: Option<Vec<String>>,
    /// Rank-specific mode: accumulate only the sums extraction at this rank needs.
    pub rank: Option<crate::align::RankSpec>,
    /// Only these layers' statistics ([`PassOptions::layers`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
    /// Only this shard of the batches (distributed calibration; [`Shard`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// MoE sources: statistics of only the k most-routed experts per MoE layer
    /// ([`PassOptions::experts`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<usize>,
    /// [`PassOptions::device`]; in cache keys only when not the CPU.
    #[serde(skip_serializing_if = "crate::engine::Device::is_cpu")]
    pub device: crate::engine::Device,
}

/// Shard `index` of `count` (0-based) of a calibration stream: batch `k` belongs to shard
/// `k mod count`. The stream itself is the same in every shard (each skips the others'
/// batches), so the shards' statistics, merged with `masa stats merge`, are one pass's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    /// `i/N` with `0 <= i < N` (e.g. `$SLURM_ARRAY_TASK_ID/N` with `--array=0-(N-1)`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parsed = s.split_once('/').and_then(|(i, n)| Some((i.trim().parse::<usize>().ok()?, n.trim().parse::<usize>().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(format!("`{s}`: expected i/N with 0 <= i < N, e.g. 0/4")),
        }
    }
}

impl CalibrateOptions {
    /// The options' ranges, checked before any work (`max_positions`: the source's context).
    pub fn check(&self, max_positions: usize) -> Result<()> {
        use crate::limits::{count, in_range, MAX_BATCH, MAX_TOKENS};
        if !self.device.is_cpu() && !cfg!(feature = "cuda") {
            return Err(crate::engine::no_cuda());
        }
        in_range("--tokens", self.tokens, 1..=MAX_TOKENS, "")?;
        count("--batch", self.batch, MAX_BATCH, "")?;
        count("--seq", self.seq_len, max_positions, "the source's positions")
    }

    /// `--experts` against the source: MoE only, at most its routed experts per layer, and not
    /// with `--shard` (each shard would choose its experts from its own tokens).
    pub fn check_experts(&self, config: &ModelConfig) -> Result<()> {
        let Some(k) = self.experts else { return Ok(()) };
        let Some(moe) = &config.moe else {
            return Err(MasaError::Invalid(format!(
                "--experts {k}: the source is dense ({}); --experts applies to MoE sources only",
                config.arch.name()
            )));
        };
        crate::limits::in_range("--experts", k as u64, 0..=moe.n_routed_experts as u64, "the source's routed experts per layer")?;
        if self.shard.is_some() {
            return Err(MasaError::Invalid("--experts with --shard: each shard would keep the experts its own tokens route to most, and the shards would not merge; calibrate the shards without --experts".into()));
        }
        Ok(())
    }
}

/// The rank-specific targets of layer `l`: each of its FFN matrices at its rank, grouped by
/// input site.
pub fn rank_targets(
    config: &ModelConfig,
    l: usize,
    layer: &Layer,
    rank: crate::align::RankSpec,
) -> Result<BTreeMap<(usize, String), Vec<RankTarget>>> {
    let mut plan: BTreeMap<(usize, String), Vec<RankTarget>> = BTreeMap::new();
    for m in config.ffn_matrices().into_iter().filter(|m| m.layer == l) {
        let w = layer.ffn_weight(m.mlp(), m.proj).ok_or_else(|| MasaError::Invalid(format!("no weight for {}", m.name)))?;
        let layout = crate::align::Layout::new(m.d_out, m.d_in, rank.rank(m.d_out, m.d_in))
            .map_err(|e| MasaError::Invalid(format!("{}: {e}", m.name)))?;
        let base = m.gene_name();
        plan.entry((m.layer, m.stats_site())).or_default().push(RankTarget::new(base.trim_end_matches(".gene"), w, layout)?);
    }
    Ok(plan)
}

/// The calibration token stream: every domain (dataset) contributes an equal share of the
/// budget, batches alternate between domains, each sequence a window of that domain's
/// deterministic token stream. Returns the dataset names and the batches (lazily tokenized).
pub fn corpus_batches_with<'a>(
    source: &crate::source::SourceModel,
    corpus: &'a crate::corpus::Corpus,
    opts: &CalibrateOptions,
    encode: crate::corpus::Encode<'a>,
) -> Result<(Vec<String>, Vec<crate::corpus::TokenStream<'a>>, usize)> {
    use crate::corpus::{token_stream, Split};
    opts.check(source.weights.config.max_position_embeddings)?;
    opts.check_experts(&source.weights.config)?;
    let datasets: Vec<String> = match &opts.domains {
        Some(d) => d.clone(),
        None => corpus.iter(Split::Train, None).map(|d| d.domain.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect(),
    };
    if datasets.is_empty() {
        return Err(MasaError::Invalid("the corpus has no training documents".into()));
    }
    let eos = source.tokenizer.eos_id();
    let streams = datasets
        .iter()
        .enumerate()
        .map(|(i, d)| token_stream(corpus, Split::Train, Some(std::slice::from_ref(d)), opts.seed.wrapping_add(i as u64), encode, eos))
        .collect::<Result<Vec<_>>>()?;
    let n_batches = opts.tokens.div_ceil((opts.batch * opts.seq_len) as u64).max(1) as usize;
    Ok((datasets, streams, n_batches))
}

/// crate::corpus::Batch `k` of the calibration stream (see [`corpus_batches_with`]).
pub fn next_batch(streams: &mut [crate::corpus::TokenStream<'_>], k: usize, opts: &CalibrateOptions) -> Result<crate::corpus::Batch> {
    let d = k % streams.len();
    let seqs = streams[d].next_batch(opts.batch, opts.seq_len)?;
    Ok(crate::corpus::Batch { ids: seqs.concat(), batch: opts.batch, seq_len: opts.seq_len, dataset: vec![d; opts.batch] })
}

/// Every batch of the calibration stream of [`corpus_batches_with`], in order: what minibatch
/// extraction replays.
pub fn corpus_batches(
    source: &crate::source::SourceModel,
    corpus: &crate::corpus::Corpus,
    opts: &CalibrateOptions,
) -> Result<Vec<crate::corpus::Batch>> {
    let encode = |t: &str| source.tokenizer.encode(t, false);
    let (_, mut streams, n_batches) = corpus_batches_with(source, corpus, opts, &encode)?;
    (0..n_batches).map(|k| next_batch(&mut streams, k, opts)).collect()
}

/// Calibrate `source` on the training split of `corpus` over [`corpus_batches_with`].
pub fn calibrate_on_corpus(
    source: &crate::source::SourceModel,
    corpus: &crate::corpus::Corpus,
    corpus_desc: &str,
    opts: &CalibrateOptions,
) -> Result<Stats> {
    let encode = |t: &str| source.tokenizer.encode(t, false);
    let (datasets, mut streams, n_batches) = corpus_batches_with(source, corpus, opts, &encode)?;
    let per_batch = (opts.batch * opts.seq_len) as u64;
    let meta = StatsMeta {
        format: FORMAT.into(),
        source_hash: source.fingerprint()?,
        source: source.weights.path.display().to_string(),
        arch: source.weights.config.arch.name().into(),
        corpus: vec![match opts.shard {
            Some(s) => format!("{corpus_desc}; domains {}; shard {}/{} of {} tokens", datasets.join(","), s.index, s.count, opts.tokens),
            None => format!("{corpus_desc}; domains {}", datasets.join(",")),
        }],
        tokens: 0,
        seq_len: opts.seq_len,
        seeds: vec![opts.seed],
        dataset_tokens: BTreeMap::new(),
        masa_version: env!("CARGO_PKG_VERSION").into(),
        experts: None,
    };
    // Every batch is drawn (the streams advance alike in every shard); a shard keeps its own.
    let mine = |k: usize| opts.shard.is_none_or(|s| k % s.count == s.index);
    let kept = (0..n_batches).filter(|&k| mine(k)).count() as u64;
    let batches = (0..n_batches).map(|k| (k, next_batch(&mut streams, k, opts))).filter(move |(k, _)| mine(*k)).map(|(_, b)| b);
    let w = &source.weights;
    let pass = PassOptions {
        rank: opts.rank,
        block_tokens: block_tokens(&w.config),
        layers: opts.layers.clone(),
        experts: opts.experts,
        device: opts.device,
    };
    let layers = pass.last_layer(&w.config)? as u64 + 1;
    check_memory(&w.config, &pass)?;
    let passes = if opts.experts.is_some_and(|k| k > 0) { 2 } else { 1 };
    let bar = crate::progress::count_bar(passes * kept * per_batch * layers, "calibrating", "token-layers");
    let stats = calibrate_with(w, batches, &datasets, meta, &pass, &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_options_have_ranges() {
        let ok = CalibrateOptions {
            tokens: 4096,
            seq_len: 256,
            batch: 8,
            seed: 0,
            domains: None,
            rank: None,
            layers: None,
            shard: None,
            experts: None,
            device: Default::default(),
        };
        ok.check(2048).unwrap();
        for (o, want) in [
            (CalibrateOptions { tokens: 0, ..ok.clone() }, "--tokens 0"),
            (CalibrateOptions { tokens: u64::MAX, ..ok.clone() }, "--tokens"),
            (CalibrateOptions { batch: 0, ..ok.clone() }, "--batch 0"),
            (CalibrateOptions { seq_len: 0, ..ok.clone() }, "--seq 0"),
            (CalibrateOptions { seq_len: 100_000_000, ..ok.clone() }, "positions"),
        ] {
            let e = o.check(2048).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
