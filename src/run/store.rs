//! The artifact store of `masa run`: `<runs>/artifacts/<stage>-<key>/`, one directory per
//! finished (or interrupted) stage, its `record.json` written last, atomically.
//!
//! A stage's key hashes its kind, its record version, the keys of the stages it reads, and the
//! complete options struct the stage's library function is given, serialized. So a changed
//! default (a new AdamW β, another ridge) changes the key and the stage recomputes rather than
//! reusing a stale result. Left out of the hash are only the fields that say where the stage
//! writes or how it reports progress, never what it computes ([`Stage::invocation_fields`]).
//!
//! The training engine reaches the train and fine-tune keys through those options too:
//! `TrainOptions`/`FinetuneOptions` serialize `device` only when not `cpu` and `precision` only
//! when not `f32`, so CPU keys hold no engine and a CUDA run gets its own keys.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{MasaError, Result};

/// The stages whose results the store keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Calibrate,
    Extract,
    Init,
    Train,
    /// Fine-tuning on one task and evaluating on its test items.
    Finetune,
}

impl Stage {
    /// The directory prefix, `<name>-<key>`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Calibrate => "calibrate",
            Stage::Extract => "extract",
            Stage::Init => "init",
            Stage::Train => "train",
            Stage::Finetune => "finetune",
        }
    }

    /// Bumped when what the stage writes or its record holds changes, so older artifacts are
    /// not read as new ones. Finetune 2: generation tasks' answer NLL in the record. Train 2:
    /// batches of shuffled chunks of the tokenized split instead of a contiguous stream.
    pub fn record_version(self) -> u32 {
        match self {
            Stage::Finetune | Stage::Train => 2,
            _ => 1,
        }
    }

    /// Option fields (dotted paths into the serialized options) that do not change what the
    /// stage computes: where it writes, where it resumes, progress display, checkpoint
    /// cadence (resume is exact), and paths whose content the upstream keys already stand for
    /// (the corpus, the distillation teacher = the source, its top-k cache).
    pub fn invocation_fields(self) -> &'static [&'static str] {
        match self {
            Stage::Calibrate | Stage::Extract | Stage::Init => &[],
            Stage::Train => &["out", "resume", "progress", "ckpt_every", "corpus", "distill.teacher", "distill.cache_dir"],
            Stage::Finetune => &["finetune.out", "finetune.progress", "eval.progress"],
        }
    }

    /// The key of this stage: a hash of its kind, record version, `inputs` (upstream keys and
    /// what else it reads) and `options` without [`Stage::invocation_fields`].
    pub fn key(self, inputs: Value, options: &impl Serialize) -> Result<String> {
        let mut options =
            serde_json::to_value(options).map_err(|e| MasaError::Invalid(format!("serialising {} options: {e}", self.name())))?;
        for path in self.invocation_fields() {
            remove(&mut options, path);
        }
        Ok(hash(self.name(), &json!({"version": self.record_version(), "inputs": inputs, "options": options})))
    }

    /// The artifact directory of `key` in `store`.
    pub fn dir(self, store: &Path, key: &str) -> std::path::PathBuf {
        store.join(format!("{}-{key}", self.name()))
    }
}

/// Remove the field at a dotted path, if there.
fn remove(v: &mut Value, path: &str) {
    match path.split_once('.') {
        Some((head, rest)) => {
            if let Some(inner) = v.get_mut(head) {
                remove(inner, rest);
            }
        }
        None => {
            if let Some(o) = v.as_object_mut() {
                o.remove(path);
            }
        }
    }
}

/// First 8 bytes of the SHA-256 of `kind` and the JSON of `inputs` (keys sorted), in hex.
pub fn hash(kind: &str, inputs: &Value) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update(inputs.to_string().as_bytes());
    crate::fetch::hex(&h.finalize()[..8])
}

/// The stage's files and their sizes, written beside the record: a finished stage whose files
/// no longer match (a truncated checkpoint, a deleted gene file) is not trusted.
const FILES: &str = "record.files.json";

/// Every file under `dir` but the record and its file list, as `relative path -> size`.
fn file_sizes(dir: &Path) -> BTreeMap<String, u64> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, u64>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => walk(root, &p, out),
                Ok(m) => {
                    let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().into_owned();
                    // Lock files (`.masa-train.lock`, …) hold a process id, not a result.
                    let lock = e.file_name().to_string_lossy().starts_with(".masa-") && rel.ends_with(".lock");
                    if rel != "record.json" && rel != FILES && !rel.ends_with(".tmp") && !lock {
                        out.insert(rel, m.len());
                    }
                }
                Err(_) => {}
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A finished stage's file as its list records it: size and content hash.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
struct Entry {
    bytes: u64,
    sha256: String,
}

/// A listed file: `{bytes, sha256}`, or only its size in lists written before 2026-12-08.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Listed {
    Entry(Entry),
    Size(u64),
}

/// Every file of the stage with its size and sha256 (hashed once per size and modification
/// time, [`crate::fetch::sha256_file_cached`]).
fn file_entries(dir: &Path) -> Result<BTreeMap<String, Entry>> {
    file_sizes(dir)
        .into_iter()
        .map(|(f, bytes)| Ok((f.clone(), Entry { bytes, sha256: crate::fetch::sha256_file_cached(&dir.join(&f))? })))
        .collect()
}

