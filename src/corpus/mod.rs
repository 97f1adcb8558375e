//! Text corpora for calibration and pre-training.
//!
//! Three parts:
//!
//! 1. [`fetch_default_corpus`]: builds the default multi-domain corpus from Debian packages
//!    (`docs/assets.md`, "Text corpora") under `masa_home()/corpus/default/`: one JSONL file per
//!    domain and split plus a `manifest.json` saying which packages (versions, sha256) and caps
//!    produced it.
//! 2. [`load_corpus`]: reads that directory, or user text (`.txt`, `.jsonl`, directories of them)
//!    into a [`Corpus`] of labelled documents, each assigned to train or valid by [`split_of`].
//! 3. [`token_stream`] and [`domain_sequences`]: deterministic, lazily tokenized token streams for
//!    training (seeded document shuffle, EOS between documents, fixed-length sequences) and fixed
//!    per-domain sequences for validation.
//!
//! Manual check of the real fetch (downloads ~130 MB of .deb files, not run by `cargo test`):
//! `MASA_HOME=/tmp/masa-corpus cargo test --release --test corpus -- --ignored --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fetch::sha256_file;

use crate::error::{IoContext, MasaError, Result};
use crate::rng::SplitMix64;

mod debian;
mod parsers;
mod stream;
mod tokens;

use crate::home::{masa_home, write_atomic};
pub use debian::*;
pub use parsers::*;
pub use stream::*;
pub use tokens::*;

/// Version of the default corpus layout and extraction rules; bump when the output changes.
pub const FORMAT_VERSION: u32 = 1;
/// Default cap on the text bytes of each domain of the default corpus (keeps it balanced and
/// quick to build: 7 domains, about 50 MB in all).
pub const DEFAULT_DOMAIN_CAP: u64 = 8_000_000;
/// Documents longer than this are cut into parts at paragraph (else line) boundaries.
pub const DEFAULT_MAX_DOC_BYTES: usize = 64 * 1024;
/// Fraction of documents in the valid split, in units of 1/10000.
pub const VALID_PER_10K: u64 = 200;
/// The split rule, in words; also recorded in the manifest.
pub const SPLIT_RULE: &str = "valid iff u64::from_be_bytes(sha256(utf8 text)[0..8]) % 10000 < 200 \
(2%), decided per document from its text alone; if a domain with >= 2 documents would get no \
valid document, its document with the smallest such hash value goes to valid";

// ---------------------------------------------------------------------------------------------
// Documents and corpora
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Split {
    type Err = MasaError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "valid" | "validation" => Ok(Split::Valid),
            _ => Err(MasaError::Invalid(format!("unknown split `{s}`: expected `train` or `valid`"))),
        }
    }
}

/// One document: a unit of text that is never cut by the train/valid split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub text: String,
    pub domain: String,
    /// Where it came from (`package:path#key`, or `file:line` for user JSONL).
    pub source: String,
    pub split: Split,
}

/// Per-domain document and byte counts of one split.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub docs: u64,
    pub bytes: u64,
}

/// A set of labelled documents.
#[derive(Clone, Debug, Default)]
pub struct Corpus {
    pub docs: Vec<Document>,
    /// The files and directories it was read from.
    pub origins: Vec<PathBuf>,
}

impl Corpus {
    /// sha256 of what a run reads: every document's domain, split and text, in order. Caches
    /// key on it, so an edited corpus, or another file behind the same path, is another corpus.
    pub fn content_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for d in &self.docs {
            h.update(format!("{}\0{}\0{}\0", d.domain, d.split, d.text.len()).as_bytes());
            h.update(d.text.as_bytes());
        }
        crate::fetch::hex(&h.finalize())
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }
    /// Domain names, sorted.
    pub fn domains(&self) -> Vec<String> {
        self.docs.iter().map(|d| d.domain.clone()).collect::<BTreeSet<_>>().into_iter().collect()
    }
    /// Documents of one split (and domain, if given), in corpus order.
    pub fn iter<'a>(&'a self, split: Split, domain: Option<&'a str>) -> impl Iterator<Item = &'a Document> + 'a {
        self.docs.iter().filter(move |d| d.split == split && domain.map_or(true, |x| d.domain == x))
    }
    /// `(domain, split) -> counts`.
    pub fn counts(&self) -> BTreeMap<(String, Split), SplitCounts> {
        let mut m: BTreeMap<(String, Split), SplitCounts> = BTreeMap::new();
        for d in &self.docs {
            let c = m.entry((d.domain.clone(), d.split)).or_default();
            c.docs += 1;
            c.bytes += d.text.len() as u64;
        }
        m
    }
    /// Build a corpus from `(text, domain, source)` triples, assigning splits with
    /// [`assign_splits`].
    pub fn from_texts(items: impl IntoIterator<Item = (String, String, String)>) -> Corpus {
        let mut docs: Vec<Document> =
            items.into_iter().map(|(text, domain, source)| Document { text, domain, source, split: Split::Train }).collect();
        assign_splits(&mut docs);
        Corpus { docs, origins: Vec::new() }
    }
}

