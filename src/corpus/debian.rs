//! The default corpus: built from Debian packages (`docs/assets.md`, "Text corpora") into
//! `masa_home()/corpus/default/`, one JSONL file per domain and split plus a `manifest.json`
//! (packages, versions, sha256, caps, selection rule); the selection of documents per domain.

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------
// The default corpus: manifest
// ---------------------------------------------------------------------------------------------

/// One line of a default-corpus JSONL file.
#[derive(Serialize, Deserialize)]
pub struct CorpusLine {
    pub text: String,
    pub domain: String,
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub deb_file: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    pub name: String,
    pub packages: Vec<String>,
    pub cap_bytes: u64,
    pub train_file: String,
    pub valid_file: String,
    pub train: SplitCounts,
    pub valid: SplitCounts,
    /// Candidate units (entries, files, info nodes) found and used before the cap.
    pub units_available: u64,
    pub units_used: u64,
    /// Approximate raw bytes of all candidate units (file sizes for file units).
    pub bytes_available: u64,
    /// Bytes taken per package (or source group).
    pub bytes_per_source: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_by: String,
    pub split_rule: String,
    pub selection_rule: String,
    pub max_doc_bytes: usize,
    pub packages: Vec<PackageInfo>,
    pub domains: Vec<DomainInfo>,
    pub build_seconds: f64,
}

/// Options of the default corpus build.
#[derive(Clone, Debug, PartialEq)]
pub struct CorpusOptions {
    /// Cap on each domain's text bytes.
    pub domain_cap: u64,
    /// Per-domain overrides of `domain_cap`.
    pub domain_caps: BTreeMap<String, u64>,
    pub max_doc_bytes: usize,
    /// Output directory (default: [`default_corpus_dir`]).
    pub out_dir: Option<PathBuf>,
    /// Keep the extracted package trees under `masa_home()/downloads/deb/extract/` (default:
    /// removed after the build; the .deb files are always kept).
    pub keep_extracted: bool,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions {
            domain_cap: DEFAULT_DOMAIN_CAP,
            domain_caps: BTreeMap::new(),
            max_doc_bytes: DEFAULT_MAX_DOC_BYTES,
            out_dir: None,
            keep_extracted: false,
        }
    }
}

impl CorpusOptions {
    pub fn cap(&self, domain: &str) -> u64 {
        self.domain_caps.get(domain).copied().unwrap_or(self.domain_cap)
    }
}

pub(super) const SELECTION_RULE: &str = "per domain, each source's units (dictionary entries, synsets, chapters, fortunes, \
info nodes, files) are ordered by sha256(\"domain/unit id\"); units are taken from the source with the fewest \
bytes taken so far until the domain reaches its cap; units longer than max_doc_bytes are cut at paragraph \
boundaries into parts";

/// The domains of the default corpus and the Debian packages each is built from.
pub const DEFAULT_DOMAINS: &[(&str, &[&str])] = &[
    ("dictionary", &["dict-gcide"]),
    ("glosses", &["wordnet-base"]),
    ("computing", &["dict-foldoc", "jargon-text", "dict-devil"]),
    ("literature", &["bible-kjv", "bible-kjv-text"]),
    ("quotes", &["fortunes"]),
    ("technical", &["linux-doc-6.1", "python3.11-doc", "perl-doc", "gnu-standards", "maxima-doc"]),
    ("code", &["rust-src", "golang-1.19-src"]),
];

// ---------------------------------------------------------------------------------------------
// The default corpus: build
// ---------------------------------------------------------------------------------------------

/// Build the default corpus with default options under [`default_corpus_dir`], or return at
/// once if it is already there (same format version and caps). Returns the directory.
pub fn fetch_default_corpus(progress: bool) -> Result<PathBuf> {
    fetch_corpus(&CorpusOptions::default(), progress)
}

