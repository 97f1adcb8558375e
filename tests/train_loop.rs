//! End-to-end training: overfitting a few sequences, exact resume after SIGKILL, and clear
//! errors for bad input (tiny corpus, lr ≤ 0, checkpoint of another shape, NaN).

mod train_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use masa::student::kernels::Targets;
use masa::student::llama::{Llama, Workspace};
use masa::student::optim::{clip_factor, grad_norm, AdamW};
use masa::train::{train, TrainOptions};
use train_common::{byte_tokenizer, curve, small_config, write_corpus, write_scratch_student};

const MASA: &str = env!("CARGO_BIN_EXE_masa");

/// A tiny student drives the loss on four fixed sequences near zero.
#[test]
fn tiny_student_overfits_fixed_sequences() {
    let cfg = small_config();
    let model = Llama::new(&cfg);
    let mut params = cfg.scratch_init(1);
    let (b, t) = (4, 24);
    let mut rng = masa::rng::SplitMix64(3);
    let seqs: Vec<u32> = (0..b * (t + 1)).map(|_| rng.below(cfg.vocab_size) as u32).collect();
    let (mut ids, mut tg) = (Vec::new(), Vec::new());
    for s in seqs.chunks(t + 1) {
        ids.extend_from_slice(&s[..t]);
        tg.extend_from_slice(&s[1..]);
    }
    let w = vec![1.0 / (b * t) as f32; b * t];
    let mut ws = Workspace::<f32>::new(&cfg, b, t);
    let mut grads = vec![0f32; params.len()];
    let mut opt = AdamW::new(params.len(), 0.9, 0.95, 1e-8, 0.0, masa::engine::decay_ranges(&model));
    let mut first = 0.0;
    let mut loss = 0.0;
    for step in 0..400 {
        grads.fill(0.0);
        model.forward(&params, &mut ws, &ids, b, t);
        loss = model.loss(&params, &mut ws, &Targets { ids: &tg, weights: &w }, None, Some(&mut grads), None);
        model.backward(&params, &mut ws, &mut grads);
        if step == 0 {
            first = loss;
        }
        let n = grad_norm(&grads);
        opt.step(&mut params, &grads, clip_factor(n, 1.0), 1e-2);
    }
    eprintln!("loss {first:.4} -> {loss:.5}");
    assert!(first > 5.0, "random init should start near ln(257) = 5.55, got {first}");
    assert!(loss < 0.02, "did not overfit: final loss {loss}");
}

fn setup(dir: &Path, docs: usize) -> (PathBuf, PathBuf) {
    let model = dir.join("student");
    write_scratch_student(&model, &small_config(), 5);
    let corpus = dir.join("corpus.jsonl");
    write_corpus(&corpus, docs);
    (model, corpus)
}

fn train_cmd(model: &Path, corpus: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(MASA);
    c.args(["--threads", "2", "train"]).arg(model).arg("--corpus").arg(corpus).arg("--out").arg(out);
    c.args(["--tokens", "76800", "--batch", "4", "--seq", "64", "--warmup", "10", "--lr", "1e-3"]);
    c.args(["--eval-every", "25", "--eval-seqs", "4", "--ckpt-every", "7", "--quiet", "--seed", "9"]);
    c.args(extra);
    c
}

