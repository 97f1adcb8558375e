//! Perplexity per corpus domain on held-out text: the default corpus's `valid` split (or
//! `train` for `--split train`), cut per domain into fixed `seq_len`-token sequences
//! (`crate::corpus::validation_sequences`, documents joined by EOS). Each sequence is scored on
//! its own; the domain's mean NLL is over all predicted tokens, perplexity = exp(mean NLL).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::corpus::{validation_sequences, Corpus, Split};
use crate::error::Result;
use crate::source::model::{next_token_nll, NoHooks, Transformer};
use crate::source::tokenizer::Tokenizer;

#[derive(Clone, Debug, Serialize)]
pub struct DomainPpl {
    pub sequences: usize,
    pub tokens: usize,
    pub mean_nll: f64,
    pub ppl: f64,
}

/// Perplexity of every domain of `corpus` (`max_per_domain` sequences of `seq_len` tokens,
/// scored `batch` at a time).
pub fn perplexity(
    model: &Transformer,
    mut batched: Option<&mut dyn crate::eval::multiple_choice::ScoringEngine>,
    tok: &Tokenizer,
    corpus: &Corpus,
    split: Split,
    seq_len: usize,
    max_per_domain: usize,
    batch: usize,
    on_seq: &mut dyn FnMut(),
) -> Result<BTreeMap<String, DomainPpl>> {
    let encode = |t: &str| tok.encode(t, false);
    let seqs = validation_sequences(corpus, split, seq_len, max_per_domain, &encode, tok.eos_id())?;
    let mut out = BTreeMap::new();
    for (dom, seqs) in seqs {
        let mut total = 0f64;
        let mut count = 0usize;
        for chunk in seqs.chunks(batch.max(1)) {
            let nlls: Vec<Vec<f32>> = match batched.as_deref_mut() {
                // A batched engine (the GPU): inputs s[..L−1], targets s[1..].
                Some(m) if seq_len > 1 => {
                    let t = seq_len - 1;
                    let x: Vec<u32> = chunk.iter().flat_map(|s| s[..t].iter().copied()).collect();
                    let y: Vec<u32> = chunk.iter().flat_map(|s| s[1..].iter().copied()).collect();
                    m.position_nll(&x, &y, chunk.len(), t)?.chunks(t).map(<[f32]>::to_vec).collect()
                }
                _ => {
                    let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
                    let x = Tensor::from_vec(flat, (chunk.len(), seq_len), &Device::Cpu)?;
                    let logits = model.forward(&x, &mut NoHooks)?;
                    (0..chunk.len()).map(|i| next_token_nll(&logits.get(i)?, &chunk[i])).collect::<Result<_>>()?
                }
            };
            for nll in nlls {
                total += nll.iter().map(|&v| v as f64).sum::<f64>();
                count += nll.len();
                on_seq();
            }
        }
        let mean = total / count.max(1) as f64;
        out.insert(dom, DomainPpl { sequences: seqs.len(), tokens: count, mean_nll: mean, ppl: mean.exp() });
    }
    Ok(out)
}
