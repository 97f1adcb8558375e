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
    /// Zero-shot evaluation (lm-evaluation-harness conventions; docs/evaluation.md): multiple
    /// choice (acc, acc_norm), Natural Instructions generation (Rouge-L), perplexity per domain.
    /// MODEL is a GGUF file, an HF directory (a student checkpoint) or a model name.
    Eval {
        model: String,
        /// Comma-separated task names, or `all` (boolq, hellaswag, piqa, winogrande, medmcqa,
        /// mmlu_professional_law, natural_instructions, perplexity).
        #[arg(long, default_value = "all")]
        tasks: String,
        /// test (held out, default), train (the fine-tuning part) or all (the shipped file).
        #[arg(long, default_value = "test")]
        split: String,
        /// First N items of the split per task (natural_instructions: per subtask; perplexity:
        /// sequences per domain), `all`, or `default` (per-task defaults, docs/evaluation.md).
        #[arg(long, default_value = "default")]
        limit: String,
        /// Generation: sample at this temperature instead of greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Generation: random seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Generation: maximum new tokens.
        #[arg(long, default_value_t = 48)]
        max_new_tokens: usize,
        /// Write the results JSON here.
        #[arg(long)]
        out: PathBuf,
    },
    /// Throughput benchmarks (compare with scripts/bench_*_torch.py).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
        Command::Eval { model, tasks, split, limit, temperature, seed, max_new_tokens, out } => {
            let tasks = masa::eval::parse_tasks(&tasks)?;
            let opt = masa::eval::EvalOptions {
                split: masa::eval::Split::parse(&split)?,
                limit: masa::eval::Limit::parse(&limit)?,
                gen: masa::eval::generation::GenOptions { temperature, seed, max_new_tokens, ..Default::default() },
                ..Default::default()
            };
            let path = fetch::resolve_model(&model)?;
            let r = masa::eval::evaluate_path(&path, &model, &tasks, &opt).with_context(|| format!("evaluating {model}"))?;
            masa::home::write_atomic(&out, serde_json::to_string_pretty(&r)?.as_bytes())?;
            eprintln!("eval: results -> {}", out.display());
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
            "say what to fetch: `models`, `tasks` (evaluation data) or a model name ({})",
            fetch::MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
        );
    }
    for item in what {
        match item.as_str() {
            "tasks" => {
                masa::eval::data::fetch_tasks()?;
            }
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
                    "unknown asset `{name}`; known: models, tasks, {}",
                    fetch::MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
                ),
            },
        }
    }
    Ok(())
}
