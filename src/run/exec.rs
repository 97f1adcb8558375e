//! Stage execution: each stage of a [`Plan`] as one call of the library function its
//! subcommand calls, its result kept in the artifact store ([`crate::run::store`]) under the
//! key of its inputs and complete options, so a rerun reads the record instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::align::RankSpec;
use crate::error::IoContext;
use crate::extract::{ExtractOptions, Genes, MinibatchOptions};
use crate::init::{InitRequest, Strategy};
use crate::run::plan::{CalibrationJob, ExtractionJob, Plan, TrainingJob, ALL, SECONDS_PER_GENE, SOURCE_TOKENS_PER_S};
use crate::run::results::*;
use crate::run::spec::{Engine, ExtractionMode, Spec, TaskSpec};
use crate::run::store::{self, read_record, write_record, Stage};
use crate::source::SourceModel;
use crate::student::StudentConfig;
use crate::{MasaError, Result};

/// A file in the store and the key of the stage that wrote it.
type Keyed = (PathBuf, String);

/// One `masa run` invocation: the spec, the opened source, the store, and the results so far.
pub(crate) struct Ctx<'a> {
    spec: &'a Spec,
    store: PathBuf,
    source_path: PathBuf,
    pub(crate) source: SourceModel,
    source_hash: String,
    corpus: Vec<PathBuf>,
    corpus_key: String,
    pub(crate) results: RunResults,
    results_path: PathBuf,
    /// Statistics by calibration label.
    stats: BTreeMap<String, Keyed>,
    /// Gene files by extraction label.
    genes: BTreeMap<String, Keyed>,
    pub(crate) overall: indicatif::ProgressBar,
    /// Earlier invocations (from an existing results.json) and this one's computed stages.
    history: Vec<Invocation>,
    computed: usize,
    t0: Instant,
}

/// What a finished pre-training leaves in its record.
#[derive(Serialize, Deserialize)]
struct TrainRecord {
    checkpoint: PathBuf,
    seconds: f64,
    tokens_per_s: f64,
}

/// The spec's calibration of one calibration job: the calibration stage runs it, minibatch
/// extraction replays its token stream. `device`: where the pass runs.
fn calibrate_options(spec: &Spec, job: &CalibrationJob, device: crate::engine::Device) -> crate::calibrate::CalibrateOptions {
    let c = &spec.calibration;
    let domains = job.domains.clone();
    crate::calibrate::CalibrateOptions {
        tokens: c.tokens,
        seq_len: c.seq_len,
        batch: c.batch,
        seed: c.seed,
        domains,
        rank: None,
        layers: None,
        shard: None,
        experts: None,
        device,
    }
}

/// Everything the fine-tune + evaluation stage of one task is given, as its key sees it.
#[derive(Serialize)]
struct DownstreamOptions<'o> {
    task: &'o TaskSpec,
    finetune: &'o crate::finetune::FinetuneOptions,
    eval: &'o crate::eval::EvalOptions,
}

