//! Seeded mutation harness (issue 17): real small files of every kind masa reads — a GGUF
//! model, an HF directory (`config.json` + `model.safetensors`), calibration statistics and a
//! gene file, all written here by masa's own pipeline — are mutated (bit flips, boundary
//! values, truncation, insertion, deletion, structured JSON edits) and read the way `masa
//! inspect`, `masa score`, `masa extract` and `masa init` read them. Every case must end in a
//! value or an error: a panic or a case running past its timeout fails the test.
//!
//! In the test suite it runs `MASA_FUZZ_CASES` cases (default 320). `scripts/fuzz.sh SECONDS`
//! runs it for a wall-clock budget instead (`MASA_FUZZ_SECS`). `MASA_FUZZ_SEED` picks another
//! seed (default 17); case `i` of seed `s` is always the same file (`MASA_FUZZ_CASE=i` reruns
//! it alone), and a failing case is kept under `target/fuzz-failures/` with its seed and number
//! in the name. Run it under a memory limit (the script sets one): a case that allocates without
//! bound must abort this process, not the machine's other work.

mod common;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{write_config, Ckpt, Rng};
use masa::source::model::{NoHooks, Transformer};
use masa::source::SourceWeights;
use safetensors::Dtype;
use serde_json::json;

const HIDDEN: usize = 8;
const INTER: usize = 16;
const VOCAB: usize = 32;
const LAYERS: usize = 2;
/// A case running longer than this is a hang (the files are tiny: a case takes milliseconds).
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

fn llama_config() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
    })
}

/// Every tensor of the llama of [`llama_config`], HF names.
fn llama_weights() -> Ckpt {
    let mut rng = Rng::new(7);
    let mut ck = Ckpt::default();
    let kv = HIDDEN / 2;
    let mut add = |name: &str, shape: &[usize], scale: f32, offset: f32| ck.add_random(&mut rng, name, shape, scale, offset);
    add("model.embed_tokens.weight", &[VOCAB, HIDDEN], 0.5, 0.0);
    add("lm_head.weight", &[VOCAB, HIDDEN], 0.5, 0.0);
    add("model.norm.weight", &[HIDDEN], 0.1, 1.0);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(&format!("{p}.input_layernorm.weight"), &[HIDDEN], 0.1, 1.0);
        add(&format!("{p}.post_attention_layernorm.weight"), &[HIDDEN], 0.1, 1.0);
        add(&format!("{p}.self_attn.q_proj.weight"), &[HIDDEN, HIDDEN], 0.3, 0.0);
        add(&format!("{p}.self_attn.k_proj.weight"), &[kv, HIDDEN], 0.3, 0.0);
        add(&format!("{p}.self_attn.v_proj.weight"), &[kv, HIDDEN], 0.3, 0.0);
        add(&format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, HIDDEN], 0.3, 0.0);
        add(&format!("{p}.mlp.gate_proj.weight"), &[INTER, HIDDEN], 0.3, 0.0);
        add(&format!("{p}.mlp.up_proj.weight"), &[INTER, HIDDEN], 0.3, 0.0);
        add(&format!("{p}.mlp.down_proj.weight"), &[HIDDEN, INTER], 0.3, 0.0);
    }
    ck
}

/// The same model as a llama GGUF (F32 and Q8_0 tensors, so dequantization is exercised).
fn llama_gguf(ck: &Ckpt) -> Vec<u8> {
    let gguf_name = |hf: &str| -> String {
        let fixed = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.norm.weight", "output_norm.weight"),
        ];
        if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
            return g.to_string();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (l, rest) = rest.split_once('.').unwrap();
        let base = match rest.strip_suffix(".weight").unwrap() {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            other => panic!("no GGUF name for {other}"),
        };
        format!("blk.{l}.{base}.weight")
    };
    let tensors: Vec<(String, QTensor)> = ck
        .tensors
        .iter()
        .map(|(name, (shape, v))| {
            let t = Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).unwrap();
            // Q8_0 blocks are 32 wide: only the matrices whose rows are long enough.
            let dt = if shape.len() == 2 && shape[1] % 32 == 0 { GgmlDType::Q8_0 } else { GgmlDType::F32 };
            (gguf_name(name), QTensor::quantize(&t, dt).unwrap())
        })
        .collect();
    let tokens: Vec<Value> = (0..VOCAB).map(|i| Value::String(format!("t{i}"))).collect();
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(INTER as u32)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.context_length", Value::U32(64)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.scores", Value::Array((0..VOCAB).map(|i| Value::F32(-(i as f32))).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &meta_refs, &tensor_refs).unwrap();
    buf.into_inner()
}

/// What a mutated file is and how masa reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Gguf,
    HfWeights,
    HfConfig,
    Stats,
    Genes,
}

