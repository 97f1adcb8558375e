//! `masa bench`: throughput measurements run side by side with the PyTorch scripts in
//! `scripts/` (same shapes, same thread count).

use std::time::Instant;

#[cfg(feature = "cuda")]
pub mod cuda_check;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::engine::{Device as EngineDevice, Precision};
use crate::error::Result;
use crate::source::model::{NoHooks, Transformer};

#[derive(Serialize)]
pub struct ForwardBench {
    /// `fused` (the training engine's kernels) or `candle`.
    pub path: &'static str,
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
    pub iters: usize,
    pub seconds: Vec<f64>,
    pub tokens_per_s: f64,
    pub peak_rss_mb: f64,
}

/// The ranges of a benchmark's options: batch and sequence length (within the model's
/// positions), warm-up and measured iterations (`(option, value)`: `--iters` or `--steps`).
fn check_loop(batch: usize, seq: usize, positions: usize, warmup: usize, measured: (&str, usize)) -> Result<()> {
    use crate::limits::{count, in_range, MAX_BATCH, MAX_STEPS};
    count("--batch", batch, MAX_BATCH, "")?;
    count("--seq", seq, positions, "the model's positions")?;
    in_range("--warmup", warmup as u64, 0..=MAX_STEPS as u64, "")?;
    count(measured.0, measured.1, MAX_STEPS, "")
}

/// Median tokens/s of full forward passes (logits included) over random token ids.
pub fn forward(model: &Transformer, batch: usize, seq: usize, warmup: usize, iters: usize, seed: u64) -> Result<ForwardBench> {
    check_loop(batch, seq, model.config.max_position_embeddings, warmup, ("--iters", iters))?;
    let v = model.config.vocab_size as u64;
    let mut s = seed.max(1);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % v) as u32
        })
        .collect();
    let x = Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?;
    for _ in 0..warmup {
        model.forward(&x, &mut NoHooks)?;
    }
    let mut seconds = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        let logits = model.forward(&x, &mut NoHooks)?;
        drop(logits);
        seconds.push(t0.elapsed().as_secs_f64());
    }
    let mut sorted = seconds.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    Ok(ForwardBench {
        path: if model.runs_fused() { "fused" } else { "candle" },
        batch,
        seq,
        threads: rayon::current_num_threads(),
        iters,
        seconds,
        tokens_per_s: (batch * seq) as f64 / median,
        peak_rss_mb: peak_rss_mb(),
    })
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB; 0 where unavailable.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[derive(Serialize)]
pub struct TrainBench {
    pub config: String,
    pub device: String,
    /// Device memory in use at the end (MiB; CUDA context included), on a device.
    pub device_mem_mb: Option<f64>,
    pub params: usize,
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
    pub steps: usize,
    pub seconds: Vec<f64>,
    pub losses: Vec<f64>,
    pub tokens_per_s: f64,
    pub median_s: f64,
    pub peak_rss_mb: f64,
    pub loadavg: Vec<f64>,
    pub optimizer: String,
}

/// Median tokens/s of full training steps (forward, causal-LM cross-entropy, backward, clip
/// 1.0, AdamW lr 4e-4 β 0.9/0.95 wd 0.1) on random tokens from a Scratch init, on `device`
/// (the same [`crate::engine::optimizer_step`] `masa train` runs); the same step
/// `scripts/bench_train_torch.py` times. On CUDA each timed step ends with the device idle
/// (the step reads its loss and gradient norm back).
#[allow(clippy::too_many_arguments)]
pub fn train(
    cfg_path: &std::path::Path,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    device: EngineDevice,
    precision: Precision,
) -> Result<TrainBench> {
    use crate::engine::{AdamConfig, MicroBatch};
    use crate::error::{IoContext, MasaError};
    let text = std::fs::read_to_string(cfg_path).at(cfg_path)?;
    let cfg: crate::student::StudentConfig =
        serde_json::from_str(&text).map_err(|e| MasaError::bad_file(cfg_path, format!("invalid config: {e}")))?;
    cfg.validate()?;
    if cfg.vocab_size == 0 {
        return Err(MasaError::field(cfg_path, "vocab_size", "missing or 0"));
    }
    check_loop(batch, seq, cfg.max_position_embeddings, warmup, ("--steps", steps))?;
    let params = cfg.scratch_init(seed);
    let n_params = params.len();
    let adam = AdamConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut eng = crate::engine::open(device, precision, &cfg, params, adam, batch, seq)?;
    let mut rng = crate::rng::SplitMix64(seed);
    let v = cfg.vocab_size;
    let seqs: Vec<u32> = (0..batch * (seq + 1)).map(|_| rng.below(v) as u32).collect();
    let mut ids = Vec::with_capacity(batch * seq);
    let mut tg = Vec::with_capacity(batch * seq);
    for s in seqs.chunks(seq + 1) {
        ids.extend_from_slice(&s[..seq]);
        tg.extend_from_slice(&s[1..]);
    }
    let w = vec![1.0 / (batch * seq) as f32; batch * seq];
    let (mut seconds, mut losses) = (Vec::new(), Vec::new());
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let mb = MicroBatch { ids: &ids, targets: &tg, weights: &w, b: batch, t: seq, teacher: None };
        let loss = match crate::engine::optimizer_step(eng.as_mut(), &[mb], 1.0, 4e-4)? {
            Ok(s) => s.loss,
            Err(d) => return Err(MasaError::Invalid(format!("bench step {i} diverged (loss {}, grad norm {})", d.loss, d.grad_norm))),
        };
        let dt = t0.elapsed().as_secs_f64();
        eprintln!("step {i}: {:.4}s, {:.0} tokens/s, loss {loss:.4}", dt, (batch * seq) as f64 / dt);
        if i >= warmup {
            seconds.push(dt);
            losses.push(loss);
        }
    }
    let mut sorted = seconds.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    Ok(TrainBench {
        config: cfg_path.display().to_string(),
        device: eng.describe(),
        device_mem_mb: eng.device_memory_mb(),
        params: n_params,
        batch,
        seq,
        threads: rayon::current_num_threads(),
        steps,
        seconds,
        losses,
        tokens_per_s: (batch * seq) as f64 / median,
        median_s: median,
        peak_rss_mb: peak_rss_mb(),
        loadavg,
        optimizer: "AdamW(lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1 on matrices), clip 1.0".into(),
    })
}