pub(super) fn manifest_matches(dir: &Path, opts: &CorpusOptions) -> bool {
    let Ok(m) = read_manifest(&dir.join("manifest.json")) else { return false };
    m.format_version == FORMAT_VERSION
        && m.max_doc_bytes == opts.max_doc_bytes
        && m.domains.len() == DEFAULT_DOMAINS.len()
        && m.domains
            .iter()
            .all(|d| d.cap_bytes == opts.cap(&d.name) && dir.join(&d.train_file).is_file() && dir.join(&d.valid_file).is_file())
}

/// Build the default corpus with `opts` (see [`fetch_default_corpus`]).
pub fn fetch_corpus(opts: &CorpusOptions, progress: bool) -> Result<PathBuf> {
    let out = opts.out_dir.clone().unwrap_or_else(default_corpus_dir);
    if manifest_matches(&out, opts) {
        if progress {
            eprintln!("corpus: {} is up to date (format {FORMAT_VERSION}); nothing to do", out.display());
        }
        return Ok(out);
    }
    let t0 = Instant::now();
    let say = |s: String| {
        if progress {
            eprintln!("corpus: {s}");
        }
    };
    say(format!("building the default corpus in {} from Debian packages", out.display()));
    let deb_dir = masa_home().join("downloads").join("deb");
    std::fs::create_dir_all(&deb_dir).at(&deb_dir)?;
    let extract_root = deb_dir.join("extract");

    let all_pkgs: Vec<&str> = DEFAULT_DOMAINS.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let bar = if progress {
        let b = indicatif::ProgressBar::new(all_pkgs.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("corpus: {prefix} [{bar:30}] {pos}/{len} {msg}").unwrap().progress_chars("=> "),
        );
        b.set_prefix("packages");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut apt = Apt { dir: deb_dir.clone(), updated: false };
    let mut packages = Vec::new();
    let mut roots: BTreeMap<String, PathBuf> = BTreeMap::new();
    for p in &all_pkgs {
        bar.set_message(format!("{p}: download"));
        let info = apt.download(p)?;
        bar.set_message(format!("{p}: extract"));
        let root = extract_root.join(p);
        extract_deb(&deb_dir.join(&info.deb_file), &root)?;
        roots.insert(p.to_string(), root);
        packages.push(info);
        bar.inc(1);
    }
    bar.finish_and_clear();
    say(format!("{} packages downloaded and extracted in {:.1} s", packages.len(), t0.elapsed().as_secs_f64()));

    // Stage into a temp directory beside the output, then swap it in.
    let parent = out.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).at(&parent)?;
    let stage = parent.join(format!(".{}.building.{}", out.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    if stage.exists() {
        std::fs::remove_dir_all(&stage).at(&stage)?;
    }
    std::fs::create_dir_all(&stage).at(&stage)?;

    let mut domains = Vec::new();
    for (dom, pkgs) in DEFAULT_DOMAINS {
        let cap = opts.cap(dom);
        let t = Instant::now();
        let sources = domain_sources(dom, &roots)?;
        let info = build_domain(dom, pkgs, sources, cap, opts.max_doc_bytes, &stage)?;
        say(format!(
            "{dom:<10} {:>6} train docs {:>10} B, {:>4} valid docs {:>8} B ({:.1} s)",
            info.train.docs,
            info.train.bytes,
            info.valid.docs,
            info.valid.bytes,
            t.elapsed().as_secs_f64()
        ));
        domains.push(info);
    }
    if !opts.keep_extracted {
        std::fs::remove_dir_all(&extract_root).at(&extract_root)?;
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        created_by: format!("masa {}", env!("CARGO_PKG_VERSION")),
        split_rule: SPLIT_RULE.into(),
        selection_rule: SELECTION_RULE.into(),
        max_doc_bytes: opts.max_doc_bytes,
        packages,
        domains,
        build_seconds: t0.elapsed().as_secs_f64(),
    };
    let mjson = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    write_atomic(&stage.join("manifest.json"), &mjson)?;
    // Swap: old out (if any) aside, stage in, old removed.
    if out.exists() {
        let old = parent.join(format!(".{}.old.{}", out.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
        std::fs::rename(&out, &old).at(&out)?;
        std::fs::rename(&stage, &out).at(&out)?;
        std::fs::remove_dir_all(&old).at(&old)?;
    } else {
        std::fs::rename(&stage, &out).at(&out)?;
    }
    say(format!("done in {:.1} s: {}", t0.elapsed().as_secs_f64(), out.display()));
    Ok(out)
}

/// Whether apt can still locate each package, downloading nothing (`apt-get download
/// --print-uris`; the package lists are updated once if they do not know one): per package
/// `Ok("file (size)")` or the error `masa fetch corpus` would give.
pub fn debian_candidates(pkgs: &[&str]) -> Vec<Result<String>> {
    let mut apt = Apt { dir: masa_home().join("downloads").join("deb"), updated: false };
    pkgs.iter().map(|p| apt.uri(p).map(|(file, size, _)| format!("{file} ({size} B)"))).collect()
}

pub(super) struct Apt {
    dir: PathBuf,
    updated: bool,
}

pub(super) fn apt_missing(prog: &str, pkg: &str) -> MasaError {
    MasaError::Fetch {
        asset: "default corpus".into(),
        msg: format!(
            "`{prog}` not found (Debian package `{pkg}`): masa builds its default corpus from Debian packages and \
             needs a Debian-like system with apt-get and dpkg-deb; elsewhere give your own text with --corpus \
             FILE|DIR (.txt or .jsonl)"
        ),
    }
}

pub(super) fn run_cmd(cmd: &mut Command, prog: &str, prog_pkg: &str) -> Result<std::process::Output> {
    crate::fetch::dies_with_parent(cmd).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            apt_missing(prog, prog_pkg)
        } else {
            MasaError::Fetch { asset: "default corpus".into(), msg: format!("running `{prog}`: {e}") }
        }
    })
}

pub(super) fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.trim();
    let start = s.len().saturating_sub(600);
    let start = (start..=s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
    s[start..].to_string()
}

impl Apt {
    fn update(&mut self, pkg: &str) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        self.updated = true;
        eprintln!("corpus: `apt-get download {pkg}` failed; running `apt-get update` and retrying");
        let o = run_cmd(Command::new("apt-get").arg("update"), "apt-get", "apt")?;
        if !o.status.success() {
            return Err(MasaError::Fetch {
                asset: format!("Debian package {pkg}"),
                msg: format!("`apt-get update` failed (run it as root, e.g. `sudo apt-get update`, then retry): {}", tail(&o.stderr)),
            });
        }
        Ok(())
    }

    /// `apt-get download --print-uris`: (file name, size, sha256).
    fn uri(&mut self, pkg: &str) -> Result<(String, u64, String)> {
        // apt-get prints nothing for a file already in its working directory: ask from an
        // empty one.
        let qdir = self.dir.join(".query");
        std::fs::create_dir_all(&qdir).at(&qdir)?;
        for attempt in 0..2 {
            let o = run_cmd(Command::new("apt-get").args(["download", "--print-uris", pkg]).current_dir(&qdir), "apt-get", "apt")?;
            let out = String::from_utf8_lossy(&o.stdout);
            let line = out.lines().find(|l| l.starts_with('\''));
            if o.status.success() {
                if let Some(l) = line {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    if f.len() >= 4 {
                        let sha = f[3].strip_prefix("SHA256:").unwrap_or("").to_ascii_lowercase();
                        let size = f[2].parse().unwrap_or(0);
                        return Ok((f[1].to_string(), size, sha));
                    }
                }
            }
            if attempt == 0 && !self.updated {
                self.update(pkg)?;
                continue;
            }
            return Err(MasaError::Fetch {
                asset: format!("Debian package {pkg}"),
                msg: format!("apt-get cannot locate it (check /etc/apt/sources.list has Debian 12 `bookworm` main): {}", tail(&o.stderr)),
            });
        }
        unreachable!()
    }

    fn download(&mut self, pkg: &str) -> Result<PackageInfo> {
        for attempt in 0..2 {
            let (file, size, sha) = self.uri(pkg)?;
            let path = self.dir.join(&file);
            if path.is_file() && (sha.is_empty() || sha256_file(&path)? == sha) {
                return self.info(pkg, &file, size);
            }
            let o = run_cmd(Command::new("apt-get").args(["download", pkg]).current_dir(&self.dir), "apt-get", "apt")?;
            if o.status.success() && path.is_file() {
                let got = sha256_file(&path)?;
                if sha.is_empty() || got == sha {
                    return self.info(pkg, &file, size);
                }
                let _ = std::fs::remove_file(&path);
                return Err(MasaError::Fetch {
                    asset: format!("Debian package {pkg}"),
                    msg: format!("{}: sha256 {got} but apt expects {sha}; removed it, retry", path.display()),
                });
            }
            if attempt == 0 && !self.updated {
                self.update(pkg)?;
                continue;
            }
            return Err(MasaError::Fetch {
                asset: format!("Debian package {pkg}"),
                msg: format!("`apt-get download {pkg}` failed: {}", tail(&o.stderr)),
            });
        }
        unreachable!()
    }

    fn info(&self, pkg: &str, file: &str, size: u64) -> Result<PackageInfo> {
        let path = self.dir.join(file);
        let o = run_cmd(Command::new("dpkg-deb").args(["-f"]).arg(&path).arg("Version"), "dpkg-deb", "dpkg")?;
        let version = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !o.status.success() || version.is_empty() {
            return Err(MasaError::bad_file(&path, format!("not a readable .deb ({}); delete it and retry", tail(&o.stderr))));
        }
        let size = if size > 0 { size } else { std::fs::metadata(&path).at(&path)?.len() };
        Ok(PackageInfo { name: pkg.into(), version, deb_file: file.into(), size, sha256: sha256_file(&path)? })
    }
}

