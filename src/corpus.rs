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
use crate::home::{masa_home, write_atomic};

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
        let mut docs: Vec<Document> = items
            .into_iter()
            .map(|(text, domain, source)| Document { text, domain, source, split: Split::Train })
            .collect();
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

fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .at(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .at(dir)?;
    entries.sort();
    for e in entries {
        let name = e.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if e.is_dir() {
            walk_dir(&e, out)?;
        } else if matches!(ext_of(&e).as_str(), "txt" | "jsonl") {
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
        let v: JsonlLine = serde_json::from_str(&line).map_err(|e| {
            MasaError::bad_file(&at, format!("not a JSON object ({e}); each line must be {{\"text\": \"...\"}}"))
        })?;
        let text = match v.text {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(MasaError::field(&at, "text", "must be a string")),
            None => {
                return Err(MasaError::field(
                    &at,
                    "text",
                    "missing; every line needs {\"text\": \"...\"} (optional \"domain\")",
                ))
            }
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
                MasaError::bad_file(
                    &p,
                    format!("listed in {} but unreadable ({e}); rebuild it with `masa fetch corpus`", mpath.display()),
                )
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

// ---------------------------------------------------------------------------------------------
// Token streams
// ---------------------------------------------------------------------------------------------

/// SplitMix64: a small, fast, fully specified PRNG (Steele et al. 2014), so shuffles are
/// reproducible across platforms and crate versions.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `(0, 1]` (never 0, so `ln` is finite).
    pub fn uniform_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal pairs by Box-Muller.
    pub fn normal_pair(&mut self) -> (f64, f64) {
        let (u1, u2) = (self.uniform_open0(), self.uniform_open0());
        let rad = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        (rad * th.cos(), rad * th.sin())
    }

    /// Uniform-ish integer in `0..n` (multiply-shift; bias < n / 2^64).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// The document order of one epoch: a Fisher-Yates shuffle of `0..n` seeded by `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut mix = SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut rng = SplitMix64(mix.next_u64());
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
    v
}

/// Encoder closure type: text to token ids.
pub type Encode<'a> = &'a dyn Fn(&str) -> Result<Vec<u32>>;

/// Where a [`TokenStream`] is, so training can resume exactly (save it with a checkpoint).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub epoch: u64,
    /// Number of documents of this epoch's order started so far.
    pub next: usize,
    /// Tokens of the current document (order[next-1]), EOS included, already handed out.
    pub offset: usize,
    pub tokens_drawn: u64,
    pub drawn_per_domain: BTreeMap<String, u64>,
}

/// An endless, deterministic token stream over the documents of one split (and optionally some
/// domains): documents in a seeded shuffled order (reshuffled every epoch), each encoded when it
/// is reached, followed by `eos` if given, concatenated and cut into sequences on demand.
pub struct TokenStream<'a> {
    corpus: &'a Corpus,
    docs: Vec<usize>,
    seed: u64,
    encode: Encode<'a>,
    eos: Option<u32>,
    order: Vec<usize>,
    epoch: u64,
    next: usize,
    buf: Vec<u32>,
    pos: usize,
    cur_domain: usize,
    domain_names: Vec<String>,
    doc_domain: Vec<usize>,
    drawn: Vec<u64>,
    tokens_drawn: u64,
    empty_run: usize,
}

/// A token stream over `corpus` (see [`TokenStream`]). `domains`: restrict to these (each must
/// exist in the split); `None`: all domains.
pub fn token_stream<'a>(
    corpus: &'a Corpus,
    split: Split,
    domains: Option<&[String]>,
    seed: u64,
    encode: Encode<'a>,
    eos: Option<u32>,
) -> Result<TokenStream<'a>> {
    let present: BTreeSet<&str> = corpus.iter(split, None).map(|d| d.domain.as_str()).collect();
    if let Some(want) = domains {
        if want.is_empty() {
            return Err(MasaError::Invalid("empty domain list: name at least one domain or none for all".into()));
        }
        for w in want {
            if !present.contains(w.as_str()) {
                return Err(MasaError::Invalid(format!(
                    "domain `{w}` has no {split} documents in the corpus; domains with {split} documents: {}",
                    present.iter().copied().collect::<Vec<_>>().join(", ")
                )));
            }
        }
    }
    let keep = |d: &Document| d.split == split && domains.map_or(true, |w| w.iter().any(|x| *x == d.domain));
    let docs: Vec<usize> = (0..corpus.docs.len()).filter(|&i| keep(&corpus.docs[i])).collect();
    if docs.is_empty() {
        return Err(MasaError::Invalid(format!(
            "the corpus has no {split} documents{}",
            if domains.is_some() { " in the selected domains" } else { "" }
        )));
    }
    let domain_names: Vec<String> =
        docs.iter().map(|&i| corpus.docs[i].domain.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let doc_domain = docs
        .iter()
        .map(|&i| domain_names.binary_search(&corpus.docs[i].domain).unwrap())
        .collect();
    let order = epoch_order(docs.len(), seed, 0);
    Ok(TokenStream {
        corpus,
        seed,
        encode,
        eos,
        order,
        epoch: 0,
        next: 0,
        buf: Vec::new(),
        pos: 0,
        cur_domain: 0,
        drawn: vec![0; domain_names.len()],
        domain_names,
        doc_domain,
        docs,
        tokens_drawn: 0,
        empty_run: 0,
    })
}

impl<'a> TokenStream<'a> {
    /// Number of documents the stream draws from.
    pub fn num_docs(&self) -> usize {
        self.docs.len()
    }
    /// Current epoch (0 until every document has been read once).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Tokens handed out so far.
    pub fn tokens_drawn(&self) -> u64 {
        self.tokens_drawn
    }
    /// Tokens handed out so far per domain (EOS counted with the document it ends).
    pub fn drawn_per_domain(&self) -> BTreeMap<String, u64> {
        self.domain_names.iter().cloned().zip(self.drawn.iter().copied()).collect()
    }

    fn load_doc(&mut self, k: usize) -> Result<()> {
        let di = self.docs[self.order[k]];
        let doc = &self.corpus.docs[di];
        let mut toks = (self.encode)(&doc.text)?;
        if let Some(e) = self.eos {
            if !toks.is_empty() {
                toks.push(e);
            }
        }
        self.buf = toks;
        self.pos = 0;
        self.cur_domain = self.doc_domain[self.order[k]];
        Ok(())
    }

    fn advance(&mut self) -> Result<()> {
        if self.next == self.order.len() {
            self.epoch += 1;
            self.order = epoch_order(self.docs.len(), self.seed, self.epoch);
            self.next = 0;
        }
        self.load_doc(self.next)?;
        self.next += 1;
        if self.buf.is_empty() {
            self.empty_run += 1;
            if self.empty_run > self.docs.len() {
                return Err(MasaError::Invalid(
                    "every document of the token stream encodes to no tokens; check the tokenizer".into(),
                ));
            }
        } else {
            self.empty_run = 0;
        }
        Ok(())
    }

