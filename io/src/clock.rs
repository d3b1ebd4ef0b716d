//! One clock for every measurement: the kernel stamps received packets with `CLOCK_REALTIME`
//! (which NTP or an operator may step), while the relay's core and the tools keep
//! `CLOCK_MONOTONIC` (which never jumps). [`Clock`] reads the monotonic clock; [`WallToMono`]
//! converts kernel stamps to it with one anchored realtime − monotonic offset, checked every
//! batch.
//!
//! **Error bound.** The offset is sampled as (monotonic, realtime, monotonic) and the realtime
//! reading is taken to belong to the middle of the two monotonic ones, so one sample is off by at
//! most half the time between the two monotonic reads (reported as [`WallToMono::uncertainty_ns`],
//! typically 20–60 ns through the vDSO). The offset itself does not move as NTP slews (both clocks
//! are slewed alike), only when the wall clock is set: so the anchor is kept while samples agree
//! with it, every stamp converts with the same offset, and a difference of two stamps is exact.
//! A sample whose interval does not meet the anchor's shows the offset moved and takes over; a
//! tighter one refines it.
//!
//! **Preemption.** A thread preempted between the three reads of a sample (a real-time process
//! sharing its core does that often) would take an offset off by up to half the time it was
//! away: hundreds of microseconds. So [`Clock::sample`] keeps the tightest of a few tries, and
//! [`WallToMono::resample`] keeps the previous offset when a sample is still wider than
//! [`MAX_WINDOW_NS`] (only the time it was taken moves on), rather than let one preemption bend
//! every stamp of a batch.
//!
//! **Steps.** A change of the offset by more than [`STEP_BOUND_NS`] between two samples is a step
//! of the wall clock, not a slew. It is counted, and the packets stamped around it cannot be
//! trusted (the kernel may have stamped them before the step and we convert after it): for the
//! batch in which a step is seen, and for any single stamp that converts to a time in the future
//! or more than [`MAX_AGE_NS`] in the past, [`WallToMono::to_mono`] answers `None`: the caller
//! takes a receive stamp's packet at the time it handled it, and counts a transmit stamp as
//! missing (`clock_step`). A wide (preempted) sample still sees a step.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::cmsg::WallTime;

/// Largest change of the realtime − monotonic offset between two samples that is still a slew:
/// 1 ms. NTP slews at most 500 ppm, 1 ms only over 2 s without a sample, which a running data
/// plane never goes (its timer wakes it every 100 ms or sooner).
pub const STEP_BOUND_NS: u64 = 1_000_000;

/// Widest sample (monotonic after − before) whose offset is taken: reading the clocks through
/// the vDSO takes tens of nanoseconds, so a wider one was preempted or interrupted.
pub const MAX_WINDOW_NS: u64 = 4_000;

/// How far after the sample a converted stamp may fall and still be taken as one that preceded it
/// (the conversion's own error), well under a step.
const FUTURE_SLACK_NS: u64 = 2_000;

/// Tries [`Clock::sample`] makes for a sample within [`MAX_WINDOW_NS`].
const SAMPLE_TRIES: usize = 3;

/// Oldest a kernel stamp may be, relative to the sample, before it is rejected: 10 s. A datagram
/// waits in a socket buffer for milliseconds at worst; anything older is a clock step.
pub const MAX_AGE_NS: u64 = 10_000_000_000;

/// The monotonic clock, in nanoseconds since the clock was made (its origin is arbitrary, as
/// the core's `MonoTime` allows).
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// The origin.
    base: Instant,
}

impl Clock {
    /// A clock starting now.
    #[must_use]
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    /// Nanoseconds since the origin.
    #[must_use]
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// One sample of both clocks: (monotonic before, realtime, monotonic after), the tightest
    /// of up to three (it stops at the first within [`MAX_WINDOW_NS`]).
    #[must_use]
    pub fn sample(&self) -> Sample {
        let mut best = self.sample_once();
        for _ in 1..SAMPLE_TRIES {
            if best.mono_after - best.mono_before <= MAX_WINDOW_NS {
                break;
            }
            let s = self.sample_once();
            if s.mono_after - s.mono_before < best.mono_after - best.mono_before {
                best = s;
            }
        }
        best
    }

