//! Experiment specs: what `masa run` does, as TOML. Eight ship embedded (`default`, `quick`,
//! `extended`, `paper`, `medium`, `scaling`, `gpu`, `controlled`); any other TOML file with the same fields works. [`Spec::load`]
//! validates everything that can be checked before work starts (strategy names, student
//! shapes, budgets, tasks, files) and names the offending field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::run::strategies::ScalingSpec;
use crate::{MasaError, Result};

/// The embedded specs: `(name, TOML)`.
pub const BUILTIN: &[(&str, &str)] = &[
    ("default", include_str!("../../specs/default.toml")),
    ("quick", include_str!("../../specs/quick.toml")),
    ("extended", include_str!("../../specs/extended.toml")),
    ("paper", include_str!("../../specs/paper.toml")),
    ("medium", include_str!("../../specs/medium.toml")),
    ("scaling", include_str!("../../specs/scaling.toml")),
    ("gpu", include_str!("../../specs/gpu.toml")),
    ("controlled", include_str!("../../specs/controlled.toml")),
];

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Run name: results go to `runs/<name>/`.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Source model: a name `masa fetch` knows, a GGUF file or an HF directory.
    pub source: String,
    /// Corpus: `["default"]` (the built-in multi-domain corpus) or files/directories.
    #[serde(default = "default_corpus")]
    pub corpus: Vec<String>,
    /// Student presets (`masa init --student` names) or student.toml paths.
    pub students: Vec<String>,
    /// Strategies compared: names of [`crate::run::strategies::STRATEGIES`].
    pub strategies: Vec<String>,
    /// Seeds: each seeds the init and the pre-training data order of one run per strategy.
    pub seeds: Vec<u64>,
    /// Strategies run on only the first N `seeds` (descriptive arms beside confirmatory ones),
    /// e.g. `[seed_limit]` `prune = 3`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub seed_limit: std::collections::BTreeMap<String, usize>,
    pub calibration: CalibrationSpec,
    pub extraction: ExtractionSpec,
    pub pretrain: PretrainSpec,
    #[serde(default)]
    pub distill: DistillSpec,
    #[serde(default)]
    pub finetune: FinetuneSpec,
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// Which source layer each student layer inherits from, for every strategy (`masa init
    /// --layers`): `uniform` or `first`; default: each strategy's own (`first` for weight
    /// selection, `uniform` for the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_map: Option<crate::init::LayerMap>,
    /// Leave out student × strategy pairs that cannot run (a weight-selection or pruning student
    /// wider than the source) instead of refusing the spec; the plan and the report list them.
    #[serde(default)]
    pub skip_infeasible: bool,
    #[serde(default)]
    pub ablations: AblationSpec,
    /// The pre-registered decision rule the report applies (`[decision]`), written before the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionSpec>,
    /// The `eep` strategy's search (`masa init --eep-*`); default [`crate::init::eep::EepOptions::default`].
    #[serde(default, skip_serializing_if = "is_default_eep")]
    pub eep: crate::init::eep::EepOptions,
    /// Where pre-training and fine-tuning run: `cpu` (default), `cuda` or `cuda:N` (a build
    /// with `--features cuda`); so do calibration, the distillation teacher and evaluation when
    /// the model is plain Llama. Extraction and initialisation run on the CPU.
    #[serde(default)]
    pub device: crate::engine::Device,
    /// Matrix-product precision of training: `f32` (default) or `bf16` (CUDA only).
    #[serde(default)]
    pub precision: crate::engine::Precision,
    /// The spec file [`Spec::load`] read, as given; `None` for a built-in spec. Not part of
    /// the spec's content (not serialized): it only tells the report how to rerun it.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

fn is_default_eep(e: &crate::init::eep::EepOptions) -> bool {
    *e == crate::init::eep::EepOptions::default()
}