/// A run killed with SIGKILL mid-run and resumed gives the same losses as an uninterrupted one.
#[test]
fn resume_after_sigkill_gives_identical_losses() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path(), 300);
    let full = dir.path().join("full");
    let st = train_cmd(&model, &corpus, &full, &[]).status().unwrap();
    assert!(st.success());
    let reference = curve(&full);
    let steps = 76800 / (4 * 64);
    assert_eq!(reference.iter().filter(|r| r.1.is_some()).count(), steps);

    let cut = dir.path().join("cut");
    let mut child = train_cmd(&model, &corpus, &cut, &[]).spawn().unwrap();
    let start = Instant::now();
    loop {
        let n = std::fs::read_to_string(cut.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
        if n >= steps / 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "run finished before it could be killed");
        assert!(start.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(child.try_wait().unwrap().is_none(), "run finished before it could be killed");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let logged_before = curve(&cut).len();
    assert!(logged_before < reference.len(), "the kill came too late to test anything");
    let st = train_cmd(&model, &corpus, &cut, &["--resume", cut.to_str().unwrap()]).status().unwrap();
    assert!(st.success());
    let resumed = curve(&cut);
    assert_eq!(resumed.len(), reference.len());
    for (a, b) in resumed.iter().zip(&reference) {
        assert_eq!(a, b, "resumed run differs from the uninterrupted one");
    }
    eprintln!("killed after {logged_before} metric lines; {} lines identical after resume", resumed.len());
}

fn err_of(model: &Path, opts: &TrainOptions) -> String {
    let e = train(model, opts).err().expect("must fail").to_string();
    eprintln!("{e}");
    assert!(!e.contains('\n'), "one-line message: {e}");
    e
}

fn opts(corpus: &Path, out: &Path) -> TrainOptions {
    TrainOptions {
        corpus: vec![corpus.to_path_buf()],
        out: out.to_path_buf(),
        tokens: 4096,
        batch: 4,
        seq_len: 32,
        warmup: 2,
        eval_every: 0,
        eval_seqs: 2,
        ckpt_every: 4,
        progress: false,
        ..Default::default()
    }
}

#[test]
fn corpus_shorter_than_one_batch_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = setup(dir.path(), 1);
    let small = dir.path().join("small.jsonl");
    std::fs::write(&small, "{\"text\": \"just a few words\", \"domain\": \"a\"}\n{\"text\": \"and a few more\", \"domain\": \"a\"}\n")
        .unwrap();
    let e = err_of(&model, &opts(&small, &dir.path().join("o")));
    assert!(e.contains("shorter than one batch"), "{e}");
}

#[test]
fn zero_or_negative_lr_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path(), 20);
    for lr in [0.0, -1e-3, f64::NAN] {
        let e = err_of(&model, &TrainOptions { lr, ..opts(&corpus, &dir.path().join("o")) });
        assert!(e.contains("must be a positive finite number"), "{e}");
    }
    // And through the CLI (negative numbers parse, then fail validation).
    let out = Command::new(MASA)
        .arg("train")
        .arg(&model)
        .arg("--corpus")
        .arg(&corpus)
        .args(["--tokens", "100", "--out"])
        .arg(dir.path().join("cli"))
        .args(["--lr", "-0.1", "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("--lr -0.1: must be a positive finite number"), "{msg}");
}

#[test]
fn resume_from_another_model_shape_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path(), 40);
    let run = dir.path().join("run");
    train(&model, &opts(&corpus, &run)).unwrap();
    let mut other_cfg = small_config();
    other_cfg.hidden_size = 48;
    other_cfg.num_attention_heads = 4;
    let other = dir.path().join("other");
    write_scratch_student(&other, &other_cfg, 1);
    let e = err_of(&other, &TrainOptions { resume: Some(run.clone()), ..opts(&corpus, &dir.path().join("o2")) });
    assert!(e.contains("another model shape"), "{e}");
    // Not a checkpoint at all.
    let e = err_of(&model, &TrainOptions { resume: Some(dir.path().to_path_buf()), ..opts(&corpus, &dir.path().join("o3")) });
    assert!(e.contains("not a training checkpoint"), "{e}");
    // Other batch shape than the checkpointed run.
    let e = err_of(&model, &TrainOptions { resume: Some(run.clone()), batch: 2, ..opts(&corpus, &dir.path().join("o4")) });
    assert!(e.contains("options differ") && e.contains("--batch"), "{e}");
    // Another token budget (another LR schedule) or another corpus than the checkpointed run.
    let o = opts(&corpus, &dir.path().join("o5"));
    let e = err_of(&model, &TrainOptions { resume: Some(run.clone()), tokens: o.tokens * 2, ..o });
    assert!(e.contains("--tokens") && e.contains("schedule"), "{e}");
    let other_corpus = dir.path().join("other.txt");
    std::fs::copy(&corpus, &other_corpus).unwrap();
    let e = err_of(&model, &TrainOptions { resume: Some(run), corpus: vec![other_corpus], ..opts(&corpus, &dir.path().join("o6")) });
    assert!(e.contains("--corpus") && e.contains("other.txt"), "{e}");
}

