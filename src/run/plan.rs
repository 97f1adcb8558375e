//! What a spec expands to before any work, and what it will cost: calibrations, extractions
//! (one gene set per ratio/λ/calibration the strategies need, only the source layers the
//! students' layer maps read) and one training job per student × budget × strategy × seed.
//! `masa run --plan` prints it ([`render_plan`]); the driver runs it and the progress bar
//! counts its estimated seconds ([`Plan::cost`]).

use std::collections::BTreeSet;

use serde::Serialize;

use crate::init::{InitOptions, Strategy};
use crate::run::spec::{Engine, Spec, TaskSpec};
use crate::run::strategies::{self, Group, Variant};
use crate::source::SourceModel;
use crate::student::StudentConfig;
use crate::{MasaError, Result};

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
    let _ = writeln!(
        s,
        "calibrations: {} × {} tokens ({})",
        plan.calibrations.len(),
        spec.calibration.tokens,
        plan.calibrations.iter().map(|c| c.label.as_str()).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(s, "extractions: {} ({} gene matrices; source layers {:?})", plan.extractions.len(), e.gene_matrices, plan.layers);
    let vocab = source.weights.config.vocab_size;
    for st in &spec.students {
        let _ = writeln!(s, "student {st}: {:.1}M parameters", student_parameters(st, vocab) / 1e6);
    }
    let variants = plan.jobs.iter().map(|j| j.strategy.as_str()).collect::<BTreeSet<_>>().len();
    let _ = writeln!(
        s,
        "pre-training runs: {} ({} strategies/variants, {} seeds{}, {} budgets, {} students), {:.3e} tokens, {:.3e} FLOPs (6·N·T)",
        e.training_runs,
        variants,
        spec.seeds.len(),
        if spec.seed_limit.is_empty() { "" } else { " (fewer where [seed_limit] says)" },
        spec.pretrain.budgets.len(),
        spec.students.len(),
        e.training_tokens as f64,
        e.training_flops
    );
    let _ =
        writeln!(s, "teacher passes (distillation): {:.3e} tokens; fine-tune + eval runs: {}", e.teacher_tokens as f64, e.finetune_runs);
    if !plan.infeasible.is_empty() {
        if spec.skip_infeasible {
            let _ = writeln!(s, "left out (skip_infeasible = true; {}):", plan.infeasible.len());
        } else {
            let _ =
                writeln!(s, "cannot run ({}; remove these strategies or students, or set skip_infeasible = true):", plan.infeasible.len());
        }
        for x in &plan.infeasible {
            let _ = writeln!(s, "  - {x}");
        }
    }
    for x in &plan.warnings {
        let _ = writeln!(s, "note: {x}");
    }
    let h = e.total_seconds / 3600.0;
    let _ = writeln!(s, "estimated time on a 2-core CPU machine: {}", duration_words(h));
    let gpu_h = e.training_flops / (H100_EFFECTIVE_FLOPS * 3600.0);
    let _ = writeln!(
        s,
        "pre-training on one H100 at an assumed {:.0} TFLOP/s effective (40% of bf16 dense peak): {} of GPU time ({})",
        H100_EFFECTIVE_FLOPS / 1e12,
        duration_words(gpu_h),
        if spec.device.is_cpu() {
            "this spec trains on the CPU"
        } else {
            "small students run below that rate: docs/gpu.md has the measured tokens/s"
        }
    );
    Ok(s)
}

