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
    row.get(f)
        .and_then(Value::as_str)
        .ok_or_else(|| MasaError::Invalid(format!("{task} item {index}: field `{f}` missing or not a string (malformed task file; run `masa fetch tasks` again)")))
}

fn int(row: &Row, f: &str, task: &str, index: usize) -> Result<usize> {
    let v = row.get(f);
    let n = match v {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(t)) => t.trim().parse().ok(),
        Some(Value::Bool(b)) => Some(*b as u64),
        _ => None,
    };
    n.map(|n| n as usize)
        .ok_or_else(|| MasaError::Invalid(format!("{task} item {index}: field `{f}` missing or not an integer label (malformed task file)")))
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
            return Err(MasaError::Invalid(format!("{task} item {index}: gold label {gold} out of range for {} choices (malformed task file)", choices.len())));
        }
        Ok(McItem {
            index,
            contexts: vec![ctx],
            continuations: choices.iter().map(|c| format!(" {c}")).collect(),
            choices,
            gold,
        })
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
            let contexts: Vec<String> =
                [s(row, "option1", task, index)?, s(row, "option2", task, index)?].iter().map(|o| format!("{}{o}", &sentence[..idx])).collect();
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
            let ctx = format!(
                "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
                s(row, "question", task, index)?.trim(),
                c[0],
                c[1],
                c[2],
                c[3]
            );
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
        let pairs = item
            .contexts
            .iter()
            .zip(&item.continuations)
            .map(|(ctx, c)| encode_pair(tok, ctx, c, add_bos))
            .collect::<Result<Vec<_>>>()?;
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
    let norm: Vec<f64> = lls.iter().zip(&item.choices).map(|(l, c)| l / c.chars().count().max(1) as f64).collect();
    Ok(McScore { index: item.index, gold: item.gold, pred: argmax(&lls), pred_norm: argmax(&norm), lls, tokens })
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
        assert_eq!(it.contexts, vec!["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]);
        assert_eq!(it.continuations, vec![" always got the harder cases."; 2]);
        assert_eq!(it.gold, 0);
    }
}