/// `--device cuda` without the `cuda` feature, and bf16 on the CPU, are clear errors; device
/// names parse as documented.
#[test]
fn device_options_are_checked() {
    use masa::engine::{Device, Precision};
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
    let e = "gpu".parse::<Device>().unwrap_err();
    assert!(e.contains("cpu, cuda or cuda:N"), "{e}");
    assert_eq!(serde_json::to_string(&Device::Cuda(1)).unwrap(), "\"cuda:1\"");
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path(), 40);
    let e = err_of(&model, &TrainOptions { precision: Precision::Bf16, ..opts(&corpus, &dir.path().join("b")) });
    assert!(e.contains("bf16") && e.contains("--device cuda"), "{e}");
    if !cfg!(feature = "cuda") {
        let e = err_of(&model, &TrainOptions { device: Device::Cuda(0), ..opts(&corpus, &dir.path().join("c")) });
        assert!(e.contains("without CUDA support") && e.contains("--features cuda"), "{e}");
    }
}

/// A diverging run stops naming the step and leaves the last good checkpoint in place.
#[test]
fn nan_guard_stops_and_keeps_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path(), 40);
    let out = dir.path().join("run");
    let o = TrainOptions { lr: 1e30, warmup: 0, ckpt_every: 1, clip: 0.0, ..opts(&corpus, &out) };
    let e = err_of(&model, &o);
    assert!(e.contains("diverged at step"), "{e}");
    let latest = std::fs::read_to_string(out.join("latest")).expect("a good checkpoint was kept");
    let ck = out.join(latest.trim());
    assert!(e.contains(&ck.display().to_string()), "message names the kept checkpoint: {e}");
    // The kept checkpoint loads and is finite.
    let w = masa::source::SourceWeights::open(&ck).unwrap();
    let emb = w.tensor("model.embed_tokens.weight").unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(emb.iter().all(|v| v.is_finite()));
}

#[test]
fn finetune_batches_weight_only_response_tokens() {
    use masa::finetune::{build_batch, Example};
    let a = Example { prompt: vec![1, 2, 3], response: vec![4, 5] };
    let b = Example { prompt: vec![7], response: vec![8] };
    let (ids, tg, w, t) = build_batch(&[&a, &b], Some(9), 100);
    assert_eq!(t, 5);
    assert_eq!(&ids[..5], &[1, 2, 3, 4, 5]);
    assert_eq!(&tg[..5], &[2, 3, 4, 5, 9]);
    // Targets 4, 5, 9 of the first and 8, 9 of the second: 5 response targets.
    let expect = [0.0, 0.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0];
    for (x, y) in w.iter().zip(expect) {
        assert!((x - y).abs() < 1e-7, "{w:?}");
    }
    assert_eq!(&ids[5..7], &[7, 8]);
    assert_eq!(&tg[5..7], &[8, 9]);
}

