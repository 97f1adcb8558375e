//! `masa init` end to end: every strategy on a tiny random Llama source (HF directory with a
//! word-level tokenizer), checked against independent computations of what it should select;
//! bad inputs; and on SmolLM2 (when present) that selecting everything is the identity.

mod common;

use std::path::{Path, PathBuf};

use common::{write_config, Ckpt, Rng};
use faer::Mat;
use masa::init::genes::{gene_key, Genes};
use masa::init::{run, Expand, GeneScale, InitOptions, InitRequest, Rest, Strategy};
use masa::score::score_texts;
use masa::source::model::Transformer;
use masa::source::SourceModel;
use masa::stats::{moment_key, Moment, Stats, StatsMeta};
use safetensors::Dtype;
use serde_json::json;

const H: usize = 32;
const F: usize = 48;
const L: usize = 3;
const V: usize = 40;

/// A word-level tokenizer over `w0 … w{V-3}` plus `<s>`, `</s>`.
fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    vocab.insert("<s>".into(), 1.into());
    vocab.insert("</s>".into(), 2.into());
    for i in 3..V {
        vocab.insert(format!("w{i}"), i.into());
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

fn source_config() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": H, "intermediate_size": F, "num_hidden_layers": L,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V,
        "rms_norm_eps": 1e-6, "rope_theta": 5000.0, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 64,
    })
}

struct Fixture {
    dir: tempfile::TempDir,
    ck: Ckpt,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("source");
        std::fs::create_dir_all(&src).unwrap();
        write_config(&src, &source_config());
        std::fs::write(src.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
        let mut rng = Rng::new(11);
        let mut ck = Ckpt::default();
        ck.add_random(&mut rng, "model.embed_tokens.weight", &[V, H], 0.5, 0.0);
        ck.add_random(&mut rng, "model.norm.weight", &[H], 0.2, 1.0);
        for l in 0..L {
            let p = format!("model.layers.{l}");
            ck.add_random(&mut rng, &format!("{p}.input_layernorm.weight"), &[H], 0.2, 1.0);
            ck.add_random(&mut rng, &format!("{p}.post_attention_layernorm.weight"), &[H], 0.2, 1.0);
            ck.add_random(&mut rng, &format!("{p}.self_attn.q_proj.weight"), &[H, H], 0.3, 0.0);
            ck.add_random(&mut rng, &format!("{p}.self_attn.k_proj.weight"), &[H / 2, H], 0.3, 0.0);
            ck.add_random(&mut rng, &format!("{p}.self_attn.v_proj.weight"), &[H / 2, H], 0.3, 0.0);
            ck.add_random(&mut rng, &format!("{p}.self_attn.o_proj.weight"), &[H, H], 0.3, 0.0);
            ck.add_random(&mut rng, &format!("{p}.mlp.gate_proj.weight"), &[F, H], 0.3, 0.0);
            ck.add_random(&mut rng, &format!("{p}.mlp.up_proj.weight"), &[F, H], 0.3, 0.0);
            ck.add_random(&mut rng, &format!("{p}.mlp.down_proj.weight"), &[H, F], 0.3, 0.0);
        }
        ck.write(&src, Dtype::F32, 1);
        Fixture { dir, ck }
    }

    fn source(&self) -> PathBuf {
        self.dir.path().join("source")
    }

    fn hash(&self) -> String {
        SourceModel::open(&self.source()).unwrap().fingerprint().unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Random genes of rank `r` for every source layer, tagged with `source_hash`.
    fn genes(&self, r: usize, source_hash: &str) -> PathBuf {
        let mut rng = Rng::new(99);
        let mut gs = Vec::new();
        for l in 0..L {
            for p in ["gate_proj", "up_proj", "down_proj"] {
                gs.push((gene_key(&format!("model.layers.{l}.mlp"), p), Mat::from_fn(r, r, |_, _| rng.uniform() as f64 * 3.0)));
            }
        }
        let path = self.path(&format!("genes-{r}-{}.safetensors", &source_hash[..8]));
        Genes::write(&path, &gs, &json!({ "source_hash": source_hash, "rank": r })).unwrap();
        path
    }

    /// Statistics whose diagonals rank channels and neurons by `hidden_e` and `ffn_e(layer)`.
    fn stats(&self, hidden_e: &[f64], ffn_e: impl Fn(usize) -> Vec<f64>) -> PathBuf {
        let mut moments = std::collections::BTreeMap::new();
        let diag = |d: &[f64]| {
            let n = d.len();
            let mut m = Moment::new(n);
            for i in 0..n {
                m.xxt[i * n + i] = d[i] * 10.0;
            }
            m.count = 10.0;
            m
        };
        for l in 0..L {
            moments.insert(moment_key(l, "ffn_in"), diag(hidden_e));
            moments.insert(moment_key(l, "ffn_mid"), diag(&ffn_e(l)));
        }
        let meta = StatsMeta {
            format: masa::stats::FORMAT.into(),
            source_hash: self.hash(),
            source: "tiny".into(),
            arch: "llama".into(),
            corpus: vec![],
            tokens: 10,
            seq_len: 10,
            seeds: vec![0],
            dataset_tokens: Default::default(),
            masa_version: "test".into(),
            experts: None,
        };
        let p = self.path("stats.safetensors");
        Stats { meta, moments, routing: Default::default(), cross: Default::default() }.save(&p).unwrap();
        p
    }
}

/// The gene of matrix `proj` of the dense FFN of source layer `layer`.
fn gene<'a>(g: &'a Genes, layer: usize, proj: &str) -> &'a Mat<f64> {
    let sets = g.ffn_genes(layer).unwrap();
    assert_eq!(sets.len(), 1);
    match proj {
        "gate_proj" => sets[0].gate,
        "up_proj" => sets[0].up,
        _ => sets[0].down,
    }
}

