//! `masa eval` end to end on a tiny student checkpoint (`masa::student::save_checkpoint`) with
//! small task files the tests write themselves, plus the bad-input errors. The tokenizer is
//! SmolLM2's (`masa fetch smollm2-135m`; without it the tests that need it skip, or fail under
//! `CI=true`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use candle_core::{Device, IndexOp, Tensor, D};
use masa::eval::multiple_choice::{build_item, encode_pair, score_item};
use masa::source::model::{KvCache, NoHooks, Transformer};
use masa::source::tokenizer::Tokenizer;
use masa::source::SourceModel;
use masa::student::{save_checkpoint, StudentConfig};

fn smollm2_tokenizer() -> Option<Tokenizer> {
    let p = common::model_asset(common::SMOLLM2.0, common::SMOLLM2.1)?;
    Some(SourceModel::open(&p).unwrap().tokenizer)
}

/// A `tiny` student with random weights and `vocab` embedding rows.
fn write_student(dir: &Path, tok: &Tokenizer, vocab: usize, seed: u64) {
    let mut cfg = StudentConfig::preset("tiny").unwrap();
    cfg.vocab_size = vocab;
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let tensors: Vec<(String, Tensor)> = cfg
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("norm.weight") { vec![1.0; n] } else { (0..n).map(|_| 0.1 * next()).collect() };
            (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect();
    save_checkpoint(dir, &cfg, &tensors, tok, &serde_json::json!({"test": "eval"})).unwrap();
}

fn strings(v: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}

fn write_arrow(path: &Path, cols: Vec<(&str, ArrayRef)>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(f, &batch.schema()).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
}

/// One `MASA_HOME` for this test binary (tests run on threads of one process), holding small
/// PIQA and WinoGrande files. The models directory links to the real one for the tokenizer.
fn home() -> &'static PathBuf {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        let real = masa::home::masa_home();
        let dir = tempfile::tempdir().unwrap().keep();
        std::os::unix::fs::symlink(real.join("models"), dir.join("models")).ok();
        let t = dir.join("tasks");
        let goals: Vec<String> = (0..8).map(|i| format!("How do you open jar number {i}?")).collect();
        let g: Vec<&str> = goals.iter().map(String::as_str).collect();
        write_arrow(
            &t.join("piqa/validation.arrow"),
            vec![
                ("goal", strings(&g)),
                ("sol1", strings(&["Twist the lid."; 8])),
                ("sol2", strings(&["Eat the lid with a spoon."; 8])),
                ("label", Arc::new(Int64Array::from(vec![0i64, 1, 0, 1, 0, 0, 1, 1])) as ArrayRef),
            ],
        );
        write_arrow(
            &t.join("winogrande/validation.arrow"),
            vec![
                ("sentence", strings(&["Sarah was a better surgeon than Maria so _ got the hard cases."; 4])),
                ("option1", strings(&["Sarah"; 4])),
                ("option2", strings(&["Maria"; 4])),
                ("answer", strings(&["1", "2", "1", "2"])),
            ],
        );
        let ni = t.join("instruct_qa/subtask001_test");
        std::fs::create_dir_all(&ni).unwrap();
        std::fs::write(
            ni.join("task.json"),
            r#"{"task_prefix": "Definition: Repeat the word.", "examples": [{"input": "apple", "target": ["apple"]}, {"input": "pear", "target": ["pear", "a pear"]}, {"input": "fig", "target": ["fig"]}]}"#,
        )
        .unwrap();
        std::env::set_var("MASA_HOME", &dir);
        dir
    })
}

fn student(vocab_delta: isize) -> Option<(tempfile::TempDir, Tokenizer)> {
    let tok = smollm2_tokenizer()?;
    home();
    let d = tempfile::tempdir().unwrap();
    let vocab = (tok.vocab_size() as isize + vocab_delta) as usize;
    write_student(&d.path().join("ckpt"), &tok, vocab, 7);
    Some((d, tok))
}

/// Independent reference: full forward of `ctx ++ cont` (no cache), log-softmax, sum.
fn reference_ll(m: &Transformer, ctx: &[u32], cont: &[u32]) -> f64 {
    let ids: Vec<u32> = ctx.iter().chain(cont).copied().collect();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let lp = candle_nn::ops::log_softmax(&m.forward(&x, &mut NoHooks).unwrap().squeeze(0).unwrap(), D::Minus1).unwrap();
    let lp: Vec<Vec<f32>> = lp.to_vec2().unwrap();
    cont.iter().enumerate().map(|(j, &t)| lp[ctx.len() - 1 + j][t as usize] as f64).sum()
}

