//! `masa init`: a student checkpoint from a source model (design.md "Adaptive scaling",
//! "Init scale", "Baselines"). One file per strategy family:
//!
//! - `masa`: gene matrices rescaled by adaptive scaling (Sec. 3.2, [`scale`]) into the FFN of
//!   each student layer, the rest Scratch (paper) or selected from the source (`--rest`);
//! - `naive`: the "w/o adaptive scaling" ablation, genes truncated or padded with Scratch;
//! - `scratch`: HF Llama init ([`rng`]);
//! - `weight-selection`: Xu et al., ICLR 2024 ([`select`]), first-N layers;
//! - `prune`: structured width/depth pruning by activation energy ([`prune`]);
//! - `eep`: `prune` with each inherited MoE layer's experts merged by Efficient Expert Pruning's
//!   evolutionary search ([`eep`]), the paper's pruning baseline for MoE sources.
//!
//! The student always uses the source tokenizer and vocabulary (`vocab_size` = the source's
//! embedding rows). Nothing else of its config depends on the strategy: every arm of a
//! comparison is the same architecture (RoPE base, norm epsilon, ... as the student config
//! says; set `rope_theta` and `rms_norm_eps` to the source's there to reproduce a source of the
//! student's shape by weight selection). Sources that are not
//! Llama-like are mapped as far as a Llama student can hold them: (1+w) norms become `1+w`,
//! parameter-free norms become ones, attention biases, q/k norms, post-norms and Gemma's
//! embedding scale are dropped, and the activation becomes SiLU.

pub mod eep;
pub mod genes;
pub mod prune;
pub mod scale;
pub mod select;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::{MasaError, Result};
use crate::source::{NormKind, SourceModel};
use crate::stats::Stats;
use crate::student::StudentConfig;
use genes::Genes;
use prune::{prune_heads, source_ffn, Energies};
use select::{top_k_in_order, uniform_attention_rows, uniform_indices, AttnRows, Heads, Matrix};

macro_rules! cli_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
        pub enum $name { $($(#[$vm])* #[serde(rename = $s)] $v),+ }
        impl $name {
            pub fn name(self) -> &'static str { match self { $($name::$v => $s),+ } }
        }
        impl FromStr for $name {
            type Err = MasaError;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($s => Ok($name::$v),)+
                    _ => Err(MasaError::Invalid(format!(
                        "unknown {} `{s}`; one of: {}", stringify!($name), [$($s),+].join(", ")))),
                }
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                <String as serde::Deserialize>::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.name()) }
        }
    };
}

cli_enum!(
    /// How the student is initialised.
    Strategy { Masa = "masa", Naive = "naive", Scratch = "scratch", WeightSelection = "weight-selection", Prune = "prune", Eep = "eep" }
);
cli_enum!(
    /// Which source layer each student layer inherits from (design.md "Adaptive scaling").
    LayerMap {
        /// `round(t·(L_s−1)/(L_t−1))`.
        Uniform = "uniform",
        /// Layer t from layer t (first-N, as weight selection does).
        First = "first"
    }
);
cli_enum!(
    /// design.md "Init scale": rescale each scaled gene to the Frobenius norm of a Scratch init
    /// of its shape (default), or leave the source's spectrum as it is (paper-literal).
    GeneScale { Frobenius = "frobenius", None = "none" }
);
cli_enum!(
    /// What the non-FFN parameters of `masa`/`naive` inherit.
    Rest { Scratch = "scratch", WeightSelection = "weight-selection" }
);
cli_enum!(
    /// Sec. 3.2 expansion of genes to wider targets: cyclic replication of top rows, or refuse.
    Expand { Cyclic = "cyclic", None = "none" }
);

/// `r'` when `--components` is not given: 64 components (capped at each gene's rank), the best of
/// the measured settings (docs/scaling.md; r' = r, the former default, makes Eq. 6's scores
/// all equal).
pub const DEFAULT_COMPONENTS: scale::Components = scale::Components::Rank(64);

