//! Library error type. Every variant names the file (or field) at fault and, where there is one,
//! what the user can do about it; the binary adds context with `anyhow` at its edge.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MasaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what it should be (corrupt, truncated, wrong kind).
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A file is valid but uses something masa does not implement.
    #[error("{path}: unsupported {what}: {msg}")]
    Unsupported { path: PathBuf, what: String, msg: String },
    /// A required config/metadata field is absent or has the wrong type.
    #[error("{path}: field `{field}`: {msg}")]
    Field { path: PathBuf, field: String, msg: String },
    /// An asset could not be fetched.
    #[error("fetching {asset}: {msg}")]
    Fetch { asset: String, msg: String },
    /// Shapes that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Invalid user input (CLI option, spec value).
    #[error("{0}")]
    Invalid(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = MasaError> = std::result::Result<T, E>;

impl MasaError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        MasaError::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn bad_file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        MasaError::BadFile { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn unsupported(path: impl AsRef<Path>, what: impl Into<String>, msg: impl Into<String>) -> Self {
        MasaError::Unsupported { path: path.as_ref().to_path_buf(), what: what.into(), msg: msg.into() }
    }
    pub fn field(path: impl AsRef<Path>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        MasaError::Field { path: path.as_ref().to_path_buf(), field: field.into(), msg: msg.into() }
    }
}

/// Attach a path to I/O results: `std::fs::read(p).at(p)?`.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| MasaError::io(path, e))
    }
}
