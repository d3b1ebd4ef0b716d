//! Monotonic time as a plain value.
//!
//! The core never reads a clock: every function that changes state takes `now`. A [`MonoTime`]
//! is nanoseconds on some monotonic clock with an arbitrary origin (the I/O layer uses
//! `CLOCK_MONOTONIC`; tests start a virtual clock at zero). Being a `u64`, it is `Copy`, cheap to
//! compare, and exact, so a test can assert a round-trip time to the nanosecond.

use core::ops::Add;
use core::time::Duration;

/// An instant on the monotonic clock, in nanoseconds since the clock's origin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MonoTime(u64);

impl MonoTime {
    /// The clock's origin.
    pub const ZERO: Self = Self(0);

    /// The instant `nanos` nanoseconds after the clock's origin.
    #[must_use]
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// Nanoseconds since the clock's origin.
    #[must_use]
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Nanoseconds from `earlier` to `self`; zero when `earlier` is later.
    #[must_use]
    pub const fn nanos_since(self, earlier: Self) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Time from `earlier` to `self`; zero when `earlier` is later.
    #[must_use]
    pub const fn saturating_duration_since(self, earlier: Self) -> Duration {
        Duration::from_nanos(self.nanos_since(earlier))
    }
}

impl Add<Duration> for MonoTime {
    type Output = Self;

    /// Saturates at the end of the clock (584 years after its origin) rather than wrapping.
    fn add(self, rhs: Duration) -> Self {
        Self(self.0.saturating_add(duration_nanos(rhs)))
    }
}

/// A duration in whole nanoseconds, saturating at `u64::MAX` (584 years).
#[must_use]
pub fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Parses a duration as the binaries' flags take it: a number and a unit, `ns`, `us`, `ms`, `s`
/// or `m` (`20ms`, `1.5s`, `2m`); a bare number is seconds.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ns, us, ms, s or m)"
            ))
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 20ms, 1.5s or 2m"))?;
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("{text:?}: {e}"))
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
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        for bad in ["", "ms", "-1s", "5 parsecs", "1e3s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        let t = MonoTime::from_nanos(5);
        assert_eq!(t.nanos_since(MonoTime::from_nanos(7)), 0);
        assert_eq!(MonoTime::from_nanos(9).nanos_since(t), 4);
        assert_eq!((t + Duration::MAX).as_nanos(), u64::MAX);
        assert_eq!((t + Duration::from_micros(2)).as_nanos(), 2_005);
    }
}