    fn sample_once(&self) -> Sample {
        let before = self.now_ns();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let after = self.now_ns();
        Sample {
            mono_before: before,
            wall: WallTime(wall),
            mono_after: after,
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Both clocks read back to back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Monotonic nanoseconds just before the realtime read.
    pub mono_before: u64,
    /// The realtime read.
    pub wall: WallTime,
    /// Monotonic nanoseconds just after it.
    pub mono_after: u64,
}

/// Converts kernel (realtime) stamps to monotonic time.
#[derive(Clone, Copy, Debug, Default)]
pub struct WallToMono {
    /// realtime − monotonic, nanoseconds: the anchor every stamp converts with (`None` before
    /// the first sample).
    offset: Option<i128>,
    /// Half the window of the sample the anchor came from: the true offset lies within
    /// `offset ± offset_uncertainty`.
    offset_uncertainty: u64,
    /// The monotonic time of the last sample (its midpoint).
    at: u64,
    /// Half the last sample's window.
    uncertainty: u64,
    /// The last sample saw a step: stamps are not converted until the next one.
    stepped: bool,
    /// Steps seen.
    steps: u64,
    /// Samples too wide to take an offset from.
    noisy: u64,
}

impl WallToMono {
    /// A converter with no sample yet.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            offset: None,
            offset_uncertainty: 0,
            at: 0,
            uncertainty: 0,
            stepped: false,
            steps: 0,
            noisy: 0,
        }
    }

    /// Takes a new sample (once per batch, before its completions are handled); true when it
    /// shows a step of the wall clock. A sample wider than [`MAX_WINDOW_NS`] (the thread was
    /// preempted between its reads) only says when it was taken: the previous offset stays.
    pub fn resample(&mut self, s: Sample) -> bool {
        let window = s.mono_after.saturating_sub(s.mono_before);
        let mid = s.mono_before / 2 + s.mono_after / 2 + (s.mono_before % 2 + s.mono_after % 2) / 2;
        let offset = i128::from(s.wall.0) - i128::from(mid);
        let half = window.div_ceil(2);
        if let Some(anchor) = self.offset.filter(|_| window > MAX_WINDOW_NS) {
            // Too wide to take an offset from, but not to see a step: one that moves the offset
            // by more than a step even allowing for the whole window.
            if (offset - anchor).unsigned_abs() > u128::from(STEP_BOUND_NS + half) {
                self.stepped = true;
                self.steps += 1;
                self.offset = Some(offset);
                self.offset_uncertainty = half;
                self.at = mid;
                self.uncertainty = half;
                return true;
            }
            self.at = s.mono_after;
            self.uncertainty = 0;
            self.stepped = false;
            self.noisy += 1;
            return false;
        }
        self.at = mid;
        self.uncertainty = half;
        self.stepped = false;
        // realtime − monotonic does not change as NTP slews (both clocks are slewed alike), only
        // when the wall clock is set: the anchor is kept, so that every stamp converts with the
        // same offset and differences of stamps are exact, unless this sample shows it moved
        // (its interval and the anchor's do not meet) or pins it down more tightly.
        match self.offset {
            Some(anchor) => {
                let moved = (offset - anchor).unsigned_abs();
                if moved > u128::from(STEP_BOUND_NS) {
                    self.stepped = true;
                    self.steps += 1;
                    self.offset = Some(offset);
                    self.offset_uncertainty = half;
                } else if moved > u128::from(self.offset_uncertainty + half)
                    || half < self.offset_uncertainty
                {
                    self.offset = Some(offset);
                    self.offset_uncertainty = half;
                }
            }
            None => {
                self.offset = Some(offset);
                self.offset_uncertainty = half;
            }
        }
        self.stepped
    }

