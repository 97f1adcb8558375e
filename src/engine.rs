//! Where the student trains: the CPU engine ([`crate::student::llama`] + [`crate::student::optim`]) or, with the
//! `cuda` feature, the GPU engine ([`crate::cuda::llama`]), behind one [`Engine`] interface, and
//! the one optimizer step ([`optimizer_step`]) that `train`, `finetune` and `bench` all run:
//! zero the gradient, forward/loss/backward over the micro-batches, global-norm clip, AdamW.

use serde::{Deserialize, Serialize};

use crate::error::{MasaError, Result};
use crate::student::kernels::{Targets, Teacher};
use crate::student::llama::{Llama, Workspace};
pub use crate::student::optim::AdamConfig;
use crate::student::optim::{self, AdamW};
use crate::student::StudentConfig;

/// `--device`: `cpu`, `cuda` or `cuda:N` (also the string form in specs and records).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: use cpu, cuda or cuda:N (N the device number)")),
        }
    }
}

impl Device {
    pub fn is_cpu(&self) -> bool {
        *self == Device::Cpu
    }
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
}

impl TryFrom<String> for Device {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--precision` of the matrix products: `f32` everywhere, or `bf16` tensor-core products with
/// f32 accumulation and f32 master weights (CUDA only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

/// One micro-batch: `b` sequences of `t` input tokens, their targets and per-token loss
/// weights, and optionally the teacher's top-k (distillation).
pub struct MicroBatch<'a> {
    pub ids: &'a [u32],
    pub targets: &'a [u32],
    pub weights: &'a [f32],
    pub b: usize,
    pub t: usize,
    pub teacher: Option<Teacher<'a>>,
}

/// A student with its gradient and AdamW state on some device.
pub trait Engine {
    /// Zero the gradient and the loss sum.
    fn zero_grad(&mut self) -> Result<()>;
    /// Forward, loss (added to the loss sum) and backward (added to the gradient) of one batch.
    fn accumulate(&mut self, mb: &MicroBatch) -> Result<()>;
    /// The loss sum since [`zero_grad`](Self::zero_grad) and the global gradient norm.
    fn loss_and_grad_norm(&mut self) -> Result<(f64, f64)>;
    /// One AdamW update with the gradient scaled by `gscale`; false when a parameter became
    /// NaN or Inf.
    fn adam_step(&mut self, gscale: f32, lr: f64) -> Result<bool>;
    /// Summed unweighted next-token loss of `b` sequences (no gradient).
    fn eval_loss(&mut self, ids: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f64>;
    /// Parameters, flat in [`crate::student::llama::Layout`] order.
    fn params(&self) -> Result<Vec<f32>>;
    /// AdamW first and second moments, and updates taken.
    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>, u64)>;
    /// Restore AdamW state (resume).
    fn set_moments(&mut self, m: Vec<f32>, v: Vec<f32>, t: u64) -> Result<()>;
    /// What the engine runs on, for logs.
    fn describe(&self) -> String;
    /// Device memory in use (MiB), where the engine runs on a device.
    fn device_memory_mb(&self) -> Option<f64> {
        None
    }
}

/// Result of one optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
}

/// Why a step was refused: the loss or gradient (or the updated parameters) are not finite, or
/// the model collapsed (see [`Diverged::collapsed`]).
#[derive(Clone, Copy, Debug)]
pub struct Diverged {
    pub loss: f64,
    pub grad_norm: f64,
}

impl Diverged {
    /// A finite loss well above zero with an exactly zero gradient: the network is dead (a
    /// constant output no update can move), as a far too high learning rate leaves it; training
    /// on would only burn steps, and a checkpoint of it is no good start.
    pub fn collapsed(loss: f64, grad_norm: f64) -> bool {
        loss.is_finite() && loss > 1e-3 && grad_norm == 0.0
    }

    /// What went wrong, for messages.
    pub fn why(&self) -> &'static str {
        if Self::collapsed(self.loss, self.grad_norm) {
            "zero gradient at a non-zero loss: the model collapsed"
        } else {
            "NaN or Inf"
        }
    }
}

/// The training step every command runs: zero the gradient; forward, loss and backward over the
/// micro-batches (their loss weights already include 1 / accumulation); global-norm clip at
/// `clip` (0: none); AdamW at `lr`. `Ok(Err(_))` when the loss, gradient or parameters stopped
/// being finite or the model collapsed (nothing is saved; the caller reports).
pub fn optimizer_step(e: &mut dyn Engine, micro: &[MicroBatch], clip: f64, lr: f64) -> Result<std::result::Result<StepStats, Diverged>> {
    e.zero_grad()?;
    for mb in micro {
        e.accumulate(mb)?;
    }
    let (loss, grad_norm) = e.loss_and_grad_norm()?;
    if !loss.is_finite() || !grad_norm.is_finite() || Diverged::collapsed(loss, grad_norm) {
        return Ok(Err(Diverged { loss, grad_norm }));
    }
    if !e.adam_step(optim::clip_factor(grad_norm, clip), lr)? {
        return Ok(Err(Diverged { loss, grad_norm }));
    }
    Ok(Ok(StepStats { loss, grad_norm }))
}

/// Weight-decay ranges: matrices (embeddings included) decay, norm weights do not (nanoGPT).
pub fn decay_ranges(model: &Llama) -> Vec<(usize, usize, bool)> {
    model.layout.tensors.iter().map(|(_, s, off)| (*off, s.iter().product(), s.len() >= 2)).collect()
}

/// Build the engine for `device` with `params` (flat, layout order) and fresh AdamW state;
/// the workspace fits batches of up to `batch` sequences of `seq` tokens (grown on demand).
pub fn open(
    device: Device,
    precision: Precision,
    cfg: &StudentConfig,
    params: Vec<f32>,
    adam: AdamConfig,
    batch: usize,
    seq: usize,
) -> Result<Box<dyn Engine>> {
    let model = Llama::new(cfg);
    let decay = decay_ranges(&model);
    match device {
        Device::Cpu => {
            if precision != Precision::F32 {
                return Err(MasaError::Invalid("--precision bf16 needs --device cuda; the CPU engine computes in f32".into()));
            }
            let n = params.len();
            Ok(Box::new(CpuEngine {
                opt: AdamW::new(n, adam.beta1, adam.beta2, adam.eps, adam.weight_decay, decay),
                grads: vec![0f32; n],
                ws: Workspace::new(cfg, batch, seq),
                model,
                params,
                loss: 0.0,
            }))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let gpu = crate::cuda::Gpu::open(ordinal, precision == Precision::Bf16)?;
            Ok(Box::new(crate::cuda::llama::GpuLlama::new(gpu, cfg, &params, adam, &decay)?))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// The error of `--device cuda` in a build without the `cuda` feature.
pub fn no_cuda() -> MasaError {
    MasaError::Invalid(
        "--device cuda: this masa was built without CUDA support; rebuild with `cargo build --release --features cuda` \
         (no CUDA toolkit is needed to build; the driver, cuBLAS and NVRTC libraries are needed to run)"
            .into(),
    )
}

/// The CPU engine: [`Llama`] with a [`Workspace`] and [`AdamW`].
pub struct CpuEngine {
    model: Llama,
    params: Vec<f32>,
    grads: Vec<f32>,
    opt: AdamW,
    ws: Workspace<f32>,
    loss: f64,
}

impl CpuEngine {
    fn fit(&mut self, b: usize, t: usize) {
        if self.ws.seq != t || self.ws.batch < b {
            self.ws = Workspace::new(&self.model.cfg, b.max(self.ws.batch), t);
        }
    }
}

impl Engine for CpuEngine {
    fn zero_grad(&mut self) -> Result<()> {
        self.grads.fill(0.0);
        self.loss = 0.0;
        Ok(())
    }
    fn accumulate(&mut self, mb: &MicroBatch) -> Result<()> {
        self.fit(mb.b, mb.t);
        self.model.forward(&self.params, &mut self.ws, mb.ids, mb.b, mb.t);
        let tg = Targets { ids: mb.targets, weights: mb.weights };
        self.loss += self.model.loss(&self.params, &mut self.ws, &tg, mb.teacher.as_ref(), Some(&mut self.grads), None);
        self.model.backward(&self.params, &mut self.ws, &mut self.grads);
        Ok(())
    }
    fn loss_and_grad_norm(&mut self) -> Result<(f64, f64)> {
        Ok((self.loss, optim::grad_norm(&self.grads)))
    }
    fn adam_step(&mut self, gscale: f32, lr: f64) -> Result<bool> {
        self.opt.step(&mut self.params, &self.grads, gscale, lr);
        Ok(self.params.iter().all(|v| v.is_finite()))
    }
    fn eval_loss(&mut self, ids: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f64> {
        self.fit(b, t);
        let w = vec![1.0f32; b * t];
        self.model.forward(&self.params, &mut self.ws, ids, b, t);
        Ok(self.model.loss(&self.params, &mut self.ws, &Targets { ids: targets, weights: &w }, None, None, None))
    }
    fn params(&self) -> Result<Vec<f32>> {
        Ok(self.params.clone())
    }
    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>, u64)> {
        Ok((self.opt.m.clone(), self.opt.v.clone(), self.opt.t))
    }
    fn set_moments(&mut self, m: Vec<f32>, v: Vec<f32>, t: u64) -> Result<()> {
        self.opt.m = m;
        self.opt.v = v;
        self.opt.t = t;
        Ok(())
    }
    fn describe(&self) -> String {
        format!("cpu ({} threads, f32)", rayon::current_num_threads())
    }
}

#[cfg(feature = "cuda")]
impl Engine for crate::cuda::llama::GpuLlama {
    fn zero_grad(&mut self) -> Result<()> {
        crate::cuda::llama::GpuLlama::zero_grad(self)
    }
    fn accumulate(&mut self, mb: &MicroBatch) -> Result<()> {
        self.forward(mb.ids, mb.b, mb.t)?;
        self.loss(mb.targets, mb.weights, mb.teacher.as_ref(), true, None)?;
        self.backward()
    }
    fn loss_and_grad_norm(&mut self) -> Result<(f64, f64)> {
        crate::cuda::llama::GpuLlama::loss_and_grad_norm(self)
    }
    fn adam_step(&mut self, gscale: f32, lr: f64) -> Result<bool> {
        self.step(gscale, lr)
    }
    fn eval_loss(&mut self, ids: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f64> {
        self.zero_loss()?;
        self.forward(ids, b, t)?;
        let w = vec![1.0f32; b * t];
        self.loss(targets, &w, None, false, None)?;
        self.loss_sum()
    }
    fn params(&self) -> Result<Vec<f32>> {
        self.download_params()
    }
    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>, u64)> {
        let (m, v) = self.download_moments()?;
        Ok((m, v, self.adam_t))
    }
    fn set_moments(&mut self, m: Vec<f32>, v: Vec<f32>, t: u64) -> Result<()> {
        crate::cuda::llama::GpuLlama::set_moments(self, &m, &v, t)
    }
    fn describe(&self) -> String {
        let attn = if self.uses_flash() { ", flash attention" } else { "" };
        format!("cuda:{} ({}, {} products{attn})", self.gpu.ordinal, self.gpu.name, if self.gpu.bf16 { "Bf16" } else { "F32" })
    }
    fn device_memory_mb(&self) -> Option<f64> {
        Some(self.gpu.memory().0 as f64 / 1048576.0)
    }
}
