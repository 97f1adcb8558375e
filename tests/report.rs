//! `masa report` on a synthetic fixture: a `RunResults` made up in code (2 seeds; Scratch,
//! weight selection and MASA; one ablation run; one spectrum). The numbers are invented so
//! that means, standard deviations and the data-efficiency interpolation can be worked out by
//! hand; they are not measurements.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use masa::report::aggregate::{cohorts, data_efficiency, tokens_to_reach};
use masa::report::{report_from_path, write_report, ReportFiles};
use masa::run::results::{
    CalibrationInfo, CurvePoint, ExtractionInfo, Invocation, RunResults, SourceInfo, Spectrum, TaskScore, TrainingRun, FORMAT,
};

const TOKENS: [u64; 5] = [0, 250, 500, 750, 1000];

/// A curve at [`TOKENS`]: mean loss `v`, domain `code` at v − 0.1 and `web` at v + 0.1.
fn curve(values: &[f64]) -> Vec<CurvePoint> {
    TOKENS
        .iter()
        .zip(values)
        .map(|(&tokens, &v)| CurvePoint {
            tokens,
            val_mean: v,
            val: BTreeMap::from([("code".to_string(), v - 0.1), ("web".to_string(), v + 0.1)]),
        })
        .collect()
}

fn score(metric: &str, value: f64) -> TaskScore {
    TaskScore { metric: metric.into(), value, stderr: None, n: 1000, all: BTreeMap::new(), finetune_examples: 500 }
}

fn run(strategy: &str, label: &str, group: &str, seed: u64, values: &[f64], piqa: Option<f64>, ni: Option<f64>) -> TrainingRun {
    let mut downstream = BTreeMap::new();
    if let Some(v) = piqa {
        downstream.insert("piqa".to_string(), score("acc", v));
    }
    if let Some(v) = ni {
        downstream.insert("instruct_qa".to_string(), score("rougeL", v));
    }
    TrainingRun {
        student: "tiny".into(),
        student_parameters: 1_000_000,
        strategy: strategy.into(),
        group: group.into(),
        label: label.into(),
        ratio: None,
        seed,
        budget_tokens: 1000,
        curve: curve(values),
        train_seconds: 12.0,
        train_tokens_per_s: 83.0,
        downstream,
        done: vec!["init".into(), "train".into()],
        checkpoint: format!("runs/fixture/train/{strategy}-s{seed}/latest"),
        engine: if strategy.ends_with("@torchrun") { "torchrun" } else { "masa" }.into(),
    }
}

/// Six made-up power-law spectra (3 layers × gate/up), 48 values each: two rows of panels.
fn spectra() -> Vec<Spectrum> {
    let power_law = |scale: f64, exponent: f64| (1..=48).map(|i| scale / (i as f64).powf(exponent)).collect::<Vec<f64>>();
    [0, 15, 29]
        .iter()
        .flat_map(|&layer| ["gate_proj", "up_proj"].map(|proj| (layer, proj)))
        .map(|(layer, proj)| Spectrum {
            extraction: "ratio-0.12-lambda-0.01-all-domains".into(),
            layer,
            proj: proj.into(),
            source: power_law(12.0 + layer as f64 / 10.0, 0.6),
            gene: power_law(10.0, 0.75),
        })
        .collect()
}