fn default_corpus() -> Vec<String> {
    vec!["default".into()]
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    pub tokens: u64,
    #[serde(default = "d256")]
    pub seq_len: usize,
    #[serde(default = "d8")]
    pub batch: usize,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractionSpec {
    /// M/W parameter ratio ρ (`r = round(sqrt(ρ d_in d_out))`).
    pub ratio: f64,
    #[serde(default = "default_lambda")]
    pub lambda: f64,
    #[serde(default = "d300")]
    pub max_iter: usize,
    /// MoE layers without shared experts (OLMoE): routed experts kept per layer.
    #[serde(default = "one")]
    pub experts: usize,
    /// MoE layers with shared experts (DeepSeekMoE): routed experts kept beside the shared
    /// ones (paper: 0).
    #[serde(default)]
    pub routed_with_shared: usize,
    /// `exact` (closed form + L-BFGS from the statistics, default) or `minibatch` (the paper's
    /// procedure: Adam on the calibration stream's `(x, W x)` pairs from a random init; the same
    /// objective and λ, [`crate::extract::MinibatchAligner`]).
    #[serde(default)]
    pub mode: ExtractionMode,
    /// Minibatch mode: passes over the calibration tokens.
    #[serde(default = "d10")]
    pub epochs: usize,
    /// Minibatch mode: Adam learning rate.
    #[serde(default = "default_minibatch_lr")]
    pub lr: f64,
    /// Source layers whose spectra the report plots (default: the first, middle and last of
    /// the layers the students map to; [`ExtractionSpec::spectra_layers_for`]).
    #[serde(default)]
    pub spectra_layers: Vec<usize>,
}

/// How genes are aligned (`masa extract --mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtractionMode {
    #[default]
    Exact,
    Minibatch,
}

impl ExtractionSpec {
    /// The source layers whose spectra are recorded, given the (ascending) source layers the
    /// students map to: `spectra_layers` when set, else the first, middle (`mapped[n / 2]`)
    /// and last of `mapped`, without repeats.
    pub fn spectra_layers_for(&self, mapped: &[usize]) -> Vec<usize> {
        if !self.spectra_layers.is_empty() {
            return self.spectra_layers.clone();
        }
        let (Some(&first), Some(&last)) = (mapped.first(), mapped.last()) else { return vec![] };
        let mut v = vec![first, mapped[mapped.len() / 2], last];
        v.dedup();
        v
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSpec {
    /// Pre-training token budgets; each strategy × seed × student trains once per budget.
    pub budgets: Vec<u64>,
    #[serde(default = "d8")]
    pub batch: usize,
    #[serde(default = "d128")]
    pub seq_len: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub lr: f64,
    #[serde(default = "d20")]
    pub warmup: usize,
    #[serde(default = "d10")]
    pub eval_every: usize,
    #[serde(default = "d8")]
    pub eval_seqs: usize,
    /// Which trainer pre-trains: `"masa"` (default), `"torchrun"`, or a list; with several,
    /// every run is repeated on each and the first is the main comparison's (the report shows
    /// the others next to it).
    #[serde(default)]
    pub engine: Engines,
    /// How `engine = "torchrun"` launches `python/masa_torch/pretrain.py` (docs/torch.md).
    #[serde(default)]
    pub torchrun: TorchrunSpec,
}

impl PretrainSpec {
    /// The `masa train` options of one run at `budget` tokens (the run stage adds the corpus,
    /// checkpoints, distillation and the device); [`Spec::validate`] checks them with the same
    /// ranges `masa train` applies, so a bad field fails before any work.
    pub fn train_options(&self, budget: u64, seed: u64) -> crate::train::TrainOptions {
        crate::train::TrainOptions {
            tokens: budget,
            batch: self.batch,
            seq_len: self.seq_len,
            grad_accum: self.grad_accum,
            lr: self.lr,
            warmup: self.warmup,
            seed,
            eval_every: self.eval_every,
            eval_seqs: self.eval_seqs,
            ..Default::default()
        }
    }
}

/// A trainer of the pre-training stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// masa's own engine (`masa train`).
    Masa,
    /// `python/masa_torch/pretrain.py` under `torchrun` (DDP, or FSDP2), on the token files of
    /// `masa tokens`.
    Torchrun,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Masa => "masa",
            Engine::Torchrun => "torchrun",
        }
    }
}

/// `engine = "torchrun"` or `engine = ["masa", "torchrun"]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Engines {
    One(Engine),
    Many(Vec<Engine>),
}

