//! Token streams over a corpus: the seeded document order, the training stream of fixed-length
//! sequences (EOS between documents, resumable state) and the fixed per-domain validation
//! sequences.

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------
// Token streams
// ---------------------------------------------------------------------------------------------

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
    let domain_names: Vec<String> = docs.iter().map(|&i| corpus.docs[i].domain.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let doc_domain = docs.iter().map(|&i| domain_names.binary_search(&corpus.docs[i].domain).unwrap()).collect();
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
                return Err(MasaError::Invalid("every document of the token stream encodes to no tokens; check the tokenizer".into()));
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
                return Err(MasaError::Invalid("stream state offset is past its document: different corpus or tokenizer".into()));
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
        return Err(MasaError::Invalid(format!("domain `{domain}` has no {split} documents; domains: {}", corpus.domains().join(", "))));
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

/// A batch of equal-length sequences, each labelled with its dataset (index into `datasets`).
#[derive(Clone)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub batch: usize,
    pub seq_len: usize,
    pub dataset: Vec<usize>,
}
