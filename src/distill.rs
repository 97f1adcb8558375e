//! Teacher side of `masa train --distill TEACHER`: the source model's top-k next-token
//! log-probs for every training batch, computed once per training-data order and cached on disk, so
//! several students trained on the same data (same corpus, seed, batch and sequence length)
//! reuse them. The student side (α·CE + (1−α)·τ²·KL) is in [`crate::student::kernels::lm_head_loss`].
//!
//! Cache layout: `<cache>/<key>/topk.bin`, fixed-size records, record `i` = micro-batch `i` of
//! the stream: `b·t·k` u32 token ids then `b·t·k` f32 log-probs, little endian; `meta.json`
//! says what the key covers. A partial trailing record (a killed run) is cut off on open.
//!
//! With `--device cuda` a plain Llama teacher (SmolLM2, masa's students) runs on the GPU engine
//! ([`crate::cuda::llama::GpuLlama::top_k_logprobs`]) at the run's precision; the key then
//! names that engine, since its log-probs differ from the CPU's by rounding. Other teachers run
//! on the CPU.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use candle_core::Tensor;
use sha2::{Digest, Sha256};

use crate::engine::{Device, Precision};
use crate::error::{IoContext, MasaError, Result};
use crate::source::model::{NoHooks, Transformer};
use crate::source::tokenizer::Tokenizer;
use crate::source::SourceModel;

/// `--distill TEACHER`: loss = α·CE + (1−α)·τ²·KL(teacher ‖ student).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DistillOptions {
    pub teacher: PathBuf,
    pub alpha: f64,
    pub temperature: f64,
    pub top_k: usize,
    /// Where teacher top-k log-probs are cached (default `$MASA_HOME/teacher-cache`).
    pub cache_dir: Option<PathBuf>,
}

/// The teacher, loaded on the first batch not in the cache.
enum TeacherModel {
    Cpu(Transformer),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::llama::GpuLlama),
}

/// Teacher top-k log-probabilities per training batch, computed once and cached on disk.
pub struct TeacherCache {
    model: Option<TeacherModel>,
    /// The CUDA device and precision the teacher runs on; `None`: the CPU.
    gpu: Option<(usize, Precision)>,
    teacher_path: PathBuf,
    file: std::fs::File,
    path: PathBuf,
    records: usize,
    b: usize,
    t: usize,
    k: usize,
    /// Held while this cache is open ([`crate::home::lock_dir`]).
    _lock: std::fs::File,
}

