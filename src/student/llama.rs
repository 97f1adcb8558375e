//! The trainable Llama student: flat parameters in `StudentConfig::tensor_shapes()` order (HF
//! names, `(out, in)` row-major), a forward pass that keeps what the backward needs in a
//! preallocated [`Workspace`], and the hand-written backward through the fused kernels of
//! [`crate::student::kernels`]. Generic over f32 (training) and f64 (gradient checks).
//!
//! Per layer: `x2 = x + o_proj(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)))`,
//! `x3 = x2 + down(silu(gate(n2 x2)) ⊙ up(n2 x2))`; then `logits = norm(x) Eᵀ` with `E` the
//! embedding (tied) or `lm_head`.

use rayon::prelude::*;

use crate::student::kernels::{self, AttnShape, Real, Targets, Teacher};
use crate::student::StudentConfig;

/// Offsets of one layer's tensors in the flat parameter vector.
#[derive(Clone, Debug)]
pub struct LayerOffsets {
    pub input_norm: usize,
    pub wq: usize,
    pub wk: usize,
    pub wv: usize,
    pub wo: usize,
    pub post_norm: usize,
    pub wg: usize,
    pub wu: usize,
    pub wd: usize,
}

/// Where every tensor lives in the flat parameter vector.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `(HF name, shape, offset)` in `tensor_shapes()` order.
    pub tensors: Vec<(String, Vec<usize>, usize)>,
    pub embed: usize,
    pub layers: Vec<LayerOffsets>,
    pub norm: usize,
    /// The lm head: the embedding when tied.
    pub head: usize,
    pub total: usize,
}

impl Layout {
    pub fn new(cfg: &StudentConfig) -> Self {
        let mut tensors = Vec::new();
        let mut off = 0;
        for (name, shape) in cfg.tensor_shapes() {
            let n: usize = shape.iter().product();
            tensors.push((name, shape, off));
            off += n;
        }
        let at = |name: &str| tensors.iter().find(|t| t.0 == name).map(|t| t.2).expect("tensor in layout");
        let layers: Vec<LayerOffsets> = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                LayerOffsets {
                    input_norm: at(&format!("{p}.input_layernorm.weight")),
                    wq: at(&format!("{p}.self_attn.q_proj.weight")),
                    wk: at(&format!("{p}.self_attn.k_proj.weight")),
                    wv: at(&format!("{p}.self_attn.v_proj.weight")),
                    wo: at(&format!("{p}.self_attn.o_proj.weight")),
                    post_norm: at(&format!("{p}.post_attention_layernorm.weight")),
                    wg: at(&format!("{p}.mlp.gate_proj.weight")),
                    wu: at(&format!("{p}.mlp.up_proj.weight")),
                    wd: at(&format!("{p}.mlp.down_proj.weight")),
                }
            })
            .collect();
        // The fused projections rely on q/k/v and gate/up being consecutive in tensor_shapes().
        let (h, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        for l in &layers {
            let l: &LayerOffsets = l;
            assert!(l.wk == l.wq + cfg.num_attention_heads * hd * h && l.wv == l.wk + cfg.num_key_value_heads * hd * h);
            assert!(l.wu == l.wg + f * h);
        }
        let embed = at("model.embed_tokens.weight");
        let head = if cfg.tie_word_embeddings { embed } else { at("lm_head.weight") };
        Layout { embed, layers, norm: at("model.norm.weight"), head, total: off, tensors }
    }
}

/// Activations one layer keeps for the backward.
struct LayerCache<T> {
    x: Vec<T>,
    xn1: Vec<T>,
    rstd1: Vec<T>,
    /// Fused q/k/v projection output, rows `[q | k | v]`, RoPE applied to q and k.
    qkv: Vec<T>,
    p: Vec<T>,
    o: Vec<T>,
    x2: Vec<T>,
    xn2: Vec<T>,
    rstd2: Vec<T>,
    /// Fused gate/up projection output, rows `[gate | up]`.
    gu: Vec<T>,
    a: Vec<T>,
}