fn student_file(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

/// hidden 16 (of 32), FFN 20 (of 48; does not divide), 2 layers, 2 heads / 1 KV head of dim 8.
fn small_student(f: &Fixture) -> String {
    student_file(
        f.dir.path(),
        "student.toml",
        "hidden_size = 16\nintermediate_size = 20\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 1\n",
    )
}

fn request(f: &Fixture, student: &str, out: &str, opts: InitOptions) -> InitRequest {
    InitRequest {
        student: student.into(),
        out: f.path(out),
        source: f.source(),
        genes: None,
        stats: None,
        corpus: Vec::new(),
        options: opts,
    }
}

/// The student's tensors by name.
fn tensors(dir: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), Dtype::F32);
            let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (n, (v.shape().to_vec(), data))
        })
        .collect()
}

/// `src[rows, cols]` of a row-major matrix with `n_cols` columns.
fn sub(src: &[f32], n_cols: usize, rows: &[usize], cols: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| cols.iter().map(move |&c| src[r * n_cols + c])).collect()
}

fn mean_nll(dir: &Path, texts: &[String]) -> f64 {
    let m = SourceModel::open(dir).unwrap();
    let t = Transformer::load(&m.weights).unwrap();
    let s = score_texts(&t, &m.tokenizer, texts, false, &mut || {}).unwrap();
    let all: Vec<f64> = s.iter().flat_map(|x| x.nll.iter().map(|&v| v as f64)).collect();
    all.iter().sum::<f64>() / all.len() as f64
}

fn tiny_texts() -> Vec<String> {
    vec!["w3 w7 w9 w12 w30 w31 w5".into(), "w20 w21 w22 w3 w3 w39".into()]
}

#[test]
fn every_strategy_is_deterministic_finite_and_scores() {
    let f = Fixture::new();
    let student = small_student(&f);
    let genes = f.genes(12, &f.hash());
    let stats = f.stats(&(0..H).map(|c| c as f64).collect::<Vec<_>>(), |_| (0..F).map(|i| i as f64).collect());
    for s in ["masa", "naive", "scratch", "weight-selection", "prune"] {
        let mut opts = InitOptions::new(s.parse().unwrap());
        opts.seed = 3;
        let mut outs = Vec::new();
        for rep in 0..2 {
            let mut req = request(&f, &student, &format!("{s}-{rep}"), opts.clone());
            req.genes = Some(genes.clone());
            req.stats = Some(stats.clone());
            run(&req).unwrap();
            outs.push(std::fs::read(req.out.join("model.safetensors")).unwrap());
            for t in tensors(&req.out).values() {
                assert!(t.1.iter().all(|v| v.is_finite()), "{s}: non-finite weight");
            }
            let nll = mean_nll(&req.out, &tiny_texts());
            assert!(nll.is_finite() && nll > 0.0, "{s}: NLL {nll}");
            let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(req.out.join("config.json")).unwrap()).unwrap();
            assert_eq!(cfg["vocab_size"], V);
            assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
            assert_eq!(cfg["bos_token_id"], 1);
            // One architecture for every strategy: the student config's, never the source's
            // RoPE base (5000) or norm epsilon (1e-6).
            assert_eq!((cfg["rope_theta"].as_f64().unwrap(), cfg["rms_norm_eps"].as_f64().unwrap()), (10000.0, 1e-5), "{s}");
            let prov: serde_json::Value = serde_json::from_slice(&std::fs::read(req.out.join("masa.json")).unwrap()).unwrap();
            assert_eq!(prov["strategy"], s);
            assert_eq!(prov["seed"], 3);
            assert_eq!(prov["source"]["hash"], f.hash());
            assert!(req.out.join("tokenizer.json").exists() && req.out.join("tokenizer_config.json").exists());
        }
        assert!(outs[0] == outs[1], "{s}: same seed, different weights");
    }
    // A different seed changes Scratch weights.
    let mut o = InitOptions::new(Strategy::Scratch);
    o.seed = 4;
    run(&request(&f, &student, "scratch-4", o)).unwrap();
    assert!(std::fs::read(f.path("scratch-4/model.safetensors")).unwrap() != std::fs::read(f.path("scratch-0/model.safetensors")).unwrap());
}