impl Default for Engines {
    fn default() -> Self {
        Engines::One(Engine::Masa)
    }
}

impl Engines {
    /// In order; the first is the main comparison's.
    pub fn list(&self) -> Vec<Engine> {
        match self {
            Engines::One(e) => vec![*e],
            Engines::Many(v) => v.clone(),
        }
    }
}

/// The torchrun launch: `LAUNCHER... COMMAND --nnodes N --nproc_per_node P pretrain.py ...`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchrunSpec {
    /// The `torchrun` executable (e.g. `.venv-bench/bin/torchrun` from `scripts/setup_torch.sh`).
    #[serde(default = "default_torchrun")]
    pub command: String,
    #[serde(default = "one")]
    pub nproc_per_node: usize,
    #[serde(default = "one")]
    pub nnodes: usize,
    /// Words before the command, e.g. `["srun", "--nodes=4", "--ntasks-per-node=1"]`.
    #[serde(default)]
    pub launcher: Vec<String>,
    /// Shard with FSDP2 instead of DDP.
    #[serde(default)]
    pub fsdp: bool,
    /// Torch CPU threads per process (0: torch's default).
    #[serde(default)]
    pub threads: usize,
    /// More arguments for torchrun itself (before the script), e.g. rendezvous options.
    #[serde(default)]
    pub torchrun_args: Vec<String>,
}

impl Default for TorchrunSpec {
    fn default() -> Self {
        TorchrunSpec {
            command: default_torchrun(),
            nproc_per_node: 1,
            nnodes: 1,
            launcher: vec![],
            fsdp: false,
            threads: 0,
            torchrun_args: vec![],
        }
    }
}

fn default_torchrun() -> String {
    "torchrun".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    pub alpha: f64,
    pub temperature: f64,
    pub top_k: usize,
}

impl Default for DistillSpec {
    fn default() -> Self {
        DistillSpec { alpha: 0.5, temperature: 1.0, top_k: 32 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// Downstream tasks; empty: no fine-tuning stage.
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
    /// Epochs and learning rate of every task that sets none; unset: the paper's, by task kind
    /// ([`FinetuneSpec::epochs_lr`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default = "d8")]
    pub batch: usize,
    #[serde(default = "d256")]
    pub max_len: usize,
    /// Generation: new tokens per answer.
    #[serde(default = "d32")]
    pub max_new_tokens: usize,
}

impl Default for FinetuneSpec {
    fn default() -> Self {
        FinetuneSpec { tasks: vec![], epochs: None, lr: None, batch: 8, max_len: 256, max_new_tokens: 32 }
    }
}

/// One downstream task: fine-tune on `examples` of its training part, score `eval_limit` test
/// items (a generation task: both per subtask; instruct_qa has 4).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// A `masa eval` task name (piqa, hellaswag, instruct_qa, ...).
    pub name: String,
    pub examples: usize,
    pub eval_limit: usize,
    /// Fine-tuning epochs for this task (default `[finetune] epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// Fine-tuning learning rate for this task (default `[finetune] lr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
}

/// The paper's fine-tuning (Sec. 4): batch 8, lr 3e-5, 3 epochs for multiple choice, 100 for
/// generation.
pub const PAPER_FT_LR: f64 = 3e-5;
pub const PAPER_FT_EPOCHS_MULTIPLE_CHOICE: usize = 3;
pub const PAPER_FT_EPOCHS_GENERATION: usize = 100;

impl FinetuneSpec {
    /// Epochs and learning rate for `task`: the task's own, else `[finetune]`'s, else the
    /// paper's for the task's kind.
    pub fn epochs_lr(&self, task: &TaskSpec) -> Result<(usize, f64)> {
        let kind = crate::eval::data::find_task(&task.name)?.kind;
        let paper_epochs =
            if kind == crate::eval::data::TaskKind::Generation { PAPER_FT_EPOCHS_GENERATION } else { PAPER_FT_EPOCHS_MULTIPLE_CHOICE };
        Ok((task.epochs.or(self.epochs).unwrap_or(paper_epochs), task.lr.or(self.lr).unwrap_or(PAPER_FT_LR)))
    }
}

/// A decision rule fixed before the run (issue 31): paired comparisons of the final mean
/// validation loss over the seeds both arms share, each judged by whether its interval
/// excludes 0. The report prints the outcome of each, and for `masa - masa-rotated` whether
/// the genes carry usable knowledge ([`crate::report::decision_sentences`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionSpec {
    /// `"A - B"` with A and B strategies of this spec: the mean of `loss_A − loss_B` per seed.
    pub comparisons: Vec<String>,
    /// Confidence level of the intervals (default 0.95).
    #[serde(default = "default_confidence")]
    pub confidence: f64,
}