#[test]
fn cached_forward_matches_full() {
    let Some((d, _)) = student(0) else { return };
    let src = SourceModel::open(&d.path().join("ckpt")).unwrap();
    let m = Transformer::load(&src.weights).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| 100 + 37 * i).collect();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = m.forward(&x, &mut NoHooks).unwrap();
    let mut cache = KvCache::new();
    let a = m.forward_cached(&x.i((.., 0..7)).unwrap(), &mut cache).unwrap();
    let b = m.forward_cached(&x.i((.., 7..12)).unwrap(), &mut cache).unwrap();
    assert_eq!(cache.len(), 12);
    let got = Tensor::cat(&[a, b], 1).unwrap();
    let diff = (got - full).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "max |cached - full| = {diff}");
}

#[test]
fn multiple_choice_scores_match_full_forward_reference() {
    let Some((d, tok)) = student(0) else { return };
    let src = SourceModel::open(&d.path().join("ckpt")).unwrap();
    let m = Transformer::load(&src.weights).unwrap();
    let rows = [
        (
            "hellaswag",
            r#"{"activity_label":"Removing ice","ctx_a":"A man is standing by a car.","ctx_b":"then he","endings":["scrapes the ice [step] off.","eats the car.","sings loudly to the moon tonight.","x"],"label":"0"}"#,
        ),
        ("piqa", r#"{"goal":"Open a jar","sol1":"Twist the lid.","sol2":"Hit it with a very large hammer.","label":0}"#),
        (
            "winogrande",
            r#"{"sentence":"The cup did not fit in the box because _ was too big.","option1":"the cup","option2":"the box","answer":"1"}"#,
        ),
    ];
    for (task, row) in rows {
        let item = build_item(task, &serde_json::from_str(row).unwrap(), 3).unwrap();
        let got = score_item(&m, &tok, &item).unwrap();
        for (i, (ctx, cont)) in item.contexts.iter().cycle().zip(&item.continuations).enumerate() {
            let (a, b) = encode_pair(&tok, ctx, cont, false).unwrap();
            let want = reference_ll(&m, &a, &b);
            assert!((got.lls[i] - want).abs() < 1e-3, "{task} choice {i}: {} vs {want}", got.lls[i]);
            assert_eq!(got.tokens[i], b.len());
        }
        let best = (0..got.lls.len()).fold(0, |b, i| if got.lls[i] > got.lls[b] { i } else { b });
        assert_eq!(got.pred, best);
    }
}

#[test]
fn eval_command_runs_on_a_student_checkpoint() {
    let Some((d, _)) = student(0) else { return };
    let out = d.path().join("results.json");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
        .env("MASA_HOME", home())
        .args(["eval"])
        .arg(d.path().join("ckpt"))
        .args(["--tasks", "piqa,winogrande,instruct_qa", "--split", "all", "--limit", "5", "--max-new-tokens", "6", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["split"], "all");
    assert_eq!(r["limit"], 5);
    assert!(r["prompt_format_version"].as_str().unwrap().starts_with("masa-eval-v1"));
    assert_eq!(r["tasks"]["piqa"]["n_items"], 5);
    assert_eq!(r["tasks"]["winogrande"]["n_items"], 4);
    let ni = &r["tasks"]["instruct_qa"];
    assert_eq!(ni["n_items"], 3);
    for it in ni["items"].as_array().unwrap() {
        let (p, n) = (it["prediction"].as_str().unwrap(), it["new_tokens"].as_u64().unwrap());
        assert!(n >= 1 && n <= 6 && !p.contains('\n'), "{it}");
        let targets: Vec<String> = it["targets"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        assert!((it["rouge_l"].as_f64().unwrap() - 100.0 * masa::rouge::rouge_l_multi(p, &targets)).abs() < 1e-9);
        // The answer's teacher-forced log-likelihood: " " + first target, at least one token.
        assert!(it["answer_tokens"].as_u64().unwrap() >= 1 && it["answer_logprob"].as_f64().unwrap() < 0.0, "{it}");
    }
    let (lp, toks) = ni["items"]
        .as_array()
        .unwrap()
        .iter()
        .fold((0.0, 0), |(l, t), it| (l + it["answer_logprob"].as_f64().unwrap(), t + it["answer_tokens"].as_u64().unwrap()));
    assert!((ni["metrics"]["answer_nll"].as_f64().unwrap() + lp / toks as f64).abs() < 1e-12);
    let items = r["tasks"]["piqa"]["items"].as_array().unwrap();
    assert_eq!(items.iter().map(|i| i["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    let acc = r["tasks"]["piqa"]["metrics"]["acc"].as_f64().unwrap();
    let want = items.iter().filter(|i| i["pred"] == i["gold"]).count() as f64 / 5.0;
    assert!((acc - want).abs() < 1e-12);
    // The test split is the recorded hash rule applied to file indices.
    let test: Vec<usize> = (0..8).filter(|&i| masa::eval::data::is_test("piqa", i)).collect();
    let r = masa::eval::evaluate_path(
        &d.path().join("ckpt"),
        "ckpt",
        &["piqa"],
        &masa::eval::EvalOptions { limit: masa::eval::Limit::All, progress: false, ..Default::default() },
    )
    .unwrap();
    let idx: Vec<usize> = r["tasks"]["piqa"]["items"].as_array().unwrap().iter().map(|i| i["index"].as_u64().unwrap() as usize).collect();
    assert_eq!(idx, test);
}

#[test]
fn unknown_task_is_a_clear_error() {
    let msg = masa::eval::parse_tasks("piqa,casehold").unwrap_err().to_string();
    assert!(msg.contains("unknown task `casehold`") && msg.contains("mmlu_professional_law"), "{msg}");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
        .args(["eval", "nonexistent-model", "--tasks", "bogus", "--out", "/dev/null"])
        .output()
        .unwrap();
    assert!(!st.status.success());
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("unknown task `bogus`"), "{err}");
}

#[test]
fn malformed_task_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("garbage.arrow");
    std::fs::write(&p, b"this is not arrow").unwrap();
    let msg = masa::eval::data::read_arrow_rows(&p).unwrap_err().to_string();
    assert!(msg.contains("garbage.arrow") && msg.contains("not an Arrow IPC stream"), "{msg}");

    let p = dir.path().join("piqa.arrow");
    write_arrow(&p, vec![("goal", strings(&["Open a jar"])), ("sol1", strings(&["Twist."]))]);
    let rows = masa::eval::data::read_arrow_rows(&p).unwrap();
    let msg = build_item("piqa", &rows[0], 0).unwrap_err().to_string();
    assert!(msg.contains("piqa item 0") && msg.contains("`sol2` missing"), "{msg}");

    let row = serde_json::from_str(r#"{"sentence":"no blank here","option1":"a","option2":"b","answer":"1"}"#).unwrap();
    let msg = build_item("winogrande", &row, 4).unwrap_err().to_string();
    assert!(msg.contains("no `_` blank"), "{msg}");

    let p = dir.path().join("medmcqa.jsonl.gz");
    std::fs::write(&p, b"not gzip").unwrap();
    let msg = masa::eval::data::read_medmcqa(&p).unwrap_err().to_string();
    assert!(msg.contains("medmcqa.jsonl.gz") && msg.contains("gzip"), "{msg}");

    let sub = dir.path().join("task.json");
    std::fs::write(&sub, r#"{"task_prefix": "Definition: x", "examples": [{"input": "a"}]}"#).unwrap();
    let msg = masa::eval::data::read_gen_subtask(&sub, "subtask000").err().unwrap().to_string();
    assert!(msg.contains("examples[0].target"), "{msg}");
}

#[test]
fn vocabulary_mismatch_is_a_clear_error() {
    let Some((d, tok)) = student(-100) else { return };
    let msg = masa::eval::evaluate_path(&d.path().join("ckpt"), "ckpt", &["piqa"], &Default::default()).unwrap_err().to_string();
    assert!(msg.contains(&format!("the tokenizer has {} tokens", tok.vocab_size())) && msg.contains("do not belong together"), "{msg}");
}

#[test]
fn missing_task_data_fails_before_any_work() {
    let Some((d, _)) = student(0) else { return };
    let opt = masa::eval::EvalOptions { progress: false, ..Default::default() };
    let msg = masa::eval::evaluate_path(&d.path().join("ckpt"), "ckpt", &["piqa", "hellaswag"], &opt).unwrap_err().to_string();
    assert!(msg.contains("task `hellaswag`") && msg.contains("run `masa fetch tasks`"), "{msg}");
}

#[test]
fn finetune_pairs_come_from_the_training_part_only() {
    home();
    let labels = [0usize, 1, 0, 1, 0, 0, 1, 1];
    let train: Vec<usize> = (0..8).filter(|&i| !masa::eval::data::is_test("piqa", i)).collect();
    let pairs = masa::eval::finetune_pairs("piqa", None).unwrap();
    assert_eq!(pairs.len(), train.len(), "one pair per training item, none from the test part");
    for ((prompt, response), &i) in pairs.iter().zip(&train) {
        assert_eq!(prompt, &format!("Question: How do you open jar number {i}?\nAnswer:"));
        let gold = if labels[i] == 0 { " Twist the lid." } else { " Eat the lid with a spoon." };
        assert_eq!(response, gold, "item {i}: the gold continuation, as the evaluation scores it");
    }
    let ni = masa::eval::finetune_pairs("instruct_qa", None).unwrap();
    let ni_train = (0..3).filter(|&i| !masa::eval::data::is_test("subtask001_test", i)).count();
    assert_eq!(ni.len(), ni_train);
    assert!(ni.iter().all(|(p, r)| p.starts_with("Definition: Repeat the word.") && p.ends_with("Output:") && r.starts_with(' ')));
    let err = masa::eval::finetune_pairs("perplexity", None).unwrap_err().to_string();
    assert!(err.contains("not a fine-tuning task"), "{err}");
}

/// `masa eval --device cuda` in a build without the `cuda` feature is refused naming how to
/// build one (with the feature but no CUDA libraries, naming what is missing).
#[test]
fn eval_on_cuda_without_a_cuda_build_is_refused() {
    let Some((d, _tok)) = student(0) else { return };
    let opt = masa::eval::EvalOptions { device: masa::engine::Device::Cuda(0), progress: false, ..Default::default() };
    match masa::eval::evaluate_path(&d.path().join("ckpt"), "student", &["piqa"], &opt) {
        Err(e) if !cfg!(feature = "cuda") => assert!(e.to_string().contains("--features cuda"), "{e}"),
        Err(e) => assert!(e.to_string().contains("--device cuda"), "{e}"),
        Ok(_) => assert!(cfg!(feature = "cuda"), "scored on CUDA without the feature"),
    }
}

#[test]
fn ni_answer_likelihood_matches_full_forward_reference() {
    let Some((d, tok)) = student(0) else { return };
    let src = SourceModel::open(&d.path().join("ckpt")).unwrap();
    let m = Transformer::load(&src.weights).unwrap();
    let (def, input) = ("Answer with the capital of the country.", "France");
    let targets = vec!["Paris".to_string(), "paris".to_string()];
    let opt = masa::eval::generation::GenOptions { max_new_tokens: 3, ..Default::default() };
    let mut rng = masa::rng::SplitMix64::new(0);
    let got = masa::eval::generation::score_example(&m, None, &tok, "t", 0, def, input, &targets, &opt, &mut rng).unwrap();
    let (a, b) = encode_pair(&tok, &masa::eval::generation::instruction_prompt(def, input), " Paris", false).unwrap();
    let want = reference_ll(&m, &a, &b);
    assert!((got.answer_logprob - want).abs() < 1e-3, "{} vs {want}", got.answer_logprob);
    assert_eq!(got.answer_tokens, b.len());
}

/// `--limit 0` (evaluation and fine-tuning), a NaN temperature, more new tokens than the model has positions and a thread
/// count far beyond the cores are refused with the option named.
#[test]
fn out_of_range_eval_options_are_errors() {
    assert!(masa::eval::Limit::parse("0").unwrap_err().to_string().contains("--limit 0"));
    // And for fine-tuning (it failed later, saying the task had no usable example).
    assert!(masa::eval::finetune_pairs("piqa", Some(0)).unwrap_err().to_string().contains("--limit 0: fine-tuning on no examples"));
    let Some((d, _)) = student(0) else { return };
    let run = |args: &[&str]| {
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
            .env("MASA_HOME", home())
            .args(args)
            .arg(d.path().join("ckpt"))
            .args(["--tasks", "piqa", "--out"])
            .arg(d.path().join("r.json"))
            .output()
            .unwrap();
        assert!(!st.status.success());
        String::from_utf8_lossy(&st.stderr).into_owned()
    };
    let e = run(&["eval", "--temperature", "NaN"]);
    assert!(e.contains("--temperature NaN"), "{e}");
    let e = run(&["eval", "--max-new-tokens", "100000000"]);
    assert!(e.contains("--max-new-tokens 100000000"), "{e}");
    let e = run(&["--threads", "100000", "eval"]);
    assert!(e.contains("--threads 100000"), "{e}");
    assert!(!d.path().join("r.json").exists());
}
