//! Tokenizer tests: exact agreement with HF transformers' ids (`tests/data/reference/`) on the
//! real GGUF files from the masa cache (a missing one skips, or fails under `CI=true`), round
//! trips, and clear errors on bad input.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value};
use common::{GEMMA3, SMOLLM2};
use masa::source::tokenizer::Tokenizer;
use masa::MasaError;

/// Texts for round trips: ASCII, code, accents, CJK, emoji, whitespace runs, chat markup.
const ROUND_TRIP_TEXTS: [&str; 6] = [
    "Hello, world!",
    "fn main() {\n\tlet x = 1;\n    return;\n}\n\n",
    "Héllo wörld — naïve café, 東京 and emoji 🙂🚀 ∑ x² ≠ ∞",
    "  leading and trailing spaces   ",
    "<|im_start|>user\nhi<|im_end|>\n<start_of_turn>model\n",
    "Ünïcödé: Привет мир, مرحبا, नमस्ते, 한국어\u{200b}\u{1F9EA}",
];

/// The tokenizer of a model in the masa cache, built once per test binary; `None` (after a
/// line saying so) when the GGUF file has not been fetched ([`common::model_asset`]).
fn gguf_tokenizer(model: (&str, &str)) -> Option<&'static Tokenizer> {
    static SMOLLM2_TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    static GEMMA3_TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let cell = if model == SMOLLM2 { &SMOLLM2_TOK } else { &GEMMA3_TOK };
    cell.get_or_init(|| load_gguf_tokenizer(model)).as_ref()
}

fn load_gguf_tokenizer((name, file): (&str, &str)) -> Option<Tokenizer> {
    let path = common::model_asset(name, file)?;
    let mut f = std::fs::File::open(&path).expect("open GGUF");
    let content = Content::read(&mut f).expect("read GGUF metadata");
    let start = Instant::now();
    let tok = Tokenizer::from_gguf_metadata(&content.metadata, &path).expect("build tokenizer");
    println!("{name}: tokenizer built from GGUF metadata in {:.3} s", start.elapsed().as_secs_f64());
    Some(tok)
}

/// `(text, ids)` pairs that HF transformers produced (`tests/data/reference/<name>/`).
fn reference_cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let path = common::reference_file(&format!("{name}/transformers_logits.json"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&bytes).expect("reference JSON");
    cases
        .iter()
        .map(|c| {
            let text = c["text"].as_str().expect("text").to_string();
            let ids = c["ids"].as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect();
            (text, ids)
        })
        .collect()
}

fn assert_matches_reference(tok: &Tokenizer, name: &str, add_bos: bool) {
    let cases = reference_cases(name);
    assert!(!cases.is_empty());
    for (text, want) in &cases {
        let got = tok.encode(text, add_bos).expect("encode");
        assert_eq!(&got, want, "{name}: ids differ from transformers for {text:?}");
    }
}

#[test]
fn smollm2_matches_transformers_ids() {
    let Some(tok) = gguf_tokenizer(SMOLLM2) else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.default_add_bos()), (Some(1), Some(2), false));
    assert_matches_reference(tok, SMOLLM2.0, false);
}

#[test]
fn gemma3_matches_transformers_ids() {
    let Some(tok) = gguf_tokenizer(GEMMA3) else { return };
    assert_eq!(tok.vocab_size(), 262144);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.default_add_bos()), (Some(2), Some(1), true));
    assert_matches_reference(tok, GEMMA3.0, true);
}

#[test]
fn special_and_user_defined_tokens_stay_whole() {
    if let Some(tok) = gguf_tokenizer(SMOLLM2) {
        assert_eq!(tok.encode("<|im_start|><|im_end|><|endoftext|>", false).unwrap(), vec![1, 2, 0]);
    }
    if let Some(tok) = gguf_tokenizer(GEMMA3) {
        // <start_of_turn> is a control token (special), "\n\n" and "<start_of_image>" user-defined.
        let ids = tok.encode("<start_of_turn>\n\n<start_of_image>", false).unwrap();
        assert_eq!(ids, vec![105, 108, 255999]);
    }
}

#[test]
fn decode_inverts_encode() {
    for model in [SMOLLM2, GEMMA3] {
        let Some(tok) = gguf_tokenizer(model) else { continue };
        for text in ROUND_TRIP_TEXTS {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "{}: round trip of {text:?}", model.0);
        }
    }
}

#[test]
fn decode_rejects_out_of_range_ids() {
    let Some(tok) = gguf_tokenizer(SMOLLM2) else { return };
    let err = tok.decode(&[1, 49152]).unwrap_err().to_string();
    assert!(err.contains("49152") && err.contains("out of range"), "{err}");
}

#[test]
fn save_hf_round_trip() {
    for model in [SMOLLM2, GEMMA3] {
        let Some(tok) = gguf_tokenizer(model) else { continue };
        let dir = tempfile::tempdir().unwrap();
        tok.save_hf(dir.path()).unwrap();
        let loaded = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        assert_eq!((loaded.bos_id(), loaded.eos_id(), loaded.default_add_bos()), (tok.bos_id(), tok.eos_id(), tok.default_add_bos()));
        let texts = reference_cases(model.0).into_iter().map(|(t, _)| t);
        for text in texts.chain(ROUND_TRIP_TEXTS.iter().map(|t| t.to_string())) {
            let add_bos = tok.default_add_bos();
            assert_eq!(loaded.encode(&text, add_bos).unwrap(), tok.encode(&text, add_bos).unwrap(), "{text:?}");
        }
    }
}

#[test]
fn hf_dir_without_config_takes_ids_from_config_json() {
    let Some(tok) = gguf_tokenizer(SMOLLM2) else { return };
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#).unwrap();
    let loaded = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!((loaded.bos_id(), loaded.eos_id(), loaded.default_add_bos()), (Some(1), Some(2), false));
}

