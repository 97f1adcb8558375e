//! "What the numbers show": plain statements computed from the aggregates, saying as plainly
//! when MASA loses or ties as when it wins.

use super::aggregate::{data_efficiency, tasks_of, Cohort, Summary};
use super::format::{self, num};
use super::tables::{LOSS_DECIMALS, SCORE_DECIMALS};

/// `6.412 ± 0.028` or `6.412` (one seed).
fn loss_text(s: &Summary) -> String {
    match s.std {
        Some(d) => format!("{} ± {}", num(s.mean, LOSS_DECIMALS), num(d, LOSS_DECIMALS)),
        None => num(s.mean, LOSS_DECIMALS),
    }
}

fn seeds_text(a: &Summary, b: &Summary) -> String {
    if a.n == b.n {
        format!("{} seed{}", a.n, if a.n == 1 { "" } else { "s" })
    } else {
        format!("{} vs {} seeds", a.n, b.n)
    }
}

/// The larger of two seed standard deviations; `None` when neither has one (single seeds).
pub fn seed_spread(a: &Summary, b: &Summary) -> Option<f64> {
    match (a.std, b.std) {
        (None, None) => None,
        (x, y) => Some(x.unwrap_or(0.0).max(y.unwrap_or(0.0))),
    }
}

/// One sentence comparing final validation losses `a` (e.g. MASA) and `b` (a baseline),
/// and whether the difference exceeds the seed spread.
pub fn compare_losses(a_label: &str, a: &Summary, b_label: &str, b: &Summary) -> String {
    let d = a.mean - b.mean;
    let direction = if d < 0.0 {
        "lower (better)"
    } else if d > 0.0 {
        "higher (worse)"
    } else {
        "equal"
    };
    let verdict = match seed_spread(a, b) {
        None => "with one seed each there is no seed spread to judge it against".to_string(),
        Some(s) if d.abs() > s => format!("larger than the seed spread (largest std {})", num(s, LOSS_DECIMALS)),
        Some(s) => format!("smaller than the seed spread (largest std {}), so not a clear difference", num(s, LOSS_DECIMALS)),
    };
    format!(
        "{a_label} final validation loss {} vs {b_label} {} ({}): {a_label} is {direction} by {}, {verdict}.",
        loss_text(a),
        loss_text(b),
        seeds_text(a, b),
        num(d.abs(), LOSS_DECIMALS)
    )
}

/// Statements about one setting's main comparison (`cohorts`: that setting's main cohorts).
pub fn main_statements(cohorts: &[&Cohort]) -> Vec<String> {
    let mut out = Vec::new();
    let mut ranked: Vec<(&Cohort, Summary)> = cohorts.iter().filter_map(|c| Some((*c, c.final_val_mean()?))).collect();
    if ranked.is_empty() {
        out.push("No validation results yet.".into());
        return out;
    }
    ranked.sort_by(|a, b| a.1.mean.total_cmp(&b.1.mean));
    let list: Vec<String> = ranked.iter().map(|(c, s)| format!("{} {}", c.label, loss_text(s))).collect();
    out.push(format!("Final validation loss, lowest first (nats/token, mean ± std over seeds): {}.", list.join("; ")));
    let best = ranked[0].0;
    let masa = ranked.iter().find(|(c, _)| c.strategy == "masa");
    match masa {
        None => out.push(format!("Lowest final validation loss: {}. There are no MASA runs to compare.", best.label)),
        Some((m, _)) if m.same_condition(best) => {
            out.push(format!("MASA has the lowest final validation loss of the {} strategies.", ranked.len()))
        }
        Some((_, ms)) => out.push(format!(
            "MASA does not have the lowest final validation loss: {} is lower by {}.",
            best.label,
            num(ms.mean - ranked[0].1.mean, LOSS_DECIMALS)
        )),
    }
    if let Some((m, ms)) = masa {
        for (c, s) in ranked.iter().filter(|(c, _)| !c.same_condition(m)) {
            out.push(compare_losses(&m.label, ms, &c.label, s));
        }
    }
    out.extend(efficiency_statement(cohorts));
    out.extend(downstream_statements(cohorts));
    out
}

/// MASA's data efficiency against Scratch, in words.
fn efficiency_statement(cohorts: &[&Cohort]) -> Option<String> {
    let e = data_efficiency(cohorts)?;
    let masa = e.rows.iter().find(|r| r.strategy == "masa")?;
    let target =
        format!("Scratch's final validation loss ({} at {} tokens)", num(e.target, LOSS_DECIMALS), format::tokens(e.scratch_tokens));
    let others: Vec<String> = e
        .rows
        .iter()
        .filter(|r| r.strategy != "masa" && r.strategy != "scratch")
        .map(|r| format!("{} {}", r.label, r.ratio.map_or("not reached".into(), |q| format!("{q:.2}×"))))
        .collect();
    let others = if others.is_empty() { String::new() } else { format!(" Other strategies: {}.", others.join(", ")) };
    let main = match (masa.tokens, masa.ratio) {
        (None, _) => format!("MASA does not reach {target} within its pre-training budget, so it shows no data-efficiency gain here."),
        (Some(_), None) => format!("MASA is at or below {target} already at initialisation."),
        (Some(t), Some(q)) if q >= 1.05 => format!("MASA reaches {target} after {} tokens: {q:.2}× less pre-training data than Scratch (the paper reports 2–5×).", format::tokens(t)),
        (Some(t), Some(q)) => format!("MASA reaches {target} only after {} tokens: {q:.2}× Scratch's data efficiency, i.e. no saving of 5% or more (the paper reports 2–5× less data).", format::tokens(t)),
    };
    Some(main + &others)
}