#[test]
fn masa_with_full_rank_square_target_is_the_gene_itself() {
    let f = Fixture::new();
    let r = 16;
    let genes = f.genes(r, &f.hash());
    let g = Genes::load(&genes).unwrap();
    // hidden = ffn = r: p = q = r; two layers map uniformly to source layers 0 and 2.
    let student = student_file(
        f.dir.path(),
        "sq.toml",
        "hidden_size = 16\nintermediate_size = 16\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 2\n",
    );
    let mut opts = InitOptions::new(Strategy::Masa);
    opts.gene_scale = GeneScale::None;
    let mut req = request(&f, &student, "masa-sq", opts.clone());
    req.genes = Some(genes.clone());
    run(&req).unwrap();
    let t = tensors(&req.out);
    for (lt, ls) in [(0, 0), (1, 2)] {
        for p in ["gate_proj", "up_proj", "down_proj"] {
            let m = gene(&g, ls, p);
            let w = &t[&format!("model.layers.{lt}.mlp.{p}.weight")].1;
            for i in 0..r {
                for j in 0..r {
                    assert!((w[i * r + j] as f64 - m[(i, j)]).abs() < 1e-4, "{lt} {p} [{i},{j}]");
                }
            }
        }
    }
    // Default --gene-scale frobenius: every FFN matrix has the Scratch init's expected norm.
    opts.gene_scale = GeneScale::Frobenius;
    let mut req = request(&f, &small_student(&f), "masa-frob", opts);
    req.genes = Some(genes);
    run(&req).unwrap();
    let t = tensors(&req.out);
    for (name, (shape, v)) in &t {
        if name.contains(".mlp.") {
            let norm = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let want = 0.02 * ((shape[0] * shape[1]) as f64).sqrt();
            assert!((norm / want - 1.0).abs() < 1e-4, "{name}: {norm} vs {want}");
        }
    }
}

/// At the default r' (64, below the genes' rank 80) Eq. 6's row scores differ, and each student
/// FFN matrix is `U_p Σ_{r'} V_qᵀ` of its gene, computed here from the SVD directly: the p rows of
/// U_{r'} (and q rows of V_{r'}) with the largest norms, in their original order.
#[test]
fn default_adaptive_scaling_writes_the_principal_component_reconstruction() {
    let f = Fixture::new();
    let r = 80;
    let genes = f.genes(r, &f.hash());
    let g = Genes::load(&genes).unwrap();
    let mut opts = InitOptions::new(Strategy::Masa);
    opts.gene_scale = GeneScale::None;
    let mut req = request(&f, &small_student(&f), "masa-default", opts);
    req.genes = Some(genes);
    run(&req).unwrap();
    let t = tensors(&req.out);
    let rp = 64;
    for (lt, ls) in [(0, 0), (1, 2)] {
        for (p, (rows_n, cols_n)) in [("gate_proj", (20, 16)), ("up_proj", (20, 16)), ("down_proj", (16, 20))] {
            let m = gene(&g, ls, p);
            let svd = m.thin_svd().unwrap();
            let (u, sv, v) = (svd.U(), svd.S().column_vector(), svd.V());
            let norm = |x: faer::MatRef<f64>, i: usize| (0..rp).map(|k| x[(i, k)] * x[(i, k)]).sum::<f64>().sqrt();
            let top = |x: faer::MatRef<f64>, n: usize| {
                let scores: Vec<f64> = (0..r).map(|i| norm(x, i)).collect();
                let (lo, hi) = scores.iter().fold((f64::MAX, 0f64), |(a, b), &s| (a.min(s), b.max(s)));
                assert!(hi - lo > 0.1, "{p}: row scores {lo}..{hi} do not tell rows apart");
                let mut idx: Vec<usize> = (0..r).collect();
                idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
                let mut keep = idx[..n].to_vec();
                keep.sort();
                keep
            };
            let (rows, cols) = (top(u, rows_n), top(v, cols_n));
            let w = &t[&format!("model.layers.{lt}.mlp.{p}.weight")].1;
            let mut max_err = 0f64;
            for (i, &a) in rows.iter().enumerate() {
                for (j, &b) in cols.iter().enumerate() {
                    let want: f64 = (0..rp).map(|k| u[(a, k)] * sv[k] * v[(b, k)]).sum();
                    max_err = max_err.max((w[i * cols_n + j] as f64 - want).abs() / want.abs().max(1.0));
                }
            }
            assert!(max_err < 1e-4, "layer {lt} {p}: max error {max_err}");
            // Not a submatrix of the gene (what r' = r gives).
            let sub_err = rows
                .iter()
                .enumerate()
                .flat_map(|(i, &a)| cols.iter().enumerate().map(move |(j, &b)| (i, j, a, b)))
                .map(|(i, j, a, b)| (w[i * cols_n + j] as f64 - m[(a, b)]).abs())
                .fold(0f64, f64::max);
            assert!(sub_err > 1e-2, "layer {lt} {p} equals M[rows, cols]");
        }
    }
}

