//! Multiple-choice scoring as lm-evaluation-harness does it (`docs/design.md`, "Evaluation").
//!
//! Each choice is scored by the summed log-probability of its continuation tokens after the
//! context. Tokenization follows the harness's `_encode_pair`: `ctx = enc(context)`,
//! `whole = enc(context + continuation)`, continuation tokens = `whole[len(ctx)..]`, and the
//! model reads `ctx ++ continuation`. `acc` is the argmax of the sums; `acc_norm` the argmax of
//! sum / (number of characters of the choice string, Python `len`). Standard errors are the
//! harness's `mean_stderr`: sample standard deviation (n−1) over √n.
//!
//! Prompt formats, from EleutherAI/lm-evaluation-harness `lm_eval/tasks/`:
//! - BoolQ (`super_glue/boolq/default.yaml`): `"{passage}\nQuestion: {question}?\nAnswer:"`,
//!   choices `["no", "yes"]`, gold = `answer` (the shipped `boolq` dataset has a bool `answer`
//!   where super_glue has `label`).
//! - HellaSwag (`hellaswag/utils.py`): query = `preprocess(activity_label + ": " + ctx_a + " " +
//!   ctx_b.capitalize())`, choices = `preprocess(ending)`; `preprocess` strips, replaces
//!   `" [title]"` by `". "`, deletes `\[.*?\]`, replaces `"  "` by `" "`.
//! - PIQA (`piqa/piqa.yaml`): `"Question: {goal}\nAnswer:"`, choices `[sol1, sol2]`.
//! - WinoGrande (`winogrande/preprocess_winogrande.py`, partial evaluation): one context per
//!   option, `sentence[:idx] + option` (`idx` = first `_`), the shared continuation
//!   `sentence[idx+1:].strip()`; gold `{"1": 0, "2": 1}[answer]`. The harness's `acc_norm`
//!   divides by the length of the *choice* strings, which here are the contexts; kept as is.
//! - MedMCQA (`medmcqa/utils_medmcqa.py`): `"Question: {question}\nChoices:\nA. {opa}\nB. {opb}\n
//!   C. {opc}\nD. {opd}\nAnswer:"`, choices `["A", "B", "C", "D"]`, gold `cop`.
//! - MMLU (`mmlu/default/_default_template_yaml`): `"{question.strip()}\nA. {c0}\nB. {c1}\nC.
//!   {c2}\nD. {c3}\nAnswer:"`, choices `["A", "B", "C", "D"]`, gold `answer`.
//!
//! Target delimiter `" "` between context and continuation everywhere; zero-shot, no
//! description. When all choices share one context, the context runs once and its keys and
//! values are reused by a batch of all continuations (`Transformer::forward_cached`).
//!
//! On a CUDA device ([`score_items_batched`]) every choice's whole sequence (context ++
//! continuation) is run instead, many per forward pass, right-padded; causal attention makes
//! the continuation's log-probabilities the same as with the shared context.

use candle_core::{Device, IndexOp, Tensor, D};
use serde::Serialize;
use serde_json::Value;

use crate::error::{MasaError, Result};
use crate::eval::data::Row;
use crate::source::model::{KvCache, Transformer};
use crate::source::tokenizer::Tokenizer;

/// One multiple-choice item: a context per choice (one shared context for most tasks) and a
/// continuation per choice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct McItem {
    /// Index in the shipped file.
    pub index: usize,
    pub contexts: Vec<String>,
    pub continuations: Vec<String>,
    /// The choice strings whose lengths `acc_norm` divides by (harness `doc_to_choice`).
    pub choices: Vec<String>,
    pub gold: usize,
}

fn s<'a>(row: &'a Row, f: &str, task: &str, index: usize) -> Result<&'a str> {
    row.get(f).and_then(Value::as_str).ok_or_else(|| {
        MasaError::Invalid(format!(
            "{task} item {index}: field `{f}` missing or not a string (malformed task file; run `masa fetch tasks` again)"
        ))
    })
}