/// MASA against each baseline on the downstream tasks: tasks won and average score.
fn downstream_statements(cohorts: &[&Cohort]) -> Vec<String> {
    let tasks = tasks_of(cohorts);
    let Some(masa) = cohorts.iter().find(|c| c.strategy == "masa") else { return Vec::new() };
    if tasks.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    out.extend(tasks.iter().filter_map(|t| resolution_statement(masa, t)));
    out.extend(tasks.iter().filter_map(|t| answer_nll_statement(cohorts, masa, t)));
    for c in cohorts.iter().filter(|c| !c.same_condition(masa)) {
        let pairs: Vec<(f64, f64)> = tasks.iter().filter_map(|t| Some((masa.task_score(t)?.mean, c.task_score(t)?.mean))).collect();
        if pairs.is_empty() {
            continue;
        }
        let wins = pairs.iter().filter(|(m, b)| m > b).count();
        let avg = |f: fn(&(f64, f64)) -> f64| pairs.iter().map(f).sum::<f64>() / pairs.len() as f64;
        let (ma, ba) = (avg(|p| p.0), avg(|p| p.1));
        let verdict = if ma > ba {
            "higher"
        } else if ma < ba {
            "lower"
        } else {
            "the same"
        };
        out.push(format!(
            "Downstream: MASA scores higher than {} on {wins} of {} tasks; its average over them is {} vs {} ({verdict}).",
            c.label,
            pairs.len(),
            num(ma, SCORE_DECIMALS),
            num(ba, SCORE_DECIMALS)
        ));
    }
    out
}

/// How large a difference one task can resolve: the binomial standard error of one accuracy
/// at MASA's score and item count, and a note when a generation metric is 0 for every run.
fn resolution_statement(masa: &Cohort, task: &str) -> Option<String> {
    let s = masa.task_scores(task).into_iter().next()?;
    if s.metric == "rougeL" {
        let all_zero = masa.task_scores(task).iter().all(|x| x.value == 0.0);
        return all_zero.then(|| format!("{task}: Rouge-L is 0 for MASA's runs (their greedy answers are empty or share no word with the references); the answer NLL below still ranks the strategies."));
    }
    let se = (s.value * (1.0 - s.value) / s.n.max(1) as f64).sqrt() * 100.0;
    Some(format!(
        "{task}: with n = {} test items one accuracy has a standard error of about {} points, so differences between strategies smaller than ~{} points are not evidence.",
        s.n,
        num(se, 1),
        num(2.0 * se, 0)
    ))
}

/// Generation tasks: MASA's teacher-forced answer NLL against the best and the worst strategy.
fn answer_nll_statement(cohorts: &[&Cohort], masa: &Cohort, task: &str) -> Option<String> {
    let m = masa.answer_nll(task)?;
    let mut ranked: Vec<(&Cohort, Summary)> = cohorts.iter().filter_map(|c| Some((*c, c.answer_nll(task)?))).collect();
    ranked.sort_by(|a, b| a.1.mean.total_cmp(&b.1.mean));
    let rank = ranked.iter().position(|(c, _)| c.same_condition(masa))? + 1;
    let list: Vec<String> = ranked.iter().map(|(c, s)| format!("{} {}", c.label, loss_text(s))).collect();
    Some(format!(
        "{task} answer NLL (nats/token, lower is better), lowest first: {}. MASA ranks {rank} of {} ({}).",
        list.join("; "),
        ranked.len(),
        loss_text(&m)
    ))
}

/// Statements comparing each variant (ablation, calibration domains) with MASA.
pub fn variant_statements(what: &str, variants: &[&Cohort], masa: Option<&Cohort>) -> Vec<String> {
    let Some(m) = masa else {
        return vec![format!("{what}: no MASA run of the same student and budget to compare with.")];
    };
    let Some(ms) = m.final_val_mean() else { return Vec::new() };
    variants
        .iter()
        .filter(|c| !c.same_condition(m))
        .filter_map(|c| Some(format!("{what}: {}", compare_losses(&c.label, &c.final_val_mean()?, &m.label, &ms))))
        .collect()
}

/// The ratio with the lowest final validation loss in the sweep.
pub fn ratio_statement(cohorts: &[&Cohort]) -> Option<String> {
    let best = cohorts.iter().filter_map(|c| Some((c.ratio?, c.final_val_mean()?))).min_by(|a, b| a.1.mean.total_cmp(&b.1.mean))?;
    Some(format!(
        "Gene ratio sweep: the lowest final validation loss, {}, is at ρ = {} (of {} ratios).",
        loss_text(&best.1),
        best.0,
        cohorts.len()
    ))
}