    /// Append the next `len` tokens of the stream to `out`.
    pub fn fill(&mut self, out: &mut Vec<u32>, len: usize) -> Result<()> {
        let mut need = len;
        while need > 0 {
            if self.pos == self.buf.len() {
                self.advance()?;
                continue;
            }
            let take = need.min(self.buf.len() - self.pos);
            out.extend_from_slice(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            need -= take;
            self.drawn[self.cur_domain] += take as u64;
            self.tokens_drawn += take as u64;
        }
        Ok(())
    }

    /// The next `len` tokens.
    pub fn next_sequence(&mut self, len: usize) -> Result<Vec<u32>> {
        let mut v = Vec::with_capacity(len);
        self.fill(&mut v, len)?;
        Ok(v)
    }

    /// `batch` consecutive sequences of `seq_len` tokens each (for next-token training, ask for
    /// `seq_len + 1` and shift).
    pub fn next_batch(&mut self, batch: usize, seq_len: usize) -> Result<Vec<Vec<u32>>> {
        (0..batch).map(|_| self.next_sequence(seq_len)).collect()
    }

    /// The position, for resuming with [`TokenStream::restore`].
    pub fn state(&self) -> StreamState {
        StreamState {
            epoch: self.epoch,
            next: self.next,
            offset: self.pos,
            tokens_drawn: self.tokens_drawn,
            drawn_per_domain: self.drawn_per_domain(),
        }
    }

    /// Continue from a saved [`StreamState`] (same corpus, split, domains and seed).
    pub fn restore(&mut self, st: &StreamState) -> Result<()> {
        if st.next > self.docs.len() {
            return Err(MasaError::Invalid(format!(
                "stream state points at document {} of an epoch of {}: it belongs to another corpus or domain selection",
                st.next,
                self.docs.len()
            )));
        }
        self.epoch = st.epoch;
        self.order = epoch_order(self.docs.len(), self.seed, self.epoch);
        self.next = st.next;
        self.buf.clear();
        self.pos = 0;
        if st.next > 0 {
            self.load_doc(st.next - 1)?;
            if st.offset > self.buf.len() {
                return Err(MasaError::Invalid(
                    "stream state offset is past its document: different corpus or tokenizer".into(),
                ));
            }
            self.pos = st.offset;
        }
        self.tokens_drawn = st.tokens_drawn;
        for (i, name) in self.domain_names.iter().enumerate() {
            self.drawn[i] = st.drawn_per_domain.get(name).copied().unwrap_or(0);
        }
        Ok(())
    }
}

/// Fixed, non-overlapping `seq_len`-token sequences of one domain and split, for validation:
/// the domain's documents in corpus order, each encoded when reached and followed by `eos` if
/// given, concatenated and cut; a final partial sequence is dropped. Finite; use `.take(n)`.
pub struct DomainSequences<'a> {
    docs: Vec<&'a Document>,
    encode: Encode<'a>,
    eos: Option<u32>,
    seq_len: usize,
    next_doc: usize,
    pending: Vec<u32>,
    failed: bool,
}

/// See [`DomainSequences`].
pub fn domain_sequences<'a>(
    corpus: &'a Corpus,
    split: Split,
    domain: &str,
    seq_len: usize,
    encode: Encode<'a>,
    eos: Option<u32>,
) -> Result<DomainSequences<'a>> {
    if seq_len == 0 {
        return Err(MasaError::Invalid("sequence length must be at least 1".into()));
    }
    let docs: Vec<&Document> = corpus.docs.iter().filter(|d| d.split == split && d.domain == domain).collect();
    if docs.is_empty() {
        return Err(MasaError::Invalid(format!(
            "domain `{domain}` has no {split} documents; domains: {}",
            corpus.domains().join(", ")
        )));
    }
    Ok(DomainSequences { docs, encode, eos, seq_len, next_doc: 0, pending: Vec::new(), failed: false })
}

