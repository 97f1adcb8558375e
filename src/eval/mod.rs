//! `masa eval`: zero-shot evaluation of a source model or a student checkpoint.
//!
//! - `data`: the evaluation packages, file readers and the recorded train/test split;
//! - `multiple_choice`: lm-evaluation-harness log-likelihood scoring (acc, acc_norm);
//! - `generation`: Natural Instructions generation, Rouge-L;
//! - `perplexity`: per-domain perplexity on held-out corpus text.
//!
//! [`evaluate`] runs a list of tasks and returns one JSON document recording the model, each
//! task's split, limit, item count, metrics, seconds, per-item results, and the prompt format
//! version, so every number in a report can be traced to what produced it.

pub mod data;
pub mod generation;
pub mod multiple_choice;
pub mod perplexity;

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::error::{MasaError, Result};
use crate::source::model::Transformer;
use crate::source::SourceModel;

pub use data::{find_task, TaskKind, TaskSplit, TASKS};

/// Version of the prompt formats and decoding rules; bump when any of them changes.
pub const PROMPT_FORMAT_VERSION: &str = "masa-eval-v1 (lm-evaluation-harness zero-shot MC formats; S-NI definition+input generation)";

/// Items evaluated per task when no `--limit` is given: the first N items of the chosen split
/// in file order (generation tasks: per subtask). Chosen so that all tasks together take
/// about 35 minutes for SmolLM2-135M on 2 shared CPU cores (WinoGrande's
/// whole test split, 390 items, is its default); `--limit all` evaluates everything.
pub const DEFAULT_LIMITS: &[(&str, usize)] = &[
    ("boolq", 100),
    ("hellaswag", 200),
    ("piqa", 200),
    ("winogrande", 390),
    ("medmcqa", 200),
    ("mmlu_professional_law", 100),
    ("instruct_qa", 25),
    ("perplexity", 8),
];

pub fn default_limit(task: &str) -> Option<usize> {
    DEFAULT_LIMITS.iter().find(|(t, _)| *t == task).map(|(_, n)| *n)
}

/// How many items: the task's default, everything, or the first N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Limit {
    Default,
    All,
    First(usize),
}

impl Limit {
    pub fn parse(s: &str) -> Result<Limit> {
        match s {
            "default" => Ok(Limit::Default),
            "all" => Ok(Limit::All),
            n => match n.parse() {
                Ok(0) => Err(MasaError::Invalid(
                    "--limit 0: evaluating no items gives no score; give a positive number, `all` or `default`".into(),
                )),
                Ok(k) => Ok(Limit::First(k)),
                Err(_) => Err(MasaError::Invalid(format!("--limit {n:?}: expected a positive number, `all` or `default`"))),
            },
        }
    }
    fn resolve(self, task: &str) -> Option<usize> {
        match self {
            Limit::Default => default_limit(task),
            Limit::All => None,
            Limit::First(n) => Some(n),
        }
    }
}

/// Serialized into `masa run`'s cache keys.
#[derive(serde::Serialize)]
pub struct EvalOptions {
    pub split: TaskSplit,
    pub limit: Limit,
    pub gen: generation::GenOptions,
    /// Perplexity: tokens per sequence and sequences per forward pass.
    pub ppl_seq_len: usize,
    pub ppl_batch: usize,
    /// Show progress bars.
    pub progress: bool,
    /// Where the model runs: the CPU (candle, with a KV cache for generation), or a CUDA device
    /// for plain Llama models ([`multiple_choice::ScoringEngine`], f32 products). In cache keys
    /// only when not the CPU.
    #[serde(skip_serializing_if = "crate::engine::Device::is_cpu")]
    pub device: crate::engine::Device,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            split: TaskSplit::Test,
            limit: Limit::Default,
            gen: Default::default(),
            ppl_seq_len: 256,
            ppl_batch: 4,
            progress: true,
            device: Default::default(),
        }
    }
}

/// The model on a CUDA device for scoring; without the `cuda` feature there is none.
#[cfg(feature = "cuda")]
pub type GpuModel = crate::cuda::llama::GpuLlama;
#[cfg(not(feature = "cuda"))]
pub type GpuModel = std::convert::Infallible;

