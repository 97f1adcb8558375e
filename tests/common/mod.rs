//! Helpers shared by the integration tests: where the reference data and the cached real
//! models are (and what a missing one means), a fixed-seed RNG, and a writer for HF-layout
//! safetensors checkpoints (single file or sharded with an index), independent of masa.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A file under `tests/data/reference/` (in the repository; `tests/data/README.md` says how
/// each was produced).
pub fn reference_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference").join(relative)
}

/// True when running under CI (`CI=true`, as CI services set it, or `CI=1`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// The path of a real model in the masa cache (`$MASA_HOME/models/<name>/<file>`, default
/// `~/.cache/masa`) that a test needs. When it is missing the test cannot run: under CI
/// ([`in_ci`]) that fails the test, naming the file and the command that fetches it
/// (`scripts/test.sh` fetches every model a test needs); elsewhere it prints the same line as
/// "skipped" and returns `None`, and the caller returns (the test passes without checking).
pub fn model_asset(name: &str, file: &str) -> Option<PathBuf> {
    let path = masa::home::masa_home().join("models").join(name).join(file);
    if path.exists() {
        return Some(path);
    }
    let msg = format!("asset missing: {} ({name}); fetch it with `masa fetch {name}` (or run scripts/test.sh)", path.display());
    if in_ci() {
        panic!("{msg}; CI=true, so a missing asset fails the test instead of skipping it");
    }
    eprintln!("skipped: {msg}");
    None
}

/// SmolLM2-135M-Instruct, the source most tests use.
pub const SMOLLM2: (&str, &str) = ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf");
/// Gemma-3-270M.
pub const GEMMA3: (&str, &str) = ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf");
/// Qwen2.5-Coder-0.5B-Instruct.
pub const QWEN_CODER: (&str, &str) = ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");

/// xorshift64*: deterministic weights without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Named f32 tensors in HF layout, as a checkpoint holds them (values already rounded to the
/// stored dtype, so a reference computed from them sees exactly what the reader sees).
#[derive(Default)]
pub struct Ckpt {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Ckpt {
    /// `offset + scale * U(-1, 1)` per element.
    pub fn add_random(&mut self, rng: &mut Rng, name: &str, shape: &[usize], scale: f32, offset: f32) {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| offset + scale * rng.uniform()).collect();
        self.tensors.insert(name.to_string(), (shape.to_vec(), v));
    }

    pub fn get(&self, name: &str) -> &[f32] {
        &self.tensors.get(name).unwrap_or_else(|| panic!("test checkpoint has no `{name}`")).1
    }

    /// Round every value to what `dtype` stores.
    pub fn round_to(&mut self, dtype: Dtype) {
        for (_, v) in self.tensors.values_mut() {
            for x in v.iter_mut() {
                *x = match dtype {
                    Dtype::BF16 => half::bf16::from_f32(*x).to_f32(),
                    Dtype::F16 => half::f16::from_f32(*x).to_f32(),
                    _ => *x,
                };
            }
        }
    }

    /// `model.safetensors` in `dir`, or with `shards = 2` two shard files plus
    /// `model.safetensors.index.json`, named and laid out as `save_pretrained` does.
    pub fn write(&self, dir: &Path, dtype: Dtype, shards: usize) {
        let names: Vec<&String> = self.tensors.keys().collect();
        if shards <= 1 {
            write_safetensors(&dir.join("model.safetensors"), self, &names, dtype);
            return;
        }
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for s in 0..shards {
            let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
            let part: Vec<&String> = names.iter().enumerate().filter(|(i, _)| i % shards == s).map(|(_, n)| *n).collect();
            for n in &part {
                weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
                total += self.tensors[*n].1.len() * dtype.bitsize() / 8;
            }
            write_safetensors(&dir.join(&file), self, &part, dtype);
        }
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
    }
}

fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        other => panic!("test writer does not encode {other:?}"),
    }
}

fn write_safetensors(path: &Path, ck: &Ckpt, names: &[&String], dtype: Dtype) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        names.iter().map(|n| ((*n).clone(), ck.tensors[*n].0.clone(), encode(&ck.tensors[*n].1, dtype))).collect();
    let views: Vec<(String, TensorView)> =
        bytes.iter().map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap())).collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

/// Write `config.json` into `dir`.
pub fn write_config(dir: &Path, config: &serde_json::Value) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
}

/// Start `cmd` (output discarded) and SIGKILL it as soon as `now()` holds, polled every 2 ms;
/// fails the test if the process ends first or `now()` has not come within 15 minutes.
pub fn kill_when(mut cmd: std::process::Command, what: &str, now: &dyn Fn() -> bool) {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn masa");
    let t0 = std::time::Instant::now();
    while !now() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("masa ended ({st}) before {what}");
        }
        assert!(t0.elapsed().as_secs() < 900, "{what} never came");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The stage directories `artifacts/<prefix>*` of a `masa run` store.
pub fn stage_dirs(runs: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(runs.join("artifacts")) else { return Vec::new() };
    rd.map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).collect()
}