/// The (gate row, up row, down column) of every neuron of student layer `l`, concatenated.
fn neurons(t: &std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>, l: usize) -> Vec<Vec<f64>> {
    let (gs, g) = &t[&format!("model.layers.{l}.mlp.gate_proj.weight")];
    let (_, u) = &t[&format!("model.layers.{l}.mlp.up_proj.weight")];
    let (_, d) = &t[&format!("model.layers.{l}.mlp.down_proj.weight")];
    let (f, h) = (gs[0], gs[1]);
    (0..f)
        .map(|i| {
            g[i * h..(i + 1) * h].iter().chain(&u[i * h..(i + 1) * h]).copied().chain((0..h).map(|j| d[j * f + i])).map(f64::from).collect()
        })
        .collect()
}

/// The largest cosine between two different neurons of a layer.
fn max_twin_cosine(ns: &[Vec<f64>]) -> f64 {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut max = f64::MIN;
    for a in 0..ns.len() {
        for b in 0..a {
            assert_ne!(ns[a], ns[b], "neurons {b} and {a} are equal");
            let dot: f64 = ns[a].iter().zip(&ns[b]).map(|(x, y)| x * y).sum();
            max = max.max(dot / (norm(&ns[a]) * norm(&ns[b])));
        }
    }
    max
}

/// Issue 31: expansion past 2r (here FFN 44 from genes of rank 12: plain cycling repeats the
/// neurons 12..20 as 24..44, and `--coupled` repeats every neuron past r) leaves no two
/// neurons equal and none with a twin at cosine > 0.9999, in default and coupled mode,
/// and for the control; the rows up to r stay the paper's.
#[test]
fn masa_students_wider_than_2r_have_no_twin_neurons() {
    let f = Fixture::new();
    let r = 12;
    let genes = f.genes(r, &f.hash());
    let g = Genes::load(&genes).unwrap();
    let wide = student_file(
        f.dir.path(),
        "wide.toml",
        "hidden_size = 16\nintermediate_size = 44\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 1\n",
    );
    for (name, coupled, rotate) in [("default", false, false), ("coupled", true, false), ("rotated", false, true)] {
        let mut opts = InitOptions::new(Strategy::Masa);
        (opts.coupled, opts.rotate_genes, opts.gene_scale, opts.components) =
            (coupled, rotate, GeneScale::None, Some("all".parse().unwrap()));
        let mut req = request(&f, &wide, &format!("wide-{name}"), opts);
        req.genes = Some(genes.clone());
        run(&req).unwrap();
        let t = tensors(&req.out);
        for l in 0..2 {
            let cos = max_twin_cosine(&neurons(&t, l));
            assert!(cos < 0.9999, "{name}, layer {l}: a neuron has a twin at cosine {cos}");
        }
        let prov: serde_json::Value = serde_json::from_slice(&std::fs::read(req.out.join("masa.json")).unwrap()).unwrap();
        let separated = prov["init"]["matrices"][0]["genes"][0]["repeated_neurons_separated"].as_u64().unwrap();
        assert!(separated >= 44 - 2 * r as u64, "{name}: {separated} separated");
        if !rotate {
            // r' = r, no gene scale: the first r neurons are the gene's rows, untouched.
            let m = gene(&g, 0, "gate_proj");
            let w = &t["model.layers.0.mlp.gate_proj.weight"].1;
            for i in 0..r {
                for j in 0..r {
                    assert!((w[i * 16 + j] as f64 - m[(i, j)]).abs() < 1e-4, "{name}: gate [{i},{j}]");
                }
            }
        }
    }
}

