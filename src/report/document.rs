//! The report as a list of blocks (headings, paragraphs, tables, figures), rendered once to
//! Markdown (figures as `plots/<name>.png` links) and once to a self-contained HTML page
//! (inline CSS, figures as inline SVG).

use std::collections::BTreeMap;

/// One table cell.
#[derive(Clone, Debug, Default)]
pub struct Cell {
    pub text: String,
    /// Best in its column.
    pub bold: bool,
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Cell { text, bold: false }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Cell { text: text.into(), bold: false }
    }
}

/// A table: the first `left` columns are text (left-aligned), the rest numbers (right-aligned).
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
    pub left: usize,
    /// Footnotes printed under the table.
    pub notes: Vec<String>,
}

impl Table {
    /// A table with `header` and one leading text column.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        Table { header: header.into_iter().map(Into::into).collect(), rows: Vec::new(), left: 1, notes: Vec::new() }
    }

    pub fn row<C: Into<Cell>>(&mut self, cells: impl IntoIterator<Item = C>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Marks in bold the best cell of column `col` by `key` (lower is better when `lower`);
    /// `key` is `None` for cells without a number. Ties are all bold; a column with fewer
    /// than two numbers gets no bold.
    pub fn bold_best(&mut self, col: usize, lower: bool, key: impl Fn(usize) -> Option<f64>) {
        let keyed: Vec<(usize, f64)> = (0..self.rows.len()).filter_map(|i| key(i).filter(|v| v.is_finite()).map(|v| (i, v))).collect();
        if keyed.len() < 2 {
            return;
        }
        let best = keyed.iter().map(|&(_, v)| v).fold(if lower { f64::INFINITY } else { f64::NEG_INFINITY }, |a, b| {
            if lower {
                a.min(b)
            } else {
                a.max(b)
            }
        });
        for (i, v) in keyed {
            if v == best {
                if let Some(c) = self.rows[i].get_mut(col) {
                    c.bold = true;
                }
            }
        }
    }
}

/// One block of the report.
#[derive(Clone, Debug)]
pub enum Block {
    /// Level 1–4 heading.
    Heading(u8, String),
    Paragraph(String),
    /// A highlighted paragraph (partial report, missing data).
    Callout(String),
    List(Vec<String>),
    Code(String),
    Table(Table),
    /// A plot by name (`plots/<name>.png`/`.svg`) with its caption.
    Figure {
        name: String,
        caption: String,
    },
}

/// Markdown text of the blocks; figures link to `plots/<name>.png`.
pub fn markdown(blocks: &[Block]) -> String {
    let mut out = String::new();
    for b in blocks {
        match b {
            Block::Heading(level, text) => out.push_str(&format!("{} {}\n\n", "#".repeat(usize::from(*level).clamp(1, 6)), text)),
            Block::Paragraph(text) => out.push_str(&format!("{}\n\n", md_inline(text))),
            Block::Callout(text) => out.push_str(&format!("> **{}**\n\n", md_inline(text))),
            Block::List(items) => {
                for i in items {
                    out.push_str(&format!("- {}\n", md_inline(i)));
                }
                out.push('\n');
            }
            Block::Code(code) => out.push_str(&format!("```\n{code}\n```\n\n")),
            Block::Table(t) => out.push_str(&md_table(t)),
            Block::Figure { name, caption } => {
                out.push_str(&format!("![{}](plots/{name}.png)\n\n*{}*\n\n", md_inline(caption), md_inline(caption)))
            }
        }
    }
    out
}

/// Text for Markdown: characters that would start markup (`*`, `_`, `` ` ``, `<`, `[`, `|`)
/// escaped, so labels like `w/o spectral (λ=0)` or `masa_x` read as written.
fn md_inline(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '_' | '`' | '<' | '[' | ']' | '|' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.replace('\n', " ")
}

fn md_table(t: &Table) -> String {
    let cell = |c: &Cell| if c.bold && !c.text.is_empty() { format!("**{}**", md_inline(&c.text)) } else { md_inline(&c.text) };
    let mut out = format!("| {} |\n|", t.header.iter().map(|h| md_inline(h)).collect::<Vec<_>>().join(" | "));
    for i in 0..t.header.len() {
        out.push_str(if i < t.left { " :--- |" } else { " ---: |" });
    }
    out.push('\n');
    for row in &t.rows {
        out.push_str(&format!("| {} |\n", row.iter().map(cell).collect::<Vec<_>>().join(" | ")));
    }
    out.push('\n');
    for n in &t.notes {
        out.push_str(&format!("{}  \n", md_inline(n)));
    }
    if !t.notes.is_empty() {
        out.push('\n');
    }
    out
}

