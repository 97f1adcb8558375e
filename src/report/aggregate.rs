//! Aggregation over seeds: which training runs belong together (a [`Cohort`]: same group,
//! student, strategy and budget, different seeds), their final numbers as mean ± std, their
//! validation curves as a seed-mean with a min–max band, and data efficiency against Scratch.
//!
//! Non-finite numbers (a NaN loss from a diverged run) are left out of every aggregate, never
//! propagated; an aggregate of nothing is `None`.

use std::collections::BTreeSet;

use crate::run::results::{CurvePoint, TaskScore, TrainingRun};

/// Mean, spread and count of the finite values of one quantity over seeds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Finite values aggregated.
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator); `None` for a single value.
    pub std: Option<f64>,
    pub min: f64,
    pub max: f64,
}

/// Mean, sample std, min and max of the finite `values`; `None` when there are none.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    let std = (n > 1).then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Summary { n, mean, std, min, max })
}

/// The training runs of one condition over seeds: same group, student, strategy and budget.
#[derive(Clone, Debug)]
pub struct Cohort<'a> {
    pub group: String,
    pub student: String,
    pub strategy: String,
    /// Human label (the runs' `label`, or the strategy when that is empty).
    pub label: String,
    pub budget_tokens: u64,
    pub ratio: Option<f64>,
    /// The runs, by seed.
    pub runs: Vec<&'a TrainingRun>,
}

/// A (student, budget) pair: one table/plot of the main comparison each.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Setting {
    pub student: String,
    pub budget_tokens: u64,
}

/// Baselines first, MASA last, as in the paper's tables (the order of
/// [`crate::run::strategies::STRATEGIES`]); strategies not listed keep their order of
/// appearance after these.
fn strategy_rank(strategy: &str) -> usize {
    crate::run::strategies::report_rank(strategy)
}

/// Groups runs into cohorts, ordered by group appearance, then setting, then the paper's
/// strategy order (ratio-sweep cohorts by ratio).
pub fn cohorts(runs: &[TrainingRun]) -> Vec<Cohort<'_>> {
    let mut out: Vec<Cohort> = Vec::new();
    for run in runs {
        let same = |c: &Cohort| {
            c.group == run.group && c.student == run.student && c.strategy == run.strategy && c.budget_tokens == run.budget_tokens
        };
        match out.iter_mut().find(|c| same(c)) {
            Some(c) => c.runs.push(run),
            None => out.push(Cohort {
                group: run.group.clone(),
                student: run.student.clone(),
                strategy: run.strategy.clone(),
                label: if run.label.is_empty() { run.strategy.clone() } else { run.label.clone() },
                budget_tokens: run.budget_tokens,
                ratio: run.ratio,
                runs: vec![run],
            }),
        }
    }
    for c in &mut out {
        c.runs.sort_by_key(|r| r.seed);
    }
    let groups: Vec<String> = out.iter().map(|c| c.group.clone()).fold(Vec::new(), |mut g, x| {
        if !g.contains(&x) {
            g.push(x);
        }
        g
    });
    let group_rank = |g: &str| groups.iter().position(|x| x == g).unwrap_or(0);
    out.sort_by(|a, b| {
        (group_rank(&a.group), &a.student, a.budget_tokens, strategy_rank(&a.strategy))
            .cmp(&(group_rank(&b.group), &b.student, b.budget_tokens, strategy_rank(&b.strategy)))
            .then(a.ratio.unwrap_or(0.0).total_cmp(&b.ratio.unwrap_or(0.0)))
    });
    out
}

