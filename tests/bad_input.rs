//! Bad input fails with an error that names the file and the problem, never a panic:
//! corrupt, truncated and foreign GGUF files, unsupported architectures, incomplete
//! `config.json`, broken shard indexes and tensors whose shape does not fit the config.

mod common;

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{write_config, Ckpt, Rng};
use masa::source::model::Transformer;
use masa::source::SourceWeights;
use safetensors::Dtype;
use serde_json::json;

/// Open `path` and build the model; return the error's Display. Fails the test on success or
/// on a panic.
fn load_error(path: &Path) -> String {
    let r = catch_unwind(AssertUnwindSafe(|| SourceWeights::open(path).and_then(|w| Transformer::load(&w).map(|_| ()))));
    match r {
        Err(_) => panic!("loading {} panicked instead of returning an error", path.display()),
        Ok(Ok(())) => panic!("loading {} succeeded but should have failed", path.display()),
        Ok(Err(e)) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            msg
        }
    }
}

/// Assert the message names `file` and contains every one of `needles`.
fn assert_names(msg: &str, file: &Path, needles: &[&str]) {
    assert!(msg.contains(&file.display().to_string()), "error does not name {}: {msg}", file.display());
    assert!(!msg.contains('\n'), "a one-line message, no backtrace (RUST_BACKTRACE may be set): {msg}");
    for n in needles {
        assert!(msg.contains(n), "error does not mention `{n}`: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF

const VOCAB: usize = 16;
const HIDDEN: usize = 8;

/// A tiny llama GGUF (metadata masa needs, two F32 tensors) as bytes, via candle's writer.
fn tiny_gguf(arch: &str) -> Vec<u8> {
    let mut rng = Rng::new(11);
    let mut t = |shape: (usize, usize)| {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.uniform()).collect();
        QTensor::quantize(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
    };
    let attn_q = t((HIDDEN, HIDDEN));
    let embd = t((VOCAB, HIDDEN));
    let k = |s: &str| format!("{arch}.{s}");
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("embedding_length"), Value::U32(HIDDEN as u32)),
        (k("feed_forward_length"), Value::U32(16)),
        (k("block_count"), Value::U32(1)),
        (k("attention.head_count"), Value::U32(2)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    // The embedding last: its data ends the file, so cutting the tail cuts tensor data.
    let tensors = [("blk.0.attn_q.weight", &attn_q), ("token_embd.weight", &embd)];
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &meta_refs, &tensors).unwrap();
    buf.into_inner()
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).expect("needle in the written GGUF")
}

#[test]
fn tiny_gguf_is_valid() {
    // The fixtures below are corruptions of this file, so it must itself open.
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "ok.gguf", &tiny_gguf("llama"));
    let w = SourceWeights::open(&p).unwrap();
    assert_eq!(w.config.hidden_size, HIDDEN);
    assert_eq!(w.tensor("model.embed_tokens.weight").unwrap().dims(), &[VOCAB, HIDDEN]);
}

#[test]
fn gguf_wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = tiny_gguf("llama");
    bytes[..4].copy_from_slice(b"GGML");
    let p = write_file(dir.path(), "model.gguf", &bytes);
    assert_names(&load_error(&p), &p, &["not a GGUF file", "GGML"]);
}

/// A GGUF whose `general.alignment` is 0 made candle's reader panic (division by zero): now a
/// one-line error naming the file, and no panic report on stderr.
#[test]
fn gguf_zero_alignment_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_gguf("llama");
    let mut with = Vec::new();
    // Rewrite the header with one more metadata entry: general.alignment = 0 (u32).
    let n_kv = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    with.extend_from_slice(&bytes[..16]);
    with.extend_from_slice(&(n_kv + 1).to_le_bytes());
    let key = b"general.alignment";
    with.extend_from_slice(&(key.len() as u64).to_le_bytes());
    with.extend_from_slice(key);
    with.extend_from_slice(&4u32.to_le_bytes()); // GGUF value type u32
    with.extend_from_slice(&0u32.to_le_bytes());
    with.extend_from_slice(&bytes[24..]);
    let p = write_file(dir.path(), "model.gguf", &with);
    assert_names(&load_error(&p), &p, &["malformed GGUF header"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masa")).arg("inspect").arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("malformed GGUF header") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn gguf_shorter_than_magic() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "model.gguf", b"GG");
    assert_names(&load_error(&p), &p, &["not a GGUF file"]);
}

#[test]
fn gguf_truncated_in_tensor_data() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_gguf("llama");
    let p = write_file(dir.path(), "model.gguf", &bytes[..bytes.len() - 100]);
    assert_names(&load_error(&p), &p, &["truncated", "token_embd.weight", "incomplete"]);
}