/// Everything that changes the output besides the input files; recorded in `masa.json`.
#[derive(Clone, Debug, Serialize)]
pub struct InitOptions {
    pub strategy: Strategy,
    pub seed: u64,
    /// `None`: the strategy's default (`first` for weight-selection, else `uniform`).
    pub layers: Option<LayerMap>,
    /// `r'` of Sec. 3.2 ([`scale::Components`]); `None`: [`DEFAULT_COMPONENTS`].
    pub components: Option<scale::Components>,
    /// Experiment: one selection of the intermediate dimension shared by gate rows, up rows
    /// and down columns (scores `sqrt(s_gate² + s_up² + t_down²)`) instead of one per matrix.
    pub coupled: bool,
    pub gene_scale: GeneScale,
    pub rest: Rest,
    pub expand: Expand,
    /// `a` of the separation of repeated neurons ([`scale::separate`]), in (0, 1].
    pub replica_noise: f64,
    /// The `masa-rotated` control: each gene replaced by `Q₁ M Q₂` with seeded random
    /// orthogonal `Q₁`, `Q₂` ([`scale::rotate`]) before adaptive scaling.
    pub rotate_genes: bool,
    /// EEP's search (`eep` only; `None`: [`eep::EepOptions::default`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eep: Option<eep::EepOptions>,
}

impl InitOptions {
    pub fn new(strategy: Strategy) -> Self {
        InitOptions {
            strategy,
            seed: 0,
            layers: None,
            components: None,
            coupled: false,
            gene_scale: GeneScale::Frobenius,
            rest: Rest::Scratch,
            expand: Expand::Cyclic,
            replica_noise: scale::DEFAULT_REPLICA_NOISE,
            rotate_genes: false,
            eep: None,
        }
    }

    /// These options with the defaults that decide the output filled in (r' for `masa`), so a
    /// cache key made from them changes when a default does.
    pub fn resolved(&self) -> InitOptions {
        let components = match self.strategy {
            Strategy::Masa => Some(self.components.unwrap_or(DEFAULT_COMPONENTS)),
            _ => self.components,
        };
        let eep = match self.strategy {
            Strategy::Eep => Some(self.eep.clone().unwrap_or_default()),
            _ => self.eep.clone(),
        };
        InitOptions { components, eep, ..self.clone() }
    }

    /// r' for a gene of rank `r`: the option or [`DEFAULT_COMPONENTS`], capped at `r`. The one
    /// place r' is resolved, for the default and every variant alike.
    pub fn components_for(&self, r: usize) -> scale::Components {
        self.components.unwrap_or(DEFAULT_COMPONENTS).capped(r)
    }

    pub fn layer_map(&self) -> LayerMap {
        self.layers.unwrap_or(if self.strategy == Strategy::WeightSelection { LayerMap::First } else { LayerMap::Uniform })
    }

    /// Whether anything outside the FFN comes from the source.
    pub fn inherits_rest(&self) -> bool {
        match self.strategy {
            Strategy::WeightSelection | Strategy::Prune | Strategy::Eep => true,
            Strategy::Masa | Strategy::Naive => self.rest == Rest::WeightSelection,
            Strategy::Scratch => false,
        }
    }
}

/// Why `student` cannot inherit weights from `source` by selection or pruning (every
/// dimension must be at most the source's: hidden size, FFN width, layers, attention heads,
/// head dim; KV heads may be more, they are duplicated), or `None` when it can. Checked before any work by `masa run`'s plan.
pub fn inheritance_misfit(student: &StudentConfig, source: &crate::source::ModelConfig) -> Option<String> {
    let ffn = match &source.moe {
        Some(m) if (0..source.num_hidden_layers).all(|l| source.is_moe_layer(l)) => m.moe_intermediate_size * m.n_routed_experts.max(1),
        _ => source.intermediate_size,
    };
    let dims = [
        ("hidden size", student.hidden_size, source.hidden_size),
        ("FFN width", student.intermediate_size, ffn),
        ("layers", student.num_hidden_layers, source.num_hidden_layers),
        ("attention heads", student.num_attention_heads, source.num_attention_heads),
        ("head dim", student.head_dim(), source.head_dim),
    ];
    let wider: Vec<String> = dims.iter().filter(|d| d.1 > d.2).map(|(n, t, s)| format!("{n} {t} > {s}")).collect();
    (!wider.is_empty()).then(|| format!("the student is larger than the source ({})", wider.join(", ")))
}

