//! Text ⇄ token ids, reproducing HF transformers exactly.
//!
//! [`Tokenizer`] wraps the `tokenizers` crate (the engine behind HF's fast tokenizers). It is built
//! either from the `tokenizer.ggml.*` metadata of a GGUF file or from an HF `tokenizer.json`, and
//! can be written back out in the HF layout ([`Tokenizer::save_hf`]).
//!
//! The GGUF conversion follows what transformers does when it loads a tokenizer from a GGUF file
//! (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), because that is what produced the
//! reference ids this crate is tested against. Two vocabulary kinds are supported:
//!
//! * `gpt2`: byte-level BPE with the merges stored in the file and a pre-tokenizer chosen by
//!   `tokenizer.ggml.pre` (see [`byte_level_pre_tokenizer`]).
//! * `llama`: SentencePiece BPE with byte fallback. The file carries no merges, so they are derived
//!   from the vocabulary (see [`derive_merges`]); Gemma files get Gemma's own recipe
//!   (see [`SpmRecipe`]).
//!
//! In both, tokens the file marks as control become special added tokens and user-defined ones
//! become plain added tokens, so that text like `<|im_start|>` maps to its single id.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use rayon::prelude::*;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{IoContext, MasaError, Result};
use crate::home::write_atomic;

/// GGUF `tokenizer.ggml.token_type` for control tokens (`<bos>`, `<|im_start|>`).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `tokenizer.ggml.token_type` for user-defined tokens (`\n\n`, `<start_of_image>`).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's stand-in for a space.
const SPM_SPACE: char = '▁';

/// The split regex of Qwen2's tokenizer (`PRETOKENIZE_REGEX` in transformers' `tokenization_qwen2`):
/// GPT-4-style, but digits one at a time.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Architectures whose SentencePiece vocabulary is converted with Gemma's recipe, as in
/// transformers' `GGUF_SENTENCEPIECE_BUILDERS`.
const GEMMA_ARCHITECTURES: [&str; 3] = ["gemma", "gemma2", "gemma3"];

/// A tokenizer plus the special-token facts a model needs (BOS/EOS ids, whether BOS is added).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
    pad_id: Option<u32>,
    /// Whether the model expects BOS in front of every text (GGUF `tokenizer.ggml.add_bos_token`).
    add_bos: bool,
}

/// The special token ids a GGUF file names.
#[derive(Clone, Copy, Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
}

type Metadata = HashMap<String, Value>;

impl Tokenizer {
    /// Build from GGUF metadata (`tokenizer.ggml.*` keys). `path` is only for error messages.
    pub fn from_gguf_metadata(md: &Metadata, path: &Path) -> Result<Self> {
        let model = md_str(md, "tokenizer.ggml.model", path)?
            .ok_or_else(|| MasaError::field(path, "tokenizer.ggml.model", "missing: the file carries no tokenizer"))?;
        let tokens = md_str_array(md, "tokenizer.ggml.tokens", path)?
            .ok_or_else(|| MasaError::field(path, "tokenizer.ggml.tokens", "missing: the file carries no vocabulary"))?;
        if tokens.is_empty() {
            return Err(MasaError::field(path, "tokenizer.ggml.tokens", "the vocabulary is empty"));
        }
        let token_types = match md_int_array(md, "tokenizer.ggml.token_type", path)? {
            Some(t) if t.len() != tokens.len() => {
                return Err(MasaError::field(
                    path,
                    "tokenizer.ggml.token_type",
                    format!("has {} entries for {} tokens", t.len(), tokens.len()),
                ))
            }
            t => t,
        };
        let ids = special_ids(md, tokens.len(), path)?;
        let (mut inner, add_bos_by_default) = match model {
            "gpt2" => (byte_level_tokenizer(md, &tokens, path)?, false),
            "llama" => (sentencepiece_tokenizer(md, &tokens, ids.unk, path)?, true),
            other => {
                return Err(MasaError::unsupported(
                    path,
                    "tokenizer model",
                    format!(
                        "`tokenizer.ggml.model` is {other:?}; masa supports \"gpt2\" (byte-level BPE) \
                         and \"llama\" (SentencePiece BPE)"
                    ),
                ))
            }
        };
        if let Some(types) = &token_types {
            add_typed_tokens(&mut inner, &tokens, types);
        }
        let add_bos = md_bool(md, "tokenizer.ggml.add_bos_token", path)?.unwrap_or(add_bos_by_default);
        let mut tokenizer = Tokenizer { inner, bos_id: ids.bos, eos_id: ids.eos, unk_id: ids.unk, pad_id: ids.pad, add_bos };
        tokenizer.set_bos_post_processor();
        Ok(tokenizer)
    }