    /// Kernel stamp `t` in monotonic nanoseconds, or `None` when it cannot be trusted (no sample
    /// yet, a step in this batch, or a result in the future or older than [`MAX_AGE_NS`]).
    #[must_use]
    pub fn to_mono(&self, t: WallTime) -> Option<u64> {
        let offset = self.offset.filter(|_| !self.stepped)?;
        let mono = u64::try_from(i128::from(t.0) - offset).ok()?;
        // The packet arrived before the sample was taken, give or take the uncertainty of the
        // sample and of the anchor it converts with (a stamp taken just before the sample can
        // convert to just after it), and a little more: a step is a millisecond or more.
        let latest = self
            .at
            .saturating_add(self.uncertainty + self.offset_uncertainty + FUTURE_SLACK_NS);
        (mono <= latest && latest - mono <= MAX_AGE_NS).then_some(mono)
    }

    /// The realtime − monotonic offset stamps convert with, nanoseconds (`None` before the first
    /// sample): a stamp [`WallToMono::to_mono`] converted is that time plus this offset again,
    /// exactly, as long as the offset has not moved since (a new sample after a step, or a
    /// tighter one refining it by nanoseconds).
    #[must_use]
    pub const fn offset_ns(&self) -> Option<i128> {
        self.offset
    }

    /// Steps seen so far.
    #[must_use]
    pub const fn steps(&self) -> u64 {
        self.steps
    }

    /// Samples so far too wide to take an offset from (preempted between their reads).
    #[must_use]
    pub const fn noisy(&self) -> u64 {
        self.noisy
    }

    /// Half the last sample's window: the conversion's error bound, nanoseconds.
    #[must_use]
    pub const fn uncertainty_ns(&self) -> u64 {
        self.uncertainty
    }
}

/// The wall-to-monotonic conversion: exact with a steady offset, NTP slew followed without a step;
/// samples that agree within their uncertainty leave the anchor alone, a tighter one refines it; a
/// step back or forward is counted and its batch's stamps never converted, the next sample's offset
/// then holds; a preempted (wide) sample keeps the offset and still sees a step; stamps from the
/// future or the distant past (11 s old, before the monotonic origin) are refused; and the real
/// clocks agree with themselves.
#[cfg(test)]
mod tests {
    use super::*;

    /// A sample where the wall clock reads `wall_at_zero + mono` at monotonic `mono`.
    fn sample(mono: u64, wall_at_zero: u64) -> Sample {
        Sample {
            mono_before: mono - 20,
            wall: WallTime(wall_at_zero + mono),
            mono_after: mono + 20,
        }
    }

    const EPOCH: u64 = 1_764_600_000_000_000_000;

    #[test]
    fn stamps_convert_exactly_with_a_steady_offset() {
        let mut c = WallToMono::new();
        assert_eq!(c.to_mono(WallTime(EPOCH)), None, "no sample yet");
        assert!(!c.resample(sample(5_000_000, EPOCH)));
        // A packet stamped 1.234 ms before the sample.
        assert_eq!(c.to_mono(WallTime(EPOCH + 3_766_000)), Some(3_766_000));
        assert_eq!(
            c.offset_ns(),
            Some(i128::from(EPOCH)),
            "mono + offset = the stamp"
        );
        assert_eq!(c.uncertainty_ns(), 20);
        // NTP slewing by 100 µs between samples is not a step, and is followed.
        assert!(!c.resample(sample(105_000_000, EPOCH + 100_000)));
        assert_eq!(
            c.to_mono(WallTime(EPOCH + 100_000 + 100_000_000)),
            Some(100_000_000)
        );
        assert_eq!(c.steps(), 0);
    }

    #[test]
    fn samples_that_agree_with_the_anchor_leave_it_alone() {
        let mut c = WallToMono::new();
        assert!(!c.resample(sample(5_000_000, EPOCH)));
        let t = WallTime(EPOCH + 4_000_000);
        // A sample whose realtime read came late in its window says the offset is 15 ns more:
        // within both samples' uncertainty (20 ns each), so nothing moves and every stamp keeps
        // converting as before.
        assert!(!c.resample(Sample {
            mono_before: 6_000_000 - 20,
            wall: WallTime(EPOCH + 6_000_015),
            mono_after: 6_000_000 + 20,
        }));
        assert_eq!(c.to_mono(t), Some(4_000_000));
        // A tighter sample refines it.
        assert!(!c.resample(Sample {
            mono_before: 7_000_000 - 2,
            wall: WallTime(EPOCH + 7_000_005),
            mono_after: 7_000_000 + 2,
        }));
        assert_eq!(c.to_mono(t), Some(3_999_995));
    }

