//! The pre-training stage on the torchrun engine (`pretrain.engine = "torchrun"`, issue 15):
//! export exactly the tokens `masa train` would read with the same options (`masa tokens`),
//! launch `python/masa_torch/pretrain.py` under `torchrun` (optionally wrapped by a launcher such
//! as `srun`), and hand its `metrics.jsonl` and last HF checkpoint to the rest of the run like
//! a masa-trained one. The trainer script is compiled into masa and written next to its outputs,
//! so the stage's cache key covers the exact script that ran.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::engine::{Device, Precision};
use crate::error::IoContext;
use crate::run::spec::TorchrunSpec;
use crate::train::TrainOptions;
use crate::{MasaError, Result};

/// `python/masa_torch/pretrain.py`, as this masa was built with.
pub const TRAINER: &str = include_str!("../../python/masa_torch/pretrain.py");

/// What of the torchrun launch changes a run's result, for its cache key: the process layout and
/// the trainer script (the launch words do not).
pub fn cache_identity(t: &TorchrunSpec) -> serde_json::Value {
    use sha2::{Digest, Sha256};
    let script = crate::fetch::hex(&Sha256::digest(TRAINER.as_bytes()));
    serde_json::json!({"name": "torchrun", "nnodes": t.nnodes, "nproc_per_node": t.nproc_per_node, "fsdp": t.fsdp, "trainer_sha256": script})
}

/// The launch command: `LAUNCHER... TORCHRUN --nnodes N --nproc_per_node P [ARGS...] SCRIPT
/// STUDENT --data DATA --out OUT` and masa's recipe (`opts`: learning rate, its floor, warm-up,
/// weight decay, clipping, evaluation and checkpoint cadence, device and precision); batch,
/// sequence length, accumulation, steps and seed travel in DATA's manifest.
pub fn command(t: &TorchrunSpec, script: &Path, student: &Path, data: &Path, out: &Path, opts: &TrainOptions, resume: bool) -> Vec<String> {
    let mut c: Vec<String> = t.launcher.clone();
    c.push(t.command.clone());
    c.extend([format!("--nnodes={}", t.nnodes), format!("--nproc_per_node={}", t.nproc_per_node)]);
    c.extend(t.torchrun_args.iter().cloned());
    let path = |p: &Path| p.display().to_string();
    c.extend([path(script), path(student), "--data".into(), path(data), "--out".into(), path(out)]);
    let (device, dtype) = match (opts.device, opts.precision) {
        (Device::Cpu, _) => ("cpu", "f32"),
        (Device::Cuda(_), Precision::Bf16) => ("cuda", "bf16"),
        (Device::Cuda(_), Precision::F32) => ("cuda", "f32"),
    };
    for (k, v) in [
        ("--lr", opts.lr.to_string()),
        ("--min-lr-ratio", opts.min_lr_ratio.to_string()),
        ("--warmup", opts.warmup.to_string()),
        ("--weight-decay", opts.weight_decay.to_string()),
        ("--clip", opts.clip.to_string()),
        ("--eval-every", opts.eval_every.to_string()),
        ("--ckpt-every", opts.ckpt_every.to_string()),
        ("--device", device.into()),
        ("--dtype", dtype.into()),
        ("--threads", t.threads.to_string()),
    ] {
        c.extend([k.to_string(), v]);
    }
    if t.fsdp {
        c.push("--fsdp".into());
    }
    if resume {
        c.extend(["--resume".into(), path(out)]);
    }
    c
}

/// Pre-train `student` into `dir` (which holds `data/`, `pretrain.py`, `metrics.jsonl`,
/// `step-*/` and `latest`); resumes from `dir/latest` when an earlier launch was interrupted.
/// Returns the final checkpoint.
pub fn pretrain(t: &TorchrunSpec, student: &Path, opts: &TrainOptions, dir: &Path) -> Result<PathBuf> {
    if opts.distill.is_some() {
        return Err(MasaError::Invalid("the torchrun trainer does not distil; train distillation runs with engine \"masa\"".into()));
    }
    std::fs::create_dir_all(dir).at(dir)?;
    let data = dir.join("data");
    if !data.join("manifest.json").is_file() {
        crate::train::export_tokens(student, &TrainOptions { out: data.clone(), progress: false, ..opts.clone() })?;
    }
    let script = dir.join("pretrain.py");
    crate::home::write_atomic(&script, TRAINER.as_bytes())?;
    let argv = command(t, &script, student, &data, dir, opts, dir.join("latest").is_file());
    let shown = argv.iter().map(|w| crate::run::spec::shell_word(w)).collect::<Vec<_>>().join(" ");
    eprintln!("torchrun engine: {shown}");
    // The trainer's output goes to stderr, so masa's stdout stays machine-readable.
    let status = Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::from(std::io::stderr())).status().map_err(|e| {
        MasaError::Invalid(format!(
            "could not start `{}` ({e}): install PyTorch with scripts/setup_torch.sh and set `pretrain.torchrun.command` \
                 to its torchrun (e.g. \".venv-bench/bin/torchrun\")",
            argv[0]
        ))
    })?;
    if !status.success() {
        return Err(MasaError::Invalid(format!(
            "the torchrun trainer failed ({status}); its messages are above. The command was: {shown}"
        )));
    }
    let latest = dir.join("latest");
    let name = std::fs::read_to_string(&latest).at(&latest)?;
    let ck = dir.join(name.trim());
    if !ck.join("config.json").is_file() {
        return Err(MasaError::bad_file(&latest, format!("names `{}`, which holds no HF checkpoint (config.json)", name.trim())));
    }
    Ok(ck)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_carries_masa_recipe_and_launcher() {
        let t = TorchrunSpec {
            launcher: vec!["srun".into(), "--nodes=2".into()],
            nnodes: 2,
            nproc_per_node: 4,
            fsdp: true,
            ..Default::default()
        };
        let opts = TrainOptions { lr: 2e-3, warmup: 7, eval_every: 5, ckpt_every: 25, ..Default::default() };
        let c = command(&t, Path::new("s.py"), Path::new("st"), Path::new("d"), Path::new("o"), &opts, true).join(" ");
        assert_eq!(
            c,
            "srun --nodes=2 torchrun --nnodes=2 --nproc_per_node=4 s.py st --data d --out o --lr 0.002 --min-lr-ratio 0.1 --warmup 7 \
             --weight-decay 0.1 --clip 1 --eval-every 5 --ckpt-every 25 --device cpu --dtype f32 --threads 0 --fsdp --resume o"
        );
    }
}