impl<'a> Iterator for DomainSequences<'a> {
    type Item = Result<Vec<u32>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        while self.pending.len() < self.seq_len {
            if self.next_doc == self.docs.len() {
                return None;
            }
            let d = self.docs[self.next_doc];
            self.next_doc += 1;
            match (self.encode)(&d.text) {
                Ok(t) => {
                    let nonempty = !t.is_empty();
                    self.pending.extend(t);
                    if let (Some(e), true) = (self.eos, nonempty) {
                        self.pending.push(e);
                    }
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        let rest = self.pending.split_off(self.seq_len);
        Some(Ok(std::mem::replace(&mut self.pending, rest)))
    }
}

/// Up to `max_per_domain` validation sequences of every domain of `split` (domains whose text
/// does not fill one sequence are left out).
pub fn validation_sequences(
    corpus: &Corpus,
    split: Split,
    seq_len: usize,
    max_per_domain: usize,
    encode: Encode<'_>,
    eos: Option<u32>,
) -> Result<BTreeMap<String, Vec<Vec<u32>>>> {
    let mut out = BTreeMap::new();
    let doms: BTreeSet<&str> = corpus.iter(split, None).map(|d| d.domain.as_str()).collect();
    for dom in doms {
        let seqs: Vec<Vec<u32>> =
            domain_sequences(corpus, split, dom, seq_len, encode, eos)?.take(max_per_domain).collect::<Result<_>>()?;
        if !seqs.is_empty() {
            out.insert(dom.to_string(), seqs);
        }
    }
    Ok(out)
}

/// Tokens per domain of one split (encodes every document: slow on large corpora).
pub fn count_tokens(corpus: &Corpus, split: Split, encode: Encode<'_>, eos: Option<u32>) -> Result<BTreeMap<String, u64>> {
    let mut m = BTreeMap::new();
    for d in corpus.iter(split, None) {
        let n = encode(&d.text)?.len() as u64;
        *m.entry(d.domain.clone()).or_insert(0) += n + if n > 0 && eos.is_some() { 1 } else { 0 };
    }
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// The default corpus: manifest
// ---------------------------------------------------------------------------------------------

/// One line of a default-corpus JSONL file.
#[derive(Serialize, Deserialize)]
pub struct CorpusLine {
    pub text: String,
    pub domain: String,
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub deb_file: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    pub name: String,
    pub packages: Vec<String>,
    pub cap_bytes: u64,
    pub train_file: String,
    pub valid_file: String,
    pub train: SplitCounts,
    pub valid: SplitCounts,
    /// Candidate units (entries, files, info nodes) found and used before the cap.
    pub units_available: u64,
    pub units_used: u64,
    /// Approximate raw bytes of all candidate units (file sizes for file units).
    pub bytes_available: u64,
    /// Bytes taken per package (or source group).
    pub bytes_per_source: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_by: String,
    pub split_rule: String,
    pub selection_rule: String,
    pub max_doc_bytes: usize,
    pub packages: Vec<PackageInfo>,
    pub domains: Vec<DomainInfo>,
    pub build_seconds: f64,
}

/// Options of the default corpus build.
#[derive(Clone, Debug, PartialEq)]
pub struct CorpusOptions {
    /// Cap on each domain's text bytes.
    pub domain_cap: u64,
    /// Per-domain overrides of `domain_cap`.
    pub domain_caps: BTreeMap<String, u64>,
    pub max_doc_bytes: usize,
    /// Output directory (default: [`default_corpus_dir`]).
    pub out_dir: Option<PathBuf>,
    /// Keep the extracted package trees under `masa_home()/downloads/deb/extract/` (default:
    /// removed after the build; the .deb files are always kept).
    pub keep_extracted: bool,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions {
            domain_cap: DEFAULT_DOMAIN_CAP,
            domain_caps: BTreeMap::new(),
            max_doc_bytes: DEFAULT_MAX_DOC_BYTES,
            out_dir: None,
            keep_extracted: false,
        }
    }
}

impl CorpusOptions {
    pub fn cap(&self, domain: &str) -> u64 {
        self.domain_caps.get(domain).copied().unwrap_or(self.domain_cap)
    }
}

const SELECTION_RULE: &str = "per domain, each source's units (dictionary entries, synsets, chapters, fortunes, \
info nodes, files) are ordered by sha256(\"domain/unit id\"); units are taken from the source with the fewest \
bytes taken so far until the domain reaches its cap; units longer than max_doc_bytes are cut at paragraph \
boundaries into parts";

/// The domains of the default corpus and the Debian packages each is built from.
pub const DEFAULT_DOMAINS: &[(&str, &[&str])] = &[
    ("dictionary", &["dict-gcide"]),
    ("glosses", &["wordnet-base"]),
    ("computing", &["dict-foldoc", "jargon-text", "dict-devil"]),
    ("literature", &["bible-kjv", "bible-kjv-text"]),
    ("quotes", &["fortunes"]),
    ("technical", &["linux-doc-6.1", "python3.11-doc", "perl-doc", "gnu-standards", "maxima-doc"]),
    ("code", &["rust-src", "golang-1.19-src"]),
];

// ---------------------------------------------------------------------------------------------
// The default corpus: build
// ---------------------------------------------------------------------------------------------

/// Build the default corpus with default options under [`default_corpus_dir`], or return at
/// once if it is already there (same format version and caps). Returns the directory.
pub fn fetch_default_corpus(progress: bool) -> Result<PathBuf> {
    fetch_corpus(&CorpusOptions::default(), progress)
}

fn manifest_matches(dir: &Path, opts: &CorpusOptions) -> bool {
    let Ok(m) = read_manifest(&dir.join("manifest.json")) else { return false };
    m.format_version == FORMAT_VERSION
        && m.max_doc_bytes == opts.max_doc_bytes
        && m.domains.len() == DEFAULT_DOMAINS.len()
        && m.domains.iter().all(|d| {
            d.cap_bytes == opts.cap(&d.name) && dir.join(&d.train_file).is_file() && dir.join(&d.valid_file).is_file()
        })
}

/// Build the default corpus with `opts` (see [`fetch_default_corpus`]).
pub fn fetch_corpus(opts: &CorpusOptions, progress: bool) -> Result<PathBuf> {
    let out = opts.out_dir.clone().unwrap_or_else(default_corpus_dir);
    if manifest_matches(&out, opts) {
        if progress {
            eprintln!("corpus: {} is up to date (format {FORMAT_VERSION}); nothing to do", out.display());
        }
        return Ok(out);
    }
    let t0 = Instant::now();
    let say = |s: String| {
        if progress {
            eprintln!("corpus: {s}");
        }
    };
    say(format!("building the default corpus in {} from Debian packages", out.display()));
    let deb_dir = masa_home().join("downloads").join("deb");
    std::fs::create_dir_all(&deb_dir).at(&deb_dir)?;
    let extract_root = deb_dir.join("extract");

    let all_pkgs: Vec<&str> = DEFAULT_DOMAINS.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let bar = if progress {
        let b = indicatif::ProgressBar::new(all_pkgs.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("corpus: {prefix} [{bar:30}] {pos}/{len} {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        b.set_prefix("packages");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut apt = Apt { dir: deb_dir.clone(), updated: false };
    let mut packages = Vec::new();
    let mut roots: BTreeMap<String, PathBuf> = BTreeMap::new();
    for p in &all_pkgs {
        bar.set_message(format!("{p}: download"));
        let info = apt.download(p)?;
        bar.set_message(format!("{p}: extract"));
        let root = extract_root.join(p);
        extract_deb(&deb_dir.join(&info.deb_file), &root)?;
        roots.insert(p.to_string(), root);
        packages.push(info);
        bar.inc(1);
    }
    bar.finish_and_clear();
    say(format!("{} packages downloaded and extracted in {:.1} s", packages.len(), t0.elapsed().as_secs_f64()));

    // Stage into a temp directory beside the output, then swap it in.
    let parent = out.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).at(&parent)?;
    let stage = parent.join(format!(".{}.building.{}", out.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    if stage.exists() {
        std::fs::remove_dir_all(&stage).at(&stage)?;
    }
    std::fs::create_dir_all(&stage).at(&stage)?;

    let mut domains = Vec::new();
    for (dom, pkgs) in DEFAULT_DOMAINS {
        let cap = opts.cap(dom);
        let t = Instant::now();
        let sources = domain_sources(dom, &roots)?;
        let info = build_domain(dom, pkgs, sources, cap, opts.max_doc_bytes, &stage)?;
        say(format!(
            "{dom:<10} {:>6} train docs {:>10} B, {:>4} valid docs {:>8} B ({:.1} s)",
            info.train.docs,
            info.train.bytes,
            info.valid.docs,
            info.valid.bytes,
            t.elapsed().as_secs_f64()
        ));
        domains.push(info);
    }
    if !opts.keep_extracted {
        std::fs::remove_dir_all(&extract_root).at(&extract_root)?;
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        created_by: format!("masa {}", env!("CARGO_PKG_VERSION")),
        split_rule: SPLIT_RULE.into(),
        selection_rule: SELECTION_RULE.into(),
        max_doc_bytes: opts.max_doc_bytes,
        packages,
        domains,
        build_seconds: t0.elapsed().as_secs_f64(),
    };
    let mjson = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    write_atomic(&stage.join("manifest.json"), &mjson)?;
    // Swap: old out (if any) aside, stage in, old removed.
    if out.exists() {
        let old = parent.join(format!(".{}.old.{}", out.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
        std::fs::rename(&out, &old).at(&out)?;
        std::fs::rename(&stage, &out).at(&out)?;
        std::fs::remove_dir_all(&old).at(&old)?;
    } else {
        std::fs::rename(&stage, &out).at(&out)?;
    }
    say(format!("done in {:.1} s: {}", t0.elapsed().as_secs_f64(), out.display()));
    Ok(out)
}

struct Apt {
    dir: PathBuf,
    updated: bool,
}

fn apt_missing(prog: &str, pkg: &str) -> MasaError {
    MasaError::Fetch {
        asset: "default corpus".into(),
        msg: format!(
            "`{prog}` not found (Debian package `{pkg}`): masa builds its default corpus from Debian packages and \
             needs a Debian-like system with apt-get and dpkg-deb; elsewhere give your own text with --corpus \
             FILE|DIR (.txt or .jsonl)"
        ),
    }
}

fn run_cmd(cmd: &mut Command, prog: &str, prog_pkg: &str) -> Result<std::process::Output> {
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            apt_missing(prog, prog_pkg)
        } else {
            MasaError::Fetch { asset: "default corpus".into(), msg: format!("running `{prog}`: {e}") }
        }
    })
}

fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.trim();
    let start = s.len().saturating_sub(600);
    let start = (start..=s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
    s[start..].to_string()
}

impl Apt {
    fn update(&mut self, pkg: &str) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        self.updated = true;
        eprintln!("corpus: `apt-get download {pkg}` failed; running `apt-get update` and retrying");
        let o = run_cmd(Command::new("apt-get").arg("update"), "apt-get", "apt")?;
        if !o.status.success() {
            return Err(MasaError::Fetch {
                asset: format!("Debian package {pkg}"),
                msg: format!(
                    "`apt-get update` failed (run it as root, e.g. `sudo apt-get update`, then retry): {}",
                    tail(&o.stderr)
                ),
            });
        }
        Ok(())
    }

    /// `apt-get download --print-uris`: (file name, size, sha256).
    fn uri(&mut self, pkg: &str) -> Result<(String, u64, String)> {
        // apt-get prints nothing for a file already in its working directory: ask from an
        // empty one.
        let qdir = self.dir.join(".query");
        std::fs::create_dir_all(&qdir).at(&qdir)?;
        for attempt in 0..2 {
            let o = run_cmd(
                Command::new("apt-get").args(["download", "--print-uris", pkg]).current_dir(&qdir),
                "apt-get",
                "apt",
            )?;
            let out = String::from_utf8_lossy(&o.stdout);
            let line = out.lines().find(|l| l.starts_with('\''));
            if o.status.success() {
                if let Some(l) = line {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    if f.len() >= 4 {
                        let sha = f[3].strip_prefix("SHA256:").unwrap_or("").to_ascii_lowercase();
                        let size = f[2].parse().unwrap_or(0);
                        return Ok((f[1].to_string(), size, sha));
                    }
                }
            }
            if attempt == 0 && !self.updated {
                self.update(pkg)?;
                continue;
            }
            return Err(MasaError::Fetch {
                asset: format!("Debian package {pkg}"),
                msg: format!(
                    "apt-get cannot locate it (check /etc/apt/sources.list has Debian 12 `bookworm` main): {}",
                    tail(&o.stderr)
                ),
            });
        }
        unreachable!()
    }

    fn download(&mut self, pkg: &str) -> Result<PackageInfo> {
        for attempt in 0..2 {
            let (file, size, sha) = self.uri(pkg)?;
            let path = self.dir.join(&file);
            if path.is_file() && (sha.is_empty() || sha256_file(&path)? == sha) {
                return self.info(pkg, &file, size);
            }
            let o = run_cmd(
                Command::new("apt-get").args(["download", pkg]).current_dir(&self.dir),
                "apt-get",
                "apt",
            )?;
            if o.status.success() && path.is_file() {
                let got = sha256_file(&path)?;
                if sha.is_empty() || got == sha {
                    return self.info(pkg, &file, size);
                }
                let _ = std::fs::remove_file(&path);
                return Err(MasaError::Fetch {
                    asset: format!("Debian package {pkg}"),
                    msg: format!("{}: sha256 {got} but apt expects {sha}; removed it, retry", path.display()),
                });
            }
            if attempt == 0 && !self.updated {
                self.update(pkg)?;
                continue;
            }
            return Err(MasaError::Fetch {
                asset: format!("Debian package {pkg}"),
                msg: format!("`apt-get download {pkg}` failed: {}", tail(&o.stderr)),
            });
        }
        unreachable!()
    }

    fn info(&self, pkg: &str, file: &str, size: u64) -> Result<PackageInfo> {
        let path = self.dir.join(file);
        let o = run_cmd(Command::new("dpkg-deb").args(["-f"]).arg(&path).arg("Version"), "dpkg-deb", "dpkg")?;
        let version = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !o.status.success() || version.is_empty() {
            return Err(MasaError::bad_file(&path, format!("not a readable .deb ({}); delete it and retry", tail(&o.stderr))));
        }
        let size = if size > 0 { size } else { std::fs::metadata(&path).at(&path)?.len() };
        Ok(PackageInfo { name: pkg.into(), version, deb_file: file.into(), size, sha256: sha256_file(&path)? })
    }
}


fn extract_deb(deb: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).at(dest)?;
    }
    std::fs::create_dir_all(dest).at(dest)?;
    let o = run_cmd(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest), "dpkg-deb", "dpkg")?;
    if !o.status.success() {
        return Err(MasaError::bad_file(
            deb,
            format!("`dpkg-deb -x` failed ({}); delete the file and retry", tail(&o.stderr)),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Selection of documents within a domain
// ---------------------------------------------------------------------------------------------

/// How a file unit is cleaned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Rst,
    Pod,
    Code,
}

enum Payload {
    Text(String),
    File(PathBuf, Format),
}

/// A candidate unit of a domain: loaded into one or more documents when selected.
struct Unit {
    id: String,
    payload: Payload,
}

struct Source {
    name: String,
    units: Vec<Unit>,
}

fn unit_text(u: &Unit) -> Result<Option<String>> {
    match &u.payload {
        Payload::Text(t) => Ok(Some(t.clone())),
        Payload::File(p, fmt) => {
            let bytes = std::fs::read(p).at(p)?;
            let raw = normalize_text(&String::from_utf8_lossy(&bytes));
            Ok(match fmt {
                Format::Rst => Some(clean_rst(&raw)),
                Format::Pod => Some(clean_pod(&raw)),
                Format::Code => {
                    if is_generated(&raw) {
                        None
                    } else {
                        Some(raw)
                    }
                }
            })
        }
    }
}

fn unit_size(u: &Unit) -> u64 {
    match &u.payload {
        Payload::Text(t) => t.len() as u64,
        Payload::File(p, _) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
    }
}

fn build_domain(
    dom: &str,
    pkgs: &[&str],
    mut sources: Vec<Source>,
    cap: u64,
    max_doc: usize,
    stage: &Path,
) -> Result<DomainInfo> {
    let mut units_available = 0u64;
    let mut bytes_available = 0u64;
    for s in &mut sources {
        s.units.sort_by_cached_key(|u| (split_hash(&format!("{dom}/{}", u.id)), u.id.clone()));
        units_available += s.units.len() as u64;
        bytes_available += s.units.iter().map(unit_size).sum::<u64>();
    }
    let mut taken = vec![0u64; sources.len()];
    let mut cursor = vec![0usize; sources.len()];
    let mut docs: Vec<Document> = Vec::new();
    let mut total = 0u64;
    let mut units_used = 0u64;
    while total < cap {
        let pick = (0..sources.len()).filter(|&i| cursor[i] < sources[i].units.len()).min_by_key(|&i| (taken[i], i));
        let Some(i) = pick else { break };
        let u = &sources[i].units[cursor[i]];
        cursor[i] += 1;
        let Some(text) = unit_text(u)? else { continue };
        let text = tidy(&text);
        if text.is_empty() {
            continue;
        }
        units_used += 1;
        let parts = split_long(&text, max_doc);
        let np = parts.len();
        for (k, part) in parts.into_iter().enumerate() {
            if total >= cap {
                break;
            }
            let source = if np > 1 { format!("{}#part{}", u.id, k + 1) } else { u.id.clone() };
            total += part.len() as u64;
            taken[i] += part.len() as u64;
            docs.push(Document { text: part, domain: dom.to_string(), source, split: Split::Train });
        }
    }
    if docs.is_empty() {
        return Err(MasaError::Fetch {
            asset: format!("corpus domain {dom}"),
            msg: format!("no text found in packages {}: their layout may have changed", pkgs.join(", ")),
        });
    }
    assign_splits(&mut docs);
    let train_file = format!("{dom}.train.jsonl");
    let valid_file = format!("{dom}.valid.jsonl");
    let mut counts = [SplitCounts::default(), SplitCounts::default()];
    let mut bufs = [Vec::new(), Vec::new()];
    for d in &docs {
        let k = (d.split == Split::Valid) as usize;
        counts[k].docs += 1;
        counts[k].bytes += d.text.len() as u64;
        let line = CorpusLine { text: d.text.clone(), domain: d.domain.clone(), source: d.source.clone() };
        serde_json::to_writer(&mut bufs[k], &line).expect("json line");
        bufs[k].push(b'\n');
    }
    write_atomic(&stage.join(&train_file), &bufs[0])?;
    write_atomic(&stage.join(&valid_file), &bufs[1])?;
    let [train, valid] = counts;
    Ok(DomainInfo {
        name: dom.to_string(),
        packages: pkgs.iter().map(|s| s.to_string()).collect(),
        cap_bytes: cap,
        train_file,
        valid_file,
        train,
        valid,
        units_available,
        units_used,
        bytes_available,
        bytes_per_source: sources.iter().zip(&taken).map(|(s, &t)| (s.name.clone(), t)).collect(),
    })
}

/// Cut `text` into parts of at most `max` bytes at paragraph boundaries, else line boundaries,
/// else character boundaries.
pub fn split_long(text: &str, max: usize) -> Vec<String> {
    if text.len() <= max || max == 0 {
        return vec![text.to_string()];
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        let t = cur.trim_matches('\n');
        if !t.trim().is_empty() {
            out.push(t.to_string());
        }
        cur.clear();
    };
    for para in text.split_inclusive("\n\n") {
        if cur.len() + para.len() <= max {
            cur.push_str(para);
            continue;
        }
        flush(&mut cur, &mut out);
        if para.len() <= max {
            cur.push_str(para);
            continue;
        }
        for line in para.split_inclusive('\n') {
            if cur.len() + line.len() > max {
                flush(&mut cur, &mut out);
            }
            if line.len() <= max {
                cur.push_str(line);
            } else {
                let mut rest = line;
                while !rest.is_empty() {
                    let mut cut = rest.len().min(max);
                    while !rest.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    if cut == 0 {
                        cut = rest.chars().next().map(|c| c.len_utf8()).unwrap_or(rest.len());
                    }
                    cur.push_str(&rest[..cut]);
                    flush(&mut cur, &mut out);
                    rest = &rest[cut..];
                }
            }
        }
    }
    flush(&mut cur, &mut out);
    out
}

/// Trailing spaces off every line, runs of blank lines to one, outer blank lines off.
fn tidy(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.lines() {
        let l = line.trim_end();
        if l.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(l);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Sources: one function per package layout
// ---------------------------------------------------------------------------------------------

fn domain_sources(dom: &str, roots: &BTreeMap<String, PathBuf>) -> Result<Vec<Source>> {
    let r = |p: &str| roots.get(p).cloned().expect("package extracted");
    Ok(match dom {
        "dictionary" => vec![dictd_source("dict-gcide", &r("dict-gcide").join("usr/share/dictd/gcide"))?],
        "glosses" => vec![wordnet_source(&r("wordnet-base"))?],
        "computing" => vec![
            dictd_source("dict-foldoc", &r("dict-foldoc").join("usr/share/dictd/foldoc"))?,
            jargon_source(&r("jargon-text"))?,
            dictd_source("dict-devil", &r("dict-devil").join("usr/share/dictd/devil"))?,
        ],
        "literature" => vec![bible_source(&r("bible-kjv"), &r("bible-kjv-text"))?],
        "quotes" => vec![fortunes_source(&r("fortunes"))?],
        "technical" => vec![
            files_source(
                "linux-doc-6.1",
                &r("linux-doc-6.1").join("usr/share/doc/linux-doc-6.1/html/_sources"),
                &|p| p.ends_with(".rst.txt"),
                Format::Rst,
            )?,
            files_source(
                "python3.11-doc",
                &r("python3.11-doc").join("usr/share/doc/python3.11/html/_sources"),
                &|p| p.ends_with(".rst.txt"),
                Format::Rst,
            )?,
            files_source("perl-doc", &r("perl-doc").join("usr/share/perl"), &|p| p.ends_with(".pod"), Format::Pod)?,
            info_source("gnu-standards", &r("gnu-standards").join("usr/share/info"))?,
            info_source("maxima-doc", &r("maxima-doc").join("usr/share/info"))?,
        ],
        "code" => vec![
            files_source(
                "rust-src",
                &find_rust_library(&r("rust-src"))?,
                &|p| p.ends_with(".rs"),
                Format::Code,
            )?,
            files_source(
                "golang-1.19-src",
                &r("golang-1.19-src").join("usr/share/go-1.19/src"),
                &|p| p.ends_with(".go") && !p.ends_with("_test.go") && !p.contains("/testdata/") && !p.starts_with("testdata/"),
                Format::Code,
            )?,
        ],
        _ => unreachable!("unknown default domain {dom}"),
    })
}

fn layout_error(pkg: &str, path: &Path, what: &str) -> MasaError {
    MasaError::Fetch {
        asset: format!("Debian package {pkg}"),
        msg: format!("{}: {what}; the package layout differs from Debian 12's (see docs/assets.md)", path.display()),
    }
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).at(path)?;
    let mut d = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
    let mut v = Vec::new();
    d.read_to_end(&mut v).map_err(|e| MasaError::bad_file(path, format!("not valid gzip: {e}")))?;
    Ok(v)
}

/// Decode a dictd index number (base64 digits, most significant first).
pub fn dictd_b64(s: &str) -> Option<u64> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut v: u64 = 0;
    for c in s.bytes() {
        let d = A.iter().position(|&a| a == c)? as u64;
        v = v.checked_mul(64)?.checked_add(d)?;
    }
    Some(v)
}

/// Entries of a dictd database: `(headword, text)`, one per distinct (offset, length) of the
/// index, in file order, without the `00-database-*` metadata entries.
pub fn parse_dictd(index: &str, data: &[u8]) -> Vec<(String, String)> {
    let mut seen = BTreeMap::new();
    for line in index.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 3 {
            continue;
        }
        let hw = f[0];
        if hw.starts_with("00-database") || hw.starts_with("00database") || hw.starts_with("00-") {
            continue;
        }
        let (Some(off), Some(len)) = (dictd_b64(f[1]), dictd_b64(f[2])) else { continue };
        seen.entry((off, len)).or_insert_with(|| hw.to_string());
    }
    let mut out = Vec::new();
    for ((off, len), hw) in seen {
        let (a, b) = (off as usize, (off + len) as usize);
        if b > data.len() || a >= b {
            continue;
        }
        out.push((hw, String::from_utf8_lossy(&data[a..b]).into_owned()));
    }
    out
}

/// Clean a dictd entry: `{cross refs}` to plain words, source tags on their own line
/// (`[1913 Webster]`, `[WordNet 1.5]`, `[PJC]`) dropped, the 3-space body indent removed.
pub fn clean_dict_entry(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') && t.len() <= 32 && !t[1..].contains('[') {
            continue;
        }
        let l = line.strip_prefix("   ").unwrap_or(line);
        out.extend(l.chars().filter(|&c| c != '{' && c != '}'));
        out.push('\n');
    }
    out
}

fn dictd_source(pkg: &str, base: &Path) -> Result<Source> {
    let ipath = base.with_extension("index");
    let dpath = base.with_extension("dict.dz");
    if !ipath.is_file() || !dpath.is_file() {
        return Err(layout_error(pkg, &dpath, "dictd files not found"));
    }
    let index = String::from_utf8_lossy(&std::fs::read(&ipath).at(&ipath)?).into_owned();
    let data = read_gz(&dpath)?;
    let units = parse_dictd(&index, &data)
        .into_iter()
        .map(|(hw, text)| Unit { id: format!("{pkg}:{hw}"), payload: Payload::Text(clean_dict_entry(&text)) })
        .collect();
    Ok(Source { name: pkg.into(), units })
}

/// Entries of the Jargon File text: chapters and appendix sections (column-0 headings) and
/// lexicon entries (`   :word: ...`), without list-only blocks (table of contents, glossary index).
pub fn parse_jargon(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut cur: Option<(String, String)> = None;
    let mut push = |cur: &mut Option<(String, String)>| {
        if let Some((k, body)) = cur.take() {
            let lines: Vec<&str> = body.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            let avg = if lines.is_empty() { 0 } else { lines.iter().map(|l| l.len()).sum::<usize>() / lines.len() };
            if lines.len() >= 2 && avg >= 30 {
                out.push((k, body));
            }
        }
    };
    for line in text.lines() {
        let first = line.chars().next();
        let heading = matches!(first, Some(c) if !c.is_whitespace() && !"│├┌└┬┴┼─═".contains(c));
        let entry = line.starts_with("   :") && line[4..].contains(':');
        if heading || entry {
            push(&mut cur);
            let key = if entry {
                let rest = &line[4..];
                rest[..rest.find(':').unwrap()].to_string()
            } else {
                line.trim().to_string()
            };
            cur = Some((key, String::new()));
        }
        if let Some((_, body)) = cur.as_mut() {
            body.push_str(line.strip_prefix("   ").unwrap_or(line));
            body.push('\n');
        }
    }
    push(&mut cur);
    out.into_iter().map(|(k, b)| (k, b.chars().filter(|&c| c != '{' && c != '}').collect())).collect()
}

fn jargon_source(root: &Path) -> Result<Source> {
    let p = root.join("usr/share/doc/jargon-text/jargon.txt.gz");
    if !p.is_file() {
        return Err(layout_error("jargon-text", &p, "jargon.txt.gz not found"));
    }
    let text = normalize_text(&String::from_utf8_lossy(&read_gz(&p)?));
    let mut n: BTreeMap<String, usize> = BTreeMap::new();
    let units = parse_jargon(&text)
        .into_iter()
        .map(|(k, b)| {
            let c = n.entry(k.clone()).or_default();
            *c += 1;
            let id = if *c > 1 { format!("jargon-text:{k}#{c}") } else { format!("jargon-text:{k}") };
            Unit { id, payload: Payload::Text(b) }
        })
        .collect();
    Ok(Source { name: "jargon-text".into(), units })
}

/// One WordNet `data.*` line as `(synset id, "words (pos): gloss")`; `None` for header lines.
pub fn parse_wordnet_line(line: &str) -> Option<(String, String)> {
    if line.starts_with(' ') {
        return None;
    }
    let (head, gloss) = line.split_once(" | ")?;
    let f: Vec<&str> = head.split_whitespace().collect();
    if f.len() < 4 {
        return None;
    }
    let pos = match f[2] {
        "n" => "noun",
        "v" => "verb",
        "a" | "s" => "adjective",
        "r" => "adverb",
        _ => return None,
    };
    let w_cnt = usize::from_str_radix(f[3], 16).ok()?;
    let mut words = Vec::new();
    for k in 0..w_cnt {
        let w = f.get(4 + 2 * k)?;
        let w = match w.find('(') {
            Some(i) if w.ends_with(')') => &w[..i],
            _ => w,
        };
        words.push(w.replace('_', " "));
    }
    Some((format!("{}:{}", pos, f[0]), format!("{} ({pos}): {}", words.join(", "), gloss.trim())))
}

fn wordnet_source(root: &Path) -> Result<Source> {
    let dir = root.join("usr/share/wordnet");
    let mut units = Vec::new();
    for pos in ["noun", "verb", "adj", "adv"] {
        let p = dir.join(format!("data.{pos}"));
        if !p.is_file() {
            return Err(layout_error("wordnet-base", &p, "WordNet data file not found"));
        }
        let text = String::from_utf8_lossy(&std::fs::read(&p).at(&p)?).into_owned();
        for line in text.lines() {
            if let Some((id, t)) = parse_wordnet_line(line) {
                units.push(Unit { id: format!("wordnet-base:{id}"), payload: Payload::Text(t) });
            }
        }
    }
    Ok(Source { name: "wordnet-base".into(), units })
}

const BIBLE_BOOKS: &[(&str, &str)] = &[
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"), ("Deu", "Deuteronomy"),
    ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"), ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"),
    ("1Ki", "1 Kings"), ("2Ki", "2 Kings"), ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"), ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"), ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"), ("Hos", "Hosea"), ("Joel", "Joel"),
    ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nahum", "Nahum"),
    ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"), ("Mal", "Malachi"),
    ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"), ("Gal", "Galatians"), ("Eph", "Ephesians"),
    ("Phi", "Philippians"), ("Col", "Colossians"), ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"),
    ("1Tim", "1 Timothy"), ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"), ("2Jn", "2 John"),
    ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
];