fn int(row: &Row, f: &str, task: &str, index: usize) -> Result<usize> {
    let v = row.get(f);
    let n = match v {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(t)) => t.trim().parse().ok(),
        Some(Value::Bool(b)) => Some(*b as u64),
        _ => None,
    };
    n.map(|n| n as usize).ok_or_else(|| {
        MasaError::Invalid(format!("{task} item {index}: field `{f}` missing or not an integer label (malformed task file)"))
    })
}

fn strings(row: &Row, f: &str, task: &str, index: usize, n: usize) -> Result<Vec<String>> {
    let a = row.get(f).and_then(Value::as_array);
    let v: Option<Vec<String>> = a.and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect());
    match v {
        Some(v) if v.len() == n => Ok(v),
        _ => Err(MasaError::Invalid(format!("{task} item {index}: field `{f}` must be a list of {n} strings (malformed task file)"))),
    }
}

/// HellaSwag's `preprocess` (lm-evaluation-harness `hellaswag/utils.py`).
pub fn hellaswag_preprocess(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    // re.sub("\\[.*?\\]", "", t): `.` does not match a newline.
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if !after[..close].contains('\n') => {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// Python's `str.capitalize`: first character upper case, the rest lower case.
pub fn py_capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c.flat_map(char::to_lowercase)).collect(),
        None => String::new(),
    }
}

/// Build the item of `task` from row `index` of its shipped file.
pub fn build_item(task: &str, row: &Row, index: usize) -> Result<McItem> {
    let shared = |ctx: String, choices: Vec<String>, gold: usize| -> Result<McItem> {
        if gold >= choices.len() {
            return Err(MasaError::Invalid(format!(
                "{task} item {index}: gold label {gold} out of range for {} choices (malformed task file)",
                choices.len()
            )));
        }
        Ok(McItem { index, contexts: vec![ctx], continuations: choices.iter().map(|c| format!(" {c}")).collect(), choices, gold })
    };
    let letters = || ["A", "B", "C", "D"].iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match task {
        "boolq" => {
            let ctx = format!("{}\nQuestion: {}?\nAnswer:", s(row, "passage", task, index)?, s(row, "question", task, index)?);
            let gold = match row.get("answer").or_else(|| row.get("label")) {
                Some(Value::Bool(b)) => *b as usize,
                _ => int(row, "label", task, index)?,
            };
            shared(ctx, vec!["no".into(), "yes".into()], gold)
        }
        "hellaswag" => {
            let ctx = format!("{} {}", s(row, "ctx_a", task, index)?, py_capitalize(s(row, "ctx_b", task, index)?));
            let query = hellaswag_preprocess(&format!("{}: {ctx}", s(row, "activity_label", task, index)?));
            let endings = strings(row, "endings", task, index, 4)?;
            shared(query, endings.iter().map(|e| hellaswag_preprocess(e)).collect(), int(row, "label", task, index)?)
        }
        "piqa" => {
            let ctx = format!("Question: {}\nAnswer:", s(row, "goal", task, index)?);
            shared(ctx, vec![s(row, "sol1", task, index)?.into(), s(row, "sol2", task, index)?.into()], int(row, "label", task, index)?)
        }
        "winogrande" => {
            let sentence = s(row, "sentence", task, index)?;
            let idx = sentence
                .find('_')
                .ok_or_else(|| MasaError::Invalid(format!("{task} item {index}: `sentence` has no `_` blank (malformed task file)")))?;
            let target = sentence[idx + 1..].trim();
            let contexts: Vec<String> = [s(row, "option1", task, index)?, s(row, "option2", task, index)?]
                .iter()
                .map(|o| format!("{}{o}", &sentence[..idx]))
                .collect();
            let gold = match s(row, "answer", task, index)? {
                "1" => 0,
                "2" => 1,
                o => return Err(MasaError::Invalid(format!("{task} item {index}: `answer` is {o:?}, expected \"1\" or \"2\""))),
            };
            Ok(McItem { index, continuations: vec![format!(" {target}"); 2], choices: contexts.clone(), contexts, gold })
        }
        "medmcqa" => {
            let mut ctx = format!("Question: {}\nChoices:\n", s(row, "question", task, index)?);
            for (l, f) in ["A", "B", "C", "D"].iter().zip(["opa", "opb", "opc", "opd"]) {
                ctx.push_str(&format!("{l}. {}\n", s(row, f, task, index)?));
            }
            ctx.push_str("Answer:");
            shared(ctx, letters(), int(row, "cop", task, index)?)
        }
        "mmlu_professional_law" => {
            let c = strings(row, "choices", task, index, 4)?;
            let ctx = format!("{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:", s(row, "question", task, index)?.trim(), c[0], c[1], c[2], c[3]);
            shared(ctx, letters(), int(row, "answer", task, index)?)
        }
        other => Err(MasaError::Invalid(format!("`{other}` is not a multiple-choice task"))),
    }
}