/// Issue 31: the hybrid's FFN reads and writes the source hidden channels its embeddings,
/// attention and norms keep: student channel t is source channel hid[t], and gene coordinate
/// hid[t] mod r is what stands for it under f_c and f_d.
#[test]
fn hybrid_ffn_uses_the_gene_coordinates_of_the_inherited_channels() {
    let f = Fixture::new();
    let r = 12;
    let genes = f.genes(r, &f.hash());
    let g = Genes::load(&genes).unwrap();
    let mut opts = InitOptions::new(Strategy::Masa);
    (opts.rest, opts.gene_scale, opts.components) = (Rest::WeightSelection, GeneScale::None, Some("all".parse().unwrap()));
    let mut req = request(&f, &small_student(&f), "hybrid", opts);
    req.genes = Some(genes);
    run(&req).unwrap();
    let t = tensors(&req.out);
    let hid = masa::init::select::uniform_indices(H, 16, "x").unwrap();
    // The embedding keeps source channels hid (weight selection's part)...
    assert_eq!(t["model.embed_tokens.weight"].1, sub(&f.ck.get("model.embed_tokens.weight"), H, &(0..V).collect::<Vec<_>>(), &hid));
    // ... and the FFN the gene coordinates those channels fold to (the first r neurons are the
    // gene's rows at r' = r).
    for (lt, ls) in [(0, 0), (1, 2)] {
        let (mg, md) = (gene(&g, ls, "gate_proj"), gene(&g, ls, "down_proj"));
        let (wg, wd) = (&t[&format!("model.layers.{lt}.mlp.gate_proj.weight")].1, &t[&format!("model.layers.{lt}.mlp.down_proj.weight")].1);
        for i in 0..r {
            for (j, &c) in hid.iter().enumerate() {
                assert!((wg[i * 16 + j] as f64 - mg[(i, c % r)]).abs() < 1e-4, "layer {lt} gate [{i},{j}]");
                assert!((wd[j * 20 + i] as f64 - md[(c % r, i)]).abs() < 1e-4, "layer {lt} down [{j},{i}]");
            }
        }
    }
}

#[test]
fn naive_truncates_and_pads_with_scratch() {
    let f = Fixture::new();
    let genes = f.genes(12, &f.hash());
    let g = Genes::load(&genes).unwrap();
    let mut opts = InitOptions::new(Strategy::Naive);
    opts.gene_scale = GeneScale::None;
    opts.seed = 5;
    let mut req = request(&f, &small_student(&f), "naive", opts);
    req.genes = Some(genes);
    run(&req).unwrap();
    let mut sc = InitOptions::new(Strategy::Scratch);
    sc.seed = 5;
    run(&request(&f, &small_student(&f), "scratch5", sc)).unwrap();
    let (t, s) = (tensors(&req.out), tensors(&f.path("scratch5")));
    // gate (20, 16) of student layer 1 <- source layer 2: 12x12 gene block, Scratch elsewhere.
    let w = &t["model.layers.1.mlp.gate_proj.weight"].1;
    let sw = &s["model.layers.1.mlp.gate_proj.weight"].1;
    let m = gene(&g, 2, "gate_proj");
    for i in 0..20 {
        for j in 0..16 {
            let want = if i < 12 && j < 12 { m[(i, j)] as f32 } else { sw[i * 16 + j] };
            assert_eq!(w[i * 16 + j], want, "[{i},{j}]");
        }
    }
    // Non-FFN tensors are the Scratch ones (same seed, same per-tensor streams).
    assert_eq!(t["model.embed_tokens.weight"], s["model.embed_tokens.weight"]);
    assert_eq!(t["model.layers.0.self_attn.q_proj.weight"], s["model.layers.0.self_attn.q_proj.weight"]);
}

#[test]
fn weight_selection_picks_uniform_indices_and_whole_heads() {
    let f = Fixture::new();
    run(&request(&f, &small_student(&f), "ws", InitOptions::new(Strategy::WeightSelection))).unwrap();
    let t = tensors(&f.path("ws"));
    // 32 -> 16 divides: every second channel. 48 -> 20 does not: round(i·47/19), half to even.
    let hid: Vec<usize> = (0..16).map(|i| 2 * i).collect();
    let ffn: Vec<usize> = (0..20).map(|i| ((i * 47) as f64 / 19.0).round_ties_even() as usize).collect();
    assert_eq!(ffn[..6], [0, 2, 5, 7, 10, 12]);
    assert_eq!(*ffn.last().unwrap(), 47);
    let all_v: Vec<usize> = (0..V).collect();
    assert_eq!(t["model.embed_tokens.weight"].1, sub(f.ck.get("model.embed_tokens.weight"), H, &all_v, &hid));
    // First-N layers: student layer 1 <- source layer 1.
    let s = |n: &str| f.ck.get(&format!("model.layers.1.{n}.weight"));
    let w = |n: &str| t[&format!("model.layers.1.{n}.weight")].1.clone();
    assert_eq!(w("mlp.gate_proj"), sub(s("mlp.gate_proj"), H, &ffn, &hid));
    assert_eq!(w("mlp.down_proj"), sub(s("mlp.down_proj"), F, &hid, &ffn));
    assert_eq!(w("input_layernorm"), hid.iter().map(|&c| s("input_layernorm")[c]).collect::<Vec<_>>());
    // Source 4 heads / 2 KV (dim 8) -> 2 heads / 1 KV (dim 8): heads 0 and 2; KV head of head 0.
    let q_rows: Vec<usize> = (0..8).chain(16..24).collect();
    let kv_rows: Vec<usize> = (0..8).collect();
    assert_eq!(w("self_attn.q_proj"), sub(s("self_attn.q_proj"), H, &q_rows, &hid));
    assert_eq!(w("self_attn.k_proj"), sub(s("self_attn.k_proj"), H, &kv_rows, &hid));
    assert_eq!(w("self_attn.v_proj"), sub(s("self_attn.v_proj"), H, &kv_rows, &hid));
    assert_eq!(w("self_attn.o_proj"), sub(s("self_attn.o_proj"), H, &hid, &q_rows));
}

