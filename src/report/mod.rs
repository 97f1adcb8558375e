//! `masa report`: renders a run's `results.json` ([`RunResults`]) as `report.md`, a
//! self-contained `report.html` and the figures under `plots/` (PNG and SVG).
//!
//! The sections mirror the paper's evidence: validation curves over pre-training tokens, data
//! efficiency against Scratch, per-domain final losses, downstream scores (Tables 1/3),
//! ablations (Table 4), the gene-ratio sweep (Table 5), calibration domains (Fig. 4), spectra,
//! then plain statements of what the numbers show and how to reproduce them. Numbers are
//! aggregated over seeds here ([`aggregate`]); a section appears only when the results have
//! data for it.

pub mod aggregate;
pub mod document;
pub mod findings;
pub mod format;
pub mod paired;
pub mod plots;
pub mod tables;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aggregate::{cohorts, data_efficiency, tasks_of, Cohort, Setting};
use document::{Block, Table};
use plots::{Bar, BarsPlot, CurveSeries, CurvesPlot, Figure, Plot, SpectraPlot, SpectrumPanel};

use crate::run::results::{RunResults, TrainingRun};
use crate::run::strategies::{self, Group};
use crate::{MasaError, Result};

/// The files a report consists of.
#[derive(Clone, Debug)]
pub struct ReportFiles {
    pub markdown: PathBuf,
    pub html: PathBuf,
    /// `plots/<name>.png` and `plots/<name>.svg` of every figure.
    pub plots: Vec<PathBuf>,
}

/// The report in memory: its blocks and rendered figures.
#[derive(Clone, Debug)]
pub struct Report {
    pub title: String,
    pub blocks: Vec<Block>,
    pub figures: Vec<Figure>,
}

impl Report {
    pub fn markdown(&self) -> String {
        document::markdown(&self.blocks)
    }

    pub fn html(&self) -> String {
        let svgs: BTreeMap<String, String> = self.figures.iter().map(|f| (f.name.clone(), f.svg.clone())).collect();
        document::html(&self.title, &self.blocks, &svgs)
    }
}

/// Render report.md, report.html (self-contained) and plots (PNG + SVG) into `dir` from results.
pub fn write_report(results: &RunResults, dir: &Path) -> Result<ReportFiles> {
    let report = build(results)?;
    let plots_dir = dir.join("plots");
    let mut plots = Vec::new();
    for f in &report.figures {
        let (png, svg) = (plots_dir.join(format!("{}.png", f.name)), plots_dir.join(format!("{}.svg", f.name)));
        crate::home::write_atomic(&png, &f.png)?;
        crate::home::write_atomic(&svg, f.svg.as_bytes())?;
        plots.extend([png, svg]);
    }
    let markdown = dir.join("report.md");
    crate::home::write_atomic(&markdown, report.markdown().as_bytes())?;
    let html = dir.join("report.html");
    crate::home::write_atomic(&html, report.html().as_bytes())?;
    Ok(ReportFiles { markdown, html, plots })
}

/// `results.json` itself, or the one inside a run directory.
pub fn results_path(input: &Path) -> PathBuf {
    if input.is_dir() {
        input.join("results.json")
    } else {
        input.to_path_buf()
    }
}

/// `masa report`: loads `input` (a results.json or a run directory) and writes the report to
/// `out`, by default the directory holding results.json (`runs/<name>/`, where `masa run` writes it).
pub fn report_from_path(input: &Path, out: Option<&Path>) -> Result<ReportFiles> {
    let path = results_path(input);
    let results = RunResults::load(&path)?;
    let dir = match out {
        Some(d) => d.to_path_buf(),
        None => path.parent().unwrap_or(Path::new(".")).to_path_buf(),
    };
    write_report(&results, &dir)
}

