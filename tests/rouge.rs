//! Rouge-L against `rouge_score` 0.1.2 (with NLTK 3.10's Porter stemmer): the reference cases
//! in `tests/data/reference/rouge/` (`scripts/make_reference.py rouge`), and stems and
//! tokenizations produced by NLTK and rouge_score, written out below.

mod common;

use masa::rouge::{lcs_len, porter_stem, rouge_l, rouge_l_multi, tokenize, Score};

#[derive(serde::Deserialize)]
struct Case {
    prediction: String,
    references: Vec<String>,
    #[serde(rename = "rougeL_f")]
    rouge_l_f: f64,
}

#[test]
fn matches_every_reference_case() {
    let path = common::reference_file("rouge/rougeL_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases: Vec<Case> = serde_json::from_str(&text).expect("parsing the reference cases");
    assert_eq!(cases.len(), 273);
    let failures: Vec<String> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, case)| {
            let got = rouge_l_multi(&case.prediction, &case.references);
            ((got - case.rouge_l_f).abs() > 1e-6).then(|| format!("case {i}: {:?}: got {got}, want {}", case.prediction, case.rouge_l_f))
        })
        .collect();
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// (word, `nltk.stem.porter.PorterStemmer().stem(word)`), NLTK 3.10.4: the examples of Porter's
/// paper plus NLTK's extensions (irregular forms, `-ies`/`-ied`, step 1c, `alli`, `fulli`, `logi`).
const STEMS: &[(&str, &str)] = &[
    ("caresses", "caress"),
    ("ponies", "poni"),
    ("ties", "tie"),
    ("caress", "caress"),
    ("cats", "cat"),
    ("feed", "feed"),
    ("agreed", "agre"),
    ("plastered", "plaster"),
    ("bled", "bled"),
    ("motoring", "motor"),
    ("sing", "sing"),
    ("conflated", "conflat"),
    ("troubled", "troubl"),
    ("sized", "size"),
    ("hopping", "hop"),
    ("tanned", "tan"),
    ("falling", "fall"),
    ("hissing", "hiss"),
    ("fizzed", "fizz"),
    ("failing", "fail"),
    ("filing", "file"),
    ("happy", "happi"),
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("outings", "outing"),
    ("cannings", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
    ("relational", "relat"),
    ("conditional", "condit"),
    ("rational", "ration"),
    ("valenci", "valenc"),
    ("hesitanci", "hesit"),
    ("digitizer", "digit"),
    ("conformabli", "conform"),
    ("radicalli", "radic"),
    ("differentli", "differ"),
    ("vileli", "vile"),
    ("analogousli", "analog"),
    ("vietnamization", "vietnam"),
    ("predication", "predic"),
    ("operator", "oper"),
    ("feudalism", "feudal"),
    ("decisiveness", "decis"),
    ("hopefulness", "hope"),
    ("callousness", "callous"),
    ("formaliti", "formal"),
    ("sensitiviti", "sensit"),
    ("sensibiliti", "sensibl"),
    ("triplicate", "triplic"),
    ("formative", "form"),
    ("formalize", "formal"),
    ("electriciti", "electr"),
    ("electrical", "electr"),
    ("hopeful", "hope"),
    ("goodness", "good"),
    ("revival", "reviv"),
    ("allowance", "allow"),
    ("inference", "infer"),
    ("airliner", "airlin"),
    ("gyroscopic", "gyroscop"),
    ("adjustable", "adjust"),
    ("defensible", "defens"),
    ("irritant", "irrit"),
    ("replacement", "replac"),
    ("adjustment", "adjust"),
    ("dependent", "depend"),
    ("adoption", "adopt"),
    ("homologou", "homolog"),
    ("communism", "commun"),
    ("activate", "activ"),
    ("angulariti", "angular"),
    ("homologous", "homolog"),
    ("effective", "effect"),
    ("bowdlerize", "bowdler"),
    ("probate", "probat"),
    ("rate", "rate"),
    ("cease", "ceas"),
    ("controll", "control"),
    ("roll", "roll"),
    ("running", "run"),
    ("generalization", "gener"),
    ("generalizations", "gener"),
    ("enjoy", "enjoy"),
    ("enjoyment", "enjoy"),
    ("spied", "spi"),
    ("tried", "tri"),
    ("flies", "fli"),
    ("died", "die"),
    ("lies", "lie"),
    ("cried", "cri"),
    ("spy", "spi"),
    ("fly", "fli"),
    ("try", "tri"),
    ("ow", "ow"),
    ("owing", "owe"),
    ("eed", "eed"),
    ("by", "by"),
    ("yyyy", "yyyi"),
    ("syzygy", "syzygi"),
    ("toy", "toy"),
    ("analogi", "analog"),
    ("apologies", "apolog"),
    ("fulli", "fulli"),
    ("beautifulli", "beauti"),
    ("hopefully", "hope"),
    ("archaeology", "archaeolog"),
    ("watchings", "watch"),
    ("watching", "watch"),
    ("movie", "movi"),
    ("theater", "theater"),
    ("cops", "cop"),
    ("wreck", "wreck"),
    ("national", "nation"),
    ("emotional", "emot"),
    ("university", "univers"),
    ("universal", "univers"),
    ("organization", "organ"),
    ("organizations", "organ"),
    ("a", "a"),
    ("at", "at"),
    ("is", "is"),
    ("be", "be"),
    ("USA", "usa"),
    ("Running", "run"),
];

#[test]
fn porter_stems_match_nltk() {
    let wrong: Vec<String> = STEMS
        .iter()
        .filter(|(word, stem)| porter_stem(word) != *stem)
        .map(|(word, stem)| format!("{word}: got {}, want {stem}", porter_stem(word)))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|word| word.to_string()).collect()
}

