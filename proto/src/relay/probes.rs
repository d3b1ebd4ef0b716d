//! A channel's probe headers ([`crate::probe`]): recognising a probe channel, recording each
//! probe's arrival and, when its echo returns, the relay's loop and the times to write into it.
//!
//! Apart from [`super::channel`] because it is a second measurement with its own state (an
//! arrival ring, allocated once when the channel is recognised) and its own rules (runs,
//! duplicates before and after recognition); a channel without probes pays one 8-byte
//! comparison per packet here and nothing else.

use super::channel::Channel;
use crate::probe::{self, RelayTimes};
use crate::rtp::RtpPacket;
use crate::stats::{Direction, GlobalHistograms, LatencyHistogram, ProbeStats, ProbeTotals};
use crate::time::MonoTime;

/// Slots of a probe channel's arrival ring, indexed by probe sequence: 20.48 s of 20 ms probes,
/// far more than a probe's loop through the echo.
pub const PROBE_SLOTS: usize = 1024;

/// One probe's arrival from Asterisk, kept until its echo returns.
#[derive(Clone, Copy, Debug, Default)]
struct ProbeArrival {
    /// Whether the slot holds a probe.
    used: bool,
    /// Whether its echo has come back (its loop is measured once, like a round trip).
    returned: bool,
    /// Its call index.
    call: u32,
    /// Its probe sequence.
    seq: u32,
    /// Its arrival (kernel receive stamp, monotonic).
    at: MonoTime,
    /// The same on `CLOCK_REALTIME` (the kernel's stamp itself), 0 when the relay had no wall
    /// offset yet.
    wall_ns: u64,
}

/// What a recognised probe channel keeps: allocated once, when it is recognised.
#[derive(Debug)]
struct ProbeRing {
    /// Arrivals by probe sequence modulo [`PROBE_SLOTS`].
    arrivals: Box<[ProbeArrival]>,
    /// The relay's loop of each probe whose echo came back.
    relay_loop: LatencyHistogram<u32>,
    /// Approximate Asterisk in of each probe from recognition on.
    asterisk_in: LatencyHistogram<u32>,
}

/// Probes remembered before a channel is recognised, to count a copy of one once (more than
/// [`probe::RECOGNISE_AFTER`], for copies that come after a reset of the run).
const SEEN_BEFORE_RECOGNITION: usize = 8;

/// A channel's probe state ([`crate::probe`]).
#[derive(Debug, Default)]
pub(super) struct Probes {
    /// Valid headers in a row from Asterisk, of call `run_call`, while not recognised.
    run: u32,
    /// The call of the run.
    run_call: u32,
    /// The last probes counted before recognition, (call, sequence), so that a copy of one of
    /// them is not counted again; the newest at `seen_at`.
    seen: [Option<(u32, u32)>; SEEN_BEFORE_RECOGNITION],
    /// Where the next probe counted before recognition goes in `seen`.
    seen_at: usize,
    /// Counters, as reported.
    received: u64,
    /// Valid probes back from the echo.
    returned: u64,
    /// Headers written.
    pub(super) written: u64,
    /// Approximate Asterisk in that was not positive.
    asterisk_in_negative: u64,
    /// Set when the channel is recognised.
    ring: Option<Box<ProbeRing>>,
}

impl Probes {
    pub(super) fn stats(&self) -> Option<ProbeStats> {
        if self.received == 0 && self.returned == 0 {
            return None;
        }
        let ring = self.ring.as_deref();
        Some(ProbeStats {
            recognised: ring.is_some(),
            received: self.received,
            returned: self.returned,
            written: self.written,
            relay_loop: ring.map(|r| r.relay_loop.summary()).unwrap_or_default(),
            asterisk_in: ring.map(|r| r.asterisk_in.summary()).unwrap_or_default(),
            asterisk_in_negative: self.asterisk_in_negative,
        })
    }