/// Builds the whole report (blocks and figures) from results.
pub fn build(r: &RunResults) -> Result<Report> {
    let all = cohorts(&r.trainings);
    let mut doc = Doc::default();
    header(&mut doc, r);
    let main = group(&all, Group::Main);
    curves_section(&mut doc, &main)?;
    efficiency_section(&mut doc, &main)?;
    domains_section(&mut doc, &main);
    downstream_section(&mut doc, &main);
    statistics_section(&mut doc, &all);
    decision_section(&mut doc, &all, r);
    ablation_section(&mut doc, &all)?;
    ratio_section(&mut doc, &all, r)?;
    scaling_section(&mut doc, &all)?;
    calibration_section(&mut doc, &all)?;
    engine_section(&mut doc, &all)?;
    spectra_section(&mut doc, r)?;
    findings_section(&mut doc, &all, r);
    reproduce_section(&mut doc, r);
    doc.h(2, "All training runs");
    doc.p("Every training run as recorded, one row per seed (final = last evaluation with a finite loss).");
    doc.table(tables::runs_table(&r.trainings));
    Ok(Report { title: format!("MASA report: {}", r.name), blocks: doc.blocks, figures: doc.figures })
}

/// The report being built.
#[derive(Default)]
struct Doc {
    blocks: Vec<Block>,
    figures: Vec<Figure>,
}

impl Doc {
    fn h(&mut self, level: u8, text: impl Into<String>) {
        self.blocks.push(Block::Heading(level, text.into()));
    }

    fn p(&mut self, text: impl Into<String>) {
        self.blocks.push(Block::Paragraph(text.into()));
    }

    fn table(&mut self, t: Table) {
        self.blocks.push(Block::Table(t));
    }

    /// Renders `plot` and places it here with `caption`.
    fn figure(&mut self, name: &str, caption: impl Into<String>, plot: &impl Plot, size: (u32, u32)) -> Result<()> {
        let (svg, png) = plots::render(plot, size).map_err(|e| MasaError::Invalid(format!("drawing figure `{name}`: {e}")))?;
        self.blocks.push(Block::Figure { name: name.into(), caption: caption.into() });
        self.figures.push(Figure { name: name.into(), svg, png });
        Ok(())
    }
}

/// The cohorts of one group.
fn group<'c, 'r>(all: &'c [Cohort<'r>], g: Group) -> Vec<&'c Cohort<'r>> {
    all.iter().filter(|c| c.group == g.name()).collect()
}

/// The distinct (student, budget) settings of `cohorts`, in order.
fn settings(cohorts: &[&Cohort]) -> Vec<Setting> {
    let mut out: Vec<Setting> = Vec::new();
    for c in cohorts {
        if !out.contains(&c.setting()) {
            out.push(c.setting());
        }
    }
    out
}

fn in_setting<'c, 'r>(cohorts: &[&'c Cohort<'r>], s: &Setting) -> Vec<&'c Cohort<'r>> {
    cohorts.iter().copied().filter(|c| c.setting() == *s).collect()
}

fn setting_title(s: &Setting) -> String {
    format!("{}, {} pre-training tokens", s.student, format::tokens(s.budget_tokens as f64))
}

fn setting_slug(s: &Setting) -> String {
    format!("{}-{}", format::slug(&s.student), format::slug(&format::tokens(s.budget_tokens as f64)))
}

/// The main-group MASA and Scratch cohorts of a setting (references for the ablation tables).
fn references<'c, 'r>(all: &'c [Cohort<'r>], s: &Setting) -> Vec<&'c Cohort<'r>> {
    let main = group(all, Group::Main);
    ["masa", "scratch"].iter().filter_map(|k| in_setting(&main, s).into_iter().find(|c| c.strategy == *k)).collect()
}

fn header(doc: &mut Doc, r: &RunResults) {
    doc.h(1, format!("MASA report: {}", r.name));
    if !r.description.is_empty() {
        doc.p(r.description.clone());
    }
    if !r.complete {
        doc.blocks.push(Block::Callout(
            "Partial report: this run has not finished every stage of its spec. The numbers below are from the stages finished so far and may change."
                .into(),
        ));
    }
    doc.table(tables::run_overview(r));
    doc.h(2, "Source model, calibration and extraction");
    doc.table(tables::source_table(&r.source));
    if r.calibrations.is_empty() {
        doc.p("No calibration recorded.");
    } else {
        doc.table(tables::calibrations_table(&r.calibrations));
    }
    if r.extractions.is_empty() {
        doc.p("No gene extraction recorded.");
    } else {
        doc.table(tables::extractions_table(&r.extractions));
    }
}