/// Source layer of each student layer: `round(t·(L_s−1)/(L_t−1))` (uniform) or `t` (first);
/// design.md "Adaptive scaling" (a decision of masa's, not an equation of the paper).
pub fn map_layers(l_t: usize, l_s: usize, map: LayerMap) -> Result<Vec<usize>> {
    match map {
        LayerMap::Uniform if l_t == 1 => Ok(vec![0]),
        LayerMap::Uniform => Ok((0..l_t).map(|t| ((t * (l_s - 1)) as f64 / (l_t - 1) as f64).round() as usize).collect()),
        LayerMap::First if l_t > l_s => Err(MasaError::Invalid(format!(
            "--layers first needs at most the source's {l_s} layers, the student has {l_t}; use --layers uniform"
        ))),
        LayerMap::First => Ok((0..l_t).collect()),
    }
}

/// The student config as built for a source: the source vocabulary and special tokens; every
/// other field as `student` says, whatever the strategy (one architecture per comparison).
pub fn student_for_source(student: &StudentConfig, source: &SourceModel) -> Result<StudentConfig> {
    let sc = &source.weights.config;
    let mut cfg = student.clone();
    if cfg.vocab_size != 0 && cfg.vocab_size != sc.vocab_size {
        return Err(MasaError::Invalid(format!(
            "the student config says vocab_size {}, but students use the source's tokenizer and vocabulary ({}); drop vocab_size",
            cfg.vocab_size, sc.vocab_size
        )));
    }
    cfg.vocab_size = sc.vocab_size;
    cfg.bos_token_id = sc.bos_token_id.or(source.tokenizer.bos_id());
    cfg.eos_token_id = sc.eos_token_id.or(source.tokenizer.eos_id());
    cfg.validate()?;
    Ok(cfg)
}

/// A built student: final config, tensors in `tensor_shapes()` order, and what was done.
pub struct Built {
    pub config: StudentConfig,
    pub tensors: Vec<(String, Tensor)>,
    /// Layer mapping and per-matrix details for `masa.json`.
    pub record: serde_json::Value,
}

type Parts = HashMap<String, Vec<f32>>;

/// Build a student's tensors. `genes` is needed by `masa`/`naive`; `energies` by `prune` and
/// `eep` (and by anything that inherits from a MoE source, to choose experts); `calibration`
/// (token batches for its fitness) by `eep`.
pub fn build(
    student: &StudentConfig,
    source: &SourceModel,
    genes: Option<&Genes>,
    energies: Option<&Energies>,
    calibration: &[crate::corpus::Batch],
    opts: &InitOptions,
) -> Result<Built> {
    let cfg = student_for_source(student, source)?;
    let l_s = source.weights.config.num_hidden_layers;
    let map = map_layers(cfg.num_hidden_layers, l_s, opts.layer_map())?;
    let mut parts = Parts::new();
    let mut record = serde_json::json!({ "layer_map": map });
    match opts.strategy {
        Strategy::Scratch => {}
        Strategy::Masa | Strategy::Naive => {
            let g = genes.ok_or_else(|| MasaError::Invalid(format!("--strategy {} needs --genes FILE", opts.strategy)))?;
            // The hybrid's FFN reads and writes the hidden channels its inherited parts keep.
            let hid = match opts.rest {
                Rest::WeightSelection => Some(hidden_channels(&cfg, source, Selector::Uniform)?),
                Rest::Scratch => None,
            };
            record["matrices"] = gene_ffn(&cfg, g, &map, opts, hid.as_deref(), &mut parts)?;
            if hid.is_some() {
                inherit(&cfg, source, &map, Selector::Uniform, Ffn::Keep, energies, &mut parts)?;
            }
        }
        Strategy::WeightSelection => {
            record["ffn"] = inherit(&cfg, source, &map, Selector::Uniform, Ffn::Source, energies, &mut parts)?;
        }
        Strategy::Prune => {
            let e = energies.ok_or_else(|| MasaError::Invalid("--strategy prune needs --stats FILE (activation energies)".into()))?;
            record["ffn"] = inherit(&cfg, source, &map, Selector::Energy(e), Ffn::Source, Some(e), &mut parts)?;
        }
        Strategy::Eep => {
            let e = energies
                .ok_or_else(|| MasaError::Invalid("--strategy eep needs --stats FILE (routing counts, activation energies)".into()))?;
            let eo = opts.eep.clone().unwrap_or_default();
            let merged = eep::search(&source.weights, &map, cfg.intermediate_size, e, calibration, &eo, opts.seed)?;
            record["eep"] = merged.record;
            record["ffn"] = inherit(&cfg, source, &map, Selector::Energy(e), Ffn::Merged(&merged.ffns), Some(e), &mut parts)?;
        }
    }
    let tensors = assemble(&cfg, opts.seed, parts)?;
    Ok(Built { config: cfg, tensors, record })
}

