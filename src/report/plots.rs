//! The report's figures, drawn with `plotters` once as SVG (inlined in the HTML) and once as
//! PNG (linked from the Markdown). Text in the PNGs is rendered with a font compiled into the
//! binary (Ubuntu Light from `epaint_default_fonts`), so no system font or fontconfig is read.

use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::aggregate::Band;
use super::format;

/// Size of a single-chart figure in pixels.
pub const SIZE: (u32, u32) = (800, 500);
/// Size of the spectra small multiples, up to two rows of panels.
pub const GRID_SIZE: (u32, u32) = (900, 560);

/// Size of the spectra small multiples for `n` panels: [`GRID_SIZE`] up to two rows, 280
/// pixels taller for the third.
pub fn grid_size(n: usize) -> (u32, u32) {
    let (rows, _) = grid(n);
    if rows <= 2 {
        GRID_SIZE
    } else {
        (GRID_SIZE.0, GRID_SIZE.1 + 280)
    }
}

/// The family every text style names; [`register_font`] maps it to the embedded font.
const FONT: &str = "sans-serif";

/// A rendered figure.
#[derive(Clone, Debug)]
pub struct Figure {
    /// File stem under `plots/`.
    pub name: String,
    pub svg: String,
    pub png: Vec<u8>,
}

/// Something that draws itself on any plotters backend.
pub trait Plot {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Any plotters error as text.
/// The legend box every plot uses, at `pos`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(190, 190, 190))
        .label_font((FONT, 14))
        .draw()
        .map_err(fail)
}

fn fail<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Registers the embedded font for [`FONT`] once per process.
fn register_font() -> Result<(), String> {
    let ok = *OnceLock::get_or_init(&REGISTERED, || {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT).is_ok()
    });
    ok.then_some(()).ok_or_else(|| "the embedded font could not be parsed".to_string())
}

static REGISTERED: OnceLock<bool> = OnceLock::new();

/// Draws `plot` as SVG text and as PNG bytes of `size` pixels.
pub fn render(plot: &impl Plot, size: (u32, u32)) -> Result<(String, Vec<u8>), String> {
    register_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        plot.draw(&root)?;
        root.present().map_err(fail)?;
    }
    let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        plot.draw(&root)?;
        root.present().map_err(fail)?;
    }
    Ok((svg, encode_png(&rgb, size)?))
}

/// PNG bytes of an 8-bit RGB buffer.
fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(fail)?;
    writer.write_image_data(rgb).map_err(fail)?;
    writer.finish().map_err(fail)?;
    Ok(out)
}

/// Tableau-10 colours: distinct, colour-blind tolerable.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The same colour for a strategy in every figure (MASA red, Scratch dark grey, ...); other
/// strategies take the palette by their position `index` in the figure.
pub fn strategy_color(strategy: &str, index: usize) -> RGBColor {
    match strategy {
        "masa" => PALETTE[3],
        "scratch" => RGBColor(60, 60, 60),
        "weight-selection" => PALETTE[0],
        "prune" => PALETTE[2],
        "distill" => PALETTE[4],
        "hybrid" => PALETTE[5],
        _ => [PALETTE[1], PALETTE[6], PALETTE[9], PALETTE[8], PALETTE[7]][index % 5],
    }
}

/// One curve of a [`CurvesPlot`]: seed-mean line and min–max band.
#[derive(Clone, Debug)]
pub struct CurveSeries {
    pub label: String,
    pub color: RGBColor,
    pub band: Band,
}

/// Validation loss over pre-training tokens, one line (with band) per series.
#[derive(Clone, Debug)]
pub struct CurvesPlot {
    pub title: String,
    pub series: Vec<CurveSeries>,
}

impl Plot for CurvesPlot {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let x_max = self.series.iter().filter_map(|s| s.band.tokens.last().copied()).fold(0.0, f64::max).max(1.0);
        let (lo, hi) = zoom_range(&self.series.iter().map(|s| &s.band).collect::<Vec<_>>());
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FONT, 22))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max * 1.02, lo..hi)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .x_desc("pre-training tokens")
            .y_desc("validation loss (nats/token)")
            .x_label_formatter(&|x| format::tokens(*x))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .x_labels(10)
            .y_labels(8)
            .light_line_style(RGBColor(246, 246, 246))
            .bold_line_style(RGBColor(220, 220, 220))
            .draw()
            .map_err(fail)?;
        for s in &self.series {
            let band = clip_polygon_y(&band_polygon(&s.band), lo, hi);
            if band.len() >= 3 {
                chart.draw_series(std::iter::once(Polygon::new(band, s.color.mix(0.16)))).map_err(fail)?;
            }
        }
        for s in &self.series {
            let style = s.color.stroke_width(2);
            let color = s.color;
            chart
                .draw_series(LineSeries::new(Vec::<(f64, f64)>::new(), style))
                .map_err(fail)?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3)));
            let mean = s.band.mean_curve();
            for segment in clip_polyline_y(&mean, lo, hi) {
                chart.draw_series(LineSeries::new(segment, style)).map_err(fail)?;
            }
            let visible = mean.into_iter().filter(|p| p.1 >= lo && p.1 <= hi);
            chart.draw_series(visible.map(|p| Circle::new(p, 3, color.filled()))).map_err(fail)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    }
}