impl<'a> Ctx<'a> {
    /// Resolve and open the source, fetch what the spec needs, start the results.
    pub(crate) fn open(spec: &'a Spec, root: &Path, out: &Path) -> Result<Ctx<'a>> {
        let source_path = crate::fetch::resolve_model(&spec.source)?;
        let source = SourceModel::open(&source_path)?;
        // The ranges that depend on the source (`[calibration]` seq_len against its positions),
        // checked before anything is fetched or computed.
        let all_domains = CalibrationJob { label: String::new(), domains: None };
        calibrate_options(spec, &all_domains, Default::default())
            .check(source.weights.config.max_position_embeddings)
            .map_err(|e| MasaError::Invalid(format!("spec `{}`: [calibration]: {e}", spec.name)))?;
        if spec.corpus.iter().any(|c| c == "default") {
            crate::corpus::fetch_default_corpus(true)?;
        }
        // The evaluation data of the spec's tasks and nothing else, before any compute.
        let missing: Vec<&str> = spec
            .finetune
            .tasks
            .iter()
            .map(|t| t.name.as_str())
            .filter(|t| crate::eval::data::find_task(t).and_then(crate::eval::data::check_available).is_err())
            .collect();
        if !missing.is_empty() {
            crate::eval::data::fetch_tasks(&missing)?;
        }
        let source_hash = source.fingerprint()?;
        let corpus = spec.corpus_paths();
        // The corpus by its content (documents, domains, splits), not by its paths.
        let corpus_key = store::hash("corpus", &json!(crate::corpus::load_corpus(&corpus)?.content_hash()));
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
        let history = earlier_invocations(out, &results.spec)?;
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
            history,
            computed: 0,
            t0: Instant::now(),
        })
    }

    /// Write results.json, with this invocation appended to the history.
    pub(crate) fn save(&mut self) -> Result<()> {
        self.results.wall_seconds = self.t0.elapsed().as_secs_f64();
        let now = Invocation {
            started_unix: self.results.started_unix,
            wall_seconds: self.results.wall_seconds,
            stages_computed: self.computed,
            complete: self.results.complete,
        };
        self.results.invocations = self.history.iter().cloned().chain([now]).collect();
        self.results.save(&self.results_path)
    }

    pub(crate) fn advance(&self, seconds: f64, what: &str) {
        self.overall.inc(seconds.max(0.0) as u64);
        self.overall.set_message(what.to_string());
    }

    /// One pass of the source over the corpus: second moments per FFN input site.
    pub(crate) fn calibration(&mut self, job: &CalibrationJob) -> Result<()> {
        let c = &self.spec.calibration;
        // On the spec's device where the GPU engine can run the source (plain Llama), else the CPU.
        let plain = crate::student::plain_llama(&self.source.weights.config).is_some();
        let opts = calibrate_options(self.spec, job, if plain { self.spec.device } else { Default::default() });
        let k = Stage::Calibrate.key(json!({"source": self.source_hash, "corpus": self.corpus_key}), &opts)?;
        let dir = Stage::Calibrate.dir(&self.store, &k);
        let path = dir.join("stats.safetensors");
        self.overall.set_message(format!("calibrating {} ({} tokens)", job.label, c.tokens));
        let info = match read_record::<CalibrationInfo>(&dir) {
            Some(info) => info,
            None => {
                std::fs::create_dir_all(&dir).at(&dir)?;
                self.computed += 1;
                let corpus = crate::corpus::load_corpus(&self.corpus)?;
                let t0 = Instant::now();
                let stats = crate::calibrate::calibrate_on_corpus(
                    &self.source,
                    &corpus,
                    &self.corpus.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
                    &opts,
                )?;
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

    /// Gene matrices for the mapped layers: exact mode (closed form, then L-BFGS on L_align) or
    /// the paper's minibatch mode, as `extraction.mode` says.
    pub(crate) fn extraction(&mut self, job: &ExtractionJob, plan: &Plan) -> Result<()> {
        let layers = &plan.layers;
        let e = &self.spec.extraction;
        let cal = plan
            .calibrations
            .iter()
            .find(|c| c.label == job.calibration)
            .ok_or_else(|| MasaError::Invalid(format!("no calibration `{}`", job.calibration)))?;
        let (stats_path, stats_key) =
            self.stats.get(&job.calibration).cloned().ok_or_else(|| MasaError::Invalid(format!("no calibration `{}`", job.calibration)))?;
        let opts = ExtractOptions {
            rank: RankSpec::Ratio(job.ratio),
            lambda: job.lambda,
            max_iter: e.max_iter,
            layers: Some(layers.to_vec()),
            experts: e.experts,
            routed_with_shared: e.routed_with_shared,
            ..Default::default()
        };
        // Minibatch mode replays the calibration stream the statistics came from.
        let minibatch = (e.mode == ExtractionMode::Minibatch).then(|| {
            let copts = calibrate_options(self.spec, cal, Default::default());
            let mb = MinibatchOptions { epochs: e.epochs, lr: e.lr, init_std: crate::extract::MINIBATCH_INIT_STD, seed: copts.seed };
            (copts, mb)
        });
        let k = match &minibatch {
            None => Stage::Extract.key(json!({"stats": stats_key}), &opts)?,
            Some((_, mb)) => Stage::Extract.key(json!({"stats": stats_key, "minibatch": mb}), &opts)?,
        };
        let dir = Stage::Extract.dir(&self.store, &k);
        let path = dir.join("genes.safetensors");
        self.overall.set_message(format!("extracting genes {}", job.label));
        let info = match read_record::<ExtractionInfo>(&dir) {
            Some(info) => info,
            None => {
                std::fs::create_dir_all(&dir).at(&dir)?;
                self.computed += 1;
                let stats = crate::stats::Stats::load(&stats_path)?;
                let n = crate::extract::select_matrices(&self.source.weights, &stats, &opts)?.matrices.len();
                let t0 = Instant::now();
                let genes = match &minibatch {
                    None => {
                        let bar = crate::progress::count_bar(n as u64, "extracting", "matrices");
                        let genes = crate::extract::extract(&self.source.weights, &self.source_hash, &stats, &opts, &|_| bar.inc(1))?;
                        bar.finish_and_clear();
                        genes
                    }
                    Some((copts, mb)) => {
                        let corpus = crate::corpus::load_corpus(&self.corpus)?;
                        let bar = crate::progress::count_bar(mb.epochs as u64, "aligning (minibatch)", "epochs");
                        let (genes, _) = crate::extract::extract_minibatch_on_corpus(
                            &self.source,
                            &self.source_hash,
                            &stats,
                            &opts,
                            mb,
                            &corpus,
                            copts,
                            &mut |_| bar.inc(1),
                        )?;
                        bar.finish_and_clear();
                        genes
                    }
                };
                genes.save(&path)?;
                let ms = &genes.meta.matrices;
                let (median_rel_l_out, mean_l_spec_per_r_start, mean_l_spec_per_r) = genes.meta.summary();
                let info = ExtractionInfo {
                    label: job.label.clone(),
                    calibration: job.calibration.clone(),
                    ratio: Some(job.ratio),
                    rank: ms.first().map(|m| m.r).unwrap_or(0),
                    lambda: job.lambda,
                    mode: minibatch.as_ref().map_or("exact".into(), |(_, mb)| format!("minibatch, {} epochs, lr {}", mb.epochs, mb.lr)),
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
    pub(crate) fn spectra(&mut self, plan: &Plan) -> Result<()> {
        let Some(main) = plan.extractions.first() else { return Ok(()) };
        let (genes_path, _) = self.genes[&main.label].clone();
        let cache = genes_path.with_file_name("spectra.json");
        let layers = self.spec.extraction.spectra_layers_for(&plan.layers);
        if let Some(l) = layers.iter().find(|l| !plan.layers.contains(l)) {
            return Err(MasaError::Invalid(format!(
                "field `extraction.spectra_layers`: layer {l} has no gene (extracted layers: {:?})",
                plan.layers
            )));
        }
        let cached: Option<Vec<Spectrum>> = std::fs::read_to_string(&cache).ok().and_then(|t| serde_json::from_str(&t).ok());
        let spectra = match cached
            .filter(|s| s.iter().map(|x| x.layer).collect::<std::collections::BTreeSet<_>>() == layers.iter().copied().collect())
        {
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
    pub(crate) fn job(&mut self, j: &TrainingJob) -> Result<()> {
        let what = format!("{} {} seed {} ({} tokens)", j.student, j.strategy, j.seed, j.budget);
        let (init_key, init_model, params) = self.init(j, &what)?;
        let (train_key, train_dir, rec) = self.pretrain(j, &init_key, &init_model, &what)?;
        let mut run = TrainingRun {
            student: j.student.clone(),
            student_parameters: params,
            strategy: j.strategy.clone(),
            group: j.group.name().into(),
            label: j.label.clone(),
            ratio: j.ratio,
            seed: j.seed,
            budget_tokens: j.budget,
            curve: read_curve(&train_dir.join("metrics.jsonl"))?,
            train_seconds: rec.seconds,
            train_tokens_per_s: rec.tokens_per_s,
            downstream: BTreeMap::new(),
            done: vec!["init".into(), "train".into()],
            checkpoint: rec.checkpoint.display().to_string(),
            engine: j.engine.name().into(),
        };
        for task in &self.spec.finetune.tasks {
            let score = self.downstream(&rec.checkpoint, &train_key, task, j.seed, &what)?;
            run.downstream.insert(task.name.clone(), score);
            run.done.push(format!("eval:{}", task.name));
        }
        self.results.trainings.push(run);
        Ok(())
    }

    /// `masa init` of a job's student; returns the stage key, the model directory and the
    /// student's parameter count.
    fn init(&mut self, j: &TrainingJob, what: &str) -> Result<(String, PathBuf, u64)> {
        let student = StudentConfig::from_spec(&j.student)?;
        let genes = j.genes.as_ref().map(|g| self.genes[g].clone());
        let stats = matches!(j.init.strategy, Strategy::Prune | Strategy::Eep).then(|| self.stats[ALL].clone());
        let mut inputs = json!({"source": self.source_hash, "student": student, "genes": genes.as_ref().map(|g| &g.1), "stats": stats.as_ref().map(|s| &s.1)});
        if j.init.strategy == Strategy::Eep {
            inputs["corpus"] = json!(self.corpus_key); // EEP's fitness reads it
        }
        let k = Stage::Init.key(inputs, &j.init.resolved())?;
        let dir = Stage::Init.dir(&self.store, &k);
        let model = dir.join("model");
        if read_record::<serde_json::Value>(&dir).is_none() {
            self.computed += 1;
            self.overall.set_message(format!("init {what}"));
            let cfg = crate::init::run(&InitRequest {
                student: j.student.clone(),
                out: model.clone(),
                source: self.source_path.clone(),
                genes: genes.map(|g| g.0),
                stats: stats.map(|s| s.0),
                corpus: self.corpus.clone(),
                options: j.init.clone(),
            })?;
            write_record(&dir, &json!({"parameters": cfg.num_parameters()}))?;
        }
        let params = read_record::<serde_json::Value>(&dir).and_then(|v| v["parameters"].as_u64()).unwrap_or(0);
        Ok((k, model, params))
    }

    /// Pre-training (with distillation for `distill` jobs) on the job's engine; returns the stage key, its
    /// directory and its record.
    fn pretrain(&mut self, j: &TrainingJob, init_key: &str, init_model: &Path, what: &str) -> Result<(String, PathBuf, TrainRecord)> {
        let spec = self.spec;
        let p = &spec.pretrain;
        let steps = j.budget.div_ceil((p.batch * p.seq_len * p.grad_accum) as u64) as usize;
        let mut opts = crate::train::TrainOptions {
            corpus: self.corpus.clone(),
            ckpt_every: (steps / 4).max(25),
            progress: true,
            distill: j.distill.then(|| crate::distill::DistillOptions {
                teacher: self.source_path.clone(),
                alpha: spec.distill.alpha,
                temperature: spec.distill.temperature,
                top_k: spec.distill.top_k,
                cache_dir: Some(self.store.join("teacher-cache")),
            }),
            device: spec.device,
            precision: spec.precision,
            ..p.train_options(j.budget, j.seed)
        };
        let k = match j.engine {
            Engine::Masa => Stage::Train.key(json!({"init": init_key, "corpus": self.corpus_key}), &opts)?,
            Engine::Torchrun => {
                let engine = crate::run::torchrun::cache_identity(&p.torchrun);
                Stage::Train.key(json!({"init": init_key, "corpus": self.corpus_key, "engine": engine}), &opts)?
            }
        };
        let dir = Stage::Train.dir(&self.store, &k);
        let rec = match read_record::<TrainRecord>(&dir) {
            // The checkpoint as a path inside this store, wherever the store is now.
            Some(r) => TrainRecord { checkpoint: dir.join(r.checkpoint.file_name().unwrap_or_default()), ..r },
            None => {
                self.computed += 1;
                self.overall.set_message(format!("pre-train {what}"));
                let t0 = Instant::now();
                let checkpoint = match j.engine {
                    Engine::Masa => {
                        opts.out = dir.clone();
                        opts.resume = crate::train::resolve_checkpoint(&dir).ok().map(|_| dir.clone());
                        if opts.resume.is_none() {
                            // The store's own stage, killed before its first checkpoint: its
                            // metrics cannot be continued, so the stage starts over.
                            let _ = std::fs::remove_file(dir.join("metrics.jsonl"));
                        }
                        crate::train::train(init_model, &opts)?.checkpoint
                    }
                    Engine::Torchrun => crate::run::torchrun::pretrain(&p.torchrun, init_model, &opts, &dir)?,
                };
                let secs = t0.elapsed().as_secs_f64();
                let r = TrainRecord { checkpoint, seconds: secs, tokens_per_s: curve_rate(&dir.join("metrics.jsonl")) };
                write_record(&dir, &r)?;
                r
            }
        };
        Ok((k, dir, rec))
    }

    /// Fine-tune a pre-trained checkpoint on one task, evaluate it on the task's test items.
    fn downstream(&mut self, checkpoint: &Path, train_key: &str, task: &TaskSpec, seed: u64, what: &str) -> Result<TaskScore> {
        let f = &self.spec.finetune;
        let (epochs, lr) = f.epochs_lr(task)?;
        let mut ft = crate::finetune::FinetuneOptions {
            epochs,
            batch: f.batch,
            lr,
            max_len: f.max_len,
            seed,
            progress: true,
            device: self.spec.device,
            precision: self.spec.precision,
            ..Default::default()
        };
        let eval = crate::eval::EvalOptions {
            limit: crate::eval::Limit::First(task.eval_limit),
            gen: crate::eval::generation::GenOptions { max_new_tokens: f.max_new_tokens, ..Default::default() },
            device: self.spec.device,
            ..Default::default()
        };
        let k = Stage::Finetune.key(
            json!({"train": train_key, "eval_format": crate::eval::PROMPT_FORMAT_VERSION}),
            &DownstreamOptions { task, finetune: &ft, eval: &eval },
        )?;
        let dir = Stage::Finetune.dir(&self.store, &k);
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
        ft.out = dir.join("sft");
        let s = crate::finetune::finetune(checkpoint, &examples, &ft)?;
        let v = crate::eval::evaluate_path(&s.checkpoint, &s.checkpoint.display().to_string(), &[task.name.as_str()], &eval)?;
        crate::home::write_atomic(
            &dir.join("eval.json"),
            serde_json::to_string_pretty(&v).map_err(|e| MasaError::Invalid(e.to_string()))?.as_bytes(),
        )?;
        let score = task_score(&v["tasks"][task.name.as_str()], examples.len());
        write_record(&dir, &score)?;
        Ok(score)
    }
}

/// The invocations of this spec recorded in `out/results.json`. Results of another spec with
/// the same name (or of this spec before an edit) are never overwritten: their results, report
/// and plots move to `out/superseded-<unix seconds>/`, and the history starts again.
fn earlier_invocations(out: &Path, spec: &serde_json::Value) -> Result<Vec<crate::run::results::Invocation>> {
    let path = out.join("results.json");
    let Ok(earlier) = RunResults::load(&path) else { return Ok(Vec::new()) };
    if earlier.spec == *spec {
        return Ok(earlier.invocations);
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let aside = out.join(format!("superseded-{secs}"));
    std::fs::create_dir_all(&aside).at(&aside)?;
    for name in ["results.json", "report.md", "report.html", "plots"] {
        let from = out.join(name);
        if from.exists() {
            std::fs::rename(&from, aside.join(name)).at(&from)?;
        }
    }
    eprintln!(
        "note: {} held the results of a different spec named `{}` (or of this one before an edit); they are kept in {}",
        out.display(),
        earlier.name,
        aside.display()
    );
    Ok(Vec::new())
}