/// Every tensor of the student, inherited where `parts` has it, Scratch otherwise.
fn assemble(cfg: &StudentConfig, seed: u64, mut parts: Parts) -> Result<Vec<(String, Tensor)>> {
    cfg.tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let data = parts.remove(&name).unwrap_or_else(|| crate::rng::scratch(seed, &name, &shape, cfg.initializer_range));
            if data.len() != shape.iter().product::<usize>() {
                return Err(MasaError::Shape(format!("built {} values for `{name}` {shape:?}", data.len())));
            }
            let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?;
            Ok((name, t))
        })
        .collect()
}

const PROJS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// The FFN of every student layer from the genes of its mapped source layer: Sec. 3.2
/// adaptive scaling (`masa`, [`scaled_ffn`]) or truncation/padding (`naive`), then
/// `--gene-scale`. `hidden`: the source hidden channels the student's inherited parts keep (the
/// hybrid), so its FFN reads and writes the same ones. When the source layer has several gene
/// sets (MoE: shared experts, kept routed experts; [`Genes::ffn_genes`]) the student's
/// intermediate dimension is split into that many contiguous blocks, one per gene set in its
/// order, each scaled to its block: the dense FFN is the concatenation of the experts, as an MoE
/// layer's output is their (weighted) sum.
fn gene_ffn(
    cfg: &StudentConfig,
    genes: &Genes,
    map: &[usize],
    opts: &InitOptions,
    hidden: Option<&[usize]>,
    parts: &mut Parts,
) -> Result<serde_json::Value> {
    let (h, f, std) = (cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range);
    let mut rec = Vec::new();
    for (t, &ls) in map.iter().enumerate() {
        let sets = genes.ffn_genes(ls)?;
        let k = sets.len();
        if k > f {
            return Err(MasaError::Invalid(format!(
                "source layer {ls} has {k} gene sets (experts) for a student FFN of width {f}: extract fewer experts"
            )));
        }
        // Block j of the intermediate dimension: rows of gate/up, columns of down.
        let blocks: Vec<(usize, usize)> = (0..k).map(|j| (j * f / k, (j + 1) * f / k)).collect();
        let names: Vec<String> = PROJS.iter().map(|p| format!("model.layers.{t}.mlp.{p}.weight")).collect();
        // gate and up are (f, h) row-major: blocks are row ranges; down is (h, f): column ranges.
        let mut full: Vec<Vec<f32>> = if opts.strategy == Strategy::Naive {
            names.iter().zip([(f, h), (f, h), (h, f)]).map(|(n, (p, q))| crate::rng::scratch(opts.seed, n, &[p, q], std)).collect()
        } else {
            vec![vec![0f32; f * h]; 3]
        };
        let mut matrices: Vec<Vec<serde_json::Value>> = vec![Vec::new(); 3];
        for (set, &(b0, b1)) in sets.iter().zip(&blocks) {
            let fb = b1 - b0;
            let ms = [set.gate, set.up, set.down];
            let shapes = [(fb, h), (fb, h), (h, fb)];
            // Each matrix's new values as a row-major (rows, cols) piece placed at the top-left of
            // its block: all of it for `masa`, the gene's top-left corner for `naive`.
            let (pieces, detail): (Vec<(usize, usize, Vec<f64>)>, [serde_json::Value; 3]) = if opts.strategy == Strategy::Masa {
                let label = format!("model.layers.{t}.mlp.{}", b0);
                let (pieces, detail) = scaled_ffn(&ms, fb, h, opts, hidden, &set.mlp, &label)?;
                (pieces.into_iter().zip(shapes).map(|(v, (p, q))| (p, q, v)).collect(), detail)
            } else {
                // Ablation "w/o adaptive scaling": the gene's top-left corner, Scratch around it.
                let pieces = ms
                    .iter()
                    .zip(&shapes)
                    .map(|(m, &(p, q))| {
                        let (bp, bq) = (p.min(m.nrows()), q.min(m.ncols()));
                        (bp, bq, (0..bp * bq).map(|x| m[(x / bq, x % bq)]).collect())
                    })
                    .collect();
                (pieces, Default::default())
            };
            for (kk, ((pr, pc, v), detail)) in pieces.iter().zip(detail).enumerate() {
                let fac = match opts.gene_scale {
                    GeneScale::Frobenius => scale::frobenius_factor(v.iter().copied(), v.len(), std),
                    GeneScale::None => 1.0,
                };
                for i in 0..*pr {
                    for j in 0..*pc {
                        let at = if kk < 2 { (b0 + i) * h + j } else { i * f + b0 + j };
                        full[kk][at] = (v[i * pc + j] * fac) as f32;
                    }
                }
                let span = if kk < 2 { "rows" } else { "columns" };
                let mut m = serde_json::json!({
                    "gene": genes::gene_key(&set.mlp, PROJS[kk]), span: [b0, b1], "rank": ms[kk].nrows(), "scale": fac, "shape": shapes[kk],
                });
                if let (Some(o), Some(d)) = (m.as_object_mut(), detail.as_object()) {
                    o.extend(d.clone());
                }
                matrices[kk].push(m);
            }
        }
        for ((name, data), genes_used) in names.into_iter().zip(full).zip(matrices) {
            rec.push(serde_json::json!({ "name": name, "source_layer": ls, "genes": genes_used }));
            parts.insert(name, data);
        }
    }
    Ok(serde_json::Value::Array(rec))
}

