//! `masa run`: spec validation names the bad field before any work; a small spec on the real
//! SmolLM2 runs end to end, and a rerun reuses every cached stage and gives the same numbers; a
//! run killed with SIGKILL (during calibration, during a pre-training) continues on rerun to
//! the same numbers.

mod common;

use std::path::{Path, PathBuf};

use masa::run::spec::{FinetuneSpec, Spec, TaskSpec};

fn spec_text(source: &str, corpus: &str, extra_students: &str) -> String {
    format!(
        r#"
name = "e2e"
source = "{source}"
corpus = ["{corpus}"]
students = ["tiny"{extra_students}]
strategies = ["masa", "scratch", "prune"]
seeds = [0, 1]

[calibration]
tokens = 1024
seq_len = 64
batch = 4

[extraction]
ratio = 0.01
lambda = 0.01
max_iter = 10

[pretrain]
budgets = [4096]
batch = 4
seq_len = 32
lr = 5e-3
warmup = 2
eval_every = 16
eval_seqs = 2
"#
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load_err(dir: &Path, text: &str) -> String {
    let p = write(dir, "spec.toml", text);
    Spec::load(p.to_str().unwrap()).unwrap_err().to_string()
}

#[test]
fn builtin_specs_validate() {
    for name in ["default", "quick", "extended", "paper", "medium", "scaling", "controlled"] {
        let s = Spec::load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.name, name);
        assert!(s.seeds.len() >= if name == "quick" { 1 } else { 2 }, "{name}");
    }
    // `gpu` asks for CUDA: valid in a `--features cuda` build, refused with how to build one otherwise.
    match Spec::load("gpu") {
        Ok(s) => assert!(cfg!(feature = "cuda") && s.name == "gpu" && s.seeds.len() == 3 && !s.device.is_cpu()),
        Err(e) => assert!(!cfg!(feature = "cuda") && e.to_string().contains("--features cuda"), "{e}"),
    }
    let d = Spec::load("default").unwrap();
    for s in ["masa", "scratch", "weight-selection", "prune", "distill"] {
        assert!(d.strategies.iter().any(|x| x == s), "default lacks {s}");
    }
    let kinds: Vec<_> = d.finetune.tasks.iter().map(|t| masa::eval::data::find_task(&t.name).unwrap().kind).collect();
    assert!(kinds.contains(&masa::eval::data::TaskKind::MultipleChoice) && kinds.contains(&masa::eval::data::TaskKind::Generation));
}

#[test]
fn invalid_specs_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let ok = spec_text("smollm2-135m", "default", "");
    let p = write(dir.path(), "ok.toml", &ok);
    Spec::load(p.to_str().unwrap()).unwrap();

    let e = load_err(dir.path(), &ok.replace("\"prune\"", "\"lottery\""));
    assert!(e.contains("`strategies`") && e.contains("lottery"), "{e}");

    let shape = write(
        dir.path(),
        "odd.toml",
        "hidden_size = 250\nintermediate_size = 512\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 4\n",
    );
    let e = load_err(dir.path(), &spec_text("smollm2-135m", "default", &format!(", \"{}\"", shape.display())));
    assert!(e.contains("`students`") && e.contains("not divisible"), "{e}");

    let e = load_err(dir.path(), &spec_text("smollm2-135m", "/no/such/corpus.jsonl", ""));
    assert!(e.contains("`corpus`") && e.contains("/no/such/corpus.jsonl"), "{e}");

    let e = load_err(dir.path(), &spec_text("/no/such/model.gguf", "default", ""));
    assert!(e.contains("`source`"), "{e}");

    let e = load_err(dir.path(), &ok.replace("budgets = [4096]", "budgets = [64]"));
    assert!(e.contains("`pretrain.budgets`") && e.contains("one optimizer step"), "{e}");

    let e = load_err(dir.path(), &ok.replace("ratio = 0.01", "ratio = 1.5"));
    assert!(e.contains("`extraction.ratio`"), "{e}");

    let e = load_err(dir.path(), &ok.replace("seeds = [0, 1]", "seeds = [0, 0]"));
    assert!(e.contains("`seeds`"), "{e}");

    let e = load_err(dir.path(), &format!("{ok}\n[[finetune.tasks]]\nname = \"caseholdx\"\nexamples = 4\neval_limit = 4\n"));
    assert!(e.contains("`finetune.tasks.name`") && e.contains("caseholdx"), "{e}");

    // Unknown keys are errors (a typo must not silently fall back to a default).
    let e = load_err(dir.path(), &ok.replace("lr = 5e-3", "lr = 5e-3\nlearning_rate = 1e-3"));
    assert!(e.contains("learning_rate"), "{e}");

    let e = load_err(dir.path(), &format!("{ok}\n[ablations]\ncalibration_domains = [\"poetry\"]\n"));
    assert!(e.contains("`ablations.calibration_domains`") && e.contains("poetry"), "{e}");

    // The same ranges as `masa train`, before any work: 4096 tokens are 32 steps of 4 × 32.
    let e = load_err(dir.path(), &ok.replace("warmup = 2", "warmup = 40"));
    assert!(e.contains("`pretrain`") && e.contains("--warmup 40") && e.contains("0..=32"), "{e}");

    let e = load_err(dir.path(), &ok.replace("max_iter = 10", "max_iter = 10\nmode = \"minibatch\"\nepochs = 0"));
    assert!(e.contains("`extraction`") && e.contains("epochs ≥ 1"), "{e}");
    let e = load_err(dir.path(), &ok.replace("max_iter = 10", "max_iter = 10\nmode = \"stochastic\""));
    assert!(e.contains("stochastic") && e.contains("minibatch"), "{e}");
    let e = load_err(dir.path(), &format!("layer_map = \"middle\"\n{ok}"));
    assert!(e.contains("layer_map") && e.contains("middle") && e.contains("uniform, first"), "{e}");

    let e = Spec::load("no-such-spec").unwrap_err().to_string();

    // Fine-tuning: the task's epochs/lr, else [finetune]'s, else the paper's by task kind.
    let tasks = "\n[[finetune.tasks]]\nname = \"piqa\"\nexamples = 4\neval_limit = 4\n[[finetune.tasks]]\nname = \"instruct_qa\"\nexamples = 1\neval_limit = 1\nepochs = 7\n";
    let s = Spec::load(write(dir.path(), "ft.toml", &format!("{ok}{tasks}")).to_str().unwrap()).unwrap();
    let f = &s.finetune;
    assert_eq!(f.epochs_lr(&f.tasks[0]).unwrap(), (3, 3e-5));
    assert_eq!(f.epochs_lr(&f.tasks[1]).unwrap(), (7, 3e-5));
    let s = Spec::load(
        write(dir.path(), "ft2.toml", &format!("{ok}\n[finetune]\nepochs = 2\nlr = 1e-4\n{}", tasks.trim_start())).to_str().unwrap(),
    )
    .unwrap();
    let f = &s.finetune;
    assert_eq!((f.epochs_lr(&f.tasks[0]).unwrap(), f.epochs_lr(&f.tasks[1]).unwrap()), ((2, 1e-4), (7, 1e-4)));
    let gen = TaskSpec { name: "instruct_qa".into(), examples: 1, eval_limit: 1, epochs: None, lr: None };
    assert_eq!(FinetuneSpec::default().epochs_lr(&gen).unwrap(), (100, 3e-5));
    assert!(e.contains("default") && e.contains("no-such-spec"), "{e}");

    // Training engine: bf16 needs CUDA; CUDA needs a build with the feature; names are checked.
    let e = load_err(dir.path(), &format!("precision = \"bf16\"\n{ok}"));
    assert!(e.contains("`precision`") && e.contains("cuda"), "{e}");
    let e = load_err(dir.path(), &format!("device = \"tpu\"\n{ok}"));
    assert!(e.contains("tpu") && e.contains("cuda:N"), "{e}");
    if !cfg!(feature = "cuda") {
        let e = load_err(dir.path(), &format!("device = \"cuda:1\"\n{ok}"));
        assert!(e.contains("`device`") && e.contains("--features cuda"), "{e}");
    }
}

