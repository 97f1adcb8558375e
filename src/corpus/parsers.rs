//! The default corpus's sources: one function per Debian package layout, and the parsers of
//! their formats (dictd, Jargon File, WordNet, the Bible, fortunes, Info, reStructuredText, POD,
//! source code).

#[allow(unused_imports)]
use super::*;

/// How a file unit is cleaned into text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    Rst,
    Pod,
    Code,
}

pub(super) enum Payload {
    Text(String),
    File(PathBuf, Format),
}

/// A candidate unit of a domain: loaded into one or more documents when selected.
pub(super) struct Unit {
    pub(super) id: String,
    pub(super) payload: Payload,
}

/// One package layout's candidate units.
pub(super) struct Source {
    pub(super) name: String,
    pub(super) units: Vec<Unit>,
}

// ---------------------------------------------------------------------------------------------
// Sources: one function per package layout
// ---------------------------------------------------------------------------------------------

pub(super) fn domain_sources(dom: &str, roots: &BTreeMap<String, PathBuf>) -> Result<Vec<Source>> {
    let r = |p: &str| roots.get(p).cloned().expect("package extracted");
    Ok(match dom {
        "dictionary" => vec![dictd_source("dict-gcide", &r("dict-gcide").join("usr/share/dictd/gcide"))?],
        "glosses" => vec![wordnet_source(&r("wordnet-base"))?],
        "computing" => vec![
            dictd_source("dict-foldoc", &r("dict-foldoc").join("usr/share/dictd/foldoc"))?,
            jargon_source(&r("jargon-text"))?,
            dictd_source("dict-devil", &r("dict-devil").join("usr/share/dictd/devil"))?,
        ],
        "literature" => vec![bible_source(&r("bible-kjv"), &r("bible-kjv-text"))?],
        "quotes" => vec![fortunes_source(&r("fortunes"))?],
        "technical" => vec![
            files_source(
                "linux-doc-6.1",
                &r("linux-doc-6.1").join("usr/share/doc/linux-doc-6.1/html/_sources"),
                &|p| p.ends_with(".rst.txt"),
                Format::Rst,
            )?,
            files_source(
                "python3.11-doc",
                &r("python3.11-doc").join("usr/share/doc/python3.11/html/_sources"),
                &|p| p.ends_with(".rst.txt"),
                Format::Rst,
            )?,
            files_source("perl-doc", &r("perl-doc").join("usr/share/perl"), &|p| p.ends_with(".pod"), Format::Pod)?,
            info_source("gnu-standards", &r("gnu-standards").join("usr/share/info"))?,
            info_source("maxima-doc", &r("maxima-doc").join("usr/share/info"))?,
        ],
        "code" => vec![
            files_source("rust-src", &find_rust_library(&r("rust-src"))?, &|p| p.ends_with(".rs"), Format::Code)?,
            files_source(
                "golang-1.19-src",
                &r("golang-1.19-src").join("usr/share/go-1.19/src"),
                &|p| p.ends_with(".go") && !p.ends_with("_test.go") && !p.contains("/testdata/") && !p.starts_with("testdata/"),
                Format::Code,
            )?,
        ],
        _ => unreachable!("unknown default domain {dom}"),
    })
}

pub(super) fn layout_error(pkg: &str, path: &Path, what: &str) -> MasaError {
    MasaError::Fetch {
        asset: format!("Debian package {pkg}"),
        msg: format!("{}: {what}; the package layout differs from Debian 12's (see docs/assets.md)", path.display()),
    }
}

pub(super) fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).at(path)?;
    let mut d = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
    let mut v = Vec::new();
    d.read_to_end(&mut v).map_err(|e| MasaError::bad_file(path, format!("not valid gzip: {e}")))?;
    Ok(v)
}

/// Decode a dictd index number (base64 digits, most significant first).
pub fn dictd_b64(s: &str) -> Option<u64> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut v: u64 = 0;
    for c in s.bytes() {
        let d = A.iter().position(|&a| a == c)? as u64;
        v = v.checked_mul(64)?.checked_add(d)?;
    }
    Some(v)
}

