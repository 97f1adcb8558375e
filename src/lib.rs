//! masa: Matrix-level Alignment and Scalable Adaptation.
//!
//! Extract the FFN knowledge of a pretrained LLM into small *gene matrices* and use them to
//! initialize small Llama-style students. See `docs/design.md` for the spec.

pub mod error;
pub mod home;
pub mod corpus;

pub use error::{MasaError, Result};
