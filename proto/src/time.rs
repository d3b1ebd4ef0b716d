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

/// `MonoTime`'s arithmetic saturates instead of wrapping.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        let t = MonoTime::from_nanos(5);
        assert_eq!(t.nanos_since(MonoTime::from_nanos(7)), 0);
        assert_eq!(MonoTime::from_nanos(9).nanos_since(t), 4);
        assert_eq!((t + Duration::MAX).as_nanos(), u64::MAX);
        assert_eq!((t + Duration::from_micros(2)).as_nanos(), 2_005);
    }
}