/// Entries of a dictd database: `(headword, text)`, one per distinct (offset, length) of the
/// index, in file order, without the `00-database-*` metadata entries.
pub fn parse_dictd(index: &str, data: &[u8]) -> Vec<(String, String)> {
    let mut seen = BTreeMap::new();
    for line in index.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 3 {
            continue;
        }
        let hw = f[0];
        if hw.starts_with("00-database") || hw.starts_with("00database") || hw.starts_with("00-") {
            continue;
        }
        let (Some(off), Some(len)) = (dictd_b64(f[1]), dictd_b64(f[2])) else { continue };
        seen.entry((off, len)).or_insert_with(|| hw.to_string());
    }
    let mut out = Vec::new();
    for ((off, len), hw) in seen {
        let (a, b) = (off as usize, (off + len) as usize);
        if b > data.len() || a >= b {
            continue;
        }
        out.push((hw, String::from_utf8_lossy(&data[a..b]).into_owned()));
    }
    out
}

/// Clean a dictd entry: `{cross refs}` to plain words, source tags on their own line
/// (`[1913 Webster]`, `[WordNet 1.5]`, `[PJC]`) dropped, the 3-space body indent removed.
pub fn clean_dict_entry(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') && t.len() <= 32 && !t[1..].contains('[') {
            continue;
        }
        let l = line.strip_prefix("   ").unwrap_or(line);
        out.extend(l.chars().filter(|&c| c != '{' && c != '}'));
        out.push('\n');
    }
    out
}

pub(super) fn dictd_source(pkg: &str, base: &Path) -> Result<Source> {
    let ipath = base.with_extension("index");
    let dpath = base.with_extension("dict.dz");
    if !ipath.is_file() || !dpath.is_file() {
        return Err(layout_error(pkg, &dpath, "dictd files not found"));
    }
    let index = String::from_utf8_lossy(&std::fs::read(&ipath).at(&ipath)?).into_owned();
    let data = read_gz(&dpath)?;
    let units = parse_dictd(&index, &data)
        .into_iter()
        .map(|(hw, text)| Unit { id: format!("{pkg}:{hw}"), payload: Payload::Text(clean_dict_entry(&text)) })
        .collect();
    Ok(Source { name: pkg.into(), units })
}

/// Entries of the Jargon File text: chapters and appendix sections (column-0 headings) and
/// lexicon entries (`   :word: ...`), without list-only blocks (table of contents, glossary index).
pub fn parse_jargon(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut cur: Option<(String, String)> = None;
    let mut push = |cur: &mut Option<(String, String)>| {
        if let Some((k, body)) = cur.take() {
            let lines: Vec<&str> = body.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            let avg = if lines.is_empty() { 0 } else { lines.iter().map(|l| l.len()).sum::<usize>() / lines.len() };
            if lines.len() >= 2 && avg >= 30 {
                out.push((k, body));
            }
        }
    };
    for line in text.lines() {
        let first = line.chars().next();
        let heading = matches!(first, Some(c) if !c.is_whitespace() && !"│├┌└┬┴┼─═".contains(c));
        let entry = line.starts_with("   :") && line[4..].contains(':');
        if heading || entry {
            push(&mut cur);
            let key = if entry {
                let rest = &line[4..];
                rest[..rest.find(':').unwrap()].to_string()
            } else {
                line.trim().to_string()
            };
            cur = Some((key, String::new()));
        }
        if let Some((_, body)) = cur.as_mut() {
            body.push_str(line.strip_prefix("   ").unwrap_or(line));
            body.push('\n');
        }
    }
    push(&mut cur);
    out.into_iter().map(|(k, b)| (k, b.chars().filter(|&c| c != '{' && c != '}').collect())).collect()
}

pub(super) fn jargon_source(root: &Path) -> Result<Source> {
    let p = root.join("usr/share/doc/jargon-text/jargon.txt.gz");
    if !p.is_file() {
        return Err(layout_error("jargon-text", &p, "jargon.txt.gz not found"));
    }
    let text = normalize_text(&String::from_utf8_lossy(&read_gz(&p)?));
    let mut n: BTreeMap<String, usize> = BTreeMap::new();
    let units = parse_jargon(&text)
        .into_iter()
        .map(|(k, b)| {
            let c = n.entry(k.clone()).or_default();
            *c += 1;
            let id = if *c > 1 { format!("jargon-text:{k}#{c}") } else { format!("jargon-text:{k}") };
            Unit { id, payload: Payload::Text(b) }
        })
        .collect();
    Ok(Source { name: "jargon-text".into(), units })
}