#[test]
fn finetune_learns_responses() {
    use masa::finetune::{finetune, Example, FinetuneOptions};
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = setup(dir.path(), 1);
    // The response is the prompt reversed: learnable only from the prompt.
    let mut rng = masa::rng::SplitMix64(1);
    let ex: Vec<Example> = (0..16)
        .map(|_| {
            let p: Vec<u32> = (0..6).map(|_| 97 + rng.below(4) as u32).collect();
            Example { response: p.iter().rev().copied().collect(), prompt: p }
        })
        .collect();
    let o = FinetuneOptions { out: dir.path().join("ft"), epochs: 150, batch: 8, lr: 3e-3, progress: false, ..Default::default() };
    let s = finetune(&model, &ex, &o).unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(dir.path().join("ft/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    eprintln!("finetune loss {:.3} -> {:.3}", losses[0], s.final_loss);
    assert!(losses[0] > 4.0 && s.final_loss < 0.7, "{} -> {}", losses[0], s.final_loss);
    assert!(masa::source::SourceWeights::open(&s.checkpoint).is_ok());
}

/// Distillation: teacher top-k cached once, reused by a second student run with the same
/// stream; the loss differs from plain CE.
#[test]
fn distillation_caches_teacher_and_reuses_it() {
    use masa::distill::DistillOptions;
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path(), 40);
    let teacher = dir.path().join("teacher");
    write_scratch_student(&teacher, &small_config(), 77);
    let cache = dir.path().join("cache");
    let d = DistillOptions { teacher, alpha: 0.5, temperature: 2.0, top_k: 8, cache_dir: Some(cache.clone()) };
    let o = TrainOptions { distill: Some(d), ..opts(&corpus, &dir.path().join("a")) };
    let a = train(&model, &o).unwrap();
    let files: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path().join("topk.bin")).collect();
    assert_eq!(files.len(), 1);
    let size = std::fs::metadata(&files[0]).unwrap().len();
    assert_eq!(size, (a.steps * 4 * 32 * 8 * 8) as u64, "one record per batch");
    let mtime = std::fs::metadata(&files[0]).unwrap().modified().unwrap();
    let b = train(&model, &TrainOptions { out: dir.path().join("b"), ..o.clone() }).unwrap();
    assert_eq!(std::fs::metadata(&files[0]).unwrap().modified().unwrap(), mtime, "second run reused the cache");
    assert_eq!(a.final_loss, b.final_loss);
    let plain = train(&model, &opts(&corpus, &dir.path().join("c"))).unwrap();
    assert_ne!(plain.final_loss, a.final_loss);
}

/// Writing a checkpoint replaces only what masa wrote: a neighbouring `student.old/` survives
/// two writes of `student.v2`; a file or a foreign non-empty directory at the output path is
/// refused and left as it was; an empty directory is used.
#[test]
fn checkpoint_writes_never_delete_what_masa_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config();
    let keep = dir.path().join("student.old");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("b.txt"), "keep").unwrap();
    let out = dir.path().join("student.v2");
    write_scratch_student(&out, &cfg, 1);
    write_scratch_student(&out, &cfg, 2);
    assert_eq!(std::fs::read_to_string(keep.join("b.txt")).unwrap(), "keep");
    assert!(out.join("masa.json").is_file());
    let params = cfg.scratch_init(1);
    let save =
        |p: &Path| masa::student::save_student(p, &cfg, &params, &byte_tokenizer(), &serde_json::json!({})).map_err(|e| e.to_string());
    let file = dir.path().join("mine");
    std::fs::write(&file, "mine").unwrap();
    let e = save(&file).unwrap_err();
    assert!(e.contains("not a directory"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("x.txt"), "x").unwrap();
    let e = save(&foreign).unwrap_err();
    assert!(e.contains("masa will not replace it"), "{e}");
    assert_eq!(std::fs::read_to_string(foreign.join("x.txt")).unwrap(), "x");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    save(&empty).unwrap();
    assert!(empty.join("masa.json").is_file());
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.ends_with(".replaced") && !n.ends_with(".staging")), "{names:?}");
}

/// Numeric options outside their range are refused before any work, naming the option.
#[test]
fn out_of_range_training_options_are_errors() {
    let distill =
        |temperature: f64| masa::distill::DistillOptions { teacher: "teacher".into(), alpha: 0.5, temperature, top_k: 8, cache_dir: None };
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path(), 40);
    let o = |out: &str| opts(&corpus, &dir.path().join(out));
    let cases: Vec<(TrainOptions, &str)> = vec![
        (TrainOptions { clip: f64::NAN, ..o("a") }, "--clip"),
        (TrainOptions { eval_seqs: 0, ..o("b") }, "--eval-seqs 0"),
        (TrainOptions { warmup: usize::MAX, ..o("c") }, "--warmup"),
        (TrainOptions { tokens: u64::MAX, ..o("d") }, "--tokens"),
        (TrainOptions { seq_len: 100_000, tokens: 1 << 20, ..o("e") }, "positions"),
        (TrainOptions { batch: 100_000, ..o("f") }, "--batch 100000: must be in 1..=4096"),
        (TrainOptions { min_lr_ratio: f64::NAN, ..o("g") }, "--min-lr-ratio NaN"),
        // A NaN distillation temperature passed `temperature <= 0` (issue 17).
        (TrainOptions { distill: Some(distill(f64::NAN)), ..o("h") }, "--temperature NaN: must be a positive finite number"),
    ];
    for (opt, want) in cases {
        let e = err_of(&model, &opt);
        assert!(e.contains(want), "{want}: {e}");
    }
    // `masa tokens` checks the same ranges, the sequence length against the student's positions.
    let e = masa::train::export_tokens(&model, &TrainOptions { seq_len: 100_000, tokens: 1 << 20, ..o("i") })
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("--seq 100000: must be in 1..=") && e.contains("the student's positions"), "{e}");
}