/// Parse `boolq,hellaswag,...` (or `all`) into task names, rejecting unknown names before any
/// work starts.
pub fn parse_tasks(list: &str) -> Result<Vec<&'static str>> {
    if list.trim() == "all" {
        return Ok(TASKS.iter().map(|t| t.name).collect());
    }
    let names: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if names.is_empty() {
        return Err(MasaError::Invalid(format!("no task given; known tasks: {}", data::task_names().join(", "))));
    }
    names.iter().map(|n| find_task(n).map(|t| t.name)).collect()
}

fn bar(progress: bool, n: usize, msg: &str, unit: &str) -> indicatif::ProgressBar {
    if progress {
        crate::progress::count_bar(n as u64, msg, unit)
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// Open a model (GGUF file or HF directory, e.g. a student checkpoint) and evaluate it.
pub fn evaluate_path(path: &Path, spec: &str, tasks: &[&str], opt: &EvalOptions) -> Result<Value> {
    let source = SourceModel::open(path)?;
    let model = Transformer::load(&source.weights)?;
    let mut gpu = match opt.device {
        crate::engine::Device::Cuda(ordinal) => {
            let Some(cfg) = crate::student::plain_llama(&source.weights.config) else {
                return Err(MasaError::Invalid(format!(
                    "--device {}: scoring on CUDA runs plain Llama models (masa's students, SmolLM2); {} is a {} model: use --device cpu",
                    opt.device,
                    path.display(),
                    source.weights.config.arch.name()
                )));
            };
            Some(open_gpu(&source.weights, &cfg, ordinal)?)
        }
        _ => None,
    };
    let info = json!({
        "spec": spec,
        "path": path.display().to_string(),
        "fingerprint": source.fingerprint()?,
        "arch": format!("{:?}", source.weights.config.arch),
        "vocab_size": source.weights.config.vocab_size,
        "tokenizer_vocab_size": source.tokenizer.vocab_size(),
    });
    evaluate(&model, gpu.as_mut(), &source.tokenizer, info, tasks, opt)
}

/// The model on CUDA device `ordinal` for scoring (f32 products).
#[cfg(feature = "cuda")]
fn open_gpu(weights: &crate::source::SourceWeights, cfg: &crate::student::StudentConfig, ordinal: usize) -> Result<GpuModel> {
    crate::cuda::llama::GpuLlama::load_frozen(weights, cfg, ordinal, false)
}
#[cfg(not(feature = "cuda"))]
fn open_gpu(_: &crate::source::SourceWeights, _: &crate::student::StudentConfig, _: usize) -> Result<GpuModel> {
    Err(crate::engine::no_cuda())
}

/// Evaluate `tasks` in order; see the module docs for the JSON layout. `gpu`: the same model on
/// a CUDA device, which then runs every task.
pub fn evaluate(
    model: &Transformer,
    mut gpu: Option<&mut GpuModel>,
    tok: &crate::source::tokenizer::Tokenizer,
    model_info: Value,
    tasks: &[&str],
    opt: &EvalOptions,
) -> Result<Value> {
    let g = &opt.gen;
    crate::limits::non_negative("--temperature", g.temperature)?;
    crate::limits::count("--max-new-tokens", g.max_new_tokens, model.config.max_position_embeddings, "the model's positions")?;
    // Fail before any work when some task's data is missing.
    for &name in tasks {
        data::check_available(find_task(name)?)?;
    }
    let mut results = serde_json::Map::new();
    for &name in tasks {
        let spec = find_task(name)?;
        let limit = opt.limit.resolve(name);
        let t0 = Instant::now();
        let mut r = match spec.kind {
            TaskKind::MultipleChoice => eval_mc(model, gpu.as_deref_mut(), tok, spec, opt.split, limit, opt.progress)?,
            TaskKind::Generation => eval_generation(model, gpu.as_deref_mut(), tok, spec, opt, limit)?,
            TaskKind::Perplexity => eval_ppl(model, gpu.as_deref_mut(), tok, opt, limit)?,
        };
        let secs = t0.elapsed().as_secs_f64();
        if let Value::Object(m) = &mut r {
            m.insert("task".into(), json!(name));
            m.insert("kind".into(), json!(spec.kind));
            m.insert("split".into(), json!(opt.split.as_str()));
            m.insert("limit".into(), json!(limit));
            m.insert("seconds".into(), json!(secs));
        }
        eprintln!("eval: {name}: {} ({secs:.1} s)", summary(&r));
        results.insert(name.to_string(), r);
    }
    Ok(json!({
        "format": "masa-eval-results-v1",
        "masa_version": env!("CARGO_PKG_VERSION"),
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "model": model_info,
        "split": opt.split.as_str(),
        "split_rule": data::SPLIT_RULE,
        "limit": match opt.limit { Limit::Default => json!("default"), Limit::All => json!("all"), Limit::First(n) => json!(n) },
        "generation": opt.gen,
        "threads": rayon::current_num_threads(),
        "tasks": results,
    }))
}

fn summary(r: &Value) -> String {
    let m = &r["metrics"];
    let n = r["n_items"].as_u64().unwrap_or(0);
    if let Some(a) = m["acc"].as_f64() {
        format!("n={n} acc={a:.4} acc_norm={:.4}", m["acc_norm"].as_f64().unwrap_or(f64::NAN))
    } else if let Some(rl) = m["rouge_l"].as_f64() {
        format!("n={n} rouge_l={rl:.2} answer_nll={:.3}", m["answer_nll"].as_f64().unwrap_or(f64::NAN))
    } else {
        format!("n={n} {}", m)
    }
}

fn eval_mc(
    model: &Transformer,
    gpu: Option<&mut GpuModel>,
    tok: &crate::source::tokenizer::Tokenizer,
    spec: &data::TaskSpec,
    split: TaskSplit,
    limit: Option<usize>,
    progress: bool,
) -> Result<Value> {
    let rows = data::load_rows(spec)?;
    let n_shipped = rows.len();
    let items = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| split.keeps(spec.name, *i))
        .take(limit.unwrap_or(usize::MAX))
        .map(|(i, r)| multiple_choice::build_item(spec.name, r, i))
        .collect::<Result<Vec<_>>>()?;
    let bar = bar(progress, items.len(), spec.name, "items");
    let scores = match gpu {
        Some(g) => multiple_choice::score_items_batched(g, tok, &items, &mut || bar.inc(1))?,
        None => items.iter().map(|it| multiple_choice::score_item(model, tok, it).inspect(|_| bar.inc(1))).collect::<Result<Vec<_>>>()?,
    };
    bar.finish_and_clear();
    let path = data::task_path(spec);
    Ok(json!({
        "n_items": scores.len(),
        "n_shipped": n_shipped,
        "source": {"file": path.display().to_string(), "sha256": crate::fetch::sha256_file(&path)?},
        "metrics": multiple_choice::metrics(&scores),
        "items": scores,
    }))
}

fn eval_generation(
    model: &Transformer,
    mut gpu: Option<&mut GpuModel>,
    tok: &crate::source::tokenizer::Tokenizer,
    spec: &data::TaskSpec,
    opt: &EvalOptions,
    per_subtask: Option<usize>,
) -> Result<Value> {
    let dir = data::task_path(spec);
    if !dir.exists() {
        return Err(MasaError::Invalid(format!("{}: task data missing; run `masa fetch tasks`", dir.display())));
    }
    let subs = data::read_generation_subtasks(&dir)?;
    let mut work = Vec::new();
    for s in &subs {
        for (i, (input, targets)) in
            s.examples.iter().enumerate().filter(|(i, _)| opt.split.keeps(&s.name, *i)).take(per_subtask.unwrap_or(usize::MAX))
        {
            work.push((s, i, input, targets));
        }
    }
    let bar = bar(opt.progress, work.len(), spec.name, "examples");
    let mut rng = crate::rng::SplitMix64(opt.gen.seed);
    let mut scores = Vec::with_capacity(work.len());
    for (s, i, input, targets) in work {
        let engine = gpu.as_deref_mut().map(|g| g as &mut (dyn multiple_choice::ScoringEngine + 'static));
        scores.push(generation::score_example(model, engine, tok, &s.name, i, &s.definition, input, targets, &opt.gen, &mut rng)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let vals: Vec<f64> = scores.iter().map(|s| s.rouge_l).collect();
    let (mean, se) = multiple_choice::mean_stderr(&vals);
    // Per-subtask means, then their mean (each subtask weighs the same).
    let mut per: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for s in &scores {
        per.entry(s.subtask.as_str()).or_default().push(s.rouge_l);
    }
    let per_mean: std::collections::BTreeMap<&str, f64> = per.iter().map(|(k, v)| (*k, v.iter().sum::<f64>() / v.len() as f64)).collect();
    Ok(json!({
        "n_items": scores.len(),
        "n_subtasks": per.len(),
        "source": {"dir": dir.display().to_string(), "package": spec.package.map(|p| format!("{}=={}", p.package, p.version))},
        "metrics": {
            "rouge_l": mean,
            "rouge_l_stderr": se,
            "rouge_l_macro": per_mean.values().sum::<f64>() / per_mean.len().max(1) as f64,
            "answer_nll": answer_nll(&scores),
        },
        "per_subtask": per_mean,
        "items": scores,
    }))
}

/// Mean negative log-likelihood per reference token (nats), over all items' first references.
fn answer_nll(scores: &[generation::GenScore]) -> f64 {
    let tokens: usize = scores.iter().map(|s| s.answer_tokens).sum();
    -scores.iter().map(|s| s.answer_logprob).sum::<f64>() / tokens.max(1) as f64
}

fn eval_ppl(
    model: &Transformer,
    gpu: Option<&mut GpuModel>,
    tok: &crate::source::tokenizer::Tokenizer,
    opt: &EvalOptions,
    max_per_domain: Option<usize>,
) -> Result<Value> {
    let dir = crate::corpus::default_corpus_dir();
    if !dir.join("manifest.json").exists() {
        return Err(MasaError::Invalid(format!("{}: the default corpus is missing; run `masa fetch corpus`", dir.display())));
    }
    let corpus = crate::corpus::load_corpus(&[dir.clone()])?;
    let split = match opt.split {
        TaskSplit::Train => crate::corpus::Split::Train,
        _ => crate::corpus::Split::Valid,
    };
    let cap = max_per_domain.unwrap_or(usize::MAX);
    let bar = bar(opt.progress, cap.min(1_000_000) * corpus.domains().len(), "perplexity", "sequences");
    let batched = gpu.map(|g| g as &mut dyn multiple_choice::ScoringEngine);
    let per = perplexity::perplexity(model, batched, tok, &corpus, split, opt.ppl_seq_len, cap, opt.ppl_batch, &mut || bar.inc(1))?;
    bar.finish_and_clear();
    let n: usize = per.values().map(|d| d.sequences).sum();
    Ok(json!({
        "n_items": n,
        "source": {"corpus": dir.display().to_string(), "split": split.as_str(), "seq_len": opt.ppl_seq_len},
        "metrics": per,
    }))
}

/// Supervised fine-tuning pairs `(prompt, response)` of a task's **training** part (the test part
/// is never trained on), in the exact prompt format the evaluation scores: multiple choice gives
/// the gold choice's context and continuation; a generation task the prompt of
/// [`generation::instruction_prompt`] and `" " + first target`. `limit`: at most this many pairs
/// (per subtask for a generation task).
pub fn finetune_pairs(task: &str, limit: Option<usize>) -> Result<Vec<(String, String)>> {
    if limit == Some(0) {
        return Err(MasaError::Invalid("--limit 0: fine-tuning on no examples; give a positive number, or leave it out for all".into()));
    }
    let spec = data::find_task(task)?;
    match spec.kind {
        data::TaskKind::MultipleChoice => {
            data::check_available(spec)?;
            let rows = data::load_rows(spec)?;
            rows.iter()
                .enumerate()
                .filter(|(i, _)| TaskSplit::Train.keeps(spec.name, *i))
                .take(limit.unwrap_or(usize::MAX))
                .map(|(i, r)| {
                    let item = multiple_choice::build_item(spec.name, r, i)?;
                    let ctx = item.contexts.get(item.gold).or(item.contexts.first()).cloned().unwrap_or_default();
                    Ok((ctx, item.continuations[item.gold].clone()))
                })
                .collect()
        }
        data::TaskKind::Generation => {
            let dir = data::task_path(spec);
            let subs = data::read_generation_subtasks(&dir)?;
            let mut out = Vec::new();
            for s in &subs {
                let train = s.examples.iter().enumerate().filter(|(i, _)| TaskSplit::Train.keeps(&s.name, *i));
                for (_, (input, targets)) in train.take(limit.unwrap_or(usize::MAX)) {
                    if let Some(t) = targets.first() {
                        out.push((generation::instruction_prompt(&s.definition, input), format!(" {}", t.trim())));
                    }
                }
            }
            Ok(out)
        }
        data::TaskKind::Perplexity => Err(MasaError::Invalid(format!("`{task}` is not a fine-tuning task (it measures perplexity)"))),
    }
}
