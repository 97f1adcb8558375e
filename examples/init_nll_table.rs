//! Initial validation NLL of every `masa init` strategy before training (issue 4's table).
//!
//! `cargo run --release --example init_nll_table [-- PRESET [OUT_DIR]]`: SmolLM2-135M as
//! source; 50 validation documents of the default corpus (round-robin over domains, each cut
//! to its first 256 tokens); statistics from 4096 calibration tokens of the training split;
//! genes by the closed-form output alignment (`align::OutputAlignment::closed_form`, λ = 0,
//! ratio 0.12) for the source layers the uniform mapping uses. Scores go through the same
//! library call as `masa score`. Writes the texts, the genes and a JSON table to OUT_DIR.
//!
//! First run (cpu-6l-256, seed 0, 50 texts / 6245 scored tokens; ln 49152 = 10.80):
//! source 3.1508; scratch 10.8667; masa 10.8705 (frobenius) / 10.8551 (none) / 16.4620
//! (frobenius, rest weight-selection); naive 10.8712 / 10.8486; weight-selection 8.6346;
//! prune 13.9403. `masa init` + `masa score` on the CLI reproduce the masa row (10.8705).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use masa::align::{rank_for_ratio, Layout, OutputAlignment};
use masa::calibrate::calibrate;
use masa::corpus::Batch;
use masa::init::genes::{gene_key, Genes};
use masa::init::prune::Energies;
use masa::init::{build, map_layers, GeneScale, InitOptions, LayerMap, Rest, Strategy};
use masa::score::score_texts;
use masa::source::model::Transformer;
use masa::source::SourceModel;
use masa::stats::StatsMeta;
use masa::student::{save_checkpoint, StudentConfig};

