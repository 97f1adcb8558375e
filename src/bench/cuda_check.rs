//! `masa bench cuda-check`: the GPU engine against independent references on fresh random
//! inputs, run on the device machine by `scripts/gpu_check.sh`.
//!
//! - Logits, loss and every parameter's gradient of one batch (plain CE and distillation) from
//!   the GPU engine in f32 and bf16 against the CPU engine in f64 on the same weights and batch;
//!   the GPU buffers are filled with NaN bytes before each run, so an element never written shows.
//! - The same GPU step twice: bit-identical gradients (no order-dependent reductions).
//! - Loss curves of `steps` optimizer steps (warmup + cosine, clip 1, AdamW) from the same init
//!   on the same learnable token stream: CPU engine f32 vs GPU f32 and GPU bf16.
//! - The distillation teacher's top-k on the device (an inference-only model, f32 and bf16)
//!   against the CPU f64 logits: log-prob error of each chosen id, the share of the true top-k
//!   probability mass the chosen ids hold, order and duplicates.
//! - Calibration: `Σ x xᵀ` of every FFN input from `calibrate_with` on the device against the
//!   CPU pass, on the same weights written as an HF checkpoint and the same batches.
//! - Generation's next-token logits after prefixes of several lengths (the padded forward that
//!   fills the KV cache) and after 20 single-token steps through the cache, against the CPU
//!   engine in f64.
//! - Multiple-choice scoring: log-likelihoods of 200 four-choice items (contexts from the token
//!   stream, the true continuation against three from elsewhere) under the model the CPU curve
//!   trained, on the device against the CPU engine in f64, and the predictions they give.
//!
//! Prints one table; returns whether every check passed.

use std::path::Path;

use crate::cuda::llama::GpuLlama;
use crate::cuda::Gpu;
use crate::engine::{self, AdamConfig, Device, MicroBatch, Precision};
use crate::error::{IoContext, MasaError, Result};
use crate::student::kernels::{Targets, Teacher};
use crate::student::llama::{Llama, Workspace};
use crate::student::StudentConfig;

/// Options of one check run.
pub struct CheckOptions<'a> {
    pub config: &'a Path,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    /// Seed of weights and data; `None`: a fresh one from the clock (printed).
    pub seed: Option<u64>,
    pub ordinal: usize,
}

struct Row {
    check: String,
    value: f64,
    limit: f64,
    /// The value must reach the limit (rather than stay under it).
    at_least: bool,
}

fn rel(got: &[f32], want: &[f64]) -> f64 {
    rel64(got.iter().map(|&g| g as f64), want)
}

fn rel64(got: impl Iterator<Item = f64>, want: &[f64]) -> f64 {
    let (mut num, mut den, mut n) = (0.0, 0.0, 0);
    for (g, &w) in got.zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g - w).powi(2);
        den += w * w;
        n += 1;
    }
    if n != want.len() {
        return f64::INFINITY;
    }
    (num / den.max(1e-300)).sqrt()
}

/// The GPU teacher's top-k `(ids, lp)` of `v`-wide rows against the f64 reference logits:
/// `(worst |lp − reference log-prob of that id|, lowest share of the reference top-k mass the
/// chosen ids hold, rows out of order or with a repeated id)`.
fn teacher_errors(ids: &[u32], lp: &[f32], k: usize, reference: &[f64], v: usize) -> (f64, f64, usize) {
    let (mut worst, mut mass, mut bad) = (0f64, 1f64, 0);
    for ((row, ids), lp) in reference.chunks_exact(v).zip(ids.chunks_exact(k)).zip(lp.chunks_exact(k)) {
        let lse = crate::student::kernels::log_sum_exp(row);
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let best: f64 = sorted[..k].iter().map(|z| (z - lse).exp()).sum();
        let mut got = 0.0;
        for (&id, &l) in ids.iter().zip(lp) {
            let Some(&z) = row.get(id as usize) else { return (f64::INFINITY, 0.0, bad + 1) };
            worst = worst.max((l as f64 - (z - lse)).abs());
            got += (z - lse).exp();
        }
        mass = mass.min(got / best);
        let distinct = ids.iter().collect::<std::collections::BTreeSet<_>>().len() == k;
        bad += usize::from(!distinct || lp.windows(2).any(|w| !(w[0] >= w[1])));
    }
    (worst, mass, bad)
}

