//! `masa finetune`: supervised fine-tuning on `(prompt_ids, response_ids)` pairs with the loss
//! on the response tokens only (paper defaults: batch 8, lr 3e-5, AdamW, 3 epochs for multiple
//! choice, more for generation). The task data comes from the eval module; this loop takes
//! token-id pairs so any task can be wired to it, and the CLI reads a JSONL of text pairs.
//!
//! Each example is `prompt ++ response ++ [eos]`, cut to `max_len`, right-padded to the longest
//! in its batch (causal attention: padding never affects earlier positions). The target at
//! position i is token i+1; it counts iff that token belongs to the response (or is the EOS).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::corpus::epoch_order;
use crate::engine::{self, AdamConfig, Device, MicroBatch, Precision};
use crate::error::{IoContext, MasaError, Result};
use crate::source::SourceModel;
use crate::student::optim;
use crate::student::{load_params, save_student, student_config_of};

#[derive(Clone, Debug, serde::Serialize)]
pub struct FinetuneOptions {
    pub out: PathBuf,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub max_len: usize,
    pub seed: u64,
    pub progress: bool,
    /// Where to train (`cpu`, `cuda[:N]`); left out of records when `cpu`.
    #[serde(skip_serializing_if = "Device::is_cpu")]
    pub device: Device,
    /// Matrix-product precision; left out of records when `f32`.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        FinetuneOptions {
            out: PathBuf::from("runs/finetune"),
            epochs: 3,
            batch: 8,
            lr: 3e-5,
            warmup_ratio: 0.03,
            min_lr_ratio: 0.1,
            weight_decay: 0.1,
            clip: 1.0,
            max_len: 512,
            seed: 0,
            progress: true,
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }
}

/// One training example as token ids.
#[derive(Clone, Debug)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
}

/// Token ids, targets and loss weights of one batch, right-padded to `t`.
pub fn build_batch(examples: &[&Example], eos: Option<u32>, max_len: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>, usize) {
    let seqs: Vec<(Vec<u32>, usize)> = examples
        .iter()
        .map(|e| {
            let mut s = e.prompt.clone();
            s.extend(&e.response);
            s.extend(eos);
            s.truncate(max_len + 1);
            (s, e.prompt.len())
        })
        .collect();
    let t = seqs.iter().map(|(s, _)| s.len().saturating_sub(1)).max().unwrap_or(1).max(1);
    let b = seqs.len();
    let (mut ids, mut tg, mut w) = (vec![0u32; b * t], vec![0u32; b * t], vec![0f32; b * t]);
    for (i, (s, plen)) in seqs.iter().enumerate() {
        for p in 0..s.len().saturating_sub(1) {
            ids[i * t + p] = s[p];
            tg[i * t + p] = s[p + 1];
            if p + 1 >= *plen {
                w[i * t + p] = 1.0;
            }
        }
    }
    let n: f32 = w.iter().sum();
    if n > 0.0 {
        w.iter_mut().for_each(|x| *x /= n);
    }
    (ids, tg, w, t)
}

pub struct FinetuneSummary {
    pub steps: usize,
    pub final_loss: f64,
    pub checkpoint: PathBuf,
}