/// A corpus of real text from this repository: Rust sources and Markdown docs, two domains.
/// A spec file reruns as `masa run <file as given>` (quoted when the shell needs it); a
/// built-in spec as `masa run <name>`.
/// A spec file named like a built-in spec in the current directory is not silently ignored.
#[test]
fn a_file_named_like_a_builtin_spec_is_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "quick", &spec_text("smollm2-135m", "default", ""));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
        .args(["run", "quick", "--plan"])
        .current_dir(dir.path())
        .env("MASA_HOME", dir.path().join("home"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("both a built-in spec and a file") && e.contains("./quick"), "{e}");
}

#[test]
fn spec_knows_the_command_that_runs_it() {
    assert_eq!(Spec::load("quick").unwrap().command(), "masa run quick");
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "mine.toml", &spec_text("smollm2-135m", "default", ""));
    let s = Spec::load(p.to_str().unwrap()).unwrap();
    assert_eq!(s.name, "e2e");
    assert_eq!(s.command(), format!("masa run {}", p.display()));
    let spaced = dir.path().join("my specs");
    std::fs::create_dir(&spaced).unwrap();
    let p = write(&spaced, "it's.toml", &spec_text("smollm2-135m", "default", ""));
    assert_eq!(Spec::load(p.to_str().unwrap()).unwrap().command(), format!("masa run '{}/my specs/it'\\''s.toml'", dir.path().display()));
    // Not part of the spec's content: results.json's "spec" field does not carry it.
    assert!(serde_json::to_value(&s).unwrap().get("file").is_none());
}

