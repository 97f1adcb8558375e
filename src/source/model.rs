//! The forward pass of every source architecture, f32, inference only (no gradients: the
//! fused candle ops used here are fine without a backward pass; students train through
//! `crate::train`).
//!
//! One decoder, parametrised by [`ModelConfig`]: each architecture differs only in its norms,
//! q/k treatment, post-norms, activation and FFN kind (dense, routed experts, shared experts).
//! Hooks expose, per layer, the input of every FFN weight matrix (gate/up read `ffn_in`, down
//! reads `ffn_mid`) and, for MoE layers, the routing decisions. Calibration (`crate::calibrate`)
//! accumulates its statistics through these hooks.

use candle_core::{DType, Device, IndexOp, Tensor, D};

use crate::error::{MasaError, Result};
use crate::source::{Activation, Arch, ModelConfig, NormKind, QkNorm, SourceWeights};

/// Which FFN of a layer a hook call refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MlpId {
    Dense,
    Expert(usize),
    Shared,
}

impl MlpId {
    /// The name of one of this FFN's input sites in a statistics file.
    pub fn site_name(self, site: Site) -> String {
        match self {
            MlpId::Dense => site.name().to_string(),
            MlpId::Expert(e) => format!("experts.{e}.{}", site.name()),
            MlpId::Shared => format!("shared.{}", site.name()),
        }
    }
}

/// The input site of an FFN weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// Input of gate_proj and up_proj (the post-norm hidden state).
    FfnIn,
    /// Input of down_proj: `act(gate x) ⊙ up x`.
    FfnMid,
}

impl Site {
    pub fn name(self) -> &'static str {
        match self {
            Site::FfnIn => "ffn_in",
            Site::FfnMid => "ffn_mid",
        }
    }
}

/// Observers of the forward pass. `x` is `(tokens, d)`: the rows that reach this FFN.
pub trait Hooks {
    fn ffn_input(&mut self, _layer: usize, _mlp: MlpId, _site: Site, _x: &Tensor) -> Result<()> {
        Ok(())
    }
    /// `experts[t * top_k + j]` is the j-th expert chosen for token t.
    fn routing(&mut self, _layer: usize, _experts: &[u32], _top_k: usize) -> Result<()> {
        Ok(())
    }
    /// Whether FFN inputs are wanted at all (skips computing/copying them when not).
    fn wants_ffn_inputs(&self) -> bool {
        true
    }
    /// The last layer whose hooks matter: the forward pass stops after it. `None`: all layers.
    fn last_layer(&self) -> Option<usize> {
        None
    }
}

/// Hooks that observe nothing.
pub struct NoHooks;

impl Hooks for NoHooks {
    fn wants_ffn_inputs(&self) -> bool {
        false
    }
}

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    /// `x (n, in) -> (n, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Norm {
    kind: NormKind,
    /// Effective scale (`1 + w` for Gemma); `None` for parameter-free LayerNorm.
    alpha: Option<Tensor>,
    eps: f32,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match (&self.kind, &self.alpha) {
            (NormKind::LayerNormNoParams, _) => {
                let d = x.dim(D::Minus1)?;
                let ones = Tensor::ones(d, DType::F32, x.device())?;
                let zeros = Tensor::zeros(d, DType::F32, x.device())?;
                candle_nn::ops::layer_norm(x, &ones, &zeros, self.eps)?
            }
            (_, Some(a)) => candle_nn::ops::rms_norm(x, a, self.eps)?, // inference only: no backward needed
            (_, None) => return Err(MasaError::Shape("RMSNorm without weight".into())),
        })
    }
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor, layer: usize, id: MlpId, hooks: &mut dyn Hooks) -> Result<Tensor> {
        if hooks.wants_ffn_inputs() {
            hooks.ffn_input(layer, id, Site::FfnIn, x)?;
        }
        let g = self.gate.forward(x)?;
        let g = match self.act {
            Activation::Silu => candle_nn::ops::silu(&g)?,
            Activation::GeluTanh => g.gelu()?,
        };
        let mid = (g * self.up.forward(x)?)?;
        if hooks.wants_ffn_inputs() {
            hooks.ffn_input(layer, id, Site::FfnMid, &mid)?;
        }
        self.down.forward(&mid)
    }
}

