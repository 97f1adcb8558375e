//! Corpus loading, splits and token streams on small corpora written here.
//!
//! The real default-corpus build downloads Debian packages and is `#[ignore]`d:
//! `MASA_HOME=/tmp/masa-corpus cargo test --release --test corpus -- --ignored --nocapture`.

use std::path::{Path, PathBuf};

use masa::corpus::*;
use masa::{MasaError, Result};
use sha2::{Digest, Sha256};

fn bytes_encode(s: &str) -> Result<Vec<u32>> {
    Ok(s.bytes().map(u32::from).collect())
}

fn write(p: &Path, s: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, s).unwrap();
}

/// A corpus of `n` distinct documents in two domains.
fn synthetic(n: usize) -> Corpus {
    Corpus::from_texts((0..n).map(|i| {
        let dom = if i % 3 == 0 { "a" } else { "b" };
        (format!("document number {i} says {}", "hello ".repeat(i % 7 + 1)), dom.to_string(), format!("s{i}"))
    }))
}

#[test]
fn loads_txt_dir_and_jsonl() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    write(&root.join("single.txt"), "A single text file.\r\nSecond line.\n");
    write(&root.join("tree/law/case1.txt"), "The court held that.");
    write(&root.join("tree/law/case2.txt"), "The appeal was dismissed.");
    write(&root.join("tree/medicine/a.txt"), "Aspirin inhibits cyclooxygenase.");
    write(&root.join("tree/medicine/empty.txt"), "  \n");
    write(&root.join("tree/notes.md"), "ignored");
    write(&root.join("tree/more.jsonl"), "{\"text\": \"from jsonl in a dir\", \"domain\": \"misc\"}\n");
    write(&root.join("qa.jsonl"), "{\"text\": \"first\"}\n\n{\"text\": \"second\", \"domain\": \"other\", \"extra\": 1}\n");
    // Invalid UTF-8 is replaced, not an error.
    std::fs::write(root.join("bad.txt"), b"caf\xe9 au lait").unwrap();

    let c = load_corpus(&[root.join("single.txt"), root.join("tree"), root.join("qa.jsonl"), root.join("bad.txt")]).unwrap();
    let got: Vec<(&str, &str, &str)> = c.docs.iter().map(|d| (d.domain.as_str(), d.text.as_str(), d.source.as_str())).collect();
    assert_eq!(
        got,
        vec![
            ("single", "A single text file.\nSecond line.\n", "single.txt"),
            ("law", "The court held that.", "law/case1.txt"),
            ("law", "The appeal was dismissed.", "law/case2.txt"),
            ("medicine", "Aspirin inhibits cyclooxygenase.", "medicine/a.txt"),
            ("misc", "from jsonl in a dir", "more.jsonl:1"),
            ("qa", "first", "qa.jsonl:1"),
            ("other", "second", "qa.jsonl:3"),
            ("bad", "caf\u{fffd} au lait", "bad.txt"),
        ]
    );
    assert_eq!(c.domains(), vec!["bad", "law", "medicine", "misc", "other", "qa", "single"]);
}

#[test]
fn split_rule_matches_independent_sha256() {
    for i in 0..2000 {
        let text = format!("doc {i}");
        let h = Sha256::digest(text.as_bytes());
        let v = u64::from_be_bytes(h[..8].try_into().unwrap());
        let want = if v % 10000 < 200 { Split::Valid } else { Split::Train };
        assert_eq!(split_of(&text), want);
    }
    // About 2% valid.
    let n = (0..20000).filter(|i| split_of(&format!("doc {i}")) == Split::Valid).count();
    assert!((300..500).contains(&n), "{n} of 20000 valid");
}

