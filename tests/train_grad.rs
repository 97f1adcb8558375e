//! The trainable student's gradients against central finite differences in f64 (every element
//! of every parameter tensor), and its logits against the independent inference forward of
//! `masa::source::model` on a checkpoint written by `save_checkpoint`.

mod train_common;

use masa::student::kernels::{Targets, Teacher};
use masa::student::llama::{Llama, Workspace};
use masa::student::StudentConfig;
use train_common::{byte_tokenizer, tiny_config};

fn rand_params(model: &Llama, seed: u64) -> Vec<f64> {
    let mut rng = masa::rng::SplitMix64(seed);
    let mut p = vec![0f64; model.layout.total];
    for (_, shape, off) in &model.layout.tensors {
        let n: usize = shape.iter().product();
        for (v, z) in p[*off..*off + n].iter_mut().zip(masa::rng::normals(&mut rng, n)) {
            // Norm weights around 1, matrices large enough that attention is far from uniform.
            *v = if shape.len() == 1 { 1.0 + 0.3 * z } else { 0.4 * z };
        }
    }
    p
}

struct Problem {
    ids: Vec<u32>,
    targets: Vec<u32>,
    weights: Vec<f64>,
    tk_ids: Vec<u32>,
    tk_lp: Vec<f32>,
    k: usize,
    b: usize,
    t: usize,
}

fn problem(cfg: &StudentConfig, b: usize, t: usize) -> Problem {
    let mut rng = masa::rng::SplitMix64(7);
    let v = cfg.vocab_size;
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
    // Uneven weights, one row masked out (as prompt tokens in fine-tuning).
    let mut weights: Vec<f64> = (0..b * t).map(|i| 0.5 + (i % 3) as f64 * 0.25).collect();
    weights[1] = 0.0;
    let k = 3;
    let mut tk_ids = Vec::new();
    let mut tk_lp = Vec::new();
    for _ in 0..b * t {
        let mut seen = Vec::new();
        while seen.len() < k {
            let c = rng.below(v) as u32;
            if !seen.contains(&c) {
                seen.push(c);
            }
        }
        tk_ids.extend(&seen);
        tk_lp.extend([-0.5f32, -1.5, -2.5]);
    }
    Problem { ids, targets, weights, tk_ids, tk_lp, k, b, t }
}

fn loss_of(model: &Llama, params: &[f64], pr: &Problem, distill: bool, grads: Option<&mut [f64]>) -> f64 {
    let mut ws = Workspace::<f64>::new(&model.cfg, pr.b, pr.t);
    model.forward(params, &mut ws, &pr.ids, pr.b, pr.t);
    let tg = Targets { ids: &pr.targets, weights: &pr.weights };
    let te = Teacher { k: pr.k, ids: &pr.tk_ids, logp: &pr.tk_lp, alpha: 0.3, temperature: 2.0 };
    let te = if distill { Some(&te) } else { None };
    match grads {
        Some(g) => {
            let l = model.loss(params, &mut ws, &tg, te, Some(&mut *g), None);
            model.backward(params, &mut ws, g);
            l
        }
        None => model.loss(params, &mut ws, &tg, te, None, None),
    }
}

/// Max over tensors of ‖g − fd‖∞ / ‖fd‖∞ and a check that no tensor's gradient is zero.
fn check_gradients(cfg: &StudentConfig, distill: bool) -> f64 {
    let model = Llama::new(cfg);
    let params = rand_params(&model, 11);
    let pr = problem(cfg, 2, 6);
    let mut grads = vec![0f64; params.len()];
    loss_of(&model, &params, &pr, distill, Some(&mut grads));
    let mut worst = 0f64;
    let eps = 1e-5;
    for (name, shape, off) in &model.layout.tensors {
        let n: usize = shape.iter().product();
        let (mut err, mut scale) = (0f64, 0f64);
        let mut p = params.clone();
        for i in *off..*off + n {
            let x0 = p[i];
            p[i] = x0 + eps;
            let lp = loss_of(&model, &p, &pr, distill, None);
            p[i] = x0 - eps;
            let lm = loss_of(&model, &p, &pr, distill, None);
            p[i] = x0;
            let fd = (lp - lm) / (2.0 * eps);
            err = err.max((fd - grads[i]).abs());
            scale = scale.max(fd.abs());
        }
        assert!(scale > 1e-6, "{name}: finite differences see no dependence (scale {scale:e})");
        let gmax = grads[*off..*off + n].iter().fold(0f64, |a, &b| a.max(b.abs()));
        assert!(gmax > 0.0, "{name}: zero gradient (cut graph)");
        let rel = err / scale;
        eprintln!("{name:45} max|fd| {scale:.3e}  max|g-fd| {err:.3e}  rel {rel:.2e}");
        assert!(rel < 1e-6, "{name}: analytic gradient differs from finite differences (rel {rel:e})");
        worst = worst.max(rel);
    }
    eprintln!("worst relative error {worst:e}");
    worst
}

#[test]
fn gradients_match_finite_differences_tied_gqa() {
    let cfg = tiny_config(true);
    check_gradients(&cfg, false);
}

#[test]
fn gradients_match_finite_differences_untied_mha() {
    let mut cfg = tiny_config(false);
    cfg.num_key_value_heads = cfg.num_attention_heads;
    check_gradients(&cfg, false);
}

#[test]
fn distillation_gradients_match_finite_differences() {
    let cfg = tiny_config(true);
    check_gradients(&cfg, true);
}

/// f32 training forward vs `masa::source::model::Transformer` (candle, independent code) on a
/// checkpoint written by `save_checkpoint` and loaded back through `SourceWeights`.
#[test]
fn training_forward_matches_inference_forward() {
    for tied in [true, false] {
        let mut cfg = tiny_config(tied);
        cfg.vocab_size = 260;
        cfg.hidden_size = 32;
        cfg.intermediate_size = 48;
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = 2;
        cfg.rope_theta = 10_000.0;
        let model = Llama::new(&cfg);
        let mut params = cfg.scratch_init(3);
        // Non-trivial norms and larger weights so attention and norms matter.
        for (_, shape, off) in &model.layout.tensors {
            let n: usize = shape.iter().product();
            for (i, v) in params[*off..*off + n].iter_mut().enumerate() {
                if shape.len() == 1 {
                    *v = 1.0 + 0.1 * ((i * 7 % 13) as f32 - 6.0) / 6.0;
                } else {
                    *v *= 10.0;
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ckpt");
        masa::student::save_student(&ck, &cfg, &params, &byte_tokenizer(), &serde_json::json!({"test": true})).unwrap();
        let (b, t) = (2, 17);
        let ids: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 5) % 260) as u32).collect();
        let mut ws = Workspace::<f32>::new(&cfg, b, t);
        model.forward(&params, &mut ws, &ids, b, t);
        let ours = model.logits(&params, &ws);
        let w = masa::source::SourceWeights::open(&ck).unwrap();
        let reference = masa::source::model::Transformer::load(&w).unwrap();
        let x = candle_core::Tensor::from_vec(ids.clone(), (b, t), &candle_core::Device::Cpu).unwrap();
        let theirs: Vec<f32> = reference.forward(&x, &mut masa::source::model::NoHooks).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours.len(), theirs.len());
        let scale = theirs.iter().fold(0f32, |a, &b| a.max(b.abs()));
        let err = ours.iter().zip(&theirs).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        eprintln!("tied={tied}: max |logit| {scale:.3}, max abs diff {err:.3e}");
        assert!(scale > 1.0, "logits too small to compare");
        assert!(err < 1e-4 * scale.max(1.0), "training forward differs from inference forward: {err}");
    }
}
