//! The Porter stemmer exactly as NLTK implements it: `nltk.stem.porter.PorterStemmer()` in its
//! default mode, `NLTK_EXTENSIONS`, which is the mode `rouge_score` constructs
//! (`rouge_score/tokenizers.py`: `porter.PorterStemmer() if use_stemmer else None`).
//!
//! Relative to Porter's 1980 paper, that mode adds: a table of irregular forms, words of at most
//! two characters left alone, `-ies`/`-ied` special cases in steps 1a and 1b, a two-letter `*o`
//! condition, NLTK's step 1c condition, `bli -> ble` instead of `abli -> able`, a recursive
//! `alli -> al`, and the `fulli -> ful` and `logi -> log` rules of step 2. Each step below
//! mirrors NLTK's method of the same name, rule order included: within a step the first rule
//! whose suffix matches decides, even when its condition then fails.

const VOWELS: [char; 5] = ['a', 'e', 'i', 'o', 'u'];

/// NLTK's irregular forms (`irregular_forms` in `PorterStemmer.__init__`), as (word, stem).
const IRREGULAR_FORMS: [(&str, &str); 16] = [
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

/// A suffix rule: (suffix, replacement, condition on the word with the suffix removed).
type Rule<'a> = (&'a str, &'a str, &'a dyn Fn(&str) -> bool);

/// Stem one word as `PorterStemmer().stem(word)` does (lowercasing it first).
pub fn porter_stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some(&(_, stem)) = IRREGULAR_FORMS.iter().find(|(form, _)| *form == lower) {
        return stem.to_string();
    }
    // NLTK tests the length of the word as given, not of its lowercase form.
    if word.chars().count() <= 2 {
        return lower;
    }
    let steps: [fn(&str) -> String; 8] = [step1a, step1b, step1c, step2, step3, step4, step5a, step5b];
    steps.iter().fold(lower, |stem, step| step(&stem))
}

/// Consonant (`true`) or vowel for each character: a letter other than a, e, i, o, u, and other
/// than a `y` that follows a consonant (`_consonant_flags` / `_is_consonant`).
fn consonant_flags(word: &str) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(word.len());
    for ch in word.chars() {
        let consonant = match ch {
            'y' => flags.last().map_or(true, |&previous| !previous),
            _ => !VOWELS.contains(&ch),
        };
        flags.push(consonant);
    }
    flags
}

/// The measure m of `[C](VC){m}[V]`: how many vowel-to-consonant transitions `stem` has.
fn measure(stem: &str) -> usize {
    consonant_flags(stem).windows(2).filter(|pair| !pair[0] && pair[1]).count()
}

fn has_positive_measure(stem: &str) -> bool {
    measure(stem) > 0
}

fn measure_gt_1(stem: &str) -> bool {
    measure(stem) > 1
}

/// Condition `*v*`: the stem contains a vowel.
fn contains_vowel(stem: &str) -> bool {
    consonant_flags(stem).iter().any(|&consonant| !consonant)
}

/// Condition `*d`: the word ends with a double consonant.
fn ends_double_consonant(word: &str) -> bool {
    let mut chars = word.chars().rev();
    match (chars.next(), chars.next()) {
        (Some(last), Some(before)) => last == before && consonant_flags(word).last() == Some(&true),
        _ => false,
    }
}

/// Condition `*o`: the word ends consonant-vowel-consonant, the last not w, x or y; NLTK also
/// accepts a two-letter word that is vowel-consonant.
fn ends_cvc(word: &str) -> bool {
    let last = word.chars().last();
    match consonant_flags(word).as_slice() {
        [.., true, false, true] => !matches!(last, Some('w' | 'x' | 'y')),
        [false, true] => true,
        _ => false,
    }
}

/// `word` without its last character.
fn drop_last_char(word: &str) -> &str {
    let mut chars = word.chars();
    chars.next_back();
    chars.as_str()
}

/// `_apply_rule_list`: the first rule whose suffix matches replaces it if its condition holds on
/// the remaining stem; otherwise the word is returned unchanged.
fn apply_rules(word: &str, rules: &[Rule]) -> String {
    for (suffix, replacement, condition) in rules {
        if let Some(stem) = word.strip_suffix(suffix) {
            return if condition(stem) { format!("{stem}{replacement}") } else { word.to_string() };
        }
    }
    word.to_string()
}

fn always(_: &str) -> bool {
    true
}

/// Step 1a: plurals. NLTK turns a four-letter `-ies` word into `-ie` (`ties` -> `tie`).
fn step1a(word: &str) -> String {
    if let Some(stem) = word.strip_suffix("ies") {
        if word.chars().count() == 4 {
            return format!("{stem}ie");
        }
    }
    apply_rules(word, &[("sses", "ss", &always), ("ies", "i", &always), ("ss", "ss", &always), ("s", "", &always)])
}

