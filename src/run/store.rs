//! The artifact store of `masa run`: `<runs>/artifacts/<stage>-<key>/`, one directory per
//! finished (or interrupted) stage, its `record.json` written last, atomically.

use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};
use serde_json::json;

use sha2::{Digest, Sha256};

use crate::run::spec::Spec;
use crate::{MasaError, Result};

/// The key of a training stage (`train`, `finetune`): its inputs plus, off the CPU, the
/// device and precision (their numbers differ in rounding). CPU keys are those of earlier
/// versions, so cached CPU results stay valid.
pub fn stage_key(kind: &str, mut inputs: serde_json::Value, spec: &Spec) -> String {
    if spec.device != crate::engine::Device::Cpu {
        inputs["engine"] = json!({"device": spec.device, "precision": spec.precision});
    }
    hash(kind, &inputs)
}

/// First 8 bytes of the SHA-256 of `kind` and the JSON of `inputs` (keys sorted), in hex.
pub fn hash(kind: &str, inputs: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update(inputs.to_string().as_bytes());
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A finished stage's record, `None` while the stage has not finished.
pub fn read_record<T: DeserializeOwned>(dir: &Path) -> Option<T> {
    let p = dir.join("record.json");
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Mark a stage finished: its record, written atomically and last.
pub fn write_record<T: Serialize>(dir: &Path, rec: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(rec).map_err(|e| MasaError::Invalid(format!("serialising a record: {e}")))?;
    crate::home::write_atomic(&dir.join("record.json"), json.as_bytes())
}