impl Cohort<'_> {
    pub fn setting(&self) -> Setting {
        Setting { student: self.student.clone(), budget_tokens: self.budget_tokens }
    }

    /// True when `other` is the same condition (group, student, strategy, budget).
    pub fn same_condition(&self, other: &Cohort) -> bool {
        self.group == other.group
            && self.student == other.student
            && self.strategy == other.strategy
            && self.budget_tokens == other.budget_tokens
    }

    /// True when some run has not finished pre-training (its numbers are from its last evaluation).
    pub fn training_unfinished(&self) -> bool {
        self.runs.iter().any(|r| !r.done.iter().any(|d| d == "train"))
    }

    /// Final mean validation loss over seeds.
    pub fn final_val_mean(&self) -> Option<Summary> {
        summarize(&self.runs.iter().filter_map(|r| final_point(r)).map(|p| p.val_mean).collect::<Vec<_>>())
    }

    /// Final validation loss on one domain over seeds.
    pub fn final_val_domain(&self, domain: &str) -> Option<Summary> {
        summarize(&self.runs.iter().filter_map(|r| final_point(r)?.val.get(domain).copied()).collect::<Vec<_>>())
    }

    /// Score on one task over seeds, on the table's scale (accuracy in %, Rouge-L as is).
    pub fn task_score(&self, task: &str) -> Option<Summary> {
        summarize(&self.runs.iter().filter_map(|r| r.downstream.get(task)).map(display_value).collect::<Vec<_>>())
    }

    /// Teacher-forced NLL per reference token of a generation task's answers, over seeds.
    pub fn answer_nll(&self, task: &str) -> Option<Summary> {
        summarize(&self.runs.iter().filter_map(|r| r.downstream.get(task)?.all.get("answer_nll").copied()).collect::<Vec<_>>())
    }

    /// The scores of one task, one per run that has it.
    pub fn task_scores(&self, task: &str) -> Vec<&TaskScore> {
        self.runs.iter().filter_map(|r| r.downstream.get(task)).collect()
    }

    /// Average over `tasks` of each run's scores (table scale), over the seeds that have all of them.
    pub fn task_average(&self, tasks: &[String]) -> Option<Summary> {
        if tasks.is_empty() {
            return None;
        }
        let per_run: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|r| {
                let v: Option<Vec<f64>> = tasks.iter().map(|t| r.downstream.get(t).map(display_value)).collect();
                v.map(|v| v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect();
        summarize(&per_run)
    }

    /// Seed-mean validation curve with its min–max band.
    pub fn band(&self) -> Band {
        seed_band(&self.runs.iter().map(|r| curve_points(&r.curve)).collect::<Vec<_>>())
    }
}

/// The last evaluation of a run with a finite mean loss.
pub fn final_point(run: &TrainingRun) -> Option<&CurvePoint> {
    run.curve.iter().rev().find(|p| p.val_mean.is_finite())
}

/// True for metrics that are fractions in [0, 1] shown as percentages (`acc`, `acc_norm`).
pub fn is_fraction_metric(metric: &str) -> bool {
    metric.starts_with("acc")
}

/// A task score on the table's scale: accuracy metrics in %, others (Rouge-L, 0–100) as is.
pub fn display_value(s: &TaskScore) -> f64 {
    if is_fraction_metric(&s.metric) {
        100.0 * s.value
    } else {
        s.value
    }
}

/// Standard error of one score on the table's scale: the evaluator's, else the binomial
/// sqrt(p(1 − p)/n) for accuracies; `None` when neither is known.
pub fn display_stderr(s: &TaskScore) -> Option<f64> {
    let scale = if is_fraction_metric(&s.metric) { 100.0 } else { 1.0 };
    let binomial = || {
        (is_fraction_metric(&s.metric) && s.n > 0 && (0.0..=1.0).contains(&s.value))
            .then(|| (s.value * (1.0 - s.value) / s.n as f64).sqrt())
    };
    s.stderr.filter(|e| e.is_finite()).or_else(binomial).map(|e| e * scale)
}

/// Tasks any run of `cohorts` has scores for, sorted by name.
pub fn tasks_of(cohorts: &[&Cohort]) -> Vec<String> {
    let set: BTreeSet<&String> = cohorts.iter().flat_map(|c| c.runs.iter()).flat_map(|r| r.downstream.keys()).collect();
    set.into_iter().cloned().collect()
}

/// Validation domains in any run's final evaluation, sorted by name.
pub fn domains_of(cohorts: &[&Cohort]) -> Vec<String> {
    let set: BTreeSet<&String> =
        cohorts.iter().flat_map(|c| c.runs.iter()).filter_map(|r| final_point(r)).flat_map(|p| p.val.keys()).collect();
    set.into_iter().cloned().collect()
}

/// A curve as (tokens, mean loss) with non-finite losses dropped, sorted by tokens, one point
/// per token count (the later one wins).
pub fn curve_points(curve: &[CurvePoint]) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = curve.iter().filter(|p| p.val_mean.is_finite()).map(|p| (p.tokens as f64, p.val_mean)).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(pts.len());
    for p in pts {
        match out.last_mut() {
            Some(last) if last.0 == p.0 => *last = p,
            _ => out.push(p),
        }
    }
    out
}

