//! OLMo, OLMoE and DeepSeekMoE v1 from HF directories, checked against an independent reference.
//!
//! Each test writes a tiny random checkpoint in exactly the HF layout (`config.json` with the
//! field names of `OlmoForCausalLM` / `OlmoeForCausalLM` / `DeepseekForCausalLM`, tensor names
//! as `modeling_olmo.py`, `modeling_olmoe.py` and deepseek-ai's `modeling_deepseek.py` name
//! them), loads it with masa, and compares logits, routing and FFN hook inputs with a reference
//! forward written with plain per-token loops in f64 (no candle).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{write_config, Ckpt, Rng};
use masa::source::model::{Hooks, MlpId, Site, Transformer};
use masa::source::{Arch, SourceWeights};
use safetensors::Dtype;
use serde_json::json;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Family {
    Olmo,
    Olmoe,
    Deepseek,
}

/// The architecture of one test model, in HF terms.
#[derive(Clone, Debug)]
struct Spec {
    family: Family,
    vocab: usize,
    hidden: usize,
    /// Dense FFN width (OLMo, DeepSeek leading layers); OLMoE's `intermediate_size` is `moe_inter`.
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    rope_theta: f64,
    rms_eps: f64,
    clip_qkv: Option<f64>,
    /// q/k/v/o biases (`attention_bias`; off in the released checkpoints).
    attention_bias: bool,
    experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
    moe_inter: usize,
    n_shared: usize,
    first_k_dense_replace: usize,
    moe_layer_freq: usize,
}

impl Spec {
    fn olmo() -> Self {
        Spec {
            family: Family::Olmo,
            vocab: 50,
            hidden: 32,
            inter: 48,
            layers: 2,
            heads: 4,
            kv_heads: 4,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            clip_qkv: Some(0.5),
            attention_bias: false,
            experts: 0,
            top_k: 0,
            norm_topk_prob: false,
            moe_inter: 0,
            n_shared: 0,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
        }
    }

    fn olmoe() -> Self {
        Spec {
            family: Family::Olmoe,
            kv_heads: 2,
            rope_theta: 1_000.0,
            clip_qkv: Some(1.5),
            experts: 8,
            top_k: 2,
            norm_topk_prob: true,
            moe_inter: 16,
            ..Spec::olmo()
        }
    }

    fn deepseek() -> Self {
        Spec {
            family: Family::Deepseek,
            layers: 3,
            kv_heads: 4,
            rms_eps: 1e-6,
            clip_qkv: None,
            experts: 8,
            top_k: 2,
            norm_topk_prob: false,
            moe_inter: 12,
            n_shared: 2,
            first_k_dense_replace: 1,
            moe_layer_freq: 1,
            ..Spec::olmo()
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// As `DeepseekDecoderLayer` / `OlmoeDecoderLayer` decide it.
    fn is_moe(&self, l: usize) -> bool {
        match self.family {
            Family::Olmo => false,
            Family::Olmoe => true,
            Family::Deepseek => l >= self.first_k_dense_replace && l % self.moe_layer_freq == 0,
        }
    }

    /// `config.json` as `save_pretrained` writes it for each architecture (the fields masa
    /// does not read are kept, as in the released checkpoints).
    fn config_json(&self) -> serde_json::Value {
        let common = json!({
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "max_position_embeddings": 64,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "rope_scaling": null,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "transformers_version": "4.46.0",
            "use_cache": true,
            "vocab_size": self.vocab,
        });
        let specific = match self.family {
            Family::Olmo => json!({
                "architectures": ["OlmoForCausalLM"],
                "model_type": "olmo",
                "clip_qkv": self.clip_qkv,
                "intermediate_size": self.inter,
                "pretraining_tp": 1,
            }),
            Family::Olmoe => json!({
                "architectures": ["OlmoeForCausalLM"],
                "model_type": "olmoe",
                "clip_qkv": self.clip_qkv,
                "intermediate_size": self.moe_inter,
                "num_experts": self.experts,
                "num_experts_per_tok": self.top_k,
                "norm_topk_prob": self.norm_topk_prob,
                "output_router_logits": false,
                "router_aux_loss_coef": 0.01,
                "rms_norm_eps": self.rms_eps,
            }),
            Family::Deepseek => json!({
                "architectures": ["DeepseekForCausalLM"],
                "model_type": "deepseek",
                "auto_map": {
                    "AutoConfig": "configuration_deepseek.DeepseekConfig",
                    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"
                },
                "aux_loss_alpha": 0.001,
                "first_k_dense_replace": self.first_k_dense_replace,
                "intermediate_size": self.inter,
                "moe_intermediate_size": self.moe_inter,
                "moe_layer_freq": self.moe_layer_freq,
                "n_routed_experts": self.experts,
                "n_shared_experts": self.n_shared,
                "norm_topk_prob": self.norm_topk_prob,
                "num_experts_per_tok": self.top_k,
                "pretraining_tp": 1,
                "rms_norm_eps": self.rms_eps,
                "scoring_func": "softmax",
                "seq_aux": true,
            }),
        };
        let mut out = common;
        for (k, v) in specific.as_object().unwrap() {
            out[k] = v.clone();
        }
        out
    }

    /// Random weights under the HF names. OLMo has no norm weights at all (its LayerNorm has
    /// no parameters); OLMoE has full-width q/k norms; DeepSeek has shared experts.
    fn weights(&self, seed: u64) -> Ckpt {
        let mut rng = Rng::new(seed);
        let mut ck = Ckpt::default();
        let (h, hd, nh, nkv) = (self.hidden, self.head_dim(), self.heads, self.kv_heads);
        let lin = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
        ck.add_random(&mut rng, "model.embed_tokens.weight", &[self.vocab, h], 1.0, 0.0);
        let rms = self.family != Family::Olmo;
        let mlp = |ck: &mut Ckpt, rng: &mut Rng, p: &str, width: usize| {
            ck.add_random(rng, &format!("{p}.gate_proj.weight"), &[width, h], lin(h), 0.0);
            ck.add_random(rng, &format!("{p}.up_proj.weight"), &[width, h], lin(h), 0.0);
            ck.add_random(rng, &format!("{p}.down_proj.weight"), &[h, width], lin(width), 0.0);
        };
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            ck.add_random(&mut rng, &format!("{p}.self_attn.q_proj.weight"), &[nh * hd, h], lin(h), 0.0);
            ck.add_random(&mut rng, &format!("{p}.self_attn.k_proj.weight"), &[nkv * hd, h], lin(h), 0.0);
            ck.add_random(&mut rng, &format!("{p}.self_attn.v_proj.weight"), &[nkv * hd, h], lin(h), 0.0);
            ck.add_random(&mut rng, &format!("{p}.self_attn.o_proj.weight"), &[h, nh * hd], lin(nh * hd), 0.0);
            if self.attention_bias {
                for (n, width) in [("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd), ("o", h)] {
                    ck.add_random(&mut rng, &format!("{p}.self_attn.{n}_proj.bias"), &[width], 0.5, 0.0);
                }
            }
            if self.family == Family::Olmoe {
                ck.add_random(&mut rng, &format!("{p}.self_attn.q_norm.weight"), &[nh * hd], 0.3, 1.0);
                ck.add_random(&mut rng, &format!("{p}.self_attn.k_norm.weight"), &[nkv * hd], 0.3, 1.0);
            }
            if rms {
                ck.add_random(&mut rng, &format!("{p}.input_layernorm.weight"), &[h], 0.3, 1.0);
                ck.add_random(&mut rng, &format!("{p}.post_attention_layernorm.weight"), &[h], 0.3, 1.0);
            }
            if self.is_moe(l) {
                ck.add_random(&mut rng, &format!("{p}.mlp.gate.weight"), &[self.experts, h], 3.0 * lin(h), 0.0);
                for e in 0..self.experts {
                    mlp(&mut ck, &mut rng, &format!("{p}.mlp.experts.{e}"), self.moe_inter);
                }
                if self.n_shared > 0 {
                    mlp(&mut ck, &mut rng, &format!("{p}.mlp.shared_experts"), self.n_shared * self.moe_inter);
                }
            } else {
                mlp(&mut ck, &mut rng, &format!("{p}.mlp"), self.inter);
            }
        }
        if rms {
            ck.add_random(&mut rng, "model.norm.weight", &[h], 0.3, 1.0);
        }
        ck.add_random(&mut rng, "lm_head.weight", &[self.vocab, h], lin(h), 0.0);
        ck
    }
}

// ---------------------------------------------------------------------------------------------
// Reference forward: plain loops, f64, one token at a time.

/// What the reference observed besides the logits.
#[derive(Default, Debug)]
struct RefTrace {
    /// layer -> tokens routed to each expert.
    counts: BTreeMap<usize, Vec<usize>>,
    /// q/k/v entries the clip actually changed (to prove the test exercises `clip_qkv`).
    clipped: usize,
}

fn matvec(w: &[f32], rows: usize, x: &[f64]) -> Vec<f64> {
    let cols = x.len();
    assert_eq!(w.len(), rows * cols);
    (0..rows).map(|r| w[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| *a as f64 * b).sum()).collect()
}

/// RMSNorm with weight (`OlmoeRMSNorm`, `DeepseekRMSNorm`).
fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * inv * *w as f64).collect()
}