/// The fixture. Seed-mean curves at 0/250/500/750/1000 tokens:
/// Scratch 10.8, 8.1, 7.1, 6.7, 6.6 (final 6.6 = the data-efficiency target, reached at 1000);
/// MASA 10.8, 7.1, 6.5, 6.3, 6.2 (crosses 6.6 between 250 and 500: 250 + 250·0.5/0.6);
/// weight selection 10.8, 7.9, 7.1, 6.8, 6.7 (never reaches 6.6).
fn fixture() -> RunResults {
    let trainings = vec![
        run("scratch", "Scratch", "main", 0, &[10.8, 8.0, 7.0, 6.6, 6.5], Some(0.60), Some(20.0)),
        run("scratch", "Scratch", "main", 1, &[10.8, 8.2, 7.2, 6.8, 6.7], Some(0.61), Some(23.0)),
        run("weight-selection", "Weight selection", "main", 0, &[10.8, 7.8, 7.0, 6.7, 6.65], Some(0.59), Some(21.0)),
        run("weight-selection", "Weight selection", "main", 1, &[10.8, 8.0, 7.2, 6.9, 6.75], Some(0.60), Some(23.0)),
        run("masa", "MASA", "main", 0, &[10.8, 7.0, 6.4, 6.2, 6.1], Some(0.62), Some(30.0)),
        run("masa", "MASA", "main", 1, &[10.8, 7.2, 6.6, 6.4, 6.3], Some(0.64), Some(32.0)),
        run("masa-no-spectral", "w/o spectral (λ=0)", "ablation", 0, &[10.8, 7.3, 6.7, 6.45, 6.35], Some(0.61), None),
    ];
    RunResults {
        format: FORMAT.into(),
        name: "fixture".into(),
        description: "Synthetic fixture for the report tests (invented numbers).".into(),
        spec: serde_json::json!({"name": "fixture"}),
        command: "masa run specs/fixture.toml".into(),
        masa_version: "0.1.0".into(),
        started_unix: 1_700_000_000,
        wall_seconds: 3725.0,
        threads: 2,
        invocations: vec![
            Invocation { started_unix: 1_699_990_000, wall_seconds: 3725.0, stages_computed: 34, complete: true },
            Invocation { started_unix: 1_700_000_000, wall_seconds: 0.7, stages_computed: 0, complete: true },
        ],
        complete: true,
        source: SourceInfo {
            name: "smollm2-135m".into(),
            path: "/x".into(),
            fingerprint: "abcdef0123456789ffff".into(),
            arch: "llama".into(),
            layers: 30,
            hidden: 576,
            ffn: 1536,
            parameters: 134_515_008,
        },
        calibrations: vec![CalibrationInfo {
            label: "all-domains".into(),
            domains: vec!["code".into(), "web".into()],
            tokens: 65_536,
            seconds: 30.0,
            cache_key: "k1".into(),
        }],
        extractions: vec![ExtractionInfo {
            label: "ratio-0.12-lambda-0.01-all-domains".into(),
            calibration: "all-domains".into(),
            ratio: Some(0.12),
            rank: 325,
            lambda: 0.01,
            mode: "exact".into(),
            layers: vec![0, 15, 29],
            matrices: 9,
            median_rel_l_out: 0.0812,
            mean_l_spec_per_r_start: 0.5,
            mean_l_spec_per_r: 0.2,
            seconds: 40.0,
            cache_key: "k2".into(),
        }],
        spectra: spectra(),
        trainings,
        notes: vec!["Distillation was not run in this fixture (no teacher cache).".into()],
    }
}

fn render(r: &RunResults) -> (tempfile::TempDir, ReportFiles, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let files = write_report(r, dir.path()).unwrap();
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    let html = std::fs::read_to_string(&files.html).unwrap();
    (dir, files, md, html)
}