impl DecisionSpec {
    /// The strategy names of each comparison.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.comparisons.iter().filter_map(|c| c.split_once(" - ").map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))).collect()
    }
}

fn default_confidence() -> f64 {
    0.95
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationSpec {
    /// Table 5: extra `masa` runs with genes at these M/W ratios.
    #[serde(default)]
    pub ratios: Vec<f64>,
    /// Fig. 4: extra `masa` runs with genes calibrated on one corpus domain each.
    #[serde(default)]
    pub calibration_domains: Vec<String>,
    /// Extra `masa` runs, one per adaptive-scaling setting (r', coupled), e.g.
    /// `scaling = [{components = 16}, {components = "energy:0.9", coupled = true}]`.
    #[serde(default)]
    pub scaling: Vec<ScalingSpec>,
}

fn d8() -> usize {
    8
}
fn d10() -> usize {
    10
}
fn d20() -> usize {
    20
}
fn d32() -> usize {
    32
}
fn d128() -> usize {
    128
}
fn d256() -> usize {
    256
}
fn d300() -> usize {
    300
}
fn one() -> usize {
    1
}
fn default_lambda() -> f64 {
    crate::extract::DEFAULT_LAMBDA
}
fn default_minibatch_lr() -> f64 {
    1e-3
}

/// `s` as one shell word: unchanged when it needs no quoting, else single-quoted.
pub fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn invalid(origin: &str, field: &str, msg: impl std::fmt::Display) -> MasaError {
    MasaError::Invalid(format!("{origin}: field `{field}`: {msg}"))
}

impl Spec {
    /// The seeds strategy (or sweep variant) `name` runs: `seeds`, or their first N by `[seed_limit]`.
    pub fn seeds_of(&self, name: &str) -> &[u64] {
        let n = self.seed_limit.get(name).map_or(self.seeds.len(), |&n| n.min(self.seeds.len()));
        &self.seeds[..n]
    }

    /// A built-in spec name or a TOML file; parsed and validated.
    pub fn load(name_or_path: &str) -> Result<Spec> {
        let (origin, text, file) = match BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            // A file of that name here would otherwise be silently ignored.
            Some((n, _)) if Path::new(n).is_file() => {
                return Err(MasaError::Invalid(format!(
                    "`{n}` names both a built-in spec and a file in this directory; pass `./{n}` for the file, or run the built-in one from another directory"
                )))
            }
            Some((n, t)) => (format!("built-in spec `{n}`"), t.to_string(), None),
            None => {
                let p = Path::new(name_or_path);
                if !p.exists() {
                    return Err(MasaError::Invalid(format!(
                        "spec `{name_or_path}`: no such file, and not a built-in spec ({})",
                        BUILTIN.iter().map(|b| b.0).collect::<Vec<_>>().join(", ")
                    )));
                }
                (p.display().to_string(), std::fs::read_to_string(p).at(p)?, Some(p.to_path_buf()))
            }
        };
        let mut spec: Spec = toml::from_str(&text).map_err(|e| MasaError::Invalid(format!("{origin}: {}", e.to_string().trim())))?;
        spec.validate(&origin)?;
        spec.file = file;
        Ok(spec)
    }

    /// The command that runs this spec: `masa run <file>` (as given to [`Spec::load`]) for a
    /// spec file, `masa run <name>` for a built-in spec, with `--device`/`--precision` when not
    /// the CPU defaults.
    pub fn command(&self) -> String {
        let mut c = match &self.file {
            Some(p) => format!("masa run {}", shell_word(&p.display().to_string())),
            None => format!("masa run {}", self.name),
        };
        // The training engine may come from the command line rather than the spec.
        if self.device != crate::engine::Device::Cpu {
            c.push_str(&format!(" --device {}", self.device));
        }
        if self.precision != crate::engine::Precision::F32 {
            c.push_str(" --precision bf16");
        }
        c
    }

    /// Every check that needs no model or corpus loaded (and the files the spec names exist).
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |field: &str, msg: String| Err(invalid(origin, field, msg));
        if self.device != crate::engine::Device::Cpu && !cfg!(feature = "cuda") {
            return bad(
                "device",
                format!("{}: this masa was built without CUDA support; build with `cargo build --release --features cuda`", self.device),
            );
        }
        if self.precision == crate::engine::Precision::Bf16 && self.device == crate::engine::Device::Cpu {
            return bad("precision", "bf16 products need device = \"cuda\"; the CPU engine computes in f32".into());
        }
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || self.name.starts_with('.')
        {
            return bad("name", format!("{:?}: use letters, digits, `-`, `_`, `.` (it names the directory runs/<name>)", self.name));
        }
        if crate::fetch::find_model(&self.source).is_none()
            && !Path::new(&self.source).exists()
            && crate::fetch::hub_id(&self.source).is_none()
        {
            return bad(
                "source",
                format!(
                    "`{}` is neither a known model ({}), an existing GGUF file or HF directory, nor a Hugging Face hub id (`org/name`)",
                    self.source,
                    crate::fetch::MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
                ),
            );
        }
        for c in &self.corpus {
            if c != "default" && !Path::new(c).exists() {
                return bad("corpus", format!("`{c}` does not exist (use \"default\" for the built-in corpus)"));
            }
        }
        if self.students.is_empty() {
            return bad("students", "name at least one student preset or student.toml".into());
        }
        for s in &self.students {
            crate::student::StudentConfig::from_spec(s).map_err(|e| invalid(origin, "students", e))?;
        }
        if self.strategies.is_empty() {
            return bad("strategies", "name at least one strategy".into());
        }
        for s in &self.strategies {
            if crate::run::strategies::find(s).is_none() {
                return bad("strategies", format!("unknown strategy `{s}`; known: {}", crate::run::strategies::names().join(", ")));
            }
        }
        if has_duplicates(&self.strategies) {
            return bad("strategies", "a strategy is listed twice".into());
        }
        if self.seeds.is_empty() || has_duplicates(&self.seeds) {
            return bad("seeds", "give one or more distinct seeds".into());
        }
        if let Some((name, n)) = self.seed_limit.iter().find(|(name, &n)| n == 0 || !self.strategies.contains(name)) {
            return bad("seed_limit", format!("`{name} = {n}`: name a strategy of this spec and at least 1 seed"));
        }
        self.eep.check().map_err(|e| invalid(origin, "eep", e))?;
        let c = &self.calibration;
        if c.tokens == 0 || c.seq_len < 2 || c.batch == 0 {
            return bad("calibration", "tokens, seq_len (≥ 2) and batch must be positive".into());
        }
        crate::limits::in_range("tokens", c.tokens, 1..=crate::limits::MAX_TOKENS, "")
            .map_err(|m| invalid(origin, "calibration.tokens", m))?;
        crate::limits::count("batch", c.batch, crate::limits::MAX_BATCH, "").map_err(|m| invalid(origin, "calibration.batch", m))?;
        let e = &self.extraction;
        crate::limits::ratio("ratio", e.ratio).map_err(|m| invalid(origin, "extraction.ratio", m))?;
        crate::limits::non_negative("lambda", e.lambda).map_err(|m| invalid(origin, "extraction.lambda", m))?;
        if e.max_iter == 0 {
            return bad("extraction.max_iter", "0: give at least 1 L-BFGS iteration".into());
        }
        if e.mode == ExtractionMode::Minibatch && (e.epochs == 0 || !(e.lr > 0.0 && e.lr.is_finite())) {
            return bad(
                "extraction",
                format!("mode = \"minibatch\" needs epochs ≥ 1 (got {}) and a positive, finite lr (got {})", e.epochs, e.lr),
            );
        }
        for (field, sc) in std::iter::once(("scaling.replica_noise", &self.scaling))
            .chain(self.ablations.scaling.iter().map(|s| ("ablations.scaling.replica_noise", s)))
        {
            if let Some(a) = sc.replica_noise {
                crate::limits::ratio("replica_noise", a).map_err(|m| invalid(origin, field, m))?;
            }
        }
        if has_duplicates(&self.ablations.scaling) || self.ablations.scaling.contains(&self.scaling) {
            return bad("ablations.scaling", "a setting is listed twice, or repeats the main `[scaling]`".into());
        }
        for &r in &self.ablations.ratios {
            if !(r > 0.0 && r <= 1.0) {
                return bad("ablations.ratios", format!("{r} must be in (0, 1]"));
            }
        }
        if self.corpus.iter().all(|c| c == "default") {
            let known: Vec<&str> = crate::corpus::DEFAULT_DOMAINS.iter().map(|(d, _)| *d).collect();
            if let Some(d) = self.ablations.calibration_domains.iter().find(|d| !known.contains(&d.as_str())) {
                return bad("ablations.calibration_domains", format!("`{d}` is not a domain of the default corpus ({})", known.join(", ")));
            }
        }
        if let Some(d) = &self.decision {
            if !(d.confidence > 0.0 && d.confidence < 1.0) {
                return bad("decision.confidence", format!("{} must be in (0, 1)", d.confidence));
            }
            if d.comparisons.is_empty() || d.pairs().len() != d.comparisons.len() {
                return bad(
                    "decision.comparisons",
                    "give one or more comparisons written `\"A - B\"` (strategy names of this spec)".into(),
                );
            }
            if let Some((a, b)) =
                d.pairs().into_iter().find(|(a, b)| a == b || !self.strategies.contains(a) || !self.strategies.contains(b))
            {
                return bad(
                    "decision.comparisons",
                    format!("`{a} - {b}`: both must be different strategies of this spec ({})", self.strategies.join(", ")),
                );
            }
        }
        let p = &self.pretrain;
        if p.budgets.is_empty() || p.budgets.contains(&0) {
            return bad("pretrain.budgets", "give one or more positive token budgets".into());
        }
        for &b in &p.budgets {
            crate::limits::in_range("budget", b, 1..=crate::limits::MAX_TOKENS, "").map_err(|m| invalid(origin, "pretrain.budgets", m))?;
        }
        if p.batch == 0 || p.seq_len < 2 || p.grad_accum == 0 {
            return bad("pretrain", "batch, seq_len (≥ 2) and grad_accum must be positive".into());
        }
        if !(p.lr > 0.0 && p.lr.is_finite()) {
            return bad("pretrain.lr", format!("{} must be positive", p.lr));
        }
        let step = (p.batch * p.seq_len * p.grad_accum) as u64;
        if let Some(b) = p.budgets.iter().find(|&&b| b < step) {
            return bad("pretrain.budgets", format!("{b} tokens is less than one optimizer step (batch × seq_len × grad_accum = {step})"));
        }
        for &b in &p.budgets {
            crate::train::check_options(&p.train_options(b, 0)).map_err(|e| invalid(origin, "pretrain", e))?;
        }
        let engines = p.engine.list();
        if engines.is_empty() || has_duplicates(&engines) {
            return bad("pretrain.engine", "name one engine (\"masa\" or \"torchrun\") or a list of distinct ones".into());
        }
        if engines.contains(&Engine::Torchrun) {
            let t = &p.torchrun;
            if t.command.is_empty() || t.nproc_per_node == 0 || t.nnodes == 0 {
                return bad("pretrain.torchrun", "command must be set and nproc_per_node, nnodes ≥ 1".into());
            }
            let distilling: Vec<&String> =
                self.strategies.iter().filter(|s| crate::run::strategies::find(s).is_some_and(|d| d.distill)).collect();
            if engines == [Engine::Torchrun] && !distilling.is_empty() {
                return bad(
                    "pretrain.engine",
                    format!("the torchrun trainer does not distil; strategies {distilling:?} need engine \"masa\" (e.g. engine = [\"masa\", \"torchrun\"])"),
                );
            }
        }
        if self.strategies.iter().any(|s| s == "distill") {
            let d = &self.distill;
            if !(0.0..=1.0).contains(&d.alpha) || !(d.temperature > 0.0) || d.top_k == 0 {
                return bad("distill", "alpha in [0, 1], temperature > 0 and top_k ≥ 1".into());
            }
        }
        let f = &self.finetune;
        for t in &f.tasks {
            let spec = crate::eval::data::find_task(&t.name).map_err(|e| invalid(origin, "finetune.tasks.name", e))?;
            if spec.kind == crate::eval::data::TaskKind::Perplexity {
                return bad(
                    "finetune.tasks.name",
                    format!("`{}` measures perplexity; the report has per-domain validation loss already", t.name),
                );
            }
            if t.examples == 0 || t.eval_limit == 0 {
                return bad("finetune.tasks", format!("`{}`: examples and eval_limit must be positive", t.name));
            }
            if t.epochs == Some(0) || t.lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
                return bad("finetune.tasks", format!("`{}`: epochs and lr, when given, must be positive", t.name));
            }
        }
        if !f.tasks.is_empty()
            && (f.epochs == Some(0) || f.batch == 0 || f.max_len < 2 || f.lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())))
        {
            return bad("finetune", "epochs, batch, max_len (≥ 2) and lr must be positive when tasks are given".into());
        }
        Ok(())
    }

    /// Corpus paths for the library (`default` → the built-in corpus directory).
    pub fn corpus_paths(&self) -> Vec<PathBuf> {
        self.corpus.iter().map(|c| if c == "default" { crate::corpus::default_corpus_dir() } else { PathBuf::from(c) }).collect()
    }
}