/// Log-likelihood result of one item.
#[derive(Clone, Debug, Serialize)]
pub struct McScore {
    pub index: usize,
    pub gold: usize,
    /// Summed continuation log-probabilities, one per choice.
    pub lls: Vec<f64>,
    /// Continuation token counts.
    pub tokens: Vec<usize>,
    pub pred: usize,
    pub pred_norm: usize,
}

/// `(context tokens, continuation tokens)` the harness way.
pub fn encode_pair(tok: &Tokenizer, context: &str, continuation: &str, add_bos: bool) -> Result<(Vec<u32>, Vec<u32>)> {
    // Trailing whitespace of the context moves to the continuation (harness `_encode_pair`).
    let trimmed = context.trim_end();
    let moved = format!("{}{continuation}", &context[trimmed.len()..]);
    let (context, continuation) = (trimmed, moved.as_str());
    let ctx = tok.encode(context, add_bos)?;
    let whole = tok.encode(&format!("{context}{continuation}"), add_bos)?;
    let cont = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
    if cont.is_empty() {
        return Err(MasaError::Invalid(format!("continuation {continuation:?} encodes to no tokens after its context")));
    }
    Ok((ctx, cont))
}

fn argmax(v: &[f64]) -> usize {
    // First maximum, as numpy's argmax.
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Log-probabilities of `targets[j]` under rows of `logits` `(rows, vocab)`.
fn picked_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let t = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    Ok(lp.gather(&t, 1)?.squeeze(1)?.to_vec1::<f32>()?.into_iter().map(|x| x as f64).collect())
}