/// Fine-tune the student in `model_dir` on `examples`; writes `out/metrics.jsonl` and the
/// fine-tuned model to `out/model` (HF format).
pub fn finetune(model_dir: &Path, examples: &[Example], opts: &FinetuneOptions) -> Result<FinetuneSummary> {
    use crate::limits::{count, in_range, positive, MAX_BATCH, MAX_STEPS};
    positive("--lr", opts.lr)?;
    count("--batch", opts.batch, MAX_BATCH, "")?;
    count("--epochs", opts.epochs, MAX_STEPS, "")?;
    in_range("--max-len", opts.max_len as u64, 2..=u32::MAX as u64, "")?;
    let usable: Vec<&Example> = examples.iter().filter(|e| !e.response.is_empty() && !e.prompt.is_empty()).collect();
    if usable.is_empty() {
        return Err(MasaError::Invalid("no fine-tuning example has both a prompt and a response".into()));
    }
    let SourceModel { weights, tokenizer: tok } = SourceModel::open(model_dir)?;
    let cfg = student_config_of(model_dir, &weights.config)?;
    let params = load_params(&weights, &cfg)?;
    drop(weights);
    for e in &usable {
        if let Some(&bad) = e.prompt.iter().chain(&e.response).find(|&&x| x as usize >= cfg.vocab_size) {
            return Err(MasaError::Invalid(format!("token id {bad} is outside the student's vocabulary ({})", cfg.vocab_size)));
        }
    }
    let adam = AdamConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: opts.weight_decay };
    // The workspace grows to each batch's padded length on first use.
    let mut eng = engine::open(opts.device, opts.precision, &cfg, params, adam, opts.batch, 2)?;
    let steps_per_epoch = usable.len().div_ceil(opts.batch);
    let total = steps_per_epoch * opts.epochs;
    let warmup = (opts.warmup_ratio * total as f64).round() as usize;
    std::fs::create_dir_all(&opts.out).at(&opts.out)?;
    let mp = opts.out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&mp).at(&mp)?;
    let bar = if opts.progress { crate::progress::count_bar(total as u64, "finetune", "steps") } else { indicatif::ProgressBar::hidden() };
    let (mut step, mut final_loss) = (0, f64::NAN);
    for epoch in 0..opts.epochs {
        let order = epoch_order(usable.len(), opts.seed, epoch as u64);
        for chunk in order.chunks(opts.batch) {
            let batch: Vec<&Example> = chunk.iter().map(|&i| usable[i]).collect();
            let (ids, tg, w, t) = build_batch(&batch, tok.eos_id(), opts.max_len);
            let b = batch.len();
            let lr = optim::lr_at(step, total, warmup, opts.lr, opts.lr * opts.min_lr_ratio);
            let mb = MicroBatch { ids: &ids, targets: &tg, weights: &w, b, t, teacher: None };
            let (loss, gn) = match engine::optimizer_step(eng.as_mut(), &[mb], opts.clip, lr)? {
                Ok(s) => (s.loss, s.grad_norm),
                Err(d) => {
                    return Err(MasaError::Invalid(format!(
                        "fine-tuning diverged at step {} (loss {}, grad norm {}: {}); lower --lr",
                        step + 1,
                        d.loss,
                        d.grad_norm,
                        d.why()
                    )))
                }
            };
            step += 1;
            final_loss = loss;
            let line = serde_json::json!({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": gn});
            writeln!(metrics, "{line}").map_err(|e| MasaError::io(&mp, e))?;
            bar.inc(1);
            bar.set_message(format!("epoch {} loss {loss:.4}", epoch + 1));
        }
    }
    bar.finish_and_clear();
    let ck = opts.out.join("model");
    let prov = serde_json::json!({"created_by": format!("masa {} finetune", env!("CARGO_PKG_VERSION")), "init": model_dir, "options": opts, "examples": usable.len()});
    save_student(&ck, &cfg, &eng.params()?, &tok, &prov)?;
    Ok(FinetuneSummary { steps: step, final_loss, checkpoint: ck })
}

/// Read `{"prompt": ..., "response": ...}` lines and tokenize them with `tok` (no BOS).
pub fn read_pairs(path: &Path, tok: &crate::source::tokenizer::Tokenizer) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| MasaError::bad_file(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
        let field = |k: &str| {
            v.get(k).and_then(|x| x.as_str()).ok_or_else(|| MasaError::field(path, k, format!("line {}: missing or not a string", i + 1)))
        };
        out.push(Example { prompt: tok.encode(field("prompt")?, false)?, response: tok.encode(field("response")?, false)? });
    }
    Ok(out)
}
