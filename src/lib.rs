//! masa: Matrix-level Alignment and Scalable Adaptation.
//!
//! Extract the FFN knowledge of a pretrained LLM into small *gene matrices* and use them to
//! initialize small Llama-style students. See `docs/design.md` for the spec. Modules follow
//! the pipeline: `fetch` → `source`/`model` → `calibrate` (`stats`) → `align`/`extract` →
//! init → train → eval → report.

pub mod align;
pub mod bench;
pub mod calibrate;
pub mod corpus;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod distill;
pub mod engine;
pub mod error;
pub mod eval;
pub mod extract;
pub mod fetch;
pub mod finetune;
pub mod home;
pub mod init;
pub mod inspect;
pub mod limits;
pub mod progress;
pub mod report;
pub mod rng;
pub mod rouge;
pub mod run;
pub mod score;
pub mod source;
pub mod stats;
pub mod student;
pub mod synth;
pub mod tensorfile;
pub mod train;

pub use error::{MasaError, Result};
pub use limits::MAX_TOKENS;
