//! The training split tokenized once and cached, and the sampler that cuts it into independent
//! training sequences.
//!
//! [`TokenSplit`]: every document of one split, in corpus order, encoded and followed by EOS,
//! concatenated into one flat token file (`tokens.bin`: uint16 when every id fits, else uint32,
//! little endian, as nanoGPT's `train.bin`) plus `manifest.json` (document starts and domains,
//! the tokenizer fingerprint, the token file's size and sha256). Cached under
//! `$MASA_HOME/tokens/<key>/`, where the key hashes the documents' text and the tokenizer, so a
//! changed corpus or tokenizer gets its own entry, and a truncated or altered token file is
//! detected (size, sha256) and rebuilt.
//!
//! [`ChunkSampler`]: the training sequences. Epoch `e` cuts the split into non-overlapping
//! chunks of `len` tokens, starting at a seeded offset in `[0, len)`, and hands them out in a
//! seeded random order (as HF `run_clm`'s grouped-then-shuffled blocks): the sequences of a
//! batch come from independent places of the corpus (many documents and domains), every token is
//! seen once per epoch, and the state is two integers, so a resumed run continues bit-identically.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{epoch_order, Corpus, Split};
use crate::error::{IoContext, MasaError, Result};
use crate::home::{tmp_path, write_atomic};
use crate::rng::SplitMix64;
use crate::source::tokenizer::Tokenizer;

/// Version of the token-file layout; part of the cache key.
const TOKENS_FORMAT: u32 = 1;

/// `manifest.json` of a tokenized split.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenManifest {
    pub format: u32,
    pub key: String,
    /// sha256 of the tokenizer definition and its BOS/EOS facts ([`Tokenizer::fingerprint`]).
    pub tokenizer: String,
    pub split: Split,
    /// The id appended after every non-empty document, if the tokenizer has one.
    pub eos: Option<u32>,
    /// `uint16` or `uint32`, little endian.
    pub dtype: String,
    pub tokens: u64,
    /// sha256 of `tokens.bin`.
    pub sha256: String,
    pub domains: Vec<String>,
    /// `(first token, domain index)` of every non-empty document, in file order.
    pub documents: Vec<(u64, u32)>,
}

/// Append `ids` to `buf` as little-endian uint32 (`wide`) or uint16: the token-file encoding.
pub fn push_tokens(buf: &mut Vec<u8>, ids: &[u32], wide: bool) {
    for &x in ids {
        if wide {
            buf.extend_from_slice(&x.to_le_bytes());
        } else {
            buf.extend_from_slice(&(x as u16).to_le_bytes());
        }
    }
}

/// One split of a corpus as one flat, memory-mapped token array (see the module docs).
pub struct TokenSplit {
    pub manifest: TokenManifest,
    pub dir: PathBuf,
    map: memmap2::Mmap,
    wide: bool,
}

/// The cache key of `split` of `corpus` under `tok`: sha256 over the layout version, the
/// tokenizer fingerprint and every document's domain and text, in corpus order.
fn cache_key(corpus: &Corpus, split: Split, tok: &Tokenizer) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("masa-tokens {TOKENS_FORMAT} {split} {}\n", tok.fingerprint()?).as_bytes());
    for d in corpus.iter(split, None) {
        h.update((d.domain.len() as u64).to_le_bytes());
        h.update(d.domain.as_bytes());
        h.update((d.text.len() as u64).to_le_bytes());
        h.update(d.text.as_bytes());
    }
    Ok(crate::fetch::hex(&h.finalize()[..12]))
}

impl TokenSplit {
    /// The tokenized `split` of `corpus`, from the cache under `root` (default
    /// `$MASA_HOME/tokens`) or built there (documents encoded in parallel) if missing, stale or
    /// corrupt.
    pub fn open(corpus: &Corpus, split: Split, tok: &Tokenizer, root: Option<&Path>, progress: bool) -> Result<TokenSplit> {
        let key = cache_key(corpus, split, tok)?;
        let root = root.map(Path::to_path_buf).unwrap_or_else(|| crate::home::masa_home().join("tokens"));
        let dir = root.join(&key);
        match Self::read(&dir, &key) {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => {}
            Err(e) => eprintln!("warning: rebuilding the token cache: {e}"),
        }
        Self::build(corpus, split, tok, &dir, &key, progress)?;
        Self::read(&dir, &key)?.ok_or_else(|| MasaError::bad_file(&dir, "token cache vanished right after it was written"))
    }

