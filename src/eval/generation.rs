//! Generation tasks (`instruct_qa`: answer generation on SQuAD, DROP, Natural Questions and
//! Jeopardy!, each a subtask with an instruction), scored by Rouge-L.
//!
//! Prompt format (masa's, version [`crate::eval::PROMPT_FORMAT_VERSION`]), the zero-shot
//! "definition + input" format of Super-NaturalInstructions (Wang et al., 2022), with the
//! subtask's `task_prefix` (which begins with "Definition:") as the definition:
//!
//! ```text
//! {task_prefix}
//!
//! Now complete the following example -
//! Input: {input}
//! Output:
//! ```
//!
//! Decoding: greedy by default (`--temperature T` samples, seeded). EOS is not allowed before
//! the output holds some non-blank text (like HF `min_new_tokens`; without it the instruct
//! models end most answers at once on this prompt). It stops at the tokenizer's EOS, at the
//! first newline after non-blank text (the harness's `until: ["\n"]` for one-line answers),
//! or after `max_new_tokens`. Prompts longer than
//! `max_prompt_tokens` keep their last tokens (left truncation, as the harness does). The
//! prediction is the decoded text, trimmed; the score is Rouge-L F (Google `rouge_score`,
//! stemming) against the best of the targets, × 100 (`crate::rouge::rouge_l_multi`).

use candle_core::{Device, IndexOp, Tensor};
use serde::Serialize;

use crate::error::Result;
use crate::eval::multiple_choice::ScoringEngine;
use crate::rng::SplitMix64;
use crate::source::model::{KvCache, Transformer};
use crate::source::tokenizer::Tokenizer;

#[derive(Clone, Debug, Serialize)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    pub max_prompt_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions { max_new_tokens: 48, max_prompt_tokens: 1024, temperature: 0.0, seed: 0 }
    }
}

/// The prompt of one example of an instruction (generation) task.
pub fn instruction_prompt(definition: &str, input: &str) -> String {
    format!("{}\n\nNow complete the following example -\nInput: {}\nOutput:", definition.trim(), input.trim())
}

/// Generate a continuation of `prompt`; returns the decoded text (untrimmed) and the number of
/// generated tokens. On the candle model with its KV cache, or on a batched engine (the GPU,
/// with a KV cache of its own).
pub fn generate(
    model: &Transformer,
    mut engine: Option<&mut (dyn ScoringEngine + 'static)>,
    tok: &Tokenizer,
    prompt: &str,
    opt: &GenOptions,
    rng: &mut SplitMix64,
) -> Result<(String, usize)> {
    let mut ids = tok.encode(prompt, tok.default_add_bos())?;
    if ids.len() > opt.max_prompt_tokens {
        ids = ids[ids.len() - opt.max_prompt_tokens..].to_vec();
    }
    let eos = tok.eos_id();
    let mut cache = KvCache::new();
    let mut fed = 0;
    let mut out: Vec<u32> = Vec::new();
    for _ in 0..opt.max_new_tokens {
        let mut last = match engine.as_deref_mut() {
            Some(e) => e.next_logits(&ids)?,
            None => {
                // Only the tokens the cache has not seen.
                let x = Tensor::new(&ids[fed..], &Device::Cpu)?.unsqueeze(0)?;
                let logits = model.forward_cached(&x, &mut cache)?;
                fed = ids.len();
                logits.i((0, x.dim(1)? - 1))?.to_vec1::<f32>()?
            }
        };
        let started = !tok.decode(&out)?.trim().is_empty();
        if let (Some(e), false) = (eos, started) {
            // No EOS before the first non-blank text (as HF `min_new_tokens`).
            if let Some(v) = last.get_mut(e as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        let next = pick(&last, opt.temperature, rng);
        if Some(next) == eos {
            break;
        }
        out.push(next);
        ids.push(next);
        let text = tok.decode(&out)?;
        let start = text.len() - text.trim_start().len();
        if let Some(nl) = text[start..].find('\n') {
            if nl > 0 {
                return Ok((text[..start + nl].to_string(), out.len()));
            }
        }
    }
    Ok((tok.decode(&out)?, out.len()))
}

fn pick(logits: &[f32], temperature: f64, rng: &mut SplitMix64) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    if temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let w: Vec<f64> = logits.iter().map(|&v| ((v as f64 - m) / temperature).exp()).collect();
    let total: f64 = w.iter().sum();
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    let mut acc = 0.0;
    for (i, x) in w.iter().enumerate() {
        acc += x;
        if acc >= u {
            return i as u32;
        }
    }
    argmax()
}

/// One scored generation.
#[derive(Clone, Debug, Serialize)]
pub struct GenScore {
    pub subtask: String,
    pub index: usize,
    pub prediction: String,
    pub targets: Vec<String>,
    pub rouge_l: f64,
    pub new_tokens: usize,
    /// Teacher-forced log-likelihood of the first reference (`" " + target`, the fine-tuning
    /// response format) after the prompt, and its token count: a graded signal where greedy
    /// generations of weak models are empty or off-task and Rouge-L is 0 for all.
    pub answer_logprob: f64,
    pub answer_tokens: usize,
}

pub fn score_example(
    model: &Transformer,
    mut engine: Option<&mut (dyn ScoringEngine + 'static)>,
    tok: &Tokenizer,
    subtask: &str,
    index: usize,
    definition: &str,
    input: &str,
    targets: &[String],
    opt: &GenOptions,
    rng: &mut SplitMix64,
) -> Result<GenScore> {
    let prompt = instruction_prompt(definition, input);
    let (text, n) = generate(model, engine.as_deref_mut(), tok, &prompt, opt, rng)?;
    let prediction = text.trim().to_string();
    let rouge_l = crate::rouge::rouge_l_multi(&prediction, targets) * 100.0;
    let answer = format!(" {}", targets.first().map(|t| t.trim()).unwrap_or_default());
    let item = crate::eval::multiple_choice::McItem {
        index,
        contexts: vec![prompt],
        continuations: vec![answer.clone()],
        choices: vec![answer],
        gold: 0,
    };
    let scored = match engine {
        Some(e) => crate::eval::multiple_choice::score_items_batched(e, tok, std::slice::from_ref(&item), &mut || {})?.remove(0),
        None => crate::eval::multiple_choice::score_item(model, tok, &item)?,
    };
    Ok(GenScore {
        subtask: subtask.into(),
        index,
        prediction,
        targets: targets.to_vec(),
        rouge_l,
        new_tokens: n,
        answer_logprob: scored.lls[0],
        answer_tokens: scored.tokens[0],
    })
}
