//! Forward-pass parity with HF transformers on the real source files: the reference NLLs in
//! `../shared/reference/*/transformers_logits.json` were computed by transformers from the same
//! GGUF files (dequantized to f32). Runs when the asset is present (`masa fetch smollm2-135m`).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use masa::model::{next_token_nll, NoHooks, Transformer};
use masa::source::SourceWeights;

fn reference(name: &str) -> Vec<serde_json::Value> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference").join(name).join("transformers_logits.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn asset(dir: &str, file: &str) -> Option<PathBuf> {
    let p = masa::home::masa_home().join("models").join(dir).join(file);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} missing; run `masa fetch {dir}`", p.display());
        None
    }
}

fn check_nll_parity(model_path: PathBuf, reference_name: &str) {
    let w = SourceWeights::open(&model_path).unwrap();
    let m = Transformer::load(&w).unwrap();
    let mut worst = 0f32;
    for entry in reference(reference_name) {
        let ids: Vec<u32> = entry["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<f32> = entry["next_token_nll"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = m.forward(&x, &mut NoHooks).unwrap().squeeze(0).unwrap();
        let got = next_token_nll(&logits, &ids).unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
        }
    }
    eprintln!("{reference_name}: max |nll - reference| = {worst:.2e}");
    assert!(worst < 2e-3, "{reference_name}: max NLL deviation {worst} exceeds 2e-3");
}

#[test]
fn smollm2_forward_matches_transformers() {
    if let Some(p) = asset("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf") {
        check_nll_parity(p, "smollm2-135m");
    }
}

#[test]
fn gemma3_forward_matches_transformers() {
    if let Some(p) = asset("gemma3-270m", "gemma-3-270m-q4_k_m.gguf") {
        check_nll_parity(p, "gemma3-270m");
    }
}