/// The 64-bit split hash of a document: the first 8 bytes of sha256(text), big-endian.
pub fn split_hash(text: &str) -> u64 {
    let h = Sha256::digest(text.as_bytes());
    u64::from_be_bytes(h[..8].try_into().unwrap())
}

/// The split of a document by its text alone (see [`SPLIT_RULE`]).
pub fn split_of(text: &str) -> Split {
    if split_hash(text) % 10_000 < VALID_PER_10K {
        Split::Valid
    } else {
        Split::Train
    }
}

/// Assign every document its split by [`split_of`]; then, in every domain with at least two
/// documents and no valid one, move the document with the smallest split hash to valid.
pub fn assign_splits(docs: &mut [Document]) {
    let mut best: BTreeMap<String, (bool, u64, usize)> = BTreeMap::new(); // has_valid, min hash, index
    let mut n: BTreeMap<String, usize> = BTreeMap::new();
    for (i, d) in docs.iter_mut().enumerate() {
        let h = split_hash(&d.text);
        d.split = if h % 10_000 < VALID_PER_10K { Split::Valid } else { Split::Train };
        *n.entry(d.domain.clone()).or_default() += 1;
        let e = best.entry(d.domain.clone()).or_insert((false, u64::MAX, i));
        e.0 |= d.split == Split::Valid;
        if h < e.1 {
            e.1 = h;
            e.2 = i;
        }
    }
    for (dom, (has_valid, _, i)) in best {
        if !has_valid && n[&dom] >= 2 {
            docs[i].split = Split::Valid;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading user corpora and the default corpus
// ---------------------------------------------------------------------------------------------

/// `masa_home()/corpus/default`.
pub fn default_corpus_dir() -> PathBuf {
    masa_home().join("corpus").join("default")
}

#[derive(Deserialize)]
struct JsonlLine {
    text: Option<serde_json::Value>,
    domain: Option<serde_json::Value>,
    source: Option<serde_json::Value>,
}

/// Load documents from each path of `spec`:
/// - a `.txt` file: one document, domain = file stem;
/// - a `.jsonl` file: one document per non-blank line, `{"text": ..., "domain": ...}`, `text`
///   required, `domain` optional (default: the file stem);
/// - a directory holding a `manifest.json` (the default corpus): its JSONL files and their splits;
/// - any other directory: all `.txt` (domain = the name of the directory holding the file) and
///   `.jsonl` files below it, recursively, in sorted order.
///
/// Invalid UTF-8 is replaced (lossy). Splits of user documents follow [`assign_splits`], applied
/// to all user documents together; the default corpus keeps the split of its files.
pub fn load_corpus(spec: &[PathBuf]) -> Result<Corpus> {
    if spec.is_empty() {
        return Err(MasaError::Invalid(
            "no corpus given: pass a .txt or .jsonl file or a directory of them, or run `masa fetch corpus` \
             for the default corpus"
                .into(),
        ));
    }
    let mut fixed: Vec<Document> = Vec::new(); // from manifests: split already decided
    let mut user: Vec<Document> = Vec::new();
    for p in spec {
        let meta = std::fs::metadata(p).at(p)?;
        if meta.is_dir() {
            if p.join("manifest.json").is_file() {
                fixed.extend(load_default_dir(p)?);
            } else {
                let mut files = Vec::new();
                walk_dir(p, &mut files)?;
                for f in files {
                    let rel = f.strip_prefix(p).unwrap_or(&f).to_string_lossy().into_owned();
                    match ext_of(&f).as_str() {
                        "txt" => {
                            let dom = f
                                .parent()
                                .and_then(|d| d.file_name())
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_else(|| "text".into());
                            user.extend(load_txt(&f, dom, rel)?);
                        }
                        "jsonl" => user.extend(load_jsonl(&f, &rel)?),
                        _ => {}
                    }
                }
            }
        } else {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match ext_of(p).as_str() {
                "txt" => user.extend(load_txt(p, stem_of(p), name)?),
                "jsonl" => user.extend(load_jsonl(p, &name)?),
                _ => {
                    return Err(MasaError::unsupported(
                        p,
                        "corpus file",
                        "expected a .txt file, a .jsonl file (one {\"text\": ...} per line), a directory of \
                         them, or the default corpus directory",
                    ))
                }
            }
        }
    }
    assign_splits(&mut user);
    let mut docs = fixed;
    docs.extend(user);
    if docs.is_empty() {
        let list: Vec<String> = spec.iter().map(|p| p.display().to_string()).collect();
        return Err(MasaError::Invalid(format!(
            "empty corpus: no non-blank document in {}; give .txt files, .jsonl files with a `text` field, \
             or directories holding them",
            list.join(", ")
        )));
    }
    Ok(Corpus { docs, origins: spec.to_vec() })
}

fn ext_of(p: &Path) -> String {
    p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

fn stem_of(p: &Path) -> String {
    p.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "text".into())
}

/// The `.txt` and `.jsonl` files below `dir`, in sorted order, each once: a directory or file
/// reached again through a symbolic link (a loop like `loop -> .`, or two links to one file)
/// is read the first time only.
fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    walk_dir_once(dir, out, &mut seen)
}

fn walk_dir_once(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut std::collections::HashSet<PathBuf>) -> Result<()> {
    if !seen.insert(dir.canonicalize().at(dir)?) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).at(dir)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>().at(dir)?;
    entries.sort();
    for e in entries {
        let name = e.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if e.is_dir() {
            walk_dir_once(&e, out, seen)?;
        } else if matches!(ext_of(&e).as_str(), "txt" | "jsonl") && e.canonicalize().map_or(true, |c| seen.insert(c)) {
            out.push(e);
        }
    }
    Ok(())
}

fn load_txt(path: &Path, domain: String, source: String) -> Result<Vec<Document>> {
    let bytes = std::fs::read(path).at(path)?;
    let text = normalize_text(&String::from_utf8_lossy(&bytes));
    if text.trim().is_empty() {
        return Ok(vec![]);
    }
    Ok(vec![Document { text, domain, source, split: Split::Train }])
}

fn load_jsonl(path: &Path, name: &str) -> Result<Vec<Document>> {
    let default_domain = stem_of(path);
    let f = std::fs::File::open(path).at(path)?;
    let mut r = std::io::BufReader::new(f);
    let mut docs = Vec::new();
    let mut buf = Vec::new();
    let mut lineno = 0usize;
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf).at(path)?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let line = String::from_utf8_lossy(&buf);
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{lineno}", path.display());
        let v: JsonlLine = serde_json::from_str(&line)
            .map_err(|e| MasaError::bad_file(&at, format!("not a JSON object ({e}); each line must be {{\"text\": \"...\"}}")))?;
        let text = match v.text {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(MasaError::field(&at, "text", "must be a string")),
            None => return Err(MasaError::field(&at, "text", "missing; every line needs {\"text\": \"...\"} (optional \"domain\")")),
        };
        let domain = match v.domain {
            None | Some(serde_json::Value::Null) => default_domain.clone(),
            Some(serde_json::Value::String(s)) if !s.is_empty() => s,
            Some(_) => return Err(MasaError::field(&at, "domain", "must be a non-empty string")),
        };
        let source = match v.source {
            Some(serde_json::Value::String(s)) => s,
            _ => format!("{name}:{lineno}"),
        };
        let text = normalize_text(&text);
        if text.trim().is_empty() {
            continue;
        }
        docs.push(Document { text, domain, source, split: Split::Train });
    }
    Ok(docs)
}