/// `OlmoLayerNorm`: `F.layer_norm(x, None, None, eps=1e-5)` (biased variance, fixed eps).
fn layer_norm_no_params(x: &[f64]) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    x.iter().map(|v| (v - mean) / (var + 1e-5).sqrt()).collect()
}

/// HF `apply_rotary_pos_emb` with `rotate_half`, on one head vector at position `pos`.
fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let inv_freq = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
        let (c, s) = ((pos as f64 * inv_freq).cos(), (pos as f64 * inv_freq).sin());
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

fn swiglu(ck: &Ckpt, p: &str, width: usize, x: &[f64]) -> Vec<f64> {
    let g = matvec(ck.get(&format!("{p}.gate_proj.weight")), width, x);
    let u = matvec(ck.get(&format!("{p}.up_proj.weight")), width, x);
    let mid: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
    matvec(ck.get(&format!("{p}.down_proj.weight")), x.len(), &mid)
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Routed experts (+ shared experts) of one token, as `OlmoeSparseMoeBlock` / `DeepseekMoE`:
/// softmax over all experts, top-k, renormalised when `norm_topk_prob` (DeepSeek only for
/// top_k > 1, with a 1e-20 guard).
fn moe_ffn(s: &Spec, ck: &Ckpt, p: &str, x: &[f64], counts: &mut [usize]) -> Vec<f64> {
    let probs = softmax(&matvec(ck.get(&format!("{p}.mlp.gate.weight")), s.experts, x));
    let mut order: Vec<usize> = (0..s.experts).collect();
    order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap().then(a.cmp(&b)));
    let top = &order[..s.top_k];
    let sum: f64 = top.iter().map(|&e| probs[e]).sum();
    let renorm = match s.family {
        Family::Deepseek => s.norm_topk_prob && s.top_k > 1,
        _ => s.norm_topk_prob,
    };
    let mut out = vec![0.0; x.len()];
    for &e in top {
        counts[e] += 1;
        let w = if renorm { probs[e] / (sum + if s.family == Family::Deepseek { 1e-20 } else { 0.0 }) } else { probs[e] };
        for (o, y) in out.iter_mut().zip(swiglu(ck, &format!("{p}.mlp.experts.{e}"), s.moe_inter, x)) {
            *o += w * y;
        }
    }
    if s.n_shared > 0 {
        for (o, y) in out.iter_mut().zip(swiglu(ck, &format!("{p}.mlp.shared_experts"), s.n_shared * s.moe_inter, x)) {
            *o += y;
        }
    }
    out
}

