//! `masa train`: pre-training (optionally with distillation) of a Llama student from an HF
//! checkpoint directory. [`train`] is the whole loop, top to bottom: data, schedule, the
//! optimizer step ([`crate::engine::optimizer_step`]: forward, loss, backward, clip, AdamW),
//! eval, checkpoint. The step runs on the CPU engine ([`crate::student::llama`], [`crate::student::kernels`],
//! [`crate::student::optim`]) or, with `--device cuda`, on the GPU engine ([`crate::cuda`]).
//!
//! Output directory: `metrics.jsonl` (one line per step, plus validation lines),
//! `step-XXXXXXXX/` checkpoints (HF-format directories as `masa init` writes, with
//! `optimizer.safetensors` and `masa_trainer_state.json` beside the weights), and `latest`, a file
//! naming the newest complete checkpoint. A checkpoint is written under a temporary name and
//! renamed when complete, and `latest` is replaced atomically after that, so a run killed at
//! any moment (SIGKILL included) resumes from a complete checkpoint with `--resume`, and
//! continues exactly: same data position, same optimizer state, same losses.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device as CpuDevice, Tensor};
use serde::{Deserialize, Serialize};

use crate::corpus::{self, ChunkSampler, SamplerState, Split, TokenSplit};
use crate::distill::DistillOptions;
use crate::engine::{self, AdamConfig, Device, Diverged, Engine, MicroBatch, Precision};
use crate::error::{IoContext, MasaError, Result};
use crate::home::write_atomic;
use crate::source::tokenizer::Tokenizer;
use crate::source::SourceModel;
use crate::student::kernels::Teacher;
use crate::student::optim;
use crate::student::{load_params, save_student, student_config_of, StudentConfig};

/// Options of `masa train` (defaults: the paper's pre-training recipe, CPU-sized batch).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainOptions {
    pub corpus: Vec<PathBuf>,
    pub out: PathBuf,
    /// Training tokens (inputs), rounded up to whole optimizer steps.
    pub tokens: u64,
    pub batch: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    /// Peak learning rate (paper: 4e-4).
    pub lr: f64,
    /// Final learning rate of the cosine decay, as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Max global gradient norm (0: no clipping).
    pub clip: f64,
    /// Seed of the data order.
    pub seed: u64,
    /// Validate every this many steps (0: only at the start and the end).
    pub eval_every: usize,
    /// Validation sequences per domain.
    pub eval_seqs: usize,
    /// Checkpoint every this many steps (and at the end).
    pub ckpt_every: usize,
    /// Resume from a checkpoint directory or a run directory (its `latest` checkpoint).
    pub resume: Option<PathBuf>,
    pub progress: bool,
    pub distill: Option<DistillOptions>,
    /// Where to train (`cpu`, `cuda[:N]`); left out of records when `cpu`.
    #[serde(default, skip_serializing_if = "Device::is_cpu")]
    pub device: Device,
    /// Matrix-product precision (`bf16` on CUDA only); left out of records when `f32`.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            corpus: vec![],
            out: PathBuf::from("runs/train"),
            tokens: 1_000_000,
            batch: 8,
            seq_len: 128,
            grad_accum: 1,
            lr: 4e-4,
            min_lr_ratio: 0.1,
            warmup: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            clip: 1.0,
            seed: 0,
            eval_every: 100,
            eval_seqs: 16,
            ckpt_every: 200,
            resume: None,
            progress: true,
            distill: None,
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }
}

/// What is saved beside the weights to resume exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub tokens: u64,
    pub total_steps: usize,
    pub adam_t: u64,
    /// Where the training-data sampler is ([`crate::corpus::ChunkSampler`]).
    pub sampler: SamplerState,
    /// Options that fix the data order and batch shape; a resumed run must match them.
    pub batch: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub seed: u64,
    pub corpus: Vec<PathBuf>,
    /// The optimizer and schedule settings ([`Hyper`]); `None` in checkpoints written before
    /// 2026-12-08.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyper: Option<Hyper>,
    /// The model directory the run started from (canonical); `None` in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
}

/// The settings a resumed run must keep besides the data order: learning-rate schedule and
/// AdamW, as the run was started with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub clip: f64,
}

impl Hyper {
    fn of(o: &TrainOptions) -> Hyper {
        Hyper {
            lr: o.lr,
            min_lr_ratio: o.min_lr_ratio,
            warmup: o.warmup,
            weight_decay: o.weight_decay,
            beta1: o.beta1,
            beta2: o.beta2,
            adam_eps: o.adam_eps,
            clip: o.clip,
        }
    }
}