fn load_default_dir(dir: &Path) -> Result<Vec<Document>> {
    let mpath = dir.join("manifest.json");
    let manifest = read_manifest(&mpath)?;
    let mut docs = Vec::new();
    for d in &manifest.domains {
        for (split, file) in [(Split::Train, &d.train_file), (Split::Valid, &d.valid_file)] {
            let p = dir.join(file);
            let f = std::fs::File::open(&p).map_err(|e| {
                MasaError::bad_file(&p, format!("listed in {} but unreadable ({e}); rebuild it with `masa fetch corpus`", mpath.display()))
            })?;
            let mut r = std::io::BufReader::new(f);
            let mut buf = Vec::new();
            let mut lineno = 0usize;
            loop {
                buf.clear();
                if r.read_until(b'\n', &mut buf).at(&p)? == 0 {
                    break;
                }
                lineno += 1;
                let line = String::from_utf8_lossy(&buf);
                if line.trim().is_empty() {
                    continue;
                }
                let at = format!("{}:{lineno}", p.display());
                let v: CorpusLine = serde_json::from_str(&line)
                    .map_err(|e| MasaError::bad_file(&at, format!("bad corpus line ({e}); rebuild with `masa fetch corpus`")))?;
                docs.push(Document { text: v.text, domain: v.domain, source: v.source, split });
            }
        }
    }
    Ok(docs)
}