/// Logits `(t, vocab)` of one sequence.
fn reference_forward(s: &Spec, ck: &Ckpt, ids: &[u32], trace: &mut RefTrace) -> Vec<Vec<f64>> {
    let (h, hd, nh, nkv) = (s.hidden, s.head_dim(), s.heads, s.kv_heads);
    let group = nh / nkv;
    let t = ids.len();
    let embed = ck.get("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> =
        ids.iter().map(|&id| embed[id as usize * h..(id as usize + 1) * h].iter().map(|v| *v as f64).collect()).collect();
    let norm = |name: &str, x: &[f64]| -> Vec<f64> {
        match s.family {
            Family::Olmo => layer_norm_no_params(x),
            _ => rms_norm(x, ck.get(&format!("{name}.weight")), s.rms_eps),
        }
    };
    // `nn.Linear(.., bias=config.attention_bias)`: q, k, v and o alike.
    let proj = |name: &str, rows: usize, x: &[f64]| -> Vec<f64> {
        let mut y = matvec(ck.get(&format!("{name}.weight")), rows, x);
        if s.attention_bias {
            for (y, b) in y.iter_mut().zip(ck.get(&format!("{name}.bias"))) {
                *y += *b as f64;
            }
        }
        y
    };
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let mut qs = Vec::with_capacity(t);
        let mut ks = Vec::with_capacity(t);
        let mut vs = Vec::with_capacity(t);
        for (pos, x) in xs.iter().enumerate() {
            let a = norm(&format!("{p}.input_layernorm"), x);
            let mut q = proj(&format!("{p}.self_attn.q_proj"), nh * hd, &a);
            let mut k = proj(&format!("{p}.self_attn.k_proj"), nkv * hd, &a);
            let mut v = proj(&format!("{p}.self_attn.v_proj"), nkv * hd, &a);
            if s.family == Family::Olmoe {
                q = rms_norm(&q, ck.get(&format!("{p}.self_attn.q_norm.weight")), s.rms_eps);
                k = rms_norm(&k, ck.get(&format!("{p}.self_attn.k_norm.weight")), s.rms_eps);
            }
            if let Some(c) = s.clip_qkv {
                for z in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                    if z.abs() > c {
                        trace.clipped += 1;
                        *z = z.clamp(-c, c);
                    }
                }
            }
            for head in q.chunks_mut(hd).chain(k.chunks_mut(hd)) {
                rope(head, pos, s.rope_theta);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let mut next = Vec::with_capacity(t);
        for i in 0..t {
            let mut attn = vec![0.0; nh * hd];
            for head in 0..nh {
                let kv = head / group;
                let q = &qs[i][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| q.iter().zip(&ks[j][kv * hd..(kv + 1) * hd]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let pr = softmax(&scores);
                for (j, pj) in pr.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += pj * vs[j][kv * hd + d];
                    }
                }
            }
            let x: Vec<f64> = xs[i].iter().zip(proj(&format!("{p}.self_attn.o_proj"), h, &attn)).map(|(a, b)| a + b).collect();
            let f_in = norm(&format!("{p}.post_attention_layernorm"), &x);
            let f = if s.is_moe(l) {
                let counts = trace.counts.entry(l).or_insert_with(|| vec![0; s.experts]);
                moe_ffn(s, ck, &p, &f_in, counts)
            } else {
                swiglu(ck, &format!("{p}.mlp"), s.inter, &f_in)
            };
            next.push(x.iter().zip(f).map(|(a, b)| a + b).collect());
        }
        xs = next;
    }
    xs.iter().map(|x| matvec(ck.get("lm_head.weight"), s.vocab, &norm("model.norm", x))).collect()
}

// ---------------------------------------------------------------------------------------------
// masa side.

/// Records routing counts and the shape of every FFN hook input.
struct Recorder {
    experts: usize,
    counts: BTreeMap<usize, Vec<usize>>,
    /// (layer, mlp, site) -> (rows, cols) per call.
    inputs: BTreeMap<(usize, String, &'static str), Vec<(usize, usize)>>,
}

impl Hooks for Recorder {
    fn ffn_input(&mut self, layer: usize, mlp: MlpId, site: Site, x: &Tensor) -> masa::Result<()> {
        let dims = x.dims2()?;
        self.inputs.entry((layer, format!("{mlp:?}"), site.name())).or_default().push(dims);
        Ok(())
    }

    fn routing(&mut self, layer: usize, experts: &[u32], top_k: usize) -> masa::Result<()> {
        assert_eq!(experts.len() % top_k, 0);
        let c = self.counts.entry(layer).or_insert_with(|| vec![0; self.experts]);
        for &e in experts {
            c[e as usize] += 1;
        }
        Ok(())
    }
}

/// Write the model, run masa and the reference on two sequences, and compare everything.
fn check(spec: &Spec, dtype: Dtype, shards: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut ck = spec.weights(seed);
    ck.round_to(dtype);
    ck.write(dir.path(), dtype, shards);
    write_config(dir.path(), &spec.config_json());

    let w = SourceWeights::open(dir.path()).unwrap();
    let expect_arch = match spec.family {
        Family::Olmo => Arch::Olmo,
        Family::Olmoe => Arch::Olmoe,
        Family::Deepseek => Arch::Deepseek,
    };
    assert_eq!(w.config.arch, expect_arch);
    let model = Transformer::load(&w).unwrap();

    let (batch, t) = (2, 7);
    let mut rng = Rng::new(seed ^ 0xabcdef);
    let ids: Vec<u32> = (0..batch * t).map(|_| rng.below(spec.vocab) as u32).collect();
    let x = Tensor::from_vec(ids.clone(), (batch, t), &Device::Cpu).unwrap();
    let mut rec = Recorder { experts: spec.experts, counts: BTreeMap::new(), inputs: BTreeMap::new() };
    let logits = model.forward(&x, &mut rec).unwrap();
    assert_eq!(logits.dims(), &[batch, t, spec.vocab]);
    let got = logits.to_vec3::<f32>().unwrap();

    let mut trace = RefTrace::default();
    let mut worst = 0f64;
    let mut scale = 1f64;
    for b in 0..batch {
        let want = reference_forward(spec, &ck, &ids[b * t..(b + 1) * t], &mut trace);
        for (i, row) in want.iter().enumerate() {
            for (v, r) in row.iter().enumerate() {
                worst = worst.max((got[b][i][v] as f64 - r).abs());
                scale = scale.max(r.abs());
            }
        }
    }
    eprintln!("{:?}: max |logit - reference| = {worst:.2e} (scale {scale:.2}), clipped {}", spec.family, trace.clipped);
    assert!(worst <= 1e-4 * scale, "{:?}: logits differ from the reference by {worst:e} (scale {scale})", spec.family);
    if spec.clip_qkv.is_some() {
        assert!(trace.clipped > 0, "clip_qkv is set but never bites: the test would not check it");
    }

    // Routing: exactly the reference's decisions, per layer and expert.
    assert_eq!(rec.counts, trace.counts, "{:?}: routing counts per layer/expert", spec.family);

    // FFN hook inputs: every expert sees exactly its routed rows; dense layers and shared
    // experts see every token, at the hidden (ffn_in) and intermediate (ffn_mid) widths.
    let n = batch * t;
    let mut expected: BTreeMap<(usize, String, &'static str), Vec<(usize, usize)>> = BTreeMap::new();
    let mut expect = |l: usize, mlp: MlpId, rows: usize, mid: usize| {
        expected.insert((l, format!("{mlp:?}"), Site::FfnIn.name()), vec![(rows, spec.hidden)]);
        expected.insert((l, format!("{mlp:?}"), Site::FfnMid.name()), vec![(rows, mid)]);
    };
    for l in 0..spec.layers {
        if spec.is_moe(l) {
            for (e, &c) in trace.counts[&l].iter().enumerate() {
                if c > 0 {
                    expect(l, MlpId::Expert(e), c, spec.moe_inter);
                }
            }
            if spec.n_shared > 0 {
                expect(l, MlpId::Shared, n, spec.n_shared * spec.moe_inter);
            }
        } else {
            expect(l, MlpId::Dense, n, spec.inter);
        }
    }
    assert_eq!(rec.inputs, expected, "{:?}: FFN hook inputs (rows, cols) per layer/mlp/site", spec.family);
}

#[test]
fn olmo_matches_reference() {
    check(&Spec::olmo(), Dtype::F32, 1, 1);
}

#[test]
fn olmo_bf16_checkpoint_matches_reference() {
    check(&Spec::olmo(), Dtype::BF16, 1, 2);
}

#[test]
fn olmo_with_attention_bias_matches_reference() {
    check(&Spec { attention_bias: true, ..Spec::olmo() }, Dtype::F32, 1, 8);
}

#[test]
fn olmoe_matches_reference() {
    check(&Spec::olmoe(), Dtype::F32, 1, 3);
}

#[test]
fn olmoe_without_topk_renormalisation_matches_reference() {
    let spec = Spec { norm_topk_prob: false, clip_qkv: None, kv_heads: 1, ..Spec::olmoe() };
    check(&spec, Dtype::F32, 1, 4);
}

#[test]
fn deepseek_matches_reference() {
    check(&Spec::deepseek(), Dtype::F32, 1, 5);
}

#[test]
fn deepseek_sharded_with_moe_layer_freq_matches_reference() {
    // Layers 0 (first_k_dense_replace) and 1 (odd, moe_layer_freq = 2) are dense, 2 is MoE.
    let spec = Spec { moe_layer_freq: 2, norm_topk_prob: true, kv_heads: 2, n_shared: 1, ..Spec::deepseek() };
    check(&spec, Dtype::F32, 2, 6);
}

#[test]
fn deepseek_top1_ignores_norm_topk_prob() {
    // `MoEGate` renormalises only when top_k > 1: a single expert keeps its softmax weight.
    let spec = Spec { top_k: 1, norm_topk_prob: true, ..Spec::deepseek() };
    check(&spec, Dtype::F32, 1, 7);
}

#[test]
fn norm_eps_follows_hf() {
    // OLMo's LayerNorm has eps = 1e-5 whatever the config says; OlmoeConfig defaults
    // rms_norm_eps to 1e-5 (DeepseekConfig to 1e-6) when the field is absent.
    let cases = [(Spec::olmo(), Some(("layer_norm_eps", 1e-3)), 1e-5), (Spec::olmoe(), None, 1e-5), (Spec::deepseek(), None, 1e-6)];
    for (spec, extra, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = spec.config_json();
        cfg.as_object_mut().unwrap().remove("rms_norm_eps");
        if let Some((k, v)) = extra {
            cfg[k] = json!(v);
        }
        write_config(dir.path(), &cfg);
        spec.weights(9).write(dir.path(), Dtype::F32, 1);
        let w = SourceWeights::open(dir.path()).unwrap();
        assert_eq!(w.config.norm_eps, want, "{:?}", spec.family);
    }
}

// ---- calibration statistics on these tiny models ----

use masa::calibrate::calibrate;
use masa::corpus::Batch;
use masa::stats::{Stats, StatsMeta};

fn empty_meta() -> StatsMeta {
    StatsMeta {
        format: masa::stats::FORMAT.into(),
        source_hash: "test".into(),
        source: "tiny".into(),
        arch: "olmoe".into(),
        corpus: vec!["synthetic".into()],
        tokens: 0,
        seq_len: 0,
        seeds: vec![0],
        dataset_tokens: Default::default(),
        masa_version: "test".into(),
        experts: None,
    }
}

fn tiny_batches(spec: &Spec, seed: u64, n: usize) -> Vec<Batch> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|k| Batch { ids: (0..2 * 6).map(|_| rng.below(spec.vocab) as u32).collect(), batch: 2, seq_len: 6, dataset: vec![k % 2; 2] })
        .collect()
}

fn run_calibration(source: &SourceWeights, batches: Vec<Batch>) -> Stats {
    let datasets = vec!["a".to_string(), "b".to_string()];
    calibrate(source, batches.into_iter().map(Ok), &datasets, empty_meta(), &mut |_| {}).unwrap()
}

#[test]
fn calibration_shards_merge_to_one_pass_and_count_routing() {
    let spec = Spec::olmoe();
    let dir = tempfile::tempdir().unwrap();
    let ck = spec.weights(17);
    ck.write(dir.path(), Dtype::F32, 1);
    write_config(dir.path(), &spec.config_json());
    let w = SourceWeights::open(dir.path()).unwrap();

    let all = run_calibration(&w, tiny_batches(&spec, 1, 4));
    let mut first = run_calibration(&w, tiny_batches(&spec, 1, 4).into_iter().take(2).collect());
    let second = run_calibration(&w, tiny_batches(&spec, 1, 4).into_iter().skip(2).collect());
    // Shards go through the file format, as `masa stats merge` does.
    let f = dir.path().join("second.safetensors");
    second.save(&f).unwrap();
    first.merge(&Stats::load(&f).unwrap(), "second").unwrap();
    assert_eq!(first.meta.tokens, all.meta.tokens);
    assert_eq!(first.routing, all.routing, "routing counts are integers and must add exactly");
    assert_eq!(first.moments.keys().collect::<Vec<_>>(), all.moments.keys().collect::<Vec<_>>());
    for (k, m) in &all.moments {
        let got = &first.moments[k];
        assert_eq!(got.count, m.count, "{k}");
        for (a, b) in got.xxt.iter().zip(&m.xxt) {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{k}: {a} vs {b}");
        }
    }
    // Every token is routed to top_k experts in each layer, and each expert's input site
    // counts exactly the tokens routed to it.
    for l in 0..spec.layers {
        let total: f64 = ["a", "b"].iter().map(|d| all.routing[&masa::stats::routing_key(l, d)].iter().sum::<f64>()).sum();
        assert_eq!(total, (all.meta.tokens as usize * spec.top_k) as f64);
        for e in 0..spec.experts {
            let routed: f64 = ["a", "b"].iter().map(|d| all.routing[&masa::stats::routing_key(l, d)][e]).sum();
            let site = all.moments.get(&masa::stats::moment_key(l, &format!("experts.{e}.ffn_in")));
            assert_eq!(site.map_or(0.0, |m| m.count), routed, "layer {l} expert {e}");
        }
    }
    assert_eq!(all.meta.dataset_tokens["a"] + all.meta.dataset_tokens["b"], all.meta.tokens);
}

#[test]
fn extraction_keeps_the_most_routed_expert_and_refuses_foreign_stats() {
    let spec = Spec::olmoe();
    let dir = tempfile::tempdir().unwrap();
    spec.weights(23).write(dir.path(), Dtype::F32, 1);
    write_config(dir.path(), &spec.config_json());
    let w = SourceWeights::open(dir.path()).unwrap();
    let mut stats = run_calibration(&w, tiny_batches(&spec, 5, 40));
    let hash = w.fingerprint().unwrap();
    stats.meta.source_hash = hash.clone();
    let chosen = masa::extract::select_matrices(&w, &stats, &Default::default()).unwrap().matrices;
    for l in 0..spec.layers {
        let freq: Vec<f64> = (0..spec.experts)
            .map(|e| {
                ["a", "b"]
                    .iter()
                    .map(|d| {
                        let c = &stats.routing[&masa::stats::routing_key(l, d)];
                        c[e] / c.iter().sum::<f64>()
                    })
                    .sum()
            })
            .collect();
        let best = (0..spec.experts).max_by(|&a, &b| freq[a].total_cmp(&freq[b]).then(b.cmp(&a))).unwrap();
        let experts: Vec<_> = chosen.iter().filter(|m| m.layer == l).map(|m| m.expert).collect();
        assert_eq!(experts, vec![Some(best); 3], "layer {l}: gate/up/down of the most frequent expert");
    }
    let opts = masa::extract::ExtractOptions { rank: masa::align::RankSpec::Rank(4), lambda: 0.1, ..Default::default() };
    let genes = masa::extract::extract(&w, &hash, &stats, &opts, &|_| {}).unwrap();
    assert_eq!(genes.genes.len(), 3 * spec.layers);
    assert!(genes.genes.keys().all(|k| k.contains(".mlp.experts.") && k.ends_with(".gene")));
    // Statistics of another model are refused, naming the file.
    stats.meta.source_hash = "0123456789abcdef".into();
    let err = masa::extract::check_stats_match(&w, &hash, &stats, std::path::Path::new("other.safetensors")).unwrap_err().to_string();
    assert!(err.contains("other.safetensors") && err.contains("another model"), "{err}");
    // A rank the matrices cannot hold is refused before any work.
    stats.meta.source_hash = hash.clone();
    let too_big = masa::extract::ExtractOptions { rank: masa::align::RankSpec::Rank(spec.moe_inter + 1), ..opts };
    let err = masa::extract::extract(&w, &hash, &stats, &too_big, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("gene rank") && err.contains("mlp.experts"), "{err}");
}

/// A small OLMoE checkpoint in a temporary directory, its weights and statistics of 2 batches.
fn small_olmoe_statistics() -> (tempfile::TempDir, SourceWeights, Stats) {
    let spec = Spec::olmoe();
    let dir = tempfile::tempdir().unwrap();
    spec.weights(3).write(dir.path(), Dtype::F32, 1);
    write_config(dir.path(), &spec.config_json());
    let w = SourceWeights::open(dir.path()).unwrap();
    let stats = run_calibration(&w, tiny_batches(&spec, 2, 2));
    (dir, w, stats)
}

#[test]
fn statistics_with_nan_are_refused_and_empty_calibration_is_an_error() {
    let (dir, w, mut stats) = small_olmoe_statistics();
    stats.moments.values_mut().next().unwrap().xxt[3] = f64::NAN;
    let f = dir.path().join("nan.safetensors");
    stats.save(&f).unwrap();
    let err = Stats::load(&f).unwrap_err().to_string();
    assert!(err.contains("nan.safetensors") && err.contains("non-finite"), "{err}");
    let datasets = vec!["a".to_string()];
    let err = calibrate(&w, std::iter::empty(), &datasets, empty_meta(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("no tokens"), "{err}");
}

/// NaN or Inf in a source's weights is an error naming the tensor, not a silent wrong answer
/// (issue 17): here an RMSNorm weight and an attention matrix.
#[test]
fn non_finite_source_weights_are_errors() {
    let spec = Spec::olmoe();
    for (name, bad) in [("model.layers.0.input_layernorm.weight", f32::NAN), ("model.layers.1.self_attn.q_proj.weight", f32::INFINITY)] {
        let dir = tempfile::tempdir().unwrap();
        let mut ck = spec.weights(3);
        ck.tensors.get_mut(name).unwrap_or_else(|| panic!("no {name}")).1[1] = bad;
        ck.write(dir.path(), Dtype::F32, 1);
        write_config(dir.path(), &spec.config_json());
        let w = SourceWeights::open(dir.path()).unwrap();
        let e = Transformer::load(&w).err().expect("corrupt weights must be refused").to_string();
        assert!(e.contains(name) && e.contains("NaN or Inf") && e.contains("element 1"), "{e}");
    }
}

/// Crafted statistics files (a second moment that is not square, a token count with no value,
/// a non-ASCII source hash) are clear errors or render, never a panic (issue 17).
#[test]
fn crafted_statistics_are_clear_errors_not_panics() {
    let (dir, _, mut stats) = small_olmoe_statistics();
    let good = dir.path().join("good.safetensors");
    stats.save(&good).unwrap();
    // Rewrite the file with one tensor replaced by `(shape, values)`.
    let rewrite = |suffix: &str, shape: Vec<usize>, values: Vec<f64>, out: &str| {
        let bytes = std::fs::read(&good).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut done = false;
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in st.tensors() {
            if !done && name.ends_with(suffix) {
                done = true;
                owned.push((name, shape.clone(), values.iter().flat_map(|v| v.to_le_bytes()).collect()));
            } else {
                owned.push((name, view.shape().to_vec(), view.data().to_vec()));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
            .iter()
            .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F64, s.clone(), d).unwrap()))
            .collect();
        let p = dir.path().join(out);
        std::fs::write(&p, safetensors::serialize(views, header.metadata().clone()).unwrap()).unwrap();
        p
    };
    let e = Stats::load(&rewrite(".xxt", vec![4], vec![1.0; 4], "flat.safetensors")).unwrap_err().to_string();
    assert!(e.contains("flat.safetensors") && e.contains("square"), "{e}");
    let e = Stats::load(&rewrite(".count", vec![0], vec![], "nocount.safetensors")).unwrap_err().to_string();
    assert!(e.contains("nocount.safetensors") && e.contains("token count"), "{e}");
    // Byte 12 falls inside a two-byte character: slicing the hash by bytes would panic.
    stats.meta.source_hash = "aéééééééééééééé".into();
    let odd = dir.path().join("odd.safetensors");
    stats.save(&odd).unwrap();
    let text = masa::inspect::render_stats(&Stats::load(&odd).unwrap()).unwrap();
    assert!(text.contains("aééééééééééé…"), "{text}");
}

/// `calibrate --experts k`: a routing-only first pass picks each MoE layer's k most-routed
/// experts, and the statistics pass keeps exactly the full pass's sums for those experts (and
/// for shared experts and dense layers), none for the others, with the same routing counts.
/// Extraction with k experts from them gives the genes the full statistics give; asking for
/// more experts than were kept, and merging such statistics, are refused. OLMoE (k = 2) and
/// DeepSeekMoE (k = 1, and k = 0: shared experts only, no first pass), full and rank-specific.
#[test]
fn statistics_of_the_most_routed_experts_equal_the_full_ones_for_them() {
    let datasets = vec!["a".to_string(), "b".to_string()];
    for (spec, k, rank) in [
        (Spec::olmoe(), 2, None),
        (Spec::deepseek(), 1, None),
        (Spec::deepseek(), 0, None),
        (Spec::olmoe(), 1, Some(masa::align::RankSpec::Rank(5))),
    ] {
        let dir = tempfile::tempdir().unwrap();
        spec.weights(31).write(dir.path(), Dtype::F32, 1);
        write_config(dir.path(), &spec.config_json());
        let w = SourceWeights::open(dir.path()).unwrap();
        let hash = w.fingerprint().unwrap();
        let pass = |experts| masa::calibrate::PassOptions { rank, block_tokens: 24, layers: None, experts, device: Default::default() };
        let run = |experts| {
            let mut s = masa::calibrate::calibrate_with(
                &w,
                tiny_batches(&spec, 8, 6).into_iter().map(Ok),
                &datasets,
                empty_meta(),
                &pass(experts),
                &mut |_| {},
            )
            .unwrap();
            s.meta.source_hash = hash.clone();
            s
        };
        let (full, kept) = (run(None), run(Some(k)));
        let what = format!("{:?} k={k} rank={rank:?}", spec.family);
        assert_eq!(kept.meta.experts, Some(k), "{what}");
        assert_eq!(kept.routing, full.routing, "{what}");
        let n_routed = spec.experts;
        let mut kept_experts = 0;
        for l in (0..spec.layers).filter(|&l| w.config.is_moe_layer(l)) {
            let top = full.most_routed(l, n_routed, k).unwrap();
            for e in 0..n_routed {
                // Full mode: `layers.L.experts.E.<site>`; rank mode: `layers.L.mlp.experts.E.<proj>.rR.*`.
                let mine = |key: &str| {
                    key.starts_with(&format!("layers.{l}.experts.{e}.")) || key.starts_with(&format!("layers.{l}.mlp.experts.{e}."))
                };
                let of = |st: &Stats| {
                    let m: Vec<_> =
                        st.moments.iter().filter(|(key, _)| mine(key)).map(|(key, m)| (key.clone(), m.xxt.clone(), m.count)).collect();
                    let c: Vec<_> = st.cross.iter().filter(|(key, _)| mine(key)).map(|(key, v)| (key.clone(), v.clone())).collect();
                    (m, c)
                };
                if top.contains(&e) {
                    assert_eq!(of(&kept), of(&full), "{what}: layer {l} expert {e} kept, its sums must equal the full pass's");
                    kept_experts += usize::from(!of(&full).0.is_empty());
                } else {
                    assert!(
                        of(&kept).0.is_empty() && of(&kept).1.is_empty(),
                        "{what}: layer {l} expert {e} is not among the {k} most routed {top:?}"
                    );
                }
            }
        }
        assert_eq!(kept_experts, k * (0..spec.layers).filter(|&l| w.config.is_moe_layer(l)).count(), "{what}");
        // Everything that is not a routed expert (dense layers, shared experts) is kept whole.
        for (key, m) in full.moments.iter().filter(|(key, _)| !key.contains(".experts.")) {
            assert_eq!(kept.moments.get(key), Some(m), "{what}: {key}");
        }
        assert!(
            full.moments.keys().any(|key| !key.contains(".experts.")) || spec.n_shared == 0,
            "{what}: shared experts and dense layers have sums"
        );
        let (experts, routed_with_shared) = if spec.n_shared > 0 { (1, k) } else { (k, 0) };
        let opts = masa::extract::ExtractOptions {
            rank: rank.unwrap_or(masa::align::RankSpec::Rank(4)),
            lambda: 0.1,
            experts,
            routed_with_shared,
            ..Default::default()
        };
        let (a, b) = (
            masa::extract::extract(&w, &hash, &full, &opts, &|_| {}).unwrap(),
            masa::extract::extract(&w, &hash, &kept, &opts, &|_| {}).unwrap(),
        );
        assert_eq!(a.genes, b.genes, "{what}: genes from the kept experts' statistics");
        let more = if spec.n_shared > 0 {
            masa::extract::ExtractOptions { routed_with_shared: k + 1, ..opts }
        } else {
            masa::extract::ExtractOptions { experts: k + 1, ..opts }
        };
        let e = masa::extract::extract(&w, &hash, &kept, &more, &|_| {}).unwrap_err().to_string();
        assert!(e.contains(&format!("only the {k} most-routed experts")) && e.contains(&format!("--experts {}", k + 1)), "{what}: {e}");
        let e = full.clone().merge(&kept, "kept.safetensors").unwrap_err().to_string();
        assert!(e.contains("kept.safetensors") && e.contains("--experts"), "{what}: {e}");
        // The option's checks against the source, before any work.
        let opts = masa::calibrate::CalibrateOptions {
            tokens: 64,
            seq_len: 8,
            batch: 2,
            seed: 0,
            domains: None,
            rank: None,
            layers: None,
            shard: None,
            experts: Some(k),
            device: Default::default(),
        };
        opts.check_experts(&w.config).unwrap();
        let e = masa::calibrate::CalibrateOptions { experts: Some(n_routed + 1), ..opts.clone() }
            .check_experts(&w.config)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("--experts {}: must be in 0..={n_routed}", n_routed + 1)), "{e}");
        let e = masa::calibrate::CalibrateOptions { shard: Some("0/2".parse().unwrap()), ..opts }
            .check_experts(&w.config)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--shard"), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    Spec::olmo().weights(3).write(dir.path(), Dtype::F32, 1);
    write_config(dir.path(), &Spec::olmo().config_json());
    let dense = SourceWeights::open(dir.path()).unwrap();
    let opts = masa::calibrate::CalibrateOptions {
        tokens: 64,
        seq_len: 8,
        batch: 2,
        seed: 0,
        domains: None,
        rank: None,
        layers: None,
        shard: None,
        experts: Some(1),
        device: Default::default(),
    };
    let e = opts.check_experts(&dense.config).unwrap_err().to_string();
    assert!(e.contains("--experts 1: the source is dense"), "{e}");
}

