//! Distributed calibration: `masa calibrate --shard i/N` run as parallel processes, merged with
//! `masa stats merge`, equals one pass over the same stream (docs/extraction.md).

#[path = "train_common/mod.rs"]
mod train_common;

use std::path::Path;
use std::process::Command;

use masa::stats::Stats;
use serde_json::json;

fn masa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_masa"))
}

fn calibrate(model: &Path, corpus: &Path, shard: Option<&str>, out: &Path) -> std::process::Child {
    let mut c = masa();
    c.args(["--threads", "1", "calibrate"]).arg(model).arg("--corpus").arg(corpus);
    c.args(["--tokens", "160", "--batch", "2", "--seq", "8", "--out"]).arg(out);
    if let Some(s) = shard {
        c.args(["--shard", s]);
    }
    c.spawn().unwrap()
}

#[test]
fn parallel_shards_merge_to_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    // A small OLMoE: routed experts make the routing counts part of the check.
    let config = json!({
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 257, "hidden_size": 16,
        "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64, "tie_word_embeddings": false,
    });
    let model = dir.path().join("model");
    masa::synth::write_checkpoint(&config, &dir.path().join("config"), &model, 3, u64::MAX, &|_| {}).unwrap();
    train_common::byte_tokenizer().save_hf(&model).unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    train_common::write_corpus(&corpus, 30);

    let (one, a, b) = (dir.path().join("one.safetensors"), dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    // The two shards run at the same time, as two array jobs would.
    let mut jobs =
        [calibrate(&model, &corpus, Some("0/2"), &a), calibrate(&model, &corpus, Some("1/2"), &b), calibrate(&model, &corpus, None, &one)];
    for j in &mut jobs {
        assert!(j.wait().unwrap().success());
    }
    let merged = dir.path().join("merged.safetensors");
    assert!(masa().args(["stats", "merge"]).arg(&a).arg(&b).arg("--out").arg(&merged).status().unwrap().success());

    let (whole, merged, first) = (Stats::load(&one).unwrap(), Stats::load(&merged).unwrap(), Stats::load(&a).unwrap());
    assert_eq!(merged.meta.tokens, whole.meta.tokens);
    assert!(first.meta.tokens < whole.meta.tokens && first.meta.corpus[0].contains("shard 0/2"), "{:?}", first.meta);
    assert_eq!(merged.meta.dataset_tokens, whole.meta.dataset_tokens);
    assert_eq!(merged.routing, whole.routing, "routing counts are integers and add exactly");
    assert_eq!(merged.moments.keys().collect::<Vec<_>>(), whole.moments.keys().collect::<Vec<_>>());
    for (k, m) in &whole.moments {
        let g = &merged.moments[k];
        assert_eq!(g.count, m.count, "{k}");
        for (x, y) in g.xxt.iter().zip(&m.xxt) {
            assert!((x - y).abs() <= 1e-12 * y.abs().max(1e-6), "{k}: {x} vs {y}");
        }
    }
    // A malformed shard is refused by the command line, naming the form.
    let out = masa().args(["calibrate"]).arg(&model).args(["--shard", "2/2", "--out", "x"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("0 <= i < N"));
}
