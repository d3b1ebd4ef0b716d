//! Media formats a channel can carry, and the RTP clock each one runs at.
//!
//! Jitter (RFC 3550 A.8) and lateness are computed in nanoseconds, so an RTP timestamp difference
//! has to become nanoseconds once per packet. [`ClockRate`] does that with one widening multiply
//! by a precomputed 32.32 fixed-point factor: no division on the packet path, and exact for the
//! 8000 Hz clock of ulaw/alaw (125 000 ns per tick).

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// The codec of a channel, named as Asterisk names it in `externalMedia`'s `format` parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// G.711 µ-law, 8000 Hz RTP clock (RFC 3551 PT 0). Asterisk's externalMedia default.
    #[default]
    Ulaw,
    /// G.711 A-law, 8000 Hz RTP clock (RFC 3551 PT 8).
    Alaw,
    /// G.722: sampled at 16 kHz but clocked at 8000 Hz in RTP (RFC 3551 §4.5.2).
    G722,
    /// Signed linear 16-bit at 8 kHz.
    Slin,
    /// Signed linear 16-bit at 16 kHz.
    Slin16,
    /// Opus, always a 48 kHz RTP clock (RFC 7587 §4.1).
    Opus,
}

impl Format {
    /// Every format, for listings and tests.
    pub const ALL: [Self; 6] = [
        Self::Ulaw,
        Self::Alaw,
        Self::G722,
        Self::Slin,
        Self::Slin16,
        Self::Opus,
    ];

    /// The name Asterisk uses.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ulaw => "ulaw",
            Self::Alaw => "alaw",
            Self::G722 => "g722",
            Self::Slin => "slin",
            Self::Slin16 => "slin16",
            Self::Opus => "opus",
        }
    }

    /// The RTP timestamp clock of this format.
    #[must_use]
    pub const fn clock_rate(self) -> ClockRate {
        match self {
            Self::Ulaw | Self::Alaw | Self::G722 | Self::Slin => ClockRate::new(8_000),
            Self::Slin16 => ClockRate::new(16_000),
            Self::Opus => ClockRate::new(48_000),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name given is not a format this relay knows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown format {0:?} (known: ulaw, alaw, g722, slin, slin16, opus)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownFormat(s.to_owned()))
    }
}

/// An RTP timestamp clock, with the factor that turns its ticks into nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockRate {
    /// Ticks per second.
    hz: u32,
    /// Nanoseconds per tick in 32.32 fixed point.
    ns_per_tick_q32: u64,
}

impl ClockRate {
    /// A clock of `hz` ticks per second; `hz` of zero is taken as 1 so the factor stays finite.
    #[must_use]
    pub const fn new(hz: u32) -> Self {
        let hz = if hz == 0 { 1 } else { hz };
        Self {
            hz,
            ns_per_tick_q32: (1_000_000_000u64 << 32) / hz as u64,
        }
    }

    /// Ticks per second.
    #[must_use]
    pub const fn hz(self) -> u32 {
        self.hz
    }

    /// `ticks` of this clock in nanoseconds, rounded toward negative infinity, saturating.
    #[must_use]
    pub fn ticks_to_nanos(self, ticks: i64) -> i64 {
        let wide = (i128::from(ticks) * i128::from(self.ns_per_tick_q32)) >> 32;
        i64::try_from(wide).unwrap_or(if wide < 0 { i64::MIN } else { i64::MAX })
    }
}

/// Clock rates and names: ulaw's ticks exact, Opus's within a nanosecond over an hour; names round
/// trip, an unknown one is an error.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_ticks_are_exact() {
        let c = Format::Ulaw.clock_rate();
        assert_eq!(c.hz(), 8_000);
        assert_eq!(c.ticks_to_nanos(160), 20_000_000);
        assert_eq!(c.ticks_to_nanos(-160), -20_000_000);
        assert_eq!(c.ticks_to_nanos(8_000 * 86_400), 86_400_000_000_000);
    }

    #[test]
    fn opus_ticks_are_within_a_nanosecond() {
        let c = Format::Opus.clock_rate();
        assert!((c.ticks_to_nanos(960) - 20_000_000).abs() <= 1);
        assert!((c.ticks_to_nanos(48_000 * 3_600) - 3_600_000_000_000).abs() <= 1);
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for f in Format::ALL {
            assert_eq!(f.as_str().parse::<Format>(), Ok(f));
        }
        assert_eq!(
            "speex".parse::<Format>(),
            Err(UnknownFormat("speex".into()))
        );
    }
}