/// Worst per-tensor relative error and its tensor.
fn worst_tensor(layout: &crate::student::llama::Layout, got: &[f32], want: &[f64]) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for (name, shape, off) in &layout.tensors {
        let n: usize = shape.iter().product();
        let e = rel(&got[*off..*off + n], &want[*off..*off + n]);
        if !(e <= worst.0) {
            worst = (e, name.clone());
        }
    }
    worst
}

/// A learnable stream: each of 512 tokens is followed by one of 4 fixed successors.
fn markov_tokens(rng: &mut crate::rng::SplitMix64, vocab: usize, len: usize) -> Vec<u32> {
    let states = 512.min(vocab);
    let table: Vec<[u32; 4]> = (0..states).map(|_| [0; 4].map(|_| rng.below(states) as u32)).collect();
    let mut out = Vec::with_capacity(len);
    let mut cur = rng.below(states) as u32;
    for _ in 0..len {
        out.push(cur);
        cur = table[cur as usize][rng.below(4)];
    }
    out
}

/// `calibrate_with` on the device and on the CPU over two random batches (the second half as
/// large), with `params` written as an HF checkpoint in a temporary directory: `(worst
/// per-site relative error, its site, sites or counts that differ)`.
fn calibration_errors(
    cfg: &StudentConfig,
    params: &[f32],
    rng: &mut crate::rng::SplitMix64,
    b: usize,
    t: usize,
    ordinal: usize,
) -> Result<(f64, String, usize)> {
    use crate::calibrate::{block_tokens, calibrate_with, PassOptions};
    let dir = std::env::temp_dir().join(format!("masa-cuda-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).at(&dir)?;
    let result = (|| {
        let cfg_path = dir.join("config.json");
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg.hf_config_json()).unwrap_or_default()).at(&cfg_path)?;
        let tensors: std::collections::HashMap<String, candle_core::Tensor> =
            crate::student::student_tensors(cfg, params)?.into_iter().collect();
        let st = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &st).map_err(|e| MasaError::bad_file(&st, e.to_string()))?;
        let w = crate::source::SourceWeights::open(&dir)?;
        let v = cfg.vocab_size;
        let batches: Vec<crate::corpus::Batch> = [b, b.div_ceil(2)]
            .into_iter()
            .map(|bb| crate::corpus::Batch {
                ids: (0..bb * t).map(|_| rng.below(v) as u32).collect(),
                batch: bb,
                seq_len: t,
                dataset: vec![0; bb],
            })
            .collect();
        let datasets = vec!["random".to_string()];
        let meta = crate::stats::StatsMeta {
            format: String::new(),
            source_hash: String::new(),
            source: dir.display().to_string(),
            arch: "llama".into(),
            corpus: vec!["random tokens".into()],
            tokens: 0,
            seq_len: t,
            seeds: vec![],
            dataset_tokens: Default::default(),
            masa_version: env!("CARGO_PKG_VERSION").into(),
            experts: None,
        };
        let pass = PassOptions { block_tokens: block_tokens(&w.config), ..Default::default() };
        let cpu = calibrate_with(&w, batches.iter().cloned().map(Ok), &datasets, meta.clone(), &pass, &mut |_| {})?;
        let gpu = calibrate_with(
            &w,
            batches.into_iter().map(Ok),
            &datasets,
            meta,
            &PassOptions { device: Device::Cuda(ordinal), ..pass },
            &mut |_| {},
        )?;
        let mut differ = usize::from(cpu.meta.tokens != gpu.meta.tokens || cpu.moments.len() != gpu.moments.len());
        let mut worst = (0.0, String::new());
        for (key, want) in &cpu.moments {
            let Some(got) = gpu.moments.get(key) else {
                differ += 1;
                continue;
            };
            differ += usize::from(got.count != want.count || got.dim != want.dim);
            let e = rel64(got.xxt.iter().copied(), &want.xxt);
            if !(e <= worst.0) {
                worst = (e, key.clone());
            }
        }
        Ok((worst.0, worst.1, differ))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Log-likelihoods of 200 four-choice items from `stream` (32-token context; its true
/// 8-token continuation and three taken from elsewhere) under `params`: GPU
/// ([`crate::eval::multiple_choice::score_pairs`]) against the CPU engine in f64.
/// `(relative error of the 800 log-likelihoods, share of items with the same prediction)`.
fn scoring_errors(
    cfg: &StudentConfig,
    params: &[f32],
    stream: &[u32],
    rng: &mut crate::rng::SplitMix64,
    ordinal: usize,
) -> Result<(f64, f64)> {
    let (items, choices, nc, nk) = (200, 4, 32, 8);
    let span = stream.len() - nc - nk;
    let mut pairs = Vec::with_capacity(items * choices);
    for _ in 0..items {
        let p = rng.below(span);
        for c in 0..choices {
            let q = if c == 0 { p } else { rng.below(span) };
            pairs.push((stream[p..p + nc].to_vec(), stream[q + nc..q + nc + nk].to_vec()));
        }
    }
    let mut g = GpuLlama::frozen(Gpu::open(ordinal, false)?, cfg, params)?;
    let got = crate::eval::multiple_choice::score_pairs(&mut g, &pairs, 0, &mut |_| {})?;
    drop(g);
    // Reference: the f64 engine's log-softmax, 50 sequences per forward pass.
    let (model, t, v) = (Llama::new(cfg), nc + nk - 1, cfg.vocab_size);
    let p64: Vec<f64> = params.iter().map(|&x| x as f64).collect();
    let mut want = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(50) {
        let ids: Vec<u32> = chunk.iter().flat_map(|(a, b)| a.iter().chain(&b[..nk - 1]).copied()).collect();
        let mut ws = Workspace::<f64>::new(cfg, chunk.len(), t);
        model.forward(&p64, &mut ws, &ids, chunk.len(), t);
        let logits = model.logits(&p64, &ws);
        for (r, (_, cont)) in chunk.iter().enumerate() {
            let mut ll = 0.0;
            for (j, &y) in cont.iter().enumerate() {
                let row = &logits[(r * t + nc - 1 + j) * v..(r * t + nc + j) * v];
                ll += row[y as usize] - crate::student::kernels::log_sum_exp(row);
            }
            want.push(ll);
        }
    }
    let pred = |lls: &[f64]| (0..choices).fold(0, |best, c| if lls[c] > lls[best] { c } else { best });
    let same = got.chunks(choices).zip(want.chunks(choices)).filter(|(a, b)| pred(a) == pred(b)).count();
    Ok((rel64(got.iter().copied(), &want), same as f64 / items as f64))
}

/// `GpuLlama::next_logits` against the CPU engine's last-position logits in f64, the worst
/// relative error: after prefixes of `stream` of 1, 37, 65, 64 and 130 tokens (none extends the
/// one before by a token, so each is a new sequence whose padded forward fills the KV cache),
/// then after 131 to 150 (one token at a time through the cache).
fn next_logits_error(cfg: &StudentConfig, params: &[f32], stream: &[u32], ordinal: usize) -> Result<f64> {
    let mut g = GpuLlama::frozen(Gpu::open(ordinal, false)?, cfg, params)?;
    let (model, v) = (Llama::new(cfg), cfg.vocab_size);
    let p64: Vec<f64> = params.iter().map(|&x| x as f64).collect();
    let mut worst = 0f64;
    for n in [1, 37, 65, 64, 130].into_iter().chain(131..=150).filter(|&n| n <= cfg.max_position_embeddings.min(stream.len())) {
        let got = g.next_logits(&stream[..n])?;
        let mut ws = Workspace::<f64>::new(cfg, 1, n);
        model.forward(&p64, &mut ws, &stream[..n], 1, n);
        let want = model.logits(&p64, &ws);
        worst = worst.max(rel(&got, &want[(n - 1) * v..]));
    }
    Ok(worst)
}

pub fn run(o: &CheckOptions) -> Result<bool> {
    let text = std::fs::read_to_string(o.config).at(o.config)?;
    let cfg: StudentConfig = serde_json::from_str(&text).map_err(|e| MasaError::bad_file(o.config, format!("invalid config: {e}")))?;
    cfg.validate()?;
    let seed = o
        .seed
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    eprintln!(
        "cuda-check: {} (L={} h={} ffn={} heads={}/{} vocab={}), batch {}x{}, seed {seed}",
        o.config.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.vocab_size,
        o.batch,
        o.seq
    );
    let (b, t, v) = (o.batch, o.seq, cfg.vocab_size);
    let n = b * t;
    let mut rng = crate::rng::SplitMix64(seed);
    // Weights: Scratch init with norm weights spread around 1 (exercises their gradients).
    let mut params = cfg.scratch_init(seed);
    let layout = crate::student::llama::Layout::new(&cfg);
    for (_, shape, off) in &layout.tensors {
        if shape.len() == 1 {
            for (p, z) in params[*off..*off + shape[0]].iter_mut().zip(crate::rng::normals(&mut rng, shape[0])) {
                *p = (1.0 + 0.2 * z) as f32;
            }
        }
    }
    let ids: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let weights: Vec<f32> = (0..n).map(|_| if rng.below(8) == 0 { 0.0 } else { 1.0 / n as f32 }).collect();
    // A teacher's top-8: distinct ids, log-probs of a random distribution.
    let k = 8;
    let mut t_ids = Vec::with_capacity(n * k);
    let mut t_logp = Vec::with_capacity(n * k);
    for _ in 0..n {
        let mut row: Vec<u32> = Vec::with_capacity(k);
        while row.len() < k {
            let id = rng.below(v) as u32;
            if !row.contains(&id) {
                row.push(id);
            }
        }
        let raw: Vec<f64> = (0..k).map(|_| (rng.below(1000) as f64 + 1.0).ln()).collect();
        let z = raw.iter().map(|x| x.exp()).sum::<f64>().ln();
        t_ids.extend(row);
        t_logp.extend(raw.iter().map(|x| (x - z - 0.1) as f32));
    }
    let (alpha, tau) = (0.5, 2.0);

    // ---- CPU f64 reference ----
    let model = Llama::new(&cfg);
    let p64: Vec<f64> = params.iter().map(|&x| x as f64).collect();
    let w64: Vec<f64> = weights.iter().map(|&x| x as f64).collect();
    let mut ws = Workspace::<f64>::new(&cfg, b, t);
    model.forward(&p64, &mut ws, &ids, b, t);
    let logits_ref = model.logits(&p64, &ws);
    let reference = |teacher: Option<&Teacher>, ws: &mut Workspace<f64>| {
        let mut g = vec![0f64; p64.len()];
        model.forward(&p64, ws, &ids, b, t);
        let loss = model.loss(&p64, ws, &Targets { ids: &targets, weights: &w64 }, teacher, Some(&mut g), None);
        model.backward(&p64, ws, &mut g);
        (loss, g)
    };
    let (loss_ref, grads_ref) = reference(None, &mut ws);
    let te = Teacher { k, ids: &t_ids, logp: &t_logp, alpha, temperature: tau };
    let (loss_ref_kd, grads_ref_kd) = reference(Some(&te), &mut ws);

    let mut rows = Vec::new();
    let hyper = AdamConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let decay = engine::decay_ranges(&model);
    for (precision, logit_limit, grad_limit) in [(Precision::F32, 1e-5, 1e-4), (Precision::Bf16, 2e-2, 5e-2)] {
        let mut g = GpuLlama::new(Gpu::open(o.ordinal, precision == Precision::Bf16)?, &cfg, &params, hyper, &decay)?;
        // Logits.
        g.poison(b, t)?;
        let tag = format!("{}{}", format!("{precision:?}").to_lowercase(), if g.uses_flash() { " flash" } else { "" });
        g.forward(&ids, b, t)?;
        let lg = g.logits()?;
        rows.push(Row {
            check: format!("{tag}: logits rel. error vs CPU f64"),
            value: rel(&lg, &logits_ref),
            limit: logit_limit,
            at_least: false,
        });
        // Loss and gradients, plain CE and distillation.
        let mut step = |teacher: Option<&Teacher>| -> Result<(f64, Vec<f32>)> {
            g.poison(b, t)?;
            g.zero_grad()?;
            g.forward(&ids, b, t)?;
            g.loss(&targets, &weights, teacher, true, None)?;
            g.backward()?;
            let (loss, _) = g.loss_and_grad_norm()?;
            Ok((loss, g.download_grads()?))
        };
        let (loss, grads) = step(None)?;
        rows.push(Row {
            check: format!("{tag}: loss rel. error"),
            value: ((loss - loss_ref) / loss_ref).abs(),
            limit: logit_limit,
            at_least: false,
        });
        let (e, name) = worst_tensor(&layout, &grads, &grads_ref);
        rows.push(Row { check: format!("{tag}: worst gradient rel. error ({name})"), value: e, limit: grad_limit, at_least: false });
        let (_, again) = step(None)?;
        let same = grads.iter().zip(&again).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        rows.push(Row {
            check: format!("{tag}: gradient elements differing between two runs"),
            value: same as f64,
            limit: 0.0,
            at_least: false,
        });
        let (loss_kd, grads_kd) = step(Some(&te))?;
        rows.push(Row {
            check: format!("{tag}: distillation loss rel. error"),
            value: ((loss_kd - loss_ref_kd) / loss_ref_kd).abs(),
            limit: logit_limit,
            at_least: false,
        });
        let (e, name) = worst_tensor(&layout, &grads_kd, &grads_ref_kd);
        rows.push(Row {
            check: format!("{tag}: distillation worst gradient rel. error ({name})"),
            value: e,
            limit: grad_limit,
            at_least: false,
        });
    }

    // ---- the distillation teacher's top-k on the device (inference-only model) ----
    let k_teacher = 32.min(v);
    for (precision, lp_limit, mass_limit) in [(Precision::F32, 1e-4, 1.0 - 1e-5), (Precision::Bf16, 5e-2, 0.99)] {
        let mut g = GpuLlama::frozen(Gpu::open(o.ordinal, precision == Precision::Bf16)?, &cfg, &params)?;
        g.poison(b, t)?;
        g.forward(&ids, b, t)?;
        let (tid, tlp) = g.top_k_logprobs(k_teacher)?;
        let tag = format!("{precision:?}").to_lowercase();
        let (worst, mass, bad) = teacher_errors(&tid, &tlp, k_teacher, &logits_ref, v);
        rows.push(Row {
            check: format!("{tag} teacher top-{k_teacher}: worst log-prob error vs CPU f64 (nats)"),
            value: worst,
            limit: lp_limit,
            at_least: false,
        });
        rows.push(Row {
            check: format!("{tag} teacher top-{k_teacher}: lowest share of the true top-k mass"),
            value: mass,
            limit: mass_limit,
            at_least: true,
        });
        rows.push(Row {
            check: format!("{tag} teacher top-{k_teacher}: rows out of order or with a repeated id"),
            value: bad as f64,
            limit: 0.0,
            at_least: false,
        });
    }

    // ---- calibration: the CUDA pass against the CPU pass on the same checkpoint and batches ----
    let (worst, site, counts_equal) = calibration_errors(&cfg, &params, &mut rng, b, t, o.ordinal)?;
    rows.push(Row { check: format!("calibration: worst Σxxᵀ rel. error vs CPU ({site})"), value: worst, limit: 1e-4, at_least: false });
    rows.push(Row {
        check: "calibration: sites or token counts differing from CPU".into(),
        value: counts_equal as f64,
        limit: 0.0,
        at_least: false,
    });

    // ---- loss curves: CPU f32 vs GPU f32 / bf16, same init, same stream ----
    let stream = markov_tokens(&mut rng, v, o.steps * b * (t + 1));
    let adam = AdamConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let curve = |device: Device, precision: Precision| -> Result<(Vec<f64>, Vec<f32>)> {
        let mut e = engine::open(device, precision, &cfg, params.clone(), adam, b, t)?;
        let w = vec![1.0 / n as f32; n];
        let mut out = Vec::new();
        for s in 0..o.steps {
            let seqs = &stream[s * b * (t + 1)..(s + 1) * b * (t + 1)];
            let (mut x, mut y) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for q in seqs.chunks(t + 1) {
                x.extend_from_slice(&q[..t]);
                y.extend_from_slice(&q[1..]);
            }
            let lr = crate::student::optim::lr_at(s, o.steps, o.steps / 10, 2e-3, 2e-4);
            let mb = MicroBatch { ids: &x, targets: &y, weights: &w, b, t, teacher: None };
            match engine::optimizer_step(e.as_mut(), &[mb], 1.0, lr)? {
                Ok(st) => out.push(st.loss),
                Err(d) => return Err(MasaError::Invalid(format!("{} diverged at step {s}: loss {}", e.describe(), d.loss))),
            }
        }
        Ok((out, e.params()?))
    };
    let t0 = std::time::Instant::now();
    let (cpu, trained) = curve(Device::Cpu, Precision::F32)?;
    eprintln!("cpu curve: {:.1} s", t0.elapsed().as_secs_f64());
    let (gf, _) = curve(Device::Cuda(o.ordinal), Precision::F32)?;
    let (gb, _) = curve(Device::Cuda(o.ordinal), Precision::Bf16)?;
    let maxdiff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    eprintln!("step  cpu-f32  gpu-f32  gpu-bf16");
    for s in (0..o.steps).step_by((o.steps / 10).max(1)).chain([o.steps - 1]) {
        eprintln!("{s:4}  {:.4}  {:.4}  {:.4}", cpu[s], gf[s], gb[s]);
    }
    let learned = cpu[0] - cpu[o.steps - 1];
    rows.push(Row {
        check: format!("{}-step loss curve: CPU f32 fell by (nats, at least)", o.steps),
        value: learned,
        limit: 0.5,
        at_least: true,
    });
    rows.push(Row {
        check: format!("{}-step curve max |GPU f32 - CPU f32| (nats)", o.steps),
        value: maxdiff(&cpu, &gf),
        limit: 0.01,
        at_least: false,
    });
    rows.push(Row {
        check: format!("{}-step curve max |GPU bf16 - CPU f32| (nats)", o.steps),
        value: maxdiff(&cpu, &gb),
        limit: 0.05,
        at_least: false,
    });

    // ---- multiple-choice scoring on the device against the CPU engine in f64 ----
    let (ll_err, agree) = scoring_errors(&cfg, &trained, &stream, &mut rng, o.ordinal)?;
    let gen_err = next_logits_error(&cfg, &trained, &stream, o.ordinal)?;
    rows.push(Row {
        check: "generation: next-token logits (1–130-token prefixes, then 20 KV-cache steps), rel. error vs CPU f64".into(),
        value: gen_err,
        limit: 1e-5,
        at_least: false,
    });
    rows.push(Row {
        check: "scoring: 800 choice log-likelihoods, rel. error vs CPU f64".into(),
        value: ll_err,
        limit: 1e-4,
        at_least: false,
    });
    rows.push(Row { check: "scoring: share of 200 items with the CPU's prediction".into(), value: agree, limit: 0.99, at_least: true });

    let mut ok = true;
    println!("| check | value | limit | |\n|---|---|---|---|");
    for r in &rows {
        let pass = if r.at_least { r.value >= r.limit } else { r.value <= r.limit };
        ok &= pass;
        println!("| {} | {:.3e} | {:.0e} | {} |", r.check, r.value, r.limit, if pass { "pass" } else { "FAIL" });
    }
    println!("seed {seed}: {}", if ok { "all checks passed" } else { "SOME CHECKS FAILED" });
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_errors_accept_the_cpu_top_k_and_catch_a_wrong_pick() {
        let mut rng = crate::rng::SplitMix64(7);
        let (rows, v, k) = (6, 300, 8);
        let logits: Vec<f64> = crate::rng::normals(&mut rng, rows * v).into_iter().map(|z| 3.0 * z).collect();
        let f32s: Vec<f32> = logits.iter().map(|&z| z as f32).collect();
        let (ids, lp) = crate::distill::top_k_rows(&f32s, v, k);
        let (worst, mass, bad) = teacher_errors(&ids, &lp, k, &logits, v);
        assert!(worst < 1e-5 && (mass - 1.0).abs() < 1e-12 && bad == 0, "{worst} {mass} {bad}");
        // The last pick of row 0 replaced by the row's smallest entry: mass drops, order breaks.
        let mut wrong = ids.clone();
        let row0 = &logits[..v];
        wrong[k - 1] = (0..v).min_by(|&a, &b| row0[a].total_cmp(&row0[b])).unwrap() as u32;
        let (worst, mass, _) = teacher_errors(&wrong, &lp, k, &logits, v);
        assert!(worst > 1.0 && mass < 1.0, "{worst} {mass}");
        let mut repeated = ids.clone();
        repeated[1] = repeated[0];
        assert_eq!(teacher_errors(&repeated, &lp, k, &logits, v).2, 1);
    }
}