/// Score one item: summed continuation log-probs of every choice.
pub fn score_item(model: &Transformer, tok: &Tokenizer, item: &McItem) -> Result<McScore> {
    let add_bos = tok.default_add_bos();
    let n = item.continuations.len();
    let pad = tok.eos_id().unwrap_or(0);
    let mut lls = vec![0f64; n];
    let mut tokens = vec![0usize; n];
    if item.contexts.len() == 1 {
        // Shared context: run it once, then all continuations as one batch on its cache.
        let pairs = item.continuations.iter().map(|c| encode_pair(tok, &item.contexts[0], c, add_bos)).collect::<Result<Vec<_>>>()?;
        let ctx = &pairs[0].0;
        if pairs.iter().any(|(c, _)| c != ctx) {
            return Err(MasaError::Shape("context tokens differ between choices".into()));
        }
        let mut cache = KvCache::new();
        let x = Tensor::new(ctx.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward_cached(&x, &mut cache)?; // (1, t, v)
        let last = logits.i((0, ctx.len() - 1))?.unsqueeze(0)?; // (1, v)
        let first: Vec<u32> = pairs.iter().map(|(_, c)| c[0]).collect();
        let first_lp = picked_logprobs(&last.broadcast_as((n, last.dim(1)?))?.contiguous()?, &first)?;
        let lmax = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(1);
        if lmax > 1 {
            let mut batch = Vec::with_capacity(n * (lmax - 1));
            for (_, c) in &pairs {
                // Feed c[..len-1]; position j predicts c[j+1]. Right padding is never attended by real tokens.
                let mut row: Vec<u32> = c[..c.len() - 1].to_vec();
                row.resize(lmax - 1, pad);
                batch.extend(row);
            }
            let x = Tensor::from_vec(batch, (n, lmax - 1), &Device::Cpu)?;
            let mut c2 = cache.expand(n)?;
            let logits = model.forward_cached(&x, &mut c2)?; // (n, lmax-1, v)
            for (i, (_, c)) in pairs.iter().enumerate() {
                if c.len() > 1 {
                    let rows = logits.i((i, 0..c.len() - 1))?;
                    lls[i] = picked_logprobs(&rows, &c[1..])?.iter().sum();
                }
            }
        }
        for (i, (_, c)) in pairs.iter().enumerate() {
            lls[i] += first_lp[i];
            tokens[i] = c.len();
        }
    } else {
        // One context per choice (WinoGrande): full sequences, right-padded, one batch.
        let pairs =
            item.contexts.iter().zip(&item.continuations).map(|(ctx, c)| encode_pair(tok, ctx, c, add_bos)).collect::<Result<Vec<_>>>()?;
        let lmax = pairs.iter().map(|(a, b)| a.len() + b.len()).max().unwrap_or(1);
        let mut batch = Vec::with_capacity(n * lmax);
        for (a, b) in &pairs {
            let mut row = a.clone();
            row.extend(b);
            row.resize(lmax, pad);
            batch.extend(row);
        }
        let x = Tensor::from_vec(batch, (n, lmax), &Device::Cpu)?;
        let logits = model.forward_cached(&x, &mut KvCache::new())?;
        for (i, (a, b)) in pairs.iter().enumerate() {
            let rows = logits.i((i, a.len() - 1..a.len() + b.len() - 1))?;
            lls[i] = picked_logprobs(&rows, b)?.iter().sum();
            tokens[i] = b.len();
        }
    }
    Ok(finish(item, lls, tokens))
}

/// The score of `item` from its choices' log-likelihoods and continuation token counts.
fn finish(item: &McItem, lls: Vec<f64>, tokens: Vec<usize>) -> McScore {
    let norm: Vec<f64> = lls.iter().zip(&item.choices).map(|(l, c)| l / c.chars().count().max(1) as f64).collect();
    McScore { index: item.index, gold: item.gold, pred: argmax(&lls), pred_norm: argmax(&norm), lls, tokens }
}

/// Sequences per forward pass of [`score_pairs`], and tokens (at most) when sequences are long:
/// the engine keeps every layer's activations, attention probabilities included.
const SCORE_ROWS: usize = 64;
const SCORE_TOKENS: usize = 8192;

/// A batched engine that evaluation runs on instead of the candle model: the GPU engine (the
/// `cuda` feature), or the CPU engine in the tests.
pub trait ScoringEngine {
    /// Positions the model has (RoPE tables).
    fn max_positions(&self) -> usize;
    /// NLL of `y[i]` after inputs `x[..=i]` of each of `b` sequences of `t` tokens, `b·t`
    /// row-major.
    fn position_nll(&mut self, x: &[u32], y: &[u32], b: usize, t: usize) -> Result<Vec<f32>>;
    /// Next-token logits after the whole of `ids` (generation); an engine may keep what it
    /// computed for `ids[..len − 1]` from the previous call (a KV cache).
    fn next_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>>;
}

#[cfg(feature = "cuda")]
impl ScoringEngine for crate::cuda::llama::GpuLlama {
    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
    fn position_nll(&mut self, x: &[u32], y: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        let mut nll = vec![0f32; b * t];
        self.forward(x, b, t)?;
        self.loss(y, &vec![0f32; b * t], None, false, Some(&mut nll))?;
        Ok(nll)
    }
    fn next_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        crate::cuda::llama::GpuLlama::next_logits(self, ids)
    }
}

