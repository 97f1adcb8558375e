//! The trainable Llama student on a CUDA device: the forward and hand-written backward of
//! [`crate::student::llama`], step for step, with cuBLAS products and the kernels of `kernels.cu`, plus
//! AdamW, all on the device. Parameters, gradients and moments are flat f32 device buffers in
//! the CPU engine's [`Layout`], so checkpoints move between the two engines unchanged.
//!
//! Attention keeps per layer `q`, `k`, `v` in `(b, heads, t, head_dim)` (RoPE applied, K/V
//! repeated for GQA) and the softmax probabilities `(b, heads, t, t)` for the backward: batched
//! products with a causal-masked softmax kernel between them.

use crate::cuda::{DevBuf, Gpu};
use crate::cuda_args;
use crate::error::Result;
use crate::student::kernels::{rope_tables, Teacher};
use crate::student::llama::Layout;
use crate::student::optim::AdamConfig;
use crate::student::StudentConfig;

/// Rows per partial sum of the RMSNorm weight gradient.
const DW_ROWS: usize = 64;
/// Blocks of the f64 sum reductions (fixed, so sums do not depend on anything but the data).
const SUM_BLOCKS: usize = 512;
/// Logits held at once by the chunked lm-head loss (1 GiB of f32).
const LOGIT_CHUNK_FLOATS: usize = 1 << 28;
/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;
/// Most log-probs per position the teacher top-k kernel keeps, and its block size (both as in
/// `kernels.cu`).
pub const TOPK_MAX: usize = 64;
const TOPK_THREADS: u32 = 128;

/// Most positions generation keeps in its KV cache (`DECODE_MAX` of `attn_decode`).
const DECODE_MAX: usize = 8192;

/// The sequence being generated ([`GpuLlama::next_logits`]): its tokens, and per layer the keys
/// and values of its positions as rows `(cap, heads, head_dim)` (K and V repeated for
/// grouped-query attention, as the forward keeps them), with RoPE tables for all `cap` positions.
struct Generation {
    tokens: Vec<u32>,
    k: Vec<DevBuf<f32>>,
    v: Vec<DevBuf<f32>>,
    cos: DevBuf<f32>,
    sin: DevBuf<f32>,
    cap: usize,
}

/// Per-layer f64 sums `Σ x xᵀ` of the FFN inputs on the device (CUDA calibration).
pub struct FfnGrams {
    /// `(layer, input sum, SwiGLU-output sum)` of the layers kept.
    layers: Vec<(usize, DevBuf<f64>, DevBuf<f64>)>,
    scratch: DevBuf<f32>,
    /// Rows (tokens) added.
    pub rows: u64,
}

struct LayerCache {
    x: DevBuf<f32>,
    xn1: DevBuf<f32>,
    rstd1: DevBuf<f32>,
    q: DevBuf<f32>,
    k: DevBuf<f32>,
    v: DevBuf<f32>,
    p: DevBuf<f32>,
    o: DevBuf<f32>,
    x2: DevBuf<f32>,
    xn2: DevBuf<f32>,
    rstd2: DevBuf<f32>,
    gu: DevBuf<f32>,
    a: DevBuf<f32>,
    /// Flash path: bf16 q, k, v (b, nh, t, 64) and their transposes, and the softmax
    /// log-sum-exp per row (instead of `q`, `k`, `v` in f32 and `p`).
    q16: DevBuf<u16>,
    qt16: DevBuf<u16>,
    k16: DevBuf<u16>,
    kt16: DevBuf<u16>,
    v16: DevBuf<u16>,
    vt16: DevBuf<u16>,
    lse: DevBuf<f32>,
}

/// Device buffers for batches of up to `batch` sequences of exactly `seq` tokens.
struct Workspace {
    batch: usize,
    seq: usize,
    /// Attention by the fused flash kernels (bf16, head_dim 64, seq a multiple of 64) rather
    /// than batched products over stored probabilities.
    flash: bool,
    b: usize,
    ids_host: Vec<u32>,
    ids: DevBuf<u32>,
    targets: DevBuf<u32>,
    weights: DevBuf<f32>,
    layers: Vec<LayerCache>,
    qkv: DevBuf<f32>,
    heads: DevBuf<f32>,
    xl: DevBuf<f32>,
    xf: DevBuf<f32>,
    rstdf: DevBuf<f32>,
    logits: DevBuf<f32>,
    chunk_rows: usize,
    row_loss: DevBuf<f32>,
    row_nll: DevBuf<f32>,
    dx: DevBuf<f32>,
    dxn: DevBuf<f32>,
    dqkv: DevBuf<f32>,
    dattn: DevBuf<f32>,
    dff: DevBuf<f32>,
    dgu: DevBuf<f32>,
    dp: DevBuf<f32>,
    dq: DevBuf<f32>,
    dk: DevBuf<f32>,
    dv: DevBuf<f32>,
    dw_part: DevBuf<f32>,
    cos: DevBuf<f32>,
    sin: DevBuf<f32>,
    /// Embedding backward: positions sorted by (id, position), distinct ids, their starts.
    emb_order: DevBuf<u32>,
    emb_uid: DevBuf<u32>,
    emb_start: DevBuf<u32>,
    n_uid: usize,
    /// Teacher top-k of the batch (distillation).
    t_ids: Option<DevBuf<u32>>,
    t_logp: Option<DevBuf<f32>>,
    /// Flash backward: dO in bf16 (and transposed), D = rowsum(dO ⊙ O).
    do16: DevBuf<u16>,
    dot16: DevBuf<u16>,
    dd: DevBuf<f32>,
}

/// The student on the device: parameters, gradients, AdamW moments and a workspace.
pub struct GpuLlama {
    pub cfg: StudentConfig,
    pub layout: Layout,
    pub params: DevBuf<f32>,
    pub grads: DevBuf<f32>,
    m: DevBuf<f32>,
    v: DevBuf<f32>,
    decay: DevBuf<u8>,
    hyper: AdamConfig,
    /// AdamW updates taken (bias correction).
    pub adam_t: u64,
    /// `[summed loss since zero_grad, squared gradient norm]` and partial sums.
    sums: DevBuf<f64>,
    part: DevBuf<f64>,
    bad: DevBuf<i32>,
    ws: Option<Workspace>,
    /// The KV cache of generation, kept between [`Self::next_logits`] calls.
    gen: Option<Generation>,
    /// Declared last: dropped after every buffer above is freed.
    pub gpu: Gpu,
}