/// Read and check a default-corpus manifest.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let bytes = std::fs::read(path).at(path)?;
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| MasaError::bad_file(path, format!("not a masa corpus manifest ({e}); rebuild with `masa fetch corpus`")))?;
    Ok(m)
}

/// Newlines to `\n`, NULs removed.
fn normalize_text(s: &str) -> String {
    let s = if s.contains('\r') { s.replace("\r\n", "\n").replace('\r', "\n") } else { s.to_string() };
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s
    }
}

/// The corpus a command was given: user paths, or the default corpus (built on first use).
/// Returns the corpus and a one-line description for provenance records.
pub fn resolve_corpus(spec: &[PathBuf]) -> Result<(Corpus, String)> {
    if spec.is_empty() {
        let dir = fetch_default_corpus(true)?;
        let corpus = load_corpus(&[dir.clone()])?;
        return Ok((corpus, format!("default corpus ({})", dir.display())));
    }
    let corpus = load_corpus(spec)?;
    let desc = spec.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Ok((corpus, desc))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with a symbolic-link loop (`loop -> .`) and a second link to one file is
    /// read once, not once per path.
    #[test]
    fn symlink_loops_and_doubled_links_read_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("c");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("a.txt"), "first document").unwrap();
        std::fs::write(d.join("b.txt"), "second document").unwrap();
        let plain = load_corpus(&[d.clone()]).unwrap().len();
        std::os::unix::fs::symlink(".", d.join("loop")).unwrap();
        std::os::unix::fs::symlink(d.join("a.txt"), d.join("again.txt")).unwrap();
        assert_eq!(load_corpus(&[d]).unwrap().len(), plain);
    }

    /// The content key follows the documents, not where they were read from.
    #[test]
    fn content_hash_follows_the_documents() {
        let c = |items: &[(&str, &str)]| {
            Corpus::from_texts(items.iter().map(|(t, d)| (t.to_string(), d.to_string(), "x".to_string()))).content_hash()
        };
        let a = c(&[("one document", "web"), ("another one", "code")]);
        assert_eq!(a, c(&[("one document", "web"), ("another one", "code")]));
        assert_ne!(a, c(&[("one document", "web"), ("another onE", "code")]));
        assert_ne!(a, c(&[("one document", "web"), ("another one", "prose")]));
        assert_ne!(a, c(&[("one document", "web")]));
    }

    #[test]
    fn dictd_numbers() {
        assert_eq!(dictd_b64("A"), Some(0));
        assert_eq!(dictd_b64("BA"), Some(64));
        assert_eq!(dictd_b64("5I"), Some(57 * 64 + 8));
        assert_eq!(dictd_b64("*"), None);
    }

    #[test]
    fn dictd_entries_by_index() {
        let data = b"00-database-short\n   x\nApple\n   A fruit. {Pome}\n   [1913 Webster]\nBee\n   An insect.\n";
        let s = std::str::from_utf8(data).unwrap();
        let a = s.find("Apple").unwrap() as u64;
        let b = s.find("Bee").unwrap() as u64;
        let enc = |mut v: u64| {
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut d = vec![];
            loop {
                d.push(A[(v % 64) as usize] as char);
                v /= 64;
                if v == 0 {
                    break;
                }
            }
            d.iter().rev().collect::<String>()
        };
        let index = format!(
            "00-database-short\tA\t{}\napple\t{}\t{}\nApple\t{}\t{}\nBee\t{}\t{}\n",
            enc(22),
            enc(a),
            enc(b - a),
            enc(a),
            enc(b - a),
            enc(b),
            enc(data.len() as u64 - b)
        );
        let e = parse_dictd(&index, data);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, "apple");
        assert_eq!(clean_dict_entry(&e[0].1), "Apple\nA fruit. Pome\n");
        assert_eq!(e[1].1, "Bee\n   An insect.\n");
    }

    #[test]
    fn wordnet_line() {
        let l = "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 | a member of the genus Canis; \"the dog barked all night\"  ";
        let (id, t) = parse_wordnet_line(l).unwrap();
        assert_eq!(id, "noun:02084071");
        assert_eq!(t, "dog, domestic dog, Canis familiaris (noun): a member of the genus Canis; \"the dog barked all night\"");
        let a = "00001740 00 a 01 able(p) 0 005 | (usually followed by `to') having the necessary means";
        assert!(parse_wordnet_line(a).unwrap().1.starts_with("able (adjective): "));
        assert!(parse_wordnet_line("  1 This software and database").is_none());
    }

    #[test]
    fn bible_chapters() {
        let t = "Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus.\n1Sm3:4 That the LORD called Samuel.\n";
        let c = parse_bible(t);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0], ("Genesis 1".to_string(), "Genesis 1\n\n1 In the beginning.\n2 And the earth.\n".to_string()));
        assert_eq!(c[2].0, "1 Samuel 3");
    }

    #[test]
    fn fortunes_split() {
        assert_eq!(parse_fortunes("a\nb\n%\n%\nc\n%\n"), vec!["a\nb\n".to_string(), "c\n".to_string()]);
    }

    #[test]
    fn info_nodes() {
        let long = "word ".repeat(30);
        let t = format!(
            "This is x.info\n\u{1f}\nFile: x.info,  Node: Top,  Next: A,  Up: (dir)\n\n{long}\n* Menu:\n\n* A::\n\u{1f}\nFile: x.info,  Node: Concept Index\n\n{long}\n\u{1f}\nTag Table:\n"
        );
        let n = parse_info(&t);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].0, "Top");
        assert!(!n[0].1.contains("Menu"));
    }

    #[test]
    fn pod_cleanup() {
        let p =
            "=head1 NAME\n\nperlfoo - B<bold> and C<< $a->b >> with L<perlfunc/open> and L<the docs|perldoc> E<lt>x E<gt> X<idx>\n\n=cut\n";
        assert_eq!(clean_pod(p), "NAME\n\nperlfoo - bold and $a->b with perlfunc/open and the docs <x > \n\n");
    }

    #[test]
    fn rst_cleanup() {
        let r = ".. SPDX-License-Identifier: GPL-2.0\n\n.. _label:\n\nTitle\n=====\n\nUse :func:`open` and :ref:`the guide <guide>` or ``x = 1``.\n\n.. toctree::\n   :maxdepth: 2\n\n   a\n\nEnd\n";
        let c = tidy(&clean_rst(r));
        assert_eq!(c, "Title\n\nUse open and the guide or x = 1.\n\nEnd");
    }

    #[test]
    fn jargon_entries() {
        let t = "Glossary\n\n   0\n\n   /dev/null\n\n   :goat file:\n\n   A sacrificial file used to test a computer virus, i.e. a dummy\n   executable that carries a sample of the {virus}.\n\n   :gobble: vt.\n\n   1. To consume, usu.: used with up. The output spy gobbles characters.\n";
        let e = parse_jargon(t);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].0, "goat file");
        assert!(e[0].1.starts_with(":goat file:\n\nA sacrificial"));
        assert!(e[0].1.contains("of the virus."));
    }

    #[test]
    fn long_docs_split_at_paragraphs() {
        let p = "x".repeat(40);
        let text = format!("{p}\n\n{p}\n\n{p}");
        let parts = split_long(&text, 90);
        assert_eq!(parts, vec![format!("{p}\n\n{p}"), p.clone()]);
        let one = "é".repeat(50); // 100 bytes, one line
        let parts = split_long(&one, 33);
        assert!(parts.iter().all(|s| s.len() <= 33));
        assert_eq!(parts.concat(), one);
    }

    #[test]
    fn generated_code_detected_without_panicking_on_utf8() {
        let mut s = "x".repeat(2047);
        s.push('行');
        assert!(!is_generated(&s));
        assert!(is_generated("// Code generated by mkerrors.sh; DO NOT EDIT.\npackage unix\n"));
    }

    #[test]
    fn tidy_collapses_blank_lines() {
        assert_eq!(tidy("\n\na  \n\n\n\nb\nc\n\n"), "a\n\nb\nc");
    }

    #[test]
    fn shuffle_is_permutation() {
        let o = epoch_order(1000, 7, 0);
        let mut s = o.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
        assert_ne!(o, epoch_order(1000, 7, 1));
        assert_eq!(o, epoch_order(1000, 7, 0));
    }
}