/// One WordNet `data.*` line as `(synset id, "words (pos): gloss")`; `None` for header lines.
pub fn parse_wordnet_line(line: &str) -> Option<(String, String)> {
    if line.starts_with(' ') {
        return None;
    }
    let (head, gloss) = line.split_once(" | ")?;
    let f: Vec<&str> = head.split_whitespace().collect();
    if f.len() < 4 {
        return None;
    }
    let pos = match f[2] {
        "n" => "noun",
        "v" => "verb",
        "a" | "s" => "adjective",
        "r" => "adverb",
        _ => return None,
    };
    let w_cnt = usize::from_str_radix(f[3], 16).ok()?;
    let mut words = Vec::new();
    for k in 0..w_cnt {
        let w = f.get(4 + 2 * k)?;
        let w = match w.find('(') {
            Some(i) if w.ends_with(')') => &w[..i],
            _ => w,
        };
        words.push(w.replace('_', " "));
    }
    Some((format!("{}:{}", pos, f[0]), format!("{} ({pos}): {}", words.join(", "), gloss.trim())))
}

pub(super) fn wordnet_source(root: &Path) -> Result<Source> {
    let dir = root.join("usr/share/wordnet");
    let mut units = Vec::new();
    for pos in ["noun", "verb", "adj", "adv"] {
        let p = dir.join(format!("data.{pos}"));
        if !p.is_file() {
            return Err(layout_error("wordnet-base", &p, "WordNet data file not found"));
        }
        let text = String::from_utf8_lossy(&std::fs::read(&p).at(&p)?).into_owned();
        for line in text.lines() {
            if let Some((id, t)) = parse_wordnet_line(line) {
                units.push(Unit { id: format!("wordnet-base:{id}"), payload: Payload::Text(t) });
            }
        }
    }
    Ok(Source { name: "wordnet-base".into(), units })
}

pub(super) const BIBLE_BOOKS: &[(&str, &str)] = &[
    ("Ge", "Genesis"),
    ("Exo", "Exodus"),
    ("Lev", "Leviticus"),
    ("Num", "Numbers"),
    ("Deu", "Deuteronomy"),
    ("Josh", "Joshua"),
    ("Jdgs", "Judges"),
    ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"),
    ("2Sm", "2 Samuel"),
    ("1Ki", "1 Kings"),
    ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"),
    ("2Chr", "2 Chronicles"),
    ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"),
    ("Est", "Esther"),
    ("Job", "Job"),
    ("Psa", "Psalms"),
    ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"),
    ("SSol", "Song of Solomon"),
    ("Isa", "Isaiah"),
    ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"),
    ("Eze", "Ezekiel"),
    ("Dan", "Daniel"),
    ("Hos", "Hosea"),
    ("Joel", "Joel"),
    ("Amos", "Amos"),
    ("Obad", "Obadiah"),
    ("Jonah", "Jonah"),
    ("Mic", "Micah"),
    ("Nahum", "Nahum"),
    ("Hab", "Habakkuk"),
    ("Zep", "Zephaniah"),
    ("Hag", "Haggai"),
    ("Zec", "Zechariah"),
    ("Mal", "Malachi"),
    ("Mat", "Matthew"),
    ("Mark", "Mark"),
    ("Luke", "Luke"),
    ("John", "John"),
    ("Acts", "Acts"),
    ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"),
    ("2Cor", "2 Corinthians"),
    ("Gal", "Galatians"),
    ("Eph", "Ephesians"),
    ("Phi", "Philippians"),
    ("Col", "Colossians"),
    ("1Th", "1 Thessalonians"),
    ("2Th", "2 Thessalonians"),
    ("1Tim", "1 Timothy"),
    ("2Tim", "2 Timothy"),
    ("Titus", "Titus"),
    ("Phmn", "Philemon"),
    ("Heb", "Hebrews"),
    ("Jas", "James"),
    ("1Pet", "1 Peter"),
    ("2Pet", "2 Peter"),
    ("1Jn", "1 John"),
    ("2Jn", "2 John"),
    ("3Jn", "3 John"),
    ("Jude", "Jude"),
    ("Rev", "Revelation"),
];