#[test]
fn split_is_stable_when_other_documents_change() {
    let c1 = synthetic(3000);
    // Other docs removed and new ones added: every shared doc keeps its split.
    let mut items: Vec<(String, String, String)> =
        c1.docs.iter().step_by(2).map(|d| (d.text.clone(), d.domain.clone(), d.source.clone())).collect();
    items.extend((0..500).map(|i| (format!("new doc {i}"), "a".into(), format!("n{i}"))));
    items.reverse();
    let c2 = Corpus::from_texts(items);
    let m: std::collections::HashMap<&str, Split> = c2.docs.iter().map(|d| (d.text.as_str(), d.split)).collect();
    for d in c1.docs.iter().step_by(2) {
        assert_eq!(m[d.text.as_str()], d.split);
    }
    let counts = c1.counts();
    assert!(counts[&("a".to_string(), Split::Valid)].docs > 0);
    assert!(counts[&("b".to_string(), Split::Valid)].docs > 0);
}

#[test]
fn small_domains_get_one_valid_document() {
    let c = Corpus::from_texts((0..5).map(|i| (format!("tiny {i}"), "t".to_string(), i.to_string())));
    let valid: Vec<&Document> = c.iter(Split::Valid, None).collect();
    // 2% of 5 docs is usually zero; the fallback puts the smallest-hash doc into valid.
    assert!(!valid.is_empty());
    let min = c.docs.iter().min_by_key(|d| split_hash(&d.text)).unwrap();
    assert!(valid.iter().any(|d| d.text == min.text));
    // A single-document domain stays train.
    let one = Corpus::from_texts([("only".to_string(), "o".to_string(), "x".to_string())]);
    assert_eq!(one.docs[0].split, Split::Train);
}

#[test]
fn token_stream_is_deterministic_per_seed() {
    let c = synthetic(200);
    let enc = &bytes_encode;
    let draw = |seed: u64| {
        let mut s = token_stream(&c, Split::Train, None, seed, enc, Some(1000)).unwrap();
        s.next_batch(8, 64).unwrap()
    };
    let a = draw(1);
    assert_eq!(a, draw(1));
    assert_ne!(a, draw(2));
    assert_eq!(a.len(), 8);
    assert!(a.iter().all(|s| s.len() == 64));
}

#[test]
fn token_stream_is_the_shuffled_concatenation_with_eos() {
    let c = synthetic(50);
    let enc = &bytes_encode;
    let mut s = token_stream(&c, Split::Train, None, 9, enc, Some(999)).unwrap();
    let n_docs = s.num_docs();
    let train: Vec<&Document> = c.iter(Split::Train, None).collect();
    assert_eq!(n_docs, train.len());
    // Independent construction: epoch 0 then epoch 1 orders, docs joined with EOS.
    let mut want: Vec<u32> = Vec::new();
    for epoch in 0..2 {
        for k in epoch_order(n_docs, 9, epoch) {
            want.extend(train[k].text.bytes().map(u32::from));
            want.push(999);
        }
    }
    let total = want.len() - 17;
    let got = s.next_sequence(total).unwrap();
    assert_eq!(got, want[..total]);
    assert_eq!(s.epoch(), 1);
    assert_eq!(s.tokens_drawn(), total as u64);
    // Per-domain counts add up to what was drawn.
    assert_eq!(s.drawn_per_domain().values().sum::<u64>(), total as u64);
}

#[test]
fn token_stream_domain_filter_and_counts() {
    let c = synthetic(300);
    let enc = &bytes_encode;
    let only_a = vec!["a".to_string()];
    let mut s = token_stream(&c, Split::Train, Some(&only_a), 3, enc, None).unwrap();
    s.next_batch(4, 100).unwrap();
    let d = s.drawn_per_domain();
    assert_eq!(d.keys().collect::<Vec<_>>(), vec!["a"]);
    assert_eq!(d["a"], 400);
    let err = token_stream(&c, Split::Train, Some(&["zzz".to_string()]), 3, enc, None).err().unwrap();
    assert!(err.to_string().contains("zzz") && err.to_string().contains("a, b"), "{err}");
}

#[test]
fn token_stream_resumes_from_state() {
    let c = synthetic(120);
    let enc = &bytes_encode;
    let mut s = token_stream(&c, Split::Train, None, 5, enc, Some(7)).unwrap();
    s.next_batch(3, 333).unwrap();
    let st = s.state();
    let rest = s.next_batch(20, 100).unwrap();
    let mut s2 = token_stream(&c, Split::Train, None, 5, enc, Some(7)).unwrap();
    s2.restore(&st).unwrap();
    assert_eq!(s2.next_batch(20, 100).unwrap(), rest);
    assert_eq!(s2.drawn_per_domain(), s.drawn_per_domain());
}