pub(super) fn extract_deb(deb: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).at(dest)?;
    }
    std::fs::create_dir_all(dest).at(dest)?;
    let o = run_cmd(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest), "dpkg-deb", "dpkg")?;
    if !o.status.success() {
        return Err(MasaError::bad_file(deb, format!("`dpkg-deb -x` failed ({}); delete the file and retry", tail(&o.stderr))));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Selection of documents within a domain
// ---------------------------------------------------------------------------------------------

/// How a file unit is cleaned.
pub(super) fn unit_text(u: &Unit) -> Result<Option<String>> {
    match &u.payload {
        Payload::Text(t) => Ok(Some(t.clone())),
        Payload::File(p, fmt) => {
            let bytes = std::fs::read(p).at(p)?;
            let raw = normalize_text(&String::from_utf8_lossy(&bytes));
            Ok(match fmt {
                Format::Rst => Some(clean_rst(&raw)),
                Format::Pod => Some(clean_pod(&raw)),
                Format::Code => {
                    if is_generated(&raw) {
                        None
                    } else {
                        Some(raw)
                    }
                }
            })
        }
    }
}

pub(super) fn unit_size(u: &Unit) -> u64 {
    match &u.payload {
        Payload::Text(t) => t.len() as u64,
        Payload::File(p, _) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
    }
}

pub(super) fn build_domain(
    dom: &str,
    pkgs: &[&str],
    mut sources: Vec<Source>,
    cap: u64,
    max_doc: usize,
    stage: &Path,
) -> Result<DomainInfo> {
    let mut units_available = 0u64;
    let mut bytes_available = 0u64;
    for s in &mut sources {
        s.units.sort_by_cached_key(|u| (split_hash(&format!("{dom}/{}", u.id)), u.id.clone()));
        units_available += s.units.len() as u64;
        bytes_available += s.units.iter().map(unit_size).sum::<u64>();
    }
    let mut taken = vec![0u64; sources.len()];
    let mut cursor = vec![0usize; sources.len()];
    let mut docs: Vec<Document> = Vec::new();
    let mut total = 0u64;
    let mut units_used = 0u64;
    while total < cap {
        let pick = (0..sources.len()).filter(|&i| cursor[i] < sources[i].units.len()).min_by_key(|&i| (taken[i], i));
        let Some(i) = pick else { break };
        let u = &sources[i].units[cursor[i]];
        cursor[i] += 1;
        let Some(text) = unit_text(u)? else { continue };
        let text = tidy(&text);
        if text.is_empty() {
            continue;
        }
        units_used += 1;
        let parts = split_long(&text, max_doc);
        let np = parts.len();
        for (k, part) in parts.into_iter().enumerate() {
            if total >= cap {
                break;
            }
            let source = if np > 1 { format!("{}#part{}", u.id, k + 1) } else { u.id.clone() };
            total += part.len() as u64;
            taken[i] += part.len() as u64;
            docs.push(Document { text: part, domain: dom.to_string(), source, split: Split::Train });
        }
    }
    if docs.is_empty() {
        return Err(MasaError::Fetch {
            asset: format!("corpus domain {dom}"),
            msg: format!("no text found in packages {}: their layout may have changed", pkgs.join(", ")),
        });
    }
    assign_splits(&mut docs);
    let train_file = format!("{dom}.train.jsonl");
    let valid_file = format!("{dom}.valid.jsonl");
    let mut counts = [SplitCounts::default(), SplitCounts::default()];
    let mut bufs = [Vec::new(), Vec::new()];
    for d in &docs {
        let k = (d.split == Split::Valid) as usize;
        counts[k].docs += 1;
        counts[k].bytes += d.text.len() as u64;
        let line = CorpusLine { text: d.text.clone(), domain: d.domain.clone(), source: d.source.clone() };
        serde_json::to_writer(&mut bufs[k], &line).expect("json line");
        bufs[k].push(b'\n');
    }
    write_atomic(&stage.join(&train_file), &bufs[0])?;
    write_atomic(&stage.join(&valid_file), &bufs[1])?;
    let [train, valid] = counts;
    Ok(DomainInfo {
        name: dom.to_string(),
        packages: pkgs.iter().map(|s| s.to_string()).collect(),
        cap_bytes: cap,
        train_file,
        valid_file,
        train,
        valid,
        units_available,
        units_used,
        bytes_available,
        bytes_per_source: sources.iter().zip(&taken).map(|(s, &t)| (s.name.clone(), t)).collect(),
    })
}

/// Cut `text` into parts of at most `max` bytes at paragraph boundaries, else line boundaries,
/// else character boundaries.
pub fn split_long(text: &str, max: usize) -> Vec<String> {
    if text.len() <= max || max == 0 {
        return vec![text.to_string()];
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        let t = cur.trim_matches('\n');
        if !t.trim().is_empty() {
            out.push(t.to_string());
        }
        cur.clear();
    };
    for para in text.split_inclusive("\n\n") {
        if cur.len() + para.len() <= max {
            cur.push_str(para);
            continue;
        }
        flush(&mut cur, &mut out);
        if para.len() <= max {
            cur.push_str(para);
            continue;
        }
        for line in para.split_inclusive('\n') {
            if cur.len() + line.len() > max {
                flush(&mut cur, &mut out);
            }
            if line.len() <= max {
                cur.push_str(line);
            } else {
                let mut rest = line;
                while !rest.is_empty() {
                    let mut cut = rest.len().min(max);
                    while !rest.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    if cut == 0 {
                        cut = rest.chars().next().map(|c| c.len_utf8()).unwrap_or(rest.len());
                    }
                    cur.push_str(&rest[..cut]);
                    flush(&mut cur, &mut out);
                    rest = &rest[cut..];
                }
            }
        }
    }
    flush(&mut cur, &mut out);
    out
}

/// Trailing spaces off every line, runs of blank lines to one, outer blank lines off.
pub(super) fn tidy(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.lines() {
        let l = line.trim_end();
        if l.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(l);
    }
    out
}
