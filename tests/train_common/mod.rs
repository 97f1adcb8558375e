//! Helpers for the training tests: a byte-level tokenizer and tiny student configs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use masa::source::tokenizer::Tokenizer;
use masa::student::StudentConfig;

/// GPT-2's byte-to-unicode table.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// A byte-level BPE tokenizer with no merges: ids 0..=255 are bytes, 256 is `<|endoftext|>`
/// (EOS). Every text encodes to its bytes.
pub fn byte_tokenizer() -> Tokenizer {
    let mut tokens: Vec<Value> = (0..=255u8).map(|b| Value::String(byte_char(b).to_string())).collect();
    tokens.push(Value::String("<|endoftext|>".into()));
    let mut types = vec![Value::I32(1); 256];
    types.push(Value::I32(3));
    let md: HashMap<String, Value> = [
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("default".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
        ("tokenizer.ggml.eos_token_id", Value::U32(256)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Tokenizer::from_gguf_metadata(&md, Path::new("bytes.gguf")).expect("byte tokenizer")
}

/// 2 layers, hidden 8, 2 heads / 1 KV head (head dim 4), FFN 12, vocab 11.
pub fn tiny_config(tied: bool) -> StudentConfig {
    let mut c = StudentConfig::preset("tiny").unwrap();
    c.hidden_size = 8;
    c.intermediate_size = 12;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 2;
    c.num_key_value_heads = 1;
    c.vocab_size = 11;
    c.tie_word_embeddings = tied;
    c.rope_theta = 100.0;
    c
}

/// A small student for end-to-end runs: 2 layers, hidden 32, 4 heads / 2 KV, FFN 64, the byte
/// tokenizer's vocabulary.
pub fn small_config() -> StudentConfig {
    let mut c = StudentConfig::preset("tiny").unwrap();
    c.hidden_size = 32;
    c.intermediate_size = 64;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.vocab_size = 257;
    c.eos_token_id = Some(256);
    c
}

/// Write a Scratch-initialised student (normal std 0.02, norms 1) with the byte tokenizer.
pub fn write_scratch_student(dir: &Path, cfg: &StudentConfig, seed: u64) {
    let params = cfg.scratch_init(seed);
    masa::student::save_student(dir, cfg, &params, &byte_tokenizer(), &serde_json::json!({"init": "scratch", "seed": seed}))
        .expect("write student");
}

/// A two-domain JSONL corpus of deterministic pseudo-English, `docs` documents per domain.
pub fn write_corpus(path: &Path, docs: usize) {
    let words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "fn", "let", "x", "=", "1;", "return"];
    let mut rng = masa::rng::SplitMix64(42);
    let mut out = String::new();
    for dom in ["prose", "code"] {
        for _ in 0..docs {
            let n = 20 + rng.below(60);
            let text: Vec<&str> = (0..n).map(|_| words[rng.below(if dom == "prose" { 11 } else { words.len() })]).collect();
            out.push_str(&serde_json::json!({"text": text.join(" "), "domain": dom}).to_string());
            out.push('\n');
        }
    }
    std::fs::write(path, out).unwrap();
}

/// `(step, loss, val_mean)` of every metrics line, as written.
pub fn curve(out: &Path) -> Vec<(u64, Option<f64>, Option<f64>)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64(), v["val_mean"].as_f64())
        })
        .collect()
}

/// An instruct_qa subtask under `home` (a `MASA_HOME`): 48 examples of "repeat the first
/// word", for runs that fine-tune and generate without the real task data.
pub fn write_repeat_task(home: &Path) {
    let ni = home.join("tasks/instruct_qa/subtask001_repeat");
    std::fs::create_dir_all(&ni).unwrap();
    let words = ["apple", "pear", "fig", "plum", "kiwi", "lime", "date", "yam"];
    let examples: Vec<serde_json::Value> = (0..48)
        .map(|i| serde_json::json!({"input": format!("{} {}", words[i % 8], words[(i / 8) % 8]), "target": [words[i % 8]]}))
        .collect();
    std::fs::write(
        ni.join("task.json"),
        serde_json::json!({"task_prefix": "Definition: Repeat the first word.", "examples": examples}).to_string(),
    )
    .unwrap();
}