#[test]
fn gguf_truncated_in_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_gguf("llama");
    let cut = find(&bytes, b"llama.embedding_length") + 5;
    let p = write_file(dir.path(), "model.gguf", &bytes[..cut]);
    assert_names(&load_error(&p), &p, &["corrupt or truncated GGUF header"]);
}

#[test]
fn gguf_truncated_in_tensor_directory() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_gguf("llama");
    let cut = find(&bytes, b"token_embd.weight") + 8;
    let p = write_file(dir.path(), "model.gguf", &bytes[..cut]);
    assert_names(&load_error(&p), &p, &["corrupt or truncated GGUF header"]);
}

#[test]
fn gguf_unsupported_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = tiny_gguf("llama");
    // Tensor info: name, u32 n_dims, n_dims × u64 dims, u32 type, u64 offset.
    let name = b"token_embd.weight";
    let type_at = find(&bytes, name) + name.len() + 4 + 2 * 8;
    assert_eq!(&bytes[type_at..type_at + 4], &0u32.to_le_bytes(), "F32 type id where expected");
    bytes[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes()); // IQ2_XXS
    let p = write_file(dir.path(), "model.gguf", &bytes);
    assert_names(&load_error(&p), &p, &["unsupported GGUF tensor type", "16"]);
}

/// Dimensions whose product wraps around to the true element count (16 × (8 + 2⁶¹) ≡ 128) made
/// candle index out of bounds in `masa score` (found by tests/fuzz.rs; issue 17's
/// `cpu_backend/mod.rs` panic): refused at open, naming the tensor.
#[test]
fn gguf_dimensions_that_overflow_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = tiny_gguf("llama");
    let name = b"token_embd.weight";
    let dim0_at = find(&bytes, name) + name.len() + 4;
    let d0 = u64::from_le_bytes(bytes[dim0_at..dim0_at + 8].try_into().unwrap());
    assert_eq!(d0, HIDDEN as u64, "GGUF stores the row length first");
    bytes[dim0_at..dim0_at + 8].copy_from_slice(&(d0 + (1u64 << 61)).to_le_bytes());
    let p = write_file(dir.path(), "model.gguf", &bytes);
    assert_names(&load_error(&p), &p, &["token_embd.weight", "more elements than the file could hold"]);
}

#[test]
fn gguf_unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "model.gguf", &tiny_gguf("mamba"));
    assert_names(&load_error(&p), &p, &["unsupported architecture", "mamba"]);
}

#[test]
fn missing_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("absent.gguf");
    assert_names(&load_error(&p), &p, &["no such file"]);
}

// ---------------------------------------------------------------------------------------------
// HF directories

fn llama_config() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false,
    })
}

/// Every tensor of the one-layer llama of [`llama_config`].
fn llama_weights() -> Ckpt {
    let mut rng = Rng::new(5);
    let mut ck = Ckpt::default();
    let h = HIDDEN;
    let mut add = |name: &str, shape: &[usize]| ck.add_random(&mut rng, name, shape, 0.3, 0.0);
    add("model.embed_tokens.weight", &[VOCAB, h]);
    add("lm_head.weight", &[VOCAB, h]);
    add("model.norm.weight", &[h]);
    let p = "model.layers.0";
    for n in ["input_layernorm", "post_attention_layernorm"] {
        add(&format!("{p}.{n}.weight"), &[h]);
    }
    for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        add(&format!("{p}.self_attn.{n}.weight"), &[h, h]);
    }
    add(&format!("{p}.mlp.gate_proj.weight"), &[16, h]);
    add(&format!("{p}.mlp.up_proj.weight"), &[16, h]);
    add(&format!("{p}.mlp.down_proj.weight"), &[h, 16]);
    ck
}

fn hf_dir(config: &serde_json::Value, ck: &Ckpt, shards: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), config);
    ck.write(dir.path(), Dtype::F32, shards);
    dir
}

#[test]
fn hf_fixture_is_valid() {
    let dir = hf_dir(&llama_config(), &llama_weights(), 2);
    let w = SourceWeights::open(dir.path()).unwrap();
    Transformer::load(&w).unwrap();
}

#[test]
fn hf_unknown_architecture() {
    let mut cfg = llama_config();
    cfg["architectures"] = json!(["FooForCausalLM"]);
    cfg["model_type"] = json!("foo");
    let dir = hf_dir(&cfg, &llama_weights(), 1);
    assert_names(&load_error(dir.path()), &dir.path().join("config.json"), &["unsupported architecture", "FooForCausalLM"]);
}

#[test]
fn hf_missing_config_field() {
    let mut cfg = llama_config();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    let dir = hf_dir(&cfg, &llama_weights(), 1);
    assert_names(&load_error(dir.path()), &dir.path().join("config.json"), &["hidden_size", "missing"]);
}