const KINDS: [Kind; 5] = [Kind::Gguf, Kind::HfWeights, Kind::HfConfig, Kind::Stats, Kind::Genes];

/// The unmutated files, written once by masa's own pipeline: model → calibration → extraction.
struct Seeds {
    gguf: Vec<u8>,
    config: Vec<u8>,
    weights: Vec<u8>,
    stats: Vec<u8>,
    genes: Vec<u8>,
}

fn seeds() -> Seeds {
    let dir = tempfile::tempdir().unwrap();
    let ck = llama_weights();
    ck.write(dir.path(), Dtype::F32, 1);
    write_config(dir.path(), &llama_config());
    let w = SourceWeights::open(dir.path()).unwrap();
    let mut rng = Rng::new(3);
    let batches: Vec<masa::corpus::Batch> = (0..4)
        .map(|k| masa::corpus::Batch {
            ids: (0..2 * 6).map(|_| rng.below(VOCAB) as u32).collect(),
            batch: 2,
            seq_len: 6,
            dataset: vec![k % 2; 2],
        })
        .collect();
    let hash = w.fingerprint().unwrap();
    let meta = masa::stats::StatsMeta {
        format: masa::stats::FORMAT.into(),
        source_hash: hash.clone(),
        source: "fuzz".into(),
        arch: "llama".into(),
        corpus: vec!["fuzz".into()],
        tokens: 0,
        seq_len: 0,
        seeds: vec![0],
        dataset_tokens: Default::default(),
        masa_version: "test".into(),
        experts: None,
    };
    let datasets = vec!["a".to_string(), "b".to_string()];
    let stats = masa::calibrate::calibrate(&w, batches.into_iter().map(Ok), &datasets, meta, &mut |_| {}).unwrap();
    let stats_path = dir.path().join("stats.safetensors");
    stats.save(&stats_path).unwrap();
    let opts = masa::extract::ExtractOptions { rank: masa::align::RankSpec::Rank(4), lambda: 0.1, ..Default::default() };
    let genes = masa::extract::extract(&w, &hash, &stats, &opts, &|_| {}).unwrap();
    let genes_path = dir.path().join("genes.safetensors");
    genes.save(&genes_path).unwrap();
    let read = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
    Seeds {
        gguf: llama_gguf(&ck),
        config: read("config.json"),
        weights: read("model.safetensors"),
        stats: read("stats.safetensors"),
        genes: read("genes.safetensors"),
    }
}

/// Values that break length, offset and count fields.
const BOUNDARY: [u64; 10] = [0, 1, 2, 0x7f, 0xff, 0x7fff_ffff, 0xffff_ffff, 1 << 40, i64::MAX as u64, u64::MAX];

/// One mutation of `bytes`; `header` bounds the region where structure lives (most mutations
/// land there: mutations of tensor data only change numbers).
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, header: usize) {
    let len = bytes.len().max(1);
    let at = |rng: &mut Rng| if rng.below(4) > 0 { rng.below(header.clamp(1, len)) } else { rng.below(len) };
    match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = at(rng).min(bytes.len().saturating_sub(1));
                if let Some(b) = bytes.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            let i = at(rng);
            let v = BOUNDARY[rng.below(BOUNDARY.len())];
            let width = [1usize, 2, 4, 8][rng.below(4)];
            for (k, b) in v.to_le_bytes()[..width].iter().enumerate() {
                if let Some(x) = bytes.get_mut(i + k) {
                    *x = *b;
                }
            }
        }
        2 => bytes.truncate(rng.below(len)),
        3 => {
            let i = at(rng).min(bytes.len());
            let n = 1 + rng.below(16);
            let ins: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            bytes.splice(i..i, ins);
        }
        4 => {
            let i = at(rng).min(bytes.len());
            let n = (1 + rng.below(16)).min(bytes.len() - i);
            bytes.drain(i..i + n);
        }
        5 => {
            // A float in the data: NaN, Inf, a huge or a negative value.
            let i = rng.below(len) & !3;
            let v = [f32::NAN, f32::INFINITY, -f32::INFINITY, 1e38, -1.0, 0.0][rng.below(6)];
            for (k, b) in v.to_le_bytes().iter().enumerate() {
                if let Some(x) = bytes.get_mut(i + k) {
                    *x = *b;
                }
            }
        }
        _ => mutate_json(rng, bytes),
    }
}