/// Stems of the figures (`plots/<stem>.svg`).
fn figure_names(files: &ReportFiles) -> Vec<String> {
    files
        .plots
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn writes_markdown_html_and_every_plot_as_png_and_svg() {
    let (dir, files, md, _) = render(&fixture());
    assert_eq!(files.markdown, dir.path().join("report.md"));
    assert_eq!(files.html, dir.path().join("report.html"));
    let names = figure_names(&files);
    for expected in ["curves-tiny-1k", "data-efficiency-tiny-1k", "curves-ablations-tiny-1k", "spectra"] {
        assert!(names.iter().any(|n| n == expected), "missing figure {expected}: {names:?}");
    }
    for name in &names {
        let png = std::fs::read(dir.path().join("plots").join(format!("{name}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}.png is not a PNG");
        let svg = std::fs::read_to_string(dir.path().join("plots").join(format!("{name}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{name}.svg");
        assert!(md.contains(&format!("(plots/{name}.png)")), "report.md does not show {name}");
    }
    assert_eq!(files.plots.len(), 2 * names.len());
    // No leftover temp files from the atomic writes.
    let stray: Vec<_> = std::fs::read_dir(dir.path().join("plots"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty());
}

#[test]
fn html_is_self_contained_with_every_figure_inline() {
    let (_dir, files, _, html) = render(&fixture());
    let lower = html.to_lowercase();
    for external in ["src=\"http", "href=\"http", "src='http", "<link", "<script", "url(", "@import", "<img"] {
        assert!(!lower.contains(external), "report.html has an external reference: {external}");
    }
    let names = figure_names(&files);
    assert_eq!(html.matches("<svg").count(), names.len());
    for name in names {
        let at = html.find(&format!("<figure data-figure=\"{name}\">")).unwrap_or_else(|| panic!("figure {name} not inline"));
        let end = at + html[at..].find("</figure>").unwrap();
        assert!(html[at..end].contains("<svg") && html[at..end].contains("</svg>"), "figure {name} has no inline svg");
    }
    assert!(html.contains("<style>") && html.contains("<table>"));
    // Every invocation is listed: the one that computed, and the cached rerun.
    assert!(html.contains("computed 34 stages") && html.contains("all stages cached"));
}

#[test]
fn data_efficiency_interpolates_the_crossing_by_hand() {
    // Directly: 7.1 at 250 and 6.5 at 500, target 6.6 → 250 + 250 · (7.1 − 6.6)/(7.1 − 6.5).
    let by_hand = 250.0 + 250.0 * 0.5 / 0.6;
    let reached = tokens_to_reach(&[(0.0, 10.8), (250.0, 7.1), (500.0, 6.5), (750.0, 6.3)], 6.6).unwrap();
    assert!((reached - by_hand).abs() < 1e-9, "{reached} vs {by_hand}");
    assert_eq!(tokens_to_reach(&[(0.0, 10.8), (250.0, 7.1)], 6.6), None);

    // Through the seed-mean curves of the fixture.
    let r = fixture();
    let all = cohorts(&r.trainings);
    let main: Vec<_> = all.iter().filter(|c| c.group == "main").collect();
    let e = data_efficiency(&main).unwrap();
    assert!((e.target - 6.6).abs() < 1e-9, "target {}", e.target);
    assert!((e.scratch_tokens - 1000.0).abs() < 1e-9, "scratch {}", e.scratch_tokens);
    let row = |s: &str| e.rows.iter().find(|x| x.strategy == s).unwrap();
    let masa = row("masa");
    assert!((masa.tokens.unwrap() - by_hand).abs() < 1e-6, "{:?}", masa.tokens);
    assert!((masa.ratio.unwrap() - 1000.0 / by_hand).abs() < 1e-6, "{:?}", masa.ratio);
    assert_eq!(row("weight-selection").tokens, None);
    assert_eq!(row("scratch").ratio, Some(1.0));

    let (_dir, _, md, _) = render(&r);
    // 1000 / 458.33 = 2.18; weight selection never gets there.
    assert!(md.contains("| MASA | 458 | **2.18×** |"), "{md}");
    assert!(md.contains("| Weight selection | not reached | – |"), "{md}");
    assert!(md.contains("2.18× less pre-training data than Scratch"), "{md}");
}

#[test]
fn tables_show_the_hand_computed_mean_and_std() {
    let (_dir, _, md, html) = render(&fixture());
    // MASA finals 6.1 and 6.3: mean 6.2, sample std √0.02 = 0.1414; code 6.0/6.2, web 6.2/6.4.
    assert!(md.contains("| MASA | **6.100 ± 0.141** | **6.300 ± 0.141** | **6.200 ± 0.141** |"), "{md}");
    // Scratch finals 6.5/6.7 (std 0.141), weight selection 6.65/6.75 (std 0.0707).
    assert!(md.contains("| Scratch | 6.500 ± 0.141 | 6.700 ± 0.141 | 6.600 ± 0.141 |"), "{md}");
    assert!(md.contains("| Weight selection | 6.600 ± 0.071 | 6.800 ± 0.071 | 6.700 ± 0.071 |"), "{md}");
    // Downstream: piqa 62%/64% → 63.0 ± 1.4; Rouge-L 30/32 → 31.0 ± 1.4; average (46 and 48) → 47.0 ± 1.4.
    assert!(md.contains("| MASA | **31.0 ± 1.4** | **63.0 ± 1.4** | **47.0 ± 1.4** |"), "{md}");
    // Scratch: Rouge-L 20/23 → 21.5 ± 2.1; piqa 60%/61% → 60.5 ± 0.7; averages 40 and 42 → 41.0 ± 1.4.
    assert!(md.contains("| Scratch | 21.5 ± 2.1 | 60.5 ± 0.7 | 41.0 ± 1.4 |"), "{md}");
    assert!(md.contains("piqa: acc, n = 1000 test items, fine-tuned on 500 examples."), "{md}");
    // Ablation (one seed): std is a dash; Δ vs MASA 6.35 − 6.2; piqa 61% with binomial s.e. √(.61·.39/1000) = 1.5%.
    assert!(md.contains("| w/o spectral (λ=0) | 6.350 ± – | +0.150 | – | 61.0 (s.e. 1.5) |"), "{md}");
    assert!(html.contains("<strong>6.200 ± 0.141</strong>"));
}

#[test]
fn findings_compare_masa_with_each_baseline_and_list_notes() {
    let (_dir, _, md, _) = render(&fixture());
    assert!(md.contains("MASA has the lowest final validation loss of the 3 strategies."), "{md}");
    assert!(md.contains("MASA final validation loss 6.200 ± 0.141 vs Scratch 6.600 ± 0.141 (2 seeds): MASA is lower (better) by 0.400, larger than the seed spread"), "{md}");
    assert!(md.contains("- Distillation was not run in this fixture (no teacher cache)."), "{md}");
    assert!(md.contains("masa run specs/fixture.toml\nmasa report runs/fixture"), "{md}");
}

/// The report's rerun command is the one that ran the spec; for results written before masa
/// recorded it, the built-in spec's name or a placeholder for the spec file, never a made-up
/// `masa run <name>` that would fail.
#[test]
fn reproduce_gives_the_command_that_ran_the_spec() {
    let mut r = fixture();
    r.command = "masa run 'my specs/fixture.toml'".into();
    let (_dir, _, md, _) = render(&r);
    assert!(md.contains("masa run 'my specs/fixture.toml'\nmasa report runs/fixture"), "{md}");
    r.command.clear();
    let (_dir, _, md, _) = render(&r);
    assert!(md.contains("masa run SPEC.toml\nmasa report runs/fixture"), "{md}");
    assert!(md.contains("SPEC.toml: the spec file this run was started from (name = \"fixture\")"), "{md}");
    assert!(!md.contains("masa run fixture"), "{md}");
    r.name = "quick".into();
    let (_dir, _, md, _) = render(&r);
    assert!(md.contains("masa run quick\nmasa report runs/quick") && !md.contains("SPEC.toml"), "{md}");
}

/// (width, height) of a PNG, from its IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()))
}

/// The default spectra (first, middle, last layer × gate, up, down) are 9 panels: all shown, on
/// a 3 × 3 grid that is taller than the 2-row one.
#[test]
fn nine_spectra_are_all_shown_on_three_rows() {
    let mut r = fixture();
    let (dir6, _, md, _) = render(&r);
    assert!(!md.contains("recorded spectra"), "{md}");
    let two_rows = png_size(&std::fs::read(dir6.path().join("plots/spectra.png")).unwrap());
    let base = r.spectra[0].clone();
    r.spectra = [0, 17, 29]
        .iter()
        .flat_map(|&layer| ["gate_proj", "up_proj", "down_proj"].map(|proj| Spectrum { layer, proj: proj.into(), ..base.clone() }))
        .collect();
    let (dir9, _, md, _) = render(&r);
    assert!(!md.contains("recorded spectra"), "{md}");
    let three_rows = png_size(&std::fs::read(dir9.path().join("plots/spectra.png")).unwrap());
    assert_eq!(three_rows.0, two_rows.0);
    assert!(three_rows.1 > two_rows.1, "{three_rows:?} vs {two_rows:?}");
    r.spectra.push(Spectrum { layer: 5, ..base });
    let (_dir, _, md, _) = render(&r);
    assert!(md.contains("First 9 of 10 recorded spectra."), "{md}");
}

#[test]
fn findings_say_so_when_masa_does_not_win() {
    let mut r = fixture();
    for t in r.trainings.iter_mut().filter(|t| t.strategy == "masa") {
        for p in &mut t.curve {
            p.val_mean += 0.45;
        }
    }
    let (_dir, _, md, _) = render(&r);
    assert!(md.contains("MASA does not have the lowest final validation loss: Scratch is lower by 0.050."), "{md}");
    assert!(md.contains("MASA is higher (worse) by 0.050, smaller than the seed spread"), "{md}");
}

#[test]
fn sections_without_data_are_left_out() {
    let mut r = fixture();
    r.trainings.retain(|t| t.group == "main");
    for t in &mut r.trainings {
        t.downstream.clear();
    }
    r.spectra.clear();
    let (_dir, files, md, html) = render(&r);
    for absent in ["Downstream tasks", "Ablations", "Gene ratio sweep", "Calibration domains", "Singular value spectra"] {
        assert!(!md.contains(absent) && !html.contains(absent), "{absent} present");
    }
    assert!(md.contains("## Data efficiency") && md.contains("## Final validation loss per domain"));
    assert_eq!(figure_names(&files).len(), 2);
}

#[test]
fn partial_results_say_partial() {
    let mut r = fixture();
    r.complete = false;
    r.trainings[5].done = vec!["init".into()];
    let (_dir, _, md, html) = render(&r);
    assert!(md.contains("Partial report"), "{md}");
    assert!(html.contains("Partial report"));
    // The unfinished MASA seed is marked.
    assert!(md.contains("| MASA † |"), "{md}");
    let (_dir, _, md, _) = render(&fixture());
    assert!(!md.to_lowercase().contains("partial"));
}

#[test]
fn odd_data_renders_without_panicking() {
    let mut r = fixture();
    r.trainings[0].curve.clear();
    r.trainings[1].curve[4].val_mean = f64::NAN;
    r.trainings[2].curve[2].val.insert("code".into(), f64::INFINITY);
    r.trainings.truncate(5); // MASA with a single seed
    r.trainings[4].downstream.insert("boolq".into(), TaskScore { metric: "acc".into(), value: f64::NAN, n: 0, ..Default::default() });
    r.spectra[0].gene = vec![0.0, -1.0, f64::NAN];
    let (_dir, _, md, _) = render(&r);
    assert!(md.contains("| MASA | **6.000 ± –** |"), "{md}");
    let (_dir, _, md, _) = render(&RunResults { format: FORMAT.into(), name: "empty".into(), ..Default::default() });
    assert!(md.contains("No main-comparison training runs"), "{md}");
}

#[test]
fn report_from_a_run_directory_writes_beside_results() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("runs").join("fixture");
    fixture().save(&run_dir.join("results.json")).unwrap();
    let files = report_from_path(&run_dir, None).unwrap();
    assert_eq!(files.markdown, run_dir.join("report.md"));
    let out = dir.path().join("elsewhere");
    let files = report_from_path(&run_dir.join("results.json"), Some(&out)).unwrap();
    assert!(files.html.starts_with(&out) && files.html.exists());
    let err = report_from_path(Path::new("/nonexistent/results.json"), None).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/results.json"), "{err}");
}

/// results.json round-trips: the fixture saved and loaded back is unchanged, and the report
/// rendered from the file (as `masa report` does) is the one rendered from memory. Written to
/// `MASA_REPORT_FIXTURE_DIR` when set, to look at (e.g. `scripts/screenshot_report.sh`).
#[test]
fn report_from_saved_results_equals_report_from_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("MASA_REPORT_FIXTURE_DIR").map(PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    let r = fixture();
    r.save(&dir.join("results.json")).unwrap();
    let loaded = RunResults::load(&dir.join("results.json")).unwrap();
    assert_eq!(serde_json::to_value(&loaded).unwrap(), serde_json::to_value(&r).unwrap());
    let from_memory = write_report(&r, &tmp.path().join("from-memory")).unwrap();
    let from_file = report_from_path(&dir, None).unwrap();
    assert_eq!(from_file.markdown, dir.join("report.md"));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    assert_eq!(read(&from_file.markdown), read(&from_memory.markdown));
    assert_eq!(read(&from_file.html), read(&from_memory.html));
}

#[test]
fn ratio_sweep_and_calibration_domain_sections_render_when_present() {
    let mut r = fixture();
    for (ratio, values) in [(0.25, [10.8, 7.1, 6.6, 6.4, 6.25]), (0.12, [10.8, 7.0, 6.5, 6.3, 6.15])] {
        let mut t = run(&format!("masa-ratio-{ratio}"), &format!("MASA ρ={ratio}"), "ratio", 0, &values, None, None);
        t.ratio = Some(ratio);
        r.trainings.push(t);
    }
    r.trainings.push(run("masa-single-domain", "MASA (code only)", "calibration", 0, &[10.8, 7.2, 6.7, 6.5, 6.4], None, None));
    let (_dir, files, md, _) = render(&r);
    assert!(md.contains("## Gene ratio sweep (paper Table 5)"), "{md}");
    // Rows by ratio; 0.12 has the fixture's extraction (rank 325, median rel. L_out 0.0812), 0.25 none.
    let at_012 = md.find("| 0.12 | MASA ρ=0.12 | 325 | 0.0812 | **6.150 ± –** |").expect("ratio 0.12 row");
    let at_025 = md.find("| 0.25 | MASA ρ=0.25 | – | – | 6.250 ± – |").expect("ratio 0.25 row");
    assert!(at_012 < at_025);
    assert!(md.contains("Gene ratio sweep: the lowest final validation loss, 6.150, is at ρ = 0.12 (of 2 ratios)."), "{md}");
    assert!(md.contains("## Calibration domains (paper Fig. 4)"), "{md}");
    assert!(md.contains("| MASA (code only) | 6.400 ± – | +0.200 |"), "{md}");
    assert!(md.contains("Calibration domains: MASA (code only) final validation loss 6.400 vs MASA 6.200 ± 0.141"), "{md}");
    let names = figure_names(&files);
    assert!(
        names.contains(&"curves-ratio-tiny-1k".to_string()) && names.contains(&"curves-calibration-domains-tiny-1k".to_string()),
        "{names:?}"
    );
}

/// Runs of a second engine get their own section, next to the main runs of the same strategies,
/// and stay out of the main comparison.
#[test]
fn engine_section_sets_other_engines_beside_the_main_runs() {
    let mut r = fixture();
    for seed in [0, 1] {
        r.trainings.push(run("masa@torchrun", "MASA (torchrun)", "engine", seed, &[10.8, 7.1, 6.45, 6.25, 6.2], None, None));
    }
    let (_dir, files, md, _) = render(&r);
    let at = md.find("## Training engines").expect("engine section");
    let section = &md[at..];
    assert!(section.contains("| MASA (torchrun) | 6.200 ± 0.000 | +0.000 |"), "{section}");
    assert!(section.contains("| MASA | **6.200 ± 0.141** | (reference) |"), "{section}");
    assert!(!section[..section.find("\n## ").unwrap_or(section.len())].contains("Weight selection"), "{section}");
    // The main comparison does not list the torchrun copy.
    assert!(!md[..at].contains("MASA (torchrun)"), "{md}");
    assert!(figure_names(&files).contains(&"curves-engines-tiny-1k".to_string()), "{:?}", figure_names(&files));
}

/// Issue 31: every report has paired statistics against Scratch, computed here by hand from
/// the fixture's final losses (MASA − Scratch: −0.4 on both seeds, p = 2/4; weight selection:
/// +0.15, +0.05, interval 0.1 ± t(0.975, 1)·0.0707/√2 = [−0.535, 0.735]; the one-seed ablation:
/// no interval).
#[test]
fn every_report_states_paired_statistics_against_scratch() {
    let (_d, _f, md, _) = render(&fixture());
    assert!(md.contains("## Statistics: paired differences against Scratch"), "{md}");
    let row = |label: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {label} − Scratch")))
            .unwrap_or_else(|| panic!("no row for {label}"))
            .replace('\\', "")
    };
    let masa = row("MASA");
    assert!(
        masa.contains("| 2 |") && masa.contains("-0.4000, -0.4000") && masa.contains("[-0.4000, -0.4000]") && masa.contains("0.5000"),
        "{masa}"
    );
    let ws = row("Weight selection");
    assert!(ws.contains("0.1500, 0.0500") && ws.contains("[-0.5353, 0.7353]"), "{ws}");
    let abl = row("w/o spectral (λ=0)");
    assert!(abl.contains("| 1 |") && abl.contains("—"), "{abl}");
    // No [decision] in the spec: no decision section.
    assert!(!md.contains("## Decision"));
}

/// A spec's `[decision]` rule is applied mechanically: the sentence follows the interval, and
/// the knowledge verdict is positive only when MASA − rotated lies wholly below 0.
#[test]
fn the_decision_rule_prints_its_verdict_mechanically() {
    let mut r = fixture();
    r.spec =
        serde_json::json!({"name": "fixture", "decision": {"comparisons": ["masa - scratch", "masa - masa-rotated"], "confidence": 0.95}});
    r.trainings.push(run("masa-rotated", "MASA, rotated", "main", 0, &[10.8, 7.0, 6.5, 6.3, 6.2], None, None));
    r.trainings.push(run("masa-rotated", "MASA, rotated", "main", 1, &[10.8, 7.0, 6.5, 6.3, 6.35], None, None));
    let (_d, _f, md, _) = render(&r);
    assert!(md.contains("## Decision"), "{md}");
    // MASA − rotated: −0.10, −0.05: the interval [−0.393, 0.243] contains 0.
    assert!(md.contains("no difference between MASA and MASA, rotated is shown"), "{md}");
    assert!(md.contains("Verdict: this experiment does not show that the genes carry usable knowledge"), "{md}");
    // MASA − Scratch: −0.4 on both seeds, an interval of zero width below 0.
    assert!(md.contains("MASA ends with a lower validation loss than Scratch"), "{md}");
    use masa::report::paired::paired;
    let p = paired(&[(0, 1.0), (1, 1.1), (2, 0.9)], &[(0, 1.2), (1, 1.25), (2, 1.15)], 0.95).unwrap();
    let s = masa::report::decision_sentences(&[("masa".into(), "masa-rotated".into(), "MASA".into(), "rotated".into(), p)], 0.95);
    assert!(s[1].starts_with("Verdict: the genes carry usable knowledge"), "{s:?}");
}