/// The tokenized train split of the test corpus, cached under `root`.
fn token_split(dir: &Path, root: &Path) -> masa::corpus::TokenSplit {
    let corpus_path = dir.join("corpus.jsonl");
    write_corpus(&corpus_path, 200);
    let corpus = masa::corpus::load_corpus(&[corpus_path]).unwrap();
    masa::corpus::TokenSplit::open(&corpus, masa::corpus::Split::Train, &byte_tokenizer(), Some(root), false).unwrap()
}

/// Every epoch of the chunk sampler hands out each non-overlapping chunk of its cut exactly once,
/// in an order where neighbours in a batch are not neighbours in the corpus, and the next epoch
/// is cut and ordered differently; per-domain counts add up to the tokens drawn.
#[test]
fn chunk_sampler_covers_each_epoch_once_in_independent_order() {
    let dir = tempfile::tempdir().unwrap();
    let split = token_split(dir.path(), &dir.path().join("tokens"));
    let mut all = Vec::new();
    split.copy_to(0, split.len(), &mut all);
    let len = 65;
    let mut s = masa::corpus::ChunkSampler::new(&split, len, 3).unwrap();
    let per_epoch = s.chunks_per_epoch();
    assert!(per_epoch > 50, "{per_epoch} chunks");
    let start_of = |c: &[u32]| -> Vec<usize> { (0..=all.len() - len).filter(|&i| all[i..i + len] == *c).collect() };
    let mut epochs = Vec::new();
    for _ in 0..2 {
        let starts: Vec<usize> = (0..per_epoch)
            .map(|_| {
                let c = s.next_sequence();
                let found = start_of(&c);
                assert!(!found.is_empty(), "a chunk that is not a window of the split");
                found[0]
            })
            .collect();
        epochs.push(starts);
        // the next epoch may have one chunk more or less, cut at another offset
        if s.chunks_per_epoch() != per_epoch {
            break;
        }
    }
    let e0 = &epochs[0];
    let shift = e0[0] % len;
    assert!(e0.iter().all(|&p| p % len == shift), "chunks of one epoch share one cut");
    let mut sorted = e0.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), per_epoch, "each chunk once per epoch");
    assert_eq!(per_epoch, (all.len() - shift) / len, "every chunk of the cut");
    let adjacent = e0.windows(2).filter(|w| w[1] == w[0] + len).count();
    assert!(adjacent * 10 < per_epoch, "{adjacent} of {per_epoch} consecutive draws are corpus neighbours");
    if epochs.len() == 2 {
        assert_ne!(epochs[0], epochs[1], "the second epoch repeats the first");
    }
    let st = s.state();
    assert_eq!(st.drawn_per_domain.values().sum::<u64>(), st.tokens_drawn);
    assert!(st.drawn_per_domain.values().all(|&n| n > 0), "{:?}", st.drawn_per_domain);
}

/// A sampler restored from a saved state continues exactly as the original, across epochs.
#[test]
fn chunk_sampler_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let split = token_split(dir.path(), &dir.path().join("tokens"));
    let mut a = masa::corpus::ChunkSampler::new(&split, 33, 7).unwrap();
    let per_epoch = a.chunks_per_epoch();
    a.next_batch(per_epoch - 5);
    let st = a.state();
    let mut b = masa::corpus::ChunkSampler::new(&split, 33, 7).unwrap();
    b.restore(&st).unwrap();
    assert_eq!(a.next_batch(20), b.next_batch(20), "restored sampler diverged (across the epoch boundary)");
    assert_eq!(a.state(), b.state());
    let mut other = st.clone();
    other.split_tokens += 1;
    let e = b.restore(&other).unwrap_err().to_string();
    assert!(e.contains("resume with the run's corpus"), "{e}");
}