/// Spectra default to the first, middle and last mapped source layer; an explicit list wins.
#[test]
fn spectra_layers_default_to_first_middle_last() {
    let mut e = Spec::load("default").unwrap().extraction;
    assert!(e.spectra_layers.is_empty());
    // The default 6-layer student reads SmolLM2 layers round(t · 29 / 5).
    assert_eq!(e.spectra_layers_for(&[0, 6, 12, 17, 23, 29]), vec![0, 17, 29]);
    assert_eq!(e.spectra_layers_for(&[0, 15, 29]), vec![0, 15, 29]);
    assert_eq!(e.spectra_layers_for(&[0, 29]), vec![0, 29]);
    assert_eq!(e.spectra_layers_for(&[4]), vec![4]);
    assert!(e.spectra_layers_for(&[]).is_empty());
    e.spectra_layers = vec![3, 7];
    assert_eq!(e.spectra_layers_for(&[0, 6, 12, 17, 23, 29]), vec![3, 7]);
}

fn entry(name: &str, dtype: &str) -> masa::source::TensorEntry {
    masa::source::TensorEntry { name: name.into(), shape: vec![4, 4], dtype: dtype.into() }
}

/// The notes a report carries say only what applies to the spec's source, corpus and tasks.
#[test]
fn notes_depend_on_the_spec_source_corpus_and_tasks() {
    use masa::source::Arch;
    let default = Spec::load("default").unwrap();
    let quantized = [
        entry("model.embed_tokens.weight", "Q8_0"),
        entry("model.layers.0.mlp.up_proj.weight", "Q4_1"),
        entry("model.layers.0.mlp.down_proj.weight", "Q4_1"),
        entry("model.norm.weight", "F32"),
    ];
    let notes = masa::run::notes(&default, Arch::Llama, &quantized).join("\n");
    assert!(
        notes.contains("The source (smollm2-135m, llama) is dense") && notes.contains("obtainable through the package registries"),
        "{notes}"
    );
    assert!(
        notes.contains("quantized (smollm2-135m: Q4_1 for 2 tensors, Q8_0 for model.embed_tokens.weight), dequantized to f32"),
        "{notes}"
    );
    assert!(notes.contains("Debian-package corpus"), "{notes}");
    // The default spec fine-tunes on PIQA and instruct_qa, not on MMLU professional_law.
    assert!(notes.contains("instruct_qa (answer generation") && !notes.contains("CaseHOLD"), "{notes}");

    // Your own unquantized model and corpus, no fine-tuning: nothing about SmolLM2, Debian or tasks.
    let dir = tempfile::tempdir().unwrap();
    let corpus = write(dir.path(), "mine.jsonl", "{\"text\": \"hello\", \"domain\": \"x\"}\n");
    let mine = Spec { source: "/models/my-llama".into(), corpus: vec![corpus.display().to_string()], ..default.clone() };
    let mine = Spec { finetune: masa::run::spec::FinetuneSpec::default(), ..mine };
    let plain = [entry("model.embed_tokens.weight", "BF16"), entry("model.norm.weight", "F32")];
    let notes = masa::run::notes(&mine, Arch::Qwen2, &plain);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("The source (/models/my-llama, qwen2) is dense") && !notes[0].contains("registries"), "{notes:?}");
    // An MoE source: no MoE note either; a task set with MMLU professional_law: the CaseHOLD note.
    let mut law = mine.clone();
    law.finetune.tasks =
        vec![masa::run::spec::TaskSpec { name: "mmlu_professional_law".into(), examples: 8, eval_limit: 8, epochs: None, lr: None }];
    assert_eq!(
        masa::run::notes(&law, Arch::Olmoe, &plain),
        vec!["CaseHOLD is not obtainable: MMLU professional_law stands in for it.".to_string()]
    );
}