/// Replace one number (or `true`/`false`/`null`) in embedded JSON (config, safetensors header,
/// masa metadata) by a hostile value, keeping the byte layout's other parts.
fn mutate_json(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let numbers: Vec<(usize, usize)> = {
        let mut v = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_digit() && i > 0 && matches!(bytes[i - 1], b':' | b' ' | b'[' | b',' | b'-') {
                let s = i;
                while i < bytes.len() && (bytes[i].is_ascii_digit() || matches!(bytes[i], b'.' | b'e' | b'E' | b'-' | b'+')) {
                    i += 1;
                }
                v.push((s, i));
            }
            i += 1;
        }
        v
    };
    if numbers.is_empty() {
        return;
    }
    let (s, e) = numbers[rng.below(numbers.len())];
    let hostile = [
        "0",
        "-1",
        "1e400",
        "-1e400",
        "4294967296",
        "18446744073709551615",
        "99999999999999999999",
        "0.5",
        "1e-320",
        "\"x\"",
        "null",
        "[]",
        "{}",
    ];
    bytes.splice(s..e, hostile[rng.below(hostile.len())].bytes());
}

/// The length of the structured prefix: safetensors' 8-byte length and JSON header, or the
/// GGUF header up to its tensor data (approximately: the last tensor name's end).
fn header_len(kind: Kind, bytes: &[u8]) -> usize {
    match kind {
        Kind::HfConfig => bytes.len(),
        Kind::Gguf => bytes.windows(b"output.weight".len()).rposition(|w| w == b"output.weight").map_or(bytes.len(), |p| p + 64),
        _ => 8 + bytes.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()) as usize),
    }
}

/// Read the mutated file as masa does; `Ok` carries nothing, errors are expected.
fn exercise(kind: Kind, dir: &Path) -> masa::Result<()> {
    match kind {
        Kind::Gguf | Kind::HfWeights | Kind::HfConfig => {
            let path = if kind == Kind::Gguf { dir.join("model.gguf") } else { dir.to_path_buf() };
            let w = SourceWeights::open(&path)?;
            let _ = masa::inspect::render(&masa::inspect::summarize(&w));
            w.fingerprint()?;
            let model = Transformer::load(&w)?;
            // As `masa score` does: a forward pass and next-token NLLs.
            let ids: Vec<u32> = vec![1, 2, 3, 4, 5];
            let t = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = model.forward(&t, &mut NoHooks)?;
            masa::source::model::next_token_nll(&logits.squeeze(0)?, &ids)?;
            if kind == Kind::Gguf {
                masa::source::SourceModel::open(&path)?;
            }
            Ok(())
        }
        Kind::Stats => {
            let p = dir.join("stats.safetensors");
            let _ = masa::inspect::artifact_kind(&p);
            let s = masa::stats::Stats::load(&p)?;
            masa::inspect::render_stats(&s)?;
            Ok(())
        }
        Kind::Genes => {
            let p = dir.join("genes.safetensors");
            let _ = masa::inspect::artifact_kind(&p);
            let g = masa::extract::Genes::load(&p)?;
            let _ = masa::inspect::render_genes(&g);
            let g = masa::init::genes::Genes::load(&p)?;
            for l in 0..LAYERS {
                g.ffn_genes(l)?;
            }
            Ok(())
        }
    }
}

/// Write case `case` of `seed` into `dir`: one seed file mutated 1–3 times (none when
/// `mutations` is false), the others intact.
fn write_case(seeds: &Seeds, seed: u64, case: u64, dir: &Path, mutations: bool) -> Kind {
    let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(case));
    let kind = KINDS[case as usize % KINDS.len()];
    let (mut config, mut weights) = (seeds.config.clone(), seeds.weights.clone());
    let (name, mut bytes) = match kind {
        Kind::Gguf => ("model.gguf", seeds.gguf.clone()),
        Kind::HfWeights => ("model.safetensors", std::mem::take(&mut weights)),
        Kind::HfConfig => ("config.json", std::mem::take(&mut config)),
        Kind::Stats => ("stats.safetensors", seeds.stats.clone()),
        Kind::Genes => ("genes.safetensors", seeds.genes.clone()),
    };
    let header = header_len(kind, &bytes);
    for _ in 0..if mutations { 1 + rng.below(3) } else { 0 } {
        mutate(&mut rng, &mut bytes, header);
    }
    if matches!(kind, Kind::HfWeights | Kind::HfConfig) {
        std::fs::write(dir.join("config.json"), &config).unwrap();
        std::fs::write(dir.join("model.safetensors"), &weights).unwrap();
    }
    std::fs::write(dir.join(name), &bytes).unwrap();
    kind
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Accepted,
    Refused,
    Panicked(String),
    Hung,
}