#[test]
fn rank_specific_statistics_give_the_same_alignment_as_full_ones() {
    // OLMoE: dense-free, so experts (top-k routed rows) and both sites are exercised.
    let spec = Spec::olmoe();
    let dir = tempfile::tempdir().unwrap();
    spec.weights(29).write(dir.path(), Dtype::F32, 1);
    write_config(dir.path(), &spec.config_json());
    let w = SourceWeights::open(dir.path()).unwrap();
    let rank = masa::align::RankSpec::Rank(5);
    let datasets = vec!["a".to_string(), "b".to_string()];
    let full = run_calibration(&w, tiny_batches(&spec, 8, 6));
    // Blocks of 2 batches: each layer's targets are rebuilt per block.
    let small = masa::calibrate::calibrate_with(
        &w,
        tiny_batches(&spec, 8, 6).into_iter().map(Ok),
        &datasets,
        empty_meta(),
        &masa::calibrate::PassOptions { rank: Some(rank), block_tokens: 24, layers: None, experts: None, device: Default::default() },
        &mut |_| {},
    )
    .unwrap();
    assert!(small.moments.keys().all(|k| k.contains(".r5.block")), "no full moments in rank-specific mode");
    assert_eq!(small.routing, full.routing);
    let mut checked = 0;
    for m in w.config.ffn_matrices() {
        let site = masa::stats::moment_key(m.layer, &m.stats_site());
        if !full.moments.contains_key(&site) {
            continue; // an expert no token was routed to
        }
        let layout = masa::align::Layout::new(m.d_out, m.d_in, 5).unwrap();
        let wv = w.tensor(&m.name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let a = masa::extract::output_alignment(&full, &m, &wv, layout).unwrap();
        let b = masa::extract::output_alignment(&small, &m, &wv, layout).unwrap();
        let (ma, mb) = (a.closed_form(1e-9).unwrap(), b.closed_form(1e-9).unwrap());
        let (la, lb) = (a.loss_grad(&ma).0, b.loss_grad(&mb).0);
        assert!((la - lb).abs() <= 1e-6 * la.abs().max(1e-12), "{}: L_out {la} vs {lb}", m.name);
        assert!((a.trace_wsw - b.trace_wsw).abs() <= 1e-5 * a.trace_wsw, "{}: energy", m.name);
        for u in 0..5 {
            for v in 0..5 {
                assert!((ma[(u, v)] - mb[(u, v)]).abs() <= 1e-4 * ma[(u, v)].abs().max(1.0), "{}: gene differs", m.name);
            }
        }
        checked += 1;
    }
    assert!(checked >= 6, "checked {checked} matrices");
    // Through the file format and extraction: rank-specific statistics are enough at their rank,
    // and another rank is refused with a clear message.
    let f = dir.path().join("rank.safetensors");
    let mut small = small;
    small.meta.source_hash = w.fingerprint().unwrap();
    small.save(&f).unwrap();
    let loaded = Stats::load(&f).unwrap();
    let opts = masa::extract::ExtractOptions { rank, lambda: 0.0, ..Default::default() };
    let hash = w.fingerprint().unwrap();
    assert!(masa::extract::extract(&w, &hash, &loaded, &opts, &|_| {}).is_ok());
    let other = masa::extract::ExtractOptions { rank: masa::align::RankSpec::Rank(4), ..opts };
    let err = masa::extract::extract(&w, &hash, &loaded, &other, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("rank-specific") || err.contains(".r4."), "{err}");
}

#[path = "train_common/mod.rs"]
mod train_common;

/// MoE sources end to end (issue 12): calibrate → extract → `masa init` of a dense student →
/// 10 training steps. OLMoE's genes come from its most routed experts, DeepSeekMoE's from its
/// shared experts (routed ones only when asked) and its leading dense layer; each student FFN
/// records which gene fills which block of its intermediate dimension.
#[test]
fn moe_genes_reach_a_dense_student_that_trains() {
    use masa::init::{InitOptions, InitRequest, Strategy};
    for (spec, experts, routed_with_shared, sets) in [
        (Spec { vocab: 257, ..Spec::olmoe() }, 2, 0, [2, 2]),
        (Spec { vocab: 257, ..Spec::deepseek() }, 1, 0, [1, 1]),
        (Spec { vocab: 257, ..Spec::deepseek() }, 1, 1, [1, 2]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        spec.weights(31).write(dir.path(), Dtype::F32, 1);
        write_config(dir.path(), &spec.config_json());
        train_common::byte_tokenizer().save_hf(dir.path()).unwrap();
        let source = masa::source::SourceModel::open(dir.path()).unwrap();
        let hash = source.fingerprint().unwrap();
        let mut stats = run_calibration(&source.weights, tiny_batches(&spec, 7, 20));
        stats.meta.source_hash = hash.clone();
        let opts = masa::extract::ExtractOptions {
            rank: masa::align::RankSpec::Rank(4),
            lambda: 0.1,
            experts,
            routed_with_shared,
            ..Default::default()
        };
        let genes = masa::extract::extract(&source.weights, &hash, &stats, &opts, &|_| {}).unwrap();
        let names: Vec<&String> = genes.genes.keys().collect();
        let routed = names.iter().filter(|n| n.contains(".experts.")).count();
        let shared = names.iter().filter(|n| n.contains(".shared_experts.")).count();
        let dense = names.len() - routed - shared;
        match spec.family {
            Family::Olmoe => assert_eq!((dense, shared, routed), (0, 0, 3 * experts * spec.layers)),
            _ => assert_eq!((dense, shared, routed), (3, 3 * (spec.layers - 1), 3 * routed_with_shared * (spec.layers - 1))),
        }
        for (l, kept) in &genes.meta.experts_kept {
            assert_eq!(kept.len(), if spec.family == Family::Olmoe { experts } else { routed_with_shared }, "layer {l}");
        }
        let gene_path = dir.path().join("genes.safetensors");
        genes.save(&gene_path).unwrap();

        let student = dir.path().join("student.toml");
        std::fs::write(
            &student,
            "hidden_size = 16\nintermediate_size = 24\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 1\n",
        )
        .unwrap();
        let out = dir.path().join("student");
        let req = InitRequest {
            student: student.to_string_lossy().into_owned(),
            out: out.clone(),
            source: dir.path().to_path_buf(),
            genes: Some(gene_path),
            stats: None,
            corpus: Vec::new(),
            options: InitOptions::new(Strategy::Masa),
        };
        masa::init::run(&req).unwrap();
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("masa.json")).unwrap()).unwrap();
        let text = record.to_string();
        let matrices = text.matches("\"source_layer\"").count();
        assert_eq!(matrices, 6, "{text}");
        // student layer t <- source layer round(t (L_s - 1) / (L_t - 1)): 0 and L_s - 1.
        // The record of the gene named `gene` in the student's masa.json.
        let used = |gene: &str| -> serde_json::Value {
            record["init"]["matrices"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|m| m["genes"].as_array().cloned().unwrap_or_default())
                .find(|g| g["gene"] == gene)
                .unwrap_or_else(|| panic!("{gene} not used: {text}"))
        };
        match spec.family {
            Family::Olmoe => {
                let best = &genes.meta.experts_kept[&1][0];
                let g = used(&format!("layers.1.mlp.experts.{best}.gate_proj.gene"));
                assert_eq!((g["rank"].clone(), g["rows"].clone()), (serde_json::json!(4), serde_json::json!([0, 12])), "{text}");
            }
            _ => {
                let g = used("layers.0.mlp.gate_proj.gene");
                assert_eq!((g["rank"].clone(), g["rows"].clone()), (serde_json::json!(4), serde_json::json!([0, 24])), "{text}");
                let last = spec.layers - 1;
                let block = if sets[1] == 1 { 24 } else { 12 };
                assert_eq!(used(&format!("layers.{last}.mlp.shared_experts.down_proj.gene"))["rank"], 4, "{text}");
                assert!(text.contains(&format!("\"columns\":[0,{block}]")), "{text}");
            }
        }
        let corpus = dir.path().join("corpus.jsonl");
        train_common::write_corpus(&corpus, 40);
        trains_ten_steps(&out, &corpus, &dir.path().join("run"));
    }
}

