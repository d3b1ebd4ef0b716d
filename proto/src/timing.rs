//! Interarrival jitter (RFC 3550 A.8) and lateness, per direction of a channel.
//!
//! Both compare when a packet arrived with when its RTP timestamp says it was sampled. The
//! *transit* of a packet is `arrival − timestamp`, with the timestamp unwrapped (its 32 bits wrap
//! every 6.2 days at 8 kHz, and a stream may start anywhere) and turned into nanoseconds by the
//! channel's [`ClockRate`].
//!
//! **Jitter** is A.8's running estimate: `J += (|D| − J) / 16`, where `D` is the change in transit
//! between consecutive arrivals. It is kept in nanoseconds (×16 internally, as in A.8's integer
//! form) and can be reported in timestamp units for RTCP.
//!
//! **Lateness** of a packet is how much longer its transit is than the stream's *baseline*
//! transit, and the packet is *late* when that exceeds a threshold (default 40 ms). The baseline is
//! the smallest transit seen in the current window and the one before it (default window 10 s), so
//! it is the best the path has recently done. Why windowed: an all-time minimum would let a
//! sender clock that runs slow against ours (every real one does, by tens of ppm) accumulate into
//! ever-growing false lateness; with windows, drift of `r` contributes at most `2·W·r` (2 ms at
//! 100 ppm and W = 10 s), never more, however long the call. A step change of the path's delay
//! becomes the new baseline within two windows, as a receiver's adaptive jitter buffer would
//! adapt. After a pause longer than two windows the baseline starts afresh.

use core::time::Duration;

use crate::format::ClockRate;
use crate::time::{duration_nanos, MonoTime};

/// Lateness settings shared by every stream of a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatenessConfig {
    /// A packet whose transit exceeds the baseline by more than this is late.
    pub threshold: Duration,
    /// Length of one baseline window.
    pub window: Duration,
}

impl Default for LatenessConfig {
    fn default() -> Self {
        Self {
            threshold: Duration::from_millis(40),
            window: Duration::from_secs(10),
        }
    }
}

/// What timing learned from one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimingSample {
    /// The jitter estimate after this packet, in nanoseconds.
    pub jitter_ns: u64,
    /// Transit above the baseline, in nanoseconds (0 for the packet that sets the baseline).
    pub lateness_ns: u64,
    /// Whether `lateness_ns` exceeds the threshold.
    pub late: bool,
}

/// Jitter and lateness state of one stream.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Converts timestamp ticks to nanoseconds.
    clock: ClockRate,
    /// Threshold in nanoseconds.
    threshold_ns: u64,
    /// Window length in nanoseconds.
    window_ns: u64,
    /// Whether a packet has been seen since the last reset.
    started: bool,
    /// The last raw timestamp, for unwrapping the next.
    last_ts: u32,
    /// The last timestamp unwrapped, in ticks since the stream's first packet.
    ts_ext: i64,
    /// The last packet's transit in nanoseconds (arbitrary origin; only differences matter).
    last_transit: i64,
    /// The jitter estimate ×16, in nanoseconds (A.8's integer form).
    jitter16: i64,
    /// When the current window started.
    window_start: MonoTime,
    /// Smallest transit in the current window.
    min_current: i64,
    /// Smallest transit in the previous window.
    min_previous: i64,
    /// Late packets.
    late: u64,
    /// Largest lateness seen, in nanoseconds.
    max_lateness_ns: u64,
}

impl Timing {
    /// Timing for a stream on `clock`.
    #[must_use]
    pub fn new(clock: ClockRate, lateness: LatenessConfig) -> Self {
        Self {
            clock,
            threshold_ns: duration_nanos(lateness.threshold),
            window_ns: duration_nanos(lateness.window).max(1),
            started: false,
            last_ts: 0,
            ts_ext: 0,
            last_transit: 0,
            jitter16: 0,
            window_start: MonoTime::ZERO,
            min_current: i64::MAX,
            min_previous: i64::MAX,
            late: 0,
            max_lateness_ns: 0,
        }
    }

    /// Forgets the stream (its source changed); counters are kept.
    pub fn reset(&mut self) {
        self.started = false;
        self.jitter16 = 0;
        self.min_current = i64::MAX;
        self.min_previous = i64::MAX;
    }

    /// Accounts one arrival of a packet carrying RTP timestamp `ts`.
    pub fn update(&mut self, now: MonoTime, ts: u32) -> TimingSample {
        let arrival = i64::try_from(now.as_nanos()).unwrap_or(i64::MAX);
        if self.started {
            // Reinterpreting the wrapped difference as signed unwraps across the 2^32 wrap and
            // keeps reordered packets (negative differences) in place.
            #[allow(clippy::cast_possible_wrap)] // intended: two's-complement difference
            let delta = ts.wrapping_sub(self.last_ts) as i32;
            self.ts_ext += i64::from(delta);
        } else {
            self.ts_ext = 0;
            self.window_start = now;
        }
        self.last_ts = ts;
        let transit = arrival.saturating_sub(self.clock.ticks_to_nanos(self.ts_ext));

        if self.started {
            let d = transit.saturating_sub(self.last_transit).saturating_abs();
            self.jitter16 += d - ((self.jitter16 + 8) >> 4);
        }
        self.last_transit = transit;

        let since = now.nanos_since(self.window_start);
        if since >= self.window_ns {
            self.min_previous = if since >= 2 * self.window_ns {
                i64::MAX
            } else {
                self.min_current
            };
            self.min_current = i64::MAX;
            self.window_start = now;
        }
        self.min_current = self.min_current.min(transit);
        self.started = true;

        let baseline = self.min_current.min(self.min_previous);
        let lateness_ns = u64::try_from(transit.saturating_sub(baseline)).unwrap_or(0);
        let late = lateness_ns > self.threshold_ns;
        self.late += u64::from(late);
        self.max_lateness_ns = self.max_lateness_ns.max(lateness_ns);
        TimingSample {
            jitter_ns: self.jitter_ns(),
            lateness_ns,
            late,
        }
    }