enum Ffn {
    Dense(Mlp),
    Moe { router: Tensor, experts: Vec<Mlp>, shared: Option<Mlp>, top_k: usize, norm_topk_prob: bool },
}

impl Ffn {
    fn forward(&self, x: &Tensor, layer: usize, hooks: &mut dyn Hooks) -> Result<Tensor> {
        match self {
            Ffn::Dense(m) => m.forward(x, layer, MlpId::Dense, hooks),
            Ffn::Moe { router, experts, shared, top_k, norm_topk_prob } => {
                let (n, d) = x.dims2()?;
                let probs = candle_nn::ops::softmax_last_dim(&x.matmul(&router.t()?)?)?; // inference only
                let probs = probs.to_vec2::<f32>()?;
                let (chosen, weights) = route_top_k(&probs, *top_k, *norm_topk_prob);
                hooks.routing(layer, &chosen, *top_k)?;
                let mut out = Tensor::zeros((n, d), DType::F32, x.device())?;
                for (e, expert) in experts.iter().enumerate() {
                    let (rows, w): (Vec<u32>, Vec<f32>) = chosen
                        .iter()
                        .zip(&weights)
                        .enumerate()
                        .filter(|(_, (c, _))| **c as usize == e)
                        .map(|(i, (_, w))| ((i / top_k) as u32, *w))
                        .unzip();
                    if rows.is_empty() {
                        continue;
                    }
                    let idx = Tensor::new(rows.as_slice(), x.device())?;
                    let xe = x.index_select(&idx, 0)?;
                    let ye = expert.forward(&xe, layer, MlpId::Expert(e), hooks)?;
                    let we = Tensor::new(w.as_slice(), x.device())?.unsqueeze(1)?;
                    out = out.index_add(&idx, &ye.broadcast_mul(&we)?, 0)?;
                }
                if let Some(s) = shared {
                    out = (out + s.forward(x, layer, MlpId::Shared, hooks)?)?;
                }
                Ok(out)
            }
        }
    }
}

/// Top-k experts per token by router probability (ties to the lower index, like `torch.topk`
/// on CPU for distinct values), optionally renormalised to sum to one (`norm_topk_prob`).
pub fn route_top_k(probs: &[Vec<f32>], top_k: usize, normalize: bool) -> (Vec<u32>, Vec<f32>) {
    let mut chosen = Vec::with_capacity(probs.len() * top_k);
    let mut weights = Vec::with_capacity(probs.len() * top_k);
    for p in probs {
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
        let top = &order[..top_k];
        let sum: f32 = top.iter().map(|&e| p[e]).sum();
        for &e in top {
            chosen.push(e as u32);
            weights.push(if normalize { p[e] / (sum + 1e-20) } else { p[e] });
        }
    }
    (chosen, weights)
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
}

/// One decoder layer's weights (f32). [`Transformer::load`] holds all of them; layer-sequential
/// passes bring one in at a time with [`Transformer::load_layer`].
pub struct Layer {
    attn_norm: Norm,
    post_attn_norm: Option<Norm>,
    ffn_norm: Norm,
    post_ffn_norm: Option<Norm>,
    attn: Attention,
    ffn: Ffn,
}

/// A decoder-only transformer in f32 on the CPU.
pub struct Transformer {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Option<Tensor>,
    /// Plain Llama models loaded whole: the same weights for the training engine.
    fused: Option<Fused>,
}

/// A plain Llama model ([`crate::student::plain_llama`]: SmolLM2, masa's students) as the
/// training engine holds it: flat parameters and an inference workspace. Forward passes that
/// observe no FFN inputs run on its fused kernels ([`crate::student::llama`]) instead of
/// candle's ops (`masa bench forward --path` measures both).
struct Fused {
    model: crate::student::llama::Llama,
    params: Vec<f32>,
    ws: std::sync::Mutex<Option<crate::student::llama::Workspace<f32>>>,
}

impl Fused {
    /// Logits `(b, t, vocab)` of ids `(b, t)`.
    fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?.to_vec1::<u32>()?;
        let mut guard = self.ws.lock().map_err(|_| MasaError::Invalid("a previous forward pass panicked".into()))?;
        let ws = self.model.infer(&self.params, &mut guard, &flat, b, t, &mut |_, _, _| true)?;
        Ok(Tensor::from_vec(self.model.logits(&self.params, ws), (b, t, self.model.cfg.vocab_size), &Device::Cpu)?)
    }
}