/// Without the `cuda` feature there is no batched engine ([`crate::eval::GpuModel`]).
#[cfg(not(feature = "cuda"))]
impl ScoringEngine for std::convert::Infallible {
    fn max_positions(&self) -> usize {
        match *self {}
    }
    fn position_nll(&mut self, _: &[u32], _: &[u32], _: usize, _: usize) -> Result<Vec<f32>> {
        match *self {}
    }
    fn next_logits(&mut self, _: &[u32]) -> Result<Vec<f32>> {
        match *self {}
    }
}

/// Score `items` by [`score_pairs`] over every choice's harness-encoded `(context,
/// continuation)`: the multiple-choice path of a batched engine (`masa eval --device cuda`).
/// `on_item` is called once per item scored.
pub fn score_items_batched(
    model: &mut dyn ScoringEngine,
    tok: &Tokenizer,
    items: &[McItem],
    on_item: &mut dyn FnMut(),
) -> Result<Vec<McScore>> {
    let add_bos = tok.default_add_bos();
    let mut pairs = Vec::new();
    let mut owner = Vec::new();
    for (i, item) in items.iter().enumerate() {
        for (c, cont) in item.continuations.iter().enumerate() {
            let context = if item.contexts.len() == 1 { &item.contexts[0] } else { &item.contexts[c] };
            pairs.push(encode_pair(tok, context, cont, add_bos).map_err(|e| MasaError::Invalid(format!("item {}: {e}", item.index)))?);
            owner.push(i);
        }
    }
    let mut left: Vec<usize> = items.iter().map(|it| it.continuations.len()).collect();
    let lls = score_pairs(model, &pairs, tok.eos_id().unwrap_or(0), &mut |p| {
        left[owner[p]] -= 1;
        if left[owner[p]] == 0 {
            on_item();
        }
    })?;
    let (mut lls, mut pairs) = (lls.into_iter(), pairs.iter());
    Ok(items
        .iter()
        .map(|it| {
            let n = it.continuations.len();
            let tokens = pairs.by_ref().take(n).map(|(_, c)| c.len()).collect();
            finish(it, lls.by_ref().take(n).collect(), tokens)
        })
        .collect())
}

/// Summed log-probability of each pair's continuation after its context: each input
/// `(context ++ continuation)[..len − 1]` is right-padded with `pad` to a multiple of 64
/// tokens, sequences of one padded length run up to [`SCORE_ROWS`] (and [`SCORE_TOKENS`]) per
/// forward pass, and a pair's
/// score is minus the summed NLL of its continuation positions (causal attention: padding
/// changes nothing before it). `on_done(i)` follows pair `i`'s score.
pub fn score_pairs(
    model: &mut dyn ScoringEngine,
    pairs: &[(Vec<u32>, Vec<u32>)],
    pad: u32,
    on_done: &mut dyn FnMut(usize),
) -> Result<Vec<f64>> {
    let max_pos = model.max_positions();
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (p, (ctx, cont)) in pairs.iter().enumerate() {
        if ctx.is_empty() || cont.is_empty() {
            return Err(MasaError::Invalid("a context or continuation encodes to no tokens, so there is nothing to score".into()));
        }
        let inputs = ctx.len() + cont.len() - 1;
        if inputs > max_pos {
            return Err(MasaError::Invalid(format!("{inputs} tokens of context and continuation exceed the model's {max_pos} positions")));
        }
        groups.entry(inputs.div_ceil(64).saturating_mul(64).min(max_pos)).or_default().push(p);
    }
    let mut lls = vec![0f64; pairs.len()];
    for (&t, members) in &groups {
        for batch in members.chunks((SCORE_TOKENS / t).clamp(1, SCORE_ROWS)) {
            let b = batch.len();
            let (mut x, mut y) = (vec![pad; b * t], vec![0u32; b * t]);
            for (r, &p) in batch.iter().enumerate() {
                let seq = [pairs[p].0.as_slice(), pairs[p].1.as_slice()].concat();
                let n = seq.len() - 1;
                x[r * t..r * t + n].copy_from_slice(&seq[..n]);
                y[r * t..r * t + n].copy_from_slice(&seq[1..]);
            }
            let nll = model.position_nll(&x, &y, b, t)?;
            for (r, &p) in batch.iter().enumerate() {
                let (ctx, cont) = &pairs[p];
                let from = r * t + ctx.len() - 1;
                lls[p] = -nll[from..from + cont.len()].iter().map(|&v| v as f64).sum::<f64>();
                on_done(p);
            }
        }
    }
    Ok(lls)
}