/// Run one case on its own thread: a panic is caught, a case past [`CASE_TIMEOUT`] is left
/// behind and reported as a hang.
fn run_case(kind: Kind, dir: PathBuf) -> Outcome {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| exercise(kind, &dir));
        let _ = tx.send(match r {
            Ok(Ok(())) => Outcome::Accepted,
            Ok(Err(e)) => {
                let msg = e.to_string();
                // An error must name what was wrong; an empty message is as bad as none.
                assert!(!msg.trim().is_empty(), "empty error message");
                Outcome::Refused
            }
            Err(p) => Outcome::Panicked(
                p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default(),
            ),
        });
    });
    rx.recv_timeout(CASE_TIMEOUT).unwrap_or(Outcome::Hung)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}: expected a number")))
}

#[test]
fn mutated_files_give_errors_never_panics_or_hangs() {
    let seeds = seeds();
    // Unmutated, every file reads through to the end: mutations start from valid files.
    for case in 0..KINDS.len() as u64 {
        let dir = tempfile::tempdir().unwrap();
        let kind = write_case(&seeds, 0, case, dir.path(), false);
        exercise(kind, dir.path()).unwrap_or_else(|e| panic!("unmutated {kind:?} file: {e}"));
    }
    let seed = env_u64("MASA_FUZZ_SEED").unwrap_or(17);
    let budget = env_u64("MASA_FUZZ_SECS").map(Duration::from_secs);
    let cases = env_u64("MASA_FUZZ_CASES").unwrap_or(320);
    let only = env_u64("MASA_FUZZ_CASE");
    // Cargo's target directory (CARGO_TARGET_DIR, relative to the repository root, or target/).
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target"));
    let failures_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(target).join("fuzz-failures");
    let start = Instant::now();
    let mut counts = std::collections::BTreeMap::<String, [u64; 4]>::new();
    let mut failures = Vec::new();
    let mut case = only.unwrap_or(0);
    loop {
        let done = match (only, budget) {
            (Some(o), _) => case > o,
            (None, Some(b)) => start.elapsed() >= b,
            (None, None) => case >= cases,
        };
        if done {
            break;
        }
        // The case under way, for a post-mortem when a case takes the whole process down (an
        // allocation beyond the memory limit aborts; `scripts/fuzz.sh` reports this file).
        let _ = std::fs::create_dir_all(&failures_dir);
        let _ = std::fs::write(failures_dir.join(format!("current-seed{seed}")), case.to_string());
        let dir = tempfile::tempdir().unwrap();
        let kind = write_case(&seeds, seed, case, dir.path(), true);
        let outcome = run_case(kind, dir.path().to_path_buf());
        let slot = match &outcome {
            Outcome::Accepted => 0,
            Outcome::Refused => 1,
            Outcome::Panicked(_) => 2,
            Outcome::Hung => 3,
        };
        counts.entry(format!("{kind:?}")).or_default()[slot] += 1;
        if slot >= 2 {
            let keep = failures_dir.join(format!("seed{seed}-case{case}-{kind:?}"));
            let _ = std::fs::create_dir_all(&keep);
            for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
            failures.push(format!("seed {seed} case {case} ({kind:?}): {outcome:?}, files in {}", keep.display()));
            if slot == 3 {
                // The hung thread still holds the directory; keep it rather than race it.
                std::mem::forget(dir);
            }
        }
        case += 1;
    }
    // Every case came back: no post-mortem needed.
    let _ = std::fs::remove_file(failures_dir.join(format!("current-seed{seed}")));
    let total: [u64; 4] = counts.values().fold([0; 4], |a, c| [a[0] + c[0], a[1] + c[1], a[2] + c[2], a[3] + c[3]]);
    eprintln!(
        "fuzz seed {seed}: {} cases in {:.0} s: {} accepted, {} refused with an error, {} panics, {} hangs",
        total.iter().sum::<u64>(),
        start.elapsed().as_secs_f64(),
        total[0],
        total[1],
        total[2],
        total[3]
    );
    for (k, c) in &counts {
        eprintln!("  {k:10} accepted {:4}  refused {:4}  panics {}  hangs {}", c[0], c[1], c[2], c[3]);
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
    if only.is_none() && budget.is_none() {
        assert!(total.iter().sum::<u64>() >= 300, "the suite runs at least 300 cases");
    }
}

/// NaN in a gene file is refused by both readers (`masa inspect`/extract's and `masa init`'s),
/// naming the file and the gene.
#[test]
fn non_finite_genes_are_errors() {
    let seeds = seeds();
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = seeds.genes.clone();
    let data = header_len(Kind::Genes, &bytes);
    bytes[data..data + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let p = dir.path().join("genes.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    let e = masa::extract::Genes::load(&p).err().expect("NaN gene refused").to_string();
    assert!(e.contains(&p.display().to_string()) && e.contains("holds NaN or Inf") && e.contains(".gene"), "{e}");
    let e = masa::init::genes::Genes::load(&p).err().expect("NaN gene refused").to_string();
    assert!(e.contains("holds NaN or Inf"), "{e}");
}
