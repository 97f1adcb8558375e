//! `masa score`: per-token next-token NLL of texts under a model. The parity contract with HF
//! transformers (`tests/data/reference/*/transformers_logits.json`): keep the output stable.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::{IoContext, MasaError, Result};
use crate::source::model::{next_token_nll, NoHooks, Transformer};
use crate::source::tokenizer::Tokenizer;

#[derive(Debug, Serialize)]
pub struct ScoredText {
    pub text: String,
    pub ids: Vec<u32>,
    /// `nll[i] = −ln p(ids[i+1] | ids[..=i])`.
    pub nll: Vec<f32>,
    pub mean_nll: f64,
}

/// Read a JSON list of strings (or of objects with a `text` field, like the reference files).
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    crate::error::regular_file(path)?;
    let raw = std::fs::read_to_string(path).at(path)?;
    let json: serde_json::Value = serde_json::from_str(&raw).map_err(|e| MasaError::bad_file(path, format!("invalid JSON: {e}")))?;
    let items = json.as_array().ok_or_else(|| MasaError::bad_file(path, "expected a JSON list of strings"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Object(o) => o
                .get("text")
                .and_then(|t| t.as_str())
                .map(str::to_string)
                .ok_or_else(|| MasaError::bad_file(path, format!("item {i}: object without a string `text` field"))),
            _ => Err(MasaError::bad_file(path, format!("item {i}: expected a string"))),
        })
        .collect()
}

/// Score each text on its own (no padding), optionally with BOS prepended.
pub fn score_texts(
    model: &Transformer,
    tok: &Tokenizer,
    texts: &[String],
    bos: bool,
    on_text: &mut dyn FnMut(),
) -> Result<Vec<ScoredText>> {
    texts
        .iter()
        .map(|text| {
            let ids = tok.encode(text, bos)?;
            let nll = if ids.len() < 2 {
                Vec::new()
            } else {
                let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                next_token_nll(&model.forward(&x, &mut NoHooks)?.squeeze(0)?, &ids)?
            };
            let mean_nll = if nll.is_empty() { f64::NAN } else { nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64 };
            on_text();
            Ok(ScoredText { text: text.clone(), ids, nll, mean_nll })
        })
        .collect()
}