/// Chapters of the output of `bible -f`: lines `Ge1:1 In the beginning ...` grouped into
/// `("Genesis 1", "Genesis 1\n\n1 In the beginning ...\n2 ...")`.
pub fn parse_bible(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let Some((refr, verse_text)) = line.split_once(' ') else { continue };
        let Some((bc, verse)) = refr.split_once(':') else { continue };
        let digits = bc.len() - bc.bytes().rev().take_while(u8::is_ascii_digit).count();
        let (book, chap) = bc.split_at(digits);
        if book.is_empty() || chap.is_empty() || verse.is_empty() {
            continue;
        }
        let name = BIBLE_BOOKS.iter().find(|(a, _)| *a == book).map(|(_, n)| *n).unwrap_or(book);
        let key = format!("{name} {chap}");
        if out.last().map_or(true, |(k, _)| *k != key) {
            out.push((key.clone(), format!("{key}\n\n")));
        }
        let body = &mut out.last_mut().unwrap().1;
        body.push_str(verse);
        body.push(' ');
        body.push_str(verse_text.trim());
        body.push('\n');
    }
    out
}

pub(super) fn bible_source(prog_root: &Path, text_root: &Path) -> Result<Source> {
    let prog = prog_root.join("usr/bin/bible");
    let data = text_root.join("usr/lib");
    if !prog.is_file() || !data.join("bible.data").is_file() {
        return Err(layout_error("bible-kjv", &prog, "bible program or bible.data not found"));
    }
    let o = Command::new(&prog)
        .arg("-p")
        .arg(&data)
        .args(["-f", "gen1:1-rev22:21"])
        .output()
        .map_err(|e| MasaError::Fetch { asset: "Debian package bible-kjv".into(), msg: format!("running {}: {e}", prog.display()) })?;
    if !o.status.success() {
        return Err(MasaError::Fetch {
            asset: "Debian package bible-kjv".into(),
            msg: format!("{} failed: {}", prog.display(), tail(&o.stderr)),
        });
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let units: Vec<Unit> =
        parse_bible(&text).into_iter().map(|(k, b)| Unit { id: format!("bible-kjv:{k}"), payload: Payload::Text(b) }).collect();
    if units.len() < 1000 {
        return Err(MasaError::Fetch {
            asset: "Debian package bible-kjv".into(),
            msg: format!("{} printed only {} chapters (expected 1189)", prog.display(), units.len()),
        });
    }
    Ok(Source { name: "bible-kjv".into(), units })
}

/// Fortunes of a `%`-separated fortune file.
pub fn parse_fortunes(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim_end() == "%" {
            if !cur.trim().is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

pub(super) fn fortunes_source(root: &Path) -> Result<Source> {
    let dir = root.join("usr/share/games/fortunes");
    if !dir.is_dir() {
        return Err(layout_error("fortunes", &dir, "fortunes directory not found"));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .at(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_none() && std::fs::symlink_metadata(p).map(|m| m.is_file()).unwrap_or(false))
        .collect();
    files.sort();
    let mut units = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = normalize_text(&String::from_utf8_lossy(&std::fs::read(&f).at(&f)?));
        for (i, t) in parse_fortunes(&text).into_iter().enumerate() {
            units.push(Unit { id: format!("fortunes:{name}#{}", i + 1), payload: Payload::Text(t) });
        }
    }
    Ok(Source { name: "fortunes".into(), units })
}

pub(super) fn files_source(pkg: &str, dir: &Path, keep: &dyn Fn(&str) -> bool, fmt: Format) -> Result<Source> {
    if !dir.is_dir() {
        return Err(layout_error(pkg, dir, "directory not found"));
    }
    let mut files = Vec::new();
    collect_files(dir, dir, keep, &mut files)?;
    let units = files
        .into_iter()
        .filter(|(_, p)| std::fs::metadata(p).map(|m| m.len() <= MAX_SOURCE_FILE).unwrap_or(false))
        .map(|(rel, p)| Unit { id: format!("{pkg}:{rel}"), payload: Payload::File(p, fmt) })
        .collect();
    Ok(Source { name: pkg.into(), units })
}

/// Files above this size (mostly generated tables) are left out of file-based sources.
pub(super) const MAX_SOURCE_FILE: u64 = 256 * 1024;

pub(super) fn collect_files(root: &Path, dir: &Path, keep: &dyn Fn(&str) -> bool, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).at(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for e in entries {
        let Ok(m) = std::fs::symlink_metadata(&e) else { continue };
        if m.is_dir() {
            collect_files(root, &e, keep, out)?;
        } else if m.is_file() {
            let rel = e.strip_prefix(root).unwrap_or(&e).to_string_lossy().replace('\\', "/");
            if keep(&rel) {
                out.push((rel, e));
            }
        }
    }
    Ok(())
}

pub(super) fn find_rust_library(root: &Path) -> Result<PathBuf> {
    let src = root.join("usr/src");
    if let Ok(rd) = std::fs::read_dir(&src) {
        let mut c: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path().join("library"))).filter(|p| p.is_dir()).collect();
        c.sort();
        if let Some(p) = c.pop() {
            return Ok(p);
        }
    }
    Err(layout_error("rust-src", &src, "no rustc-*/library directory"))
}

/// Machine-generated source (header says so): left out of the code domain.
pub(super) fn is_generated(src: &str) -> bool {
    let mut end = src.len().min(2048);
    while !src.is_char_boundary(end) {
        end -= 1;
    }
    let head = &src[..end];
    head.contains("DO NOT EDIT") || head.contains("@generated") || head.contains("automatically generated")
}

/// Nodes of a GNU info file: `(node name, text)`, without the preamble, tag tables and index nodes.
pub fn parse_info(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for part in text.split('\u{1f}') {
        let part = part.trim_start_matches(['\n', '\u{c}']);
        let Some((first, body)) = part.split_once('\n') else { continue };
        if !first.starts_with("File:") {
            continue;
        }
        let node = first.split(',').find_map(|f| f.trim().strip_prefix("Node:")).map(|s| s.trim().to_string()).unwrap_or_default();
        if node.is_empty() || node.contains("Index") {
            continue;
        }
        let body: String = body.lines().filter(|l| l.trim() != "* Menu:").collect::<Vec<_>>().join("\n");
        let body = body.replace("\0\u{8}[", "").replace("\0\u{8}]", "");
        let prose = body.lines().filter(|l| !l.starts_with("* ")).map(str::trim).collect::<String>();
        if prose.len() < 100 {
            continue;
        }
        out.push((node, body));
    }
    out
}

pub(super) fn info_source(pkg: &str, dir: &Path) -> Result<Source> {
    if !dir.is_dir() {
        return Err(layout_error(pkg, dir, "info directory not found"));
    }
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).at(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().ends_with(".gz")).collect();
    files.sort();
    let mut units = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().trim_end_matches(".gz").to_string();
        let text = normalize_text(&String::from_utf8_lossy(&read_gz(&f)?));
        for (node, body) in parse_info(&text) {
            units.push(Unit { id: format!("{pkg}:{name}#{node}"), payload: Payload::Text(body) });
        }
    }
    if units.is_empty() {
        return Err(layout_error(pkg, dir, "no info nodes found"));
    }
    Ok(Source { name: pkg.into(), units })
}