/// One `metrics.jsonl` line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetricsLine {
    pub step: usize,
    pub tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val: Option<BTreeMap<String, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_mean: Option<f64>,
}

/// Result of a finished run.
#[derive(Debug)]
pub struct TrainSummary {
    pub steps: usize,
    pub tokens: u64,
    pub final_loss: f64,
    pub final_val: BTreeMap<String, f64>,
    pub checkpoint: PathBuf,
}

/// The ranges of `masa train`'s options ([`crate::limits`]); the model-dependent ones (positions)
/// are checked once the student is open.
pub fn check_options(o: &TrainOptions) -> Result<()> {
    use crate::limits::{count, fraction, in_range, non_negative, positive, MAX_BATCH, MAX_TOKENS};
    positive("--lr", o.lr)?;
    count("--batch", o.batch, MAX_BATCH, "")?;
    count("--grad-accum", o.grad_accum, MAX_BATCH, "")?;
    // Two tokens at least: one input, one target. The model's positions bound it in `train`.
    in_range("--seq", o.seq_len as u64, 2..=u32::MAX as u64, "")?;
    in_range("--tokens", o.tokens, 1..=MAX_TOKENS, "")?;
    fraction("--min-lr-ratio", o.min_lr_ratio)?;
    non_negative("--weight-decay", o.weight_decay)?;
    non_negative("--clip", o.clip)?;
    if o.eval_seqs == 0 {
        return Err(MasaError::Invalid("--eval-seqs 0: validation needs at least one sequence per domain".into()));
    }
    let steps = o.tokens.div_ceil((o.batch * o.seq_len * o.grad_accum) as u64);
    in_range("--warmup", o.warmup as u64, 0..=steps, "the run's optimizer steps")?;
    if let Some(d) = &o.distill {
        fraction("--alpha", d.alpha)?;
        positive("--temperature", d.temperature)?;
        count("--top-k", d.top_k, 65_536, "")?;
    }
    Ok(())
}