/// Escapes text for HTML content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1.5em;color:#1d1d1f;line-height:1.5;background:#fff}
h1{font-size:1.9em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.45em;margin-top:2em;border-bottom:1px solid #e4e4e4;padding-bottom:.2em}
h3{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse;margin:1em 0 .4em;font-size:.92em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.35em .6em}
.wide{overflow-x:auto;max-width:100%}
.wide table{font-size:.84em}
th{background:#f3f5f7;text-align:center}
td.l{text-align:left}td.r{text-align:right;white-space:nowrap}
body{max-width:1200px}
tr:nth-child(even) td{background:#fafbfc}
.notes{font-size:.85em;color:#555;margin:.2em 0 1.2em}
.notes p{margin:.1em 0}
.callout{background:#fff4e5;border-left:5px solid #f0a030;padding:.7em 1em;margin:1em 0;font-weight:600}
figure{margin:1.5em 0}
figure svg{width:100%;max-width:960px;height:auto;display:block;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:.4em}
pre{background:#f6f8fa;padding:.8em 1em;overflow-x:auto;border-radius:4px}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
li{margin:.25em 0}
";

/// A self-contained HTML page of the blocks: inline CSS, each figure's SVG inline (from `svgs`,
/// by name; a figure without one gets its caption and a note).
pub fn html(title: &str, blocks: &[Block], svgs: &BTreeMap<String, String>) -> String {
    let mut body = String::new();
    for b in blocks {
        match b {
            Block::Heading(level, text) => {
                let l = level.clamp(&1, &6);
                body.push_str(&format!("<h{l}>{}</h{l}>\n", html_escape(text)));
            }
            Block::Paragraph(text) => body.push_str(&format!("<p>{}</p>\n", html_escape(text))),
            Block::Callout(text) => body.push_str(&format!("<div class=\"callout\">{}</div>\n", html_escape(text))),
            Block::List(items) => {
                body.push_str("<ul>\n");
                for i in items {
                    body.push_str(&format!("<li>{}</li>\n", html_escape(i)));
                }
                body.push_str("</ul>\n");
            }
            Block::Code(code) => body.push_str(&format!("<pre><code>{}</code></pre>\n", html_escape(code))),
            Block::Table(t) => body.push_str(&html_table(t)),
            Block::Figure { name, caption } => {
                let svg = svgs.get(name).map_or_else(|| "<p>(figure missing)</p>".to_string(), |s| strip_xml_declaration(s).to_string());
                body.push_str(&format!(
                    "<figure data-figure=\"{}\">\n{svg}\n<figcaption>{}</figcaption>\n</figure>\n",
                    html_escape(name),
                    html_escape(caption)
                ));
            }
        }
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        html_escape(title)
    )
}

fn strip_xml_declaration(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

fn html_table(t: &Table) -> String {
    // Wide tables (one column per corpus domain) scroll inside the page instead of overflowing it.
    let mut out = String::from("<div class=\"wide\"><table>\n");
    if t.header.iter().any(|h| !h.is_empty()) {
        out.push_str("<thead><tr>");
        for h in &t.header {
            out.push_str(&format!("<th>{}</th>", html_escape(h)));
        }
        out.push_str("</tr></thead>\n");
    }
    out.push_str("<tbody>\n");
    for row in &t.rows {
        out.push_str("<tr>");
        for (i, c) in row.iter().enumerate() {
            let class = if i < t.left { "l" } else { "r" };
            let text = html_escape(&c.text);
            let text = if c.bold { format!("<strong>{text}</strong>") } else { text };
            out.push_str(&format!("<td class=\"{class}\">{text}</td>"));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table></div>\n");
    if !t.notes.is_empty() {
        out.push_str("<div class=\"notes\">");
        for n in &t.notes {
            out.push_str(&format!("<p>{}</p>", html_escape(n)));
        }
        out.push_str("</div>\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_escapes_markup_in_labels() {
        let mut t = Table::new(["Strategy", "Loss"]);
        t.row(["a|b", "1.0"]);
        let md = markdown(&[Block::Table(t), Block::Paragraph("w/o *spectral*".into())]);
        assert!(md.contains("| a\\|b | 1.0 |"), "{md}");
        assert!(md.contains("w/o \\*spectral\\*"), "{md}");
    }

    #[test]
    fn bold_marks_every_tied_best_and_skips_single_numbers() {
        let mut t = Table::new(["s", "v"]);
        for v in ["1", "2", "1"] {
            t.row(["x", v]);
        }
        let vals = [Some(1.0), Some(2.0), Some(1.0)];
        t.bold_best(1, true, |i| vals[i]);
        assert_eq!(t.rows.iter().map(|r| r[1].bold).collect::<Vec<_>>(), [true, false, true]);
        let mut one = Table::new(["s", "v"]);
        one.row(["x", "1"]);
        one.bold_best(1, true, |_| Some(1.0));
        assert!(!one.rows[0][1].bold);
    }

    #[test]
    fn html_escapes_text() {
        let page = html("<t>", &[Block::Paragraph("a < b & c".into())], &BTreeMap::new());
        assert!(page.contains("<p>a &lt; b &amp; c</p>"));
        assert!(page.contains("<title>&lt;t&gt;</title>"));
    }
}