/// Which implementation runs a plain Llama model's forward pass (`masa bench forward --path`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum ForwardPath {
    /// The training engine's fused kernels where the model is plain Llama (the default).
    Fused,
    /// candle's ops, as for every other architecture.
    Candle,
}

impl Transformer {
    /// Build from source weights, dequantizing each tensor once.
    pub fn load(w: &SourceWeights) -> Result<Self> {
        let mut m = Self::load_without_layers(w)?;
        m.layers = (0..m.config.num_hidden_layers).map(|l| m.load_layer(w, l)).collect::<Result<_>>()?;
        m.fused = match crate::student::plain_llama(&m.config) {
            Some(cfg) => Some(Fused {
                params: crate::student::load_params(w, &cfg)?,
                model: crate::student::llama::Llama::new(&cfg),
                ws: std::sync::Mutex::new(None),
            }),
            None => None,
        };
        Ok(m)
    }

    /// Whether hook-less forward passes run on the training engine's kernels.
    pub fn runs_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// This model with its forward passes on `path` (a model that is not plain Llama always
    /// runs on candle).
    pub fn with_path(mut self, path: ForwardPath) -> Self {
        if path == ForwardPath::Candle {
            self.fused = None;
        }
        self
    }

    /// The model without its decoder layers (embedding, final norm, head), for passes that bring
    /// one layer in at a time ([`Self::load_layer`], [`Self::run_layer`]): memory is this plus
    /// one layer, whatever the depth.
    pub fn load_without_layers(w: &SourceWeights) -> Result<Self> {
        let c = w.config.clone();
        let h = c.hidden_size;
        let embed = w.tensor_shaped("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let norm = load_norm(w, &c, "model.norm", h)?;
        // Untied models must carry their own head: falling back to the embedding would
        // silently compute different logits.
        let lm_head = if c.tie_word_embeddings { None } else { Some(w.tensor_shaped("lm_head.weight", &[c.vocab_size, h])?) };
        Ok(Transformer { config: c, embed, layers: Vec::new(), norm, lm_head, fused: None })
    }

    /// Decoder layer `l` of `w` (which must be the weights this model was loaded from).
    pub fn load_layer(&self, w: &SourceWeights, l: usize) -> Result<Layer> {
        load_layer(w, &self.config, l)
    }

    /// The weight `(out, in)` of one FFN matrix (`proj`: gate_proj, up_proj, down_proj).
    pub fn ffn_weight(&self, layer: usize, mlp: MlpId, proj: &str) -> Option<&Tensor> {
        self.layers.get(layer)?.ffn_weight(mlp, proj)
    }

    /// Logits `(batch, seq, vocab)` for token ids `(batch, seq)`.
    pub fn forward(&self, ids: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        if let (Some(f), false, None) = (&self.fused, hooks.wants_ffn_inputs(), hooks.last_layer()) {
            return f.logits(ids);
        }
        let (b, t) = ids.dims2()?;
        let h = self.hidden_states(ids, hooks)?;
        let logits = h.matmul(&self.lm_head.as_ref().unwrap_or(&self.embed).t()?)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Final-norm hidden states `(batch * seq, hidden)`; un-normed after `hooks.last_layer()`
    /// when the hooks stop the pass early.
    pub fn hidden_states(&self, ids: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let pos = self.positions(t, ids.device())?;
        let mut x = self.embed(ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = self.run_layer(layer, l, &x, b, &pos, hooks)?;
            if hooks.last_layer() == Some(l) {
                return Ok(x);
            }
        }
        self.norm.forward(&x)
    }

    /// Hidden states `(batch * seq, hidden)` entering layer `to` (after layers `0..to`).
    pub fn hidden_before(&self, ids: &Tensor, to: usize, pos: &Positions, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let b = ids.dims2()?.0;
        let mut x = self.embed(ids)?;
        for (l, layer) in self.layers.iter().enumerate().take(to) {
            x = self.run_layer(layer, l, &x, b, pos, hooks)?;
        }
        Ok(x)
    }

    /// Logits `(batch * seq, vocab)` from hidden states `x` entering layer `from`: layers
    /// `from..`, the final norm and the head.
    pub fn logits_from(&self, from: usize, x: &Tensor, batch: usize, pos: &Positions, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let mut x = x.clone();
        for (l, layer) in self.layers.iter().enumerate().skip(from) {
            x = self.run_layer(layer, l, &x, batch, pos, hooks)?;
        }
        Ok(self.norm.forward(&x)?.matmul(&self.lm_head.as_ref().unwrap_or(&self.embed).t()?)?)
    }

    /// Replace layer `l`'s FFN by the dense block `down · (act(gate x) ⊙ up x)` (`gate`, `up`:
    /// `(f, hidden)`, `down`: `(hidden, f)`, the source's activation): what a dense student's
    /// FFN computes in the source's place (EEP's candidates, [`crate::init::eep`]).
    pub fn set_dense_ffn(&mut self, l: usize, gate: Tensor, up: Tensor, down: Tensor) -> Result<()> {
        let h = self.config.hidden_size;
        let (f, gh) = gate.dims2()?;
        if gh != h || up.dims2()? != (f, h) || down.dims2()? != (h, f) {
            return Err(MasaError::Shape(format!(
                "dense FFN for layer {l}: gate {:?}, up {:?}, down {:?} do not fit hidden size {h}",
                gate.dims(),
                up.dims(),
                down.dims()
            )));
        }
        let act = self.config.activation;
        let layer = self.layers.get_mut(l).ok_or_else(|| MasaError::Invalid(format!("no layer {l}")))?;
        let lin = |w: Tensor| Linear { w, b: None };
        layer.ffn = Ffn::Dense(Mlp { gate: lin(gate), up: lin(up), down: lin(down), act });
        self.fused = None; // the engine's copy no longer matches
        Ok(())
    }

    /// The (scaled) token embeddings `(batch * seq, hidden)` of ids `(batch, seq)`: the input of
    /// layer 0.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        Ok(if self.config.scale_embeddings { (x * (self.config.hidden_size as f64).sqrt())? } else { x })
    }

    /// RoPE tables and attention masks for sequences of `t` tokens, shared by all layers.
    pub fn positions(&self, t: usize, dev: &Device) -> Result<Positions> {
        let c = &self.config;
        let mut ropes: Vec<(f64, Rope)> = Vec::new();
        for l in 0..c.num_hidden_layers {
            let theta = c.rope_theta_for(l);
            if !ropes.iter().any(|(th, _)| *th == theta) {
                ropes.push((theta, Rope::new(c.head_dim, t, theta, dev)?));
            }
        }
        Ok(Positions { t, masks: AttnMasks::new(c, t, dev)?, ropes })
    }

    /// Decoder layer `l` on hidden states `x` `(batch * t, hidden)` of `batch` sequences of
    /// `pos.t` tokens; hooks observe its FFN inputs and routing.
    pub fn run_layer(&self, layer: &Layer, l: usize, x: &Tensor, batch: usize, pos: &Positions, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let c = &self.config;
        let theta = c.rope_theta_for(l);
        let rope = pos.ropes.iter().find(|(th, _)| *th == theta).map(|(_, r)| r).ok_or_else(|| MasaError::Shape("rope".into()))?;
        let mask = if c.is_sliding_layer(l) { &pos.masks.sliding } else { &pos.masks.causal };
        self.layer_forward(layer, l, x, batch, pos.t, rope, mask, hooks)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &Layer,
        l: usize,
        x: &Tensor,
        b: usize,
        t: usize,
        rope: &Rope,
        mask: &Tensor,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let mut a = self.attention(&layer.attn, &layer.attn_norm.forward(x)?, b, t, rope, mask)?;
        if let Some(n) = &layer.post_attn_norm {
            a = n.forward(&a)?;
        }
        let x = (x + a)?;
        let mut f = layer.ffn.forward(&layer.ffn_norm.forward(&x)?, l, hooks)?;
        if let Some(n) = &layer.post_ffn_norm {
            f = n.forward(&f)?;
        }
        Ok((x + f)?)
    }

    /// Causal self-attention over the whole sequence (no cache): [`Self::attention_cached`]
    /// without past keys/values.
    fn attention(&self, a: &Attention, x: &Tensor, b: usize, t: usize, rope: &Rope, mask: &Tensor) -> Result<Tensor> {
        Ok(self.attention_cached(a, x, b, t, rope, mask, None)?.0)
    }
}

/// What every layer's attention needs for sequences of `t` tokens ([`Transformer::positions`]).
pub struct Positions {
    t: usize,
    masks: AttnMasks,
    /// One table per RoPE base in use.
    ropes: Vec<(f64, Rope)>,
}

impl Positions {
    /// The sequence length these tables are for.
    pub fn seq_len(&self) -> usize {
        self.t
    }
}

/// Additive masks `(g*t, t)` (0 or −inf) for full-causal and sliding-window layers.
struct AttnMasks {
    causal: Tensor,
    sliding: Tensor,
}

impl AttnMasks {
    fn new(c: &ModelConfig, t: usize, dev: &Device) -> Result<Self> {
        let g = c.num_attention_heads / c.num_key_value_heads;
        let build = |window: Option<usize>| -> Result<Tensor> {
            let mut m = vec![0f32; g * t * t];
            for r in 0..g * t {
                let i = r % t;
                for j in 0..t {
                    let visible = j <= i && window.is_none_or(|w| i - j < w);
                    if !visible {
                        m[r * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
            Ok(Tensor::from_vec(m, (g * t, t), dev)?)
        };
        let causal = build(None)?;
        let sliding = match c.sliding_window {
            Some(w) if w < t => build(Some(w))?,
            _ => causal.clone(),
        };
        Ok(AttnMasks { causal, sliding })
    }
}

/// Rotate-half RoPE tables (HF convention) for positions `0..t`.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(head_dim: usize, t: usize, theta: f64, dev: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half).map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32).collect();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Rope { cos: Tensor::from_vec(cos, (t, half), dev)?, sin: Tensor::from_vec(sin, (t, half), dev)? })
    }

    /// `x`: `(b, heads, t, d)`, contiguous.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope(x, &self.cos, &self.sin)?) // inference only: no backward needed
    }
}

fn linear(w: &SourceWeights, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let weight = w.tensor_shaped(&format!("{name}.weight"), &[out, inp])?;
    let b = if bias { Some(w.tensor_shaped(&format!("{name}.bias"), &[out])?) } else { None };
    Ok(Linear { w: weight, b })
}

fn load_norm(w: &SourceWeights, c: &ModelConfig, name: &str, dim: usize) -> Result<Norm> {
    let eps = c.norm_eps as f32;
    let alpha = match c.norm {
        NormKind::LayerNormNoParams => None,
        NormKind::Rms => Some(w.tensor_shaped(&format!("{name}.weight"), &[dim])?),
        NormKind::RmsOnePlus => Some((w.tensor_shaped(&format!("{name}.weight"), &[dim])? + 1.0)?),
    };
    Ok(Norm { kind: c.norm, alpha, eps })
}

fn load_mlp(w: &SourceWeights, c: &ModelConfig, prefix: &str, ffn: usize) -> Result<Mlp> {
    let h = c.hidden_size;
    Ok(Mlp {
        gate: linear(w, &format!("{prefix}.gate_proj"), ffn, h, false)?,
        up: linear(w, &format!("{prefix}.up_proj"), ffn, h, false)?,
        down: linear(w, &format!("{prefix}.down_proj"), h, ffn, false)?,
        act: c.activation,
    })
}

impl ModelConfig {
    /// Every tensor [`Transformer::load`] reads, with its shape, in HF naming and order
    /// (embedding, layers, final norm, head): what a checkpoint of this configuration holds
    /// (`masa synth` writes exactly these; test `synth_writes_what_the_loader_reads`).
    pub fn hf_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, hd, nh, nkv) = (self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads);
        let mut out: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![self.vocab_size, h])];
        let norm = |out: &mut Vec<(String, Vec<usize>)>, name: String, dim: usize| {
            if self.norm != NormKind::LayerNormNoParams {
                out.push((format!("{name}.weight"), vec![dim]));
            }
        };
        let mlp = |out: &mut Vec<(String, Vec<usize>)>, p: String, width: usize| {
            out.push((format!("{p}.gate_proj.weight"), vec![width, h]));
            out.push((format!("{p}.up_proj.weight"), vec![width, h]));
            out.push((format!("{p}.down_proj.weight"), vec![h, width]));
        };
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            norm(&mut out, format!("{p}.input_layernorm"), h);
            for (proj, rows, cols) in [("q", nh * hd, h), ("k", nkv * hd, h), ("v", nkv * hd, h), ("o", h, nh * hd)] {
                out.push((format!("{p}.self_attn.{proj}_proj.weight"), vec![rows, cols]));
                if self.attention_bias && !(proj == "o" && self.arch == Arch::Qwen2) {
                    out.push((format!("{p}.self_attn.{proj}_proj.bias"), vec![rows]));
                }
            }
            match self.qk_norm {
                QkNorm::None => {}
                QkNorm::PerHead => {
                    norm(&mut out, format!("{p}.self_attn.q_norm"), hd);
                    norm(&mut out, format!("{p}.self_attn.k_norm"), hd);
                }
                QkNorm::Full => {
                    norm(&mut out, format!("{p}.self_attn.q_norm"), nh * hd);
                    norm(&mut out, format!("{p}.self_attn.k_norm"), nkv * hd);
                }
            }
            norm(&mut out, format!("{p}.post_attention_layernorm"), h);
            if self.post_norms {
                norm(&mut out, format!("{p}.pre_feedforward_layernorm"), h);
                norm(&mut out, format!("{p}.post_feedforward_layernorm"), h);
            }
            match &self.moe {
                Some(m) if self.is_moe_layer(l) => {
                    out.push((format!("{p}.mlp.gate.weight"), vec![m.n_routed_experts, h]));
                    for e in 0..m.n_routed_experts {
                        mlp(&mut out, format!("{p}.mlp.experts.{e}"), m.moe_intermediate_size);
                    }
                    if m.n_shared_experts > 0 {
                        mlp(&mut out, format!("{p}.mlp.shared_experts"), m.moe_intermediate_size * m.n_shared_experts);
                    }
                }
                _ => mlp(&mut out, format!("{p}.mlp"), self.intermediate_size),
            }
        }
        norm(&mut out, "model.norm".into(), h);
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        out
    }
}