/// The student at `model` trains 10 steps on `corpus` with finite losses.
fn trains_ten_steps(model: &Path, corpus: &Path, out: &Path) {
    let t = masa::train::TrainOptions {
        corpus: vec![corpus.to_path_buf()],
        out: out.to_path_buf(),
        tokens: 10 * 2 * 16,
        batch: 2,
        seq_len: 16,
        warmup: 1,
        eval_seqs: 1,
        progress: false,
        ..Default::default()
    };
    let s = masa::train::train(model, &t).unwrap();
    assert_eq!(s.steps, 10);
    assert!(s.final_loss.is_finite() && s.final_val.values().all(|v| v.is_finite()));
}

/// EEP (issue 12): on the synthetic OLMoE and DeepSeekMoE checkpoints the search's best
/// fitness (source NLL on calibration tokens with the merged dense FFNs) never rises, ends
/// below its starting point (prune's choice), `masa.json` records it, and the student trains.
/// A dense source is refused with the strategy to use instead.
#[test]
fn eep_merges_experts_below_prunes_loss_and_the_student_trains() {
    use masa::init::{eep::EepOptions, InitOptions, InitRequest, Strategy};
    for spec in [Spec { vocab: 257, ..Spec::olmoe() }, Spec { vocab: 257, ..Spec::deepseek() }] {
        let dir = tempfile::tempdir().unwrap();
        spec.weights(5).write(dir.path(), Dtype::F32, 1);
        write_config(dir.path(), &spec.config_json());
        train_common::byte_tokenizer().save_hf(dir.path()).unwrap();
        let source = masa::source::SourceModel::open(dir.path()).unwrap();
        let mut stats = run_calibration(&source.weights, tiny_batches(&spec, 7, 20));
        stats.meta.source_hash = source.fingerprint().unwrap();
        let stats_path = dir.path().join("stats.safetensors");
        stats.save(&stats_path).unwrap();
        let corpus = dir.path().join("corpus.jsonl");
        train_common::write_corpus(&corpus, 40);
        let student = dir.path().join("student.toml");
        std::fs::write(
            &student,
            "hidden_size = 16\nintermediate_size = 24\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 1\n",
        )
        .unwrap();
        let out = dir.path().join("student");
        let eep = EepOptions { population: 6, generations: 6, tokens: 256, seq_len: 32, sigma: 0.1 };
        let req = InitRequest {
            student: student.to_string_lossy().into_owned(),
            out: out.clone(),
            source: dir.path().to_path_buf(),
            genes: None,
            stats: Some(stats_path.clone()),
            corpus: vec![corpus.clone()],
            options: InitOptions { eep: Some(eep.clone()), ..InitOptions::new(Strategy::Eep) },
        };
        masa::init::run(&req).unwrap();
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("masa.json")).unwrap()).unwrap();
        let fit: Vec<f64> = record["init"]["eep"]["fitness"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(fit.len(), eep.generations + 1, "{record}");
        assert!(fit.windows(2).all(|w| w[1] <= w[0]), "best fitness rose: {fit:?}");
        assert!(fit[fit.len() - 1] < fit[0] - 1e-6, "no improvement over prune's start: {fit:?}");
        // Every MoE layer the student inherits (layers 0 and L-1; DeepSeek's layer 0 is dense).
        let searched: Vec<u64> = record["init"]["eep"]["layers"].as_array().unwrap().iter().map(|l| l["layer"].as_u64().unwrap()).collect();
        let last = spec.layers as u64 - 1;
        assert_eq!(searched, if spec.family == Family::Olmoe { vec![0, last] } else { vec![last] }, "{record}");
        assert!(record["init"]["ffn"].to_string().contains("merged.0"), "{record}");
        trains_ten_steps(&out, &corpus, &dir.path().join("run"));
        // Same seed, same inputs: the same student.
        let again = InitRequest { out: dir.path().join("again"), ..req };
        masa::init::run(&again).unwrap();
        let a = std::fs::read(out.join("model.safetensors")).unwrap();
        let b = std::fs::read(dir.path().join("again/model.safetensors")).unwrap();
        assert!(a == b, "EEP is not deterministic");
    }
    // A dense source: refused before any search, naming the alternative.
    let spec = Spec { vocab: 257, ..Spec::olmo() };
    let dir = tempfile::tempdir().unwrap();
    spec.weights(5).write(dir.path(), Dtype::F32, 1);
    write_config(dir.path(), &spec.config_json());
    train_common::byte_tokenizer().save_hf(dir.path()).unwrap();
    let source = masa::source::SourceModel::open(dir.path()).unwrap();
    let mut stats = run_calibration(&source.weights, tiny_batches(&spec, 7, 4));
    stats.meta.source_hash = source.fingerprint().unwrap();
    stats.save(&dir.path().join("stats.safetensors")).unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    train_common::write_corpus(&corpus, 10);
    let req = InitRequest {
        student: "tiny".into(),
        out: dir.path().join("student"),
        source: dir.path().to_path_buf(),
        genes: None,
        stats: Some(dir.path().join("stats.safetensors")),
        corpus: vec![corpus],
        options: InitOptions::new(Strategy::Eep),
    };
    let student = dir.path().join("student.toml");
    std::fs::write(
        &student,
        "hidden_size = 16\nintermediate_size = 24\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 1\n",
    )
    .unwrap();
    let req = InitRequest { student: student.to_string_lossy().into_owned(), ..req };
    let err = masa::init::run(&req).unwrap_err().to_string();
    assert!(err.contains("is dense") && err.contains("--strategy prune"), "{err}");
    assert!(!dir.path().join("student").exists());
}

