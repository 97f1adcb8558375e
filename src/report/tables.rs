//! The report's tables, each built from results or cohorts (see [`super::aggregate`]).

use std::collections::BTreeSet;

use super::aggregate::{display_stderr, domains_of, final_point, Cohort, DataEfficiency, Summary};
use super::document::Table;
use super::format::{self, mean_std, num, NONE};
use crate::run::results::{CalibrationInfo, ExtractionInfo, RunResults, SourceInfo, TrainingRun};

/// Decimals of losses (differences between strategies are often a few hundredths).
pub const LOSS_DECIMALS: usize = 3;
/// Decimals of downstream scores (accuracy in %, Rouge-L).
pub const SCORE_DECIMALS: usize = 1;

/// Two-column facts about the run: version, start, wall time, threads, status, what ran.
pub fn run_overview(r: &RunResults) -> Table {
    let mut t = Table::new(["", ""]);
    t.left = 2;
    let seeds: BTreeSet<u64> = r.trainings.iter().map(|x| x.seed).collect();
    let students: BTreeSet<&str> = r.trainings.iter().map(|x| x.student.as_str()).collect();
    let finished = r.trainings.iter().filter(|x| x.done.iter().any(|d| d == "train")).count();
    let rows = [
        (
            "Status",
            if r.complete {
                "complete: every stage of the spec finished".to_string()
            } else {
                "partial: the run has not finished every stage".to_string()
            },
        ),
        ("masa version", r.masa_version.clone()),
        ("Started", format::utc_date(r.started_unix)),
        ("Wall time of this invocation", format::duration(r.wall_seconds)),
        ("Invocations", invocations_text(&r.invocations)),
        ("Threads", r.threads.to_string()),
        ("Device", device_text(&r.spec)),
        ("Students", join_or_none(students.iter().map(|s| s.to_string()))),
        ("Seeds", join_or_none(seeds.iter().map(|s| s.to_string()))),
        ("Training runs", format!("{} ({finished} finished pre-training)", r.trainings.len())),
    ];
    for (k, v) in rows {
        t.row([k.to_string(), v]);
    }
    t
}

/// The spec's `device` and `precision` (absent in results of specs before them: the CPU).
fn device_text(spec: &serde_json::Value) -> String {
    match spec.get("device").and_then(|d| d.as_str()).unwrap_or("cpu") {
        "cpu" => "cpu".into(),
        d => format!("{d}, {} matrix products", spec.get("precision").and_then(|p| p.as_str()).unwrap_or("f32")),
    }
}

fn join_or_none(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        NONE.into()
    } else {
        v.join(", ")
    }
}

/// The source model.
pub fn source_table(s: &SourceInfo) -> Table {
    let mut t = Table::new(["Source model", "Architecture", "Layers", "Hidden", "FFN", "Parameters", "Fingerprint"]);
    t.row([
        if s.name.is_empty() { s.path.clone() } else { s.name.clone() },
        s.arch.clone(),
        s.layers.to_string(),
        s.hidden.to_string(),
        s.ffn.to_string(),
        format::tokens(s.parameters as f64),
        s.fingerprint.chars().take(16).collect(),
    ]);
    t.left = 2;
    t
}

/// Calibration passes.
pub fn calibrations_table(cals: &[CalibrationInfo]) -> Table {
    let mut t = Table::new(["Calibration", "Domains", "Tokens", "Seconds"]);
    t.left = 2;
    for c in cals {
        t.row([c.label.clone(), c.domains.join(", "), format::tokens(c.tokens as f64), num(c.seconds, 1)]);
    }
    t
}

/// Gene extractions.
pub fn extractions_table(exts: &[ExtractionInfo]) -> Table {
    let mut t = Table::new([
        "Extraction",
        "Calibration",
        "Mode",
        "ρ",
        "Rank r",
        "λ",
        "Layers",
        "Matrices",
        "Median rel. L_out",
        "L_spec/r start → end",
        "Seconds",
    ]);
    t.left = 3;
    for e in exts {
        t.row([
            e.label.clone(),
            e.calibration.clone(),
            e.mode.clone(),
            e.ratio.map_or(NONE.into(), |r| format!("{r}")),
            e.rank.to_string(),
            format!("{}", e.lambda),
            e.layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
            e.matrices.to_string(),
            num(e.median_rel_l_out, 4),
            format!("{} → {}", num(e.mean_l_spec_per_r_start, 3), num(e.mean_l_spec_per_r, 3)),
            num(e.seconds, 1),
        ]);
    }
    t.notes.push("Median rel. L_out: median over matrices of L_out / (tr(W S Wᵀ)/d_out). L_spec/r: mean over matrices at the output-only optimum → after spectral alignment.".into());
    t
}