#[test]
fn missing_tokenizer_json_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).err().expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, MasaError::Io { .. }), "{msg}");
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn garbage_tokenizer_json_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{ this is not a tokenizer").unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).err().expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, MasaError::BadFile { .. }), "{msg}");
    assert!(msg.contains("tokenizer.json") && msg.contains("not a valid HF tokenizer.json"), "{msg}");
}

#[test]
fn garbage_tokenizer_config_is_a_clear_error() {
    let tok = tiny_byte_level().unwrap();
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf(dir.path()).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "[1, 2").unwrap();
    let msg = Tokenizer::from_hf_dir(dir.path()).err().expect("must fail").to_string();
    assert!(msg.contains("tokenizer_config.json") && msg.contains("not valid JSON"), "{msg}");
}

// ---- hand-built GGUF metadata ------------------------------------------------------------------

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

fn metadata(entries: Vec<(&str, Value)>) -> HashMap<String, Value> {
    entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A five-token byte-level vocabulary: `<s>` (control), `a`, `b`, `ab`, `Ġ`, with merge `a b`.
fn tiny_byte_level_metadata() -> HashMap<String, Value> {
    metadata(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("default".into())),
        ("tokenizer.ggml.tokens", strings(&["<s>", "a", "b", "ab", "Ġ"])),
        ("tokenizer.ggml.token_type", Value::Array([3, 1, 1, 1, 1].map(Value::I32).to_vec())),
        ("tokenizer.ggml.merges", strings(&["a b"])),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
    ])
}

fn tiny_byte_level() -> masa::Result<Tokenizer> {
    Tokenizer::from_gguf_metadata(&tiny_byte_level_metadata(), Path::new("tiny.gguf"))
}

#[test]
fn tiny_byte_level_vocabulary_encodes() {
    let tok = tiny_byte_level().unwrap();
    assert_eq!(tok.encode("ab ab<s>", true).unwrap(), vec![0, 3, 4, 3, 0]);
    assert_eq!(tok.decode(&[3, 4, 1, 0]).unwrap(), "ab a<s>");
    assert!(!tok.default_add_bos());
}

#[test]
fn tiny_sentencepiece_vocabulary_derives_merges() {
    // No merges in the file: "ab" must come from "a"+"b" and "▁ab" from "▁"+"ab"; "c" is not in
    // the vocabulary and falls back to its byte token.
    let mut tokens = vec!["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁ab"];
    let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
    tokens.extend(bytes.iter().map(String::as_str));
    let n = tokens.len();
    let mut types = vec![2, 3, 3, 1, 1, 1, 1, 1];
    types.extend(std::iter::repeat(6).take(256));
    let mut scores = vec![0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0];
    scores.extend(std::iter::repeat(0.0).take(256));
    let md = metadata(vec![
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.scores", Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ]);
    let tok = Tokenizer::from_gguf_metadata(&md, Path::new("tiny-spm.gguf")).unwrap();
    assert_eq!(tok.vocab_size(), n);
    assert!(tok.default_add_bos(), "a llama vocabulary adds BOS unless the file says otherwise");
    // "ab c" → "▁ab▁c": "▁ab", "▁", then "c" as its byte 0x63 (id 8 + 0x63).
    let ids = tok.encode("ab c", true).unwrap();
    assert_eq!(ids, vec![1, 7, 3, 8 + 0x63]);
    assert_eq!(tok.decode(&ids[1..]).unwrap(), "ab c");
}

#[test]
fn metadata_without_tokens_is_a_clear_error() {
    let mut md = tiny_byte_level_metadata();
    md.remove("tokenizer.ggml.tokens");
    let err = Tokenizer::from_gguf_metadata(&md, Path::new("no-tokens.gguf")).err().expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, MasaError::Field { .. }), "{msg}");
    assert!(msg.contains("no-tokens.gguf") && msg.contains("tokenizer.ggml.tokens"), "{msg}");
}

#[test]
fn unknown_tokenizer_model_is_unsupported() {
    let mut md = tiny_byte_level_metadata();
    md.insert("tokenizer.ggml.model".into(), Value::String("rwkv".into()));
    let err = Tokenizer::from_gguf_metadata(&md, Path::new("odd.gguf")).err().expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, MasaError::Unsupported { .. }), "{msg}");
    assert!(msg.contains("odd.gguf") && msg.contains("rwkv"), "{msg}");
}

#[test]
fn unknown_pre_tokenizer_is_unsupported() {
    let mut md = tiny_byte_level_metadata();
    md.insert("tokenizer.ggml.pre".into(), Value::String("mystery-bpe".into()));
    let err = Tokenizer::from_gguf_metadata(&md, Path::new("odd.gguf")).err().expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, MasaError::Unsupported { .. }), "{msg}");
    assert!(msg.contains("pre-tokenizer") && msg.contains("mystery-bpe"), "{msg}");
}

#[test]
fn malformed_metadata_is_a_clear_error() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("tokenizer.ggml.tokens", Value::String("a".into()), "an array"),
        ("tokenizer.ggml.merges", strings(&["ab"]), "not \"left right\""),
        ("tokenizer.ggml.bos_token_id", Value::U32(99), "outside the vocabulary"),
        ("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1)]), "1 entries for 5 tokens"),
    ];
    for (key, value, expected) in cases {
        let mut md = tiny_byte_level_metadata();
        md.insert(key.into(), value);
        let msg = Tokenizer::from_gguf_metadata(&md, Path::new("bad.gguf")).err().expect("must fail").to_string();
        assert!(msg.contains("bad.gguf") && msg.contains(key) && msg.contains(expected), "{msg}");
    }
}