/// Preallocated buffers for batches of up to `batch` sequences of `seq` tokens, reused by
/// every step: a training workspace ([`Workspace::new`]) keeps every layer's activations and
/// the gradient buffers; an inference workspace ([`Workspace::inference`]) two layers'
/// activations, used in turn, and no gradient buffers.
pub struct Workspace<T> {
    pub batch: usize,
    pub seq: usize,
    b: usize,
    t: usize,
    ids: Vec<u32>,
    layers: Vec<LayerCache<T>>,
    xl: Vec<T>,
    xf: Vec<T>,
    rstdf: Vec<T>,
    logits: Vec<T>,
    dx: Vec<T>,
    dxn: Vec<T>,
    dqkv: Vec<T>,
    dattn: Vec<T>,
    dff: Vec<T>,
    dp: Vec<T>,
    dgu: Vec<T>,
    cos: Vec<T>,
    sin: Vec<T>,
}

/// Logits computed at once by the fused lm-head loss: up to this many floats (64 MiB), at least
/// 64 rows. Llama-7m (vocab 8192) does a whole B=8, T=128 batch in one chunk; SmolLM2's vocabulary
/// (49,152) takes 341-row chunks.
pub const LOGIT_CHUNK_FLOATS: usize = 16 << 20;

impl<T: Real> Workspace<T> {
    /// For [`Llama::forward`] followed by [`Llama::loss`] and [`Llama::backward`].
    pub fn new(cfg: &StudentConfig, batch: usize, seq: usize) -> Self {
        Self::with(cfg, batch, seq, true)
    }

    /// For [`Llama::forward`] and [`Llama::logits`] only: memory of two layers, whatever the
    /// depth.
    pub fn inference(cfg: &StudentConfig, batch: usize, seq: usize) -> Self {
        Self::with(cfg, batch, seq, false)
    }

    fn with(cfg: &StudentConfig, batch: usize, seq: usize, training: bool) -> Self {
        let n = batch * seq;
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let hd = cfg.head_dim();
        let (qd, kd) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let z = |len: usize| vec![T::zero(); len];
        let g = |len: usize| if training { z(len) } else { Vec::new() };
        let caches = if training { cfg.num_hidden_layers } else { cfg.num_hidden_layers.min(2) };
        let layers = (0..caches)
            .map(|_| LayerCache {
                x: z(n * h),
                xn1: z(n * h),
                rstd1: z(n),
                qkv: z(n * (qd + 2 * kd)),
                p: z(batch * cfg.num_attention_heads * seq * seq),
                o: z(n * qd),
                x2: z(n * h),
                xn2: z(n * h),
                rstd2: z(n),
                gu: z(n * 2 * f),
                a: z(n * f),
            })
            .collect();
        let (cos, sin) = kernels::rope_tables(hd, seq, cfg.rope_theta);
        Workspace {
            batch,
            seq,
            b: 0,
            t: 0,
            ids: Vec::with_capacity(n),
            layers,
            xl: z(n * h),
            xf: z(n * h),
            rstdf: z(n),
            logits: z((LOGIT_CHUNK_FLOATS / cfg.vocab_size.max(1)).max(64).min(n) * cfg.vocab_size),
            dx: g(n * h),
            dxn: g(n * h),
            dqkv: g(n * (qd + 2 * kd)),
            dattn: g(n * qd),
            dff: g(n * f),
            dp: g(batch * cfg.num_key_value_heads * seq * seq),
            dgu: g(n * 2 * f),
            cos,
            sin,
        }
    }
}

/// The model: a config and its layout; parameters are passed in as flat slices.
pub struct Llama {
    pub cfg: StudentConfig,
    pub layout: Layout,
}

impl Llama {
    pub fn new(cfg: &StudentConfig) -> Self {
        Llama { cfg: cfg.clone(), layout: Layout::new(cfg) }
    }

    fn attn_shape(&self, b: usize, t: usize) -> AttnShape {
        AttnShape { b, t, nh: self.cfg.num_attention_heads, nkv: self.cfg.num_key_value_heads, hd: self.cfg.head_dim() }
    }

