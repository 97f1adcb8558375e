//! `masa run SPEC`: the whole pipeline from one experiment spec, every artifact cached by the
//! hash of its inputs and options, results in `runs/<name>/results.json`, then the report.
//!
//! Stages, each a library call (no shelling out): fetch → calibrate (all domains, and one per
//! single-domain ablation) → extract (one gene set per ratio/λ/calibration the strategies
//! need, only the source layers the students' layer maps read) → per student × budget ×
//! strategy × seed: init → pre-train (→ distill) → per task: fine-tune → evaluate → report.
//!
//! Artifacts live in `<runs>/artifacts/<stage>-<key>/`, `key` = hash of the stage's inputs'
//! keys and options, so a rerun, or another spec sharing stages, reuses them. A stage is
//! finished when its `record.json` exists (written last, atomically); an interrupted training
//! resumes from its latest checkpoint.

pub mod results;
pub mod spec;
pub mod strategies;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{de::DeserializeOwned, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::extract::{ExtractOptions, Genes, RankSpec};
use crate::init::{InitOptions, InitRequest, Strategy};
use crate::model::Transformer;
use crate::run::results::*;
use crate::run::spec::Spec;
use crate::run::strategies::{Group, Variant};
use crate::source::{Arch, SourceModel, TensorEntry};
use crate::student::StudentConfig;
use crate::{MasaError, Result};

/// What this run could not do as the paper did, as plain statements for the report: only the
/// ones that apply to this spec's source (`arch` and stored tensor types from its weights),
/// corpus and downstream tasks.
pub fn notes(spec: &Spec, arch: Arch, tensors: &[TensorEntry]) -> Vec<String> {
    let mut notes = Vec::new();
    let known_model = crate::fetch::find_model(&spec.source).is_some();
    if !matches!(arch, Arch::Olmoe | Arch::Deepseek) {
        let why = if known_model {
            " (only dense models are obtainable through the package registries `masa fetch` uses)"
        } else {
            ""
        };
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
    if tasks.contains("natural_instructions") {
        notes.push(
            "Dolly-15k, full Super-NaturalInstructions, Unnatural Instructions, Self-Instruct and Vicuna-80 are not obtainable: \
             BIG-bench's 61 Natural Instructions subtasks stand in for the instruction data."
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

/// Where runs and the shared artifact store live.
pub fn default_runs_root() -> PathBuf {
    std::env::var_os("MASA_RUNS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("runs"))
}

/// Run (or continue) a spec; returns the results and the report directory.
pub fn run(spec: &Spec, root: &Path) -> Result<(RunResults, PathBuf)> {
    let out = root.join(&spec.name);
    std::fs::create_dir_all(&out).at(&out)?;
    let mut ctx = Ctx::open(spec, root, &out)?;
    let plan = Plan::of(spec, &ctx.source)?;
    let overall = crate::progress::overall_bar(plan.cost(spec, &ctx.source), &format!("masa run {}", spec.name));
    ctx.overall = overall.clone();

    for cal in &plan.calibrations {
        ctx.calibration(cal)?;
    }
    for ex in &plan.extractions {
        ctx.extraction(ex, &plan.layers)?;
    }
    ctx.spectra(&plan)?;
    let teachers = plan.teacher_jobs();
    let vocab = ctx.source.weights.config.vocab_size;
    for (i, job) in plan.jobs.iter().enumerate() {
        ctx.job(job)?;
        ctx.advance(job_seconds(spec, job, vocab, teachers.contains(&i)), "");
        ctx.save()?;
        // A partial report after every job (it says it is partial); rendering takes ~0.1 s.
        crate::report::write_report(&ctx.results, &out)?;
    }
    overall.finish_and_clear();
    ctx.results.complete = true;
    ctx.save()?;
    crate::report::write_report(&ctx.results, &out)?;
    Ok((ctx.results, out))
}

/// `masa run --plan`: the stages a spec expands to and their estimated cost, without running.
/// Needs the source model's config only (a known model name is resolved without fetching).
pub fn render_plan(spec: &Spec) -> Result<String> {
    use std::fmt::Write;
    let path = crate::fetch::resolve_model(&spec.source)?;
    let source = SourceModel::open(&path)?;
    let plan = Plan::of(spec, &source)?;
    let e = estimate(spec, &plan, &source);
    let mut s = String::new();
    let _ = writeln!(s, "spec `{}`: {}", spec.name, spec.description);
    let _ = writeln!(s, "source {} ({}), corpus {:?}", spec.source, path.display(), spec.corpus);
    let _ = writeln!(s, "calibrations: {} × {} tokens ({})", plan.calibrations.len(), spec.calibration.tokens, plan.calibrations.iter().map(|c| c.label.as_str()).collect::<Vec<_>>().join(", "));
    let _ = writeln!(s, "extractions: {} ({} gene matrices; source layers {:?})", plan.extractions.len(), e.gene_matrices, plan.layers);
    let vocab = source.weights.config.vocab_size;
    for st in &spec.students {
        let _ = writeln!(s, "student {st}: {:.1}M parameters", student_parameters(st, vocab) / 1e6);
    }
    let _ = writeln!(s, "pre-training runs: {} ({} strategies/variants × {} seeds × {} budgets × {} students), {:.3e} tokens, {:.3e} FLOPs (6·N·T)",
        e.training_runs, plan.jobs.len() / (spec.seeds.len() * spec.pretrain.budgets.len() * spec.students.len()).max(1), spec.seeds.len(), spec.pretrain.budgets.len(), spec.students.len(), e.training_tokens as f64, e.training_flops);
    let _ = writeln!(s, "teacher passes (distillation): {:.3e} tokens; fine-tune + eval runs: {}", e.teacher_tokens as f64, e.finetune_runs);
    let h = e.total_seconds / 3600.0;
    let _ = writeln!(s, "estimated time on a 2-core CPU machine: {}", duration_words(h));
    let gpu_h = e.training_flops / (H100_EFFECTIVE_FLOPS * 3600.0);
    let _ = writeln!(s, "pre-training on one H100 at an assumed {:.0} TFLOP/s effective (40% of bf16 dense peak): {gpu_h:.1} GPU-hours", H100_EFFECTIVE_FLOPS / 1e12);
    Ok(s)
}

/// `42 min`, `29.9 h`, `380 years`: hours in the unit that reads best.
fn duration_words(hours: f64) -> String {
    match hours {
        h if h < 1.0 => format!("{:.0} min", h * 60.0),
        h if h < 72.0 => format!("{h:.1} h"),
        h if h < 24.0 * 365.0 => format!("{:.0} days", h / 24.0),
        h => format!("{:.0} years", h / (24.0 * 365.0)),
    }
}

/// An assumption, not a measurement: 40% utilisation of an H100's ~990 TFLOP/s dense bf16.
const H100_EFFECTIVE_FLOPS: f64 = 396e12;

/// What a spec expands to, before any work.
pub struct Plan {
    pub calibrations: Vec<CalibrationJob>,
    pub extractions: Vec<ExtractionJob>,
    /// Source layers to extract: every layer some student's uniform layer map reads.
    pub layers: Vec<usize>,
    pub jobs: Vec<TrainingJob>,
}

#[derive(Clone, Debug)]
pub struct CalibrationJob {
    pub label: String,
    pub domains: Option<Vec<String>>,
}

#[derive(Clone, Debug)]
pub struct ExtractionJob {
    pub label: String,
    pub calibration: String,
    pub ratio: f64,
    pub lambda: f64,
}

#[derive(Clone, Debug)]
pub struct TrainingJob {
    pub student: String,
    pub budget: u64,
    pub seed: u64,
    /// Spec strategy name (`masa-ratio-0.06` and `masa-domain-code` for sweep runs).
    pub strategy: String,
    pub group: Group,
    pub label: String,
    pub ratio: Option<f64>,
    /// Extraction label the init reads (masa variants).
    pub genes: Option<String>,
    pub init: InitOptions,
    pub distill: bool,
}

const ALL: &str = "all-domains";

fn extraction_label(ratio: f64, lambda: f64, cal: &str) -> String {
    format!("ratio-{ratio}-lambda-{lambda}-{cal}")
}

impl Plan {
    pub fn of(spec: &Spec, source: &SourceModel) -> Result<Plan> {
        let e = &spec.extraction;
        let mut calibrations = vec![CalibrationJob { label: ALL.into(), domains: None }];
        let mut extractions: Vec<ExtractionJob> = Vec::new();
        let mut add_ex = |ratio: f64, lambda: f64, cal: &str| {
            let label = extraction_label(ratio, lambda, cal);
            if !extractions.iter().any(|x| x.label == label) {
                extractions.push(ExtractionJob { label: label.clone(), calibration: cal.into(), ratio, lambda });
            }
            label
        };
        let main_genes = add_ex(e.ratio, e.lambda, ALL);
        // (variant, gene ratio, extraction label) per strategy the spec names, then the sweeps.
        let mut variants: Vec<(Variant, Option<f64>, Option<String>)> = Vec::new();
        for s in &spec.strategies {
            let def = strategies::find(s).ok_or_else(|| MasaError::Invalid(format!("unknown strategy `{s}`")))?;
            let v = Variant::from(def);
            let genes = match (v.needs_genes, v.spectral) {
                (false, _) => None,
                (true, true) => Some(main_genes.clone()),
                (true, false) => Some(add_ex(e.ratio, 0.0, ALL)),
            };
            variants.push((v, genes.as_ref().map(|_| e.ratio), genes));
        }
        for &r in &spec.ablations.ratios {
            let g = add_ex(r, e.lambda, ALL);
            variants.push((strategies::ratio_variant(r), Some(r), Some(g)));
        }
        for d in &spec.ablations.calibration_domains {
            let cal = format!("domain-{d}");
            calibrations.push(CalibrationJob { label: cal.clone(), domains: Some(vec![d.clone()]) });
            let g = add_ex(e.ratio, e.lambda, &cal);
            variants.push((strategies::domain_variant(d), Some(e.ratio), Some(g)));
        }
        let l_s = source.weights.config.num_hidden_layers;
        let mut layers = BTreeSet::new();
        for st in &spec.students {
            let cfg = StudentConfig::from_spec(st)?;
            layers.extend(crate::init::map_layers(cfg.num_hidden_layers, l_s, crate::init::LayerMap::Uniform)?);
        }
        let mut jobs = Vec::new();
        for st in &spec.students {
            for &budget in &spec.pretrain.budgets {
                for (v, ratio, genes) in &variants {
                    for &seed in &spec.seeds {
                        jobs.push(TrainingJob {
                            student: st.clone(),
                            budget,
                            seed,
                            strategy: v.name.clone(),
                            group: v.group,
                            label: v.label.clone(),
                            ratio: *ratio,
                            genes: genes.clone(),
                            init: InitOptions { seed, ..v.init.clone() },
                            distill: v.distill,
                        });
                    }
                }
            }
        }
        // Calibrations no extraction reads are dropped (e.g. a spec with only baselines).
        let needed: BTreeSet<&str> = extractions.iter().map(|x| x.calibration.as_str()).collect();
        let prune = jobs.iter().any(|j| j.init.strategy == Strategy::Prune);
        calibrations.retain(|c| needed.contains(c.label.as_str()) || (prune && c.label == ALL));
        let used: BTreeSet<&str> = jobs.iter().filter_map(|j| j.genes.as_deref()).collect();
        extractions.retain(|x| used.contains(x.label.as_str()));
        Ok(Plan { calibrations, extractions, layers: layers.into_iter().collect(), jobs })
    }

    /// Estimated cost in seconds on the 2-core machine, for the overall bar.
    pub fn cost(&self, spec: &Spec, source: &SourceModel) -> u64 {
        estimate(spec, self, source).total_seconds.max(1.0) as u64
    }
}

/// Rates measured on the 2-core machine (README's speed table): training forward+backward+AdamW
/// runs at ~110 GFLOP/s of 6·N·T on small students (cpu-6l-256: ~1,050 tokens/s; the tied
/// head dominates), the source's forward at ~350 tokens/s, extraction ~3 s per matrix, and
/// fine-tuning/evaluation ~150 tokens per example.
const TRAIN_FLOPS_PER_S: f64 = 110e9;
const SOURCE_TOKENS_PER_S: f64 = 350.0;
const SECONDS_PER_GENE: f64 = 3.0;
const TOKENS_PER_EXAMPLE: f64 = 150.0;

/// Student parameters with the source's vocabulary (0 for an unreadable student spec).
fn student_parameters(student: &str, vocab: usize) -> f64 {
    StudentConfig::from_spec(student)
        .map(|mut c| {
            c.vocab_size = vocab;
            c.num_parameters() as f64
        })
        .unwrap_or(0.0)
}

/// Estimated seconds of one training job: pre-training, its teacher pass (distillation; one
/// per seed and budget, charged to the job that computes it), fine-tuning and evaluation.
fn job_seconds(spec: &Spec, j: &TrainingJob, vocab: usize, with_teacher: bool) -> f64 {
    let n = student_parameters(&j.student, vocab);
    let pre = 6.0 * n * j.budget as f64 / TRAIN_FLOPS_PER_S;
    let teacher = if with_teacher { j.budget as f64 / SOURCE_TOKENS_PER_S } else { 0.0 };
    let ft_tokens: f64 = spec.finetune.tasks.iter().map(|t| finetune_examples(t) as f64 * TOKENS_PER_EXAMPLE * (spec.finetune.epochs as f64 + 1.0)).sum();
    pre + teacher + 6.0 * n * ft_tokens / TRAIN_FLOPS_PER_S
}

/// Fine-tuning examples a task spec asks for (natural_instructions counts per subtask).
fn finetune_examples(t: &spec::TaskSpec) -> usize {
    if t.name == "natural_instructions" { t.examples * 61 } else { t.examples }
}

/// Cost estimate of a plan: work per stage and seconds at the rates above.
#[derive(Debug, Serialize)]
pub struct Estimate {
    pub calibration_tokens: u64,
    pub gene_matrices: usize,
    pub training_runs: usize,
    pub training_tokens: u64,
    /// 6·N·T over all pre-training runs.
    pub training_flops: f64,
    pub teacher_tokens: u64,
    pub finetune_runs: usize,
    /// On the 2-core CPU machine.
    pub total_seconds: f64,
}

pub fn estimate(spec: &Spec, plan: &Plan, source: &SourceModel) -> Estimate {
    let vocab = source.weights.config.vocab_size;
    let calibration_tokens = spec.calibration.tokens * plan.calibrations.len() as u64;
    let gene_matrices = plan.extractions.len() * plan.layers.len() * 3;
    let teachers = plan.teacher_jobs();
    let training_flops: f64 = plan.jobs.iter().map(|j| 6.0 * student_parameters(&j.student, vocab) * j.budget as f64).sum();
    let jobs_seconds: f64 = plan.jobs.iter().enumerate().map(|(i, j)| job_seconds(spec, j, vocab, teachers.contains(&i))).sum();
    Estimate {
        calibration_tokens,
        gene_matrices,
        training_runs: plan.jobs.len(),
        training_tokens: plan.jobs.iter().map(|j| j.budget).sum(),
        training_flops,
        teacher_tokens: teachers.iter().map(|&i| plan.jobs[i].budget).sum(),
        finetune_runs: plan.jobs.len() * spec.finetune.tasks.len(),
        total_seconds: calibration_tokens as f64 / SOURCE_TOKENS_PER_S + gene_matrices as f64 * SECONDS_PER_GENE + jobs_seconds,
    }
}

impl Plan {
    /// Indices of the distillation jobs that compute a teacher pass (the first per seed, budget
    /// and batch shape; later students reuse the cached top-k).
    fn teacher_jobs(&self) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        self.jobs.iter().enumerate().filter(|(_, j)| j.distill && seen.insert((j.seed, j.budget))).map(|(i, _)| i).collect()
    }
}

struct Ctx<'a> {
    spec: &'a Spec,
    store: PathBuf,
    source_path: PathBuf,
    source: SourceModel,
    source_hash: String,
    corpus: Vec<PathBuf>,
    corpus_key: String,
    results: RunResults,
    results_path: PathBuf,
    stats: BTreeMap<String, (PathBuf, String)>,
    genes: BTreeMap<String, (PathBuf, String)>,
    overall: indicatif::ProgressBar,
    /// Earlier invocations (from an existing results.json) and this one's computed stages.
    history: Vec<Invocation>,
    computed: usize,
    t0: Instant,
}

/// Hash of a stage's kind and inputs (JSON with sorted keys).
/// The key of a training stage (`train`, `finetune`): its inputs plus, off the CPU, the
/// device and precision (their numbers differ in rounding). CPU keys are those of earlier
/// versions, so cached CPU results stay valid.
fn stage_key(kind: &str, mut inputs: serde_json::Value, spec: &Spec) -> String {
    if spec.device != crate::engine::Device::Cpu {
        inputs["engine"] = json!({"device": spec.device, "precision": spec.precision});
    }
    key(kind, &inputs)
}

fn key(kind: &str, inputs: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update(inputs.to_string().as_bytes());
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn read_record<T: DeserializeOwned>(dir: &Path) -> Option<T> {
    let p = dir.join("record.json");
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

fn write_record<T: Serialize>(dir: &Path, rec: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(rec).map_err(|e| MasaError::Invalid(format!("serialising a record: {e}")))?;
    crate::home::write_atomic(&dir.join("record.json"), json.as_bytes())
}

impl<'a> Ctx<'a> {
    fn open(spec: &'a Spec, root: &Path, out: &Path) -> Result<Ctx<'a>> {
        let source_path = crate::fetch::resolve_model(&spec.source)?;
        if spec.corpus.iter().any(|c| c == "default") {
            crate::corpus::fetch_default_corpus(true)?;
        }
        if !spec.finetune.tasks.is_empty() {
            let missing = spec.finetune.tasks.iter().any(|t| crate::eval::data::find_task(&t.name).and_then(crate::eval::data::check_available).is_err());
            if missing {
                crate::eval::data::fetch_tasks()?;
            }
        }
        let source = SourceModel::open(&source_path)?;
        let source_hash = source.fingerprint()?;
        let corpus = spec.corpus_paths();
        let manifest: Vec<String> = corpus
            .iter()
            .map(|p| {
                let m = p.join("manifest.json");
                if m.is_file() { crate::fetch::sha256_file(&m) } else { Ok(p.display().to_string()) }
            })
            .collect::<Result<_>>()?;
        let corpus_key = key("corpus", &json!(manifest));
        let c = &source.weights.config;
        let results = RunResults {
            format: FORMAT.into(),
            name: spec.name.clone(),
            description: spec.description.clone(),
            spec: serde_json::to_value(spec).map_err(|e| MasaError::Invalid(e.to_string()))?,
            masa_version: env!("CARGO_PKG_VERSION").into(),
            started_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            threads: rayon::current_num_threads(),
            source: SourceInfo {
                name: spec.source.clone(),
                path: source_path.display().to_string(),
                fingerprint: source_hash.clone(),
                arch: c.arch.name().into(),
                layers: c.num_hidden_layers,
                hidden: c.hidden_size,
                ffn: c.intermediate_size,
                parameters: source.weights.entries().iter().map(|e| e.shape.iter().product::<usize>() as u64).sum(),
            },
            command: spec.command(),
            notes: notes(spec, c.arch, &source.weights.entries()),
            ..Default::default()
        };
        let store = root.join("artifacts");
        std::fs::create_dir_all(&store).at(&store)?;
        Ok(Ctx {
            spec,
            store,
            source_path,
            source,
            source_hash,
            corpus,
            corpus_key,
            results,
            results_path: out.join("results.json"),
            stats: BTreeMap::new(),
            genes: BTreeMap::new(),
            overall: indicatif::ProgressBar::hidden(),
            history: RunResults::load(&out.join("results.json")).map(|r| r.invocations).unwrap_or_default(),
            computed: 0,
            t0: Instant::now(),
        })
    }

    /// Write results.json, with this invocation appended to the history.
    fn save(&mut self) -> Result<()> {
        self.results.wall_seconds = self.t0.elapsed().as_secs_f64();
        let now = Invocation { started_unix: self.results.started_unix, wall_seconds: self.results.wall_seconds, stages_computed: self.computed, complete: self.results.complete };
        self.results.invocations = self.history.iter().cloned().chain([now]).collect();
        self.results.save(&self.results_path)
    }

    fn advance(&self, seconds: f64, what: &str) {
        self.overall.inc(seconds.max(0.0) as u64);
        self.overall.set_message(what.to_string());
    }

    /// One pass of the source over the corpus: second moments per FFN input site.
    fn calibration(&mut self, job: &CalibrationJob) -> Result<()> {
        let c = &self.spec.calibration;
        let opts = crate::calibrate::CalibrateOptions { tokens: c.tokens, seq_len: c.seq_len, batch: c.batch, seed: c.seed, domains: job.domains.clone(), rank: None };
        let k = key("calibrate", &json!({"source": self.source_hash, "corpus": self.corpus_key, "tokens": c.tokens, "seq": c.seq_len, "batch": c.batch, "seed": c.seed, "domains": job.domains}));
        let dir = self.store.join(format!("calibrate-{k}"));
        let path = dir.join("stats.safetensors");
        self.overall.set_message(format!("calibrating {} ({} tokens)", job.label, c.tokens));
        let info = match read_record::<CalibrationInfo>(&dir) {
            Some(info) => info,
            None => {
                std::fs::create_dir_all(&dir).at(&dir)?;
                self.computed += 1;
                let model = Transformer::load(&self.source.weights)?;
                let corpus = crate::corpus::load_corpus(&self.corpus)?;
                let t0 = Instant::now();
                let stats = crate::calibrate::calibrate_on_corpus(&self.source, &model, &corpus, &self.corpus.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "), &opts)?;
                stats.save(&path)?;
                let info = CalibrationInfo {
                    label: job.label.clone(),
                    domains: stats.meta.dataset_tokens.keys().cloned().collect(),
                    tokens: stats.meta.tokens,
                    seconds: t0.elapsed().as_secs_f64(),
                    cache_key: k.clone(),
                };
                write_record(&dir, &info)?;
                info
            }
        };
        self.advance(c.tokens as f64 / SOURCE_TOKENS_PER_S, &format!("calibrated {}", job.label));
        self.stats.insert(job.label.clone(), (path, k));
        self.results.calibrations.push(CalibrationInfo { label: job.label.clone(), ..info });
        self.save()
    }

    /// Gene matrices for the mapped layers, exact mode (closed form, then L-BFGS on L_align).
    fn extraction(&mut self, job: &ExtractionJob, layers: &[usize]) -> Result<()> {
        let e = &self.spec.extraction;
        let (stats_path, stats_key) = self.stats.get(&job.calibration).cloned().ok_or_else(|| MasaError::Invalid(format!("no calibration `{}`", job.calibration)))?;
        let k = key("extract", &json!({"stats": stats_key, "ratio": job.ratio, "lambda": job.lambda, "max_iter": e.max_iter, "layers": layers}));
        let dir = self.store.join(format!("extract-{k}"));
        let path = dir.join("genes.safetensors");
        self.overall.set_message(format!("extracting genes {}", job.label));
        let info = match read_record::<ExtractionInfo>(&dir) {
            Some(info) => info,
            None => {
                std::fs::create_dir_all(&dir).at(&dir)?;
                self.computed += 1;
                let stats = crate::stats::Stats::load(&stats_path)?;
                let opts = ExtractOptions { rank: RankSpec::Ratio(job.ratio), lambda: job.lambda, max_iter: e.max_iter, layers: Some(layers.to_vec()), ..Default::default() };
                let n = crate::extract::select_matrices(&self.source.weights, &stats, 1, Some(layers))?.len();
                let bar = crate::progress::count_bar(n as u64, "extracting", "matrices");
                let t0 = Instant::now();
                let genes = crate::extract::extract(&self.source.weights, &self.source_hash, &stats, &opts, &|_| bar.inc(1))?;
                bar.finish_and_clear();
                genes.save(&path)?;
                let ms = &genes.meta.matrices;
                let (median_rel_l_out, mean_l_spec_per_r_start, mean_l_spec_per_r) = genes.meta.summary();
                let info = ExtractionInfo {
                    label: job.label.clone(),
                    calibration: job.calibration.clone(),
                    ratio: Some(job.ratio),
                    rank: ms.first().map(|m| m.r).unwrap_or(0),
                    lambda: job.lambda,
                    layers: layers.to_vec(),
                    matrices: ms.len(),
                    median_rel_l_out,
                    mean_l_spec_per_r_start,
                    mean_l_spec_per_r,
                    seconds: t0.elapsed().as_secs_f64(),
                    cache_key: k.clone(),
                };
                write_record(&dir, &info)?;
                info
            }
        };
        self.advance(info.matrices as f64 * SECONDS_PER_GENE, &format!("extracted {}", job.label));
        self.genes.insert(job.label.clone(), (path, k));
        self.results.extractions.push(ExtractionInfo { label: job.label.clone(), calibration: job.calibration.clone(), ..info });
        self.save()
    }

    /// Singular values of W and of its gene M ([`crate::extract::spectra`]) for the first,
    /// middle and last mapped layers, or the spec's `extraction.spectra_layers`, of the main
    /// extraction (cached beside its genes).
    fn spectra(&mut self, plan: &Plan) -> Result<()> {
        let Some(main) = plan.extractions.first() else { return Ok(()) };
        let (genes_path, _) = self.genes[&main.label].clone();
        let cache = genes_path.with_file_name("spectra.json");
        let layers = self.spec.extraction.spectra_layers_for(&plan.layers);
        if let Some(l) = layers.iter().find(|l| !plan.layers.contains(l)) {
            return Err(MasaError::Invalid(format!("field `extraction.spectra_layers`: layer {l} has no gene (extracted layers: {:?})", plan.layers)));
        }
        let cached: Option<Vec<Spectrum>> = std::fs::read_to_string(&cache).ok().and_then(|t| serde_json::from_str(&t).ok());
        let spectra = match cached.filter(|s| s.iter().map(|x| x.layer).collect::<BTreeSet<_>>() == layers.iter().copied().collect()) {
            Some(s) => s,
            None => {
                let genes = Genes::load(&genes_path)?;
                let out = crate::extract::spectra(&self.source.weights, &genes, &layers, &main.label)?;
                let json = serde_json::to_string(&out).map_err(|e| MasaError::Invalid(e.to_string()))?;
                crate::home::write_atomic(&cache, json.as_bytes())?;
                out
            }
        };
        self.results.spectra = spectra;
        self.save()
    }

    /// One student × budget × strategy × seed: init, pre-train, then each task's fine-tune
    /// and evaluation.
    fn job(&mut self, j: &TrainingJob) -> Result<()> {
        let spec = self.spec;
        let what = format!("{} {} seed {} ({} tokens)", j.student, j.strategy, j.seed, j.budget);
        let student = StudentConfig::from_spec(&j.student)?;
        let genes = j.genes.as_ref().map(|g| self.genes[g].clone());
        let stats = (j.init.strategy == Strategy::Prune).then(|| self.stats[ALL].clone());
        // ---- init ----
        let init_key = key(
            "init",
            &json!({"source": self.source_hash, "student": student, "options": j.init, "genes": genes.as_ref().map(|g| &g.1), "stats": stats.as_ref().map(|s| &s.1)}),
        );
        let init_dir = self.store.join(format!("init-{init_key}"));
        if read_record::<serde_json::Value>(&init_dir).is_none() {
            self.computed += 1;
            self.overall.set_message(format!("init {what}"));
            let model_dir = init_dir.join("model");
            let cfg = crate::init::run(&InitRequest {
                student: j.student.clone(),
                out: model_dir,
                source: self.source_path.clone(),
                genes: genes.as_ref().map(|g| g.0.clone()),
                stats: stats.as_ref().map(|s| s.0.clone()),
                options: j.init.clone(),
            })?;
            write_record(&init_dir, &json!({"parameters": cfg.num_parameters()}))?;
        }
        let init_model = init_dir.join("model");
        let params = read_record::<serde_json::Value>(&init_dir).and_then(|v| v["parameters"].as_u64()).unwrap_or(0);
        // ---- pre-train ----
        let p = &spec.pretrain;
        let distill = j.distill.then(|| crate::train::DistillOptions {
            teacher: self.source_path.clone(),
            alpha: spec.distill.alpha,
            temperature: spec.distill.temperature,
            top_k: spec.distill.top_k,
            cache_dir: Some(self.store.join("teacher-cache")),
        });
        let train_key = stage_key(
            "train",
            json!({"init": init_key, "corpus": self.corpus_key, "budget": j.budget, "batch": p.batch, "seq": p.seq_len, "accum": p.grad_accum,
                    "lr": p.lr, "warmup": p.warmup, "eval_every": p.eval_every, "eval_seqs": p.eval_seqs, "seed": j.seed,
                    "distill": distill.as_ref().map(|d| json!({"alpha": d.alpha, "temperature": d.temperature, "top_k": d.top_k}))}),
            spec,
        );
        let train_dir = self.store.join(format!("train-{train_key}"));
        let rec: TrainRecord = match read_record::<TrainRecord>(&train_dir) {
            // The checkpoint as a path inside this store, wherever the store is now.
            Some(r) => TrainRecord { checkpoint: train_dir.join(r.checkpoint.file_name().unwrap_or_default()), ..r },
            None => {
                self.computed += 1;
                self.overall.set_message(format!("pre-train {what}"));
                let steps = j.budget.div_ceil((p.batch * p.seq_len * p.grad_accum) as u64) as usize;
                let opts = crate::train::TrainOptions {
                    corpus: self.corpus.clone(),
                    out: train_dir.clone(),
                    tokens: j.budget,
                    batch: p.batch,
                    seq_len: p.seq_len,
                    grad_accum: p.grad_accum,
                    lr: p.lr,
                    warmup: p.warmup,
                    seed: j.seed,
                    eval_every: p.eval_every,
                    eval_seqs: p.eval_seqs,
                    ckpt_every: (steps / 4).max(25),
                    resume: crate::train::resolve_checkpoint(&train_dir).ok().map(|_| train_dir.clone()),
                    progress: true,
                    distill,
                    device: spec.device,
                    precision: spec.precision,
                    ..Default::default()
                };
                let t0 = Instant::now();
                let s = crate::train::train(&init_model, &opts)?;
                let secs = t0.elapsed().as_secs_f64();
                let r = TrainRecord { checkpoint: s.checkpoint, seconds: secs, tokens_per_s: curve_rate(&train_dir.join("metrics.jsonl")) };
                write_record(&train_dir, &r)?;
                r
            }
        };
        let curve = read_curve(&train_dir.join("metrics.jsonl"))?;
        let mut run = TrainingRun {
            student: j.student.clone(),
            student_parameters: params,
            strategy: j.strategy.clone(),
            group: j.group.name().into(),
            label: j.label.clone(),
            ratio: j.ratio,
            seed: j.seed,
            budget_tokens: j.budget,
            curve,
            train_seconds: rec.seconds,
            train_tokens_per_s: rec.tokens_per_s,
            downstream: BTreeMap::new(),
            done: vec!["init".into(), "train".into()],
            checkpoint: rec.checkpoint.display().to_string(),
        };
        // ---- fine-tune and evaluate per task ----
        for task in &spec.finetune.tasks {
            let score = self.downstream(&rec.checkpoint, &train_key, task, j.seed, &what)?;
            run.downstream.insert(task.name.clone(), score);
            run.done.push(format!("eval:{}", task.name));
        }
        self.results.trainings.push(run);
        Ok(())
    }

    fn downstream(&mut self, checkpoint: &Path, train_key: &str, task: &spec::TaskSpec, seed: u64, what: &str) -> Result<TaskScore> {
        let f = &self.spec.finetune;
        let k = stage_key(
            "finetune",
            json!({"train": train_key, "task": task.name, "eval_format": crate::eval::PROMPT_FORMAT_VERSION, "record": RECORD_VERSION, "examples": task.examples, "eval_limit": task.eval_limit, "epochs": f.epochs,
                    "lr": f.lr, "batch": f.batch, "max_len": f.max_len, "max_new_tokens": f.max_new_tokens, "seed": seed}),
            self.spec,
        );
        let dir = self.store.join(format!("finetune-{k}"));
        if let Some(s) = read_record::<TaskScore>(&dir) {
            return Ok(s);
        }
        self.computed += 1;
        self.overall.set_message(format!("fine-tune {} {what}", task.name));
        std::fs::create_dir_all(&dir).at(&dir)?;
        let tok = SourceModel::open(checkpoint)?.tokenizer;
        let examples = crate::eval::finetune_pairs(&task.name, Some(task.examples))?
            .iter()
            .map(|(p, r)| Ok(crate::finetune::Example { prompt: tok.encode(p, false)?, response: tok.encode(r, false)? }))
            .collect::<Result<Vec<_>>>()?;
        let opts = crate::finetune::FinetuneOptions {
            out: dir.join("sft"),
            epochs: f.epochs,
            batch: f.batch,
            lr: f.lr,
            max_len: f.max_len,
            seed,
            progress: true,
            device: self.spec.device,
            precision: self.spec.precision,
            ..Default::default()
        };
        let s = crate::finetune::finetune(checkpoint, &examples, &opts)?;
        let eopt = crate::eval::EvalOptions {
            limit: crate::eval::Limit::First(task.eval_limit),
            gen: crate::eval::generation::GenOptions { max_new_tokens: f.max_new_tokens, ..Default::default() },
            ..Default::default()
        };
        let v = crate::eval::evaluate_path(&s.checkpoint, &s.checkpoint.display().to_string(), &[task.name.as_str()], &eopt)?;
        crate::home::write_atomic(&dir.join("eval.json"), serde_json::to_string_pretty(&v).map_err(|e| MasaError::Invalid(e.to_string()))?.as_bytes())?;
        let score = task_score(&v["tasks"][task.name.as_str()], examples.len());
        write_record(&dir, &score)?;
        Ok(score)
    }
}

/// Bumped when what a fine-tune/eval record holds changes (2: generation tasks' answer NLL).
const RECORD_VERSION: u32 = 2;

#[derive(Serialize, serde::Deserialize)]
struct TrainRecord {
    checkpoint: PathBuf,
    seconds: f64,
    tokens_per_s: f64,
}

/// The headline metric of one task's evaluation: acc_norm where the harness reports it for
/// the task (HellaSwag, PIQA, ...), else acc; Rouge-L for generation.
fn task_score(r: &serde_json::Value, finetune_examples: usize) -> TaskScore {
    let m = &r["metrics"];
    let all: BTreeMap<String, f64> = m.as_object().map(|o| o.iter().filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x))).collect()).unwrap_or_default();
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
pub fn read_curve(path: &Path) -> Result<Vec<CurvePoint>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let m: crate::train::MetricsLine = serde_json::from_str(line).map_err(|e| MasaError::bad_file(path, format!("line {}: {e}", i + 1)))?;
        if let (Some(val), Some(mean)) = (m.val, m.val_mean) {
            out.push(CurvePoint { tokens: m.tokens, val_mean: mean, val });
        }
    }
    Ok(out)
}

/// Median training throughput (tokens/s) of a metrics.jsonl.
fn curve_rate(path: &Path) -> f64 {
    let Ok(text) = std::fs::read_to_string(path) else { return f64::NAN };
    let mut v: Vec<f64> = text.lines().filter_map(|l| serde_json::from_str::<crate::train::MetricsLine>(l).ok()?.tokens_per_s).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