    /// Load an HF `tokenizer.json`, with BOS/EOS and the add-BOS default from a
    /// `tokenizer_config.json` beside it, else from the ids in a `config.json` beside it.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        let bytes = std::fs::read(&file).at(&file)?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| MasaError::bad_file(&file, format!("not a valid HF tokenizer.json: {e}")))?;
        // masa encodes whole texts itself; a saved truncation or padding policy must not cut them.
        inner.with_truncation(None).map_err(|e| MasaError::bad_file(&file, format!("cannot clear truncation: {e}")))?;
        inner.with_padding(None);

        let tok_config_path = dir.join("tokenizer_config.json");
        let tok_config = read_json_if_present(&tok_config_path)?;
        let model_config_path = dir.join("config.json");
        let model_config = read_json_if_present(&model_config_path)?;
        let special_id = |token_key: &str, id_key: &str| -> Result<Option<u32>> {
            if let Some(config) = &tok_config {
                if let Some(id) = config_token_id(&inner, config, token_key, &tok_config_path)? {
                    return Ok(Some(id));
                }
            }
            match &model_config {
                Some(config) => config_id(config, id_key, &model_config_path),
                None => Ok(None),
            }
        };
        let bos_id = special_id("bos_token", "bos_token_id")?;
        let eos_id = special_id("eos_token", "eos_token_id")?;
        let unk_id = special_id("unk_token", "unk_token_id")?;
        let pad_id = special_id("pad_token", "pad_token_id")?;
        let add_bos = match tok_config.as_ref().and_then(|c| c.get("add_bos_token")) {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| MasaError::field(&tok_config_path, "add_bos_token", format!("expected true or false, found {v}")))?,
            None => post_processor_adds_bos(&inner, bos_id),
        };
        Ok(Tokenizer { inner, bos_id, eos_id, unk_id, pad_id, add_bos })
    }

    /// Token ids of `text`; with `add_bos`, the BOS id first. No other special tokens are added.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| MasaError::Invalid(format!("tokenizing text: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_bos {
            ids.push(self.bos_id.ok_or_else(|| MasaError::Invalid("BOS requested, but this tokenizer has no BOS token".into()))?);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The text of `ids`, special tokens included (as HF's `decode(skip_special_tokens=False)`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let size = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= size) {
            return Err(MasaError::Invalid(format!("token id {bad} is out of range for a vocabulary of {size} tokens")));
        }
        self.inner.decode(ids, false).map_err(|e| MasaError::Invalid(format!("decoding token ids: {e}")))
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether the model expects BOS in front of every text.
    pub fn default_add_bos(&self) -> bool {
        self.add_bos
    }

    /// sha256 of the tokenizer definition (its `tokenizer.json` serialization) and of the
    /// BOS/EOS facts: equal fingerprints encode every text to the same ids.
    pub fn fingerprint(&self) -> Result<String> {
        let json = self.inner.to_string(false).map_err(|e| MasaError::Invalid(format!("cannot serialize tokenizer: {e}")))?;
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(json.as_bytes());
        h.update(format!("{:?} {:?} {}", self.bos_id, self.eos_id, self.add_bos).as_bytes());
        Ok(crate::fetch::hex(&h.finalize()))
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (HF layout, loadable by HF
    /// `AutoTokenizer` / `PreTrainedTokenizerFast`) into `dir`, each atomically.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let tokenizer_json = dir.join("tokenizer.json");
        let json =
            self.inner.to_string(false).map_err(|e| MasaError::bad_file(&tokenizer_json, format!("cannot serialize tokenizer: {e}")))?;
        write_atomic(&tokenizer_json, json.as_bytes())?;
        let config_path = dir.join("tokenizer_config.json");
        let config = serde_json::to_vec_pretty(&self.hf_config())
            .map_err(|e| MasaError::bad_file(&config_path, format!("cannot serialize config: {e}")))?;
        write_atomic(&config_path, &config)
    }

    /// The `tokenizer_config.json` HF needs to treat the special tokens as this model does.
    /// `clean_up_tokenization_spaces` is off so HF's decode gives back the text exactly.
    fn hf_config(&self) -> serde_json::Value {
        let mut config = serde_json::Map::new();
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        for (key, id) in [("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.unk_id), ("pad_token", self.pad_id)] {
            if let Some(token) = id.and_then(|id| self.inner.id_to_token(id)) {
                config.insert(key.into(), token.into());
            }
        }
        config.insert("add_bos_token".into(), self.add_bos.into());
        config.insert("add_eos_token".into(), false.into());
        config.insert("clean_up_tokenization_spaces".into(), false.into());
        serde_json::Value::Object(config)
    }

    /// When the model wants BOS, record that in the tokenizer itself too (a `TemplateProcessing`
    /// like the one transformers builds), so that tools reading only `tokenizer.json` add it.
    /// [`Tokenizer::encode`] never runs the post-processor; it adds BOS itself. A BOS token that a
    /// template cannot name (one containing `:` or a space) gets no post-processor; HF still adds
    /// BOS from `add_bos_token` in `tokenizer_config.json`.
    fn set_bos_post_processor(&mut self) {
        let Some(bos) = self.bos_id.filter(|_| self.add_bos) else { return };
        let Some(token) = self.inner.id_to_token(bos) else { return };
        if token.contains([':', ' ']) {
            return;
        }
        let built = TemplateProcessing::builder()
            .try_single(vec![format!("{token}:0"), "$A:0".into()])
            .and_then(|b| b.try_pair(vec![format!("{token}:0"), "$A:0".into(), format!("{token}:1"), "$B:1".into()]))
            .map(|b| b.special_tokens(vec![(token.clone(), bos)]).build());
        if let Ok(Ok(processor)) = built {
            self.inner.with_post_processor(Some(processor));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`)
// ---------------------------------------------------------------------------------------------

/// Byte-level BPE as transformers' `GPT2Tokenizer`: tokens and merges exactly as the file spells
/// them (already in the GPT-2 byte alphabet), no normalizer, byte-level decoder.
fn byte_level_tokenizer(md: &Metadata, tokens: &[&str], path: &Path) -> Result<tokenizers::Tokenizer> {
    let merges = md_str_array(md, "tokenizer.ggml.merges", path)?
        .ok_or_else(|| MasaError::field(path, "tokenizer.ggml.merges", "missing: a \"gpt2\" vocabulary needs its merges"))?;
    let merges = parse_merges(&merges, path)?;
    let model = BPE::builder()
        .vocab_and_merges(vocab_of(tokens.iter().copied()), merges)
        .build()
        .map_err(|e| MasaError::bad_file(path, format!("inconsistent BPE vocabulary/merges: {e}")))?;
    let pre = md_str(md, "tokenizer.ggml.pre", path)?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre, path)?));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
    Ok(tokenizer)
}

/// The pre-tokenizer for a byte-level vocabulary, by `tokenizer.ggml.pre` (absent = `default`):
///
/// * `default`, `gpt-2`: GPT-2's own regex inside `ByteLevel`.
/// * `smollm`: SmolLM's `tokenizer.json` (and llama.cpp): every digit on its own, then GPT-2's
///   `ByteLevel`. transformers' GGUF loader leaves the digit split out; the two agree except where
///   a digit follows a run of whitespace (`"\n   1"`: here `"\n   "`, `"1"`; there `"\n  "`, `" "`,
///   `"1"`).
/// * `qwen2`: Qwen2's regex split, then `ByteLevel` without its own regex. Like transformers' GGUF
///   loader (and unlike Qwen2's `tokenizer.json`) there is no NFC normalizer; this only matters
///   for text that is not already NFC.
///
/// Others are refused rather than guessed: a wrong split silently changes the ids.
fn byte_level_pre_tokenizer(pre: Option<&str>, path: &Path) -> Result<PreTokenizerWrapper> {
    let gpt2_byte_level = ByteLevel::new(false, true, true);
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt-2" => gpt2_byte_level.into(),
        "smollm" => PreTokenizerSequence::new(vec![Digits::new(true).into(), gpt2_byte_level.into()]).into(),
        "qwen2" => {
            let split = Split::new(SplitPattern::Regex(QWEN2_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| MasaError::bad_file(path, format!("Qwen2 split regex: {e}")))?;
            PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        other => {
            return Err(MasaError::unsupported(
                path,
                "pre-tokenizer",
                format!("`tokenizer.ggml.pre` is {other:?}; masa supports \"default\", \"gpt-2\", \"smollm\", \"qwen2\""),
            ))
        }
    })
}

/// GGUF stores each merge as `"left right"`; the byte-level alphabet has no space, so the one
/// space separates the pair.
fn parse_merges(merges: &[&str], path: &Path) -> Result<Merges> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((l, r)) if !l.is_empty() && !r.is_empty() && !r.contains(' ') => Ok((l.to_string(), r.to_string())),
            _ => Err(MasaError::field(path, "tokenizer.ggml.merges", format!("entry {i} ({m:?}) is not \"left right\""))),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// SentencePiece BPE (`tokenizer.ggml.model = "llama"`)
// ---------------------------------------------------------------------------------------------

/// How a SentencePiece vocabulary is turned into an HF BPE tokenizer.
enum SpmRecipe {
    /// transformers' `gemma_tokenizer` + `GemmaTokenizer`: runs of spaces are respelled as runs of
    /// `▁` (the file spells them with real spaces, HF's vocabulary with `▁`), merges are ranked by
    /// token id (Gemma's scores do not follow its merge order), and a normalizer turns spaces into
    /// `▁`, with a leading `▁` only when the file asks for one. (`GemmaTokenizer` also sets a
    /// pre-tokenizer splitting on `" "`; after that normalizer no space is left, so it is omitted.)
    Gemma,
    /// transformers' `sentencepiece_tokenizer` + `LlamaTokenizer`: merges ranked by the file's
    /// scores, and a `Metaspace` pre-tokenizer (`▁` for spaces, one in front of the first piece
    /// unless `tokenizer.ggml.add_space_prefix` is false).
    Llama,
}

/// SentencePiece BPE: byte fallback (`<0xAB>` tokens for characters outside the vocabulary),
/// merges derived from the vocabulary, and a decoder that undoes `▁` and the byte fallback.
fn sentencepiece_tokenizer(md: &Metadata, file_tokens: &[&str], unk: Option<u32>, path: &Path) -> Result<tokenizers::Tokenizer> {
    let arch = md_str(md, "general.architecture", path)?.unwrap_or("llama");
    let recipe = if GEMMA_ARCHITECTURES.contains(&arch) { SpmRecipe::Gemma } else { SpmRecipe::Llama };
    let add_prefix = md_bool(md, "tokenizer.ggml.add_space_prefix", path)?.unwrap_or(true);

    let tokens: Vec<String> = match recipe {
        SpmRecipe::Gemma => file_tokens.iter().map(|t| respell_space_run(t)).collect(),
        SpmRecipe::Llama => file_tokens.iter().map(|t| t.to_string()).collect(),
    };
    let merges = match recipe {
        SpmRecipe::Gemma => derive_merges(&tokens, |id| -f64::from(id)),
        SpmRecipe::Llama => {
            let scores = md_f32_array(md, "tokenizer.ggml.scores", path)?.ok_or_else(|| {
                MasaError::field(path, "tokenizer.ggml.scores", "missing: needed to rank the merges of a \"llama\" vocabulary")
            })?;
            if scores.len() != tokens.len() {
                return Err(MasaError::field(
                    path,
                    "tokenizer.ggml.scores",
                    format!("has {} entries for {} tokens", scores.len(), tokens.len()),
                ));
            }
            derive_merges(&tokens, |id| f64::from(scores[id as usize]))
        }
    };

    let mut builder =
        BPE::builder().vocab_and_merges(vocab_of(tokens.iter().map(String::as_str)), merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(tokens[unk as usize].clone());
    }
    let model = builder.build().map_err(|e| MasaError::bad_file(path, format!("inconsistent SentencePiece vocabulary: {e}")))?;

    let mut tokenizer = tokenizers::Tokenizer::new(model);
    match recipe {
        SpmRecipe::Gemma => {
            tokenizer.with_normalizer(Some(space_normalizer(add_prefix, path)?));
        }
        SpmRecipe::Llama => {
            let scheme = if add_prefix { PrependScheme::First } else { PrependScheme::Never };
            tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPM_SPACE, scheme, false)));
        }
    }
    tokenizer.with_decoder(Some(spm_decoder(add_prefix, path)?));
    Ok(tokenizer)
}

/// transformers' Gemma respelling: a token of only whitespace that contains a space (`"    "`) is
/// looked up as that many `▁`, since the normalizer has turned the text's spaces into `▁` by the
/// time BPE sees it. (Python's `str.strip()` whitespace, which adds `\x1c`..`\x1f` to Unicode's.)
fn respell_space_run(token: &str) -> String {
    let python_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    if token.contains(' ') && token.chars().all(python_space) {
        SPM_SPACE.to_string().repeat(token.chars().count())
    } else {
        token.to_string()
    }
}

/// Spaces become `▁` before BPE; with `add_prefix`, one `▁` goes in front of the text.
fn space_normalizer(add_prefix: bool, path: &Path) -> Result<NormalizerWrapper> {
    let replace = Replace::new(" ", SPM_SPACE.to_string()).map_err(|e| MasaError::bad_file(path, format!("space normalizer: {e}")))?;
    Ok(if add_prefix {
        NormalizerSequence::new(vec![Prepend::new(SPM_SPACE.to_string()).into(), replace.into()]).into()
    } else {
        replace.into()
    })
}

/// `▁` back to spaces, `<0xAB>` pieces back to bytes, pieces joined; with `add_prefix`, the
/// leading space the encoder added is dropped.
fn spm_decoder(add_prefix: bool, path: &Path) -> Result<DecoderWrapper> {
    let replace = Replace::new(SPM_SPACE.to_string(), " ").map_err(|e| MasaError::bad_file(path, format!("space decoder: {e}")))?;
    let mut steps: Vec<DecoderWrapper> = vec![replace.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps).into())
}

/// One merge candidate: `left + right` is a token of the vocabulary.
struct MergeCandidate {
    /// Rank of the merged token; higher merges first.
    rank: f64,
    left_chars: usize,
    right_chars: usize,
    left: u32,
    right: u32,
}

/// BPE merges implied by a SentencePiece vocabulary, exactly as transformers' `generate_merges`:
/// every split of every token into two tokens is a merge; within one token the splits go by
/// (left id, right id); then all merges are stably sorted by the merged token's `rank`, then by
/// the left piece's length, then the right one's (in characters), all descending.
///
/// A token listed twice counts once, at its first position, with the id (and rank) of its last
/// listing, as Python's dicts do. Each token is cut at each character boundary and the halves are
/// hash lookups (the right one only when the left one is a token), so the cost is linear in the
/// total length of the vocabulary; tokens are scanned in parallel and the sort is a parallel
/// stable sort, which keeps the order exactly as the sequential definition gives it.
fn derive_merges(tokens: &[String], rank: impl Fn(u32) -> f64 + Sync) -> Merges {
    let index: HashMap<&str, u32> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
    let mut seen: HashSet<&str> = HashSet::with_capacity(index.len());
    let first_listings: Vec<&str> = tokens.iter().map(String::as_str).filter(|t| seen.insert(t)).collect();
    let mut candidates: Vec<MergeCandidate> = first_listings.par_iter().flat_map_iter(|token| token_splits(token, &index, &rank)).collect();
    // -0.0 and 0.0 compare equal in Python; NaN ranks last. After that `total_cmp` is exact.
    let key = |r: f64| if r.is_nan() { f64::NEG_INFINITY } else { r + 0.0 };
    candidates.par_sort_by(|a, b| {
        key(b.rank).total_cmp(&key(a.rank)).then(b.left_chars.cmp(&a.left_chars)).then(b.right_chars.cmp(&a.right_chars))
    });
    candidates.into_iter().map(|c| (tokens[c.left as usize].clone(), tokens[c.right as usize].clone())).collect()
}

/// The ways to cut `token` into two vocabulary tokens, ordered by (left id, right id).
fn token_splits(token: &str, index: &HashMap<&str, u32>, rank: &impl Fn(u32) -> f64) -> Vec<MergeCandidate> {
    let merged_rank = rank(index[token]);
    let total_chars = token.chars().count();
    let mut splits = Vec::new();
    for (left_chars, (cut, _)) in token.char_indices().enumerate().skip(1) {
        let (l, r) = token.split_at(cut);
        let Some(&left) = index.get(l) else { continue };
        let Some(&right) = index.get(r) else { continue };
        let right_chars = total_chars - left_chars;
        splits.push(MergeCandidate { rank: merged_rank, left_chars, right_chars, left, right });
    }
    splits.sort_by_key(|c| (c.left, c.right));
    splits
}

// ---------------------------------------------------------------------------------------------
// Shared by both kinds
// ---------------------------------------------------------------------------------------------

/// Token → id; a token listed twice keeps its last id (as a Python dict built from the list).
fn vocab_of<'a>(tokens: impl Iterator<Item = &'a str>) -> Vocab {
    tokens.enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect()
}

/// Control tokens become special added tokens and user-defined ones plain added tokens, both
/// matched in the raw text (`normalized: false`) before anything else, as transformers'
/// `add_gguf_special_tokens` does. A user-defined token is added only if its spelling in the file
/// is still in the vocabulary (Gemma's respelled space runs are not; BPE builds those instead).
fn add_typed_tokens(tokenizer: &mut tokenizers::Tokenizer, tokens: &[&str], types: &[i64]) {
    let of_type = |wanted: i64| tokens.iter().zip(types).filter(move |(_, &ty)| ty == wanted).map(|(t, _)| *t);
    let control: Vec<AddedToken> = of_type(TOKEN_TYPE_CONTROL).map(|t| AddedToken::from(t, true).normalized(false)).collect();
    if !control.is_empty() {
        tokenizer.add_special_tokens(&control);
    }
    let user_defined: Vec<AddedToken> = of_type(TOKEN_TYPE_USER_DEFINED)
        .filter(|t| tokenizer.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t, false).normalized(false))
        .collect();
    if !user_defined.is_empty() {
        tokenizer.add_tokens(&user_defined);
    }
}

/// BOS/EOS/UNK/PAD ids from `tokenizer.ggml.*_token_id`, each checked against the vocabulary.
fn special_ids(md: &Metadata, n_tokens: usize, path: &Path) -> Result<SpecialIds> {
    let id = |key: &str| -> Result<Option<u32>> {
        match md_uint(md, key, path)? {
            Some(id) if id as usize >= n_tokens => {
                Err(MasaError::field(path, key, format!("token id {id} is outside the vocabulary of {n_tokens} tokens")))
            }
            other => Ok(other),
        }
    };
    Ok(SpecialIds {
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
    })
}

// ---------------------------------------------------------------------------------------------
// GGUF metadata accessors: absent → `None`, present with the wrong type → error naming the key.
// ---------------------------------------------------------------------------------------------

fn wrong_type(path: &Path, key: &str, expected: &str, found: &Value) -> MasaError {
    MasaError::field(path, key, format!("expected {expected}, found {:?}", found.value_type()))
}

fn md_str<'a>(md: &'a Metadata, key: &str, path: &Path) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(wrong_type(path, key, "a string", v)),
    }
}

fn md_bool(md: &Metadata, key: &str, path: &Path) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(path, key, "a boolean", v)),
    }
}

/// Any integer value, as i64 (token ids and token types are stored with varying widths).
fn int_of(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

fn md_uint(md: &Metadata, key: &str, path: &Path) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => {
            int_of(v).and_then(|x| u32::try_from(x).ok()).map(Some).ok_or_else(|| wrong_type(path, key, "a non-negative 32-bit integer", v))
        }
    }
}

fn md_array<'a>(md: &'a Metadata, key: &str, path: &Path) -> Result<Option<&'a [Value]>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a.as_slice())),
        Some(v) => Err(wrong_type(path, key, "an array", v)),
    }
}

fn md_str_array<'a>(md: &'a Metadata, key: &str, path: &Path) -> Result<Option<Vec<&'a str>>> {
    let Some(items) = md_array(md, key, path)? else { return Ok(None) };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(wrong_type(path, key, "an array of strings", other)),
        })
        .collect::<Result<_>>()
        .map(Some)
}

fn md_int_array(md: &Metadata, key: &str, path: &Path) -> Result<Option<Vec<i64>>> {
    let Some(items) = md_array(md, key, path)? else { return Ok(None) };
    items.iter().map(|v| int_of(v).ok_or_else(|| wrong_type(path, key, "an array of integers", v))).collect::<Result<_>>().map(Some)
}

fn md_f32_array(md: &Metadata, key: &str, path: &Path) -> Result<Option<Vec<f32>>> {
    let Some(items) = md_array(md, key, path)? else { return Ok(None) };
    items
        .iter()
        .map(|v| match *v {
            Value::F32(x) => Ok(x),
            Value::F64(x) => Ok(x as f32),
            _ => Err(wrong_type(path, key, "an array of floats", v)),
        })
        .collect::<Result<_>>()
        .map(Some)
}

// ---------------------------------------------------------------------------------------------
// HF directory helpers
// ---------------------------------------------------------------------------------------------

/// The parsed JSON file, or `None` when it does not exist.
fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(MasaError::io(path, e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| MasaError::bad_file(path, format!("not valid JSON: {e}")))
}

/// The id of the special token a `tokenizer_config.json` names under `key`, written either as
/// the token itself or as an added-token object with a `content` field. `null`/absent → `None`.
fn config_token_id(tokenizer: &tokenizers::Tokenizer, config: &serde_json::Value, key: &str, path: &Path) -> Result<Option<u32>> {
    let token = match config.get(key) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.as_str(),
        Some(v) => v
            .get("content")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| MasaError::field(path, key, format!("expected a token string, found {v}")))?,
    };
    tokenizer
        .token_to_id(token)
        .map(Some)
        .ok_or_else(|| MasaError::field(path, key, format!("token {token:?} is not in tokenizer.json's vocabulary")))
}

/// A token id from a model `config.json` (`bos_token_id: 2`, or a list whose first entry counts).
fn config_id(config: &serde_json::Value, key: &str, path: &Path) -> Result<Option<u32>> {
    let value = match config.get(key) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(a)) => match a.first() {
            Some(first) => first,
            None => return Ok(None),
        },
        Some(v) => v,
    };
    value
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .map(Some)
        .ok_or_else(|| MasaError::field(path, key, format!("expected a token id, found {value}")))
}

/// Without an explicit `add_bos_token`, the tokenizer's own post-processor decides, as it would
/// for HF: BOS is added by default when encoding with special tokens puts it first.
fn post_processor_adds_bos(tokenizer: &tokenizers::Tokenizer, bos: Option<u32>) -> bool {
    let Some(bos) = bos else { return false };
    match (tokenizer.encode_fast("a", false), tokenizer.encode_fast("a", true)) {
        (Ok(plain), Ok(special)) => special.get_ids().first() == Some(&bos) && special.len() > plain.len(),
        _ => false,
    }
}