/// A curve's value at `x` by linear interpolation between its neighbouring points; `None`
/// outside the curve's token range. `curve` is sorted by x.
pub fn value_at(curve: &[(f64, f64)], x: f64) -> Option<f64> {
    let (first, last) = (curve.first()?, curve.last()?);
    if x < first.0 || x > last.0 {
        return None;
    }
    let i = curve.partition_point(|p| p.0 < x);
    let b = curve[i];
    if b.0 == x || i == 0 {
        return Some(b.1);
    }
    let a = curve[i - 1];
    Some(a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0))
}

/// A seed-mean curve and its min–max band, on common token positions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Band {
    pub tokens: Vec<f64>,
    pub mean: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

impl Band {
    /// (tokens, mean) pairs.
    pub fn mean_curve(&self) -> Vec<(f64, f64)> {
        self.tokens.iter().copied().zip(self.mean.iter().copied()).collect()
    }
}

/// Mean, min and max over curves at every token position any curve has inside the range all
/// of them cover (each curve linearly interpolated there), so seeds evaluated at slightly
/// different tokens, or one seed further along than another, still average point by point.
pub fn seed_band(curves: &[Vec<(f64, f64)>]) -> Band {
    let curves: Vec<&Vec<(f64, f64)>> = curves.iter().filter(|c| !c.is_empty()).collect();
    if curves.is_empty() {
        return Band::default();
    }
    let start = curves.iter().map(|c| c[0].0).fold(f64::NEG_INFINITY, f64::max);
    let end = curves.iter().map(|c| c[c.len() - 1].0).fold(f64::INFINITY, f64::min);
    let mut xs: Vec<f64> = curves.iter().flat_map(|c| c.iter().map(|p| p.0)).filter(|&x| x >= start && x <= end).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut band = Band::default();
    for x in xs {
        let vals: Vec<f64> = curves.iter().filter_map(|c| value_at(c, x)).collect();
        if let Some(s) = summarize(&vals) {
            band.tokens.push(x);
            band.mean.push(s.mean);
            band.min.push(s.min);
            band.max.push(s.max);
        }
    }
    band
}

/// Tokens at which a curve first reaches `target` or below: the first point at or under it if
/// that is the curve's first point, else linearly interpolated between the last point above
/// and the first point at or below. `None` if the curve never gets there (or is empty).
pub fn tokens_to_reach(curve: &[(f64, f64)], target: f64) -> Option<f64> {
    if !target.is_finite() {
        return None;
    }
    let i = curve.iter().position(|p| p.1 <= target)?;
    if i == 0 {
        return Some(curve[0].0);
    }
    let (a, b) = (curve[i - 1], curve[i]);
    Some(a.0 + (b.0 - a.0) * (a.1 - target) / (a.1 - b.1))
}

/// One strategy's data efficiency relative to Scratch.
#[derive(Clone, Debug, PartialEq)]
pub struct Efficiency {
    pub label: String,
    pub strategy: String,
    /// Tokens its seed-mean curve needs to reach Scratch's final seed-mean loss (`None`: never).
    pub tokens: Option<f64>,
    /// Scratch's tokens to that loss divided by `tokens` (`None`: not reached, or reached at 0).
    pub ratio: Option<f64>,
}