/// Step 1b: `-eed`, `-ed`, `-ing`. NLTK first turns `-ied` into `-ie` (four-letter words) or `-i`.
fn step1b(word: &str) -> String {
    if let Some(stem) = word.strip_suffix("ied") {
        let replacement = if word.chars().count() == 4 { "ie" } else { "i" };
        return format!("{stem}{replacement}");
    }
    if let Some(stem) = word.strip_suffix("eed") {
        return if has_positive_measure(stem) { format!("{stem}ee") } else { word.to_string() };
    }
    let stripped = ["ed", "ing"].iter().find_map(|suffix| word.strip_suffix(suffix));
    match stripped {
        Some(stem) if contains_vowel(stem) => step1b_tidy(stem),
        _ => word.to_string(),
    }
}

/// The clean-up after step 1b removed `-ed` or `-ing`: restore an `e` after `at`, `bl`, `iz`,
/// undouble a final double consonant other than l, s, z, and add `e` to a short `*o` stem.
fn step1b_tidy(stem: &str) -> String {
    if ["at", "bl", "iz"].iter().any(|suffix| stem.ends_with(suffix)) {
        return format!("{stem}e");
    }
    if ends_double_consonant(stem) {
        return if stem.ends_with(['l', 's', 'z']) { stem.to_string() } else { drop_last_char(stem).to_string() };
    }
    if measure(stem) == 1 && ends_cvc(stem) {
        return format!("{stem}e");
    }
    stem.to_string()
}

/// Step 1c: `y` -> `i` when the `y` follows a consonant that is not the whole stem (NLTK's rule).
fn step1c(word: &str) -> String {
    let condition = |stem: &str| stem.chars().count() > 1 && consonant_flags(stem).last() == Some(&true);
    apply_rules(word, &[("y", "i", &condition)])
}

/// Step 2: double suffixes to single ones, with NLTK's recursive `alli` and extra rules.
fn step2(word: &str) -> String {
    if let Some(stem) = word.strip_suffix("alli") {
        if has_positive_measure(stem) {
            return step2(&format!("{stem}al"));
        }
    }
    // NLTK's `logi` condition looks at the word minus `ogi`, i.e. the stem plus `l`.
    let logi_condition = |stem: &str| has_positive_measure(&format!("{stem}l"));
    let positive: &dyn Fn(&str) -> bool = &has_positive_measure;
    apply_rules(
        word,
        &[
            ("ational", "ate", positive),
            ("tional", "tion", positive),
            ("enci", "ence", positive),
            ("anci", "ance", positive),
            ("izer", "ize", positive),
            ("bli", "ble", positive),
            ("alli", "al", positive),
            ("entli", "ent", positive),
            ("eli", "e", positive),
            ("ousli", "ous", positive),
            ("ization", "ize", positive),
            ("ation", "ate", positive),
            ("ator", "ate", positive),
            ("alism", "al", positive),
            ("iveness", "ive", positive),
            ("fulness", "ful", positive),
            ("ousness", "ous", positive),
            ("aliti", "al", positive),
            ("iviti", "ive", positive),
            ("biliti", "ble", positive),
            ("fulli", "ful", positive),
            ("logi", "log", &logi_condition),
        ],
    )
}

/// Step 3: `-icate`, `-ative`, `-alize`, `-iciti`, `-ical`, `-ful`, `-ness`.
fn step3(word: &str) -> String {
    let positive: &dyn Fn(&str) -> bool = &has_positive_measure;
    apply_rules(
        word,
        &[
            ("icate", "ic", positive),
            ("ative", "", positive),
            ("alize", "al", positive),
            ("iciti", "ic", positive),
            ("ical", "ic", positive),
            ("ful", "", positive),
            ("ness", "", positive),
        ],
    )
}

/// Step 4: remove a final suffix when the measure of what remains exceeds 1.
fn step4(word: &str) -> String {
    let gt1: &dyn Fn(&str) -> bool = &measure_gt_1;
    let ion_condition = |stem: &str| measure_gt_1(stem) && stem.ends_with(['s', 't']);
    apply_rules(
        word,
        &[
            ("al", "", gt1),
            ("ance", "", gt1),
            ("ence", "", gt1),
            ("er", "", gt1),
            ("ic", "", gt1),
            ("able", "", gt1),
            ("ible", "", gt1),
            ("ant", "", gt1),
            ("ement", "", gt1),
            ("ment", "", gt1),
            ("ent", "", gt1),
            ("ion", "", &ion_condition),
            ("ou", "", gt1),
            ("ism", "", gt1),
            ("ate", "", gt1),
            ("iti", "", gt1),
            ("ous", "", gt1),
            ("ive", "", gt1),
            ("ize", "", gt1),
        ],
    )
}

/// Step 5a: drop a final `e` if m > 1, or if m = 1 and the stem does not end `*o`.
fn step5a(word: &str) -> String {
    match word.strip_suffix('e') {
        Some(stem) if measure_gt_1(stem) || (measure(stem) == 1 && !ends_cvc(stem)) => stem.to_string(),
        _ => word.to_string(),
    }
}

/// Step 5b: `-ll` -> `-l` when the word minus its last letter has m > 1.
fn step5b(word: &str) -> String {
    if word.ends_with("ll") && measure_gt_1(drop_last_char(word)) {
        return drop_last_char(word).to_string();
    }
    word.to_string()
}