#[test]
fn token_stream_encodes_lazily() {
    let c = synthetic(1000);
    let calls = std::cell::Cell::new(0usize);
    let enc = |s: &str| {
        calls.set(calls.get() + 1);
        bytes_encode(s)
    };
    let mut s = token_stream(&c, Split::Train, None, 0, &enc, None).unwrap();
    s.next_sequence(50).unwrap();
    assert!(calls.get() <= 3, "{} documents encoded for 50 tokens", calls.get());
}

#[test]
fn encoder_errors_propagate() {
    let c = synthetic(20);
    let enc = |_: &str| -> Result<Vec<u32>> { Err(MasaError::Invalid("tokenizer broke".into())) };
    let mut s = token_stream(&c, Split::Train, None, 0, &enc, None).unwrap();
    assert!(s.next_sequence(10).unwrap_err().to_string().contains("tokenizer broke"));
    let empty = |_: &str| -> Result<Vec<u32>> { Ok(vec![]) };
    let mut s = token_stream(&c, Split::Train, None, 0, &empty, None).unwrap();
    assert!(s.next_sequence(10).unwrap_err().to_string().contains("no tokens"));
}

#[test]
fn validation_sequences_are_fixed_per_domain() {
    let c = synthetic(3000);
    let enc = &bytes_encode;
    let v = validation_sequences(&c, Split::Valid, 32, 5, enc, Some(0)).unwrap();
    assert_eq!(v.keys().collect::<Vec<_>>(), vec!["a", "b"]);
    // Independent: concatenation of the domain's valid docs in corpus order, cut at 32.
    for (dom, seqs) in &v {
        let mut all: Vec<u32> = Vec::new();
        for d in c.iter(Split::Valid, Some(dom)) {
            all.extend(d.text.bytes().map(u32::from));
            all.push(0);
        }
        let want: Vec<Vec<u32>> = all.chunks_exact(32).take(5).map(|c| c.to_vec()).collect();
        assert_eq!(seqs, &want);
    }
    let n = domain_sequences(&c, Split::Valid, "a", 32, enc, Some(0)).unwrap().count();
    let tokens: usize = c.iter(Split::Valid, Some("a")).map(|d| d.text.len() + 1).sum();
    assert_eq!(n, tokens / 32);
    let counts = count_tokens(&c, Split::Valid, enc, Some(0)).unwrap();
    assert_eq!(counts["a"], tokens as u64);
}

#[test]
fn error_empty_corpus() {
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("d/blank.txt"), "\n\n");
    write(&t.path().join("d/x.md"), "not a corpus file");
    let e = load_corpus(&[t.path().join("d")]).unwrap_err().to_string();
    assert!(e.contains("empty corpus") && e.contains(&t.path().join("d").display().to_string()), "{e}");
    let e = load_corpus(&[]).unwrap_err().to_string();
    assert!(e.contains("no corpus given"), "{e}");
}

#[test]
fn error_jsonl_without_text_names_file_and_line() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("c.jsonl");
    write(&p, "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n");
    let e = load_corpus(&[p.clone()]).unwrap_err();
    assert!(matches!(e, MasaError::Field { .. }), "{e:?}");
    let s = e.to_string();
    assert!(s.contains(&format!("{}:2", p.display())) && s.contains("`text`"), "{s}");
    write(&p, "{\"text\": \"ok\"}\n\nnot json\n");
    let s = load_corpus(&[p.clone()]).unwrap_err().to_string();
    assert!(s.contains(&format!("{}:3", p.display())), "{s}");
    write(&p, "{\"text\": 5}\n");
    assert!(load_corpus(&[p.clone()]).unwrap_err().to_string().contains("must be a string"));
}