fn repo_corpus(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut lines = Vec::new();
    for (domain, sub, ext) in [("code", "src", "rs"), ("docs", "docs", "md")] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for chunk in text.split("\n\n").filter(|c| c.len() > 40) {
                lines.push(serde_json::json!({"text": chunk, "domain": domain}).to_string());
            }
        }
    }
    write(dir, "corpus.jsonl", &(lines.join("\n") + "\n"))
}

#[test]
fn small_spec_runs_end_to_end_and_reruns_from_cache() {
    let source = masa::fetch::resolve_model("smollm2-135m").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let corpus = repo_corpus(dir.path());
    let spec_path = write(dir.path(), "e2e.toml", &spec_text(source.to_str().unwrap(), corpus.to_str().unwrap(), ""));
    let spec = Spec::load(spec_path.to_str().unwrap()).unwrap();
    let runs = dir.path().join("runs");

    let (first, out) = masa::run::run(&spec, &runs, &|r, d| masa::report::write_report(r, d).map(|_| ())).unwrap();
    assert!(first.complete);
    assert_eq!(first.trainings.len(), 3 * 2);
    assert_eq!(first.calibrations.len(), 1);
    assert_eq!(first.extractions.len(), 1);
    let ex = &first.extractions[0];
    // tiny has 2 layers: the uniform map reads the source's first and last layer.
    assert_eq!(ex.layers, vec![0, 29]);
    assert_eq!(ex.matrices, 6);
    assert!(ex.median_rel_l_out > 0.0 && ex.median_rel_l_out < 1.0, "{}", ex.median_rel_l_out);
    assert_eq!(first.spectra.len(), 6);
    for s in &first.spectra {
        assert_eq!(s.source.len(), s.gene.len());
        assert!(s.source.windows(2).all(|w| w[0] >= w[1]) && s.gene.iter().all(|v| v.is_finite()));
    }
    for t in &first.trainings {
        // init point + every 16 steps of 32 (4096 tokens / (4 × 32)).
        assert_eq!(t.curve.iter().map(|p| p.tokens).collect::<Vec<_>>(), vec![0, 2048, 4096], "{}", t.strategy);
        assert_eq!(t.curve[0].val.len(), 2, "two validation domains");
        assert!(t.curve.iter().all(|p| p.val_mean.is_finite()));
        assert!(
            t.curve[2].val_mean < t.curve[0].val_mean,
            "{} did not learn: {:?}",
            t.strategy,
            t.curve.iter().map(|p| p.val_mean).collect::<Vec<_>>()
        );
    }
    let at = |s: &str, seed: u64| first.trainings.iter().find(|t| t.strategy == s && t.seed == seed).unwrap();
    // Seeds change the init (and the data order); strategies change the init.
    assert_ne!(at("scratch", 0).curve[0].val_mean, at("scratch", 1).curve[0].val_mean);
    assert_ne!(at("masa", 0).curve[0].val_mean, at("scratch", 0).curve[0].val_mean);
    // Pruning is deterministic (no seed in its init): its two seeds start from the same point.
    assert_eq!(at("prune", 0).curve[0].val_mean, at("prune", 1).curve[0].val_mean);
    assert_ne!(at("prune", 0).curve[0].val_mean, at("scratch", 0).curve[0].val_mean);
    assert!(out.join("results.json").is_file());

    // Rerun: every stage cached, identical numbers, no new artifacts.
    let count = || std::fs::read_dir(runs.join("artifacts")).unwrap().count();
    let before = count();
    let t0 = std::time::Instant::now();
    let (second, _) = masa::run::run(&spec, &runs, &|r, d| masa::report::write_report(r, d).map(|_| ())).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(count(), before);
    assert!(secs < 20.0, "cached rerun took {secs:.1} s");
    let inv: Vec<usize> = second.invocations.iter().map(|i| i.stages_computed).collect();
    // First run: 1 calibration + 1 extraction + 6 inits + 6 pre-trainings; the rerun: none.
    assert_eq!(inv, vec![first.invocations[0].stages_computed, 0]);
    assert_eq!(first.invocations[0].stages_computed, 1 + 1 + 6 + 6);
    assert_eq!(serde_json::to_value(&first.trainings).unwrap(), serde_json::to_value(&second.trainings).unwrap());
    assert_eq!(serde_json::to_value(&first.spectra).unwrap(), serde_json::to_value(&second.spectra).unwrap());

    // A damaged file of a finished stage (a truncated checkpoint) is detected: that stage alone
    // is recomputed, to the same numbers.
    let train_dir = std::fs::read_dir(runs.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("train-"))
        .min()
        .unwrap();
    let ck = std::fs::read_dir(&train_dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.join("model.safetensors").is_file()).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(ck.join("model.safetensors")).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    drop(f);
    let (fourth, _) = masa::run::run(&spec, &runs, &|r, d| masa::report::write_report(r, d).map(|_| ())).unwrap();
    assert_eq!(fourth.invocations.last().unwrap().stages_computed, 1);
    let curves = |r: &masa::run::results::RunResults| {
        r.trainings.iter().map(|t| (t.strategy.clone(), t.seed, t.curve.iter().map(|p| p.val_mean).collect::<Vec<_>>())).collect::<Vec<_>>()
    };
    assert_eq!(curves(&first), curves(&fourth));
    // A same-size edit (one digit of a cached metrics.jsonl) is detected by content too.
    let metrics = train_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let at = text.find("\"val_mean\":").unwrap() + 12;
    let digit = text[at..].find(|c: char| c.is_ascii_digit()).unwrap() + at;
    let mut bytes = text.into_bytes();
    bytes[digit] = if bytes[digit] == b'9' { b'8' } else { bytes[digit] + 1 };
    std::fs::write(&metrics, &bytes).unwrap();
    let (edited, _) = masa::run::run(&spec, &runs, &|r, d| masa::report::write_report(r, d).map(|_| ())).unwrap();
    assert_eq!(edited.invocations.last().unwrap().stages_computed, 1);
    assert_eq!(curves(&first), curves(&edited));

    // Another spec with the same name (here: one seed) in the same runs directory: the earlier
    // results, report and plots are kept aside, not overwritten, and the history starts again
    // (its stages all come from the shared store).
    let one_seed = write(
        dir.path(),
        "e2e-one-seed.toml",
        &spec_text(source.to_str().unwrap(), corpus.to_str().unwrap(), "").replace("seeds = [0, 1]", "seeds = [0]"),
    );
    let spec1 = Spec::load(one_seed.to_str().unwrap()).unwrap();
    let (fifth, out5) = masa::run::run(&spec1, &runs, &|r, d| masa::report::write_report(r, d).map(|_| ())).unwrap();
    assert_eq!(fifth.invocations.iter().map(|i| i.stages_computed).collect::<Vec<_>>(), vec![0]);
    let aside: Vec<PathBuf> = std::fs::read_dir(&out5)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("superseded-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = masa::run::results::RunResults::load(&aside[0].join("results.json")).unwrap();
    assert_eq!((kept.trainings.len(), kept.invocations.len()), (6, 4));
    assert!(aside[0].join("report.md").is_file());

    // Same inputs from scratch (fresh store), through the CLI, killed with SIGKILL during the
    // calibration and again during a pre-training (after its first checkpoint), then rerun: the
    // run continues, recomputes no finished stage, and ends with the numbers of the
    // uninterrupted run (determinism and recovery, issue 17).
    let runs2 = dir.path().join("runs2");
    let cli = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_masa"));
        c.arg("run").arg(&spec_path).arg("--runs").arg(&runs2).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        c
    };
    let stage_dirs = |prefix: &str| common::stage_dirs(&runs2, prefix);
    common::kill_when(cli(), "the calibration", &|| !stage_dirs("calibrate-").is_empty());
    common::kill_when(cli(), "a pre-training's first checkpoint", &|| {
        stage_dirs("train-").iter().any(|d| d.join("latest").is_file() && !d.join("record.json").exists())
    });
    let calibration = stage_dirs("calibrate-")[0].join("record.json");
    let finished = std::fs::metadata(&calibration).expect("calibration finished before training").modified().unwrap();
    assert!(cli().status().unwrap().success());
    assert_eq!(std::fs::metadata(&calibration).unwrap().modified().unwrap(), finished, "the finished calibration was recomputed");
    assert_eq!(stage_dirs("train-").len(), 6);
    let third: masa::run::results::RunResults = serde_json::from_slice(&std::fs::read(runs2.join("e2e/results.json")).unwrap()).unwrap();
    assert!(third.complete);
    assert_eq!(curves(&first), curves(&third));
}