/// A strategy's label, marked when some of its runs have not finished pre-training.
fn row_label(c: &Cohort) -> String {
    if c.training_unfinished() {
        format!("{} †", c.label)
    } else {
        c.label.clone()
    }
}

/// The footnote explaining † (when any row carries it).
fn unfinished_note(t: &mut Table, cohorts: &[&Cohort]) {
    if cohorts.iter().any(|c| c.training_unfinished()) {
        t.notes.push("† Pre-training of some seeds has not finished: their numbers are from the last evaluation so far.".into());
    }
}

fn seeds_note(t: &mut Table) {
    t.notes.push(format!("Mean ± sample standard deviation over seeds; {NONE} where there is a single seed. Bold: best in the column."));
}

/// Data efficiency: tokens to reach Scratch's final loss and the ratio to Scratch.
pub fn efficiency_table(e: &DataEfficiency) -> Table {
    let mut t = Table::new(["Strategy", "Tokens to reach Scratch's final loss", "Data efficiency vs Scratch"]);
    for row in &e.rows {
        let tokens = row.tokens.map_or("not reached".to_string(), format::tokens);
        let ratio = match (row.tokens, row.ratio) {
            (None, _) => NONE.to_string(),
            (Some(_), None) => "at init".to_string(),
            (Some(_), Some(q)) => format!("{q:.2}×"),
        };
        t.row([row.label.clone(), tokens, ratio]);
    }
    t.bold_best(2, false, |i| e.rows[i].ratio);
    t.notes.push(format!(
        "Target: Scratch's final seed-mean validation loss {} (first reached by Scratch's seed-mean curve at {} tokens). Tokens are interpolated linearly between evaluations; ratio = Scratch's tokens / the strategy's tokens (> 1: less data than Scratch).",
        num(e.target, LOSS_DECIMALS),
        format::tokens(e.scratch_tokens)
    ));
    t
}

/// Final validation loss per domain (columns) and their mean, per strategy (rows).
pub fn domain_table(cohorts: &[&Cohort]) -> Table {
    let domains = domains_of(cohorts);
    let mut t = Table::new(std::iter::once("Strategy".to_string()).chain(domains.iter().cloned()).chain(["Mean".to_string()]));
    let mut keys: Vec<Vec<Option<Summary>>> = Vec::new();
    for c in cohorts {
        let mut row_keys: Vec<Option<Summary>> = domains.iter().map(|d| c.final_val_domain(d)).collect();
        row_keys.push(c.final_val_mean());
        t.row(std::iter::once(row_label(c)).chain(row_keys.iter().map(|s| mean_std(*s, LOSS_DECIMALS))));
        keys.push(row_keys);
    }
    for col in 0..=domains.len() {
        t.bold_best(col + 1, true, |i| keys[i][col].map(|s| s.mean));
    }
    t.notes.push("Validation loss in nats/token at the end of pre-training (lower is better); Mean: mean over domains.".into());
    seeds_note(&mut t);
    unfinished_note(&mut t, cohorts);
    t
}

/// A downstream cell: mean ± std over seeds, or for a single seed the score and its standard error.
fn score_cell(c: &Cohort, task: &str) -> String {
    let scores = c.task_scores(task);
    match c.task_score(task) {
        None => NONE.into(),
        Some(s) if s.n == 1 => {
            let se = scores.iter().find(|x| x.value.is_finite()).and_then(|x| display_stderr(x));
            match se {
                Some(se) => format!("{} (s.e. {})", num(s.mean, SCORE_DECIMALS), num(se, SCORE_DECIMALS)),
                None => num(s.mean, SCORE_DECIMALS),
            }
        }
        Some(s) => mean_std(Some(s), SCORE_DECIMALS),
    }
}