#[test]
fn error_unreadable_or_unsupported_file() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("nope.txt");
    let e = load_corpus(&[missing.clone()]).unwrap_err();
    assert!(matches!(e, MasaError::Io { .. }) && e.to_string().contains("nope.txt"), "{e}");
    let pdf = t.path().join("paper.pdf");
    write(&pdf, "%PDF");
    let e = load_corpus(&[pdf]).unwrap_err().to_string();
    assert!(e.contains("paper.pdf") && e.contains(".jsonl"), "{e}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let p = t.path().join("locked.txt");
        write(&p, "secret");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read(&p).is_err() {
            // (root can read it anyway; then there is nothing to test)
            let e = load_corpus(&[p.clone()]).unwrap_err().to_string();
            assert!(e.contains("locked.txt"), "{e}");
        }
    }
}

#[test]
fn default_corpus_dir_layout_loads_via_manifest() {
    // A hand-made directory in the default corpus layout.
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    write(
        &d.join("x.train.jsonl"),
        "{\"text\":\"t1\",\"domain\":\"x\",\"source\":\"p:1\"}\n{\"text\":\"t2\",\"domain\":\"x\",\"source\":\"p:2\"}\n",
    );
    write(&d.join("x.valid.jsonl"), "{\"text\":\"v1\",\"domain\":\"x\",\"source\":\"p:3\"}\n");
    let m = Manifest {
        format_version: FORMAT_VERSION,
        created_by: "test".into(),
        split_rule: SPLIT_RULE.into(),
        selection_rule: String::new(),
        max_doc_bytes: DEFAULT_MAX_DOC_BYTES,
        packages: vec![],
        domains: vec![DomainInfo {
            name: "x".into(),
            packages: vec![],
            cap_bytes: 10,
            train_file: "x.train.jsonl".into(),
            valid_file: "x.valid.jsonl".into(),
            train: SplitCounts { docs: 2, bytes: 4 },
            valid: SplitCounts { docs: 1, bytes: 2 },
            units_available: 3,
            units_used: 3,
            bytes_available: 6,
            bytes_per_source: Default::default(),
        }],
        build_seconds: 0.0,
    };
    write(&d.join("manifest.json"), &serde_json::to_string(&m).unwrap());
    let c = load_corpus(&[d.to_path_buf()]).unwrap();
    let got: Vec<(&str, Split)> = c.docs.iter().map(|d| (d.text.as_str(), d.split)).collect();
    assert_eq!(got, vec![("t1", Split::Train), ("t2", Split::Train), ("v1", Split::Valid)]);
    // A listed file that is missing: error names it and says how to fix.
    std::fs::remove_file(d.join("x.valid.jsonl")).unwrap();
    let e = load_corpus(&[d.to_path_buf()]).unwrap_err().to_string();
    assert!(e.contains("x.valid.jsonl") && e.contains("masa fetch corpus"), "{e}");
}

/// The real thing: downloads the Debian packages and builds the default corpus under
/// `$MASA_HOME/corpus/default` (set MASA_HOME to a scratch dir). Run with
/// `MASA_HOME=/tmp/masa-corpus cargo test --release --test corpus -- --ignored --nocapture`.
#[test]
#[ignore]
fn fetch_default_corpus_for_real() {
    let t = std::time::Instant::now();
    let dir: PathBuf = fetch_default_corpus(true).unwrap();
    let first = t.elapsed().as_secs_f64();
    let m = read_manifest(&dir.join("manifest.json")).unwrap();
    println!("fresh build: {first:.1} s (manifest says {:.1} s)", m.build_seconds);
    for d in &m.domains {
        println!(
            "{:<10} train {:>6} docs {:>9} B | valid {:>5} docs {:>8} B | units {}/{} | {:?}",
            d.name, d.train.docs, d.train.bytes, d.valid.docs, d.valid.bytes, d.units_used, d.units_available, d.bytes_per_source
        );
        assert!(d.train.docs > 0 && d.valid.docs > 0, "{}", d.name);
    }
    let t = std::time::Instant::now();
    fetch_default_corpus(true).unwrap();
    println!("second call: {:.3} s", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let c = load_corpus(&[dir]).unwrap();
    println!("load: {} docs in {:.2} s", c.len(), t.elapsed().as_secs_f64());
    assert_eq!(c.domains().len(), 7);
}