/// The plan lists student × strategy pairs that cannot run (selection or pruning of a student
/// larger than the source) and flags a distillation teacher smaller than the student; `masa
/// run` refuses such a spec before any work, naming the fields.
#[test]
fn plan_lists_infeasible_combinations_and_run_refuses_them() {
    let source = masa::fetch::resolve_model("smollm2-135m").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let corpus = repo_corpus(dir.path());
    let text = spec_text(source.to_str().unwrap(), corpus.to_str().unwrap(), ", \"paper-12l-1024\"")
        .replace(r#"strategies = ["masa", "scratch", "prune"]"#, r#"strategies = ["masa", "scratch", "prune", "distill", "eep"]"#);
    let spec = Spec::load(write(dir.path(), "big.toml", &text).to_str().unwrap()).unwrap();
    let plan_text = masa::run::plan::render_plan(&spec).unwrap();
    assert!(plan_text.contains("cannot run (3;"), "{plan_text}");
    // EEP needs a mixture-of-experts source: on the dense SmolLM2 it cannot run for any student.
    assert!(plan_text.contains("student `tiny` × strategy `eep`: EEP prunes the experts of a mixture-of-experts source"), "{plan_text}");
    assert!(plan_text.contains("`prune` is the pruning baseline for dense sources"), "{plan_text}");
    assert!(
        plan_text.contains("student `paper-12l-1024` × strategy `prune`: the student is larger than the source (hidden size 1024 > 576"),
        "{plan_text}"
    );
    assert!(
        plan_text.contains("note: student `paper-12l-1024`") && plan_text.contains("larger than its distillation teacher"),
        "{plan_text}"
    );
    assert!(!plan_text.contains("student `tiny` × strategy `prune`"), "{plan_text}");
    let err = masa::run::run(&spec, &dir.path().join("runs"), &|_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains("`students` × `strategies`") && err.contains("paper-12l-1024") && err.contains("--plan"), "{err}");
}

/// `skip_infeasible = true` leaves out the pairs that cannot run (and says so) instead of
/// refusing; `layer_map` applies to every strategy and decides which source layers get genes.
#[test]
fn plan_skips_infeasible_pairs_and_follows_the_layer_map() {
    let source = masa::fetch::resolve_model("smollm2-135m").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let corpus = repo_corpus(dir.path());
    let text = format!(
        "skip_infeasible = true\nlayer_map = \"first\"\n{}",
        spec_text(source.to_str().unwrap(), corpus.to_str().unwrap(), ", \"paper-12l-1024\"")
    );
    let spec = Spec::load(write(dir.path(), "skip.toml", &text).to_str().unwrap()).unwrap();
    let model = masa::source::SourceModel::open(&source).unwrap();
    let plan = masa::run::plan::Plan::of(&spec, &model).unwrap();
    assert_eq!(plan.infeasible.len(), 1, "{:?}", plan.infeasible);
    assert!(plan.infeasible[0].contains("`paper-12l-1024` × strategy `prune`"), "{:?}", plan.infeasible);
    let pairs: Vec<(&str, &str)> = plan.jobs.iter().map(|j| (j.student.as_str(), j.strategy.as_str())).collect();
    assert!(
        !pairs.contains(&("paper-12l-1024", "prune")) && pairs.contains(&("tiny", "prune")) && pairs.contains(&("paper-12l-1024", "masa")),
        "{pairs:?}"
    );
    // `first`: student layer t inherits source layer t, for every strategy.
    assert_eq!(plan.layers, (0..12).collect::<Vec<_>>());
    assert!(plan.jobs.iter().all(|j| j.init.layer_map() == masa::init::LayerMap::First));
    let plan_text = masa::run::plan::render_plan(&spec).unwrap();
    assert!(!plan_text.contains("cannot run") && plan_text.contains("left out (skip_infeasible = true; 1)"), "{plan_text}");
}

/// `extraction.mode = "minibatch"` runs the paper's procedure inside `masa run` (replaying the
/// calibration stream) and caches it apart from exact-mode genes.
#[test]
fn spec_runs_minibatch_extraction() {
    let source = masa::fetch::resolve_model("smollm2-135m").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let corpus = repo_corpus(dir.path());
    let exact = spec_text(source.to_str().unwrap(), corpus.to_str().unwrap(), "")
        .replace(r#"strategies = ["masa", "scratch", "prune"]"#, r#"strategies = ["masa"]"#)
        .replace("seeds = [0, 1]", "seeds = [0]");
    let minibatch = exact.replace("max_iter = 10", "max_iter = 10\nmode = \"minibatch\"\nepochs = 2\nlr = 1e-3");
    let runs = dir.path().join("runs");
    let mut genes = Vec::new();
    for (name, text) in [("mb.toml", &minibatch), ("exact.toml", &exact)] {
        let spec = Spec::load(write(dir.path(), name, text).to_str().unwrap()).unwrap();
        let (r, _) = masa::run::run(&spec, &runs, &|_, _| Ok(())).unwrap();
        assert_eq!(r.trainings.len(), 1);
        let x = &r.extractions[0];
        assert!(x.median_rel_l_out.is_finite() && x.matrices > 0, "{x:?}");
        genes.push((x.cache_key.clone(), x.median_rel_l_out));
    }
    assert_ne!(genes[0].0, genes[1].0, "minibatch and exact genes must not share a cache entry");
    // Two Adam epochs from a random init do not reach the closed form's optimum.
    assert!(genes[0].1 > genes[1].1, "{genes:?}");
}