#[test]
fn tokenizer_matches_rouge_score() {
    // rouge_score.tokenize.tokenize(text, PorterStemmer()) and tokenize(text, None).
    let text = "The cats' 3-day RUNNING, e.g. don't-stop!! Über naïve dogs";
    assert_eq!(tokenize(text, true), strings(&["the", "cat", "3", "day", "run", "e", "g", "don", "t", "stop", "ber", "na", "ve", "dog"]));
    assert_eq!(
        tokenize(text, false),
        strings(&["the", "cats", "3", "day", "running", "e", "g", "don", "t", "stop", "ber", "na", "ve", "dogs"])
    );
    // Tokens of at most three characters are never stemmed: `ies` would become `i`.
    assert_eq!(tokenize("ies dies cats", true), strings(&["ies", "die", "cat"]));
}

#[test]
fn empty_and_punctuation_only_texts_have_no_tokens() {
    for text in ["", "   ", "?!. ,;:--", "\u{2014} \u{00e9}\u{00e8}"] {
        assert!(tokenize(text, true).is_empty(), "{text:?}");
    }
    let zero = Score { precision: 0.0, recall: 0.0, fmeasure: 0.0 };
    assert_eq!(rouge_l("", ""), zero);
    assert_eq!(rouge_l("", "a cat"), zero);
    assert_eq!(rouge_l("a cat", ""), zero);
    assert_eq!(rouge_l("?!", "..."), zero);
    assert_eq!(rouge_l("a cat", "!!"), zero);
    assert_eq!(rouge_l_multi("a cat", &[]), 0.0);
    assert_eq!(rouge_l_multi("", &strings(&["a cat"])), 0.0);
}

#[test]
fn lcs_and_scores() {
    let a = strings(&["a", "b", "c", "d", "e"]);
    let b = strings(&["b", "x", "d", "e", "a"]);
    assert_eq!(lcs_len(&a, &b), 3);
    assert_eq!(lcs_len(&b, &a), 3);
    assert_eq!(lcs_len(&a, &[]), 0);
    // rouge_score: RougeScorer(['rougeL'], use_stemmer=True).score(target, prediction).
    let score = rouge_l("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog");
    assert!((score.precision - 0.625).abs() < 1e-12);
    assert!((score.recall - 5.0 / 9.0).abs() < 1e-12);
    assert!((score.fmeasure - 0.5882352941176471).abs() < 1e-12);
    let best = rouge_l_multi("the cat sat", &strings(&["a dog ran", "the cats sat down"]));
    assert!((best - rouge_l("the cat sat", "the cats sat down").fmeasure).abs() < 1e-15);
}
