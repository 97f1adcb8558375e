//! The `masa` command line: one subcommand per pipeline stage, each reading and writing files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use masa::fetch;
use masa::model::Transformer;
use masa::source::SourceWeights;

#[derive(Parser)]
#[command(name = "masa", version, about = "MASA: inherit a pretrained LLM's FFN knowledge into small Llama-style students")]
struct Cli {
    /// Worker threads for tensor math (default: all cores; also RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and verify assets into $MASA_HOME (default ~/.cache/masa): a model name
    /// (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b) or `models` for all of them.
    Fetch {
        /// What to fetch.
        what: Vec<String>,
    },
    /// Summarise a model: architecture, shapes, parameter counts, quantization types, and the
    /// FFN matrices MASA aligns. MODEL is a GGUF file, an HF directory or a model name.
    Inspect {
        model: String,
        /// Print JSON (with the full tensor list) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Next-token NLL of each text in a JSON list (strings, or objects with `text`): writes one
    /// entry per text with `ids`, `nll` (natural log, per next token) and `mean_nll`.
    Score {
        model: String,
        texts: PathBuf,
        /// Prepend the BOS token (Gemma expects it; SmolLM2 does not).
        #[arg(long)]
        bos: bool,
        /// Write JSON here (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Pre-train a student (an HF Llama directory, e.g. from `masa init`) on a corpus:
    /// AdamW, warmup + cosine schedule, clipping, accumulation, per-domain validation,
    /// metrics.jsonl, atomic checkpoints, exact --resume, optional --distill.
    Train(TrainArgs),
    /// Supervised fine-tuning with the loss on the response only. `--data` is a JSONL of
    /// {"prompt": ..., "response": ...} texts (evaluation tasks are wired by the eval module).
    Finetune {
        model: PathBuf,
        /// JSONL with prompt/response pairs.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        epochs: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 3e-5, allow_negative_numbers = true)]
        lr: f64,
        #[arg(long, default_value_t = 512)]
        max_len: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        quiet: bool,
    },
    /// Throughput benchmarks (compare with scripts/bench_*_torch.py).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Student model directory (HF format: config.json, model.safetensors, tokenizer.json).
    model: PathBuf,
    /// Corpus: the default corpus directory, .txt/.jsonl files or directories (repeatable).
    #[arg(long, required = true)]
    corpus: Vec<PathBuf>,
    /// Training tokens (rounded up to whole optimizer steps).
    #[arg(long)]
    tokens: u64,
    /// Output directory: metrics.jsonl, step-* checkpoints, `latest`.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Sequence length (tokens per sequence).
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate (paper: 4e-4).
    #[arg(long, default_value_t = 4e-4, allow_negative_numbers = true)]
    lr: f64,
    /// Final learning rate as a fraction of the peak (cosine decay).
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Warmup steps (linear).
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Max global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validate every K steps (and at the start and the end).
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Validation sequences per domain.
    #[arg(long, default_value_t = 16)]
    eval_seqs: usize,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 200)]
    ckpt_every: usize,
    /// Resume: a run's --out directory (its latest checkpoint) or a step-* checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Distill from this teacher (the source model, same tokenizer).
    #[arg(long)]
    distill: Option<PathBuf>,
    /// Weight of the CE term with --distill.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Teacher log-probs kept per position.
    #[arg(long, default_value_t = 32)]
    top_k: usize,
    /// Teacher cache directory (default $MASA_HOME/teacher-cache).
    #[arg(long)]
    teacher_cache: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training steps (forward, CE, backward, clip, AdamW) of a Llama config.json on random
    /// tokens, f32 (compare with scripts/bench_train_torch.py).
    Train {
        config: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Forward passes (logits included) over random tokens, f32.
    Forward {
        model: String,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Also write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn set_threads(n: usize) -> Result<()> {
    // candle reads RAYON_NUM_THREADS for its matmul parallelism; rayon's pool does the rest.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting the thread count")
}

fn open_model(spec: &str) -> Result<SourceWeights> {
    let path = fetch::resolve_model(spec)?;
    Ok(SourceWeights::open(&path)?)
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        set_threads(n)?;
    }
    match cli.command {
        Command::Fetch { what } => cmd_fetch(&what),
        Command::Inspect { model, json } => {
            let w = open_model(&model)?;
            let s = masa::inspect::summarize(&w);
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", masa::inspect::render(&s));
            }
            Ok(())
        }
        Command::Score { model, texts, bos, out } => cmd_score(&model, &texts, bos, out.as_deref()),
        Command::Train(a) => cmd_train(a),
        Command::Finetune { model, data, out, epochs, batch, lr, max_len, seed, quiet } => {
            let tok = masa::source::SourceModel::open(&model)?.tokenizer;
            let pairs = masa::finetune::read_pairs(&data, &tok)?;
            let opts = masa::finetune::FinetuneOptions { out, epochs, batch, lr, max_len, seed, progress: !quiet, ..Default::default() };
            let s = masa::finetune::finetune(&model, &pairs, &opts)?;
            eprintln!("fine-tuned {} steps, final loss {:.4} -> {}", s.steps, s.final_loss, s.checkpoint.display());
            Ok(())
        }
        Command::Bench { what: BenchCommand::Train { config, batch, seq, warmup, steps, json } } => {
            let r = masa::bench::train(&config, batch, seq, warmup, steps, 1)?;
            let line = serde_json::to_string(&r)?;
            println!("{line}");
            if let Some(p) = json {
                masa::home::write_atomic(&p, line.as_bytes())?;
            }
            Ok(())
        }
        Command::Bench { what: BenchCommand::Forward { model, batch, seq, warmup, iters, json } } => {
            let w = open_model(&model)?;
            let m = Transformer::load(&w)?;
            drop(w);
            let r = masa::bench::forward(&m, batch, seq, warmup, iters, 1)?;
            let line = serde_json::to_string(&r)?;
            println!("{line}");
            if let Some(p) = json {
                masa::home::write_atomic(&p, line.as_bytes())?;
            }
            Ok(())
        }
    }
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let opts = masa::train::TrainOptions {
        corpus: a.corpus,
        out: a.out,
        tokens: a.tokens,
        batch: a.batch,
        seq_len: a.seq,
        grad_accum: a.grad_accum,
        lr: a.lr,
        min_lr_ratio: a.min_lr_ratio,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        clip: a.clip,
        seed: a.seed,
        eval_every: a.eval_every,
        eval_seqs: a.eval_seqs,
        ckpt_every: a.ckpt_every,
        resume: a.resume,
        progress: !a.quiet,
        distill: a.distill.map(|teacher| masa::train::DistillOptions {
            teacher,
            alpha: a.alpha,
            temperature: a.temperature,
            top_k: a.top_k,
            cache_dir: a.teacher_cache,
        }),
        ..Default::default()
    };
    let s = masa::train::train(&a.model, &opts).with_context(|| format!("training {}", a.model.display()))?;
    let val: Vec<String> = s.final_val.iter().map(|(d, l)| format!("{d} {l:.4}")).collect();
    eprintln!(
        "trained {} steps, {} tokens, final train loss {:.4}; validation: {}; checkpoint {}",
        s.steps,
        s.tokens,
        s.final_loss,
        val.join(", "),
        s.checkpoint.display()
    );
    Ok(())
}

fn cmd_score(model: &str, texts: &std::path::Path, bos: bool, out: Option<&std::path::Path>) -> Result<()> {
    let texts = masa::score::read_texts(texts)?;
    let source = masa::source::SourceModel::open(&fetch::resolve_model(model)?)?;
    let m = Transformer::load(&source.weights)?;
    let bar = masa::progress::count_bar(texts.len() as u64, "scoring", "texts");
    let scored = masa::score::score_texts(&m, &source.tokenizer, &texts, bos, &mut || bar.inc(1))?;
    bar.finish_and_clear();
    let json = serde_json::to_string_pretty(&scored)?;
    match out {
        Some(p) => {
            masa::home::write_atomic(p, json.as_bytes())?;
            let n: usize = scored.iter().map(|s| s.nll.len()).sum();
            let total: f64 = scored.iter().flat_map(|s| s.nll.iter()).map(|&v| v as f64).sum();
            eprintln!("scored {} texts, {n} tokens, mean NLL {:.4} -> {}", scored.len(), total / n.max(1) as f64, p.display());
        }
        None => println!("{json}"),
    }
    Ok(())
}

fn cmd_fetch(what: &[String]) -> Result<()> {
    if what.is_empty() {
        anyhow::bail!(
            "say what to fetch: `models` or a model name ({})",
            fetch::MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
        );
    }
    for item in what {
        match item.as_str() {
            "models" => {
                for m in fetch::MODELS {
                    fetch::fetch_model(m)?;
                }
            }
            name => match fetch::find_model(name) {
                Some(m) => {
                    fetch::fetch_model(m)?;
                }
                None => anyhow::bail!(
                    "unknown asset `{name}`; known: models, {}",
                    fetch::MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
                ),
            },
        }
    }
    Ok(())
}