/// Chapters of the output of `bible -f`: lines `Ge1:1 In the beginning ...` grouped into
/// `("Genesis 1", "Genesis 1\n\n1 In the beginning ...\n2 ...")`.
pub fn parse_bible(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let Some((refr, verse_text)) = line.split_once(' ') else { continue };
        let Some((bc, verse)) = refr.split_once(':') else { continue };
        let digits = bc.len() - bc.bytes().rev().take_while(u8::is_ascii_digit).count();
        let (book, chap) = bc.split_at(digits);
        if book.is_empty() || chap.is_empty() || verse.is_empty() {
            continue;
        }
        let name = BIBLE_BOOKS.iter().find(|(a, _)| *a == book).map(|(_, n)| *n).unwrap_or(book);
        let key = format!("{name} {chap}");
        if out.last().map_or(true, |(k, _)| *k != key) {
            out.push((key.clone(), format!("{key}\n\n")));
        }
        let body = &mut out.last_mut().unwrap().1;
        body.push_str(verse);
        body.push(' ');
        body.push_str(verse_text.trim());
        body.push('\n');
    }
    out
}

fn bible_source(prog_root: &Path, text_root: &Path) -> Result<Source> {
    let prog = prog_root.join("usr/bin/bible");
    let data = text_root.join("usr/lib");
    if !prog.is_file() || !data.join("bible.data").is_file() {
        return Err(layout_error("bible-kjv", &prog, "bible program or bible.data not found"));
    }
    let o = Command::new(&prog)
        .arg("-p")
        .arg(&data)
        .args(["-f", "gen1:1-rev22:21"])
        .output()
        .map_err(|e| MasaError::Fetch { asset: "Debian package bible-kjv".into(), msg: format!("running {}: {e}", prog.display()) })?;
    if !o.status.success() {
        return Err(MasaError::Fetch {
            asset: "Debian package bible-kjv".into(),
            msg: format!("{} failed: {}", prog.display(), tail(&o.stderr)),
        });
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let units: Vec<Unit> = parse_bible(&text)
        .into_iter()
        .map(|(k, b)| Unit { id: format!("bible-kjv:{k}"), payload: Payload::Text(b) })
        .collect();
    if units.len() < 1000 {
        return Err(MasaError::Fetch {
            asset: "Debian package bible-kjv".into(),
            msg: format!("{} printed only {} chapters (expected 1189)", prog.display(), units.len()),
        });
    }
    Ok(Source { name: "bible-kjv".into(), units })
}

/// Fortunes of a `%`-separated fortune file.
pub fn parse_fortunes(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim_end() == "%" {
            if !cur.trim().is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

fn fortunes_source(root: &Path) -> Result<Source> {
    let dir = root.join("usr/share/games/fortunes");
    if !dir.is_dir() {
        return Err(layout_error("fortunes", &dir, "fortunes directory not found"));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .at(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_none() && std::fs::symlink_metadata(p).map(|m| m.is_file()).unwrap_or(false))
        .collect();
    files.sort();
    let mut units = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = normalize_text(&String::from_utf8_lossy(&std::fs::read(&f).at(&f)?));
        for (i, t) in parse_fortunes(&text).into_iter().enumerate() {
            units.push(Unit { id: format!("fortunes:{name}#{}", i + 1), payload: Payload::Text(t) });
        }
    }
    Ok(Source { name: "fortunes".into(), units })
}

fn files_source(pkg: &str, dir: &Path, keep: &dyn Fn(&str) -> bool, fmt: Format) -> Result<Source> {
    if !dir.is_dir() {
        return Err(layout_error(pkg, dir, "directory not found"));
    }
    let mut files = Vec::new();
    collect_files(dir, dir, keep, &mut files)?;
    let units = files
        .into_iter()
        .filter(|(_, p)| std::fs::metadata(p).map(|m| m.len() <= MAX_SOURCE_FILE).unwrap_or(false))
        .map(|(rel, p)| Unit { id: format!("{pkg}:{rel}"), payload: Payload::File(p, fmt) })
        .collect();
    Ok(Source { name: pkg.into(), units })
}

/// Files above this size (mostly generated tables) are left out of file-based sources.
const MAX_SOURCE_FILE: u64 = 256 * 1024;

fn collect_files(root: &Path, dir: &Path, keep: &dyn Fn(&str) -> bool, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).at(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for e in entries {
        let Ok(m) = std::fs::symlink_metadata(&e) else { continue };
        if m.is_dir() {
            collect_files(root, &e, keep, out)?;
        } else if m.is_file() {
            let rel = e.strip_prefix(root).unwrap_or(&e).to_string_lossy().replace('\\', "/");
            if keep(&rel) {
                out.push((rel, e));
            }
        }
    }
    Ok(())
}

fn find_rust_library(root: &Path) -> Result<PathBuf> {
    let src = root.join("usr/src");
    if let Ok(rd) = std::fs::read_dir(&src) {
        let mut c: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path().join("library"))).filter(|p| p.is_dir()).collect();
        c.sort();
        if let Some(p) = c.pop() {
            return Ok(p);
        }
    }
    Err(layout_error("rust-src", &src, "no rustc-*/library directory"))
}

/// Machine-generated source (header says so): left out of the code domain.
fn is_generated(src: &str) -> bool {
    let mut end = src.len().min(2048);
    while !src.is_char_boundary(end) {
        end -= 1;
    }
    let head = &src[..end];
    head.contains("DO NOT EDIT") || head.contains("@generated") || head.contains("automatically generated")
}

/// Nodes of a GNU info file: `(node name, text)`, without the preamble, tag tables and index nodes.
pub fn parse_info(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for part in text.split('\u{1f}') {
        let part = part.trim_start_matches(['\n', '\u{c}']);
        let Some((first, body)) = part.split_once('\n') else { continue };
        if !first.starts_with("File:") {
            continue;
        }
        let node = first
            .split(',')
            .find_map(|f| f.trim().strip_prefix("Node:"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        if node.is_empty() || node.contains("Index") {
            continue;
        }
        let body: String = body.lines().filter(|l| l.trim() != "* Menu:").collect::<Vec<_>>().join("\n");
        let body = body.replace("\0\u{8}[", "").replace("\0\u{8}]", "");
        let prose = body.lines().filter(|l| !l.starts_with("* ")).map(str::trim).collect::<String>();
        if prose.len() < 100 {
            continue;
        }
        out.push((node, body));
    }
    out
}

fn info_source(pkg: &str, dir: &Path) -> Result<Source> {
    if !dir.is_dir() {
        return Err(layout_error(pkg, dir, "info directory not found"));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".gz"))
        .collect();
    files.sort();
    let mut units = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().trim_end_matches(".gz").to_string();
        let text = normalize_text(&String::from_utf8_lossy(&read_gz(&f)?));
        for (node, body) in parse_info(&text) {
            units.push(Unit { id: format!("{pkg}:{name}#{node}"), payload: Payload::Text(body) });
        }
    }
    if units.is_empty() {
        return Err(layout_error(pkg, dir, "no info nodes found"));
    }
    Ok(Source { name: pkg.into(), units })
}

/// Light reStructuredText cleanup: roles `:x:`text <t>`` to `text`, ``` ``lit`` ``` to `lit`,
/// labels, comments-only directives (`.. _x:`, `.. SPDX`, `.. index::`, toctree options) and
/// heading under/overlines dropped.
pub fn clean_rst(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_drop_directive = false;
    for line in s.lines() {
        let t = line.trim();
        if in_drop_directive {
            // The directive's block: its options and content, indented, blank lines between.
            if t.is_empty() || line.starts_with(' ') || line.starts_with('\t') {
                continue;
            }
            in_drop_directive = false;
        }
        if let Some(d) = t.strip_prefix(".. ") {
            let drop_block = ["toctree::", "index::", "highlight::", "include::", "kernel-doc::", "only::", "raw::", "tabularcolumns::", "SPDX", "sectionauthor::", "moduleauthor::", "versionchanged::", "versionadded::"]
                .iter()
                .any(|x| d.starts_with(x));
            if drop_block {
                in_drop_directive = true;
                continue;
            }
            if d.starts_with('_') && d.ends_with(':') {
                continue;
            }
        }
        if t.len() >= 3 {
            let c = t.chars().next().unwrap();
            if "=-~^*#+\"'`:.".contains(c) && t.chars().all(|x| x == c) {
                continue;
            }
        }
        out.push_str(&strip_rst_inline(line));
        out.push('\n');
    }
    out
}

fn strip_rst_inline(line: &str) -> String {
    let mut s = line.replace("``", "");
    // :role:`text <target>` and :role:`text`
    let mut out = String::with_capacity(s.len());
    loop {
        let Some(i) = find_role(&s) else {
            out.push_str(&s);
            break;
        };
        let (pre, rest) = s.split_at(i.0);
        out.push_str(pre);
        let inner_start = i.1;
        let Some(end) = rest[inner_start..].find('`') else {
            out.push_str(rest);
            break;
        };
        let inner = &rest[inner_start..inner_start + end];
        let shown = match (inner.rfind(" <"), inner.ends_with('>')) {
            (Some(k), true) => &inner[..k],
            _ => inner.trim_start_matches(['~', '!']),
        };
        out.push_str(shown);
        s = rest[inner_start + end + 1..].to_string();
    }
    out
}

/// Position of the next `:role:`` ` in `s`: (start of role, offset after the backtick relative
/// to start).
fn find_role(s: &str) -> Option<(usize, usize)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b':' {
            let mut j = i + 1;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'-' || b[j] == b'_' || b[j] == b':') {
                j += 1;
            }
            if j < b.len() && j > i + 2 && b[j] == b'`' && b[j - 1] == b':' {
                return Some((i, j + 1 - i));
            }
        }
        i += 1;
    }
    None
}