/// `40 s`, `42 min`, `29.9 h`, `380 years`: hours in the unit that reads best.
fn duration_words(hours: f64) -> String {
    match hours {
        h if h < 1.0 / 60.0 => format!("{:.0} s", h * 3600.0),
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
    /// Student × strategy pairs that cannot run, with the reason (selection or pruning of a
    /// student larger than the source); `masa run` refuses to start while there are any, unless
    /// the spec says `skip_infeasible = true` (then their jobs are left out of `jobs`).
    pub infeasible: Vec<String>,
    /// Combinations that run but differ from the paper's setting (a distillation teacher
    /// smaller than the student), for the plan and the report.
    pub warnings: Vec<String>,
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
    pub engine: Engine,
}

pub(crate) const ALL: &str = "all-domains";

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
            variants.push((v.with_scaling(&spec.scaling), genes.as_ref().map(|_| e.ratio), genes));
        }
        for sc in &spec.ablations.scaling {
            variants.push((strategies::scaling_variant(sc), Some(e.ratio), Some(main_genes.clone())));
        }
        for &r in &spec.ablations.ratios {
            let g = add_ex(r, e.lambda, ALL);
            variants.push((strategies::ratio_variant(r).with_scaling(&spec.scaling), Some(r), Some(g)));
        }
        for d in &spec.ablations.calibration_domains {
            let cal = format!("domain-{d}");
            calibrations.push(CalibrationJob { label: cal.clone(), domains: Some(vec![d.clone()]) });
            let g = add_ex(e.ratio, e.lambda, &cal);
            variants.push((strategies::domain_variant(d).with_scaling(&spec.scaling), Some(e.ratio), Some(g)));
        }
        let l_s = source.weights.config.num_hidden_layers;
        let mut layers = BTreeSet::new();
        for st in &spec.students {
            let cfg = StudentConfig::from_spec(st)?;
            let map = spec.layer_map.unwrap_or(crate::init::LayerMap::Uniform);
            layers.extend(
                crate::init::map_layers(cfg.num_hidden_layers, l_s, map)
                    .map_err(|e| MasaError::Invalid(format!("field `layer_map`, student `{st}`: {e}")))?,
            );
        }
        let mut jobs = Vec::new();
        let mut infeasible = Vec::new();
        let mut warnings = Vec::new();
        let source_params: f64 = source.weights.entries().iter().map(|t| t.shape.iter().product::<usize>() as f64).sum();
        let mut skip = BTreeSet::new();
        for st in &spec.students {
            let misfit = crate::init::inheritance_misfit(&StudentConfig::from_spec(st)?, &source.weights.config);
            for (v, _, _) in &variants {
                if let (true, Some(why)) = (v.init.inherits_rest(), &misfit) {
                    infeasible.push(format!("student `{st}` × strategy `{}`: {why}", v.name));
                    skip.insert((st.as_str(), v.name.as_str()));
                } else if v.init.strategy == Strategy::Eep && source.weights.config.moe.is_none() {
                    infeasible.push(format!(
                        "student `{st}` × strategy `eep`: EEP prunes the experts of a mixture-of-experts source and `{}` is dense; `prune` is the pruning baseline for dense sources",
                        spec.source
                    ));
                    skip.insert((st.as_str(), v.name.as_str()));
                }
            }
            let n = student_parameters(st, source.weights.config.vocab_size);
            if variants.iter().any(|(v, _, _)| v.distill) && n > source_params {
                warnings.push(format!(
                    "student `{st}` ({:.0}M parameters) is larger than its distillation teacher, the source ({:.0}M); the paper distils from a larger teacher",
                    n / 1e6,
                    source_params / 1e6
                ));
            }
        }
        let engines = spec.pretrain.engine.list();
        if engines.len() > 1 && variants.iter().any(|(v, _, _)| v.distill) && engines[1..].contains(&Engine::Torchrun) {
            warnings.push("distillation runs are trained by masa only: the torchrun trainer does not distil".into());
        }
        for st in &spec.students {
            for &budget in &spec.pretrain.budgets {
                for (i, &engine) in engines.iter().enumerate() {
                    for (v, ratio, genes) in &variants {
                        if spec.skip_infeasible && skip.contains(&(st.as_str(), v.name.as_str())) {
                            continue;
                        }
                        if v.distill && engine == Engine::Torchrun {
                            continue; // the torchrun trainer does not distil (spec validation)
                        }
                        // The first engine's runs are the comparisons; the others' are copies
                        // of them, named `strategy@engine`, in their own report section.
                        let (strategy, group) =
                            if i == 0 { (v.name.clone(), v.group) } else { (strategies::on_engine(&v.name, engine.name()), Group::Engine) };
                        let label = if engine == Engine::Masa { v.label.clone() } else { format!("{} ({})", v.label, engine.name()) };
                        for &seed in spec.seeds_of(&v.name) {
                            jobs.push(TrainingJob {
                                student: st.clone(),
                                budget,
                                seed,
                                strategy: strategy.clone(),
                                group,
                                label: label.clone(),
                                ratio: *ratio,
                                genes: genes.clone(),
                                init: InitOptions {
                                    seed,
                                    layers: spec.layer_map.or(v.init.layers),
                                    eep: (v.init.strategy == Strategy::Eep).then(|| spec.eep.clone()),
                                    ..v.init.clone()
                                },
                                distill: v.distill,
                                engine,
                            });
                        }
                    }
                }
            }
        }
        // Calibrations no extraction reads are dropped (e.g. a spec with only baselines).
        let needed: BTreeSet<&str> = extractions.iter().map(|x| x.calibration.as_str()).collect();
        let prune = jobs.iter().any(|j| matches!(j.init.strategy, Strategy::Prune | Strategy::Eep));
        calibrations.retain(|c| needed.contains(c.label.as_str()) || (prune && c.label == ALL));
        let used: BTreeSet<&str> = jobs.iter().filter_map(|j| j.genes.as_deref()).collect();
        extractions.retain(|x| used.contains(x.label.as_str()));
        Ok(Plan { calibrations, extractions, layers: layers.into_iter().collect(), jobs, infeasible, warnings })
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
pub(crate) const SOURCE_TOKENS_PER_S: f64 = 350.0;
pub(crate) const SECONDS_PER_GENE: f64 = 3.0;
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
pub(crate) fn job_seconds(spec: &Spec, j: &TrainingJob, vocab: usize, with_teacher: bool) -> f64 {
    let n = student_parameters(&j.student, vocab);
    let pre = 6.0 * n * j.budget as f64 / TRAIN_FLOPS_PER_S;
    let teacher = if with_teacher { j.budget as f64 / SOURCE_TOKENS_PER_S } else { 0.0 };
    let ft_tokens: f64 = spec
        .finetune
        .tasks
        .iter()
        .map(|t| finetune_examples(t) as f64 * TOKENS_PER_EXAMPLE * (spec.finetune.epochs_lr(t).map_or(1, |(e, _)| e) as f64 + 1.0))
        .sum();
    pre + teacher + 6.0 * n * ft_tokens / TRAIN_FLOPS_PER_S
}

/// Fine-tuning examples a task spec asks for (a generation task counts per subtask).
fn finetune_examples(t: &TaskSpec) -> usize {
    match crate::eval::data::find_task(&t.name) {
        Ok(s) if s.kind == crate::eval::data::TaskKind::Generation => t.examples * crate::eval::data::INSTRUCT_QA.len(),
        _ => t.examples,
    }
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
    pub(crate) fn teacher_jobs(&self) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        self.jobs.iter().enumerate().filter(|(_, j)| j.distill && seen.insert((j.seed, j.budget))).map(|(i, _)| i).collect()
    }
}