/// The y-range that shows where curves differ: from the lowest value to the 90th percentile
/// of all values after the first evaluation (the untrained init, ~10.8 nats, would otherwise
/// flatten the rest), padded by 5%; lines leaving it are clipped at the frame.
pub fn zoom_range(bands: &[&Band]) -> (f64, f64) {
    let mut values: Vec<f64> = Vec::new();
    for b in bands {
        let skip = usize::from(b.tokens.len() > 1 && b.tokens[0] <= 0.0);
        for i in skip..b.tokens.len() {
            values.extend([b.min[i], b.mean[i], b.max[i]].into_iter().filter(|v| v.is_finite()));
        }
    }
    if values.is_empty() {
        return (0.0, 1.0);
    }
    values.sort_by(f64::total_cmp);
    let lo = values[0];
    let hi = values[((values.len() - 1) as f64 * 0.9).round() as usize];
    let span = if hi - lo > 1e-9 { hi - lo } else { 0.5 };
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// The band as a polygon: along the max curve, back along the min curve.
fn band_polygon(b: &Band) -> Vec<(f64, f64)> {
    let upper = b.tokens.iter().copied().zip(b.max.iter().copied());
    let lower = b.tokens.iter().copied().zip(b.min.iter().copied()).rev();
    upper.chain(lower).collect()
}

/// The parts of a polyline with lo ≤ y ≤ hi, cut where it crosses the bounds.
pub fn clip_polyline_y(points: &[(f64, f64)], lo: f64, hi: f64) -> Vec<Vec<(f64, f64)>> {
    let inside = |p: &(f64, f64)| p.1 >= lo && p.1 <= hi;
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    if points.len() == 1 && inside(&points[0]) {
        return vec![points.to_vec()];
    }
    let mut current: Vec<(f64, f64)> = Vec::new();
    for w in points.windows(2) {
        let (p, q) = (w[0], w[1]);
        let Some((a, b)) = clip_segment_y(p, q, lo, hi) else {
            if current.len() > 1 {
                runs.push(std::mem::take(&mut current));
            }
            current.clear();
            continue;
        };
        if current.last() != Some(&a) {
            if current.len() > 1 {
                runs.push(std::mem::take(&mut current));
            }
            current = vec![a];
        }
        current.push(b);
    }
    if current.len() > 1 {
        runs.push(current);
    }
    runs
}

/// The part of segment p→q with lo ≤ y ≤ hi, if any.
fn clip_segment_y(p: (f64, f64), q: (f64, f64), lo: f64, hi: f64) -> Option<((f64, f64), (f64, f64))> {
    if p.1 == q.1 {
        return (p.1 >= lo && p.1 <= hi).then_some((p, q));
    }
    let t = |y: f64| (y - p.1) / (q.1 - p.1);
    let (t_lo, t_hi) = (t(lo), t(hi));
    let t0 = t_lo.min(t_hi).max(0.0);
    let t1 = t_lo.max(t_hi).min(1.0);
    if !(t0 <= t1) {
        return None;
    }
    let at = |t: f64| {
        if t == 0.0 {
            p
        } else if t == 1.0 {
            q
        } else {
            (p.0 + t * (q.0 - p.0), p.1 + t * (q.1 - p.1))
        }
    };
    Some((at(t0), at(t1)))
}

/// A polygon cut to lo ≤ y ≤ hi (Sutherland–Hodgman against the two horizontal bounds).
pub fn clip_polygon_y(poly: &[(f64, f64)], lo: f64, hi: f64) -> Vec<(f64, f64)> {
    let below_hi = clip_polygon_half(poly, hi, |y| y <= hi);
    clip_polygon_half(&below_hi, lo, |y| y >= lo)
}

fn clip_polygon_half(poly: &[(f64, f64)], bound: f64, inside: impl Fn(f64) -> bool) -> Vec<(f64, f64)> {
    let cross = |p: (f64, f64), q: (f64, f64)| (p.0 + (q.0 - p.0) * (bound - p.1) / (q.1 - p.1), bound);
    let mut out = Vec::with_capacity(poly.len() + 4);
    for i in 0..poly.len() {
        let (prev, cur) = (poly[(i + poly.len() - 1) % poly.len()], poly[i]);
        match (inside(prev.1), inside(cur.1)) {
            (true, true) => out.push(cur),
            (true, false) => out.push(cross(prev, cur)),
            (false, true) => {
                out.push(cross(prev, cur));
                out.push(cur);
            }
            (false, false) => {}
        }
    }
    out
}

/// One bar of a [`BarsPlot`]; `value` `None` is drawn as a note instead of a bar.
#[derive(Clone, Debug)]
pub struct Bar {
    pub label: String,
    pub value: Option<f64>,
    pub color: RGBColor,
    /// Text over the bar (or in its place when there is no value).
    pub annotation: String,
}

/// Vertical bars, one per category, with an optional horizontal reference line.
#[derive(Clone, Debug)]
pub struct BarsPlot {
    pub title: String,
    pub y_desc: String,
    pub bars: Vec<Bar>,
    /// (value, legend text) of a reference line, e.g. Scratch at 1×.
    pub reference: Option<(f64, String)>,
}

impl Plot for BarsPlot {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let n = self.bars.len().max(1) as f64;
        let top = self
            .bars
            .iter()
            .filter_map(|b| b.value)
            .chain(self.reference.iter().map(|r| r.0))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let y_max = if top > 0.0 { top * 1.2 } else { 1.0 };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FONT, 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n, 0f64..y_max)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(&self.y_desc)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(RGBColor(246, 246, 246))
            .bold_line_style(RGBColor(220, 220, 220))
            .draw()
            .map_err(fail)?;
        let text = |v: VPos| TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, v));
        for (i, b) in self.bars.iter().enumerate() {
            let x = i as f64;
            let value = b.value.filter(|v| v.is_finite() && *v >= 0.0);
            if let Some(v) = value {
                chart
                    .draw_series(std::iter::once(Rectangle::new([(x + 0.15, 0.0), (x + 0.85, v)], b.color.mix(0.85).filled())))
                    .map_err(fail)?;
            }
            let over = EmptyElement::at((x + 0.5, value.unwrap_or(0.0))) + Text::new(b.annotation.clone(), (0, -6), text(VPos::Bottom));
            let under = EmptyElement::at((x + 0.5, 0.0)) + Text::new(b.label.clone(), (0, 8), text(VPos::Top));
            chart.draw_series([over, under]).map_err(fail)?;
        }
        if let Some((r, label)) = &self.reference {
            chart
                .draw_series(LineSeries::new([(0.0, *r), (n, *r)], BLACK.stroke_width(1)))
                .map_err(fail)?
                .label(label)
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], BLACK.stroke_width(1)));
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        Ok(())
    }
}