#[test]
fn prune_keeps_highest_energy_channels_and_neurons() {
    let f = Fixture::new();
    // Channel energy peaks at odd channels > 10; neuron energy differs per layer.
    let hidden_e: Vec<f64> = (0..H).map(|c| if c % 2 == 1 { 100.0 + c as f64 } else { c as f64 * 0.01 }).collect();
    let ffn_e = |l: usize| (0..F).map(|i| ((i * 7 + l * 5) % F) as f64).collect::<Vec<f64>>();
    let stats = f.stats(&hidden_e, ffn_e);
    let mut req = request(&f, &small_student(&f), "prune", InitOptions::new(Strategy::Prune));
    req.stats = Some(stats);
    run(&req).unwrap();
    let t = tensors(&req.out);
    // Independent: sort by energy (summed over the 3 layers: same order), keep top 16, in order.
    let mut hid: Vec<usize> = (0..H).collect();
    hid.sort_by(|&a, &b| hidden_e[b].partial_cmp(&hidden_e[a]).unwrap());
    let mut hid = hid[..16].to_vec();
    hid.sort();
    assert_eq!(hid, (0..16).map(|i| 2 * i + 1).collect::<Vec<_>>());
    // Uniform layer map: student layer 1 <- source layer 2.
    let e = ffn_e(2);
    let mut ffn: Vec<usize> = (0..F).collect();
    ffn.sort_by(|&a, &b| e[b].partial_cmp(&e[a]).unwrap().then(a.cmp(&b)));
    let mut ffn = ffn[..20].to_vec();
    ffn.sort();
    let all_v: Vec<usize> = (0..V).collect();
    assert_eq!(t["model.embed_tokens.weight"].1, sub(f.ck.get("model.embed_tokens.weight"), H, &all_v, &hid));
    assert_eq!(t["model.layers.1.mlp.up_proj.weight"].1, sub(f.ck.get("model.layers.2.mlp.up_proj.weight"), H, &ffn, &hid));
    assert_eq!(t["model.layers.1.mlp.down_proj.weight"].1, sub(f.ck.get("model.layers.2.mlp.down_proj.weight"), F, &hid, &ffn));
    // Heads by weight norm: the KV group with the larger ‖q‖²+‖o‖²+‖k‖²+‖v‖², best head within.
    let g = |n: &str| f.ck.get(&format!("model.layers.2.self_attn.{n}.weight"));
    let head = |h: usize| -> f64 {
        (h * 8..h * 8 + 8)
            .map(|r| (0..H).map(|c| (g("q_proj")[r * H + c] as f64).powi(2) + (g("o_proj")[c * H + r] as f64).powi(2)).sum::<f64>())
            .sum()
    };
    let kvn = |k: usize| -> f64 {
        (k * 8..k * 8 + 8)
            .map(|r| (0..H).map(|c| (g("k_proj")[r * H + c] as f64).powi(2) + (g("v_proj")[r * H + c] as f64).powi(2)).sum::<f64>())
            .sum()
    };
    let grp = |k: usize| head(2 * k) + head(2 * k + 1) + kvn(k);
    let kg = if grp(1) > grp(0) { 1 } else { 0 };
    let q_rows: Vec<usize> = (kg * 16..kg * 16 + 16).collect();
    assert_eq!(t["model.layers.1.self_attn.q_proj.weight"].1, sub(g("q_proj"), H, &q_rows, &hid));
    let kv_rows: Vec<usize> = (kg * 8..kg * 8 + 8).collect();
    assert_eq!(t["model.layers.1.self_attn.k_proj.weight"].1, sub(g("k_proj"), H, &kv_rows, &hid));
}