/// Data efficiency of one setting's main cohorts against its Scratch cohort.
#[derive(Clone, Debug, PartialEq)]
pub struct DataEfficiency {
    /// Scratch's final seed-mean validation loss: the target every curve is asked to reach.
    pub target: f64,
    /// Tokens Scratch's own seed-mean curve needs to first reach it.
    pub scratch_tokens: f64,
    pub rows: Vec<Efficiency>,
}

/// Tokens each cohort's seed-mean curve needs to reach Scratch's final seed-mean validation
/// loss, and the ratio to Scratch's tokens; `None` without a Scratch cohort with a curve.
pub fn data_efficiency(cohorts: &[&Cohort]) -> Option<DataEfficiency> {
    let scratch = cohorts.iter().find(|c| c.strategy == "scratch")?.band().mean_curve();
    let target = scratch.last()?.1;
    let scratch_tokens = tokens_to_reach(&scratch, target)?;
    let rows = cohorts
        .iter()
        .map(|c| {
            let tokens = tokens_to_reach(&c.band().mean_curve(), target);
            let ratio = tokens.filter(|&t| t > 0.0).map(|t| scratch_tokens / t);
            Efficiency { label: c.label.clone(), strategy: c.strategy.clone(), tokens, ratio }
        })
        .collect();
    Some(DataEfficiency { target, scratch_tokens, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_interpolates_between_the_points_around_the_crossing() {
        let c = [(0.0, 10.0), (100.0, 8.0), (200.0, 6.0), (300.0, 5.0)];
        // 7.0 lies halfway between 8 (100 tokens) and 6 (200 tokens).
        assert_eq!(tokens_to_reach(&c, 7.0), Some(150.0));
        // 5.5: between 6 (200) and 5 (300), halfway.
        assert_eq!(tokens_to_reach(&c, 5.5), Some(250.0));
        // A point exactly on the target counts as reached there.
        assert_eq!(tokens_to_reach(&c, 6.0), Some(200.0));
        assert_eq!(tokens_to_reach(&c, 11.0), Some(0.0));
        assert_eq!(tokens_to_reach(&c, 4.9), None);
        assert_eq!(tokens_to_reach(&c, f64::NAN), None);
        assert_eq!(tokens_to_reach(&[], 1.0), None);
    }

    #[test]
    fn reach_takes_the_first_crossing_of_a_non_monotone_curve() {
        let c = [(0.0, 10.0), (10.0, 6.0), (20.0, 7.0), (30.0, 5.0)];
        assert_eq!(tokens_to_reach(&c, 6.5), Some(0.0 + 10.0 * (10.0 - 6.5) / 4.0));
    }

    #[test]
    fn summary_ignores_non_finite_values_and_has_no_std_for_one_value() {
        let s = summarize(&[1.0, f64::NAN, 3.0]).unwrap();
        assert_eq!((s.n, s.mean, s.min, s.max), (2, 2.0, 1.0, 3.0));
        assert!((s.std.unwrap() - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(summarize(&[5.0]).unwrap().std, None);
        assert_eq!(summarize(&[f64::NAN]), None);
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn band_averages_interpolated_curves_over_their_common_range() {
        let a = vec![(0.0, 10.0), (100.0, 6.0), (200.0, 4.0)];
        let b = vec![(0.0, 12.0), (50.0, 9.0), (100.0, 8.0)];
        let band = seed_band(&[a, b]);
        assert_eq!(band.tokens, vec![0.0, 50.0, 100.0]);
        assert_eq!(band.mean, vec![11.0, 8.5, 7.0]);
        assert_eq!(band.min, vec![10.0, 8.0, 6.0]);
        assert_eq!(band.max, vec![12.0, 9.0, 8.0]);
        assert_eq!(seed_band(&[vec![], vec![]]), Band::default());
    }

    #[test]
    fn value_at_is_none_outside_the_curve() {
        let c = [(10.0, 1.0), (20.0, 3.0)];
        assert_eq!(value_at(&c, 15.0), Some(2.0));
        assert_eq!(value_at(&c, 10.0), Some(1.0));
        assert_eq!(value_at(&c, 5.0), None);
        assert_eq!(value_at(&c, 25.0), None);
    }
}
