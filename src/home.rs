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

/// The temp-file name used for an atomic write of `path` (same directory, so rename is atomic):
/// `.{name}.{pid}.tmp`. Temp files of the same target that a killed masa left behind (their
/// process is gone, by `/proc`) are removed first, so interrupted runs do not pile them up.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let (true, Ok(entries)) = (Path::new("/proc/self").exists(), std::fs::read_dir(dir)) {
        let prefix = format!(".{name}.");
        for e in entries.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            let pid = f.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp")).and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| p != std::process::id() && !Path::new("/proc").join(p.to_string()).exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
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

    /// Temp files a killed process left (a pid that is not running) are removed by the next
    /// write of the same target; a live process's, and other targets', are left alone.
    #[test]
    fn stale_temp_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = std::process::id();
        let parent = std::os::unix::process::parent_id();
        for f in
            [format!(".a.json.{dead}.tmp"), format!(".a.json.{parent}.tmp"), format!(".b.json.{dead}.tmp"), format!(".a.json.x{dead}.tmp")]
        {
            std::fs::write(dir.path().join(f), "half").unwrap();
        }
        write_atomic(&dir.path().join("a.json"), b"{}").unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let mut want =
            vec!["a.json".to_string(), format!(".a.json.{parent}.tmp"), format!(".b.json.{dead}.tmp"), format!(".a.json.x{dead}.tmp")];
        want.sort();
        assert_eq!(left, want, "live pid {live}");
    }
}

/// Hold directory `dir` for this process: an exclusive lock on `dir/name`, kept while the
/// returned file is open and released by the system when the process ends, however it ends
/// (SIGKILL included: no stale lock to clean up). A second holder gets `busy(pid)` as its
/// error, with the first holder's process id.
pub fn lock_dir(dir: &Path, name: &str, busy: impl Fn(&str) -> String) -> Result<std::fs::File> {
    use std::io::{Read, Write};
    std::fs::create_dir_all(dir).at(dir)?;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).at(&path)?;
    match f.try_lock() {
        Ok(()) => {
            // The holder's pid, for the message the next one gives.
            f.set_len(0).at(&path)?;
            f.write_all(std::process::id().to_string().as_bytes()).at(&path)?;
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = if pid.trim().is_empty() { "unknown".to_string() } else { pid.trim().to_string() };
            Err(MasaError::Invalid(busy(&pid)))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(MasaError::io(&path, e)),
    }
}

/// Refuse an output path that is one of the command's inputs (`inputs`: the option that names
/// each, and its path), so a typo never replaces a model, statistics or genes with the result.
pub fn check_output_is_not_input(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let canon = |p: &Path| p.canonicalize().ok();
    let Some(o) = canon(out) else { return Ok(()) };
    match inputs.iter().find(|(_, p)| canon(p).as_ref() == Some(&o)) {
        Some((what, _)) => Err(MasaError::bad_file(
            out,
            format!("is the {what} this command reads; masa will not write its output over an input: choose another --out"),
        )),
        None => Ok(()),
    }
}

/// The checkpoint a training run directory's `latest` file names (`dir/<name>`), if it has
/// one: how `masa train --resume DIR`, `masa score DIR` and every command that takes a model
/// find a run's newest checkpoint. The file's content is not checked here.
pub fn latest_in(dir: &Path) -> Result<Option<PathBuf>> {
    let latest = dir.join("latest");
    if !latest.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest).at(&latest)?;
    Ok(Some(dir.join(name.trim())))
}