/// One curves figure of `cohorts`, MASA and Scratch in their fixed colours.
fn curves_figure(doc: &mut Doc, name: &str, title: &str, caption: &str, cohorts: &[&Cohort]) -> Result<()> {
    let series: Vec<CurveSeries> = cohorts
        .iter()
        .enumerate()
        .map(|(i, c)| CurveSeries { label: c.label.clone(), color: plots::strategy_color(&c.strategy, i), band: c.band() })
        .filter(|s| !s.band.tokens.is_empty())
        .collect();
    if series.is_empty() {
        doc.p("No validation curve points yet.");
        return Ok(());
    }
    doc.figure(name, caption, &CurvesPlot { title: title.into(), series }, plots::SIZE)
}

const BAND_CAPTION: &str = "Line: mean over seeds; shaded: min–max over seeds. The y-axis is zoomed to the trained range (the untrained initial loss lies above it).";

fn curves_section(doc: &mut Doc, main: &[&Cohort]) -> Result<()> {
    doc.h(2, "Validation loss during pre-training");
    if main.is_empty() {
        doc.p("No main-comparison training runs in these results yet.");
        return Ok(());
    }
    for s in settings(main) {
        doc.h(3, setting_title(&s));
        let cs = in_setting(main, &s);
        let caption = format!("Mean validation loss over domains vs pre-training tokens, {}. {BAND_CAPTION}", setting_title(&s));
        curves_figure(doc, &format!("curves-{}", setting_slug(&s)), &format!("Validation loss, {}", setting_title(&s)), &caption, &cs)?;
    }
    Ok(())
}

fn efficiency_section(doc: &mut Doc, main: &[&Cohort]) -> Result<()> {
    if main.is_empty() {
        return Ok(());
    }
    doc.h(2, "Data efficiency");
    doc.p("Pre-training tokens each strategy's seed-mean validation curve needs to first reach Scratch's final seed-mean validation loss, and how many times fewer tokens that is than Scratch needs (the paper reports 2–5× for MASA).");
    for s in settings(main) {
        doc.h(3, setting_title(&s));
        let cs = in_setting(main, &s);
        let Some(e) = data_efficiency(&cs) else {
            doc.p("No Scratch curve in this setting: nothing to measure data efficiency against.");
            continue;
        };
        let bars = e
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| Bar {
                label: row.label.clone(),
                value: row.ratio,
                color: plots::strategy_color(&row.strategy, i),
                annotation: match (row.tokens, row.ratio) {
                    (None, _) => "not reached".into(),
                    (Some(_), None) => "at init".into(),
                    (Some(_), Some(q)) => format!("{q:.2}×"),
                },
            })
            .collect();
        doc.table(tables::efficiency_table(&e));
        let plot = BarsPlot {
            title: format!("Data efficiency vs Scratch, {}", setting_title(&s)),
            y_desc: "Scratch tokens / strategy tokens (×)".into(),
            bars,
            reference: Some((1.0, "Scratch (1×)".into())),
        };
        let caption = format!("Data efficiency relative to Scratch, {}: Scratch's tokens to its final loss divided by the strategy's tokens to the same loss (higher is better).", setting_title(&s));
        doc.figure(&format!("data-efficiency-{}", setting_slug(&s)), caption, &plot, plots::SIZE)?;
    }
    Ok(())
}

/// Each run's final mean validation loss by seed.
fn final_losses(c: &Cohort) -> Vec<(u64, f64)> {
    c.runs.iter().filter_map(|r| Some((r.seed, aggregate::final_point(r)?.val_mean))).collect()
}

/// One table row of a paired comparison: pairs, per-seed differences, mean, interval, p.
fn paired_row(t: &mut Table, what: String, p: &paired::Paired) {
    let d = |x: f64| format::num(x, tables::LOSS_DECIMALS + 1);
    t.row([
        what,
        p.diffs.len().to_string(),
        p.diffs.iter().map(|&x| d(x)).collect::<Vec<_>>().join(", "),
        d(p.mean),
        p.interval.map_or("—".into(), |(lo, hi)| format!("[{}, {}]", d(lo), d(hi))),
        p.p_value.map_or("—".into(), |v| format::num(v, 4)),
    ]);
}