/// Before a run starts in `out` (not resuming): refuse when `out` holds an earlier run's
/// checkpoints (a new run would delete them); the metrics of an earlier attempt that left no
/// checkpoint (nothing to resume) are kept beside, as `metrics.before-<unix seconds>.jsonl`.
pub fn check_fresh_out(out: &Path) -> Result<()> {
    let checkpoints: Vec<String> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name() == "latest" || is_checkpoint(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !checkpoints.is_empty() {
        return Err(MasaError::bad_file(
            out,
            format!(
                "holds an earlier training run (metrics.jsonl, {}); masa will not overwrite it: pass `--resume {}` to continue it, or train into another --out",
                checkpoints.join(", "),
                out.display()
            ),
        ));
    }
    let metrics = out.join("metrics.jsonl");
    if metrics.is_file() {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let kept = out.join(format!("metrics.before-{secs}.jsonl"));
        std::fs::rename(&metrics, &kept).at(&metrics)?;
        eprintln!("note: {} held the metrics of an earlier attempt without a checkpoint; kept as {}", out.display(), kept.display());
    }
    Ok(())
}

/// Train the student in `model_dir` (an HF Llama directory with tokenizer) on `opts.corpus`.
pub fn train(model_dir: &Path, opts: &TrainOptions) -> Result<TrainSummary> {
    check_options(opts)?;
    // One writer per output directory, and never over an earlier run unless resuming it.
    let _lock = crate::home::lock_dir(&opts.out, ".masa-train.lock", |pid| {
        format!(
            "{}: another `masa train` (process {pid}) is writing this directory; wait for it to finish, or train into another --out",
            opts.out.display()
        )
    })?;
    if opts.resume.is_none() {
        check_fresh_out(&opts.out)?;
    }
    // ---- model, tokenizer, engine with optimizer (fresh or resumed) ----
    let SourceModel { weights, tokenizer: tok } = SourceModel::open(model_dir)?;
    let cfg = student_config_of(model_dir, &weights.config)?;
    check_vocab(&cfg, &tok).map_err(|e| MasaError::bad_file(model_dir.join("config.json"), e.to_string()))?;
    crate::limits::count("--seq", opts.seq_len, cfg.max_position_embeddings, "the student's positions")?;
    let mut params = load_params(&weights, &cfg)?;
    drop(weights);
    let tokens_per_step = (opts.batch * opts.seq_len * opts.grad_accum) as u64;
    let total_steps = opts.tokens.div_ceil(tokens_per_step) as usize;
    let (b, t) = (opts.batch, opts.seq_len);
    let mut step = 0usize;
    let mut tokens_done = 0u64;
    let mut resumed = None;
    if let Some(r) = &opts.resume {
        let ck = resolve_checkpoint(r)?;
        let (st, m, v) = load_resume(&ck, &cfg, model_dir, opts, total_steps, &mut params)?;
        step = st.step;
        tokens_done = st.tokens;
        eprintln!("resuming from {} at step {step} ({tokens_done} tokens)", ck.display());
        resumed = Some((st, m, v));
    }
    let adam = AdamConfig { beta1: opts.beta1, beta2: opts.beta2, eps: opts.adam_eps, weight_decay: opts.weight_decay };
    let mut eng = engine::open(opts.device, opts.precision, &cfg, params, adam, b, t)?;
    if opts.device != Device::Cpu && opts.progress {
        eprintln!("training on {}", eng.describe());
    }
    let mut resumed_sampler = None;
    if let Some((st, m, v)) = resumed {
        eng.set_moments(m, v, st.adam_t)?;
        resumed_sampler = Some(st.sampler);
    }
    std::fs::create_dir_all(&opts.out).at(&opts.out)?;

    // ---- data: shuffled chunks of the tokenized train split, fixed validation sequences ----
    let TrainData { train_tokens, val, corpus_hash } = TrainData::open(opts, &tok)?;
    let mut sampler = ChunkSampler::new(&train_tokens, t + 1, opts.seed)?;
    if let Some(s) = &resumed_sampler {
        sampler.restore(s)?;
    }
    let mut teacher = match &opts.distill {
        Some(d) => Some(crate::distill::TeacherCache::open(
            d,
            &tok,
            &opts.corpus,
            &corpus_hash,
            opts.seed,
            b,
            t,
            opts.device,
            opts.precision,
            opts.progress,
        )?),
        None => None,
    };

    // ---- metrics: keep lines up to the resumed step ----
    let metrics_path = opts.out.join("metrics.jsonl");
    let mut metrics = open_metrics(&metrics_path, step)?;
    let mut ids = vec![0u32; opts.grad_accum * b * t];
    let mut targets = vec![0u32; opts.grad_accum * b * t];
    let weights = vec![1.0 / (b * t * opts.grad_accum) as f32; b * t];
    if step == 0 {
        let v = evaluate(eng.as_mut(), b, t, &val)?;
        write_metrics(
            &mut metrics,
            &metrics_path,
            &MetricsLine {
                step: 0,
                tokens: 0,
                loss: None,
                lr: None,
                grad_norm: None,
                tokens_per_s: None,
                val_mean: mean(&v),
                val: Some(v),
            },
        )?;
    }
    let bar = if opts.progress {
        crate::progress::count_bar(total_steps as u64 * tokens_per_step, "train", "tok")
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(tokens_done);
    let mut last_ckpt = opts.resume.as_ref().map(|r| resolve_checkpoint(r)).transpose()?;
    // The loss of the last checkpoint's parameters: the training loss of the first step after it
    // (pending until that step ran).
    let mut last_ckpt_loss: Option<f64> = None;
    let mut ckpt_loss_pending = last_ckpt.is_some();
    let mut final_loss = f64::NAN;
    let mut final_val = BTreeMap::new();

    while step < total_steps {
        let t0 = Instant::now();
        // ---- schedule ----
        let lr = optim::lr_at(step, total_steps, opts.warmup, opts.lr, opts.lr * opts.min_lr_ratio);
        // ---- data: the step's micro-batches (and the teacher's top-k for them) ----
        let mut top = Vec::with_capacity(opts.grad_accum);
        for micro in 0..opts.grad_accum {
            let seqs = sampler.next_batch(b);
            let o = micro * b * t;
            for (i, s) in seqs.iter().enumerate() {
                ids[o + i * t..o + (i + 1) * t].copy_from_slice(&s[..t]);
                targets[o + i * t..o + (i + 1) * t].copy_from_slice(&s[1..]);
            }
            if let Some(tc) = teacher.as_mut() {
                top.push(tc.batch(step * opts.grad_accum + micro, &seqs)?);
            }
        }
        let micro: Vec<MicroBatch> = (0..opts.grad_accum)
            .map(|i| MicroBatch {
                ids: &ids[i * b * t..(i + 1) * b * t],
                targets: &targets[i * b * t..(i + 1) * b * t],
                weights: &weights,
                b,
                t,
                teacher: opts.distill.as_ref().zip(top.get(i)).map(|(d, (tid, tlp))| Teacher {
                    k: d.top_k,
                    ids: tid,
                    logp: tlp,
                    alpha: d.alpha,
                    temperature: d.temperature,
                }),
            })
            .collect();
        // ---- forward, loss, backward, NaN/Inf guard, clip, AdamW ----
        let stats = match engine::optimizer_step(eng.as_mut(), &micro, opts.clip, lr)? {
            Ok(s) => s,
            Err(d) => {
                bar.abandon();
                // A checkpoint saved just before this step is what this step's loss measured.
                let ckpt_loss = if ckpt_loss_pending { Some(d.loss) } else { last_ckpt_loss };
                return Err(nan_error(step + 1, &d, last_ckpt.as_deref().map(|p| (p, ckpt_loss)), cfg.vocab_size));
            }
        };
        let (loss, gnorm) = (stats.loss, stats.grad_norm);
        if ckpt_loss_pending {
            last_ckpt_loss = Some(loss);
            ckpt_loss_pending = false;
        }
        step += 1;
        tokens_done += tokens_per_step;
        let tps = tokens_per_step as f64 / t0.elapsed().as_secs_f64();
        final_loss = loss;
        // ---- eval ----
        let eval_now = (opts.eval_every > 0 && step % opts.eval_every == 0) || step == total_steps;
        let val_losses = if eval_now { Some(evaluate(eng.as_mut(), b, t, &val)?) } else { None };
        if let Some(v) = &val_losses {
            final_val = v.clone();
        }
        write_metrics(
            &mut metrics,
            &metrics_path,
            &MetricsLine {
                step,
                tokens: tokens_done,
                loss: Some(loss),
                lr: Some(lr),
                grad_norm: Some(gnorm),
                tokens_per_s: Some(tps),
                val_mean: val_losses.as_ref().and_then(mean),
                val: val_losses,
            },
        )?;
        bar.set_position(tokens_done);
        bar.set_message(format!("step {step}/{total_steps} loss {loss:.4}"));
        // ---- checkpoint ----
        if (opts.ckpt_every > 0 && step % opts.ckpt_every == 0) || step == total_steps {
            let (m, v, adam_t) = eng.moments()?;
            let state = TrainerState {
                step,
                tokens: tokens_done,
                total_steps,
                adam_t,
                sampler: sampler.state(),
                batch: b,
                seq_len: t,
                grad_accum: opts.grad_accum,
                seed: opts.seed,
                corpus: opts.corpus.clone(),
                hyper: Some(Hyper::of(opts)),
                model: Some(model_dir.canonicalize().unwrap_or_else(|_| model_dir.to_path_buf())),
            };
            last_ckpt = Some(write_checkpoint(&opts.out, &cfg, &eng.params()?, &m, &v, &state, &tok, model_dir, opts)?);
            last_ckpt_loss = None;
            ckpt_loss_pending = true;
        }
    }
    bar.finish_and_clear();
    let checkpoint = last_ckpt.ok_or_else(|| MasaError::Invalid("no training step was run (already complete?)".into()))?;
    Ok(TrainSummary { steps: step, tokens: tokens_done, final_loss, final_val, checkpoint })
}

/// What a training run reads: the tokenized train split (cut into batches by a
/// [`ChunkSampler`] of `seq_len + 1`-token chunks seeded by `seed`) and up to `eval_seqs`
/// validation sequences of `seq_len + 1` tokens per domain.
pub struct TrainData {
    pub train_tokens: TokenSplit,
    pub val: BTreeMap<String, Vec<Vec<u32>>>,
    /// [`corpus::Corpus::content_hash`] of the corpus read (the teacher cache's key).
    pub corpus_hash: String,
}

impl TrainData {
    pub fn open(opts: &TrainOptions, tok: &Tokenizer) -> Result<TrainData> {
        let corpus = corpus::load_corpus(&opts.corpus)?;
        let train_tokens = TokenSplit::open(&corpus, Split::Train, tok, None, opts.progress)?;
        let need = opts.batch * (opts.seq_len + 1);
        if train_tokens.len() < need + opts.seq_len {
            return Err(MasaError::Invalid(format!(
                "the corpus is shorter than one batch: its train split holds {} tokens, fewer than --batch × (--seq + 1) = {need} \
                 (plus one sequence of slack for the chunk offset); use a larger corpus or a smaller --batch/--seq",
                train_tokens.len()
            )));
        }
        let encode = |s: &str| tok.encode(s, false);
        let val = corpus::validation_sequences(&corpus, Split::Valid, opts.seq_len + 1, opts.eval_seqs, &encode, tok.eos_id())?;
        if val.is_empty() {
            let domains = corpus.domains();
            return Err(MasaError::Invalid(format!(
                "no validation sequence of --seq + 1 tokens can be made from the corpus (domains {}): a domain needs at least two documents, one of which goes to the validation split, and validation documents long enough for a sequence; without them there is no validation loss: give each domain more or longer documents, or a smaller --seq",
                domains.join(", ")
            )));
        }
        Ok(TrainData { train_tokens, val, corpus_hash: corpus.content_hash() })
    }
}

/// `masa tokens`: what `masa train` with these options would read, as flat token files for
/// another trainer (`docs/training.md`, "Training elsewhere"): `train.bin`, every training
/// sequence (`seq_len + 1` tokens) in the order the trainer draws them, micro-batch after
/// micro-batch; `valid.bin`, the validation sequences, domain after domain; `manifest.json`,
/// what they hold. Token ids are uint16 when the vocabulary fits, else uint32, little endian.
pub fn export_tokens(model_dir: &Path, opts: &TrainOptions) -> Result<serde_json::Value> {
    check_options(opts)?;
    let source = crate::source::SourceModel::open(model_dir)?;
    crate::limits::count("--seq", opts.seq_len, source.weights.config.max_position_embeddings, "the student's positions")?;
    let tok = source.tokenizer;
    let TrainData { train_tokens, val, .. } = TrainData::open(opts, &tok)?;
    let (b, t) = (opts.batch, opts.seq_len);
    let wide = tok.vocab_size() > u16::MAX as usize + 1;
    let put = |buf: &mut Vec<u8>, seq: &[u32]| corpus::push_tokens(buf, seq, wide);
    std::fs::create_dir_all(&opts.out).at(&opts.out)?;
    let steps = opts.tokens.div_ceil((b * t * opts.grad_accum) as u64);
    let sequences = steps * (opts.grad_accum * b) as u64;
    let mut sampler = ChunkSampler::new(&train_tokens, t + 1, opts.seed)?;
    // Streamed to the file: a budget of many GB never sits in memory.
    let mut buf = Vec::new();
    let train_bin = opts.out.join("train.bin");
    crate::home::write_atomic_with(&train_bin, |w| {
        for _ in 0..sequences {
            buf.clear();
            put(&mut buf, &sampler.next_sequence());
            w.write_all(&buf).at(&train_bin)?;
        }
        Ok(())
    })?;
    buf.clear();
    let mut valid = Vec::new();
    let mut first = 0usize;
    for (dom, seqs) in &val {
        seqs.iter().for_each(|s| put(&mut buf, s));
        valid.push(serde_json::json!({"domain": dom, "first": first, "sequences": seqs.len()}));
        first += seqs.len();
    }
    write_atomic(&opts.out.join("valid.bin"), &buf)?;
    let manifest = serde_json::json!({
        "format": 1,
        "created_by": format!("masa {} tokens", env!("CARGO_PKG_VERSION")),
        "model": model_dir.canonicalize().unwrap_or_else(|_| model_dir.to_path_buf()),
        "tokenizer": tok.fingerprint()?,
        "tokenizer_json_sha256": crate::fetch::sha256_file(&model_dir.join("tokenizer.json")).ok(),
        "corpus": opts.corpus,
        "token_split": {
            "path": train_tokens.dir.join("tokens.bin"),
            "dtype": train_tokens.manifest.dtype,
            "tokens": train_tokens.len(),
            "sha256": train_tokens.manifest.sha256,
            "domains": train_tokens.manifest.domains,
            "documents": train_tokens.manifest.documents.len(),
        },
        "sampler": "shuffled non-overlapping chunks of seq_len + 1 tokens of the tokenized train split (EOS after each document), re-cut at a seeded offset and reshuffled every epoch",
        "seed": opts.seed,
        "dtype": if wide { "uint32" } else { "uint16" },
        "batch": b,
        "seq_len": t,
        "grad_accum": opts.grad_accum,
        "steps": steps,
        "sequence_tokens": t + 1,
        "train": {"file": "train.bin", "sequences": sequences, "order": "step-major: sequence (step * grad_accum + micro) * batch + row"},
        "valid": {"file": "valid.bin", "domains": valid},
        "drawn_per_domain": sampler.drawn_per_domain(),
    });
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| MasaError::Invalid(e.to_string()))?;
    write_atomic(&opts.out.join("manifest.json"), &text)?;
    Ok(manifest)
}

fn mean(v: &BTreeMap<String, f64>) -> Option<f64> {
    if v.is_empty() {
        None
    } else {
        Some(v.values().sum::<f64>() / v.len() as f64)
    }
}

/// The error of a diverged run, naming the last checkpoint as a place to resume from only when
/// it is good: a checkpoint whose loss (that of the first step run on it) is not finite or no
/// better than uniform guessing over the vocabulary (ln V) had already gone bad, and resuming it
/// would train a dead model.
fn nan_error(step: usize, d: &Diverged, last: Option<(&Path, Option<f64>)>, vocab: usize) -> MasaError {
    let uniform = (vocab as f64).ln();
    let advice = match last {
        None => "No checkpoint was written yet: lower --lr or raise --warmup and start again.".to_string(),
        // Within f32 rounding of ln V counts as uniform: a collapsed model's loss is ln V exactly.
        Some((p, Some(l))) if !(l < uniform * (1.0 - 1e-5)) => format!(
            "The last checkpoint, {} (loss {l:.4}, not below ln({vocab}) = {uniform:.4}: no better than uniform guessing), had already gone bad: \
             lower --lr or raise --warmup and start again rather than resume from it.",
            p.display()
        ),
        Some((p, _)) => format!("Last good checkpoint: {}. Lower --lr or raise --warmup and resume from it.", p.display()),
    };
    MasaError::Invalid(format!(
        "training diverged at step {step}: loss {}, gradient norm {} ({}); stopped without saving. {advice}",
        d.loss,
        d.grad_norm,
        d.why()
    ))
}

fn check_vocab(cfg: &StudentConfig, tok: &Tokenizer) -> Result<()> {
    if tok.vocab_size() > cfg.vocab_size {
        return Err(MasaError::Shape(format!("tokenizer has {} tokens, the student's vocabulary {}", tok.vocab_size(), cfg.vocab_size)));
    }
    // Special-token ids of the config or tokenizer beyond the embedding would index past it.
    for (what, id) in [("bos_token_id", cfg.bos_token_id.or(tok.bos_id())), ("eos_token_id", cfg.eos_token_id.or(tok.eos_id()))] {
        if let Some(id) = id.filter(|&i| i as usize >= cfg.vocab_size) {
            return Err(MasaError::Invalid(format!(
                "the student's {what} {id} is not a token of its vocabulary of {}: fix {what} in its config.json",
                cfg.vocab_size
            )));
        }
    }
    Ok(())
}

/// Mean next-token loss per validation domain (natural log), in batches of up to `bmax`
/// sequences of `t` tokens.
pub fn evaluate(eng: &mut dyn Engine, bmax: usize, t: usize, val: &BTreeMap<String, Vec<Vec<u32>>>) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let mut ids = Vec::with_capacity(bmax * t);
    let mut tg = Vec::with_capacity(bmax * t);
    for (dom, seqs) in val {
        let mut sum = 0.0;
        let mut count = 0usize;
        for chunk in seqs.chunks(bmax) {
            ids.clear();
            tg.clear();
            for s in chunk {
                ids.extend_from_slice(&s[..t]);
                tg.extend_from_slice(&s[1..t + 1]);
            }
            sum += eng.eval_loss(&ids, &tg, chunk.len(), t)?;
            count += chunk.len() * t;
        }
        if count > 0 {
            out.insert(dom.clone(), sum / count as f64);
        }
    }
    Ok(out)
}