/// The record of a finished stage, or `None` when it has none or its files are not what its
/// list recorded (then the stage directory is removed and recomputed): a missing file, another
/// size, or the same size with other content.
pub fn read_record<T: DeserializeOwned>(dir: &Path) -> Option<T> {
    let p = dir.join("record.json");
    let rec = serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
    let now = file_sizes(dir);
    let damaged = |f: &str, why: String| {
        eprintln!("warning: cached stage {} is damaged ({f}: {why}); recomputing it", dir.display());
        let _ = std::fs::remove_dir_all(dir);
        None
    };
    // Files added later (the extraction's spectra cache) are allowed; recorded ones must match.
    match std::fs::read_to_string(dir.join(FILES)).ok().and_then(|t| serde_json::from_str::<BTreeMap<String, Listed>>(&t).ok()) {
        Some(want) => {
            let mut legacy = false;
            for (f, listed) in &want {
                let Some(&size) = now.get(f) else { return damaged(f, "missing".into()) };
                match listed {
                    Listed::Size(n) if *n != size => return damaged(f, format!("{size} bytes, recorded {n}")),
                    Listed::Size(_) => legacy = true,
                    Listed::Entry(e) if e.bytes != size => return damaged(f, format!("{size} bytes, recorded {}", e.bytes)),
                    Listed::Entry(e) => match crate::fetch::sha256_file_cached(&dir.join(f)) {
                        Ok(h) if h == e.sha256 => {}
                        Ok(h) => {
                            return damaged(f, format!("content sha256 {}…, recorded {}…", &h[..12], &e.sha256[..e.sha256.len().min(12)]))
                        }
                        Err(err) => return damaged(f, err.to_string()),
                    },
                }
            }
            if legacy {
                let _ = file_entries(dir).and_then(|e| write_file_list(dir, &e));
            }
            Some(rec)
        }
        None => {
            let _ = file_entries(dir).and_then(|e| write_file_list(dir, &e));
            Some(rec)
        }
    }
}

fn write_file_list(dir: &Path, files: &BTreeMap<String, Entry>) -> Result<()> {
    let json = serde_json::to_string_pretty(files).map_err(|e| MasaError::Invalid(format!("serialising a file list: {e}")))?;
    crate::home::write_atomic(&dir.join(FILES), json.as_bytes())
}

/// Mark a stage finished: the list of its files with their sizes and content hashes, then its
/// record, each written atomically, the record last.
pub fn write_record<T: Serialize>(dir: &Path, rec: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(rec).map_err(|e| MasaError::Invalid(format!("serialising a record: {e}")))?;
    write_file_list(dir, &file_entries(dir)?)?;
    crate::home::write_atomic(&dir.join("record.json"), json.as_bytes())
}

/// Hold the runs directory `root` for this process ([`crate::home::lock_dir`] on
/// `<root>/.masa-run.lock`). Two `masa run` on one store would write the same stages at once;
/// the second refuses, naming the first's process id.
pub fn lock_runs(root: &Path) -> Result<std::fs::File> {
    crate::home::lock_dir(root, ".masa-run.lock", |pid| {
        format!(
            "{}: another `masa run` (process {pid}) is using this runs directory; wait for it to finish, or give another with --runs",
            root.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Serialize)]
    struct Opts {
        lr: f64,
        out: String,
        distill: Option<Value>,
    }

    #[test]
    fn every_option_but_the_invocation_fields_changes_the_key() {
        let a = Opts { lr: 1e-3, out: "a".into(), distill: Some(json!({"alpha": 0.5, "teacher": "/x"})) };
        let k = |o: &Opts| Stage::Train.key(json!({"init": "k"}), o).unwrap();
        // Where it writes, and the teacher's path: the same key.
        assert_eq!(k(&a), k(&Opts { out: "b".into(), distill: Some(json!({"alpha": 0.5, "teacher": "/y"})), ..a.clone() }));
        // Any other option, an upstream key, another stage: another key.
        assert_ne!(k(&a), k(&Opts { lr: 2e-3, ..a.clone() }));
        assert_ne!(k(&a), k(&Opts { distill: Some(json!({"alpha": 0.6, "teacher": "/x"})), ..a.clone() }));
        assert_ne!(k(&a), Stage::Train.key(json!({"init": "j"}), &a).unwrap());
        assert_ne!(k(&a), Stage::Finetune.key(json!({"init": "k"}), &a).unwrap());
    }

    #[test]
    fn the_engine_enters_training_keys_only_off_the_cpu_defaults() {
        use crate::engine::{Device, Precision};
        let cpu = crate::train::TrainOptions::default();
        let v = serde_json::to_value(&cpu).unwrap();
        assert!(v.get("device").is_none() && v.get("precision").is_none(), "{v}");
        let key = |o: &crate::train::TrainOptions| Stage::Train.key(json!({}), o).unwrap();
        let cuda = crate::train::TrainOptions { device: Device::Cuda(0), ..cpu.clone() };
        let bf16 = crate::train::TrainOptions { precision: Precision::Bf16, ..cuda.clone() };
        assert_ne!(key(&cpu), key(&cuda));
        assert_ne!(key(&cuda), key(&bf16));
        let ft = crate::finetune::FinetuneOptions::default();
        let v = serde_json::to_value(&ft).unwrap();
        assert!(v.get("device").is_none() && v.get("precision").is_none(), "{v}");
    }
}