    /// A complete cache entry, `None` if there is none, an error if it is damaged.
    fn read(dir: &Path, key: &str) -> Result<Option<TokenSplit>> {
        let mp = dir.join("manifest.json");
        if !mp.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&mp).at(&mp)?;
        let manifest: TokenManifest =
            serde_json::from_slice(&bytes).map_err(|e| MasaError::bad_file(&mp, format!("not a masa token manifest: {e}")))?;
        if manifest.format != TOKENS_FORMAT || manifest.key != key {
            return Err(MasaError::bad_file(&mp, "written for another format or key"));
        }
        let wide = match manifest.dtype.as_str() {
            "uint16" => false,
            "uint32" => true,
            other => return Err(MasaError::field(&mp, "dtype", format!("`{other}`: expected uint16 or uint32"))),
        };
        let tp = dir.join("tokens.bin");
        let file = std::fs::File::open(&tp).at(&tp)?;
        let want = manifest.tokens * if wide { 4 } else { 2 };
        let len = file.metadata().at(&tp)?.len();
        if len != want {
            return Err(MasaError::bad_file(&tp, format!("{len} bytes, the manifest says {want}: truncated or replaced")));
        }
        // SAFETY: the cache file is only ever replaced by rename, never written in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.at(&tp)?;
        let sha = crate::fetch::hex(&Sha256::digest(&map[..]));
        if sha != manifest.sha256 {
            return Err(MasaError::bad_file(&tp, "sha256 differs from the manifest: the file was altered"));
        }
        let bad_doc = manifest.documents.windows(2).any(|w| w[0].0 >= w[1].0)
            || manifest.documents.iter().any(|d| d.0 >= manifest.tokens || d.1 as usize >= manifest.domains.len())
            || manifest.documents.first().is_some_and(|d| d.0 != 0);
        if bad_doc {
            return Err(MasaError::field(&mp, "documents", "starts must be increasing from 0 and name listed domains"));
        }
        Ok(Some(TokenSplit { manifest, dir: dir.to_path_buf(), map, wide }))
    }

    fn build(corpus: &Corpus, split: Split, tok: &Tokenizer, dir: &Path, key: &str, progress: bool) -> Result<()> {
        let docs: Vec<_> = corpus.iter(split, None).collect();
        if docs.is_empty() {
            return Err(MasaError::Invalid(format!("the corpus has no {split} documents")));
        }
        let domains = corpus.domains();
        let bar = if progress {
            crate::progress::count_bar(docs.len() as u64, &format!("tokenize {split} split"), "docs")
        } else {
            indicatif::ProgressBar::hidden()
        };
        let eos = tok.eos_id();
        let encoded: Vec<Vec<u32>> = docs
            .par_iter()
            .map(|d| {
                let mut t = tok.encode(&d.text, false)?;
                if let (Some(e), false) = (eos, t.is_empty()) {
                    t.push(e);
                }
                bar.inc(1);
                Ok(t)
            })
            .collect::<Result<_>>()?;
        bar.finish_and_clear();
        let wide = encoded.iter().flatten().any(|&x| x > u16::MAX as u32);
        std::fs::create_dir_all(dir).at(dir)?;
        let tp = dir.join("tokens.bin");
        let tmp = tmp_path(&tp);
        let mut sha = Sha256::new();
        let mut documents = Vec::new();
        let mut n = 0u64;
        let written = (|| -> Result<()> {
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).at(&tmp)?);
            let mut buf = Vec::new();
            for (d, t) in docs.iter().zip(&encoded) {
                if t.is_empty() {
                    continue;
                }
                documents.push((n, domains.binary_search(&d.domain).unwrap_or(0) as u32));
                n += t.len() as u64;
                buf.clear();
                push_tokens(&mut buf, t, wide);
                sha.update(&buf);
                w.write_all(&buf).at(&tmp)?;
            }
            w.into_inner().map_err(|e| MasaError::bad_file(&tmp, e.to_string()))?.sync_all().at(&tmp)?;
            std::fs::rename(&tmp, &tp).at(&tp)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if n == 0 {
            return Err(MasaError::Invalid(format!("every {split} document encodes to no tokens; check the tokenizer")));
        }
        let manifest = TokenManifest {
            format: TOKENS_FORMAT,
            key: key.to_string(),
            tokenizer: tok.fingerprint()?,
            split,
            eos,
            dtype: if wide { "uint32" } else { "uint16" }.into(),
            tokens: n,
            sha256: crate::fetch::hex(&sha.finalize()),
            domains,
            documents,
        };
        let mj = serde_json::to_vec(&manifest).map_err(|e| MasaError::Invalid(e.to_string()))?;
        write_atomic(&dir.join("manifest.json"), &mj)
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.manifest.tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.tokens == 0
    }

    /// Append tokens `start..start + len` to `out`.
    pub fn copy_to(&self, start: usize, len: usize, out: &mut Vec<u32>) {
        if self.wide {
            out.extend(self.map[start * 4..(start + len) * 4].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        } else {
            out.extend(self.map[start * 2..(start + len) * 2].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32));
        }
    }

    /// Add the tokens `start..start + len` to their documents' domains in `per_domain`.
    fn count_domains(&self, start: u64, len: u64, per_domain: &mut [u64]) {
        let docs = &self.manifest.documents;
        let mut i = docs.partition_point(|d| d.0 <= start).saturating_sub(1);
        let end = start + len;
        let mut pos = start;
        while pos < end {
            let doc_end = docs.get(i + 1).map_or(self.manifest.tokens, |d| d.0).min(end);
            per_domain[docs[i].1 as usize] += doc_end - pos;
            pos = doc_end;
            i += 1;
        }
    }
}