/// Adaptive scaling (Sec. 3.2) of one FFN's genes `[gate, up, down]` to a block of `fb`
/// neurons and `h` hidden channels: the values of gate (`fb × h`), up (`fb × h`) and down
/// (`h × fb`), row-major, and per matrix what was done (for `masa.json`).
///
/// - Each gene's SVD keeps r' components ([`InitOptions::components_for`]); the control
///   `masa-rotated` first replaces the gene by `Q₁ M Q₂` ([`scale::rotate`]).
/// - Neurons (rows of gate and up, columns of down): each gene's own selection by its scores,
///   or with `--coupled` one joint selection ([`scale::coupled_scores`]).
/// - Hidden channels: each gene's own selection; for the hybrid (`hidden` given) the gene
///   columns (gate, up) and rows (down) that source channels `hidden` fold to under f_c and f_d
///   (Eq. (1)-(3): gene coordinate `c mod r` stands for source coordinate `c`).
/// - A neuron that repeats an earlier one's gene rows in all three matrices is separated
///   ([`scale::repeated_neurons`], [`scale::separate`] with `--replica-noise`).
fn scaled_ffn(
    ms: &[&faer::Mat<f64>; 3],
    fb: usize,
    h: usize,
    opts: &InitOptions,
    hidden: Option<&[usize]>,
    mlp: &str,
    label: &str,
) -> Result<(Vec<Vec<f64>>, [serde_json::Value; 3])> {
    let genes: Vec<faer::Mat<f64>> = ms
        .iter()
        .zip(PROJS)
        .map(|(m, p)| if opts.rotate_genes { scale::rotate(m, opts.seed, &format!("{label}.{p}.rotate")) } else { (*m).clone() })
        .collect();
    let svds: Vec<scale::GeneSvd> = genes.iter().map(|m| scale::gene_svd(m, opts.components_for(m.nrows()))).collect::<Result<_>>()?;
    for m in &genes {
        scale::check_expansion(m.nrows(), fb, if hidden.is_some() { 0 } else { h }, opts.expand == Expand::Cyclic)?;
    }
    let own = |u: &faer::Mat<f64>, n: usize| scale::select_rows(&scale::row_scores(u), n);
    let neurons: [Vec<usize>; 3] = if opts.coupled {
        let scores = scale::coupled_scores(&svds[0], &svds[1], &svds[2])
            .ok_or_else(|| MasaError::Invalid(format!("--coupled needs gate, up and down genes of one rank ({mlp})")))?;
        let joint = scale::select_rows(&scores, fb);
        [joint.clone(), joint.clone(), joint]
    } else {
        [own(&svds[0].u, fb), own(&svds[1].u, fb), own(&svds[2].v, fb)]
    };
    let channels: [Vec<usize>; 3] = match hidden {
        Some(hid) => [0, 1, 2].map(|k| hid.iter().map(|&c| c % genes[k].nrows()).collect()),
        None => [own(&svds[0].v, h), own(&svds[1].v, h), own(&svds[2].u, h)],
    };
    let mut pieces = vec![
        scale::compose(&svds[0], &neurons[0], &channels[0]),
        scale::compose(&svds[1], &neurons[1], &channels[1]),
        scale::compose(&svds[2], &channels[2], &neurons[2]),
    ];
    let repeated = scale::repeated_neurons(&[&neurons[0], &neurons[1], &neurons[2]]);
    for (i, _) in repeated.iter().enumerate().filter(|(_, &r)| r) {
        for (kk, piece) in pieces.iter_mut().enumerate() {
            let z = crate::rng::normal(opts.seed, &format!("{label}.{}.replica.{i}", PROJS[kk]), h, 1.0);
            if kk < 2 {
                scale::separate(&mut piece[i * h..(i + 1) * h], opts.replica_noise, &z);
            } else {
                let mut col: Vec<f64> = (0..h).map(|j| piece[j * fb + i]).collect();
                scale::separate(&mut col, opts.replica_noise, &z);
                for (j, v) in col.into_iter().enumerate() {
                    piece[j * fb + i] = v;
                }
            }
        }
    }
    let n_repeated = repeated.iter().filter(|&&r| r).count();
    let detail = [0, 1, 2].map(|k| {
        serde_json::json!({ "components": svds[k].sigma.len(), "repeated_neurons_separated": n_repeated, "rotated": opts.rotate_genes })
    });
    Ok((pieces, detail))
}

