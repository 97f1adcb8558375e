//! Progress bars with rates and ETA (indicatif). On a terminal they redraw in place; when
//! stderr is a file or a pipe (nohup, Slurm, CI) the same bars are written as plain lines,
//! each with the time since start, at most once every `MASA_PROGRESS_EVERY` seconds (default
//! 30; the first drawing of a bar at once), so a log shows step/total, rate and ETA.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// Every bar is drawn through one `MultiProgress`, so `masa run`'s overall bar stays on top of
/// the bar of the stage it is running.
fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| {
        if std::io::stderr().is_terminal() {
            MultiProgress::new()
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::term_like_with_hz(Box::new(LogLines::new(log_interval())), 1))
        }
    })
}

/// `MASA_PROGRESS_EVERY` (seconds, may be fractional); 30 when unset or not a number ≥ 0.
fn log_interval() -> Duration {
    std::env::var("MASA_PROGRESS_EVERY")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(30), Duration::from_secs_f64)
}

/// A "terminal" for indicatif that turns each redraw of the bars into plain stderr lines: it
/// ignores cursor moves, collects the text of each bar (indicatif pads every line with spaces
/// to the width), and on `flush` writes the lines when the interval has passed since the last
/// write or a bar appears that was not there before.
#[derive(Debug)]
struct LogLines {
    start: Instant,
    every: Duration,
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    current: String,
    lines: Vec<String>,
    last: Option<Instant>,
    /// The first word of each bar written so far (a new stage's bar is written at once).
    seen: Vec<String>,
}

impl LogLines {
    fn new(every: Duration) -> LogLines {
        LogLines { start: Instant::now(), every, state: Mutex::new(LogState::default()) }
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        200
    }
    fn height(&self) -> u16 {
        50
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)?;
        self.write_str(" ")
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let text = s.trim_matches('\r');
        if text.trim().is_empty() {
            // The padding after a line: the line is complete.
            if !text.is_empty() && !st.current.trim().is_empty() {
                let line = std::mem::take(&mut st.current);
                st.lines.push(line.trim().to_string());
            }
        } else {
            st.current.push_str(text);
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.current.trim().is_empty() {
            let line = std::mem::take(&mut st.current);
            st.lines.push(line.trim().to_string());
        }
        let lines = std::mem::take(&mut st.lines);
        let now = Instant::now();
        let key = |l: &String| l.split_whitespace().next().unwrap_or("").to_string();
        let new_bar = lines.iter().any(|l| !st.seen.contains(&key(l)));
        let due = st.last.is_none_or(|t| now.duration_since(t) >= self.every);
        if lines.is_empty() || !(due || new_bar) {
            return Ok(());
        }
        st.last = Some(now);
        for l in &lines {
            let k = key(l);
            if !st.seen.contains(&k) {
                st.seen.push(k);
            }
        }
        let t = now.duration_since(self.start).as_secs();
        let mut err = std::io::stderr().lock();
        for l in lines {
            writeln!(err, "[{:02}:{:02}:{:02}] {l}", t / 3600, t / 60 % 60, t % 60)?;
        }
        err.flush()
    }
}

/// A pipeline-wide bar in estimated seconds of work, with the current stage as its message.
pub fn overall_bar(total_seconds: u64, msg: &str) -> ProgressBar {
    let bar = multi().add(ProgressBar::new(total_seconds));
    bar.set_style(
        ProgressStyle::with_template(&format!("{msg} [{{bar:30}}] {{percent}}% elapsed {{elapsed_precise}} eta {{work_eta}}  {{msg}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("##-")
            // The bar moves in jumps (a stage's estimated seconds when it ends), so indicatif's
            // own rate-based ETA decays between them (it printed "eta 3147y"): remaining work at
            // the average pace so far instead, unknown until the first stage ends.
            .with_key("work_eta", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let (pos, len, secs) = (s.pos(), s.len().unwrap_or(0), s.elapsed().as_secs_f64());
                let _ = if pos == 0 || pos >= len {
                    w.write_str("?")
                } else {
                    let rest = (secs * (len - pos) as f64 / pos as f64) as u64;
                    write!(w, "{}", indicatif::HumanDuration(std::time::Duration::from_secs(rest)))
                };
            }),
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