#[test]
fn same_shape_selection_and_pruning_are_the_identity_on_the_tiny_source() {
    let f = Fixture::new();
    let same = student_file(
        f.dir.path(),
        "same.toml",
        &format!("hidden_size = {H}\nintermediate_size = {F}\nnum_hidden_layers = {L}\nnum_attention_heads = 4\nnum_key_value_heads = 2\nrope_theta = 5000.0\nrms_norm_eps = 1e-6\n"),
    );
    let stats = f.stats(&(0..H).map(|c| ((c * 13) % 7) as f64).collect::<Vec<_>>(), |l| (0..F).map(|i| ((i + l) % 5) as f64).collect());
    let want = mean_nll(&f.source(), &tiny_texts());
    for s in [Strategy::WeightSelection, Strategy::Prune] {
        let mut req = request(&f, &same, s.name(), InitOptions::new(s));
        req.stats = Some(stats.clone());
        run(&req).unwrap();
        for (n, (_, v)) in tensors(&req.out) {
            assert_eq!(v, f.ck.get(&n), "{s}: {n}");
        }
        assert_eq!(mean_nll(&req.out, &tiny_texts()), want, "{s}");
    }
}

fn err(req: &InitRequest) -> String {
    match run(req) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let f = Fixture::new();
    let student = small_student(&f);
    // Genes from a different source.
    let mut req = request(&f, &student, "x", InitOptions::new(Strategy::Masa));
    req.genes = Some(f.genes(12, &"ab".repeat(32)));
    let e = err(&req);
    assert!(e.contains("different source") && e.contains("--source") && e.contains("genes-12-abababab"), "{e}");
    // Wider than the genes allow without expansion: hidden 16, ffn 20 > r = 12.
    let mut o = InitOptions::new(Strategy::Masa);
    o.expand = Expand::None;
    let mut req = request(&f, &student, "x", o);
    req.genes = Some(f.genes(12, &f.hash()));
    let e = err(&req);
    assert!(e.contains("without expansion") && e.contains("r = 12"), "{e}");
    // --components beyond a gene's rank is capped at it, as the default is (one resolution of
    // r' for every variant), and masa.json says what was used.
    let mut o = InitOptions::new(Strategy::Masa);
    o.components = Some(masa::init::scale::Components::Rank(13));
    let mut req = request(&f, &student, "capped", o);
    req.genes = Some(f.genes(12, &f.hash()));
    run(&req).unwrap();
    let prov: serde_json::Value = serde_json::from_slice(&std::fs::read(req.out.join("masa.json")).unwrap()).unwrap();
    assert_eq!(prov["init"]["matrices"][0]["genes"][0]["components"], 12);
    // Unknown preset.
    let e = err(&request(&f, "cpu-7l-999", "x", InitOptions::new(Strategy::Scratch)));
    assert!(e.contains("unknown student preset `cpu-7l-999`") && e.contains("cpu-6l-256"), "{e}");
    // Hidden not divisible by heads.
    let bad = student_file(
        f.dir.path(),
        "bad.toml",
        "hidden_size = 30\nintermediate_size = 20\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\n",
    );
    let e = err(&request(&f, &bad, "x", InitOptions::new(Strategy::Scratch)));
    assert!(e.contains("bad.toml") && e.contains("not divisible"), "{e}");
    // Missing inputs and students the source cannot hold.
    assert!(err(&request(&f, &student, "x", InitOptions::new(Strategy::Masa))).contains("--genes"));
    assert!(err(&request(&f, &student, "x", InitOptions::new(Strategy::Prune))).contains("--stats"));
    let wide = student_file(
        f.dir.path(),
        "wide.toml",
        "hidden_size = 64\nintermediate_size = 20\nnum_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 1\n",
    );
    let e = err(&request(&f, &wide, "x", InitOptions::new(Strategy::WeightSelection)));
    assert!(e.contains("64") && e.contains("hidden channels"), "{e}");
    // Statistics of another source.
    let stats = f.stats(&vec![1.0; H], |_| vec![1.0; F]);
    let mut s = Stats::load(&stats).unwrap();
    s.meta.source_hash = "cd".repeat(32);
    s.save(&stats).unwrap();
    let mut req = request(&f, &student, "x", InitOptions::new(Strategy::Prune));
    req.stats = Some(stats);
    assert!(err(&req).contains("different source"));
    assert!(!f.path("x").exists());
}

