//! `masa calibrate`: one streaming forward pass over a corpus that accumulates, per layer and
//! FFN input site, `Σ x xᵀ` and token counts (Sec. 3.1's output alignment needs nothing else),
//! tokens per dataset, and for MoE layers routing counts per expert per dataset. Expert sites
//! see only the tokens routed to them.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::error::{MasaError, Result};
use crate::source::model::{Hooks, MlpId, Site, Transformer};
use crate::stats::{moment_key, routing_key, Moment, Stats, StatsMeta, FORMAT};


/// Hooks that add each FFN input's `xᵀx` (computed in f32 per batch, summed in f64).
struct Accumulator<'a> {
    /// Rank-specific mode: the matrices to accumulate r×r sums for, by input site; `None`:
    /// full `Σ x xᵀ` per site.
    rank_plan: Option<BTreeMap<(usize, String), Vec<RankTarget>>>,
    cross: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    moments: BTreeMap<String, Moment>,
    routing: BTreeMap<String, Vec<f64>>,
    datasets: &'a [String],
    /// Dataset of each token of the current batch.
    token_dataset: Vec<usize>,
    n_experts: usize,
}

impl Hooks for Accumulator<'_> {
    fn ffn_input(&mut self, layer: usize, mlp: MlpId, site: Site, x: &Tensor) -> Result<()> {
        if let Some(plan) = &self.rank_plan {
            if let Some(targets) = plan.get(&(layer, mlp.site_name(site))) {
                for t in targets {
                    t.accumulate(x, &mut self.moments, &mut self.cross)?;
                }
            }
            return Ok(());
        }
        let (n, d) = x.dims2()?;
        let gram = x.t()?.matmul(x)?.flatten_all()?.to_vec1::<f32>()?;
        let m = self.moments.entry(moment_key(layer, &mlp.site_name(site))).or_insert_with(|| Moment::new(d));
        m.xxt.iter_mut().zip(&gram).for_each(|(acc, g)| *acc += *g as f64);
        m.count += n as f64;
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
    w_t: Tensor,
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
        Ok(RankTarget { key: format!("{base}.r{}", layout.r), layout, w_t: w.t()?.contiguous()?, chunk_idx })
    }

    fn accumulate(&self, x: &Tensor, moments: &mut BTreeMap<String, Moment>, cross: &mut BTreeMap<String, (Vec<usize>, Vec<f64>)>) -> Result<()> {
        let l = self.layout;
        let n = x.dim(0)?;
        let y = x.matmul(&self.w_t)?; // (n, d_out)
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

/// Run the model over `batches` and return the accumulated statistics. `meta` supplies the
/// provenance fields; tokens and per-dataset counts are filled in here.
pub fn calibrate(
    model: &Transformer,
    batches: impl Iterator<Item = Result<crate::corpus::Batch>>,
    datasets: &[String],
    meta: StatsMeta,
    on_batch: &mut dyn FnMut(usize),
) -> Result<Stats> {
    calibrate_with(model, batches, datasets, meta, None, on_batch)
}

/// [`calibrate`], optionally in the rank-specific mode (`rank_plan`: targets by input site).
pub fn calibrate_with(
    model: &Transformer,
    batches: impl Iterator<Item = Result<crate::corpus::Batch>>,
    datasets: &[String],
    mut meta: StatsMeta,
    rank_plan: Option<BTreeMap<(usize, String), Vec<RankTarget>>>,
    on_batch: &mut dyn FnMut(usize),
) -> Result<Stats> {
    let mut acc = Accumulator {
        rank_plan,
        cross: BTreeMap::new(),
        moments: BTreeMap::new(),
        routing: BTreeMap::new(),
        datasets,
        token_dataset: Vec::new(),
        n_experts: model.config.moe.as_ref().map_or(0, |m| m.n_routed_experts),
    };
    let mut tokens = 0u64;
    for b in batches {
        let b = b?;
        if b.ids.len() != b.batch * b.seq_len || b.dataset.len() != b.batch {
            return Err(MasaError::Shape(format!("calibration batch of {} ids is not {}x{}", b.ids.len(), b.batch, b.seq_len)));
        }
        acc.token_dataset = b.dataset.iter().flat_map(|&d| std::iter::repeat_n(d, b.seq_len)).collect();
        let x = Tensor::from_slice(&b.ids, (b.batch, b.seq_len), &Device::Cpu)?;
        model.hidden_states(&x, &mut acc)?;
        for &d in &b.dataset {
            *meta.dataset_tokens.entry(datasets[d].clone()).or_insert(0) += b.seq_len as u64;
        }
        tokens += (b.batch * b.seq_len) as u64;
        meta.seq_len = b.seq_len;
        on_batch(b.batch * b.seq_len);
    }
    if tokens == 0 {
        return Err(MasaError::Invalid("calibration saw no tokens: the corpus is empty or shorter than one sequence".into()));
    }
    meta.tokens = tokens;
    meta.format = FORMAT.to_string();
    Ok(Stats { meta, moments: acc.moments, routing: acc.routing, cross: acc.cross })
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
}

impl CalibrateOptions {
    /// The options' ranges, checked before any work (`max_positions`: the source's context).
    pub fn check(&self, max_positions: usize) -> Result<()> {
        use crate::limits::{count, in_range, MAX_BATCH, MAX_TOKENS};
        in_range("--tokens", self.tokens, 1..=MAX_TOKENS, "")?;
        count("--batch", self.batch, MAX_BATCH, "")?;
        count("--seq", self.seq_len, max_positions, "the source's positions")
    }
}

/// The rank-specific plan: every FFN matrix of the model at its rank, grouped by input site.
pub fn rank_plan(model: &Transformer, rank: crate::align::RankSpec) -> Result<BTreeMap<(usize, String), Vec<RankTarget>>> {
    let mut plan: BTreeMap<(usize, String), Vec<RankTarget>> = BTreeMap::new();
    for m in model.config.ffn_matrices() {
        let mlp = m.mlp();
        let w = model.ffn_weight(m.layer, mlp, m.proj).ok_or_else(|| MasaError::Invalid(format!("no weight for {}", m.name)))?;
        let layout = crate::align::Layout::new(m.d_out, m.d_in, rank.rank(m.d_out, m.d_in)).map_err(|e| MasaError::Invalid(format!("{}: {e}", m.name)))?;
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
pub fn corpus_batches(source: &crate::source::SourceModel, corpus: &crate::corpus::Corpus, opts: &CalibrateOptions) -> Result<Vec<crate::corpus::Batch>> {
    let encode = |t: &str| source.tokenizer.encode(t, false);
    let (_, mut streams, n_batches) = corpus_batches_with(source, corpus, opts, &encode)?;
    (0..n_batches).map(|k| next_batch(&mut streams, k, opts)).collect()
}

/// Calibrate `source` on the training split of `corpus` over [`corpus_batches_with`].
pub fn calibrate_on_corpus(
    source: &crate::source::SourceModel,
    model: &Transformer,
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
        corpus: vec![format!("{corpus_desc}; domains {}", datasets.join(","))],
        tokens: 0,
        seq_len: opts.seq_len,
        seeds: vec![opts.seed],
        dataset_tokens: BTreeMap::new(),
        masa_version: env!("CARGO_PKG_VERSION").into(),
    };
    let batches = (0..n_batches).map(|k| next_batch(&mut streams, k, opts));
    let bar = crate::progress::count_bar(n_batches as u64 * per_batch, "calibrating", "tokens");
    let plan = opts.rank.map(|r| rank_plan(model, r)).transpose()?;
    let stats = calibrate_with(model, batches, &datasets, meta, plan, &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_options_have_ranges() {
        let ok = CalibrateOptions { tokens: 4096, seq_len: 256, batch: 8, seed: 0, domains: None, rank: None };
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
