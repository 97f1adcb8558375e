//! `masa synth` checkpoints and the layer-sequential calibration pass, on small configurations
//! of all six source architectures (the paper-size presets are benchmarks, docs/extraction.md).

use candle_core::{Device, Tensor};
use masa::calibrate::{calibrate_with, Accumulator, PassOptions};
use masa::corpus::Batch;
use masa::source::model::{NoHooks, Transformer};
use masa::source::SourceWeights;
use masa::stats::{Stats, StatsMeta};
use serde_json::json;

/// A small `config.json` of each architecture, exercising its peculiarities: GQA, QKV biases,
/// Gemma's sliding-window layers with two RoPE bases, OLMo's clip, OLMoE's top-k, DeepSeek's
/// leading dense layer and shared experts.
fn configs() -> Vec<(&'static str, serde_json::Value)> {
    let base = |arch: &str, model_type: &str| {
        json!({
            "architectures": [arch], "model_type": model_type, "vocab_size": 61, "hidden_size": 32,
            "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "tie_word_embeddings": false,
        })
    };
    let with = |mut v: serde_json::Value, extra: serde_json::Value| {
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    vec![
        ("llama", base("LlamaForCausalLM", "llama")),
        ("qwen2", with(base("Qwen2ForCausalLM", "qwen2"), json!({"attention_bias": true, "tie_word_embeddings": true}))),
        (
            "gemma3",
            with(
                base("Gemma3ForCausalLM", "gemma3_text"),
                json!({"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4, "sliding_window_pattern": 2,
                       "rope_local_base_freq": 100.0, "query_pre_attn_scalar": 16, "tie_word_embeddings": true}),
            ),
        ),
        ("olmo", with(base("OlmoForCausalLM", "olmo"), json!({"clip_qkv": 2.0, "num_key_value_heads": 4}))),
        (
            "olmoe",
            with(
                base("OlmoeForCausalLM", "olmoe"),
                json!({"num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": true, "intermediate_size": 16}),
            ),
        ),
        (
            "deepseek",
            with(
                base("DeepseekForCausalLM", "deepseek"),
                json!({"n_routed_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 12, "n_shared_experts": 2,
                       "first_k_dense_replace": 1, "moe_layer_freq": 1, "scoring_func": "softmax"}),
            ),
        ),
    ]
}

/// Write `config` with `masa synth` into a temp dir, in shards of at most 20 kB.
fn synth(config: &serde_json::Value, seed: u64) -> (tempfile::TempDir, SourceWeights) {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("origin.json");
    masa::synth::write_checkpoint(config, &origin, dir.path(), seed, 20_000, &|_| {}).unwrap();
    let w = SourceWeights::open(dir.path()).unwrap();
    (dir, w)
}

#[test]
fn synth_writes_what_the_loader_reads() {
    for (arch, config) in configs() {
        let (dir, w) = synth(&config, 5);
        assert_eq!(w.config.arch.name(), arch);
        assert!(dir.path().join("model.safetensors.index.json").exists(), "{arch}: small shards force an index");
        let mut names: Vec<String> = w.entries().iter().map(|e| e.name.clone()).collect();
        let mut want: Vec<String> = w.config.hf_tensors().into_iter().map(|(n, _)| n).collect();
        names.sort();
        want.sort();
        assert_eq!(names, want, "{arch}");
        assert!(w.entries().iter().all(|e| e.dtype == "BF16"), "{arch}");
        // Same seed, same weights; another seed, other weights.
        let t = w.tensor("model.layers.1.self_attn.q_proj.weight").unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let again =
            synth(&config, 5).1.tensor("model.layers.1.self_attn.q_proj.weight").unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let other =
            synth(&config, 6).1.tensor("model.layers.1.self_attn.q_proj.weight").unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t, again, "{arch}");
        assert_ne!(t, other, "{arch}");
        // Unit-variance outputs: U(-a, a) with a = 1.7/sqrt(fan_in) has std 0.98/sqrt(fan_in).
        let std = (t.iter().map(|v| v * v).sum::<f32>() / t.len() as f32).sqrt();
        assert!((std * 32f32.sqrt() - 0.98).abs() < 0.1, "{arch}: std {std}");
        let logits =
            Transformer::load(&w).unwrap().forward(&Tensor::new(&[[1u32, 7, 3, 60, 2, 9]], &Device::Cpu).unwrap(), &mut NoHooks).unwrap();
        let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|x| x.abs() > 1e-3), "{arch}: logits");
    }
}

