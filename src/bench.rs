//! `masa bench`: throughput measurements run side by side with the PyTorch scripts in
//! `scripts/` (same shapes, same thread count).

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::Result;
use crate::model::{NoHooks, Transformer};

#[derive(Serialize)]
pub struct ForwardBench {
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
    pub iters: usize,
    pub seconds: Vec<f64>,
    pub tokens_per_s: f64,
    pub peak_rss_mb: f64,
}

/// Median tokens/s of full forward passes (logits included) over random token ids.
pub fn forward(model: &Transformer, batch: usize, seq: usize, warmup: usize, iters: usize, seed: u64) -> Result<ForwardBench> {
    let iters = iters.max(1);
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
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}