/// How `inherit` chooses what to keep.
#[derive(Clone, Copy)]
enum Selector<'a> {
    /// Xu et al.: uniform indices along every dimension.
    Uniform,
    /// Pruning: highest activation energy / weight norm.
    Energy(&'a Energies),
}

/// The source hidden channels an inheriting student keeps, in order.
fn hidden_channels(cfg: &StudentConfig, source: &SourceModel, selector: Selector) -> Result<Vec<usize>> {
    let h_s = source.weights.config.hidden_size;
    match selector {
        Selector::Uniform => uniform_indices(h_s, cfg.hidden_size, "hidden channels"),
        Selector::Energy(e) => top_k_in_order(&e.hidden, cfg.hidden_size, "hidden channels"),
    }
}

/// A source RMSNorm weight as a Llama student's norm: `w`, `1 + w` for (1+w) norms, ones for
/// parameter-free norms.
fn source_norm(source: &SourceModel, name: &str) -> Result<Vec<f32>> {
    let c = &source.weights.config;
    if c.norm == NormKind::LayerNormNoParams || !source.weights.contains(name) {
        return Ok(vec![1.0; c.hidden_size]);
    }
    let w = source.weights.tensor(name)?.to_vec1::<f32>()?;
    Ok(if c.norm == NormKind::RmsOnePlus { w.iter().map(|v| 1.0 + v).collect() } else { w })
}

fn pick(v: &[f32], idx: &[usize]) -> Vec<f32> {
    idx.iter().map(|&i| v[i]).collect()
}

/// Where an inheriting student's FFN comes from.
enum Ffn<'a> {
    /// Not inherited (`masa --rest weight-selection`: the genes fill it).
    Keep,
    /// The source layer's FFN ([`source_ffn`]).
    Source,
    /// EEP's merged FFN where the search made one, else the source layer's.
    Merged(&'a std::collections::BTreeMap<usize, prune::SourceFfn>),
}