fn lines(p: &Path, n: usize) -> Vec<String> {
    let f = std::io::BufReader::new(std::fs::File::open(p).unwrap());
    f.lines()
        .take(n)
        .map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap()["text"].as_str().unwrap().to_string())
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).cloned().unwrap_or_else(|| "cpu-6l-256".into());
    let out = PathBuf::from(args.get(2).cloned().unwrap_or_else(|| "/tmp/masa-init-table".into()));
    std::fs::create_dir_all(&out)?;
    let home = masa::home::masa_home();
    let src_path = home.join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    let source = SourceModel::open(&src_path)?;
    let hash = source.fingerprint()?;
    let tok = &source.tokenizer;
    let corpus = home.join("corpus/default");
    let mut domains: Vec<String> = std::fs::read_dir(&corpus)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".valid.jsonl").map(str::to_string))
        .collect();
    domains.sort();

    // 50 validation texts, round-robin over domains, first 256 tokens each.
    let valid: Vec<Vec<String>> = domains.iter().map(|d| lines(&corpus.join(format!("{d}.valid.jsonl")), 50)).collect();
    let mut texts = Vec::new();
    'outer: for i in 0.. {
        for v in &valid {
            if texts.len() == 50 {
                break 'outer;
            }
            if let Some(t) = v.get(i) {
                let ids = tok.encode(t, false)?;
                texts.push(tok.decode(&ids[..ids.len().min(256)])?);
            }
        }
    }
    std::fs::write(out.join("texts.json"), serde_json::to_string(&texts)?)?;

    // Calibration: 16 × 256 tokens, 2-3 sequences per domain from the training split.
    let seq = 256;
    let mut batches = Vec::new();
    for (di, d) in domains.iter().enumerate() {
        let ids: Vec<u32> =
            lines(&corpus.join(format!("{d}.train.jsonl")), 200).iter().flat_map(|t| tok.encode(t, false).unwrap()).take(seq * 3).collect();
        for c in ids.chunks_exact(seq).take(if di < 2 { 3 } else { 2 }) {
            batches.push(Batch { ids: c.to_vec(), batch: 1, seq_len: seq, dataset: vec![di] });
        }
    }
    batches.truncate(16);
    let t0 = std::time::Instant::now();
    let meta = StatsMeta {
        format: String::new(),
        source_hash: hash.clone(),
        source: src_path.display().to_string(),
        arch: "llama".into(),
        corpus: vec!["default (train split, first documents)".into()],
        tokens: 0,
        seq_len: seq,
        seeds: vec![0],
        dataset_tokens: Default::default(),
        masa_version: env!("CARGO_PKG_VERSION").into(),
        experts: None,
    };
    let stats = calibrate(&source.weights, batches.into_iter().map(Ok), &domains, meta, &mut |_| {})?;
    eprintln!("calibration: {} tokens, {:.1}s", stats.meta.tokens, t0.elapsed().as_secs_f64());
    let energies = Energies::from_stats(&stats, &source.weights.config)?;

    // Genes (closed-form output alignment) for the layers the uniform mapping uses.
    let student = StudentConfig::preset(&preset)?;
    let sc = &source.weights.config;
    let (h, f) = (sc.hidden_size, sc.intermediate_size);
    let r = rank_for_ratio(0.12, f, h);
    let t0 = std::time::Instant::now();
    let mut gs = Vec::new();
    let mut used = map_layers(student.num_hidden_layers, sc.num_hidden_layers, LayerMap::Uniform)?;
    used.dedup();
    for &l in &used {
        for (proj, site, d_out, d_in) in [("gate_proj", "ffn_in", f, h), ("up_proj", "ffn_in", f, h), ("down_proj", "ffn_mid", h, f)] {
            let w = source.weights.tensor(&format!("model.layers.{l}.mlp.{proj}.weight"))?.flatten_all()?.to_vec1::<f32>()?;
            let s = stats.moment(l, site)?.mean();
            let m = OutputAlignment::new(&w, &s, Layout::new(d_out, d_in, r)?).closed_form(1e-6)?;
            gs.push((gene_key(&format!("model.layers.{l}.mlp"), proj), m));
        }
    }
    let genes_path = out.join("genes.safetensors");
    Genes::write(
        &genes_path,
        &gs,
        &serde_json::json!({ "source_hash": hash, "rank": r, "method": "closed-form output alignment, lambda 0, ratio 0.12", "layers": used }),
    )?;
    eprintln!("genes: rank {r}, {} matrices, {:.1}s", gs.len(), t0.elapsed().as_secs_f64());
    let genes = Genes::load(&genes_path)?;

    let score = |dir: &Path| -> anyhow::Result<(f64, usize)> {
        let m = SourceModel::open(dir)?;
        let t = Transformer::load(&m.weights)?;
        let s = score_texts(&t, &m.tokenizer, &texts, false, &mut || {})?;
        let n: usize = s.iter().map(|x| x.nll.len()).sum();
        Ok((s.iter().flat_map(|x| x.nll.iter()).map(|&v| v as f64).sum::<f64>() / n as f64, n))
    };
    let mut rows = Vec::new();
    let (src_nll, n) = score(&src_path)?;
    eprintln!("source SmolLM2-135M: {src_nll:.4} ({n} tokens)");
    rows.push(serde_json::json!({ "strategy": "source (SmolLM2-135M itself)", "mean_nll": src_nll, "tokens": n }));
    let variants: Vec<(&str, InitOptions)> = {
        let o = |s: Strategy, gs: GeneScale, rest: Rest| {
            let mut o = InitOptions::new(s);
            o.gene_scale = gs;
            o.rest = rest;
            o
        };
        vec![
            ("scratch", o(Strategy::Scratch, GeneScale::Frobenius, Rest::Scratch)),
            ("masa (gene-scale frobenius, rest scratch)", o(Strategy::Masa, GeneScale::Frobenius, Rest::Scratch)),
            ("masa (gene-scale none, rest scratch)", o(Strategy::Masa, GeneScale::None, Rest::Scratch)),
            ("masa (gene-scale frobenius, rest weight-selection)", o(Strategy::Masa, GeneScale::Frobenius, Rest::WeightSelection)),
            ("naive (gene-scale frobenius)", o(Strategy::Naive, GeneScale::Frobenius, Rest::Scratch)),
            ("naive (gene-scale none)", o(Strategy::Naive, GeneScale::None, Rest::Scratch)),
            ("weight-selection", o(Strategy::WeightSelection, GeneScale::Frobenius, Rest::Scratch)),
            ("prune", o(Strategy::Prune, GeneScale::Frobenius, Rest::Scratch)),
        ]
    };
    for (label, opts) in variants {
        let built = build(&student, &source, Some(&genes), Some(&energies), &[], &opts)?;
        let dir = out.join("students").join(label.split(' ').next().unwrap_or(label).to_string() + &format!("-{}", rows.len()));
        save_checkpoint(&dir, &built.config, &built.tensors, tok, &serde_json::json!({ "strategy": opts.strategy, "options": opts }))?;
        let (nll, n) = score(&dir)?;
        eprintln!("{label}: {nll:.4}");
        rows.push(serde_json::json!({ "strategy": label, "mean_nll": nll, "tokens": n, "dir": dir }));
    }
    let table = serde_json::json!({ "preset": preset, "source": src_path, "texts": texts.len(), "gene_rank": r, "rows": rows });
    std::fs::write(out.join("table.json"), serde_json::to_string_pretty(&table)?)?;
    println!("| strategy ({preset}, before training) | mean NLL |\n|---|---|");
    for r in table["rows"].as_array().unwrap() {
        println!("| {} | {:.4} |", r["strategy"].as_str().unwrap(), r["mean_nll"].as_f64().unwrap());
    }
    Ok(())
}
