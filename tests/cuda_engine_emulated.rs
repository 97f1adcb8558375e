//! The CUDA engine's host code without a GPU: `masa bench cuda-check`, the device check of
//! docs/gpu.md, run by the `cuda-emu` build, whose "device" is host memory, the kernels of
//! `src/cuda/kernels.cu` on the CPU emulator `src/cuda/emu.h` and the cuBLAS products computed
//! on the CPU (`src/cuda/emu.rs`). Every check of the real device runs: training steps in f32
//! and bf16 with flash attention against the CPU engine in f64 (logits, losses, every gradient,
//! distillation, determinism), the frozen model's teacher top-k, calibration, batched
//! multiple-choice scoring, and generation through the KV cache. So buffer sizes, offsets,
//! strides and the order of launches are checked here; speed, cuBLAS's column-major calls and
//! the driver are not (docs/gpu.md).
//!
//! Run by `scripts/test.sh` as `cargo test --release --features cuda-emu --test cuda_engine_emulated`.
#![cfg(feature = "cuda-emu")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A small Llama with every path the engine has: GQA (2 heads, 1 kv head), head_dim 64 so the
/// bf16 engine takes the flash kernels, a tied head.
const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
 "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 384, "max_position_embeddings": 256,
 "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true, "hidden_act": "silu", "torch_dtype": "float32"}"#;

#[test]
fn cuda_check_passes_on_the_emulated_device() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, CONFIG).unwrap();
    // Three optimizer steps per curve: the curve rows compare all of them, but the loss cannot
    // fall by the check's 0.5 nats that fast (50 steps do; minutes under the emulator).
    let mut child = Command::new(env!("CARGO_BIN_EXE_masa"))
        .args(["bench", "cuda-check"])
        .arg(&config)
        .args(["--batch", "2", "--seq", "64", "--steps", "3", "--seed", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(1500) {
            child.kill().unwrap();
            panic!("cuda-check on the emulator still ran after 1500 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}{table}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| check")).collect();
    assert!(rows.len() >= 26, "expected the whole check table, got {} rows", rows.len());
    let short = "loss curve: CPU f32 fell by";
    for r in &rows {
        assert!(r.ends_with("| pass |") || (r.contains(short) && r.ends_with("| FAIL |")), "failed on the emulated device: {r}");
    }
    for needed in ["bf16 flash: worst gradient", "teacher top-32", "calibration:", "generation:", "scoring:", "curve max |GPU f32"] {
        assert!(rows.iter().any(|r| r.contains(needed)), "no `{needed}` row");
    }
}
