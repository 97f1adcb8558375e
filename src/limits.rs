//! The ranges of numeric inputs, in one place for the CLI and `masa run` specs alike: every
//! library entry point (calibrate, extract, train, finetune, eval, bench) checks its options
//! with these before any work, and a spec's stages call the same entry points, so an option
//! and the spec field that sets it are refused with the same message, naming the option, the
//! value and the valid range (docs/errors.md lists them).

use std::ops::RangeInclusive;

use crate::{MasaError, Result};

/// The largest token budget any option accepts (calibration, pre-training): 10¹², far above
/// the paper's 10B, low enough that a typo (or `u64::MAX`) is refused instead of running for ever.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;

/// The largest batch (sequences per step) and gradient accumulation: beyond this, memory runs
/// out before the first step on any machine masa targets.
pub const MAX_BATCH: usize = 4096;

/// The largest count of steps or iterations a loop option accepts (benchmarks, epochs,
/// alignment iterations): a typo is refused instead of running for days.
pub const MAX_STEPS: usize = 100_000_000;

/// `value` must lie in `range`; `why` (may be empty) says where the bound comes from, e.g.
/// "the model's positions". Message: `--seq 0: must be in 1..=8192 (the model's positions)`.
pub fn in_range(option: &str, value: u64, range: RangeInclusive<u64>, why: &str) -> Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    let why = if why.is_empty() { String::new() } else { format!(" ({why})") };
    Err(MasaError::Invalid(format!("{option} {value}: must be in {}..={}{why}", range.start(), range.end())))
}

/// A count in `1..=max` (0 is meaningless: no tokens, no sequences, no iterations).
pub fn count(option: &str, value: usize, max: usize, why: &str) -> Result<()> {
    in_range(option, value as u64, 1..=max as u64, why)
}

/// A finite number ≥ 0 (NaN, ±Inf and negatives refused).
pub fn non_negative(option: &str, value: f64) -> Result<()> {
    if value >= 0.0 && value.is_finite() {
        return Ok(());
    }
    Err(MasaError::Invalid(format!("{option} {value}: must be a finite number ≥ 0")))
}

/// A finite number > 0 (learning rates, temperatures that divide).
pub fn positive(option: &str, value: f64) -> Result<()> {
    if value > 0.0 && value.is_finite() {
        return Ok(());
    }
    Err(MasaError::Invalid(format!("{option} {value}: must be a positive finite number")))
}

/// An M/W parameter ratio ρ in `(0, 1]` (NaN refused).
pub fn ratio(option: &str, value: f64) -> Result<()> {
    if value > 0.0 && value <= 1.0 {
        return Ok(());
    }
    Err(MasaError::Invalid(format!("{option} {value}: must be in (0, 1]")))
}

/// Worker threads: `1..=8 × the cores here` (more only starves the machine).
pub fn threads(n: usize) -> Result<()> {
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    count("--threads", n, 8 * cores, &format!("8 × the {cores} cores here"))
}

/// This machine's memory (`MemTotal` of /proc/meminfo), in bytes; `None` where unknown.
pub fn memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A fraction in `[0, 1]` (NaN refused).
pub fn fraction(option: &str, value: f64) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        return Ok(());
    }
    Err(MasaError::Invalid(format!("{option} {value}: must be in [0, 1]")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_option_value_and_range() {
        count("--seq", 16, 64, "").unwrap();
        let e = count("--seq", 0, 8192, "the model's positions").unwrap_err().to_string();
        assert_eq!(e, "--seq 0: must be in 1..=8192 (the model's positions)");
        assert_eq!(count("--batch", 5000, MAX_BATCH, "").unwrap_err().to_string(), "--batch 5000: must be in 1..=4096");
        for v in [f64::NAN, f64::INFINITY, -1.0] {
            assert!(non_negative("--clip", v).unwrap_err().to_string().starts_with(&format!("--clip {v}: ")));
            assert!(positive("--lr", v).is_err());
            assert!(fraction("--alpha", v).is_err());
        }
        non_negative("--clip", 0.0).unwrap();
        assert!(positive("--lr", 0.0).unwrap_err().to_string().contains("--lr 0: must be a positive finite number"));
        fraction("--alpha", 1.0).unwrap();
    }

    /// `--ratio` and `--rank` for calibrate and extract (one parser, `RankSpec::from_options`),
    /// `--threads` for every command.
    #[test]
    fn rank_ratio_and_threads_have_ranges() {
        use crate::align::RankSpec;
        assert_eq!(RankSpec::from_options(Some(8), Some(0.5)).unwrap(), Some(RankSpec::Rank(8)));
        assert_eq!(RankSpec::from_options(None, Some(1.0)).unwrap(), Some(RankSpec::Ratio(1.0)));
        assert_eq!(RankSpec::from_options(None, None).unwrap(), None);
        for (rank, ratio, want) in [
            (None, Some(2.0), "--ratio 2: must be in (0, 1]"),
            (None, Some(f64::NAN), "--ratio NaN: must be in (0, 1]"),
            (None, Some(0.0), "--ratio 0: must be in (0, 1]"),
            (Some(0), None, "--rank 0: must be in 1..="),
        ] {
            let e = RankSpec::from_options(rank, ratio).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
        threads(1).unwrap();
        assert!(threads(0).unwrap_err().to_string().starts_with("--threads 0: must be in 1..="));
        assert!(threads(100_000).unwrap_err().to_string().contains("cores here)"));
    }
}