#[test]
fn cli_init_then_score() {
    let f = Fixture::new();
    let genes = f.genes(12, &f.hash());
    let out = f.path("cli-masa");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
        .args(["init", "--student", &small_student(&f), "--strategy", "masa", "--rest", "weight-selection", "--coupled", "--seed", "9"])
        .arg("--source")
        .arg(f.source())
        .arg("--genes")
        .arg(&genes)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let prov: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("masa.json")).unwrap()).unwrap();
    assert_eq!(prov["options"]["rest"], "weight-selection");
    assert_eq!(prov["options"]["coupled"], true);
    assert_eq!(prov["options"]["gene_scale"], "frobenius");
    assert_eq!(prov["init"]["layer_map"], json!([0, 2]));
    assert_eq!(prov["genes"]["source_hash"], f.hash());
    let texts = f.path("texts.json");
    std::fs::write(&texts, serde_json::to_string(&tiny_texts()).unwrap()).unwrap();
    let sc = std::process::Command::new(env!("CARGO_BIN_EXE_masa")).arg("score").arg(&out).arg(&texts).output().unwrap();
    assert!(sc.status.success(), "{}", String::from_utf8_lossy(&sc.stderr));
    let scored: serde_json::Value = serde_json::from_slice(&sc.stdout).unwrap();
    for s in scored.as_array().unwrap() {
        assert!(s["mean_nll"].as_f64().unwrap().is_finite());
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
        .args(["init", "--student", "tiny", "--strategy", "distill", "--out"])
        .arg(f.path("y"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("weight-selection"));
}

/// With SmolLM2 as source and a student of exactly its shape, `weight-selection` and `prune`
/// select everything: `masa score` gives the source's own NLLs.
#[test]
fn smollm2_same_shape_selection_is_the_identity() {
    let Some(src) = common::model_asset(common::SMOLLM2.0, common::SMOLLM2.1) else { return };
    let dir = tempfile::tempdir().unwrap();
    let student = student_file(
        dir.path(),
        "smol.toml",
        "hidden_size = 576\nintermediate_size = 1536\nnum_hidden_layers = 30\nnum_attention_heads = 9\nnum_key_value_heads = 3\nrope_theta = 100000.0\nrms_norm_eps = 1e-5\n",
    );
    let texts: Vec<String> = vec!["The quick brown fox jumps over the lazy dog.".into(), "fn main() { println!(\"hi\"); }".into()];
    let score = |p: &Path| -> Vec<f32> {
        let m = SourceModel::open(p).unwrap();
        let t = Transformer::load(&m.weights).unwrap();
        score_texts(&t, &m.tokenizer, &texts, false, &mut || {}).unwrap().into_iter().flat_map(|s| s.nll).collect()
    };
    let want = score(&src);
    // Energies for prune: any statistics do (everything is kept); built in memory as diagonals.
    let source = SourceModel::open(&src).unwrap();
    let c = &source.weights.config;
    let mut e = masa::init::prune::Energies { hidden: (0..c.hidden_size).map(|i| (i % 17) as f64).collect(), ..Default::default() };
    for l in 0..c.num_hidden_layers {
        e.neurons.insert(format!("layers.{l}.ffn_mid"), ((0..c.intermediate_size).map(|i| (i % 13) as f64).collect(), 1.0));
    }
    let cfg = masa::student::StudentConfig::from_spec(&student).unwrap();
    for s in [Strategy::WeightSelection, Strategy::Prune] {
        let built = masa::init::build(&cfg, &source, None, Some(&e), &[], &InitOptions::new(s)).unwrap();
        assert_eq!(built.config.rope_theta, 100000.0);
        assert_eq!(built.config.rms_norm_eps, 1e-5);
        let out = dir.path().join(s.name());
        masa::student::save_checkpoint(&out, &built.config, &built.tensors, &source.tokenizer, &json!({ "strategy": s })).unwrap();
        drop(built);
        let got = score(&out);
        assert_eq!(got.len(), want.len());
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max < 1e-5, "{s}: max |ΔNLL| {max}");
        // And through the CLI's file path: masa.json-free checks of config.json.
        let cfg_json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg_json["num_key_value_heads"], 3);
        std::fs::remove_dir_all(&out).unwrap();
    }
    let _ = Rest::Scratch;
}

/// Issue 27: a Hugging Face hub id resolves through the HF cache, offline (`refs/main` → the
/// snapshot), as transformers resolves it; a revision that is not cached is a clear error
/// naming the cache and how to fill it.
#[test]
fn hub_ids_resolve_through_the_hf_cache() {
    let f = Fixture::new();
    let cache = f.path("hf-hub");
    let repo = cache.join("models--acme--tiny-llama");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(f.source()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let inspect = |id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_masa"))
            .args(["inspect", id])
            .env("HF_HUB_CACHE", &cache)
            .env("MASA_HOME", f.path("home"))
            .output()
            .unwrap()
    };
    let ok = inspect("acme/tiny-llama");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("llama"), "{}", String::from_utf8_lossy(&ok.stdout));
    assert!(inspect("acme/tiny-llama@0123abcd").status.success());
    let missing = inspect("acme/tiny-llama@v2");
    let e = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success()
            && e.contains("Hugging Face cache")
            && e.contains(&cache.display().to_string())
            && e.contains("huggingface-cli download acme/tiny-llama"),
        "{e}"
    );
}

/// `masa init --list-students` prints every preset with its shape.
#[test]
fn student_presets_can_be_listed() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_masa")).args(["init", "--list-students"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (name, layers, hidden, ..) in masa::student::config::PRESETS {
        assert!(
            text.lines().any(|l| l.starts_with(name)
                && l.split_whitespace().nth(1) == Some(&layers.to_string())
                && l.split_whitespace().nth(2) == Some(&hidden.to_string())),
            "{name}: {text}"
        );
    }
}