/// POD to plain text: `=head1 X` to `X`, `=item X` to `X`, other commands dropped, formatting
/// codes (`B<..>`, `C<< .. >>`, `L<text|target>`, `E<lt>`, `X<..>`) resolved.
pub fn clean_pod(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut skip_block = false;
    for line in s.lines() {
        if let Some(cmd) = line.strip_prefix('=') {
            let (name, arg) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
            match name {
                "begin" => skip_block = true,
                "end" => skip_block = false,
                n if n.starts_with("head") || n == "item" => {
                    out.push_str(&pod_inline(arg.trim()));
                    out.push('\n');
                }
                _ => {}
            }
            continue;
        }
        if skip_block {
            continue;
        }
        out.push_str(&pod_inline(line));
        out.push('\n');
    }
    out
}

fn pod_inline(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::new();
    pod_span(&c, &mut 0, &mut out, None);
    out
}

/// Parse POD text from `*i` until the closing delimiter (`None`: end of input; `Some(n)`: `n`
/// `>`s, preceded by a space when n > 1).
fn pod_span(c: &[char], i: &mut usize, out: &mut String, close: Option<usize>) {
    while *i < c.len() {
        if let Some(n) = close {
            if n == 1 && c[*i] == '>' {
                *i += 1;
                return;
            }
            if n > 1 && c[*i].is_whitespace() && c.len() >= *i + 1 + n && c[*i + 1..*i + 1 + n].iter().all(|&x| x == '>') {
                *i += 1 + n;
                return;
            }
        }
        let ch = c[*i];
        if ch.is_ascii_uppercase() && *i + 1 < c.len() && c[*i + 1] == '<' {
            let code = ch;
            let mut j = *i + 1;
            let mut n = 0;
            while j < c.len() && c[j] == '<' {
                n += 1;
                j += 1;
            }
            let n = if n > 1 && j < c.len() && c[j].is_whitespace() {
                j += 1;
                n
            } else if n > 1 {
                // `X<<` without a space: one `<` opens, the others are text.
                j = *i + 2;
                1
            } else {
                1
            };
            *i = j;
            let mut inner = String::new();
            pod_span(c, i, &mut inner, Some(n));
            match code {
                'X' | 'Z' => {}
                'E' => out.push_str(match inner.as_str() {
                    "lt" => "<",
                    "gt" => ">",
                    "sol" => "/",
                    "verbar" => "|",
                    "quot" => "\"",
                    "amp" => "&",
                    "apos" => "'",
                    _ => "",
                }),
                'L' => {
                    let shown = match inner.split_once('|') {
                        Some((text, _)) => text.to_string(),
                        None => inner.trim_matches('"').to_string(),
                    };
                    out.push_str(&shown);
                }
                _ => out.push_str(&inner),
            }
            continue;
        }
        out.push(ch);
        *i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let p = "=head1 NAME\n\nperlfoo - B<bold> and C<< $a->b >> with L<perlfunc/open> and L<the docs|perldoc> E<lt>x E<gt> X<idx>\n\n=cut\n";
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

    #[test]
    fn splitmix_reference_values() {
        // Reference output of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220A8397B1DCDAF);
        assert_eq!(r.next_u64(), 0x6E789E6AA1B965F4);
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
