//! How numbers read in the report: token counts, durations, dates, mean ± std.

use super::aggregate::Summary;

/// Shown where a number does not exist (no value, a single seed's std).
pub const NONE: &str = "–";

/// Token counts with a unit suffix: `512`, `64k`, `3.2M`, `10M`, `1.5B`.
pub fn tokens(t: f64) -> String {
    if !t.is_finite() {
        return NONE.into();
    }
    let (v, unit) = match t.abs() {
        a if a >= 1e9 => (t / 1e9, "B"),
        a if a >= 1e6 => (t / 1e6, "M"),
        a if a >= 1e3 => (t / 1e3, "k"),
        _ => (t, ""),
    };
    let s = if (v - v.round()).abs() < 0.05 || v.abs() >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") };
    format!("{s}{unit}")
}

/// A number with `decimals` decimals, or [`NONE`] when it is not finite.
pub fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        NONE.into()
    }
}

/// `mean ± std` (std [`NONE`] for a single seed), or [`NONE`] for no value.
pub fn mean_std(s: Option<Summary>, decimals: usize) -> String {
    match s {
        None => NONE.into(),
        Some(s) => format!("{} ± {}", num(s.mean, decimals), s.std.map_or(NONE.into(), |d| num(d, decimals))),
    }
}

/// Seconds as `45 s`, `12 min 5 s`, `3 h 02 min`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return NONE.into();
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{secs:.1} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM UTC` (0: [`NONE`]).
pub fn utc_date(unix: u64) -> String {
    if unix == 0 {
        return NONE.into();
    }
    let (days, rem) = (unix / 86_400, unix % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, (rem % 3600) / 60)
}

/// Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A file-name-safe form of `s`: ASCII letters, digits, `.` and `-`; everything else `-`.
pub fn slug(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c.to_ascii_lowercase() } else { '-' }).collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_read_with_units() {
        assert_eq!(tokens(512.0), "512");
        assert_eq!(tokens(64_000.0), "64k");
        assert_eq!(tokens(3_200_000.0), "3.2M");
        assert_eq!(tokens(10_000_000.0), "10M");
        assert_eq!(tokens(250_000_000.0), "250M");
        assert_eq!(tokens(f64::NAN), NONE);
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
    }

    #[test]
    fn slugs_are_file_names() {
        assert_eq!(slug("configs/My Student.toml"), "configs-my-student.toml");
        assert_eq!(slug("cpu-6l-256"), "cpu-6l-256");
    }

    #[test]
    fn single_seed_std_is_a_dash() {
        let s = super::super::aggregate::summarize(&[6.5]);
        assert_eq!(mean_std(s, 3), "6.500 ± –");
        assert_eq!(mean_std(None, 3), "–");
    }
}
