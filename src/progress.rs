//! Progress bars with rates and ETA (indicatif), hidden when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressStyle};

pub fn bytes_bar(total: u64, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(msg.to_string());
    bar
}

/// A bar counting items (tokens, steps, texts) with a unit name shown in the rate.
pub fn count_bar(total: u64, msg: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let tpl = format!("{{msg}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} {{per_sec}} eta {{eta}}");
    bar.set_style(ProgressStyle::with_template(&tpl).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    bar.set_message(msg.to_string());
    bar
}