/// One panel of a [`SpectraPlot`]: singular values (descending) of source W and gene M.
#[derive(Clone, Debug)]
pub struct SpectrumPanel {
    pub title: String,
    pub source: Vec<f64>,
    pub gene: Vec<f64>,
}

/// Small multiples of singular value spectra on log-log axes.
#[derive(Clone, Debug)]
pub struct SpectraPlot {
    pub title: String,
    pub panels: Vec<SpectrumPanel>,
}

/// Rows and columns for `n` panels (at most 3 × 3).
fn grid(n: usize) -> (usize, usize) {
    match n {
        0 | 1 => (1, 1),
        2 => (1, 2),
        3 => (1, 3),
        4 => (2, 2),
        5 | 6 => (2, 3),
        _ => (3, 3),
    }
}

/// (index from 1, value) for the positive finite values.
fn indexed_positive(values: &[f64]) -> Vec<(f64, f64)> {
    values.iter().enumerate().filter(|(_, v)| v.is_finite() && **v > 0.0).map(|(i, v)| ((i + 1) as f64, *v)).collect()
}

/// Short labels for a log axis: `0.05`, `1.5`, `20`, `3e3`.
fn compact(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(0.01..1000.0).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

impl Plot for SpectraPlot {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let root = root.titled(&self.title, (FONT, 20)).map_err(fail)?;
        let (rows, cols) = grid(self.panels.len());
        let areas = root.split_evenly((rows, cols));
        let source_color = PALETTE[0];
        let gene_color = PALETTE[3];
        for (k, (panel, area)) in self.panels.iter().zip(areas.iter()).enumerate() {
            let src = indexed_positive(&panel.source);
            let gene = indexed_positive(&panel.gene);
            let all = src.iter().chain(gene.iter());
            let x_hi = all.clone().map(|p| p.0).fold(2.0, f64::max);
            let (y_lo, y_hi) = all.map(|p| p.1).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
            let (y_lo, y_hi) = if y_lo.is_finite() { (y_lo / 1.5, y_hi * 1.5) } else { (1e-3, 1.0) };
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, (FONT, 16))
                .margin(8)
                .x_label_area_size(38)
                .y_label_area_size(52)
                .build_cartesian_2d((1f64..x_hi).log_scale(), (y_lo..y_hi).log_scale())
                .map_err(fail)?;
            chart
                .configure_mesh()
                .x_desc("index i")
                .y_desc("singular value")
                .x_labels(6)
                .y_labels(6)
                .x_label_formatter(&|v| compact(*v))
                .y_label_formatter(&|v| compact(*v))
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 14))
                .light_line_style(RGBColor(240, 240, 240))
                .bold_line_style(RGBColor(220, 220, 220))
                .draw()
                .map_err(fail)?;
            let source_line = chart.draw_series(LineSeries::new(src, source_color.stroke_width(2))).map_err(fail)?;
            if k == 0 {
                source_line
                    .label("source W")
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], source_color.stroke_width(3)));
            }
            let gene_line = chart.draw_series(LineSeries::new(gene, gene_color.stroke_width(2))).map_err(fail)?;
            if k == 0 {
                gene_line.label("gene M").legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], gene_color.stroke_width(3)));
                legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polyline_is_cut_at_the_bounds() {
        // y falls 2 per unit of x from 10: crosses hi = 8 at x = 1 and lo = 4 at x = 3.
        let runs = clip_polyline_y(&[(0.0, 10.0), (4.0, 2.0)], 4.0, 8.0);
        assert_eq!(runs, vec![vec![(1.0, 8.0), (3.0, 4.0)]]);
        // Leaves and re-enters: two runs.
        let runs = clip_polyline_y(&[(0.0, 5.0), (1.0, 5.0), (2.0, 9.0), (3.0, 5.0)], 4.0, 8.0);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0], vec![(0.0, 5.0), (1.0, 5.0), (1.75, 8.0)]);
        assert_eq!(runs[1], vec![(2.25, 8.0), (3.0, 5.0)]);
        assert!(clip_polyline_y(&[(0.0, 20.0), (1.0, 30.0)], 4.0, 8.0).is_empty());
    }

    #[test]
    fn polygon_is_cut_to_the_band() {
        let square = [(0.0, 0.0), (2.0, 0.0), (2.0, 10.0), (0.0, 10.0)];
        let clipped = clip_polygon_y(&square, 2.0, 5.0);
        assert!(clipped.iter().all(|p| p.1 >= 2.0 && p.1 <= 5.0), "{clipped:?}");
        assert!(clipped.contains(&(2.0, 5.0)) && clipped.contains(&(0.0, 2.0)), "{clipped:?}");
    }

    #[test]
    fn zoom_leaves_out_the_init_point() {
        let b = Band { tokens: vec![0.0, 1.0, 2.0], mean: vec![10.8, 6.5, 6.0], min: vec![10.8, 6.4, 5.9], max: vec![10.8, 6.6, 6.1] };
        let (lo, hi) = zoom_range(&[&b]);
        assert!(lo < 5.9 && lo > 5.8 && hi < 7.0, "{lo} {hi}");
        assert_eq!(zoom_range(&[]), (0.0, 1.0));
    }

    #[test]
    fn degenerate_inputs_still_render() {
        let bar = Bar { label: "a".into(), value: Some(1.0), color: PALETTE[0], annotation: "1×".into() };
        let one = BarsPlot { title: "t".into(), y_desc: "y".into(), bars: vec![bar], reference: Some((1.0, "r".into())) };
        let (svg, png) = render(&one, SIZE).unwrap();
        assert!(svg.contains("<svg") && png.starts_with(b"\x89PNG"));
        render(&BarsPlot { bars: vec![], ..one }, SIZE).unwrap();
        let point = Band { tokens: vec![0.0], mean: vec![5.0], min: vec![5.0], max: vec![5.0] };
        let nan = Band { tokens: vec![0.0, 1.0], mean: vec![f64::NAN, 5.0], min: vec![f64::NAN, 5.0], max: vec![f64::NAN, 5.0] };
        let series = [point, nan].map(|band| CurveSeries { label: "x".into(), color: PALETTE[1], band }).to_vec();
        render(&CurvesPlot { title: "t".into(), series }, SIZE).unwrap();
        let panels = vec![SpectrumPanel { title: "p".into(), source: vec![], gene: vec![0.0, f64::NAN] }];
        render(&SpectraPlot { title: "t".into(), panels }, GRID_SIZE).unwrap();
    }

    #[test]
    fn compact_labels() {
        assert_eq!(compact(0.5), "0.5");
        assert_eq!(compact(20.0), "20");
        assert_eq!(compact(3000.0), "3e3");
    }
}