fn paired_table() -> Table {
    Table::new(["Comparison (A − B)", "Paired seeds", "Per-seed difference", "Mean", "95% interval", "p (sign-flip)"])
}

const PAIRED_CAPTION: &str = "Final mean validation loss (nats/token), A − B per seed: negative means A ends lower (better). Seeds pair runs with the same rest of the student and the same data order. Interval: Student t over the per-seed differences; p: two-sided paired sign-flip test (exact over all 2ⁿ sign patterns for n ≤ 20).";

/// Paired statistics against Scratch for every arm of every setting that has Scratch.
fn statistics_section(doc: &mut Doc, all: &[Cohort]) {
    let main = group(all, Group::Main);
    let refs: Vec<&Cohort> = main.iter().copied().filter(|c| c.strategy == "scratch").collect();
    if refs.is_empty() {
        return;
    }
    doc.h(2, "Statistics: paired differences against Scratch");
    doc.p(PAIRED_CAPTION);
    for scratch in refs {
        let s = scratch.setting();
        doc.h(3, setting_title(&s));
        let base = final_losses(scratch);
        let mut t = paired_table();
        // Every arm of the setting but the copies on a second training engine.
        for c in all.iter().filter(|c| c.setting() == s && !std::ptr::eq(*c, scratch) && c.group != Group::Engine.name()) {
            if let Some(p) = paired::paired(&final_losses(c), &base, 0.95) {
                paired_row(&mut t, format!("{} − Scratch", c.label), &p);
            }
        }
        if t.rows.is_empty() {
            doc.p("No arm shares a seed with Scratch in this setting.");
        } else {
            doc.table(t);
        }
    }
}

/// The spec's pre-registered rule (`[decision]`) applied, with its sentences.
fn decision_section(doc: &mut Doc, all: &[Cohort], r: &RunResults) {
    let Some(d) = r.spec.get("decision").and_then(|v| serde_json::from_value::<crate::run::spec::DecisionSpec>(v.clone()).ok()) else {
        return;
    };
    doc.h(2, "Decision (the rule written in the spec before the run)");
    doc.p(format!(
        "Rule: for each comparison A − B, the per-seed differences of final mean validation loss over the paired seeds; A is better when the whole {}% interval lies below 0, worse when it lies above 0, and no difference is shown otherwise. The genes carry usable knowledge only if MASA beats `masa-rotated` (the same genes' spectra with random singular vectors) by that rule.",
        format::num(d.confidence * 100.0, 0)
    ));
    let main = group(all, Group::Main);
    for s in settings(&main) {
        let cs = in_setting(&main, &s);
        doc.h(3, setting_title(&s));
        let mut t = paired_table();
        let mut outcomes = Vec::new();
        for (a, b) in d.pairs() {
            let (Some(ca), Some(cb)) = (cs.iter().find(|c| c.strategy == a), cs.iter().find(|c| c.strategy == b)) else { continue };
            if let Some(p) = paired::paired(&final_losses(ca), &final_losses(cb), d.confidence) {
                paired_row(&mut t, format!("{} − {}", ca.label, cb.label), &p);
                outcomes.push((a.clone(), b.clone(), ca.label.clone(), cb.label.clone(), p));
            }
        }
        if outcomes.is_empty() {
            doc.p("No comparison of the rule has paired seeds yet.");
            continue;
        }
        doc.table(t);
        doc.blocks.push(Block::List(decision_sentences(&outcomes, d.confidence)));
    }
}

