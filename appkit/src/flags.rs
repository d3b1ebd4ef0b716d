//! Flag values every binary parses the same way. Durations come from `humantime` (`20ms`,
//! `1.5s`, `2m`, `1s 500ms`), with one convenience of our own that the binaries have always
//! taken: a bare number is seconds (`--hold 60`).

use std::time::Duration;

/// Parses a duration flag: a number and a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`/`min`, `h`, and
/// combinations such as `1m 30s`), or a bare number of seconds.
///
/// # Errors
/// A message saying what was expected, naming the text.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bare = !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.');
    let parsed = if bare {
        humantime::parse_duration(&format!("{t}s"))
    } else {
        humantime::parse_duration(t)
    };
    parsed.map_err(|e| format!("{text:?} is not a duration such as 20ms, 1.5s or 2m ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1_500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1s 500ms"), Ok(Duration::from_millis(1_500)));
        for bad in ["", "ms", "-1s", "5 parsecs", "1e3s", "1.2.3s", "1.2.3"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