/// Mean and the harness's standard error (sample std with n−1, over √n).
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

/// `acc`, `acc_norm` and their standard errors over scored items.
#[derive(Clone, Debug, Serialize)]
pub struct McMetrics {
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
}

pub fn metrics(scores: &[McScore]) -> McMetrics {
    let acc: Vec<f64> = scores.iter().map(|s| (s.pred == s.gold) as u8 as f64).collect();
    let accn: Vec<f64> = scores.iter().map(|s| (s.pred_norm == s.gold) as u8 as f64).collect();
    let (a, ae) = mean_stderr(&acc);
    let (n, ne) = mean_stderr(&accn);
    McMetrics { acc: a, acc_stderr: ae, acc_norm: n, acc_norm_stderr: ne }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU engine in f32 as a [`ScoringEngine`] (a fresh workspace per call).
    struct CpuNll {
        model: crate::student::llama::Llama,
        params: Vec<f32>,
    }

    impl ScoringEngine for CpuNll {
        fn max_positions(&self) -> usize {
            self.model.cfg.max_position_embeddings
        }
        fn position_nll(&mut self, x: &[u32], y: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
            let mut ws = crate::student::llama::Workspace::<f32>::new(&self.model.cfg, b, t);
            self.model.forward(&self.params, &mut ws, x, b, t);
            let mut nll = vec![0f32; b * t];
            let zeros = vec![0f32; b * t];
            self.model.loss(
                &self.params,
                &mut ws,
                &crate::student::kernels::Targets { ids: y, weights: &zeros },
                None,
                None,
                Some(&mut nll),
            );
            Ok(nll)
        }
        fn next_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
            let mut ws = crate::student::llama::Workspace::<f32>::new(&self.model.cfg, 1, ids.len());
            self.model.forward(&self.params, &mut ws, ids, 1, ids.len());
            let v = self.model.cfg.vocab_size;
            Ok(self.model.logits(&self.params, &ws)[(ids.len() - 1) * v..].to_vec())
        }
    }

    #[test]
    fn batched_scores_equal_each_pair_scored_alone() {
        let mut cfg = crate::student::StudentConfig::preset("tiny").unwrap();
        cfg.vocab_size = 300;
        cfg.max_position_embeddings = 160;
        let params = cfg.scratch_init(3);
        let mut rng = crate::rng::SplitMix64(11);
        // 200 pairs in three padded lengths (64, 128, 160: the positions), 100 of them in the
        // first (two passes of at most 64), plus the longest the positions allow.
        let mut pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..200)
            .map(|i| {
                let (nc, nk) = (1 + rng.below([40, 40, 90, 120][i % 4]), 1 + rng.below(20));
                ((0..nc).map(|_| rng.below(300) as u32).collect(), (0..nk).map(|_| rng.below(300) as u32).collect())
            })
            .collect();
        pairs.push(((0..150).map(|_| rng.below(300) as u32).collect(), (0..11).map(|_| rng.below(300) as u32).collect()));
        let mut m = CpuNll { model: crate::student::llama::Llama::new(&cfg), params: params.clone() };
        let mut done = vec![0; pairs.len()];
        let got = score_pairs(&mut m, &pairs, 0, &mut |p| done[p] += 1).unwrap();
        assert!(done.iter().all(|&d| d == 1));
        let padded = |(c, k): &(Vec<u32>, Vec<u32>)| (c.len() + k.len() - 1).div_ceil(64) * 64;
        assert!(pairs.iter().filter(|p| padded(p) == 64).count() > SCORE_ROWS, "the first length takes two passes");
        assert!(pairs.iter().any(|p| padded(p) > 160), "a length capped at the positions");
        // Each pair alone, unpadded, in f64.
        let p64: Vec<f64> = params.iter().map(|&x| x as f64).collect();
        for ((ctx, cont), g) in pairs.iter().zip(&got) {
            let seq = [ctx.as_slice(), cont.as_slice()].concat();
            let t = seq.len() - 1;
            let mut ws = crate::student::llama::Workspace::<f64>::new(&cfg, 1, t);
            m.model.forward(&p64, &mut ws, &seq[..t], 1, t);
            let logits = m.model.logits(&p64, &ws);
            let v = cfg.vocab_size;
            let want: f64 = (ctx.len() - 1..t)
                .map(|i| {
                    let row = &logits[i * v..(i + 1) * v];
                    row[seq[i + 1] as usize] - crate::student::kernels::log_sum_exp(row)
                })
                .sum();
            assert!((g - want).abs() < 1e-4 * want.abs().max(1.0), "{g} vs {want} (context {}, continuation {})", ctx.len(), cont.len());
        }
        // Too long for the positions, or nothing to score: refused.
        let long = (vec![1u32; 150], vec![2u32; 12]);
        assert!(score_pairs(&mut m, &[long], 0, &mut |_| {}).unwrap_err().to_string().contains("positions"));
        assert!(score_pairs(&mut m, &[(vec![], vec![1])], 0, &mut |_| {}).is_err());
    }

    #[test]
    fn hellaswag_preprocess_matches_python() {
        // Values computed with the harness's Python preprocess.
        assert_eq!(hellaswag_preprocess("  Foo [title] Bar [step] baz  "), "Foo. Bar baz");
        assert_eq!(hellaswag_preprocess("a [x] [y] b"), "a  b");
        assert_eq!(hellaswag_preprocess("a [open\nb] c"), "a [open\nb] c");
        assert_eq!(hellaswag_preprocess("a   b"), "a  b");
    }

    #[test]
    fn capitalize_like_python() {
        assert_eq!(py_capitalize("then THE man"), "Then the man");
        assert_eq!(py_capitalize(""), "");
    }

    #[test]
    fn stderr_is_sample_std_over_sqrt_n() {
        let (m, se) = mean_stderr(&[1.0, 0.0, 1.0, 1.0]);
        assert!((m - 0.75).abs() < 1e-12);
        // numpy: np.std([1,0,1,1], ddof=1)/2 = 0.25
        assert!((se - 0.25).abs() < 1e-12, "{se}");
    }

    #[test]
    fn winogrande_partial_format() {
        let row: Row = serde_json::from_str(r#"{"sentence":"Sarah was a much better surgeon than Maria so _ always got the harder cases.","option1":"Sarah","option2":"Maria","answer":"1"}"#).unwrap();
        let it = build_item("winogrande", &row, 0).unwrap();
        assert_eq!(
            it.contexts,
            vec!["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
        );
        assert_eq!(it.continuations, vec![" always got the harder cases."; 2]);
        assert_eq!(it.gold, 0);
    }
}