/// A truncated or altered token cache is detected and rebuilt, giving the same tokens.
#[test]
fn damaged_token_cache_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tokens");
    let split = token_split(dir.path(), &root);
    let mut want = Vec::new();
    split.copy_to(0, split.len(), &mut want);
    let file = split.dir.join("tokens.bin");
    drop(split);
    let bytes = std::fs::read(&file).unwrap();
    let mut altered = bytes.clone();
    altered[100] ^= 1;
    for damaged in [bytes[..bytes.len() - 2].to_vec(), altered] {
        std::fs::write(&file, &damaged).unwrap();
        let again = token_split(dir.path(), &root);
        let mut got = Vec::new();
        again.copy_to(0, again.len(), &mut got);
        assert_eq!(got, want);
        assert_eq!(std::fs::read(&file).unwrap(), bytes);
    }
}

/// `masa tokens` writes the training sequences in the trainer's order and the validation
/// sequences, with a manifest that says how to read them.
#[test]
fn token_export_matches_the_trainer_data() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path(), 100);
    let out = dir.path().join("export");
    let st = Command::new(MASA)
        .args(["tokens"])
        .arg(&model)
        .arg("--corpus")
        .arg(&corpus)
        .arg("--out")
        .arg(&out)
        .args(["--tokens", "2000", "--batch", "3", "--seq", "16", "--grad-accum", "2", "--seed", "5", "--eval-seqs", "2", "--quiet"])
        .status()
        .unwrap();
    assert!(st.success());
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["dtype"], "uint16");
    let steps = 2000u64.div_ceil(3 * 16 * 2);
    assert_eq!(m["steps"], steps);
    let train: Vec<u32> =
        std::fs::read(out.join("train.bin")).unwrap().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect();
    assert_eq!(train.len() as u64, steps * 6 * 17);
    let opts = TrainOptions { corpus: vec![corpus.clone()], seq_len: 16, batch: 3, eval_seqs: 2, progress: false, ..Default::default() };
    let tok = byte_tokenizer();
    let data = masa::train::TrainData::open(&opts, &tok).unwrap();
    let mut s = masa::corpus::ChunkSampler::new(&data.train_tokens, 17, 5).unwrap();
    let want: Vec<u32> = (0..steps * 6).flat_map(|_| s.next_sequence()).collect();
    assert_eq!(train, want);
    let valid: Vec<u32> =
        std::fs::read(out.join("valid.bin")).unwrap().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect();
    let want: Vec<u32> = data.val.values().flatten().flatten().copied().collect();
    assert_eq!(valid, want);
    assert_eq!(m["valid"]["domains"][1]["domain"], "prose");
    assert_eq!(m["valid"]["domains"][1]["first"], 2);
}

/// A far too high learning rate kills the model without a NaN (the loss sits at ln V, the
/// gradient is exactly 0): the guard stops at the first dead step instead of training on, and
/// does not call a checkpoint of the dead model "good" (issue 17). Clearing old checkpoints
/// leaves a user's `step-…` directory alone.
#[test]
fn nan_guard_stops_a_collapsed_model_and_names_no_dead_checkpoint_as_good() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path(), 40);
    let out = dir.path().join("run");
    // A user's directory that looks like a checkpoint name survives the clean-up of old ones.
    std::fs::create_dir_all(out.join("step-mine")).unwrap();
    std::fs::write(out.join("step-mine/notes.txt"), "keep").unwrap();
    let o = TrainOptions { lr: 1e3, warmup: 0, ckpt_every: 2, tokens: 60 * 4 * 32, ..opts(&corpus, &out) };
    let e = err_of(&model, &o);
    assert_eq!(std::fs::read_to_string(out.join("step-mine/notes.txt")).unwrap(), "keep");
    assert!(e.contains("gradient norm 0") && e.contains("collapsed"), "{e}");
    assert!(!e.contains("Last good checkpoint") && e.contains("had already gone bad"), "{e}");
    // Stopped at the first dead step, not 60 steps later.
    let steps = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count();
    assert!(steps < 10, "{steps} metrics lines");
}