    /// The jitter estimate in nanoseconds.
    #[must_use]
    pub fn jitter_ns(&self) -> u64 {
        u64::try_from(self.jitter16 >> 4).unwrap_or(0)
    }

    /// The jitter estimate in timestamp units, as RTCP reports it (RFC 3550 §6.4.1).
    #[must_use]
    pub fn jitter_ticks(&self) -> u64 {
        self.jitter_ns() * u64::from(self.clock.hz()) / 1_000_000_000
    }

    /// Late packets so far.
    #[must_use]
    pub const fn late(&self) -> u64 {
        self.late
    }

    /// Largest lateness so far, in nanoseconds.
    #[must_use]
    pub const fn max_lateness_ns(&self) -> u64 {
        self.max_lateness_ns
    }
}

/// Jitter and lateness: a steady stream has neither; jitter follows RFC 3550 A.8's estimate packet
/// by packet for an alternating delay; lateness is measured from the best recent transit; the RTP
/// timestamp's wrap is unwrapped; with the sender's clock 100 ppm slow for an hour, lateness stays
/// within 2 ms and nothing is late.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Format;

    const MS: u64 = 1_000_000;

    fn timing() -> Timing {
        Timing::new(Format::Ulaw.clock_rate(), LatenessConfig::default())
    }

    #[test]
    fn steady_stream_has_no_jitter_and_nothing_late() {
        let mut t = timing();
        for i in 0..500u32 {
            let s = t.update(
                MonoTime::from_nanos(1_000 * MS + u64::from(i) * 20 * MS),
                160 * i,
            );
            assert_eq!(s.jitter_ns, 0);
            assert_eq!(s.lateness_ns, 0);
        }
        assert_eq!(t.late(), 0);
    }

    #[test]
    fn jitter_follows_a8_for_alternating_delay() {
        // Transit alternates 0 / +2 ms, so |D| = 2 ms every packet: J converges to 2 ms.
        let mut t = timing();
        let mut j = 0f64;
        for i in 0..400u32 {
            let extra = if i % 2 == 1 { 2 * MS } else { 0 };
            let s = t.update(
                MonoTime::from_nanos(u64::from(i) * 20 * MS + extra),
                160 * i,
            );
            if i > 0 {
                j += (2e6 - j) / 16.0;
            }
            assert!(
                (s.jitter_ns as f64 - j).abs() <= 16.0,
                "i={i} {} vs {j}",
                s.jitter_ns
            );
        }
        assert!(t.jitter_ns().abs_diff(2_000_000) < 1_000);
        assert_eq!(
            t.jitter_ticks(),
            15,
            "2 ms at 8 kHz is 16 ticks, truncated below"
        );
    }

    #[test]
    fn lateness_is_measured_from_the_best_recent_transit() {
        let mut t = timing();
        let at = |i: u64, extra: u64| MonoTime::from_nanos(i * 20 * MS + extra);
        let ts = |i: u64| u32::try_from(160 * i).unwrap();
        assert!(!t.update(at(0, 0), ts(0)).late);
        let s = t.update(at(1, 41 * MS), ts(1));
        assert_eq!(s.lateness_ns, 41 * MS);
        assert!(s.late);
        let s = t.update(at(2, 39 * MS), ts(2));
        assert!(!s.late);
        assert_eq!(t.late(), 1);
        assert_eq!(t.max_lateness_ns(), 41 * MS);
    }

    #[test]
    fn timestamp_wrap_is_unwrapped() {
        let mut t = timing();
        let start = u32::MAX - 159;
        let _ = t.update(MonoTime::from_nanos(0), start);
        let s = t.update(MonoTime::from_nanos(20 * MS), start.wrapping_add(160));
        assert_eq!(s.lateness_ns, 0);
        assert_eq!(s.jitter_ns, 0);
    }

    #[test]
    fn sender_clock_drift_does_not_accumulate() {
        // The sender's clock runs 100 ppm slow against ours: each packet arrives 2 µs later
        // than the last one predicted. Over an hour that is 360 ms; lateness must stay ≤ 2·W·r.
        let mut t = timing();
        let mut max_tail = 0;
        for i in 0..180_000u64 {
            let now = MonoTime::from_nanos(i * 20 * MS + i * 2_000);
            let s = t.update(now, u32::try_from((160 * i) % (1 << 32)).unwrap());
            if i > 1_000 {
                max_tail = max_tail.max(s.lateness_ns);
            }
        }
        assert_eq!(t.late(), 0);
        assert!(
            max_tail <= 2 * 10_000 * MS / 10_000,
            "max lateness {max_tail} ns"
        );
    }
}
