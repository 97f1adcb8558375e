//! Faults (issue 17): a second `masa run` on a locked store, a FIFO given as a model or
//! statistics file, a full disk (a file-size limit, which works unprivileged) and a read-only
//! output directory each end in a clear error, and leave no half-written file behind.

mod train_common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use train_common::{small_config, write_corpus, write_scratch_student};

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
        .chain([model.clone().into_os_string(), "--corpus".into(), corpus.clone().into_os_string(), "--out".into(), out.clone().into_os_string()])
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

/// A read-only output directory: a clear error naming the path, nothing written. (Skipped when
/// the tests run as root, whom permissions do not stop.)
#[test]
fn a_read_only_output_directory_is_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("student");
    write_scratch_student(&model, &small_config(), 5);
    let corpus = dir.path().join("corpus.jsonl");
    write_corpus(&corpus, 20);
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), "x").is_ok() {
        eprintln!("skipped: running as root, a read-only directory is writable");
        return;
    }
    let out = ro.join("run");
    let mut c = Command::new(MASA);
    c.args(["--threads", "2", "train"]).arg(&model).arg("--corpus").arg(&corpus).arg("--out").arg(&out);
    c.args(["--tokens", "256", "--batch", "2", "--seq", "16", "--warmup", "0", "--eval-seqs", "1", "--quiet"]).env("MASA_HOME", dir.path().join("home"));
    let e = failure(&run_within(c, Duration::from_secs(120)));
    assert!(e.contains("Permission denied") && e.contains(&out.display().to_string()), "{e}");
    assert_eq!(tree(&ro), Vec::<String>::new());
}

/// A download subprocess (pip, apt-get) is started so that it dies with masa: the kernel kills
/// it when the thread that started it ends, as when masa is killed mid-download. Here that
/// thread ends at once; the child's 30 s sleep is cut short by SIGKILL.
#[cfg(target_os = "linux")]
#[test]
fn a_download_subprocess_dies_with_masa() {
    use std::os::unix::process::ExitStatusExt;
    let t0 = Instant::now();
    let mut child = std::thread::spawn(|| masa::fetch::dies_with_parent(&mut Command::new("sleep")).arg("30").spawn().expect("sleep")).join().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(20));
}