    #[test]
    fn a_wall_clock_step_is_counted_and_never_becomes_a_time() {
        let mut c = WallToMono::new();
        c.resample(sample(1_000_000_000, EPOCH));
        // The wall clock jumps back by one hour between two batches.
        let back = EPOCH - 3_600_000_000_000;
        assert!(c.resample(sample(1_100_000_000, back)));
        assert_eq!(c.steps(), 1);
        // Packets of this batch, stamped before or after the jump, are not converted.
        assert_eq!(c.to_mono(WallTime(EPOCH + 1_099_000_000)), None);
        assert_eq!(c.to_mono(WallTime(back + 1_099_000_000)), None);
        // From the next sample on, the new offset holds.
        assert!(!c.resample(sample(1_200_000_000, back)));
        assert_eq!(
            c.to_mono(WallTime(back + 1_199_000_000)),
            Some(1_199_000_000)
        );
        // A forward jump is a step too.
        assert!(c.resample(sample(1_300_000_000, back + 5_000_000)));
        assert_eq!(c.steps(), 2);
    }

    #[test]
    fn a_preempted_sample_keeps_the_offset_and_moves_the_time_on() {
        let mut c = WallToMono::new();
        assert!(!c.resample(sample(5_000_000, EPOCH)));
        // Preempted for 600 µs between the first monotonic read and the realtime one: its
        // midpoint would put the offset 300 µs off.
        let wide = Sample {
            mono_before: 10_000_000,
            wall: WallTime(EPOCH + 10_600_000),
            mono_after: 10_600_050,
        };
        assert!(!c.resample(wide));
        assert_eq!(c.noisy(), 1);
        // A wide sample still sees a step (here the wall clock set back an hour).
        let mut d = c;
        assert!(d.resample(Sample {
            mono_before: 10_000_000,
            wall: WallTime(EPOCH - 3_600_000_000_000 + 10_600_000),
            mono_after: 10_600_050,
        }));
        assert_eq!(d.steps(), 1);
        // A stamp taken just before the wide sample converts exactly, with the old offset, and
        // is not refused as coming from the future.
        assert_eq!(c.to_mono(WallTime(EPOCH + 10_500_000)), Some(10_500_000));
        // A tight sample that shows the offset moved (by more than both uncertainties) takes over.
        assert!(!c.resample(sample(20_000_000, EPOCH + 700)));
        assert_eq!(
            c.to_mono(WallTime(EPOCH + 700 + 19_000_000)),
            Some(19_000_000)
        );
    }

    #[test]
    fn stamps_from_the_future_or_the_distant_past_are_refused() {
        let mut c = WallToMono::new();
        c.resample(sample(20_000_000_000, EPOCH));
        // Stamped after the sample: the clock stepped between the kernel's stamp and our read.
        assert_eq!(c.to_mono(WallTime(EPOCH + 20_001_000_000)), None);
        // Within the sample's uncertainty is still now.
        assert_eq!(
            c.to_mono(WallTime(EPOCH + 20_000_000_010)),
            Some(20_000_000_010)
        );
        assert_eq!(c.to_mono(WallTime(EPOCH + 9_000_000_000)), None, "11 s old");
        assert_eq!(c.to_mono(WallTime(0)), None, "before the monotonic origin");
    }

    #[test]
    fn the_real_clocks_agree_with_themselves() {
        let clock = Clock::new();
        let mut c = WallToMono::new();
        let s = clock.sample();
        c.resample(s);
        let t = c.to_mono(s.wall).expect("a fresh stamp converts");
        assert!(t.abs_diff(s.mono_before) <= s.mono_after - s.mono_before + 1);
        assert!(c.uncertainty_ns() < 1_000_000, "{}", c.uncertainty_ns());
    }
}
