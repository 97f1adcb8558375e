//! Progress bars with rates and ETA (indicatif), hidden when stderr is not a terminal.

use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Every bar is drawn through one `MultiProgress`, so `masa run`'s overall bar stays on top of
/// the bar of the stage it is running.
fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(MultiProgress::new)
}

/// A pipeline-wide bar in estimated seconds of work, with the current stage as its message.
pub fn overall_bar(total_seconds: u64, msg: &str) -> ProgressBar {
    let bar = multi().add(ProgressBar::new(total_seconds));
    bar.set_style(
        ProgressStyle::with_template(&format!("{msg} [{{bar:30}}] {{percent}}% elapsed {{elapsed_precise}} eta {{eta}}  {{msg}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("##-"),
    );
    bar.enable_steady_tick(std::time::Duration::from_secs(1));
    bar
}

pub fn bytes_bar(total: u64, msg: &str) -> ProgressBar {
    let bar = multi().add(ProgressBar::new(total));
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
    let bar = multi().add(ProgressBar::new(total));
    let tpl = format!("{{msg}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} {{per_sec}} eta {{eta}}");
    bar.set_style(ProgressStyle::with_template(&tpl).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    bar.set_message(msg.to_string());
    bar
}