fn has_duplicates<T: PartialEq>(v: &[T]) -> bool {
    v.iter().enumerate().any(|(i, a)| v[..i].contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_specs_parse() {
        for (name, text) in BUILTIN {
            let s: Spec = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(&s.name, name);
        }
    }

    /// The controlled spec validates; `[seed_limit]`, `[decision]` and `replica_noise` are
    /// checked with the field named; a limited strategy runs the first N seeds.
    #[test]
    fn seed_limits_decisions_and_replica_noise_are_validated() {
        let text = BUILTIN.iter().find(|(n, _)| *n == "controlled").unwrap().1;
        let s: Spec = toml::from_str(text).unwrap();
        s.validate("controlled").unwrap();
        assert_eq!(s.seeds_of("prune"), &[1000, 1001, 1002]);
        assert_eq!(s.seeds_of("masa-rotated").len(), 10);
        assert_eq!(s.decision.as_ref().unwrap().pairs()[1], ("masa".to_string(), "masa-rotated".to_string()));
        let bad = |edit: &dyn Fn(&mut Spec), field: &str| {
            let mut t = s.clone();
            edit(&mut t);
            let e = t.validate("x.toml").unwrap_err().to_string();
            assert!(e.contains(&format!("field `{field}`")), "{field}: {e}");
        };
        bad(&|t| _ = t.seed_limit.insert("distill".into(), 2), "seed_limit");
        bad(&|t| _ = t.seed_limit.insert("prune".into(), 0), "seed_limit");
        bad(&|t| t.decision.as_mut().unwrap().comparisons.push("masa - distill".into()), "decision.comparisons");
        bad(&|t| t.decision.as_mut().unwrap().comparisons.push("masa versus scratch".into()), "decision.comparisons");
        bad(&|t| t.decision.as_mut().unwrap().confidence = 1.0, "decision.confidence");
        bad(&|t| t.scaling.replica_noise = Some(0.0), "scaling.replica_noise");
        bad(&|t| t.calibration.tokens = u64::MAX, "calibration.tokens");
        bad(&|t| t.pretrain.budgets = vec![u64::MAX], "pretrain.budgets");
        bad(
            &|t| t.ablations.scaling.push(ScalingSpec { replica_noise: Some(1.5), ..Default::default() }),
            "ablations.scaling.replica_noise",
        );
    }
}