fn grid1(n: usize, threads: u32) -> (u32, u32, u32) {
    (n.div_ceil(threads as usize) as u32, 1, 1)
}

impl GpuLlama {
    /// Upload `params` (flat, [`Layout`] order) with AdamW state zero.
    pub fn new(gpu: Gpu, cfg: &StudentConfig, params: &[f32], hyper: AdamConfig, decay_ranges: &[(usize, usize, bool)]) -> Result<Self> {
        Self::upload(gpu, cfg, params, hyper, Some(decay_ranges))
    }

    /// Parameters only, for inference (a distillation teacher, a calibration source): no
    /// gradient, optimizer state or backward buffers. [`Self::loss`] with `grad`,
    /// [`Self::backward`] and [`Self::step`] refuse.
    pub fn frozen(gpu: Gpu, cfg: &StudentConfig, params: &[f32]) -> Result<Self> {
        // Never used: `step` refuses a frozen model.
        let unused = AdamConfig { beta1: 0.0, beta2: 0.0, eps: 0.0, weight_decay: 0.0 };
        Self::upload(gpu, cfg, params, unused, None)
    }

    /// A plain Llama model's weights (`cfg` from [`crate::student::plain_llama`]) on CUDA device
    /// `ordinal` for inference, with bf16 or f32 products.
    pub fn load_frozen(weights: &crate::source::SourceWeights, cfg: &StudentConfig, ordinal: usize, bf16: bool) -> Result<Self> {
        let params = crate::student::load_params(weights, cfg)?;
        Self::frozen(Gpu::open(ordinal, bf16)?, cfg, &params)
    }

    fn upload(
        gpu: Gpu,
        cfg: &StudentConfig,
        params: &[f32],
        hyper: AdamConfig,
        decay_ranges: Option<&[(usize, usize, bool)]>,
    ) -> Result<Self> {
        let layout = Layout::new(cfg);
        assert_eq!(params.len(), layout.total, "parameter count does not match the config");
        let n = if decay_ranges.is_some() { layout.total } else { 0 };
        let p = gpu.upload(params)?;
        let grads = gpu.alloc::<f32>(n)?;
        gpu.zero(&grads, 0, n)?;
        let m = gpu.alloc::<f32>(n)?;
        gpu.zero(&m, 0, n)?;
        let v = gpu.alloc::<f32>(n)?;
        gpu.zero(&v, 0, n)?;
        let mut mask = vec![0u8; n];
        for &(off, len, d) in decay_ranges.unwrap_or_default() {
            mask[off..off + len].fill(d as u8);
        }
        let decay = gpu.upload(&mask)?;
        let sums = gpu.upload(&[0f64; 2])?;
        let part = gpu.alloc::<f64>(SUM_BLOCKS)?;
        let bad = gpu.upload(&[0i32])?;
        Ok(GpuLlama {
            gpu,
            cfg: cfg.clone(),
            layout,
            params: p,
            grads,
            m,
            v,
            decay,
            hyper,
            adam_t: 0,
            sums,
            part,
            bad,
            ws: None,
            gen: None,
        })
    }

    /// Whether this model holds gradients and optimizer state (not [`Self::frozen`]).
    pub fn trainable(&self) -> bool {
        self.grads.len > 0
    }

    fn check_trainable(&self, what: &str) -> Result<()> {
        if self.trainable() {
            Ok(())
        } else {
            Err(crate::MasaError::Invalid(format!("{what}: this model was loaded for inference only (GpuLlama::frozen)")))
        }
    }

    /// Replace the AdamW state (resume).
    pub fn set_moments(&mut self, m: &[f32], v: &[f32], t: u64) -> Result<()> {
        self.check_trainable("optimizer state")?;
        self.gpu.write(&self.m, 0, m)?;
        self.gpu.write(&self.v, 0, v)?;
        self.adam_t = t;
        Ok(())
    }