impl TeacherCache {
    /// `device`/`precision`: the student's; a plain Llama teacher runs there too. `corpus_hash`:
    /// the content hash of the corpus the trainer read (the cache's key; `corpus`, its paths,
    /// is only recorded).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        d: &DistillOptions,
        student_tok: &Tokenizer,
        corpus: &[PathBuf],
        corpus_hash: &str,
        seed: u64,
        b: usize,
        t: usize,
        device: Device,
        precision: Precision,
        progress: bool,
    ) -> Result<Self> {
        let teacher = SourceModel::open(&d.teacher)?;
        // Same tokenizer: same vocabulary size and the same ids on a probe text.
        let probe = "Distillation needs the teacher's tokenizer: fn main() { println!(\"héllo\"); } 12345";
        if teacher.tokenizer.vocab_size() != student_tok.vocab_size()
            || teacher.tokenizer.encode(probe, false)? != student_tok.encode(probe, false)?
        {
            return Err(MasaError::bad_file(
                &d.teacher,
                "the teacher's tokenizer differs from the student's: distillation needs the source model the student was built from",
            ));
        }
        // Keyed by content: the teacher's fingerprint and the corpus's documents, not their paths.
        let mut id = Sha256::new();
        let canon = d.teacher.canonicalize().unwrap_or_else(|_| d.teacher.clone());
        id.update(teacher.fingerprint()?.as_bytes());
        id.update(corpus_hash.as_bytes());
        let gpu = match device {
            Device::Cuda(ordinal) if crate::student::plain_llama(&teacher.weights.config).is_some() => Some((ordinal, precision)),
            Device::Cuda(_) => {
                eprintln!(
                    "note: the teacher ({}) is not a plain Llama model, so its top-k runs on the CPU",
                    teacher.weights.config.arch.name()
                );
                None
            }
            Device::Cpu => None,
        };
        #[cfg(feature = "cuda")]
        if gpu.is_some() && d.top_k > crate::cuda::llama::TOPK_MAX {
            let max = crate::cuda::llama::TOPK_MAX;
            return Err(MasaError::Invalid(format!(
                "distillation top_k {}: the CUDA teacher keeps at most {max} log-probs per position",
                d.top_k
            )));
        }
        let mut key_json = serde_json::json!({"format": 3, "sampling": "chunks", "seed": seed, "batch": b, "seq": t, "top_k": d.top_k});
        if let Some((_, p)) = gpu {
            key_json["engine"] = serde_json::json!(if p == Precision::Bf16 { "cuda-bf16" } else { "cuda-f32" });
        }
        id.update(key_json.to_string().as_bytes());
        let key = crate::fetch::hex(&id.finalize()[..8]);
        let root = d.cache_dir.clone().unwrap_or_else(|| crate::home::masa_home().join("teacher-cache"));
        let dir = root.join(key);
        // One writer at a time: two runs appending to one topk.bin would interleave records.
        let lock = crate::home::lock_dir(&dir, ".masa-teacher.lock", |pid| {
            format!(
                "{}: another masa process ({pid}) is filling this teacher cache; wait for it to finish, or give another --teacher-cache",
                dir.display()
            )
        })?;
        let meta = serde_json::json!({"teacher": canon, "corpus": corpus, "key": key_json});
        crate::home::write_atomic(&dir.join("meta.json"), meta.to_string().as_bytes())?;
        let path = dir.join("topk.bin");
        let file = std::fs::OpenOptions::new().read(true).append(true).create(true).open(&path).at(&path)?;
        let rec = (b * t * d.top_k * 8) as u64;
        let len = file.metadata().at(&path)?.len();
        let records = (len / rec) as usize;
        if len % rec != 0 {
            file.set_len(records as u64 * rec).at(&path)?;
        }
        if progress {
            eprintln!("teacher cache {}: {records} batches cached", path.display());
        }
        Ok(TeacherCache { model: None, gpu, teacher_path: d.teacher.clone(), file, path, records, b, t, k: d.top_k, _lock: lock })
    }

    /// Top-k `(ids, log-probs)`, `(b·t, k)` row-major, for micro-batch `index` of the stream,
    /// whose sequences (`t + 1` tokens each; the first `t` are the inputs) are `seqs`.
    pub fn batch(&mut self, index: usize, seqs: &[Vec<u32>]) -> Result<(Vec<u32>, Vec<f32>)> {
        let n = self.b * self.t * self.k;
        if index < self.records {
            let mut buf = vec![0u8; n * 8];
            self.file.seek(SeekFrom::Start((index * n * 8) as u64)).at(&self.path)?;
            self.file.read_exact(&mut buf).at(&self.path)?;
            let ids = buf[..n * 4].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let lp = buf[n * 4..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            return Ok((ids, lp));
        }
        if self.model.is_none() {
            let w = crate::source::SourceWeights::open(&self.teacher_path)?;
            self.model = Some(match self.gpu {
                None => TeacherModel::Cpu(Transformer::load(&w)?),
                #[cfg(feature = "cuda")]
                Some((ordinal, precision)) => {
                    let cfg = crate::student::plain_llama(&w.config).expect("checked in open");
                    TeacherModel::Cuda(crate::cuda::llama::GpuLlama::load_frozen(&w, &cfg, ordinal, precision == Precision::Bf16)?)
                }
                #[cfg(not(feature = "cuda"))]
                Some(_) => return Err(crate::engine::no_cuda()),
            });
        }
        let (ids, lp) = match self.model.as_mut().unwrap() {
            TeacherModel::Cpu(m) => top_k_logprobs(m, seqs, self.t, self.k)?,
            #[cfg(feature = "cuda")]
            TeacherModel::Cuda(m) => {
                let flat: Vec<u32> = seqs.iter().flat_map(|s| s[..self.t].iter().copied()).collect();
                m.forward(&flat, seqs.len(), self.t)?;
                m.top_k_logprobs(self.k)?
            }
        };
        if index == self.records {
            let mut buf = Vec::with_capacity(n * 8);
            ids.iter().for_each(|x| buf.extend(x.to_le_bytes()));
            lp.iter().for_each(|x| buf.extend(x.to_le_bytes()));
            self.file.write_all(&buf).at(&self.path)?;
            self.records += 1;
        }
        Ok((ids, lp))
    }
}

/// The teacher's top-k next-token log-probs at every input position.
pub fn top_k_logprobs(model: &Transformer, seqs: &[Vec<u32>], t: usize, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let b = seqs.len();
    let flat: Vec<u32> = seqs.iter().flat_map(|s| s[..t].iter().copied()).collect();
    let x = Tensor::from_vec(flat, (b, t), &candle_core::Device::Cpu)?;
    let logits: Vec<f32> = model.forward(&x, &mut NoHooks)?.flatten_all()?.to_vec1()?;
    Ok(top_k_rows(&logits, model.config.vocab_size, k))
}

/// The `k` largest log-softmax entries of each `v`-wide row of `logits`: `(ids, log-probs)`,
/// `(rows, k)` row-major, in descending order, ties to the lower id.
pub fn top_k_rows(logits: &[f32], v: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
    let k = k.min(v);
    let rows = logits.len() / v;
    let mut ids = Vec::with_capacity(rows * k);
    let mut lps = Vec::with_capacity(rows * k);
    let mut idx: Vec<u32> = Vec::with_capacity(v);
    for row in logits.chunks_exact(v) {
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = mx + row.iter().map(|&z| ((z - mx) as f64).exp()).sum::<f64>().ln() as f32;
        idx.clear();
        idx.extend(0..v as u32);
        idx.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        idx[..k].sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        for &i in &idx[..k] {
            ids.push(i);
            lps.push(row[i as usize] - lse);
        }
    }
    (ids, lps)
}