fn open_metrics(path: &Path, keep_through: usize) -> Result<std::fs::File> {
    // Keep only lines of steps ≤ the resumed step (a killed run may have logged past its last
    // checkpoint); a fresh run starts an empty file.
    let mut kept = String::new();
    if keep_through > 0 && path.exists() {
        let text = std::fs::read_to_string(path).at(path)?;
        for line in text.lines() {
            if let Ok(m) = serde_json::from_str::<MetricsLine>(line) {
                if m.step <= keep_through {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
    }
    write_atomic(path, kept.as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path).at(path)
}

fn write_metrics(f: &mut std::fs::File, path: &Path, m: &MetricsLine) -> Result<()> {
    let mut line = serde_json::to_string(m).map_err(|e| MasaError::Invalid(e.to_string()))?;
    line.push('\n');
    f.write_all(line.as_bytes()).at(path)
}

/// Write `out/step-XXXXXXXX` (weights, optimizer, trainer state) under a temporary name,
/// rename it into place, point `out/latest` at it, and delete older checkpoints.
#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    out: &Path,
    cfg: &StudentConfig,
    params: &[f32],
    exp_avg: &[f32],
    exp_avg_sq: &[f32],
    state: &TrainerState,
    tok: &Tokenizer,
    model_dir: &Path,
    opts: &TrainOptions,
) -> Result<PathBuf> {
    let name = format!("step-{:08}", state.step);
    let tmp = out.join(format!(".{name}.tmp"));
    let provenance = serde_json::json!({
        "created_by": format!("masa {} train", env!("CARGO_PKG_VERSION")),
        "init": model_dir,
        "step": state.step,
        "tokens": state.tokens,
        "options": opts,
    });
    let written = (|| {
        save_student(&tmp, cfg, params, tok, &provenance)?;
        let st = tmp.join("optimizer.safetensors");
        let m = Tensor::from_slice(exp_avg, exp_avg.len(), &CpuDevice::Cpu)?;
        let v = Tensor::from_slice(exp_avg_sq, exp_avg_sq.len(), &CpuDevice::Cpu)?;
        let map: std::collections::HashMap<&str, Tensor> = [("exp_avg", m), ("exp_avg_sq", v)].into_iter().collect();
        candle_core::safetensors::save(&map, &st).map_err(|e| MasaError::bad_file(&st, e.to_string()))?;
        let sj = serde_json::to_vec_pretty(state).map_err(|e| MasaError::Invalid(e.to_string()))?;
        std::fs::write(tmp.join(TRAINER_STATE), sj).at(tmp.join(TRAINER_STATE))
    })();
    if let Err(e) = written {
        // Disk full, read-only: no half-written checkpoint is left behind to pile up.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&tmp);
    let dst = out.join(&name);
    if dst.exists() {
        if !is_checkpoint(&dst) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(MasaError::bad_file(&dst, format!("exists and is not a training checkpoint (no {TRAINER_STATE}); masa will not replace it: move it away or train into another --out")));
        }
        std::fs::remove_dir_all(&dst).at(&dst)?;
    }
    std::fs::rename(&tmp, &dst).at(&dst)?;
    sync_dir(out);
    write_atomic(&out.join("latest"), name.as_bytes())?;
    // Older checkpoints are no longer needed once `latest` names the new one.
    if let Ok(rd) = std::fs::read_dir(out) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("step-") && n != name && is_checkpoint(&e.path()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(dst)
}

/// The file that marks a directory as a training checkpoint masa wrote: masa's own trainer
/// state (step, tokens, sampler, schedule). Not `trainer_state.json`, HF Trainer's file name
/// with another layout, which `TrainerState.load_from_json` would fail on.
const TRAINER_STATE: &str = "masa_trainer_state.json";

/// [`TRAINER_STATE`]'s name in checkpoints written before 2026-12-08, read when resuming them.
const TRAINER_STATE_BEFORE: &str = "trainer_state.json";

/// The trainer-state file of checkpoint `dir`, under either name.
fn trainer_state_file(dir: &Path) -> Option<PathBuf> {
    [TRAINER_STATE, TRAINER_STATE_BEFORE].iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

/// Whether `dir` is a training checkpoint (holds [`TRAINER_STATE`]): only those are replaced
/// or deleted when a newer one is written; a user's `step-…` directory is left alone.
fn is_checkpoint(dir: &Path) -> bool {
    trainer_state_file(dir).is_some()
}

fn sync_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_file() {
                if let Ok(f) = std::fs::File::open(e.path()) {
                    let _ = f.sync_all();
                }
            }
        }
    }
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// A checkpoint directory, or a run directory whose `latest` names one.
pub fn resolve_checkpoint(p: &Path) -> Result<PathBuf> {
    if is_checkpoint(p) {
        return Ok(p.to_path_buf());
    }
    if let Some(ck) = crate::home::latest_in(p)? {
        if is_checkpoint(&ck) {
            return Ok(ck);
        }
        return Err(MasaError::bad_file(p.join("latest"), format!("names `{}`, which is not a complete checkpoint", ck.display())));
    }
    Err(MasaError::bad_file(
        p,
        "not a training checkpoint (no masa_trainer_state.json) and not a run directory (no `latest` file); \
         pass the --out directory of an earlier `masa train` or one of its step-* checkpoints",
    ))
}

/// Load weights (into `params`), trainer state and AdamW moments from `ck`, checking that the
/// checkpoint fits the model and the options (the data order and the LR schedule included).
fn load_resume(
    ck: &Path,
    cfg: &StudentConfig,
    model_dir: &Path,
    opts: &TrainOptions,
    total_steps: usize,
    params: &mut Vec<f32>,
) -> Result<(TrainerState, Vec<f32>, Vec<f32>)> {
    let src = SourceModel::open(ck)?;
    let ck_cfg = student_config_of(ck, &src.weights.config)?;
    let shape = |c: &StudentConfig| {
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size,
            c.tie_word_embeddings,
        )
    };
    if shape(&ck_cfg) != shape(cfg) {
        return Err(MasaError::bad_file(
            ck,
            format!(
                "checkpoint is for another model shape: (hidden, ffn, layers, heads, kv heads, vocab, tied) = {:?}, \
                 but {} has {:?}; resume with the model directory the run started from",
                shape(&ck_cfg),
                model_dir.display(),
                shape(cfg)
            ),
        ));
    }
    *params = load_params(&src.weights, cfg)?;
    let sp = trainer_state_file(ck).unwrap_or_else(|| ck.join(TRAINER_STATE));
    let text = std::fs::read_to_string(&sp).at(&sp)?;
    let st: TrainerState = serde_json::from_str(&text).map_err(|e| {
        let why = if text.contains("\"stream\"") {
            "it was written by an earlier masa, whose contiguous document stream cannot be continued by today's chunk sampler; start the run afresh".to_string()
        } else {
            format!("invalid trainer state: {e}")
        };
        MasaError::bad_file(&sp, why)
    })?;
    let mut diffs = Vec::new();
    if st.batch != opts.batch {
        diffs.push(format!("--batch {} (checkpoint {})", opts.batch, st.batch));
    }
    if st.seq_len != opts.seq_len {
        diffs.push(format!("--seq {} (checkpoint {})", opts.seq_len, st.seq_len));
    }
    if st.grad_accum != opts.grad_accum {
        diffs.push(format!("--grad-accum {} (checkpoint {})", opts.grad_accum, st.grad_accum));
    }
    if st.seed != opts.seed {
        diffs.push(format!("--seed {} (checkpoint {})", opts.seed, st.seed));
    }
    if st.total_steps != total_steps {
        diffs.push(format!(
            "--tokens {} gives {total_steps} steps (checkpoint: {} steps; the learning-rate schedule depends on it)",
            opts.tokens, st.total_steps
        ));
    }
    if st.corpus != opts.corpus {
        let show = |c: &[PathBuf]| c.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        diffs.push(format!("--corpus {} (checkpoint {})", show(&opts.corpus), show(&st.corpus)));
    }
    if let Some(h) = &st.hyper {
        let now = Hyper::of(opts);
        let (a, b) = (serde_json::to_value(h).unwrap_or_default(), serde_json::to_value(&now).unwrap_or_default());
        for (k, v) in a.as_object().into_iter().flatten() {
            if b.get(k) != Some(v) {
                diffs.push(format!("--{} {} (checkpoint {v})", k.replace('_', "-"), b.get(k).cloned().unwrap_or_default()));
            }
        }
    }
    // The run continues the weights of the checkpoint; starting it from another model is another run.
    if let Some(m) = &st.model {
        let given = model_dir.canonicalize().unwrap_or_else(|_| model_dir.to_path_buf());
        if *m != given && !given.starts_with(ck.parent().unwrap_or(ck)) {
            diffs.push(format!("model {} (checkpoint: started from {})", given.display(), m.display()));
        }
    }
    if !diffs.is_empty() {
        return Err(MasaError::bad_file(&sp, format!("options differ from the checkpointed run: {}", diffs.join(", "))));
    }
    let op = ck.join("optimizer.safetensors");
    let t = candle_core::safetensors::load(&op, &CpuDevice::Cpu).map_err(|e| MasaError::bad_file(&op, e.to_string()))?;
    let get = |k: &str| -> Result<Vec<f32>> {
        let v = t.get(k).ok_or_else(|| MasaError::bad_file(&op, format!("missing `{k}`")))?.to_vec1::<f32>()?;
        if v.len() != params.len() {
            return Err(MasaError::bad_file(&op, format!("`{k}` has {} values for {} parameters", v.len(), params.len())));
        }
        Ok(v)
    };
    let (m, v) = (get("exp_avg")?, get("exp_avg_sq")?);
    Ok((st, m, v))
}