#[test]
fn deep_synthetic_models_keep_activations_finite() {
    // 48 layers: the residual stream grows like sqrt(depth), not exponentially.
    let (_, config) = configs().swap_remove(3);
    let mut config = config;
    config["num_hidden_layers"] = 48.into();
    let (_dir, w) = synth(&config, 1);
    let m = Transformer::load(&w).unwrap();
    let ids = Tensor::new(&[[1u32, 7, 3, 60, 2, 9, 4, 4]], &Device::Cpu).unwrap();
    struct Last;
    impl masa::source::model::Hooks for Last {
        fn wants_ffn_inputs(&self) -> bool {
            false
        }
        fn last_layer(&self) -> Option<usize> {
            Some(47)
        }
    }
    let h = m.hidden_states(&ids, &mut Last).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let rms = (h.iter().map(|v| v * v).sum::<f32>() / h.len() as f32).sqrt();
    assert!(rms.is_finite() && rms > 1.0 && rms < 100.0, "residual rms {rms} after 48 layers");
}

fn meta() -> StatsMeta {
    StatsMeta {
        format: masa::stats::FORMAT.into(),
        source_hash: "test".into(),
        source: "synth".into(),
        arch: "any".into(),
        corpus: vec!["random ids".into()],
        tokens: 0,
        seq_len: 0,
        seeds: vec![0],
        dataset_tokens: Default::default(),
        masa_version: "test".into(),
        experts: None,
    }
}

/// Five batches of 2 sequences of 6 random ids, alternating between two datasets.
fn batches(vocab: usize, seed: u64) -> Vec<Batch> {
    let mut rng = masa::rng::SplitMix64::new(seed);
    (0..5)
        .map(|k| Batch { ids: (0..12).map(|_| rng.below(vocab) as u32).collect(), batch: 2, seq_len: 6, dataset: vec![k % 2, (k + 1) % 2] })
        .collect()
}

/// The whole-model pass: every batch through all layers (`Transformer::hidden_states`), the
/// same accumulator observing.
fn whole_model(w: &SourceWeights, batches: &[Batch], datasets: &[String]) -> Stats {
    let model = Transformer::load(w).unwrap();
    let mut acc = Accumulator::new(&model.config, datasets);
    for b in batches {
        acc.count(b).unwrap();
        let ids = candle_core::Tensor::from_slice(&b.ids, (b.batch, b.seq_len), &candle_core::Device::Cpu).unwrap();
        acc.observe(b);
        model.hidden_states(&ids, &mut acc).unwrap();
    }
    acc.into_stats(meta()).unwrap()
}

/// `--device cuda` calibration where the GPU engine cannot run it is refused before any work,
/// naming why: a source that is not plain Llama (every other architecture here), or
/// rank-specific mode; and, for a plain Llama source, a build without the `cuda` feature (or a
/// machine without the CUDA libraries). The GPU pass itself is compared with the CPU pass by
/// `masa bench cuda-check` on a device.
#[test]
fn calibration_on_cuda_is_refused_where_it_cannot_run() {
    let datasets = vec!["a".to_string(), "b".to_string()];
    let cuda = PassOptions { block_tokens: 24, device: masa::engine::Device::Cuda(0), ..Default::default() };
    let run =
        |w: &SourceWeights, pass: &PassOptions| calibrate_with(w, batches(61, 3).into_iter().map(Ok), &datasets, meta(), pass, &mut |_| {});
    for (arch, config) in configs() {
        let (_dir, w) = synth(&config, 11);
        let name = w.config.arch.name();
        if arch != "llama" {
            let e = run(&w, &cuda).unwrap_err().to_string();
            assert!(e.contains("--device cuda") && e.contains("plain Llama") && e.contains(&format!("a {name} source")), "{arch}: {e}");
            continue;
        }
        let ranked = PassOptions { rank: Some(masa::align::RankSpec::Rank(5)), ..cuda.clone() };
        let e = run(&w, &ranked).unwrap_err().to_string();
        assert!(e.contains("plain Llama") && e.contains("rank-specific"), "{e}");
        match run(&w, &cuda) {
            Err(e) if !cfg!(feature = "cuda") => assert!(e.to_string().contains("--features cuda"), "{e}"),
            Err(e) => assert!(e.to_string().contains("--device cuda"), "{e}"),
            // A cuda build on a machine with a GPU: the pass runs.
            Ok(stats) => assert!(cfg!(feature = "cuda") && !stats.moments.is_empty()),
        }
    }
}

