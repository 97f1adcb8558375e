//! Rouge-L, compatible with Google's `rouge_score` package
//! (`RougeScorer(['rougeL'], use_stemmer=True)`): the same tokenizer, the same Porter stemmer
//! (NLTK's), and the same LCS-based precision, recall and F-measure.

mod porter;

pub use porter::porter_stem;

/// Precision, recall and F-measure, as `rouge_score.scoring.Score`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Score {
    const ZERO: Score = Score { precision: 0.0, recall: 0.0, fmeasure: 0.0 };
}

/// `rouge_score/tokenize.py`'s `tokenize`: lowercase the text, treat every character outside
/// `[a-z0-9]` as a separator, and, when `stem` is set, Porter-stem the tokens longer than three
/// characters. (rouge_score drops empty tokens after stemming; the stemmer never empties a
/// token longer than three characters, so dropping them before is the same.)
pub fn tokenize(text: &str, stem: bool) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|token| !token.is_empty())
        .map(|token| if stem && token.len() > 3 { porter_stem(token) } else { token.to_string() })
        .collect()
}

/// Length of the longest common subsequence of two token sequences (`rouge_score`'s
/// `_lcs_table`, keeping one row at a time).
pub fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut previous = vec![0usize; b.len() + 1];
    let mut current = vec![0usize; b.len() + 1];
    for token_a in a {
        for (j, token_b) in b.iter().enumerate() {
            current[j + 1] = if token_a == token_b { previous[j] + 1 } else { previous[j + 1].max(current[j]) };
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// `rouge_score.scoring.fmeasure`: the harmonic mean, 0 when precision and recall are both 0.
fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// Rouge-L of `prediction` against one `reference`, tokenized with stemming as
/// `RougeScorer(['rougeL'], use_stemmer=True).score(reference, prediction)` does. Like
/// `rouge_score`'s `_score_lcs`, all three values are 0 when either side has no tokens.
pub fn rouge_l(prediction: &str, reference: &str) -> Score {
    let prediction_tokens = tokenize(prediction, true);
    let reference_tokens = tokenize(reference, true);
    if prediction_tokens.is_empty() || reference_tokens.is_empty() {
        return Score::ZERO;
    }
    let lcs = lcs_len(&reference_tokens, &prediction_tokens) as f64;
    let precision = lcs / prediction_tokens.len() as f64;
    let recall = lcs / reference_tokens.len() as f64;
    Score { precision, recall, fmeasure: fmeasure(precision, recall) }
}

/// The best Rouge-L F-measure of `prediction` over `references`, as the F-measure of
/// `RougeScorer.score_multi` (which keeps the reference with the highest F); 0 for no references.
pub fn rouge_l_multi(prediction: &str, references: &[String]) -> f64 {
    references.iter().map(|reference| rouge_l(prediction, reference).fmeasure).fold(0.0, f64::max)
}