/// Where a [`ChunkSampler`] is, so training can resume exactly (saved with a checkpoint).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    /// Chunks of this epoch's order handed out so far.
    pub next: u64,
    /// Tokens in the split the state belongs to (a resume on another corpus is refused).
    pub split_tokens: u64,
    pub tokens_drawn: u64,
    pub drawn_per_domain: BTreeMap<String, u64>,
}

/// Shuffled non-overlapping chunks of a [`TokenSplit`], reshuffled (and re-cut at a new seeded
/// offset) every epoch; see the module docs.
pub struct ChunkSampler<'a> {
    split: &'a TokenSplit,
    len: usize,
    seed: u64,
    epoch: u64,
    shift: usize,
    order: Vec<usize>,
    next: usize,
    drawn: Vec<u64>,
    tokens_drawn: u64,
}

/// The offset at which epoch `epoch` starts cutting chunks of `len` from `n` tokens.
fn epoch_shift(n: usize, len: usize, seed: u64, epoch: u64) -> usize {
    let mut rng = SplitMix64(seed ^ 0x5EED_C4A7_0FF5_E7A1 ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.below(len.min(n - len + 1))
}

impl<'a> ChunkSampler<'a> {
    /// Chunks of `len` tokens (for next-token training, `seq_len + 1`) of `split`, seeded.
    pub fn new(split: &'a TokenSplit, len: usize, seed: u64) -> Result<Self> {
        if len == 0 || split.len() < len {
            return Err(MasaError::Invalid(format!(
                "the tokenized {} split holds {} tokens, fewer than one training sequence of {len}; use a larger corpus or a smaller --seq",
                split.manifest.split,
                split.len()
            )));
        }
        let mut s = ChunkSampler {
            split,
            len,
            seed,
            epoch: 0,
            shift: 0,
            order: Vec::new(),
            next: 0,
            drawn: vec![0; split.manifest.domains.len()],
            tokens_drawn: 0,
        };
        s.start_epoch(0);
        Ok(s)
    }

    fn start_epoch(&mut self, epoch: u64) {
        let n = self.split.len();
        self.epoch = epoch;
        self.shift = epoch_shift(n, self.len, self.seed, epoch);
        self.order = epoch_order((n - self.shift) / self.len, self.seed, epoch);
        self.next = 0;
    }

    /// Chunks in one epoch.
    pub fn chunks_per_epoch(&self) -> usize {
        self.order.len()
    }

    /// The next chunk.
    pub fn next_sequence(&mut self) -> Vec<u32> {
        if self.next == self.order.len() {
            self.start_epoch(self.epoch + 1);
        }
        let start = self.shift + self.order[self.next] * self.len;
        self.next += 1;
        let mut v = Vec::with_capacity(self.len);
        self.split.copy_to(start, self.len, &mut v);
        self.split.count_domains(start as u64, self.len as u64, &mut self.drawn);
        self.tokens_drawn += self.len as u64;
        v
    }

    /// The next `batch` chunks.
    pub fn next_batch(&mut self, batch: usize) -> Vec<Vec<u32>> {
        (0..batch).map(|_| self.next_sequence()).collect()
    }

    /// Tokens handed out so far per domain.
    pub fn drawn_per_domain(&self) -> BTreeMap<String, u64> {
        self.split.manifest.domains.iter().cloned().zip(self.drawn.iter().copied()).collect()
    }

    /// The position, for resuming with [`ChunkSampler::restore`].
    pub fn state(&self) -> SamplerState {
        SamplerState {
            epoch: self.epoch,
            next: self.next as u64,
            split_tokens: self.split.len() as u64,
            tokens_drawn: self.tokens_drawn,
            drawn_per_domain: self.drawn_per_domain(),
        }
    }

    /// Continue from a saved [`SamplerState`] (same tokenized split, chunk length and seed).
    pub fn restore(&mut self, st: &SamplerState) -> Result<()> {
        if st.split_tokens != self.split.len() as u64 {
            return Err(MasaError::Invalid(format!(
                "the checkpoint's data position is in a split of {} tokens, this corpus and tokenizer give {}: resume with the run's corpus",
                st.split_tokens,
                self.split.len()
            )));
        }
        self.start_epoch(st.epoch);
        if st.next > self.order.len() as u64 {
            return Err(MasaError::Invalid(format!(
                "the checkpoint's data position {} is past the epoch's {} chunks",
                st.next,
                self.order.len()
            )));
        }
        self.next = st.next as usize;
        self.tokens_drawn = st.tokens_drawn;
        for (i, name) in self.split.manifest.domains.iter().enumerate() {
            self.drawn[i] = st.drawn_per_domain.get(name).copied().unwrap_or(0);
        }
        Ok(())
    }
}