/// Everything but (with [`Ffn::Keep`]) the FFN selected from the source: embeddings (all
/// vocabulary rows, kept hidden channels), norms, attention (whole heads, see
/// [`select::attention_rows`]), and the FFN neurons. Student layer t reads source layer `map[t]`.
fn inherit(
    cfg: &StudentConfig,
    source: &SourceModel,
    map: &[usize],
    selector: Selector,
    ffn: Ffn,
    energies: Option<&Energies>,
    parts: &mut Parts,
) -> Result<serde_json::Value> {
    let sc = &source.weights.config;
    let w = &source.weights;
    let hid = hidden_channels(cfg, source, selector)?;
    let src_heads = Heads { n: sc.num_attention_heads, kv: sc.num_key_value_heads, dim: sc.head_dim };
    let dst_heads = Heads { n: cfg.num_attention_heads, kv: cfg.num_key_value_heads, dim: cfg.head_dim() };
    let all_vocab: Vec<usize> = (0..sc.vocab_size).collect();
    let embed = Matrix::from_tensor(&w.tensor_shaped("model.embed_tokens.weight", &[sc.vocab_size, sc.hidden_size])?)?;
    parts.insert("model.embed_tokens.weight".into(), embed.select(&all_vocab, &hid).data);
    if !cfg.tie_word_embeddings {
        let head = if w.contains("lm_head.weight") { Matrix::from_tensor(&w.tensor("lm_head.weight")?)? } else { embed.clone() };
        parts.insert("lm_head.weight".into(), head.select(&all_vocab, &hid).data);
    }
    drop(embed);
    parts.insert("model.norm.weight".into(), pick(&source_norm(source, "model.norm.weight")?, &hid));
    let mut rec = Vec::new();
    for (t, &ls) in map.iter().enumerate() {
        let sp = format!("model.layers.{ls}");
        let tp = format!("model.layers.{t}");
        let ffn_norm = if w.contains(&format!("{sp}.pre_feedforward_layernorm.weight")) {
            "pre_feedforward_layernorm"
        } else {
            "post_attention_layernorm"
        };
        parts.insert(format!("{tp}.input_layernorm.weight"), pick(&source_norm(source, &format!("{sp}.input_layernorm.weight"))?, &hid));
        parts
            .insert(format!("{tp}.post_attention_layernorm.weight"), pick(&source_norm(source, &format!("{sp}.{ffn_norm}.weight"))?, &hid));
        let [q, k, v, o] = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(|n| w.tensor(&format!("{sp}.self_attn.{n}.weight")).and_then(|t| Matrix::from_tensor(&t)));
        let (q, k, v, o) = (q?, k?, v?, o?);
        let AttnRows { q: q_rows, kv: kv_rows } = match selector {
            Selector::Uniform => uniform_attention_rows(src_heads, dst_heads)?,
            Selector::Energy(_) => prune_heads(&q, &k, &v, &o, src_heads, dst_heads)?,
        };
        parts.insert(format!("{tp}.self_attn.q_proj.weight"), q.select(&q_rows, &hid).data);
        parts.insert(format!("{tp}.self_attn.k_proj.weight"), k.select(&kv_rows, &hid).data);
        parts.insert(format!("{tp}.self_attn.v_proj.weight"), v.select(&kv_rows, &hid).data);
        parts.insert(format!("{tp}.self_attn.o_proj.weight"), o.select(&hid, &q_rows).data);
        let from_source;
        let s = match &ffn {
            Ffn::Keep => continue,
            Ffn::Merged(m) if m.contains_key(&ls) => &m[&ls],
            _ => {
                from_source = source_ffn(w, ls, cfg.intermediate_size, energies)?;
                &from_source
            }
        };
        let f_s = s.gate.rows;
        let neurons = match (selector, &s.energy) {
            (Selector::Energy(_), Some(e)) => top_k_in_order(e, cfg.intermediate_size, "FFN neurons")?,
            _ => uniform_indices(f_s, cfg.intermediate_size, "FFN neurons")?,
        };
        parts.insert(format!("{tp}.mlp.gate_proj.weight"), s.gate.select(&neurons, &hid).data);
        parts.insert(format!("{tp}.mlp.up_proj.weight"), s.up.select(&neurons, &hid).data);
        parts.insert(format!("{tp}.mlp.down_proj.weight"), s.down.select(&hid, &neurons).data);
        rec.push(serde_json::json!({ "layer": t, "source_layer": ls, "source_width": f_s, "parts": s.parts }));
    }
    Ok(serde_json::Value::Array(rec))
}

/// A `masa init` invocation: files in, checkpoint directory out.
pub struct InitRequest {
    /// Preset name or student.toml/json path.
    pub student: String,
    pub out: PathBuf,
    /// Resolved source model path (GGUF file or HF directory).
    pub source: PathBuf,
    pub genes: Option<PathBuf>,
    pub stats: Option<PathBuf>,
    /// `eep`: the corpus its fitness reads (files/directories as `masa calibrate --corpus`;
    /// empty: the built-in corpus).
    pub corpus: Vec<PathBuf>,
    pub options: InitOptions,
}