/// The statistics of `calibrate_with` equal those of a whole-model pass through the hooks
/// (candle's forward): bit for bit on the layer-sequential path, to f32 rounding where a plain
/// Llama source runs on the training engine's fused kernels (the `llama` case).
#[test]
fn layer_sequential_statistics_equal_the_whole_model_pass() {
    let datasets = vec!["a".to_string(), "b".to_string()];
    for (arch, config) in configs() {
        let (dir, w) = synth(&config, 11);
        let bs = batches(61, 3);
        let want = whole_model(&w, &bs, &datasets);
        assert!(!want.moments.is_empty());
        let fused = masa::student::plain_llama(&w.config).is_some();
        assert_eq!(fused, arch == "llama", "{arch}: only plain Llama runs fused");
        // Σ x xᵀ entries: exact sums of the same f32 products, or (fused) within f32 rounding
        // of the whole sum's scale.
        let close = |got: &[f64], want: &[f64], what: &str| {
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(want) {
                let tol = if fused { 2e-5 * scale } else { 1e-12 * b.abs().max(1e-6) };
                assert!((a - b).abs() <= tol, "{arch} {what}: {a} vs {b} (scale {scale})");
            }
        };
        // One batch per block, two batches per block (the last block short), one block.
        for block in [1, 24, 1000] {
            let mut progress = 0;
            let got = calibrate_with(
                &w,
                batches(61, 3).into_iter().map(Ok),
                &datasets,
                meta(),
                &PassOptions { block_tokens: block, ..Default::default() },
                &mut |n| progress += n,
            )
            .unwrap();
            assert_eq!(progress, 60 * w.config.num_hidden_layers, "{arch}: progress counts tokens × layers");
            assert_eq!(got.meta, want.meta, "{arch}");
            assert_eq!(got.routing, want.routing, "{arch}: routing counts");
            assert_eq!(got.moments.keys().collect::<Vec<_>>(), want.moments.keys().collect::<Vec<_>>(), "{arch}");
            for (k, m) in &want.moments {
                let g = &got.moments[k];
                assert_eq!(g.count, m.count, "{arch} {k}");
                close(&g.xxt, &m.xxt, &format!("block {block} {k}"));
            }
        }
        if w.config.moe.is_some() {
            assert!(!want.routing.is_empty(), "{arch}: routing recorded");
        }
        // The size estimate that `masa calibrate` checks against memory: exact for dense
        // layers, an upper bound when some expert receives no token.
        let bytes = |st: &Stats| 8 * st.moments.values().map(|m| m.xxt.len() as u64 + 1).sum::<u64>();
        let estimate = masa::calibrate::stats_bytes(&w.config, &PassOptions::default());
        if w.config.moe.is_none() {
            assert_eq!(estimate, bytes(&want), "{arch}");
            let pass = PassOptions {
                rank: Some(masa::align::RankSpec::Rank(5)),
                block_tokens: 24,
                layers: None,
                experts: None,
                device: Default::default(),
            };
            let ranked = calibrate_with(&w, batches(61, 3).into_iter().map(Ok), &datasets, meta(), &pass, &mut |_| {}).unwrap();
            let cross: u64 = ranked.cross.values().map(|(_, v)| 8 * v.len() as u64).sum();
            assert_eq!(masa::calibrate::stats_bytes(&w.config, &pass), bytes(&ranked) + cross, "{arch}: rank-specific");
        } else {
            assert!(estimate >= bytes(&want), "{arch}");
        }
        // A layer range: exactly that layer's statistics, and the pass stops after it.
        let mut progress = 0;
        let pass = PassOptions { block_tokens: 24, layers: Some(vec![1]), ..Default::default() };
        let one = calibrate_with(&w, batches(61, 3).into_iter().map(Ok), &datasets, meta(), &pass, &mut |n| progress += n).unwrap();
        assert_eq!(progress, 60 * 2, "{arch}: layers 0 and 1 run");
        let layer1 = |k: &&String| k.starts_with("layers.1.");
        assert_eq!(one.moments.keys().collect::<Vec<_>>(), want.moments.keys().filter(layer1).collect::<Vec<_>>(), "{arch}");
        assert_eq!(one.routing.keys().collect::<Vec<_>>(), want.routing.keys().filter(layer1).collect::<Vec<_>>(), "{arch}");
        for (k, m) in &one.moments {
            close(&m.xxt, &want.moments[k].xxt, k);
        }
        // Extraction of a layer range loads only that range's sums.
        let f = dir.path().join("stats.safetensors");
        want.save(&f).unwrap();
        let loaded = Stats::load_layers(&f, Some(&[1])).unwrap();
        assert_eq!(loaded.moments.keys().collect::<Vec<_>>(), one.moments.keys().collect::<Vec<_>>(), "{arch}");
        assert_eq!(loaded.routing, one.routing, "{arch}");
        assert_eq!(Stats::load(&f).unwrap().moments.len(), want.moments.len(), "{arch}");
        let e = calibrate_with(
            &w,
            batches(61, 3).into_iter().map(Ok),
            &datasets,
            meta(),
            &PassOptions { layers: Some(vec![3]), ..pass },
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--layers 3") && e.contains("0..2"), "{e}");
    }
}