    pub fn download_params(&self) -> Result<Vec<f32>> {
        self.gpu.read(&self.params, 0, self.layout.total)
    }
    pub fn download_grads(&self) -> Result<Vec<f32>> {
        self.check_trainable("gradient")?;
        self.gpu.read(&self.grads, 0, self.layout.total)
    }
    pub fn download_moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_trainable("optimizer state")?;
        Ok((self.gpu.read(&self.m, 0, self.layout.total)?, self.gpu.read(&self.v, 0, self.layout.total)?))
    }

    /// Make sure the workspace fits `b` sequences of `t` tokens (reallocating when the sequence
    /// length changes or the batch grows).
    fn ensure_workspace(&mut self, b: usize, t: usize) -> Result<()> {
        if self.ws.as_ref().is_some_and(|w| w.seq == t && w.batch >= b) {
            return Ok(());
        }
        self.ws = None; // free first
        let g = &self.gpu;
        let c = &self.cfg;
        let n = b * t;
        let (h, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (qd, kd) = (nh * hd, nkv * hd);
        let w = qd + 2 * kd;
        let heads = b * nh * t * hd;
        // Backward buffers: none for a frozen model.
        let train = self.trainable();
        let bw = |len: usize| if train { len } else { 0 };
        // Flash attention where it applies and the stored probabilities (about twice their size
        // with the backward's dP) would take over half the free memory: measured on an H200, the
        // flash kernels are correct but still ~20% slower than the batched products (see
        // docs/gpu.md). MASA_FLASH=1 / 0 forces either path.
        let probs_bytes = 2 * c.num_hidden_layers * b * nh * t * t * 4;
        let free = g.memory().1.saturating_sub(g.memory().0);
        let flash_fits = g.bf16 && hd == 64 && t % 64 == 0;
        let flash = flash_fits
            && match std::env::var("MASA_FLASH").as_deref() {
                Ok("1") => true,
                Ok("0") => false,
                _ => probs_bytes > free / 2,
            };
        // Sizes of the buffers only one attention path uses.
        let (f32_heads, probs, bf_heads, rows) = if flash { (0, 0, heads, b * nh * t) } else { (heads, b * nh * t * t, 0, 0) };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            layers.push(LayerCache {
                x: g.alloc(n * h)?,
                xn1: g.alloc(n * h)?,
                rstd1: g.alloc(n)?,
                q: g.alloc(f32_heads)?,
                k: g.alloc(f32_heads)?,
                v: g.alloc(f32_heads)?,
                p: g.alloc(probs)?,
                o: g.alloc(n * qd)?,
                x2: g.alloc(n * h)?,
                xn2: g.alloc(n * h)?,
                rstd2: g.alloc(n)?,
                gu: g.alloc(n * 2 * f)?,
                a: g.alloc(n * f)?,
                q16: g.alloc(bf_heads)?,
                qt16: g.alloc(bf_heads)?,
                k16: g.alloc(bf_heads)?,
                kt16: g.alloc(bf_heads)?,
                v16: g.alloc(bf_heads)?,
                vt16: g.alloc(bf_heads)?,
                lse: g.alloc(rows)?,
            });
        }
        // Equal chunks: a 1-row remainder would be a (1 × vocab × h) product, which cuBLAS runs
        // ~30x slower per flop than the full chunks (measured: 10 ms of a 180 ms step).
        let max_rows = (LOGIT_CHUNK_FLOATS / c.vocab_size.max(1)).max(64).min(n);
        let chunk_rows = n.div_ceil(n.div_ceil(max_rows));
        let (cos, sin) = rope_tables::<f32>(hd, t, c.rope_theta);
        self.ws = Some(Workspace {
            batch: b,
            seq: t,
            flash,
            b: 0,
            ids_host: Vec::new(),
            ids: g.alloc(n)?,
            targets: g.alloc(n)?,
            weights: g.alloc(n)?,
            layers,
            qkv: g.alloc(n * w)?,
            heads: g.alloc(f32_heads)?,
            xl: g.alloc(n * h)?,
            xf: g.alloc(n * h)?,
            rstdf: g.alloc(n)?,
            logits: g.alloc(chunk_rows * c.vocab_size)?,
            chunk_rows,
            row_loss: g.alloc(n)?,
            row_nll: g.alloc(n)?,
            dx: g.alloc(bw(n * h))?,
            dxn: g.alloc(bw(n * h))?,
            dqkv: g.alloc(bw(n * w))?,
            dattn: g.alloc(bw(n * qd))?,
            dff: g.alloc(bw(n * f))?,
            dgu: g.alloc(bw(n * 2 * f))?,
            dp: g.alloc(bw(probs))?,
            dq: g.alloc(bw(heads))?,
            dk: g.alloc(bw(heads))?,
            dv: g.alloc(bw(heads))?,
            dw_part: g.alloc(bw(n.div_ceil(DW_ROWS) * h.max(f)))?,
            cos: g.upload(&cos)?,
            sin: g.upload(&sin)?,
            emb_order: g.alloc(bw(n))?,
            emb_uid: g.alloc(bw(n))?,
            emb_start: g.alloc(bw(n + 1))?,
            n_uid: 0,
            t_ids: None,
            t_logp: None,
            do16: g.alloc(bw(bf_heads))?,
            dot16: g.alloc(bw(bf_heads))?,
            dd: g.alloc(bw(rows))?,
        });
        Ok(())
    }

    /// Fill every activation buffer and the gradient with NaN bytes (0xFF), so a check can
    /// tell a value that was never written from one that was (the next step zeroes the
    /// gradient; every activation is written before it is read).
    pub fn poison(&mut self, b: usize, t: usize) -> Result<()> {
        self.ensure_workspace(b, t)?;
        let ws = self.ws.as_ref().unwrap();
        let g = &self.gpu;
        let mut bufs: Vec<&DevBuf<f32>> = vec![
            &ws.qkv,
            &ws.heads,
            &ws.xl,
            &ws.xf,
            &ws.rstdf,
            &ws.logits,
            &ws.row_loss,
            &ws.row_nll,
            &ws.dx,
            &ws.dxn,
            &ws.dqkv,
            &ws.dattn,
            &ws.dff,
            &ws.dgu,
            &ws.dp,
            &ws.dq,
            &ws.dk,
            &ws.dv,
            &ws.dw_part,
            &self.grads,
        ];
        for lc in &ws.layers {
            bufs.extend([&lc.x, &lc.xn1, &lc.rstd1, &lc.q, &lc.k, &lc.v, &lc.p, &lc.o, &lc.x2, &lc.xn2, &lc.rstd2, &lc.gu, &lc.a]);
        }
        for buf in bufs {
            g.fill_bytes(buf, 0xFF)?;
        }
        g.fill_bytes(&ws.dd, 0xFF)?;
        for buf in [&ws.do16, &ws.dot16] {
            g.fill_bytes(buf, 0xFF)?;
        }
        for lc in &ws.layers {
            g.fill_bytes(&lc.lse, 0xFF)?;
            for buf in [&lc.q16, &lc.qt16, &lc.k16, &lc.kt16, &lc.v16, &lc.vt16] {
                g.fill_bytes(buf, 0xFF)?;
            }
        }
        g.sync()
    }

    fn rmsnorm(&self, x: u64, w: u64, y: u64, rstd: u64, n: usize, d: usize) -> Result<()> {
        let (d32, eps) = (d as i32, self.cfg.rms_norm_eps as f32);
        self.gpu.launch("rmsnorm_fwd", (n as u32, 1, 1), ROW_THREADS, cuda_args!(x, w, y, rstd, d32, eps))
    }

    /// `dx += ∂/∂x`, `dw += ∂/∂w` (deterministic partial sums).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(&self, dy: u64, x: u64, w: u64, rstd: u64, dx: u64, dw: u64, part: u64, n: usize, d: usize) -> Result<()> {
        let g = &self.gpu;
        let d32 = d as i32;
        g.launch("rmsnorm_bwd_dx", (n as u32, 1, 1), ROW_THREADS, cuda_args!(dy, x, w, rstd, dx, d32))?;
        let chunks = n.div_ceil(DW_ROWS);
        let (n32, rows, c32) = (n as i32, DW_ROWS as i32, chunks as i32);
        g.launch("rmsnorm_dw_partial", (d.div_ceil(128) as u32, chunks as u32, 1), 128, cuda_args!(dy, x, rstd, part, n32, d32, rows))?;
        g.launch("colsum_acc", grid1(d, 128), 128, cuda_args!(part, dw, c32, d32))
    }

    /// Forward `ids` (`b` sequences of `t` tokens) to the final-norm hidden states.
    pub fn forward(&mut self, ids: &[u32], b: usize, t: usize) -> Result<()> {
        self.forward_with(ids, b, t, None)
    }

    /// [`Self::forward`]; with `decode = (generation, p)`, `ids` is one token at position `p`
    /// of that sequence: its keys and values are written to the cache at `p`, and its attention
    /// reads the cache's positions `0..=p`.
    fn forward_with(&mut self, ids: &[u32], b: usize, t: usize, decode: Option<(&Generation, usize)>) -> Result<()> {
        assert_eq!(ids.len(), b * t, "ids must hold b·t tokens");
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(crate::MasaError::Invalid(format!("token id {bad} is outside the student's vocabulary ({})", self.cfg.vocab_size)));
        }
        self.ensure_workspace(b, t)?;
        let ws = self.ws.as_mut().unwrap();
        ws.b = b;
        ws.ids_host.clear();
        ws.ids_host.extend_from_slice(ids);
        self.gpu.write(&ws.ids, 0, ids)?;
        let ws = self.ws.as_ref().unwrap();
        let g = &self.gpu;
        let c = &self.cfg;
        let (h, f, n) = (c.hidden_size, c.intermediate_size, b * t);
        let hd = c.head_dim();
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (qd, kd) = (nh * hd, nkv * hd);
        let w = qd + 2 * kd;
        let pp = |off: usize| self.params.at(off);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let (t32, nh32, nkv32, hd32) = (t as i32, nh as i32, nkv as i32, hd as i32);
        let bh = b * nh;
        let nl = self.layout.layers.len();
        let h32 = h as i32;
        g.launch("embed_fwd", (n as u32, 1, 1), ROW_THREADS, cuda_args!(ws.ids.ptr(), pp(self.layout.embed), ws.layers[0].x.ptr(), h32))?;
        for (l, lo) in self.layout.layers.iter().enumerate() {
            let lc = &ws.layers[l];
            self.rmsnorm(lc.x.ptr(), pp(lo.input_norm), lc.xn1.ptr(), lc.rstd1.ptr(), n, h)?;
            g.gemm(false, true, n, w, h, lc.xn1.ptr(), h, pp(lo.wq), h, ws.qkv.ptr(), w, 0.0, None)?;
            if let Some((gen, p)) = decode {
                // One token (b = t = 1): RoPE at position p from the cache's tables, K and V
                // appended as row p, attention over rows 0..=p.
                let half = hd / 2;
                let one = 1i32;
                g.launch(
                    "qkv_split_rope",
                    (1, nh as u32, 1),
                    64,
                    cuda_args!(
                        ws.qkv.ptr(),
                        gen.cos.at(p * half),
                        gen.sin.at(p * half),
                        lc.q.ptr(),
                        lc.k.ptr(),
                        lc.v.ptr(),
                        one,
                        nh32,
                        nkv32,
                        hd32
                    ),
                )?;
                g.copy::<f32>(gen.k[l].at(p * nh * hd), lc.k.ptr(), nh * hd)?;
                g.copy::<f32>(gen.v[l].at(p * nh * hd), lc.v.ptr(), nh * hd)?;
                let len = (p + 1) as i32;
                g.launch(
                    "attn_decode",
                    (nh as u32, 1, 1),
                    128,
                    cuda_args!(lc.q.ptr(), gen.k[l].ptr(), gen.v[l].ptr(), lc.o.ptr(), len, nh32, hd32, scale),
                )?;
            } else if ws.flash {
                g.launch(
                    "qkv_split_rope16",
                    (n as u32, nh as u32, 1),
                    32,
                    cuda_args!(
                        ws.qkv.ptr(),
                        ws.cos.ptr(),
                        ws.sin.ptr(),
                        lc.q16.ptr(),
                        lc.qt16.ptr(),
                        lc.k16.ptr(),
                        lc.kt16.ptr(),
                        lc.v16.ptr(),
                        lc.vt16.ptr(),
                        t32,
                        nh32,
                        nkv32
                    ),
                )?;
                g.launch(
                    "flash_fwd",
                    ((t / 64) as u32, bh as u32, 1),
                    128,
                    cuda_args!(lc.q16.ptr(), lc.k16.ptr(), lc.vt16.ptr(), lc.o.ptr(), lc.lse.ptr(), t32, nh32, scale),
                )?;
            } else {
                g.launch(
                    "qkv_split_rope",
                    (n as u32, nh as u32, 1),
                    64,
                    cuda_args!(ws.qkv.ptr(), ws.cos.ptr(), ws.sin.ptr(), lc.q.ptr(), lc.k.ptr(), lc.v.ptr(), t32, nh32, nkv32, hd32),
                )?;
                // S = Q Kᵀ per (sequence, head), then the causal softmax in place.
                g.gemm(false, true, t, t, hd, lc.q.ptr(), hd, lc.k.ptr(), hd, lc.p.ptr(), t, 0.0, Some((bh, t * hd, t * hd, t * t)))?;
                g.launch("softmax_causal", ((bh * t) as u32, 1, 1), ROW_THREADS, cuda_args!(lc.p.ptr(), t32, scale))?;
                // O = P V, back to rows for o_proj.
                g.gemm(false, false, t, hd, t, lc.p.ptr(), t, lc.v.ptr(), hd, ws.heads.ptr(), hd, 0.0, Some((bh, t * t, t * hd, t * hd)))?;
                let one = 1i32;
                g.launch("heads_rows", (n as u32, nh as u32, 1), 64, cuda_args!(ws.heads.ptr(), lc.o.ptr(), t32, nh32, hd32, one))?;
            }
            g.copy::<f32>(lc.x2.ptr(), lc.x.ptr(), n * h)?;
            g.gemm(false, true, n, h, qd, lc.o.ptr(), qd, pp(lo.wo), qd, lc.x2.ptr(), h, 1.0, None)?;
            self.rmsnorm(lc.x2.ptr(), pp(lo.post_norm), lc.xn2.ptr(), lc.rstd2.ptr(), n, h)?;
            g.gemm(false, true, n, 2 * f, h, lc.xn2.ptr(), h, pp(lo.wg), h, lc.gu.ptr(), 2 * f, 0.0, None)?;
            let (total, f32_) = ((n * f) as u64, f as i32);
            g.launch("swiglu_fwd", grid1(n * f, 256), 256, cuda_args!(lc.gu.ptr(), lc.a.ptr(), total, f32_))?;
            let out = if l + 1 < nl { ws.layers[l + 1].x.ptr() } else { ws.xl.ptr() };
            g.copy::<f32>(out, lc.x2.ptr(), n * h)?;
            g.gemm(false, true, n, h, f, lc.a.ptr(), f, pp(lo.wd), f, out, h, 1.0, None)?;
        }
        self.rmsnorm(ws.xl.ptr(), pp(self.layout.norm), ws.xf.ptr(), ws.rstdf.ptr(), n, h)?;
        Ok(())
    }

    /// Loss of the last forward against `targets` with per-row `weights`, added on the device to
    /// the loss sum (read with [`Self::sums`]); with `grad`, also the gradient of the final
    /// hidden states (kept for [`Self::backward`]) and the lm head's (added to the gradient).
    /// `nll`: per-row NLL copied back when given.
    pub fn loss(&mut self, targets: &[u32], weights: &[f32], teacher: Option<&Teacher>, grad: bool, nll: Option<&mut [f32]>) -> Result<()> {
        if grad {
            self.check_trainable("loss with gradient")?;
        }
        let c = self.cfg.clone();
        let (h, v) = (c.hidden_size, c.vocab_size);
        let ws = self.ws.as_mut().expect("forward before loss");
        let n = ws.b * ws.seq;
        assert!(targets.len() >= n && weights.len() >= n);
        if let Some(&bad) = targets[..n].iter().find(|&&i| i as usize >= v) {
            return Err(crate::MasaError::Invalid(format!("target id {bad} is outside the student's vocabulary ({v})")));
        }
        self.gpu.write(&ws.targets, 0, &targets[..n])?;
        self.gpu.write(&ws.weights, 0, &weights[..n])?;
        let (k, alpha, tau) = match teacher {
            Some(te) => {
                assert!(te.ids.len() >= n * te.k && te.logp.len() >= n * te.k);
                if ws.t_ids.as_ref().is_none_or(|b| b.len < n * te.k) {
                    ws.t_ids = Some(self.gpu.alloc(n * te.k)?);
                    ws.t_logp = Some(self.gpu.alloc(n * te.k)?);
                }
                self.gpu.write(ws.t_ids.as_ref().unwrap(), 0, &te.ids[..n * te.k])?;
                self.gpu.write(ws.t_logp.as_ref().unwrap(), 0, &te.logp[..n * te.k])?;
                (te.k, te.alpha as f32, te.temperature as f32)
            }
            None => (0, 1.0, 1.0),
        };
        let ws = self.ws.as_ref().unwrap();
        let g = &self.gpu;
        let e = self.params.at(self.layout.head);
        // A frozen model has no gradient buffer (and `grad` is refused above).
        let de = if grad { self.grads.at(self.layout.head) } else { 0 };
        let (tid_base, tlp_base) = (ws.t_ids.as_ref().map(|b| b.ptr()).unwrap_or(0), ws.t_logp.as_ref().map(|b| b.ptr()).unwrap_or(0));
        let mut r0 = 0;
        while r0 < n {
            let rows = ws.chunk_rows.min(n - r0);
            let xf = ws.xf.at(r0 * h);
            g.gemm(false, true, rows, v, h, xf, h, e, h, ws.logits.ptr(), v, 0.0, None)?;
            let (v32, wg, k32) = (v as i32, grad as i32, k as i32);
            let (tids, tlp) = (tid_base + (r0 * k * 4) as u64, tlp_base + (r0 * k * 4) as u64);
            g.launch(
                "ce_rows",
                (rows as u32, 1, 1),
                ROW_THREADS * 2,
                cuda_args!(
                    ws.logits.ptr(),
                    v32,
                    ws.targets.at(r0),
                    ws.weights.at(r0),
                    ws.row_loss.at(r0),
                    ws.row_nll.at(r0),
                    wg,
                    tids,
                    tlp,
                    k32,
                    alpha,
                    tau
                ),
            )?;
            if grad {
                // dx = dZ E; dE += dZᵀ xf
                g.gemm(false, false, rows, h, v, ws.logits.ptr(), v, e, h, ws.dx.at(r0 * h), h, 0.0, None)?;
                g.gemm(true, false, v, h, rows, ws.logits.ptr(), v, xf, h, de, h, 1.0, None)?;
            }
            r0 += rows;
        }
        self.sum_into(ws.row_loss.ptr(), n, 0, false, true)?;
        if let Some(out) = nll {
            let got = g.read(&ws.row_nll, 0, n)?;
            out[..n].copy_from_slice(&got);
        }
        Ok(())
    }

    /// `sums[slot] (+)= Σ x` (or Σ x² with `square`), in f64 with a fixed reduction shape.
    fn sum_into(&self, x: u64, len: usize, slot: i32, square: bool, accumulate: bool) -> Result<()> {
        let chunk = len.div_ceil(SUM_BLOCKS).max(1);
        let blocks = len.div_ceil(chunk).max(1);
        let (len64, chunk64, sq) = (len as u64, chunk as u64, square as i32);
        self.gpu.launch("sumsq_partial", (blocks as u32, 1, 1), 256, cuda_args!(x, len64, chunk64, self.part.ptr(), sq))?;
        let (m, acc) = (blocks as i32, accumulate as i32);
        self.gpu.launch("sum_partials", (1, 1, 1), 256, cuda_args!(self.part.ptr(), m, self.sums.ptr(), slot, acc))
    }

    /// Backward from the last `loss(grad = true)`, adding every parameter's gradient.
    pub fn backward(&mut self) -> Result<()> {
        self.check_trainable("backward")?;
        let c = self.cfg.clone();
        let ws = self.ws.as_mut().expect("forward before backward");
        let (b, t) = (ws.b, ws.seq);
        let (h, f, n) = (c.hidden_size, c.intermediate_size, b * t);
        let hd = c.head_dim();
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (qd, kd) = (nh * hd, nkv * hd);
        let w = qd + 2 * kd;
        // Embedding rows: positions grouped by id, in token order inside each group.
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by_key(|&i| (ws.ids_host[i as usize], i));
        let (mut uid, mut start) = (Vec::new(), Vec::new());
        for (s, &i) in order.iter().enumerate() {
            let id = ws.ids_host[i as usize];
            if uid.last() != Some(&id) {
                uid.push(id);
                start.push(s as u32);
            }
        }
        start.push(n as u32);
        ws.n_uid = uid.len();
        self.gpu.write(&ws.emb_order, 0, &order)?;
        self.gpu.write(&ws.emb_uid, 0, &uid)?;
        self.gpu.write(&ws.emb_start, 0, &start)?;
        let ws = self.ws.as_ref().unwrap();
        let g = &self.gpu;
        let pp = |off: usize| self.params.at(off);
        let gg = |off: usize| self.grads.at(off);
        let part = ws.dw_part.ptr();
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let (t32, nh32, nkv32, hd32) = (t as i32, nh as i32, nkv as i32, hd as i32);
        let bh = b * nh;
        let (mut dx, mut dxn) = (ws.dx.ptr(), ws.dxn.ptr());
        // Final norm: d(xf) → d(xl).
        g.zero(&ws.dxn, 0, n * h)?;
        let no = self.layout.norm;
        self.rmsnorm_bwd(dx, ws.xl.ptr(), pp(no), ws.rstdf.ptr(), dxn, gg(no), part, n, h)?;
        std::mem::swap(&mut dx, &mut dxn);
        for (l, lo) in self.layout.layers.iter().enumerate().rev() {
            let lc = &ws.layers[l];
            // FFN: out = x2 + down(a)
            g.gemm(false, false, n, f, h, dx, h, pp(lo.wd), f, ws.dff.ptr(), f, 0.0, None)?;
            g.gemm(true, false, h, f, n, dx, h, lc.a.ptr(), f, gg(lo.wd), f, 1.0, None)?;
            let (total, f32_) = ((n * f) as u64, f as i32);
            g.launch("swiglu_bwd", grid1(n * f, 256), 256, cuda_args!(lc.gu.ptr(), ws.dff.ptr(), ws.dgu.ptr(), total, f32_))?;
            g.gemm(false, false, n, h, 2 * f, ws.dgu.ptr(), 2 * f, pp(lo.wg), h, dxn, h, 0.0, None)?;
            g.gemm(true, false, 2 * f, h, n, ws.dgu.ptr(), 2 * f, lc.xn2.ptr(), h, gg(lo.wg), h, 1.0, None)?;
            self.rmsnorm_bwd(dxn, lc.x2.ptr(), pp(lo.post_norm), lc.rstd2.ptr(), dx, gg(lo.post_norm), part, n, h)?;
            // Attention: x2 = x + o_proj(o)
            g.gemm(false, false, n, qd, h, dx, h, pp(lo.wo), qd, ws.dattn.ptr(), qd, 0.0, None)?;
            g.gemm(true, false, h, qd, n, dx, h, lc.o.ptr(), qd, gg(lo.wo), qd, 1.0, None)?;
            if ws.flash {
                let grid = ((t / 64) as u32, bh as u32, 1);
                g.launch(
                    "flash_bwd_prep",
                    (n as u32, nh as u32, 1),
                    64,
                    cuda_args!(ws.dattn.ptr(), lc.o.ptr(), ws.do16.ptr(), ws.dot16.ptr(), ws.dd.ptr(), t32, nh32),
                )?;
                g.launch(
                    "flash_bwd_dq",
                    grid,
                    128,
                    cuda_args!(
                        lc.q16.ptr(),
                        lc.k16.ptr(),
                        lc.kt16.ptr(),
                        lc.v16.ptr(),
                        ws.do16.ptr(),
                        lc.lse.ptr(),
                        ws.dd.ptr(),
                        ws.dq.ptr(),
                        t32,
                        scale
                    ),
                )?;
                g.launch(
                    "flash_bwd_dkdv",
                    grid,
                    128,
                    cuda_args!(
                        lc.q16.ptr(),
                        lc.qt16.ptr(),
                        lc.k16.ptr(),
                        lc.v16.ptr(),
                        ws.do16.ptr(),
                        ws.dot16.ptr(),
                        lc.lse.ptr(),
                        ws.dd.ptr(),
                        ws.dk.ptr(),
                        ws.dv.ptr(),
                        t32,
                        scale
                    ),
                )?;
            } else {
                let zero = 0i32;
                g.launch("heads_rows", (n as u32, nh as u32, 1), 64, cuda_args!(ws.dattn.ptr(), ws.heads.ptr(), t32, nh32, hd32, zero))?;
                let dout = ws.heads.ptr();
                // dV = Pᵀ dO; dP = dO Vᵀ; dS; dQ = dS K; dK = dSᵀ Q
                g.gemm(true, false, t, hd, t, lc.p.ptr(), t, dout, hd, ws.dv.ptr(), hd, 0.0, Some((bh, t * t, t * hd, t * hd)))?;
                g.gemm(false, true, t, t, hd, dout, hd, lc.v.ptr(), hd, ws.dp.ptr(), t, 0.0, Some((bh, t * hd, t * hd, t * t)))?;
                g.launch("softmax_causal_bwd", ((bh * t) as u32, 1, 1), ROW_THREADS, cuda_args!(lc.p.ptr(), ws.dp.ptr(), t32, scale))?;
                g.gemm(false, false, t, hd, t, ws.dp.ptr(), t, lc.k.ptr(), hd, ws.dq.ptr(), hd, 0.0, Some((bh, t * t, t * hd, t * hd)))?;
                g.gemm(true, false, t, hd, t, ws.dp.ptr(), t, lc.q.ptr(), hd, ws.dk.ptr(), hd, 0.0, Some((bh, t * t, t * hd, t * hd)))?;
            }
            g.launch(
                "qkv_merge_rope_bwd",
                (n as u32, (nh + nkv) as u32, 1),
                64,
                cuda_args!(ws.dq.ptr(), ws.dk.ptr(), ws.dv.ptr(), ws.cos.ptr(), ws.sin.ptr(), ws.dqkv.ptr(), t32, nh32, nkv32, hd32),
            )?;
            g.gemm(false, false, n, h, w, ws.dqkv.ptr(), w, pp(lo.wq), h, dxn, h, 0.0, None)?;
            g.gemm(true, false, w, h, n, ws.dqkv.ptr(), w, lc.xn1.ptr(), h, gg(lo.wq), h, 1.0, None)?;
            self.rmsnorm_bwd(dxn, lc.x.ptr(), pp(lo.input_norm), lc.rstd1.ptr(), dx, gg(lo.input_norm), part, n, h)?;
        }
        let h32 = h as i32;
        g.launch(
            "embed_bwd",
            (ws.n_uid as u32, 1, 1),
            ROW_THREADS,
            cuda_args!(dx, ws.emb_order.ptr(), ws.emb_uid.ptr(), ws.emb_start.ptr(), gg(self.layout.embed), h32),
        )
    }

    /// Logits `(b·t, vocab)` of the last forward (checks and scoring).
    pub fn logits(&self) -> Result<Vec<f32>> {
        let ws = self.ws.as_ref().expect("forward before logits");
        let (h, v, n) = (self.cfg.hidden_size, self.cfg.vocab_size, ws.b * ws.seq);
        let out = self.gpu.alloc::<f32>(n * v)?;
        self.gpu.gemm(false, true, n, v, h, ws.xf.ptr(), h, self.params.at(self.layout.head), h, out.ptr(), v, 0.0, None)?;
        self.gpu.read(&out, 0, n * v)
    }

    /// The top-k next-token log-probs at every position of the last forward (a distillation
    /// teacher): `(ids, log-probs)`, `(b·t, k)` row-major, descending, ties to the lower id, as
    /// [`crate::distill::top_k_row`] on the CPU. Logits are made chunk by chunk and never leave
    /// the device.
    pub fn top_k_logprobs(&self, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let ws = self.ws.as_ref().expect("forward before top_k_logprobs");
        let (h, v, n) = (self.cfg.hidden_size, self.cfg.vocab_size, ws.b * ws.seq);
        let k = k.min(v);
        if k == 0 || k > TOPK_MAX {
            return Err(crate::MasaError::Invalid(format!(
                "distillation top_k {k}: the CUDA teacher keeps 1..={TOPK_MAX} log-probs per position"
            )));
        }
        let g = &self.gpu;
        let (ids, lp) = (g.alloc::<u32>(n * k)?, g.alloc::<f32>(n * k)?);
        let (v32, k32) = (v as i32, k as i32);
        let mut r0 = 0;
        while r0 < n {
            let rows = ws.chunk_rows.min(n - r0);
            g.gemm(false, true, rows, v, h, ws.xf.at(r0 * h), h, self.params.at(self.layout.head), h, ws.logits.ptr(), v, 0.0, None)?;
            g.launch("topk_rows", (rows as u32, 1, 1), TOPK_THREADS, cuda_args!(ws.logits.ptr(), v32, k32, ids.at(r0 * k), lp.at(r0 * k)))?;
            r0 += rows;
        }
        Ok((g.read(&ids, 0, n * k)?, g.read(&lp, 0, n * k)?))
    }

    /// Zeroed device sums for [`Self::add_ffn_grams`], for `layers` only (all when `None`).
    pub fn ffn_grams(&self, layers: Option<&[usize]>) -> Result<FfnGrams> {
        let (h, f) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let zeroed = |len: usize| -> Result<DevBuf<f64>> {
            let b = self.gpu.alloc::<f64>(len)?;
            self.gpu.zero(&b, 0, len)?;
            Ok(b)
        };
        let mut kept = Vec::new();
        for l in (0..self.cfg.num_hidden_layers).filter(|l| layers.is_none_or(|ls| ls.contains(l))) {
            kept.push((l, zeroed(h * h)?, zeroed(f * f)?));
        }
        Ok(FfnGrams { layers: kept, scratch: self.gpu.alloc(h.max(f) * h.max(f))?, rows: 0 })
    }

    /// Add the last forward's `xᵀx` of each layer's two FFN inputs (the post-attention norm's
    /// output, input of gate/up_proj, and the SwiGLU output, input of down_proj) to `sums`:
    /// one f32 product per batch, summed across batches in f64, as the CPU calibration
    /// ([`crate::calibrate`]), for the layers `sums` keeps.
    pub fn add_ffn_grams(&self, sums: &mut FfnGrams) -> Result<()> {
        let ws = self.ws.as_ref().expect("forward before add_ffn_grams");
        let (h, f, n) = (self.cfg.hidden_size, self.cfg.intermediate_size, ws.b * ws.seq);
        let g = &self.gpu;
        for (l, sin, smid) in &sums.layers {
            let lc = &ws.layers[*l];
            for (x, d, acc) in [(lc.xn2.ptr(), h, sin), (lc.a.ptr(), f, smid)] {
                g.gemm(true, false, d, d, n, x, d, x, d, sums.scratch.ptr(), d, 0.0, None)?;
                let len = (d * d) as u64;
                g.launch("add_f64", grid1(d * d, 256), 256, cuda_args!(acc.ptr(), sums.scratch.ptr(), len))?;
            }
        }
        sums.rows += n as u64;
        Ok(())
    }

    /// The sums as `(layer, Σ x xᵀ of the FFN input, of the SwiGLU output)` per layer kept,
    /// row-major and exactly symmetric: the upper triangle mirrored, as the CPU's `gram` does
    /// (cuBLAS does not promise `C[i][j] == C[j][i]` bit for bit).
    pub fn read_ffn_grams(&self, sums: &FfnGrams) -> Result<Vec<(usize, Vec<f64>, Vec<f64>)>> {
        let read = |b: &DevBuf<f64>, d: usize| -> Result<Vec<f64>> {
            let mut m = self.gpu.read(b, 0, d * d)?;
            for i in 0..d {
                for j in 0..i {
                    m[i * d + j] = m[j * d + i];
                }
            }
            Ok(m)
        };
        let (h, f) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        sums.layers.iter().map(|(l, a, b)| Ok((*l, read(a, h)?, read(b, f)?))).collect()
    }

    /// Next-token logits after `ids` (one sequence), for generation with a KV cache. When `ids`
    /// is the previous call's sequence plus one token, only that token runs (attention over the
    /// cached keys and values); otherwise the whole prefix runs (right-padded to a multiple of
    /// 64 positions; causal attention: the padding changes nothing before it) and its keys and
    /// values fill the cache. Then the lm-head product of the last position only.
    pub fn next_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let c = self.cfg.clone();
        let (h, v, n, max_pos) = (c.hidden_size, c.vocab_size, ids.len(), c.max_position_embeddings);
        if n == 0 || n > max_pos {
            return Err(crate::MasaError::Invalid(format!("generation from {n} tokens: the model takes 1..={max_pos}")));
        }
        let cap = max_pos.min(DECODE_MAX);
        let mut gen = self.gen.take();
        let extends = gen.as_ref().is_some_and(|g| g.tokens.len() + 1 == n && n <= g.cap && ids.starts_with(&g.tokens));
        let row = if extends {
            let g = gen.as_mut().unwrap();
            self.forward_with(&ids[n - 1..], 1, 1, Some((g, n - 1)))?;
            g.tokens.push(ids[n - 1]);
            0
        } else {
            let t = (n.div_ceil(64) * 64).min(max_pos);
            let mut x = ids.to_vec();
            x.resize(t, 0);
            self.forward(&x, 1, t)?;
            // Cached where the keys and values are in f32 (not the flash path) and fit the
            // cache; otherwise this call's forward is the whole answer (no cache).
            if t > cap || self.ws.as_ref().is_some_and(|w| w.flash) {
                gen = None;
            } else {
                let hd = c.head_dim();
                let (nh, width) = (c.num_attention_heads, c.num_attention_heads * hd);
                if gen.is_none() {
                    let (cos, sin) = rope_tables::<f32>(hd, cap, c.rope_theta);
                    let (mut k, mut v) = (Vec::new(), Vec::new());
                    for _ in 0..c.num_hidden_layers {
                        k.push(self.gpu.alloc(cap * width)?);
                        v.push(self.gpu.alloc(cap * width)?);
                    }
                    gen = Some(Generation { tokens: Vec::new(), k, v, cos: self.gpu.upload(&cos)?, sin: self.gpu.upload(&sin)?, cap });
                }
                let g = gen.as_mut().unwrap();
                let ws = self.ws.as_ref().unwrap();
                let (t32, nh32, hd32, rows) = (t as i32, nh as i32, hd as i32, 1i32);
                for (l, lc) in ws.layers.iter().enumerate() {
                    self.gpu.launch(
                        "heads_rows",
                        (t as u32, nh as u32, 1),
                        64,
                        cuda_args!(lc.k.ptr(), g.k[l].ptr(), t32, nh32, hd32, rows),
                    )?;
                    self.gpu.launch(
                        "heads_rows",
                        (t as u32, nh as u32, 1),
                        64,
                        cuda_args!(lc.v.ptr(), g.v[l].ptr(), t32, nh32, hd32, rows),
                    )?;
                }
                g.tokens = ids.to_vec();
            }
            n - 1
        };
        self.gen = gen;
        let ws = self.ws.as_ref().unwrap();
        self.gpu.gemm(false, true, 1, v, h, ws.xf.at(row * h), h, self.params.at(self.layout.head), h, ws.logits.ptr(), v, 0.0, None)?;
        self.gpu.read(&ws.logits, 0, v)
    }

    /// Whether the last batch's attention ran on the flash kernels.
    pub fn uses_flash(&self) -> bool {
        self.ws.as_ref().is_some_and(|w| w.flash)
    }

    /// Zero the gradient and the loss sum.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.gpu.zero(&self.grads, 0, self.grads.len)?;
        self.gpu.zero(&self.sums, 0, 2)
    }

    /// `(summed loss since zero_grad, global gradient L2 norm)`; waits for the device.
    pub fn loss_and_grad_norm(&mut self) -> Result<(f64, f64)> {
        self.check_trainable("gradient norm")?;
        self.sum_into(self.grads.ptr(), self.layout.total, 1, true, false)?;
        let s = self.gpu.read(&self.sums, 0, 2)?;
        Ok((s[0], s[1].sqrt()))
    }

    /// Summed loss since zero_grad (evaluation, no gradient); waits for the device.
    pub fn loss_sum(&mut self) -> Result<f64> {
        Ok(self.gpu.read(&self.sums, 0, 1)?[0])
    }

    /// Reset the loss sum only (evaluation between training steps).
    pub fn zero_loss(&mut self) -> Result<()> {
        self.gpu.zero(&self.sums, 0, 1)
    }

    /// One AdamW update (torch's formula, as [`crate::student::optim::AdamW::step`]) with gradient
    /// scale `gscale` (the clip factor); false when a parameter became NaN/Inf.
    pub fn step(&mut self, gscale: f32, lr: f64) -> Result<bool> {
        self.check_trainable("optimizer step")?;
        self.gen = None; // its keys and values belong to the old parameters
        self.adam_t += 1;
        let hp = self.hyper;
        let bc1 = 1.0 - hp.beta1.powi(self.adam_t as i32);
        let bc2 = 1.0 - hp.beta2.powi(self.adam_t as i32);
        let (b1, b2, eps) = (hp.beta1 as f32, hp.beta2 as f32, hp.eps as f32);
        let shrink = (1.0 - lr * hp.weight_decay) as f32;
        let step = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let n = self.layout.total;
        let n64 = n as u64;
        self.gpu.zero(&self.bad, 0, 1)?;
        self.gpu.launch(
            "adamw",
            grid1(n, 256),
            256,
            cuda_args!(
                self.params.ptr(),
                self.grads.ptr(),
                self.m.ptr(),
                self.v.ptr(),
                self.decay.ptr(),
                n64,
                gscale,
                b1,
                b2,
                eps,
                shrink,
                step,
                bc2_sqrt,
                self.bad.ptr()
            ),
        )?;
        Ok(self.gpu.read(&self.bad, 0, 1)?[0] == 0)
    }
}