/// The rule's sentences, mechanically: one per comparison, then the knowledge verdict when
/// `masa - masa-rotated` was compared.
pub fn decision_sentences(outcomes: &[(String, String, String, String, paired::Paired)], confidence: f64) -> Vec<String> {
    let pct = format::num(confidence * 100.0, 0);
    let d = |x: f64| format::num(x, tables::LOSS_DECIMALS + 1);
    let mut out = Vec::new();
    for (a, b, la, lb, p) in outcomes {
        let stats = match (p.interval, p.p_value) {
            (Some((lo, hi)), Some(pv)) => format!(
                "mean difference {} ({pct}% interval [{}, {}], sign-flip p = {}, {} paired seeds)",
                d(p.mean),
                d(lo),
                d(hi),
                format::num(pv, 4),
                p.diffs.len()
            ),
            _ => format!("mean difference {} from {} paired seed(s), too few for an interval", d(p.mean), p.diffs.len()),
        };
        let outcome = match p.interval {
            Some((_, hi)) if hi < 0.0 => format!("{la} ends with a lower validation loss than {lb}"),
            Some((lo, _)) if lo > 0.0 => format!("{la} ends with a higher validation loss than {lb}"),
            _ => format!("no difference between {la} and {lb} is shown"),
        };
        out.push(format!("{outcome}: {stats}."));
        if a == "masa" && b == "masa-rotated" {
            out.push(match p.interval {
                Some((_, hi)) if hi < 0.0 => "Verdict: the genes carry usable knowledge — MASA beats the same genes' spectra with random singular vectors.".to_string(),
                _ => "Verdict: this experiment does not show that the genes carry usable knowledge — MASA does not beat the same genes' spectra with random singular vectors; whatever MASA gains over Scratch is not shown to come from what the genes learned from the source.".to_string(),
            });
        }
    }
    out
}

fn domains_section(doc: &mut Doc, main: &[&Cohort]) {
    if main.is_empty() {
        return;
    }
    doc.h(2, "Final validation loss per domain");
    for s in settings(main) {
        doc.h(3, setting_title(&s));
        doc.table(tables::domain_table(&in_setting(main, &s)));
    }
}

fn downstream_section(doc: &mut Doc, main: &[&Cohort]) {
    if tasks_of(main).is_empty() {
        return;
    }
    doc.h(2, "Downstream tasks (paper Tables 1 and 3)");
    doc.p("Fine-tuned scores on held-out test items after pre-training.");
    for s in settings(main) {
        let cs = in_setting(main, &s);
        let tasks = tasks_of(&cs);
        if tasks.is_empty() {
            continue;
        }
        doc.h(3, setting_title(&s));
        doc.table(tables::downstream_table(&cs, &tasks));
        let generation: Vec<String> = tasks.iter().filter(|t| cs.iter().any(|c| c.answer_nll(t).is_some())).cloned().collect();
        if !generation.is_empty() {
            doc.table(tables::answer_nll_table(&cs, &generation));
        }
    }
}

/// A variant section (ablation or calibration domains): per setting, a table of the variants
/// with the main MASA and Scratch rows for reference, and their curves.
/// With `per_domain`, also the per-domain final losses of the variants and MASA.
fn variant_tables(doc: &mut Doc, all: &[Cohort], variants: &[&Cohort], kind: &str, per_domain: bool) -> Result<()> {
    for s in settings(variants) {
        doc.h(3, setting_title(&s));
        let mut rows = references(all, &s);
        rows.extend(in_setting(variants, &s));
        let masa = rows.iter().copied().find(|c| c.strategy == "masa" && c.group == Group::Main.name());
        let tasks = tasks_of(&rows);
        doc.table(tables::ablation_table(&rows, masa, &tasks));
        if per_domain {
            let domain_rows: Vec<&Cohort> = rows.iter().copied().filter(|c| c.strategy != "scratch").collect();
            doc.p("Final validation loss per domain:");
            doc.table(tables::domain_table(&domain_rows));
        }
        let caption = format!(
            "{kind}: mean validation loss vs pre-training tokens, {}, with MASA and Scratch of the main comparison. {BAND_CAPTION}",
            setting_title(&s)
        );
        let name = format!("curves-{}-{}", format::slug(kind), setting_slug(&s));
        curves_figure(doc, &name, &format!("{kind}, {}", setting_title(&s)), &caption, &rows)?;
    }
    Ok(())
}

fn ablation_section(doc: &mut Doc, all: &[Cohort]) -> Result<()> {
    let ablation = group(all, Group::Ablation);
    if ablation.is_empty() {
        return Ok(());
    }
    doc.h(2, "Ablations (paper Table 4)");
    doc.p("MASA with one component changed or removed, against MASA and Scratch of the main comparison at the same student and budget.");
    variant_tables(doc, all, &ablation, "Ablations", false)
}