fn load_layer(w: &SourceWeights, c: &ModelConfig, l: usize) -> Result<Layer> {
    let p = format!("model.layers.{l}");
    let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads);
    let bias = c.attention_bias;
    let (q_norm, k_norm) = match c.qk_norm {
        QkNorm::None => (None, None),
        QkNorm::PerHead => {
            (Some(load_norm(w, c, &format!("{p}.self_attn.q_norm"), hd)?), Some(load_norm(w, c, &format!("{p}.self_attn.k_norm"), hd)?))
        }
        QkNorm::Full => (
            Some(load_norm(w, c, &format!("{p}.self_attn.q_norm"), nh * hd)?),
            Some(load_norm(w, c, &format!("{p}.self_attn.k_norm"), nkv * hd)?),
        ),
    };
    let attn = Attention {
        q: linear(w, &format!("{p}.self_attn.q_proj"), nh * hd, h, bias)?,
        k: linear(w, &format!("{p}.self_attn.k_proj"), nkv * hd, h, bias)?,
        v: linear(w, &format!("{p}.self_attn.v_proj"), nkv * hd, h, bias)?,
        // HF gives o_proj a bias with `attention_bias` in every family but Qwen2.
        o: linear(w, &format!("{p}.self_attn.o_proj"), h, nh * hd, bias && c.arch != Arch::Qwen2)?,
        q_norm,
        k_norm,
    };
    let ffn = match &c.moe {
        Some(m) if c.is_moe_layer(l) => Ffn::Moe {
            router: w.tensor_shaped(&format!("{p}.mlp.gate.weight"), &[m.n_routed_experts, h])?,
            experts: (0..m.n_routed_experts)
                .map(|e| load_mlp(w, c, &format!("{p}.mlp.experts.{e}"), m.moe_intermediate_size))
                .collect::<Result<_>>()?,
            shared: if m.n_shared_experts > 0 {
                Some(load_mlp(w, c, &format!("{p}.mlp.shared_experts"), m.moe_intermediate_size * m.n_shared_experts)?)
            } else {
                None
            },
            top_k: m.top_k,
            norm_topk_prob: m.norm_topk_prob,
        },
        _ => Ffn::Dense(load_mlp(w, c, &format!("{p}.mlp"), c.intermediate_size)?),
    };
    let (ffn_norm_name, post_attn, post_ffn) = if c.post_norms {
        (
            format!("{p}.pre_feedforward_layernorm"),
            Some(load_norm(w, c, &format!("{p}.post_attention_layernorm"), h)?),
            Some(load_norm(w, c, &format!("{p}.post_feedforward_layernorm"), h)?),
        )
    } else {
        (format!("{p}.post_attention_layernorm"), None, None)
    };
    Ok(Layer {
        attn_norm: load_norm(w, c, &format!("{p}.input_layernorm"), h)?,
        post_attn_norm: post_attn,
        ffn_norm: load_norm(w, c, &ffn_norm_name, h)?,
        post_ffn_norm: post_ffn,
        attn,
        ffn,
    })
}

