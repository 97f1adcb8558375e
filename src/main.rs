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
    /// Initialise a student checkpoint (HF LlamaForCausalLM directory) from a source model:
    /// MASA adaptive scaling of gene matrices, or a baseline (naive, scratch, weight-selection, prune).
    Init(InitArgs),
    /// Throughput benchmarks (compare with scripts/bench_*_torch.py).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(clap::Args)]
struct InitArgs {
    /// Preset name (tiny, cpu-6l-256, ..., paper-16l-2048) or a student.toml/json file.
    #[arg(long)]
    student: String,
    /// masa, naive, scratch, weight-selection or prune.
    #[arg(long)]
    strategy: masa::init::Strategy,
    /// Output directory (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// Gene file from `masa extract` (masa, naive).
    #[arg(long)]
    genes: Option<PathBuf>,
    /// Source model: GGUF file, HF directory or model name; gives the tokenizer and vocabulary.
    #[arg(long, default_value = "smollm2-135m")]
    source: String,
    /// Calibration statistics from `masa calibrate` (prune; MoE sources).
    #[arg(long)]
    stats: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Layer mapping: uniform or first (default: first for weight-selection, else uniform).
    #[arg(long)]
    layers: Option<masa::init::LayerMap>,
    /// r': singular components kept by adaptive scaling (default: all).
    #[arg(long)]
    components: Option<usize>,
    /// Experiment: one selection of the FFN dimension shared by gate, up and down.
    #[arg(long)]
    coupled: bool,
    /// frobenius (rescale to the Scratch init's norm) or none (paper-literal).
    #[arg(long, default_value = "frobenius")]
    gene_scale: masa::init::GeneScale,
    /// What masa/naive students' non-FFN parameters inherit: scratch or weight-selection.
    #[arg(long, default_value = "scratch")]
    rest: masa::init::Rest,
    /// Expansion of genes to wider matrices: cyclic or none (refuse).
    #[arg(long, default_value = "cyclic")]
    expand: masa::init::Expand,
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
        Command::Init(a) => {
            let options = masa::init::InitOptions {
                strategy: a.strategy,
                seed: a.seed,
                layers: a.layers,
                components: a.components,
                coupled: a.coupled,
                gene_scale: a.gene_scale,
                rest: a.rest,
                expand: a.expand,
            };
            let req = masa::init::InitRequest {
                student: a.student,
                out: a.out.clone(),
                source: fetch::resolve_model(&a.source)?,
                genes: a.genes,
                stats: a.stats,
                options,
            };
            let cfg = masa::init::run(&req)?;
            eprintln!("{}: {} student, {} parameters -> {}", a.strategy, req.student, cfg.num_parameters(), a.out.display());
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
