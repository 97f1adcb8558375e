//! Library error type. Every variant names the file (or field) at fault and, where there is one,
//! what the user can do about it; the binary adds context with `anyhow` at its edge.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MasaError {
    /// The cause is part of the message and deliberately not a `source()`: the binary prints
    /// the whole chain, which would repeat it ("x: No such file…: No such file…").
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
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
        MasaError::Io { path: path.as_ref().to_path_buf(), err: source }
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

/// Refuse a path that exists but is not a regular file before reading it: opening a FIFO
/// without a writer blocks for ever and a character device reads without end, so a model,
/// statistics or gene path naming one is an error, not a hang.
pub fn regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).at(path)?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(MasaError::bad_file(path, "not a regular file (a directory, FIFO, socket or device): give the path of the file itself"))
    }
}

thread_local! {
    /// Set while this thread runs a third-party parser under [`parser_guard`].
    static IN_PARSER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run a third-party parser (candle's GGUF reader and dequantizer) on the content of `path`:
/// a panic inside it, on a malformed file the parser does not validate (a GGUF whose
/// `general.alignment` is 0, a tensor whose type and extent disagree), becomes an error naming
/// the file instead of a crash. The panic message is not printed: a process-wide hook installed
/// on first use stays silent on threads inside a guard and defers to the previous hook
/// elsewhere, so concurrent threads keep their normal panic reports.
pub fn parser_guard<T>(path: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_PARSER.with(|p| p.get()) {
                previous(info)
            }
        }));
    });
    let outer = IN_PARSER.with(|p| p.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_PARSER.with(|p| p.set(outer));
    r.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(MasaError::bad_file(
            path,
            format!("malformed {what}: the reader failed on it ({msg}); the file is corrupt or not what its header says"),
        ))
    })
}