/// Light reStructuredText cleanup: roles `:x:`text <t>`` to `text`, ``` ``lit`` ``` to `lit`,
/// labels, comments-only directives (`.. _x:`, `.. SPDX`, `.. index::`, toctree options) and
/// heading under/overlines dropped.
pub fn clean_rst(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_drop_directive = false;
    for line in s.lines() {
        let t = line.trim();
        if in_drop_directive {
            // The directive's block: its options and content, indented, blank lines between.
            if t.is_empty() || line.starts_with(' ') || line.starts_with('\t') {
                continue;
            }
            in_drop_directive = false;
        }
        if let Some(d) = t.strip_prefix(".. ") {
            let drop_block = [
                "toctree::",
                "index::",
                "highlight::",
                "include::",
                "kernel-doc::",
                "only::",
                "raw::",
                "tabularcolumns::",
                "SPDX",
                "sectionauthor::",
                "moduleauthor::",
                "versionchanged::",
                "versionadded::",
            ]
            .iter()
            .any(|x| d.starts_with(x));
            if drop_block {
                in_drop_directive = true;
                continue;
            }
            if d.starts_with('_') && d.ends_with(':') {
                continue;
            }
        }
        if t.len() >= 3 {
            let c = t.chars().next().unwrap();
            if "=-~^*#+\"'`:.".contains(c) && t.chars().all(|x| x == c) {
                continue;
            }
        }
        out.push_str(&strip_rst_inline(line));
        out.push('\n');
    }
    out
}