impl Layer {
    /// The weight `(out, in)` of one FFN matrix of this layer (`proj`: gate_proj, up_proj,
    /// down_proj).
    pub fn ffn_weight(&self, mlp: MlpId, proj: &str) -> Option<&Tensor> {
        let m = match (&self.ffn, mlp) {
            (Ffn::Dense(m), MlpId::Dense) => m,
            (Ffn::Moe { experts, .. }, MlpId::Expert(e)) => experts.get(e)?,
            (Ffn::Moe { shared: Some(s), .. }, MlpId::Shared) => s,
            _ => return None,
        };
        Some(match proj {
            "gate_proj" => &m.gate.w,
            "up_proj" => &m.up.w,
            "down_proj" => &m.down.w,
            _ => return None,
        })
    }
}

/// Natural-log NLL of each next token: `nll[i] = −log p(ids[i+1] | ids[..=i])`, from logits
/// `(t, vocab)`.
pub fn next_token_nll(logits: &Tensor, ids: &[u32]) -> Result<Vec<f32>> {
    let t = ids.len();
    if t < 2 {
        return Ok(Vec::new());
    }
    let lp = candle_nn::ops::log_softmax(&logits.i(..t - 1)?, D::Minus1)?;
    let targets = Tensor::new(&ids[1..], logits.device())?.unsqueeze(1)?;
    let picked = lp.gather(&targets, 1)?.squeeze(1)?;
    Ok(picked.neg()?.to_vec1::<f32>()?)
}

