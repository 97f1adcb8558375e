//! The data directory: `$MASA_HOME`, default `~/.cache/masa`. Everything fetched or derived from
//! public assets lives here, so several checkouts and CI runs share one cache.

use std::path::{Path, PathBuf};

use crate::error::{IoContext, MasaError, Result};

/// `$MASA_HOME` if set, else `$XDG_CACHE_HOME/masa`, else `~/.cache/masa`.
pub fn masa_home() -> PathBuf {
    if let Some(h) = std::env::var_os("MASA_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("masa");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("masa")
}

/// `masa_home()/sub`, created if missing.
pub fn subdir(sub: &str) -> Result<PathBuf> {
    let d = masa_home().join(sub);
    std::fs::create_dir_all(&d).at(&d)?;
    Ok(d)
}

/// Write `bytes` to `path` atomically: a temp file in the same directory, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |out| std::io::Write::write_all(out, bytes).at(path))
}

/// [`write_atomic`] for content produced piece by piece: `write` fills a buffered temp file,
/// which is renamed over `path` only when `write` succeeds (else removed).
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>) -> Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).at(parent)?;
        }
    }
    let tmp = tmp_path(path);
    let written = std::fs::File::create(&tmp).at(&tmp).and_then(|f| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
        write(&mut out)?;
        // Flush the buffer, reporting its error (dropping a BufWriter would swallow it).
        out.into_inner().map_err(|e| MasaError::io(&tmp, e.into_error()))?;
        std::fs::rename(&tmp, path).at(path)
    });
    if written.is_err() {
        // A failed write (disk full, read-only directory) leaves no temp file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The temp-file name used for an atomic write of `path` (same directory, so rename is atomic).
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write whose rename fails (the target is a non-empty directory) reports the path and
    /// leaves no temp file behind, so reruns do not pile them up.
    #[test]
    fn failed_atomic_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("d");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), "x").unwrap();
        let e = write_atomic(&target, b"new").unwrap_err().to_string();
        assert!(e.contains(&target.display().to_string()), "{e}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("d")]);
        write_atomic(&dir.path().join("ok.json"), b"{}").unwrap();
        assert_eq!(std::fs::read(dir.path().join("ok.json")).unwrap(), b"{}");
    }
}