#[test]
fn hf_config_field_of_wrong_type() {
    let mut cfg = llama_config();
    cfg["num_hidden_layers"] = json!("one");
    let dir = hf_dir(&cfg, &llama_weights(), 1);
    assert_names(&load_error(dir.path()), &dir.path().join("config.json"), &["num_hidden_layers", "integer"]);
}

/// Config values outside their physical range are refused, naming the field (issue 17).
#[test]
fn hf_config_values_out_of_range() {
    for (field, value, want) in [
        ("rms_norm_eps", json!(-1e-5), "epsilon"),
        ("rope_theta", json!(0.0), "RoPE base"),
        ("num_attention_heads", json!(0), "positive"),
        // Found by tests/fuzz.rs: 2³² layers exhausted memory before any tensor was read.
        ("num_hidden_layers", json!(4_294_967_296u64), "beyond any real model"),
        ("vocab_size", json!(1u64 << 40), "beyond any real model"),
    ] {
        let mut cfg = llama_config();
        cfg[field] = value;
        let dir = hf_dir(&cfg, &llama_weights(), 1);
        assert_names(&load_error(dir.path()), &dir.path().join("config.json"), &[field, want]);
    }
}

/// A layer count within bounds but above what the weights could hold is refused before anything
/// is sized by it.
#[test]
fn hf_config_with_more_layers_than_tensors() {
    let mut cfg = llama_config();
    cfg["num_hidden_layers"] = json!(1000);
    let dir = hf_dir(&cfg, &llama_weights(), 1);
    assert_names(&load_error(dir.path()), dir.path(), &["num_hidden_layers is 1000", "only 12 tensors"]);
}

#[test]
fn hf_config_not_json() {
    let dir = hf_dir(&llama_config(), &llama_weights(), 1);
    std::fs::write(dir.path().join("config.json"), "{ \"hidden_size\": ").unwrap();
    assert_names(&load_error(dir.path()), &dir.path().join("config.json"), &["invalid JSON"]);
}

#[test]
fn hf_sharded_index_names_missing_file() {
    let dir = hf_dir(&llama_config(), &llama_weights(), 2);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert_names(
        &load_error(dir.path()),
        &dir.path().join("model.safetensors.index.json"),
        &["model-00002-of-00002.safetensors", "does not exist"],
    );
}

#[test]
fn hf_tensor_with_wrong_shape() {
    let mut ck = llama_weights();
    ck.tensors.insert("model.layers.0.self_attn.k_proj.weight".into(), (vec![HIDDEN / 2, HIDDEN], vec![0.0; HIDDEN * HIDDEN / 2]));
    let dir = hf_dir(&llama_config(), &ck, 1);
    assert_names(&load_error(dir.path()), dir.path(), &["model.layers.0.self_attn.k_proj.weight", "[4, 8]", "[8, 8]"]);
}

#[test]
fn hf_missing_tensor() {
    let mut ck = llama_weights();
    ck.tensors.remove("model.layers.0.mlp.up_proj.weight");
    let dir = hf_dir(&llama_config(), &ck, 1);
    assert_names(&load_error(dir.path()), dir.path(), &["model.layers.0.mlp.up_proj.weight", "not found"]);
}

#[test]
fn hf_untied_model_without_lm_head() {
    // tie_word_embeddings is false: the embedding must not silently stand in for lm_head.
    let mut ck = llama_weights();
    ck.tensors.remove("lm_head.weight");
    let dir = hf_dir(&llama_config(), &ck, 1);
    assert_names(&load_error(dir.path()), dir.path(), &["lm_head.weight", "not found"]);
}

#[test]
fn hf_directory_without_weights() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &llama_config());
    assert_names(&load_error(dir.path()), dir.path(), &["no `model.safetensors`"]);
}

// ---------------------------------------------------------------------------------------------
// Options

/// Benchmark options have ranges like every other option (issue 17: `bench train --seq 0`
/// panicked, `--batch 0` "measured" 0 tokens/s, `--seq 100000` ran out of memory, `--steps 0`
/// ran a step anyway): each is a one-line error naming the option, the value and the range.
#[test]
fn bench_options_have_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    let mut c = llama_config();
    c["max_position_embeddings"] = json!(128);
    std::fs::write(&cfg, c.to_string()).unwrap();
    for (args, want) in [
        (["--batch", "0"], "--batch 0: must be in 1..=4096"),
        (["--seq", "0"], "--seq 0: must be in 1..=128 (the model's positions)"),
        (["--seq", "100000"], "--seq 100000: must be in 1..=128"),
        (["--steps", "0"], "--steps 0: must be in 1..="),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_masa")).args(["bench", "train"]).arg(&cfg).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// An I/O error is reported once, not once per level of the error chain ("x: No such file or
/// directory (os error 2): No such file or directory (os error 2)" before).
#[test]
fn io_errors_are_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.safetensors");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
        .args(["stats", "merge"])
        .arg(&missing)
        .arg("--out")
        .arg(dir.path().join("m.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}