    /// Forward `ids` (`b` sequences of `t` tokens, row-major; `b ≤ ws.batch`, `t == ws.seq`) up
    /// to the final-norm hidden states, keeping activations in `ws`.
    pub fn forward<T: Real>(&self, params: &[T], ws: &mut Workspace<T>, ids: &[u32], b: usize, t: usize) {
        self.forward_observed(params, ws, ids, b, t, &mut |_, _, _| true);
    }

    /// An inference pass ([`Self::forward_observed`]) of `ids` (`b × t`) in the workspace held in
    /// `slot`, made (or remade) to fit; ids outside the vocabulary are an error, not a panic.
    /// Returns the workspace, for [`Self::logits`].
    pub fn infer<'w>(
        &self,
        params: &[f32],
        slot: &'w mut Option<Workspace<f32>>,
        ids: &[u32],
        b: usize,
        t: usize,
        observe: &mut dyn FnMut(usize, &[f32], &[f32]) -> bool,
    ) -> crate::Result<&'w mut Workspace<f32>> {
        let v = self.cfg.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(crate::MasaError::Invalid(format!("token id {bad} is outside the vocabulary ({v})")));
        }
        if slot.as_ref().is_some_and(|w| w.batch < b || w.seq != t) {
            *slot = None;
        }
        let ws = slot.get_or_insert_with(|| Workspace::inference(&self.cfg, b, t));
        self.forward_observed(params, ws, ids, b, t, observe);
        Ok(ws)
    }

    /// [`Self::forward`], calling `observe(l, ffn_in, ffn_mid)` with each layer's FFN inputs
    /// (`ffn_in`: the post-norm hidden states, `b·t × hidden`; `ffn_mid`: `silu(gate) ⊙ up`,
    /// `b·t × intermediate`) as soon as they exist; the pass stops after the layer where
    /// `observe` returns false (calibration of the first layers only).
    pub fn forward_observed<T: Real>(
        &self,
        params: &[T],
        ws: &mut Workspace<T>,
        ids: &[u32],
        b: usize,
        t: usize,
        observe: &mut dyn FnMut(usize, &[T], &[T]) -> bool,
    ) {
        assert!(b <= ws.batch && t == ws.seq && ids.len() == b * t, "batch shape does not fit the workspace");
        let c = &self.cfg;
        let (h, f, n) = (c.hidden_size, c.intermediate_size, b * t);
        let hd = c.head_dim();
        let (qd, kd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let eps = c.rms_norm_eps;
        let w = qd + 2 * kd;
        ws.b = b;
        ws.t = t;
        ws.ids.clear();
        ws.ids.extend_from_slice(ids);
        let emb = &params[self.layout.embed..];
        let shape = self.attn_shape(b, t);
        let nl = self.layout.layers.len();
        // Layer l's activations live in cache l (training) or l mod 2 (inference).
        let nc = ws.layers.len();
        for (l, lo) in self.layout.layers.iter().enumerate() {
            let lc = &mut ws.layers[l % nc];
            if l == 0 {
                lc.x[..n * h].par_chunks_mut(h).zip(ids.par_iter()).for_each(|(row, &id)| {
                    row.copy_from_slice(&emb[id as usize * h..(id as usize + 1) * h]);
                });
            }
            let p = |off: usize, len: usize| &params[off..off + len];
            kernels::rmsnorm_fwd(&lc.x[..n * h], p(lo.input_norm, h), &mut lc.xn1[..n * h], &mut lc.rstd1[..n], h, eps);
            // q_proj, k_proj and v_proj are consecutive (out, in) matrices in the parameter
            // vector: one (qd + 2kd, h) matrix, one matmul.
            kernels::mm_nt(&mut lc.qkv[..n * w], &lc.xn1[..n * h], p(lo.wq, w * h), n, w, h, false);
            kernels::rope(&mut lc.qkv[..n * w], w, &ws.cos, &ws.sin, t, nh + nkv, hd, false);
            kernels::attention_fwd(&shape, &lc.qkv[..n * w], &mut lc.p[..b * nh * t * t], &mut lc.o[..n * qd]);
            lc.x2[..n * h].copy_from_slice(&lc.x[..n * h]);
            kernels::mm_nt(&mut lc.x2[..n * h], &lc.o[..n * qd], p(lo.wo, h * qd), n, h, qd, true);
            kernels::rmsnorm_fwd(&lc.x2[..n * h], p(lo.post_norm, h), &mut lc.xn2[..n * h], &mut lc.rstd2[..n], h, eps);
            // gate_proj and up_proj are consecutive too: one (2f, h) matmul.
            kernels::mm_nt(&mut lc.gu[..n * 2 * f], &lc.xn2[..n * h], p(lo.wg, 2 * f * h), n, 2 * f, h, false);
            kernels::swiglu_fwd(&lc.gu[..n * 2 * f], &mut lc.a[..n * f], f);
            if !observe(l, &lc.xn2[..n * h], &lc.a[..n * f]) {
                return;
            }
            // Layer output: x2 + down(a), into the next layer's x (or xl after the last).
            let (lc, out): (&LayerCache<T>, &mut [T]) = if l + 1 < nl {
                let (this, next) = two_mut(&mut ws.layers, l % nc, (l + 1) % nc);
                (this, &mut next.x[..n * h])
            } else {
                (&ws.layers[l % nc], &mut ws.xl[..n * h])
            };
            out.copy_from_slice(&lc.x2[..n * h]);
            kernels::mm_nt(out, &lc.a[..n * f], p(lo.wd, h * f), n, h, f, true);
        }
        kernels::rmsnorm_fwd(
            &ws.xl[..n * h],
            &params[self.layout.norm..self.layout.norm + h],
            &mut ws.xf[..n * h],
            &mut ws.rstdf[..n],
            h,
            eps,
        );
    }

    /// Loss of the last [`forward`](Self::forward) against `targets` (one per position); with
    /// `grads`, also the gradient w.r.t. the final hidden states (kept in `ws`) and the lm head
    /// (added to `grads`). Call [`backward`](Self::backward) next to finish the gradient.
    pub fn loss<T: Real>(
        &self,
        params: &[T],
        ws: &mut Workspace<T>,
        targets: &Targets<T>,
        teacher: Option<&Teacher>,
        grads: Option<&mut [T]>,
        nll: Option<&mut [T]>,
    ) -> f64 {
        let c = &self.cfg;
        let (h, v, n) = (c.hidden_size, c.vocab_size, ws.b * ws.t);
        let e = &params[self.layout.head..self.layout.head + v * h];
        let grad = grads.map(|g| (&mut ws.dx[..n * h], &mut g[self.layout.head..self.layout.head + v * h]));
        kernels::lm_head_loss(&ws.xf[..n * h], e, n, h, v, targets, teacher, &mut ws.logits, grad, nll)
    }

    /// Logits `(b·t, vocab)` of the last forward (tests and scoring; training uses `loss`).
    pub fn logits<T: Real>(&self, params: &[T], ws: &Workspace<T>) -> Vec<T> {
        let c = &self.cfg;
        let (h, v, n) = (c.hidden_size, c.vocab_size, ws.b * ws.t);
        let mut out = vec![T::zero(); n * v];
        kernels::advise_huge_pages(&mut out);
        kernels::mm_nt(&mut out, &ws.xf[..n * h], &params[self.layout.head..self.layout.head + v * h], n, v, h, false);
        out
    }

    /// Backward from the hidden-state gradient `loss` left in `ws`, adding every parameter's
    /// gradient into `grads`.
    pub fn backward<T: Real>(&self, params: &[T], ws: &mut Workspace<T>, grads: &mut [T]) {
        assert_eq!(ws.layers.len(), self.layout.layers.len(), "backward needs a training workspace (Workspace::new)");
        let c = &self.cfg;
        let (b, t) = (ws.b, ws.t);
        let (h, f, n) = (c.hidden_size, c.intermediate_size, b * t);
        let hd = c.head_dim();
        let (qd, kd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let shape = self.attn_shape(b, t);
        let w = qd + 2 * kd;
        let p = |off: usize, len: usize| &params[off..off + len];
        // Final norm: dx holds d(xf); turn it into d(xl) in dxn, then swap so dx is the
        // residual-stream gradient.
        {
            let no = self.layout.norm;
            ws.dxn[..n * h].fill(T::zero());
            kernels::rmsnorm_bwd(
                &ws.dx[..n * h],
                &ws.xl[..n * h],
                p(no, h),
                &ws.rstdf[..n],
                &mut ws.dxn[..n * h],
                &mut grads[no..no + h],
                h,
            );
            std::mem::swap(&mut ws.dx, &mut ws.dxn);
        }
        for (l, lo) in self.layout.layers.iter().enumerate().rev() {
            let lc = &ws.layers[l];
            // FFN: out = x2 + down(a)
            kernels::mm_nn(&mut ws.dff[..n * f], &ws.dx[..n * h], p(lo.wd, h * f), n, f, h, false);
            kernels::mm_tn(&mut grads[lo.wd..lo.wd + h * f], &ws.dx[..n * h], &lc.a[..n * f], h, f, n, true);
            kernels::swiglu_bwd(&lc.gu[..n * 2 * f], &ws.dff[..n * f], &mut ws.dgu[..n * 2 * f], f);
            kernels::mm_nn(&mut ws.dxn[..n * h], &ws.dgu[..n * 2 * f], p(lo.wg, 2 * f * h), n, h, 2 * f, false);
            kernels::mm_tn(&mut grads[lo.wg..lo.wg + 2 * f * h], &ws.dgu[..n * 2 * f], &lc.xn2[..n * h], 2 * f, h, n, true);
            let pn = lo.post_norm;
            kernels::rmsnorm_bwd(
                &ws.dxn[..n * h],
                &lc.x2[..n * h],
                p(pn, h),
                &lc.rstd2[..n],
                &mut ws.dx[..n * h],
                &mut grads[pn..pn + h],
                h,
            );
            // Attention: x2 = x + o_proj(o)
            kernels::mm_nn(&mut ws.dattn[..n * qd], &ws.dx[..n * h], p(lo.wo, h * qd), n, qd, h, false);
            kernels::mm_tn(&mut grads[lo.wo..lo.wo + h * qd], &ws.dx[..n * h], &lc.o[..n * qd], h, qd, n, true);
            kernels::attention_bwd(
                &shape,
                &lc.qkv[..n * w],
                &lc.p[..b * nh * t * t],
                &ws.dattn[..n * qd],
                &mut ws.dqkv[..n * w],
                &mut ws.dp[..b * nkv * t * t],
            );
            kernels::rope(&mut ws.dqkv[..n * w], w, &ws.cos, &ws.sin, t, nh + nkv, hd, true);
            kernels::mm_nn(&mut ws.dxn[..n * h], &ws.dqkv[..n * w], p(lo.wq, w * h), n, h, w, false);
            kernels::mm_tn(&mut grads[lo.wq..lo.wq + w * h], &ws.dqkv[..n * w], &lc.xn1[..n * h], w, h, n, true);
            let inn = lo.input_norm;
            kernels::rmsnorm_bwd(
                &ws.dxn[..n * h],
                &lc.x[..n * h],
                p(inn, h),
                &lc.rstd1[..n],
                &mut ws.dx[..n * h],
                &mut grads[inn..inn + h],
                h,
            );
        }
        // Embedding rows: sequential scatter-add in token order (deterministic).
        let eo = self.layout.embed;
        for (i, &id) in ws.ids.iter().enumerate() {
            let dst = &mut grads[eo + id as usize * h..eo + (id as usize + 1) * h];
            for (d, &s) in dst.iter_mut().zip(&ws.dx[i * h..(i + 1) * h]) {
                *d += s;
            }
        }
    }
}

/// `(&mut v[i], &mut v[j])` for `i != j`.
fn two_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j);
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
}