/// Distinct values as text: `1838` or `100, 200`.
fn distinct<T: Ord + ToString>(values: impl Iterator<Item = T>) -> String {
    values.collect::<BTreeSet<T>>().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

/// `42 min 18 s (computed 34 stages); 0.7 s (all cached)`: every `masa run` of this spec.
fn invocations_text(inv: &[crate::run::results::Invocation]) -> String {
    if inv.is_empty() {
        return NONE.into();
    }
    let one = |i: &crate::run::results::Invocation| {
        let what = if i.stages_computed == 0 { "all stages cached".to_string() } else { format!("computed {} stages", i.stages_computed) };
        format!("{}: {} ({what})", format::utc_date(i.started_unix), format::duration(i.wall_seconds))
    };
    inv.iter().map(one).collect::<Vec<_>>().join("; ")
}

/// Footnotes naming each task's metric, test items and fine-tuning examples.
fn task_notes(t: &mut Table, cohorts: &[&Cohort], tasks: &[String]) {
    for task in tasks {
        let scores: Vec<_> = cohorts.iter().flat_map(|c| c.task_scores(task)).collect();
        let metric = distinct(scores.iter().map(|s| s.metric.clone()));
        let n = distinct(scores.iter().map(|s| s.n));
        let ft = distinct(scores.iter().map(|s| s.finetune_examples));
        let ft = if ft == "0" { "zero-shot (no fine-tuning)".to_string() } else { format!("fine-tuned on {ft} examples") };
        t.notes.push(format!("{task}: {metric}, n = {n} test items, {ft}."));
    }
    t.notes.push("Accuracy in %, Rouge-L as is (0–100); higher is better.".into());
}

/// Generation tasks' answer likelihood: rows strategies, columns tasks; lower is better.
pub fn answer_nll_table(cohorts: &[&Cohort], tasks: &[String]) -> Table {
    let mut t = Table::new(std::iter::once("Strategy".to_string()).chain(tasks.iter().map(|task| format!("{task} answer NLL"))));
    for c in cohorts {
        t.row(std::iter::once(row_label(c)).chain(tasks.iter().map(|task| mean_std(c.answer_nll(task), LOSS_DECIMALS))));
    }
    for (k, task) in tasks.iter().enumerate() {
        t.bold_best(k + 1, true, |i| cohorts[i].answer_nll(task).map(|s| s.mean));
    }
    t.notes.push(
        "Mean negative log-likelihood per token (nats) of the first reference answer after the prompt, teacher-forced, on the same test items; \
         lower is better. Graded where greedy generations of small students are mostly empty or off-task and Rouge-L is near 0 for every strategy."
            .into(),
    );
    t
}

/// Downstream scores: rows strategies, columns tasks and their average (paper Tables 1 and 3).
pub fn downstream_table(cohorts: &[&Cohort], tasks: &[String]) -> Table {
    let mut t = Table::new(std::iter::once("Strategy".to_string()).chain(tasks.iter().cloned()).chain(["Avg.".to_string()]));
    for c in cohorts {
        let avg = c.task_average(tasks);
        let avg = if avg.is_some_and(|a| a.n == 1) {
            avg.map_or(NONE.into(), |a| num(a.mean, SCORE_DECIMALS))
        } else {
            mean_std(avg, SCORE_DECIMALS)
        };
        t.row(std::iter::once(row_label(c)).chain(tasks.iter().map(|task| score_cell(c, task))).chain([avg]));
    }
    for (k, task) in tasks.iter().enumerate() {
        t.bold_best(k + 1, false, |i| cohorts[i].task_score(task).map(|s| s.mean));
    }
    t.bold_best(tasks.len() + 1, false, |i| cohorts[i].task_average(tasks).map(|s| s.mean));
    task_notes(&mut t, cohorts, tasks);
    t.notes.push(
        "Mean ± sample standard deviation over seeds; with a single seed, the score and its standard error (s.e., binomial for accuracies). Avg.: mean over the tasks of each seed that has all of them. Bold: best in the column."
            .into(),
    );
    unfinished_note(&mut t, cohorts);
    t
}

/// Final loss relative to a reference cohort (MASA) and downstream scores, one row per
/// cohort (paper Table 4; also the calibration-domain ablation).
pub fn ablation_table(cohorts: &[&Cohort], reference: Option<&Cohort>, tasks: &[String]) -> Table {
    let header = ["Variant".to_string(), "Final val. loss".to_string(), "Δ vs MASA".to_string()];
    let mut t = Table::new(header.into_iter().chain(tasks.iter().cloned()).chain((!tasks.is_empty()).then(|| "Avg.".to_string())));
    let ref_loss = reference.and_then(|r| r.final_val_mean()).map(|s| s.mean);
    for c in cohorts {
        let loss = c.final_val_mean();
        let is_reference = reference.is_some_and(|x| x.same_condition(c));
        let delta = match (loss, ref_loss) {
            _ if is_reference => "(reference)".to_string(),
            (Some(l), Some(r)) => format!("{:+.3}", l.mean - r),
            _ => NONE.into(),
        };
        let mut row = vec![row_label(c), mean_std(loss, LOSS_DECIMALS), delta];
        row.extend(tasks.iter().map(|task| score_cell(c, task)));
        if !tasks.is_empty() {
            row.push(mean_std(c.task_average(tasks), SCORE_DECIMALS));
        }
        t.row(row);
    }
    t.bold_best(1, true, |i| cohorts[i].final_val_mean().map(|s| s.mean));
    for (k, task) in tasks.iter().enumerate() {
        t.bold_best(k + 3, false, |i| cohorts[i].task_score(task).map(|s| s.mean));
    }
    t.bold_best(tasks.len() + 3, false, |i| cohorts[i].task_average(tasks).map(|s| s.mean));
    t.notes.push(
        "Δ vs MASA: difference of seed-mean final validation loss (nats/token) to the MASA row; negative is better than MASA.".into(),
    );
    if !tasks.is_empty() {
        task_notes(&mut t, cohorts, tasks);
    }
    seeds_note(&mut t);
    unfinished_note(&mut t, cohorts);
    t
}

/// The extraction made at gene ratio `ratio`: by its `ratio`, else by a `ratio-<ρ>` label.
pub fn extraction_for_ratio(exts: &[ExtractionInfo], ratio: f64) -> Option<&ExtractionInfo> {
    exts.iter()
        .find(|e| e.ratio.is_some_and(|r| (r - ratio).abs() < 1e-9))
        .or_else(|| exts.iter().find(|e| e.label.contains(&format!("ratio-{ratio}"))))
}

/// The gene-ratio sweep (paper Table 5): one row per ratio, with its extraction's median
/// relative output loss.
pub fn ratio_table(cohorts: &[&Cohort], exts: &[ExtractionInfo], tasks: &[String]) -> Table {
    let header = ["ρ (M/W)", "Variant", "Rank r", "Median rel. L_out", "Final val. loss"].map(String::from);
    let mut t = Table::new(header.into_iter().chain((!tasks.is_empty()).then(|| "Downstream avg.".to_string())));
    t.left = 2;
    for c in cohorts {
        let ext = c.ratio.and_then(|r| extraction_for_ratio(exts, r));
        let mut row = vec![
            c.ratio.map_or(NONE.into(), |r| format!("{r}")),
            row_label(c),
            ext.map_or(NONE.into(), |e| e.rank.to_string()),
            ext.map_or(NONE.into(), |e| num(e.median_rel_l_out, 4)),
            mean_std(c.final_val_mean(), LOSS_DECIMALS),
        ];
        if !tasks.is_empty() {
            row.push(mean_std(c.task_average(tasks), SCORE_DECIMALS));
        }
        t.row(row);
    }
    t.bold_best(4, true, |i| cohorts[i].final_val_mean().map(|s| s.mean));
    if !tasks.is_empty() {
        t.bold_best(5, false, |i| cohorts[i].task_average(tasks).map(|s| s.mean));
    }
    t.notes.push("Median rel. L_out of the extraction at that ratio (lower: the genes reproduce the FFN outputs better).".into());
    seeds_note(&mut t);
    unfinished_note(&mut t, cohorts);
    t
}

/// Every training run, one row each (raw, per seed).
pub fn runs_table(runs: &[TrainingRun]) -> Table {
    let mut t = Table::new([
        "Student",
        "Strategy",
        "Group",
        "Stages done",
        "Seed",
        "Budget",
        "Trained",
        "Final val. loss",
        "Train time",
        "Tokens/s",
    ]);
    t.left = 4;
    for r in runs {
        let last = final_point(r);
        t.row([
            r.student.clone(),
            r.label.clone(),
            r.group.clone(),
            r.done.join(", "),
            r.seed.to_string(),
            format::tokens(r.budget_tokens as f64),
            last.map_or(NONE.into(), |p| format::tokens(p.tokens as f64)),
            last.map_or(NONE.into(), |p| num(p.val_mean, LOSS_DECIMALS)),
            format::duration(r.train_seconds),
            num(r.train_tokens_per_s, 0),
        ]);
    }
    t
}

/// Where each run's checkpoint (and beside it its metrics.jsonl) is.
pub fn checkpoints_table(runs: &[&TrainingRun]) -> Table {
    let mut t = Table::new(["Student", "Strategy", "Seed", "Checkpoint"]);
    t.left = 4;
    for r in runs {
        t.row([r.student.clone(), r.label.clone(), r.seed.to_string(), r.checkpoint.clone()]);
    }
    t
}