// ---------------------------------------------------------------------------------------------
// Incremental decoding: a key/value cache (evaluation: shared contexts, generation)
// ---------------------------------------------------------------------------------------------

/// Keys and values `(b, kv_heads, pos, head_dim)` of every layer for the positions run so far.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    pos: usize,
}

impl KvCache {
    pub fn new() -> Self {
        KvCache::default()
    }
    /// Positions held.
    pub fn len(&self) -> usize {
        self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
    /// The same cache repeated `n` times along the batch axis (a batch-1 context shared by `n`
    /// continuations).
    pub fn expand(&self, n: usize) -> Result<KvCache> {
        let rep = |x: &Tensor| -> Result<Tensor> {
            let (b, h, p, d) = x.dims4()?;
            if b != 1 {
                return Err(MasaError::Shape(format!("KvCache::expand needs batch 1, the cache has batch {b}")));
            }
            Ok(x.broadcast_as((n, h, p, d))?.contiguous()?)
        };
        let layers = self.layers.iter().map(|(k, v)| Ok((rep(k)?, rep(v)?))).collect::<Result<_>>()?;
        Ok(KvCache { layers, pos: self.pos })
    }
}

impl Transformer {
    /// Logits `(batch, t, vocab)` of `ids` `(batch, t)` placed after the positions already in
    /// `cache`, which is extended by them. With an empty cache this computes what
    /// [`Transformer::forward`] computes (test `cached_forward_matches_full`). No hooks.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let offset = cache.pos;
        let total = offset + t;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        if c.scale_embeddings {
            x = (x * (c.hidden_size as f64).sqrt())?;
        }
        let g = c.num_attention_heads / c.num_key_value_heads;
        let mask_for = |window: Option<usize>| -> Result<Tensor> {
            let mut m = vec![0f32; g * t * total];
            for r in 0..g * t {
                let i = offset + r % t;
                for j in 0..total {
                    if !(j <= i && window.is_none_or(|w| i - j < w)) {
                        m[r * total + j] = f32::NEG_INFINITY;
                    }
                }
            }
            Ok(Tensor::from_vec(m, (g * t, total), x.device())?)
        };
        let causal = mask_for(None)?;
        let sliding = match c.sliding_window {
            Some(w) if w < total => mask_for(Some(w))?,
            _ => causal.clone(),
        };
        let mut ropes: Vec<(f64, Rope)> = Vec::new();
        let mut new_layers = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let theta = c.rope_theta_for(l);
            if !ropes.iter().any(|(th, _)| *th == theta) {
                let full = Rope::new(c.head_dim, total, theta, x.device())?;
                let r = Rope { cos: full.cos.narrow(0, offset, t)?.contiguous()?, sin: full.sin.narrow(0, offset, t)?.contiguous()? };
                ropes.push((theta, r));
            }
            let rope = &ropes.iter().find(|(th, _)| *th == theta).map(|(_, r)| r).ok_or_else(|| MasaError::Shape("rope".into()))?;
            let mask = if c.is_sliding_layer(l) { &sliding } else { &causal };
            let past = cache.layers.get(l);
            let (mut a, kv) = self.attention_cached(&layer.attn, &layer.attn_norm.forward(&x)?, b, t, rope, mask, past)?;
            new_layers.push(kv);
            if let Some(n) = &layer.post_attn_norm {
                a = n.forward(&a)?;
            }
            x = (x + a)?;
            let mut f = layer.ffn.forward(&layer.ffn_norm.forward(&x)?, l, &mut NoHooks)?;
            if let Some(n) = &layer.post_ffn_norm {
                f = n.forward(&f)?;
            }
            x = (x + f)?;
        }
        cache.layers = new_layers;
        cache.pos = total;
        let h = self.norm.forward(&x)?;
        let logits = h.matmul(&self.lm_head.as_ref().unwrap_or(&self.embed).t()?)?;
        Ok(logits.reshape((b, t, c.vocab_size))?)
    }

    /// Causal self-attention of `t` new positions after the cached keys/values `past` (none:
    /// the whole sequence); returns the output and the extended `(k, v)`. Grouped-query heads
    /// share K/V without copying them: the query heads of one KV group are stacked along the
    /// sequence axis, `(b, kv, group*t, d)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &self,
        a: &Attention,
        x: &Tensor,
        b: usize,
        t: usize,
        rope: &Rope,
        mask: &Tensor,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let g = nh / nkv;
        let (mut q, mut k, mut v) = (a.q.forward(x)?, a.k.forward(x)?, a.v.forward(x)?);
        if c.qk_norm == QkNorm::Full {
            q = a.q_norm.as_ref().map_or(Ok(q.clone()), |n| n.forward(&q))?;
            k = a.k_norm.as_ref().map_or(Ok(k.clone()), |n| n.forward(&k))?;
        }
        if let Some(clip) = c.clip_qkv {
            q = q.clamp(-clip, clip)?;
            k = k.clamp(-clip, clip)?;
            v = v.clamp(-clip, clip)?;
        }
        let heads = |z: Tensor, n: usize| -> Result<Tensor> { Ok(z.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) };
        let (mut q, mut k, mut v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        if c.qk_norm == QkNorm::PerHead {
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            }
        }
        let q = rope.apply(&q)?;
        k = rope.apply(&k)?;
        if let Some((pk, pv)) = past {
            k = Tensor::cat(&[pk, &k], 2)?.contiguous()?;
            v = Tensor::cat(&[pv, &v], 2)?.contiguous()?;
        }
        let q = q.reshape((b, nkv, g * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * c.attn_scale)?;
        let scores = scores.broadcast_add(mask)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?; // inference only: no backward needed
        let o = p.matmul(&v)?;
        let o = o.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        Ok((a.o.forward(&o)?, (k, v)))
    }
}
