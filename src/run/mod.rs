//! `masa run SPEC`: the whole pipeline from one experiment spec, every artifact cached by the
//! hash of its inputs and options, results in `runs/<name>/results.json`, then the report.
//!
//! Stages, each a library call (no shelling out): fetch → calibrate (all domains, and one per
//! single-domain ablation) → extract (one gene set per ratio/λ/calibration the strategies
//! need, only the source layers the students' layer maps read; then the spectra of W and M)
//! → per student × budget × strategy × seed: init → pre-train (→ distill) → per task:
//! fine-tune → evaluate → report.
//!
//! - [`spec`]: the TOML spec and its validation;
//! - [`strategies`]: the one table of strategies (name, label, group, init options);
//! - [`plan`]: what a spec expands to and what it costs (`masa run --plan`);
//! - [`exec`]: each stage as a library call, cached in the store;
//! - [`store`]: artifacts in `<runs>/artifacts/<stage>-<key>/`, `key` = hash of the stage's
//!   record version, inputs' keys and complete options, so a rerun, or another spec sharing
//!   stages, reuses them. A stage is finished when its `record.json` exists (written last,
//!   atomically); an interrupted training resumes from its latest checkpoint;
//! - [`results`]: `results.json`, what the report renders.

mod exec;
pub mod plan;
pub mod results;
pub mod spec;
mod store;
pub mod strategies;
pub mod torchrun;

use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::{MasaError, Result};
use exec::Ctx;
pub use plan::{estimate, render_plan, Estimate, Plan};
use results::RunResults;
pub use results::{notes, read_curve};
use spec::Spec;
pub use store::lock_runs;

/// Where runs and the shared artifact store live.
pub fn default_runs_root() -> PathBuf {
    std::env::var_os("MASA_RUNS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("runs"))
}

/// Run (or continue) a spec; returns the results and the run directory. `report` renders the
/// results into the run directory after every job (then marked partial) and at the end; the CLI
/// passes [`crate::report::write_report`] (a parameter, so `run` does not depend on `report`,
/// which reads `run`'s results).
pub fn run(spec: &Spec, root: &Path, report: &dyn Fn(&RunResults, &Path) -> Result<()>) -> Result<(RunResults, PathBuf)> {
    // Held until this function returns: one `masa run` per store at a time.
    let _lock = store::lock_runs(root)?;
    let out = root.join(&spec.name);
    std::fs::create_dir_all(&out).at(&out)?;
    let mut ctx = Ctx::open(spec, root, &out)?;
    let plan = Plan::of(spec, &ctx.source)?;
    if !plan.infeasible.is_empty() && !spec.skip_infeasible {
        return Err(MasaError::Invalid(format!(
            "spec `{}`: fields `students` × `strategies`: {} combination(s) cannot run: {}. Remove those strategies or students \
             (`masa run {} --plan` lists them all)",
            spec.name,
            plan.infeasible.len(),
            plan.infeasible.iter().take(3).cloned().collect::<Vec<_>>().join("; "),
            spec.name
        )));
    }
    ctx.results.notes.extend(plan.warnings.iter().cloned());
    ctx.results.notes.extend(plan.infeasible.iter().map(|x| format!("left out (skip_infeasible = true): {x}")));
    let overall = crate::progress::overall_bar(plan.cost(spec, &ctx.source), &format!("masa run {}", spec.name));
    ctx.overall = overall.clone();

    for cal in &plan.calibrations {
        ctx.calibration(cal)?;
    }
    for ex in &plan.extractions {
        ctx.extraction(ex, &plan)?;
    }
    ctx.spectra(&plan)?;
    let teachers = plan.teacher_jobs();
    let vocab = ctx.source.weights.config.vocab_size;
    for (i, job) in plan.jobs.iter().enumerate() {
        ctx.job(job)?;
        ctx.advance(plan::job_seconds(spec, job, vocab, teachers.contains(&i)), "");
        ctx.save()?;
        // A partial report after every job (it says it is partial); rendering takes ~0.1 s.
        report(&ctx.results, &out)?;
    }
    overall.finish_and_clear();
    ctx.results.complete = true;
    ctx.save()?;
    report(&ctx.results, &out)?;
    Ok((ctx.results, out))
}