/// The RoPE base is read where transformers 5 writes it (`rope_parameters`, per layer type for
/// Gemma 3) as well as at the top level; scaled RoPE (`rope_type` other than `default`, in
/// `rope_parameters` or in the older `rope_scaling`) and two disagreeing bases are refused
/// naming the field, never read with the field silently ignored.
#[test]
fn rope_parameters_are_read_and_scaled_rope_is_refused() {
    use masa::source::ModelConfig;
    let path = Path::new("/models/x/config.json");
    let llama = |extra: serde_json::Value| {
        let mut c = json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ModelConfig::from_hf_config(path, &c)
    };
    // transformers 5 (SmolLM2 saved by 5.25), the older top-level key, both agreeing, neither.
    assert_eq!(llama(json!({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})).unwrap().rope_theta, 100000.0);
    assert_eq!(llama(json!({"rope_theta": 50000.0})).unwrap().rope_theta, 50000.0);
    assert_eq!(
        llama(json!({"rope_theta": 50000.0, "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"}})).unwrap().rope_theta,
        50000.0
    );
    assert_eq!(llama(json!({"rope_scaling": null})).unwrap().rope_theta, 10000.0);
    let err = |v: serde_json::Value| llama(v).unwrap_err().to_string();
    let e = err(json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}}));
    assert!(e.contains("config.json") && e.contains("`rope_parameters`") && e.contains("`llama3` is not supported"), "{e}");
    let e = err(json!({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}));
    assert!(e.contains("`rope_scaling`") && e.contains("`linear`"), "{e}");
    let e = err(json!({"rope_theta": 10000.0, "rope_parameters": {"rope_theta": 100000.0}}));
    assert!(e.contains("rope_parameters.rope_theta") && e.contains("disagrees"), "{e}");
    let e = err(json!({"rope_parameters": {"rope_theta": "fast"}}));
    assert!(e.contains("rope_parameters.rope_theta") && e.contains("expected a number"), "{e}");

    // Gemma 3 in transformers 5: one entry per layer type; local and global bases apart.
    let gemma = |rope: serde_json::Value| {
        let c = json!({"architectures": ["Gemma3ForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 4,
            "rope_parameters": rope});
        ModelConfig::from_hf_config(path, &c)
    };
    let c = gemma(json!({"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"}, "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}})).unwrap();
    assert_eq!((c.rope_theta, c.rope_local_theta), (1000000.0, Some(10000.0)));
    let e = gemma(json!({"full_attention": {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 8.0}, "sliding_attention": {"rope_theta": 10000.0}}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope_parameters.full_attention") && e.contains("`linear`"), "{e}");
}