pub(super) fn strip_rst_inline(line: &str) -> String {
    let mut s = line.replace("``", "");
    // :role:`text <target>` and :role:`text`
    let mut out = String::with_capacity(s.len());
    loop {
        let Some(i) = find_role(&s) else {
            out.push_str(&s);
            break;
        };
        let (pre, rest) = s.split_at(i.0);
        out.push_str(pre);
        let inner_start = i.1;
        let Some(end) = rest[inner_start..].find('`') else {
            out.push_str(rest);
            break;
        };
        let inner = &rest[inner_start..inner_start + end];
        let shown = match (inner.rfind(" <"), inner.ends_with('>')) {
            (Some(k), true) => &inner[..k],
            _ => inner.trim_start_matches(['~', '!']),
        };
        out.push_str(shown);
        s = rest[inner_start + end + 1..].to_string();
    }
    out
}

/// Position of the next `:role:`` ` in `s`: (start of role, offset after the backtick relative
/// to start).
pub(super) fn find_role(s: &str) -> Option<(usize, usize)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b':' {
            let mut j = i + 1;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'-' || b[j] == b'_' || b[j] == b':') {
                j += 1;
            }
            if j < b.len() && j > i + 2 && b[j] == b'`' && b[j - 1] == b':' {
                return Some((i, j + 1 - i));
            }
        }
        i += 1;
    }
    None
}

/// POD to plain text: `=head1 X` to `X`, `=item X` to `X`, other commands dropped, formatting
/// codes (`B<..>`, `C<< .. >>`, `L<text|target>`, `E<lt>`, `X<..>`) resolved.
pub fn clean_pod(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut skip_block = false;
    for line in s.lines() {
        if let Some(cmd) = line.strip_prefix('=') {
            let (name, arg) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
            match name {
                "begin" => skip_block = true,
                "end" => skip_block = false,
                n if n.starts_with("head") || n == "item" => {
                    out.push_str(&pod_inline(arg.trim()));
                    out.push('\n');
                }
                _ => {}
            }
            continue;
        }
        if skip_block {
            continue;
        }
        out.push_str(&pod_inline(line));
        out.push('\n');
    }
    out
}

pub(super) fn pod_inline(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::new();
    pod_span(&c, &mut 0, &mut out, None);
    out
}

/// Parse POD text from `*i` until the closing delimiter (`None`: end of input; `Some(n)`: `n`
/// `>`s, preceded by a space when n > 1).
pub(super) fn pod_span(c: &[char], i: &mut usize, out: &mut String, close: Option<usize>) {
    while *i < c.len() {
        if let Some(n) = close {
            if n == 1 && c[*i] == '>' {
                *i += 1;
                return;
            }
            if n > 1 && c[*i].is_whitespace() && c.len() >= *i + 1 + n && c[*i + 1..*i + 1 + n].iter().all(|&x| x == '>') {
                *i += 1 + n;
                return;
            }
        }
        let ch = c[*i];
        if ch.is_ascii_uppercase() && *i + 1 < c.len() && c[*i + 1] == '<' {
            let code = ch;
            let mut j = *i + 1;
            let mut n = 0;
            while j < c.len() && c[j] == '<' {
                n += 1;
                j += 1;
            }
            let n = if n > 1 && j < c.len() && c[j].is_whitespace() {
                j += 1;
                n
            } else if n > 1 {
                // `X<<` without a space: one `<` opens, the others are text.
                j = *i + 2;
                1
            } else {
                1
            };
            *i = j;
            let mut inner = String::new();
            pod_span(c, i, &mut inner, Some(n));
            match code {
                'X' | 'Z' => {}
                'E' => out.push_str(match inner.as_str() {
                    "lt" => "<",
                    "gt" => ">",
                    "sol" => "/",
                    "verbar" => "|",
                    "quot" => "\"",
                    "amp" => "&",
                    "apos" => "'",
                    _ => "",
                }),
                'L' => {
                    let shown = match inner.split_once('|') {
                        Some((text, _)) => text.to_string(),
                        None => inner.trim_matches('"').to_string(),
                    };
                    out.push_str(&shown);
                }
                _ => out.push_str(&inner),
            }
            continue;
        }
        out.push(ch);
        *i += 1;
    }
}
