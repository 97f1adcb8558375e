//! `results.json`: everything `masa run` measured, in one file that `masa report` renders.
//!
//! Written by [`crate::run`] after every finished stage (so a partial run still reports what
//! it has), read by [`crate::report`]. Numbers here are raw per seed; aggregation over seeds
//! (mean, spread) happens in the report. Also what fills them from the stages' own files:
//! [`read_curve`] and [`task_score`], and the [`notes`] on what a run could not do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::run::spec::Spec;
use crate::source::{Arch, TensorEntry};
use crate::MasaError;

pub const FORMAT: &str = "masa-results/1";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunResults {
    pub format: String,
    /// The spec's `name` (also the directory under `runs/`).
    pub name: String,
    pub description: String,
    /// The validated spec, as parsed (TOML → JSON).
    pub spec: serde_json::Value,
    /// The command that runs the spec again (`masa run <built-in name>` or `masa run <spec
    /// file as given>`); empty in results written before masa recorded it.
    #[serde(default)]
    pub command: String,
    pub masa_version: String,
    /// Unix seconds when this invocation started.
    pub started_unix: u64,
    /// Wall seconds of this invocation (cached stages cost ~0).
    pub wall_seconds: f64,
    pub threads: usize,
    /// Every `masa run` of this spec in this runs directory, oldest first, with how many stages
    /// it computed (the rest came from the cache).
    #[serde(default)]
    pub invocations: Vec<Invocation>,
    /// True once every stage of the spec finished.
    pub complete: bool,
    pub source: SourceInfo,
    pub calibrations: Vec<CalibrationInfo>,
    pub extractions: Vec<ExtractionInfo>,
    /// Singular values of source W and of gene M for a few (layer, proj) pairs.
    pub spectra: Vec<Spectrum>,
    pub trainings: Vec<TrainingRun>,
    /// Plain statements the report must carry (what was not obtainable, deviations from the paper).
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Invocation {
    pub started_unix: u64,
    pub wall_seconds: f64,
    /// Stages computed by this invocation (calibrations, extractions, inits, pre-trainings,
    /// fine-tune + evaluations); 0: everything came from the cache.
    pub stages_computed: usize,
    pub complete: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SourceInfo {
    pub name: String,
    pub path: String,
    pub fingerprint: String,
    pub arch: String,
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub parameters: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CalibrationInfo {
    /// e.g. `all-domains` or `domain-code`.
    pub label: String,
    pub domains: Vec<String>,
    pub tokens: u64,
    pub seconds: f64,
    pub cache_key: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExtractionInfo {
    /// e.g. `ratio-0.12-lambda-0.01-all-domains`.
    pub label: String,
    /// Label of the calibration it used.
    pub calibration: String,
    pub ratio: Option<f64>,
    pub rank: usize,
    pub lambda: f64,
    /// `exact`, or `minibatch, E epochs, lr X` (`extraction.mode`); records older than the
    /// field are exact.
    #[serde(default = "exact_mode")]
    pub mode: String,
    /// Source layers extracted (those the students' layer maps read).
    pub layers: Vec<usize>,
    pub matrices: usize,
    /// Median over matrices of L_out / (tr(W S Wᵀ)/d_out).
    pub median_rel_l_out: f64,
    /// Mean over matrices of L_spec / r at the output-only optimum and after alignment.
    pub mean_l_spec_per_r_start: f64,
    pub mean_l_spec_per_r: f64,
    pub seconds: f64,
    pub cache_key: String,
}

fn masa_engine() -> String {
    "masa".into()
}

fn exact_mode() -> String {
    "exact".into()
}

/// Singular values of W and M, as the extraction stage computes them ([`crate::extract::spectra`]).
pub use crate::extract::Spectrum;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainingRun {
    /// Student preset name or config path.
    pub student: String,
    pub student_parameters: u64,
    /// The spec's strategy name: `masa`, `scratch`, `weight-selection`, `prune`, `distill`,
    /// `hybrid`, `masa-paper-scale`, `masa-no-spectral`, `naive`, `masa-single-domain`, or
    /// `masa-ratio-<ρ>` for the ratio sweep.
    pub strategy: String,
    /// `main` (Tables 1/3, curves), `ablation` (Table 4), `ratio` (Table 5), `calibration` (Fig. 4).
    pub group: String,
    /// Human label for tables and legends, e.g. `MASA`, `w/o spectral (λ=0)`.
    pub label: String,
    /// Gene ratio for `ratio` group runs (and the masa variants), else None.
    pub ratio: Option<f64>,
    pub seed: u64,
    /// Pre-training tokens of this run.
    pub budget_tokens: u64,
    /// Validation after init (tokens 0) and every `eval_every` steps.
    pub curve: Vec<CurvePoint>,
    pub train_seconds: f64,
    pub train_tokens_per_s: f64,
    /// Fine-tuned downstream scores, by task name (`piqa`, `instruct_qa`, ...).
    pub downstream: BTreeMap<String, TaskScore>,
    /// Finished stages of this run: `init`, `train`, `finetune:<task>`, `eval:<task>`.
    pub done: Vec<String>,
    pub checkpoint: String,
    /// The trainer that pre-trained it: `masa` or `torchrun` (`pretrain.engine`).
    #[serde(default = "masa_engine")]
    pub engine: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CurvePoint {
    pub tokens: u64,
    /// Mean over domains of the validation loss (nats/token).
    pub val_mean: f64,
    /// Per-domain validation loss.
    pub val: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TaskScore {
    /// `acc` / `acc_norm` (multiple choice, fraction in [0,1]) or `rougeL` (0-100).
    pub metric: String,
    pub value: f64,
    pub stderr: Option<f64>,
    /// Test items scored.
    pub n: usize,
    /// All metrics the evaluator returned for this task.
    pub all: BTreeMap<String, f64>,
    /// Fine-tuning examples used before evaluation (0: zero-shot).
    pub finetune_examples: usize,
}

impl RunResults {
    pub fn load(path: &std::path::Path) -> crate::Result<Self> {
        use crate::error::IoContext;
        let text = std::fs::read_to_string(path).at(path)?;
        let r: RunResults =
            serde_json::from_str(&text).map_err(|e| crate::MasaError::bad_file(path, format!("not a masa results file: {e}")))?;
        if r.format != FORMAT {
            return Err(crate::MasaError::bad_file(path, format!("format `{}`, expected `{FORMAT}`", r.format)));
        }
        Ok(r)
    }

    pub fn save(&self, path: &std::path::Path) -> crate::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(|e| crate::MasaError::Invalid(format!("serialising results: {e}")))?;
        crate::home::write_atomic(path, json.as_bytes())
    }
}

/// What this run could not do as the paper did, as plain statements for the report: only the
/// ones that apply to this spec's source (`arch` and stored tensor types from its weights),
/// corpus and downstream tasks.
pub fn notes(spec: &Spec, arch: Arch, tensors: &[TensorEntry]) -> Vec<String> {
    let mut notes = Vec::new();
    let known_model = crate::fetch::find_model(&spec.source).is_some();
    if !matches!(arch, Arch::Olmoe | Arch::Deepseek) {
        let why = if known_model { " (only dense models are obtainable through the package registries `masa fetch` uses)" } else { "" };
        notes.push(format!(
            "The source ({}, {}) is dense: MoE extraction (OLMoE routed experts, DeepSeekMoE shared experts) is implemented and \
             tested on small checkpoints the tests write, but this run does not exercise it{why}.",
            spec.source,
            arch.name()
        ));
    }
    let mut quantized: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in tensors.iter().filter(|t| !matches!(t.dtype.as_str(), "F32" | "F16" | "BF16" | "F64")) {
        quantized.entry(t.dtype.as_str()).or_default().push(t.name.as_str());
    }
    if !quantized.is_empty() {
        let types: Vec<String> = quantized
            .iter()
            .map(|(dtype, names)| match names.as_slice() {
                [one] => format!("{dtype} for {one}"),
                many => format!("{dtype} for {} tensors", many.len()),
            })
            .collect();
        notes.push(format!("The source weights are quantized ({}: {}), dequantized to f32.", spec.source, types.join(", ")));
    }
    let tasks: BTreeSet<&str> = spec.finetune.tasks.iter().map(|t| t.name.as_str()).collect();
    if tasks.contains("mmlu_professional_law") {
        notes.push("CaseHOLD is not obtainable: MMLU professional_law stands in for it.".into());
    }
    if tasks.contains("instruct_qa") {
        notes.push(
            "Dolly-15k, Super-NaturalInstructions, Natural Instructions, Unnatural Instructions, Self-Instruct and Vicuna-80 are not obtainable: \
             instruct_qa (answer generation on SQuAD, DROP, Natural Questions and Jeopardy!, in the S-NI definition + input format, Rouge-L) \
             stands in for the instruction data (docs/evaluation.md)."
                .into(),
        );
    }
    if spec.corpus.iter().any(|c| c == "default") {
        notes.push(
            "The pre-training corpus is the built-in Debian-package corpus (dictionary, glosses, computing, literature, quotes, technical docs, code), \
             tens of MB, not the paper's web-scale data; budgets are CPU-sized."
                .into(),
        );
    }
    notes
}

/// The headline metric of one task's evaluation: acc_norm where the harness reports it for
/// the task (HellaSwag, PIQA, ...), else acc; Rouge-L for generation.
pub(crate) fn task_score(r: &serde_json::Value, finetune_examples: usize) -> TaskScore {
    let m = &r["metrics"];
    let all: BTreeMap<String, f64> =
        m.as_object().map(|o| o.iter().filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x))).collect()).unwrap_or_default();
    let n = r["n_items"].as_u64().unwrap_or(0) as usize;
    let (metric, stderr) = if all.contains_key("rouge_l") {
        ("rougeL", all.get("rouge_l_stderr").copied())
    } else if all.contains_key("acc_norm") {
        ("acc_norm", all.get("acc_norm_stderr").copied())
    } else {
        ("acc", all.get("acc_stderr").copied())
    };
    let key = if metric == "rougeL" { "rouge_l" } else { metric };
    TaskScore { metric: metric.into(), value: all.get(key).copied().unwrap_or(f64::NAN), stderr, n, all, finetune_examples }
}

/// Validation points of a `masa train` metrics.jsonl.
pub fn read_curve(path: &Path) -> crate::Result<Vec<CurvePoint>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let m: crate::train::MetricsLine =
            serde_json::from_str(line).map_err(|e| MasaError::bad_file(path, format!("line {}: {e}", i + 1)))?;
        if let (Some(val), Some(mean)) = (m.val, m.val_mean) {
            out.push(CurvePoint { tokens: m.tokens, val_mean: mean, val });
        }
    }
    Ok(out)
}

/// Median training throughput (tokens/s) of a metrics.jsonl.
pub(crate) fn curve_rate(path: &Path) -> f64 {
    let Ok(text) = std::fs::read_to_string(path) else { return f64::NAN };
    let mut v: Vec<f64> = text.lines().filter_map(|l| serde_json::from_str::<crate::train::MetricsLine>(l).ok()?.tokens_per_s).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