    /// A valid probe from Asterisk, arrived at `at` (`wall_ns`: the same on the wall clock, 0
    /// when unknown). Counts it (a duplicate once), advances recognition and, on a recognised
    /// channel, records its arrival and its approximate Asterisk in.
    fn on_asterisk(
        &mut self,
        hist: &mut GlobalHistograms,
        p: probe::Probe,
        at: MonoTime,
        wall_ns: u64,
    ) {
        if self.ring.is_none() {
            if self.seen.contains(&Some((p.call, p.seq))) {
                return; // a copy of a probe already counted
            }
            if let Some(slot) = self.seen.get_mut(self.seen_at) {
                *slot = Some((p.call, p.seq));
            }
            self.seen_at = (self.seen_at + 1) % SEEN_BEFORE_RECOGNITION;
            self.received += 1;
            if self.run > 0 && p.call == self.run_call {
                self.run += 1;
            } else {
                self.run = 1;
                self.run_call = p.call;
            }
            if self.run < probe::RECOGNISE_AFTER {
                return;
            }
            // Recognised: the channel's one allocation for its probes.
            self.ring = Some(Box::new(ProbeRing {
                arrivals: vec![ProbeArrival::default(); PROBE_SLOTS].into_boxed_slice(),
                relay_loop: LatencyHistogram::new(2),
                asterisk_in: LatencyHistogram::new(2),
            }));
        } else if let Some(a) = self.slot(p.seq) {
            if a.used && a.call == p.call && a.seq == p.seq {
                return; // a duplicate: the first copy's arrival stands
            }
            self.received += 1;
        }
        let Some(ring) = self.ring.as_deref_mut() else {
            return;
        };
        if let Some(a) = ring.arrivals.get_mut(slot_of(p.seq)) {
            *a = ProbeArrival {
                used: true,
                returned: false,
                call: p.call,
                seq: p.seq,
                at,
                wall_ns,
            };
        }
        if wall_ns == 0 {
            return;
        }
        match wall_ns.checked_sub(p.sent_ns).filter(|&ns| ns > 0) {
            Some(ns) => {
                ring.asterisk_in.record(ns);
                hist.probe_asterisk_in.record(ns);
            }
            None => self.asterisk_in_negative += 1,
        }
    }

    /// A valid probe back from the echo at `at` (`wall_ns` on the wall clock, 0 when unknown):
    /// on a recognised channel whose arrival of it is recorded, its loop is recorded and the
    /// times to write into it returned (once per probe).
    fn on_echo(
        &mut self,
        hist: &mut GlobalHistograms,
        p: probe::Probe,
        at: MonoTime,
        wall_ns: u64,
    ) -> Option<RelayTimes> {
        self.returned += 1;
        let ring = self.ring.as_deref_mut()?;
        let a = ring
            .arrivals
            .get_mut(slot_of(p.seq))
            .filter(|a| a.used && !a.returned && a.call == p.call && a.seq == p.seq)?;
        a.returned = true;
        if at > a.at {
            let ns = at.nanos_since(a.at);
            ring.relay_loop.record(ns);
            hist.probe_loop.record(ns);
        }
        (a.wall_ns != 0 && wall_ns != 0).then_some(RelayTimes {
            arrival_ns: a.wall_ns,
            returned_ns: wall_ns,
        })
    }

    /// Adds an open channel's counters to `t` (no distribution: they cost a pass over the
    /// histograms, and the relay-wide ones come from the global histograms).
    pub(super) fn count_into(&self, t: &mut ProbeTotals) {
        let recognised = self.ring.is_some();
        t.channels += u32::from(recognised);
        t.recognised += u64::from(recognised);
        t.received += self.received;
        t.returned += self.returned;
        t.written += self.written;
        t.asterisk_in_negative += self.asterisk_in_negative;
    }

    fn slot(&self, seq: u32) -> Option<&ProbeArrival> {
        self.ring.as_deref()?.arrivals.get(slot_of(seq))
    }
}

/// The ring slot of probe sequence `seq`.
fn slot_of(seq: u32) -> usize {
    seq as usize % PROBE_SLOTS
}

/// Where the payload of `p`, parsed from a datagram of `len` bytes, starts in it (the payload
/// and its padding end the datagram).
pub(super) fn payload_start(len: usize, p: &RtpPacket<'_>) -> usize {
    len.saturating_sub(usize::from(p.padding) + p.payload.len())
}

/// The probe header of an RTP packet of channel `ch`, if its payload starts with one
/// ([`crate::probe`]): a channel without probes pays one 8-byte comparison. From Asterisk, a
/// valid header counts toward recognition (anything else breaks the run until the channel is
/// recognised) and, once recognised, has its arrival recorded. From the echo, returns the times
/// to write into it, when the channel is recognised and recorded the probe's arrival.
pub(super) fn probe_header(
    ch: &mut Channel,
    hist: &mut GlobalHistograms,
    now: MonoTime,
    wall_offset: Option<i64>,
    direction: Direction,
    p: &RtpPacket<'_>,
) -> Option<RelayTimes> {
    let header = probe::has_magic(p.payload)
        .then(|| probe::parse(p.payload).ok())
        .flatten();
    // The wall-clock time of `now`, only for a probe (0 when the offset is unknown).
    let wall_ns = || {
        wall_offset
            .and_then(|o| u64::try_from(i128::from(now.as_nanos()) + i128::from(o)).ok())
            .unwrap_or(0)
    };
    match (direction, header) {
        (Direction::ToEcho, Some(h)) => {
            ch.probes.on_asterisk(hist, h, now, wall_ns());
            None
        }
        (Direction::ToEcho, None) => {
            ch.probes.run = 0;
            None
        }
        (Direction::ToAsterisk, Some(h)) => ch.probes.on_echo(hist, h, now, wall_ns()),
        (Direction::ToAsterisk, None) => None,
    }
}