/// Open and check the inputs (genes and statistics must come from `source`), build the
/// student, write the HF-format directory with `masa.json`. Returns the final config.
pub fn run(req: &InitRequest) -> Result<StudentConfig> {
    let mut inputs: Vec<(&str, &Path)> = vec![("--source", &req.source)];
    inputs.extend(req.genes.iter().map(|g| ("--genes file", g.as_path())));
    inputs.extend(req.stats.iter().map(|g| ("--stats file", g.as_path())));
    inputs.extend(req.corpus.iter().map(|g| ("--corpus", g.as_path())));
    crate::home::check_output_is_not_input(&req.out, &inputs)?;
    let student = StudentConfig::from_spec(&req.student)?;
    student.validate()?;
    let source = SourceModel::open(&req.source)?;
    let source_hash = source.fingerprint()?;
    let genes = match &req.genes {
        Some(p) => {
            let g = Genes::load(p)?;
            check_same_source(p, "genes", &g.source_hash, &req.source, &source_hash)?;
            Some(g)
        }
        None => None,
    };
    let (energies, stats_rec) = match &req.stats {
        Some(p) => {
            let s = Stats::load(p)?;
            check_same_source(p, "statistics", &s.meta.source_hash, &req.source, &source_hash)?;
            let e = Energies::from_stats(&s, &source.weights.config)?;
            let rec = serde_json::json!({ "path": p, "sha256": crate::fetch::sha256_file(p)?, "source_hash": s.meta.source_hash, "tokens": s.meta.tokens });
            (Some(e), rec)
        }
        None => (None, serde_json::Value::Null),
    };
    let (calibration, corpus_rec) = match req.options.strategy {
        Strategy::Eep => {
            let eo = req.options.eep.clone().unwrap_or_default();
            eep::check_source(&source.weights, &eo)?;
            let (corpus, desc) = crate::corpus::resolve_corpus(&req.corpus)?;
            let batches = crate::calibrate::corpus_batches(&source, &corpus, &eo.stream(req.options.seed))?;
            (batches, serde_json::json!(desc))
        }
        _ => (Vec::new(), serde_json::Value::Null),
    };
    let built = build(&student, &source, genes.as_ref(), energies.as_ref(), &calibration, &req.options)?;
    let provenance = serde_json::json!({
        "format": "masa-init/1",
        "masa_version": env!("CARGO_PKG_VERSION"),
        "strategy": req.options.strategy,
        "seed": req.options.seed,
        "options": req.options,
        "layer_map_kind": req.options.layer_map(),
        "student_spec": req.student,
        "student": built.config,
        "source": { "path": req.source, "hash": source_hash, "arch": source.weights.config.arch.name() },
        "genes": genes.as_ref().map(|g| serde_json::json!({ "path": g.path, "sha256": g.sha256, "source_hash": g.source_hash, "meta": g.meta })),
        "stats": stats_rec,
        "calibration_corpus": corpus_rec,
        "init": built.record,
    });
    crate::student::save_checkpoint(&req.out, &built.config, &built.tensors, &source.tokenizer, &provenance)?;
    Ok(built.config)
}

fn check_same_source(file: &Path, what: &str, file_hash: &str, source: &Path, source_hash: &str) -> Result<()> {
    if file_hash != source_hash {
        return Err(MasaError::bad_file(
            file,
            format!(
                "these {what} come from a different source model (source_hash {}…) than --source {} (fingerprint {}…); \
                 pass the --source they were computed from, or recompute them",
                &file_hash[..file_hash.len().min(12)],
                source.display(),
                &source_hash[..source_hash.len().min(12)]
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_maps() {
        assert_eq!(map_layers(6, 30, LayerMap::Uniform).unwrap(), vec![0, 6, 12, 17, 23, 29]);
        assert_eq!(map_layers(1, 30, LayerMap::Uniform).unwrap(), vec![0]);
        assert_eq!(map_layers(3, 3, LayerMap::Uniform).unwrap(), vec![0, 1, 2]);
        assert_eq!(map_layers(4, 30, LayerMap::First).unwrap(), vec![0, 1, 2, 3]);
        assert!(map_layers(4, 3, LayerMap::First).is_err());
        // More student layers than source layers: uniform repeats source layers.
        assert_eq!(map_layers(5, 3, LayerMap::Uniform).unwrap(), vec![0, 1, 1, 2, 2]);
    }

    #[test]
    fn option_names_round_trip() {
        for s in ["masa", "naive", "scratch", "weight-selection", "prune"] {
            assert_eq!(s.parse::<Strategy>().unwrap().name(), s);
        }
        assert!("distill".parse::<Strategy>().unwrap_err().to_string().contains("weight-selection"));
    }
}