fn ratio_section(doc: &mut Doc, all: &[Cohort], r: &RunResults) -> Result<()> {
    let ratio = group(all, Group::Ratio);
    if ratio.is_empty() {
        return Ok(());
    }
    doc.h(2, "Gene ratio sweep (paper Table 5)");
    doc.p("MASA with gene matrices of different sizes: ρ is the gene's parameter count relative to the source matrix W.");
    for s in settings(&ratio) {
        doc.h(3, setting_title(&s));
        let cs = in_setting(&ratio, &s);
        doc.table(tables::ratio_table(&cs, &r.extractions, &tasks_of(&cs)));
        let caption = format!("Gene ratio sweep: mean validation loss vs pre-training tokens, {}. {BAND_CAPTION}", setting_title(&s));
        curves_figure(
            doc,
            &format!("curves-ratio-{}", setting_slug(&s)),
            &format!("Gene ratio sweep, {}", setting_title(&s)),
            &caption,
            &cs,
        )?;
    }
    Ok(())
}

fn scaling_section(doc: &mut Doc, all: &[Cohort]) -> Result<()> {
    let sc = group(all, Group::Scaling);
    if sc.is_empty() {
        return Ok(());
    }
    doc.h(2, "Adaptive scaling settings (Sec. 3.2)");
    doc.p("MASA with other numbers r′ of singular components kept by adaptive scaling (r′ = r makes every row score 1, so each \
         student matrix is a submatrix of its gene; energy:F keeps, per gene, the fewest components holding the fraction F of \
         Σσ²), and with one selection of FFN neurons shared by gate, up and down (coupled), against MASA and Scratch of the main \
         comparison.");
    variant_tables(doc, all, &sc, "Adaptive scaling", false)
}

/// Runs repeated on another training engine, each next to the same strategy on the main
/// comparison's engine.
fn engine_section(doc: &mut Doc, all: &[Cohort]) -> Result<()> {
    let other = group(all, Group::Engine);
    if other.is_empty() {
        return Ok(());
    }
    doc.h(2, "Training engines");
    doc.p("The same initialisations, data order and schedule pre-trained by another engine (`strategy@engine`; docs/torch.md), \
         next to the main comparison's runs of the same strategies. Differences beyond the seed spread mean the engines do not \
         train alike.");
    let main = group(all, Group::Main);
    for s in settings(&other) {
        doc.h(3, setting_title(&s));
        let copies = in_setting(&other, &s);
        let mut rows: Vec<&Cohort> = in_setting(&main, &s)
            .into_iter()
            .filter(|c| copies.iter().any(|o| strategies::base_strategy(&o.strategy) == c.strategy))
            .collect();
        rows.extend(copies);
        let masa = rows.iter().copied().find(|c| c.strategy == "masa");
        doc.table(tables::ablation_table(&rows, masa, &tasks_of(&rows)));
        let caption = format!("Training engines: mean validation loss vs pre-training tokens, {}. {BAND_CAPTION}", setting_title(&s));
        curves_figure(
            doc,
            &format!("curves-engines-{}", setting_slug(&s)),
            &format!("Training engines, {}", setting_title(&s)),
            &caption,
            &rows,
        )?;
    }
    Ok(())
}

fn calibration_section(doc: &mut Doc, all: &[Cohort]) -> Result<()> {
    let cal = group(all, Group::Calibration);
    if cal.is_empty() {
        return Ok(());
    }
    doc.h(2, "Calibration domains (paper Fig. 4)");
    doc.p("MASA with genes extracted from a calibration corpus of fewer domains, against MASA calibrated on all domains.");
    variant_tables(doc, all, &cal, "Calibration domains", true)
}

/// At most this many spectrum panels (3 × 3: the default first, middle and last layer × gate,
/// up, down).
const MAX_PANELS: usize = 9;

fn spectra_section(doc: &mut Doc, r: &RunResults) -> Result<()> {
    if r.spectra.is_empty() {
        return Ok(());
    }
    doc.h(2, "Singular value spectra");
    let several = r.spectra.iter().any(|s| s.extraction != r.spectra[0].extraction);
    let panels = r
        .spectra
        .iter()
        .take(MAX_PANELS)
        .map(|s| SpectrumPanel {
            title: if several {
                format!("{} · layer {} {}", s.extraction, s.layer, s.proj)
            } else {
                format!("layer {} {}", s.layer, s.proj)
            },
            source: s.source.clone(),
            gene: s.gene.clone(),
        })
        .collect();
    let shown = r.spectra.len().min(MAX_PANELS);
    let mut caption =
        "Singular values (log-log, descending) of the source FFN matrix W (its top r) and of the extracted gene M.".to_string();
    if !several {
        caption.push_str(&format!(" Extraction {}.", r.spectra[0].extraction));
    }
    if shown < r.spectra.len() {
        caption.push_str(&format!(" First {shown} of {} recorded spectra.", r.spectra.len()));
    }
    doc.figure("spectra", caption, &SpectraPlot { title: "Singular values: source W vs gene M".into(), panels }, plots::grid_size(shown))
}

fn findings_section(doc: &mut Doc, all: &[Cohort], r: &RunResults) {
    doc.h(2, "What the numbers show");
    if !r.complete {
        doc.blocks.push(Block::Callout("The run is partial: these statements describe the stages finished so far.".into()));
    }
    let main = group(all, Group::Main);
    let main_settings = settings(&main);
    let mut items = Vec::new();
    for s in &main_settings {
        let prefix = if main_settings.len() > 1 { format!("[{}] ", setting_title(s)) } else { String::new() };
        items.extend(findings::main_statements(&in_setting(&main, s)).into_iter().map(|x| format!("{prefix}{x}")));
    }
    for (g, what) in [(Group::Ablation, "Ablation"), (Group::Scaling, "Adaptive scaling"), (Group::Calibration, "Calibration domains")] {
        let variants = group(all, g);
        for s in settings(&variants) {
            let masa = references(all, &s).into_iter().find(|c| c.strategy == "masa");
            items.extend(findings::variant_statements(what, &in_setting(&variants, &s), masa));
        }
    }
    let ratio = group(all, Group::Ratio);
    for s in settings(&ratio) {
        items.extend(findings::ratio_statement(&in_setting(&ratio, &s)));
    }
    if items.is_empty() {
        doc.p("No training results yet: nothing to compare.");
    } else {
        doc.blocks.push(Block::List(items));
    }
    if !r.notes.is_empty() {
        doc.h(3, "Notes from the run");
        doc.blocks.push(Block::List(r.notes.clone()));
    }
}

fn reproduce_section(doc: &mut Doc, r: &RunResults) {
    doc.h(2, "Reproduce");
    doc.p("Run the whole pipeline (every stage is cached by the hash of its inputs, so a rerun only does what is missing), then render this report:");
    // Results written before the command was recorded: a built-in spec runs by its name; a
    // spec file is not known any more, but its content is results.json's "spec" field.
    let builtin = crate::run::spec::BUILTIN.iter().any(|(n, _)| *n == r.name);
    let command = match r.command.as_str() {
        "" if builtin => format!("masa run {}", r.name),
        "" => "masa run SPEC.toml".to_string(),
        c => c.to_string(),
    };
    doc.blocks.push(Block::Code(format!("{command}\nmasa report runs/{}", r.name)));
    if r.command.is_empty() && !builtin {
        doc.p(format!(
            "SPEC.toml: the spec file this run was started from (name = \"{}\"); its content is the \"spec\" field of results.json.",
            r.name
        ));
    }
    doc.p(format!(
        "All numbers: runs/{}/results.json (raw, per seed; this report aggregates them; the spec as run is in its \"spec\" field).",
        r.name
    ));
    let with_checkpoint: Vec<&TrainingRun> = r.trainings.iter().filter(|t| !t.checkpoint.is_empty()).collect();
    if !with_checkpoint.is_empty() {
        doc.p("Per-step training metrics: metrics.jsonl in each run's training directory, the one holding its checkpoint:");
        doc.table(tables::checkpoints_table(&with_checkpoint));
    }
}
