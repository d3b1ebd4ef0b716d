//! One channel's state, and what each of its packets measures on it.
//!
//! A [`Channel`] is one relayed call leg: its addresses, its RTP streams, its T0 table, its
//! counters and its round-trip histogram. The parent module decides where a datagram goes; the
//! functions here are what an RTP packet then measures (sequence, jitter, lateness, T0, round
//! trip), and how a T0 and its round trip are settled when the send time comes later
//! ([`stamp_t0`], from `send_timing`). They take the relay's shared state (global histograms,
//! timestamp counters) as separate arguments, so that a channel borrowed out of the relay and
//! that state can be changed together.

use std::net::SocketAddr;

use super::probes::Probes;
use super::{RelayConfig, SocketId};
use crate::control::{ChannelId, ChannelInfo};
use crate::format::Format;
use crate::rtp::{RtpPacket, Ssrc};
use crate::seq::{SeqEvent, SequenceTracker};
use crate::stats::{
    ChannelStats, Direction, DropCounts, EchoCounters, GlobalHistograms, LatencyHistogram,
    MissingKind, PerDirection, StreamCounters, TimestampCounters, TrafficCounters,
};
use crate::t0::{Insert, Lookup, Stamp, T0Table};
use crate::time::MonoTime;
use crate::timing::Timing;

/// RTP stream state of one direction of a channel.
#[derive(Clone, Debug)]
pub(super) struct Stream {
    /// The current source, once a packet arrived.
    ssrc: Option<Ssrc>,
    /// Sequence tracking of the current source.
    seq: SequenceTracker,
    /// Jitter and lateness of the current source.
    timing: Timing,
    /// Times the SSRC changed.
    ssrc_changes: u64,
}

impl Stream {
    pub(super) fn new(format: Format, config: &RelayConfig) -> Self {
        Self {
            ssrc: None,
            seq: SequenceTracker::new(config.min_sequential),
            timing: Timing::new(format.clock_rate(), config.lateness),
            ssrc_changes: 0,
        }
    }

    pub(super) fn counters(&self) -> StreamCounters {
        StreamCounters {
            expected: self.seq.expected(),
            received: self.seq.received(),
            lost: self.seq.lost(),
            duplicates: self.seq.duplicates(),
            reordered: self.seq.reordered(),
            late: self.timing.late(),
            ssrc_changes: self.ssrc_changes,
            restarts: self.seq.restarts(),
            jitter_ns: self.timing.jitter_ns(),
            max_lateness_ns: self.timing.max_lateness_ns(),
        }
    }
}

/// The first and highest sequence numbers of the current RTP source forwarded to the echo, so
/// the return stream can be counted against what was really sent.
#[derive(Clone, Copy, Debug)]
pub(super) struct EchoAnchor {
    /// The source.
    ssrc: Ssrc,
    /// Its first sequence number forwarded.
    first: u16,
    /// The last one forwarded.
    last: u16,
    /// Offset of the last forwarded from the first (wraps unrolled).
    offset: i64,
    /// Highest offset forwarded.
    max_offset: i64,
}

/// One relayed call leg: its addresses, its measurement state and its counters.
#[derive(Debug)]
pub(super) struct Channel {
    /// Control's identifier.
    pub(super) id: ChannelId,
    /// The socket slot.
    pub(super) socket: SocketId,
    /// The shard (the relay's, copied for the statistics).
    pub(super) shard: u32,
    /// Its echo-leg tag ([`crate::tag`]): slot and generation.
    pub(super) tag: u32,
    /// Asterisk's SSRCs replaced by the tag, restored on the way back: RTP's and RTCP's.
    pub(super) tagged: [Option<u32>; 2],
    /// The bound local port.
    pub(super) port: u16,
    /// The media format.
    pub(super) format: Format,
    /// Asterisk's RTP address, once known.
    pub(super) asterisk: Option<SocketAddr>,
    /// Whether `asterisk` was latched from traffic.
    pub(super) latched: bool,
    /// The echo server.
    pub(super) echo: SocketAddr,
    /// When the channel opened.
    pub(super) opened: MonoTime,
    /// When it last forwarded a packet.
    pub(super) last_media: MonoTime,
    /// When each packet left for the echo.
    pub(super) t0: T0Table,
    /// What was forwarded to the echo, for counting its return.
    pub(super) anchor: Option<EchoAnchor>,
    /// Stream state per direction.
    pub(super) streams: PerDirection<Stream>,
    /// Traffic per direction.
    pub(super) traffic: PerDirection<TrafficCounters>,
    /// Round-trip accounting.
    pub(super) round_trip: EchoCounters,
    /// How its packets were timed.
    pub(super) timestamps: TimestampCounters,
    /// Drops on this socket.
    pub(super) drops: DropCounts,
    /// Round-trip times.
    pub(super) rtt: LatencyHistogram<u32>,
    /// Its probe headers: recognition, and once recognised the arrivals of its probes.
    pub(super) probes: Probes,
}

impl Channel {
    pub(super) fn stats(&self, now: MonoTime) -> ChannelStats {
        let rtt = self.rtt.summary();
        ChannelStats {
            channel: self.id.clone(),
            socket: self.socket.0,
            shard: self.shard,
            port: self.port,
            format: self.format,
            asterisk: self.asterisk,
            latched: self.latched,
            echo: self.echo,
            age_ns: now.nanos_since(self.opened),
            idle_ns: now.nanos_since(self.last_media),
            traffic: self.traffic,
            streams: PerDirection {
                to_echo: self.streams.to_echo.counters(),
                to_asterisk: self.streams.to_asterisk.counters(),
            },
            round_trip: self.round_trip,
            rtt,
            timestamps: self.timestamps,
            drops: self.drops,
            score: self.score(rtt.mean_ns),
            probe: self.probes.stats(),
        }
    }

    /// Its figures so far in mergeable form (for `interim`): the counters and the serialised
    /// round trips, without the summaries `stats` computes.
    pub(super) fn figures(&self, now: MonoTime) -> crate::figures::ChannelFigures {
        crate::figures::ChannelFigures {
            channel: self.id.clone(),
            age_ns: now.nanos_since(self.opened),
            traffic: self.traffic,
            streams: PerDirection {
                to_echo: self.streams.to_echo.counters(),
                to_asterisk: self.streams.to_asterisk.counters(),
            },
            round_trip: self.round_trip,
            timestamps: self.timestamps,
            drops: self.drops,
            rtt: crate::figures::encode(&self.rtt),
            rtt_sum_ns: u64::try_from(self.rtt.sum_ns()).unwrap_or(u64::MAX),
        }
    }

    /// The E-model score of what the channel measured: its mean round trip, the jitter of the
    /// echo's return as received (which carries both legs' variation) and its exact round-trip
    /// loss.
    fn score(&self, rtt_mean_ns: u64) -> crate::score::Score {
        crate::score::score(crate::score::Measured {
            rtt_mean_ns,
            jitter_ns: self.streams.to_asterisk.timing.jitter_ns(),
            sent: self.round_trip.sent,
            returned: self.round_trip.returned(),
        })
    }

    pub(super) fn info(&self) -> ChannelInfo {
        ChannelInfo {
            channel: self.id.clone(),
            socket: self.socket.0,
            shard: self.shard,
            port: self.port,
            asterisk: self.asterisk,
            echo: self.echo,
            format: self.format,
            traffic: self.traffic,
        }
    }
}

/// At close: packets forwarded to the echo after the highest one that came back are lost too
/// (A.1 cannot see them: nothing follows them).
pub(super) fn count_unreturned_tail(ch: &mut Channel) {
    let Some(a) = ch.anchor else { return };
    let back = &mut ch.streams.to_asterisk;
    let sent = u64::try_from(a.max_offset + 1).unwrap_or(0);
    if back.ssrc.is_none() {
        back.ssrc = Some(a.ssrc);
        back.seq.anchor(a.first);
    }
    if back.ssrc == Some(a.ssrc) {
        if let Some(extent) = back.seq.extent() {
            back.seq.expect_more(sent.saturating_sub(extent));
        }
    }
}

/// Sequence, jitter and lateness of an RTP packet, and its T0 or round trip; true when it
/// recorded a T0 (a packet toward the echo that is not a duplicate of one still pending).
#[allow(clippy::too_many_arguments)] // the state a packet touches, passed apart for the borrow checker
pub(super) fn measure(
    ch: &mut Channel,
    hist: &mut GlobalHistograms,
    stamps: &mut TimestampCounters,
    echo_timeout_ns: u64,
    rtt_threshold_ns: u64,
    now: MonoTime,
    direction: Direction,
    p: &RtpPacket<'_>,
) -> bool {
    if direction == Direction::ToEcho {
        match &mut ch.anchor {
            Some(a) if a.ssrc == p.ssrc => {
                #[allow(clippy::cast_possible_wrap)] // signed distance between wrapped numbers
                let step = i64::from(p.sequence.wrapping_sub(a.last) as i16);
                a.offset += step;
                a.last = p.sequence;
                a.max_offset = a.max_offset.max(a.offset);
            }
            _ => {
                ch.anchor = Some(EchoAnchor {
                    ssrc: p.ssrc,
                    first: p.sequence,
                    last: p.sequence,
                    offset: 0,
                    max_offset: 0,
                });
            }
        }
    }
    let anchor = ch.anchor;
    let stream = ch.streams.get_mut(direction);
    if stream.ssrc != Some(p.ssrc) {
        if stream.ssrc.is_some() {
            stream.ssrc_changes += 1;
            stream.seq.retire_source();
            stream.timing.reset();
        }
        stream.ssrc = Some(p.ssrc);
        // The echo's return of what we sent is counted from the first packet we sent.
        if let Some(a) = anchor.filter(|a| direction == Direction::ToAsterisk && a.ssrc == p.ssrc) {
            stream.seq.anchor(a.first);
        }
    }
    let event = stream.seq.update(p.sequence);
    if event != SeqEvent::Duplicate {
        let sample = stream.timing.update(now, p.timestamp);
        hist.jitter.get_mut(direction).record(sample.jitter_ns);
        hist.lateness.get_mut(direction).record(sample.lateness_ns);
    }
    match direction {
        Direction::ToEcho => {
            // A duplicate from Asterisk keeps the first copy's T0.
            if event == SeqEvent::Duplicate {
                return false;
            }
            match ch.t0.insert(now, p.ssrc, p.sequence) {
                Insert::Recorded => ch.round_trip.sent += 1,
                Insert::Overwrote => {
                    ch.round_trip.sent += 1;
                    ch.round_trip.timeouts += 1;
                }
                Insert::OverwroteReturned => {
                    ch.round_trip.sent += 1;
                    ch.round_trip.unmeasured += 1;
                    missing(stamps, Some(ch), MissingKind::NoStamp);
                }
                Insert::AlreadyPending => return false,
            }
            return true;
        }
        Direction::ToAsterisk => match ch.t0.lookup(now, p.ssrc, p.sequence) {
            Lookup::Matched { rtt_ns } => {
                record_rtt(ch, hist, echo_timeout_ns, rtt_threshold_ns, rtt_ns);
            }
            // Settled when its stamp comes (or is given up on).
            Lookup::AwaitingStamp => {}
            Lookup::NotPositive => {
                ch.round_trip.unmeasured += 1;
                missing(stamps, Some(ch), MissingKind::RttNotPositive);
            }
            // Its missing stamp was counted when it was given up on.
            Lookup::Unstamped => ch.round_trip.unmeasured += 1,
            Lookup::Duplicate => ch.round_trip.duplicates += 1,
            Lookup::Late => ch.round_trip.late += 1,
            Lookup::Unknown => ch.round_trip.unmatched += 1,
        },
    }
    false
}

/// A round trip of `rtt_ns` (positive) of channel `ch`: measured, or past the echo timeout (the
/// sweep had not noticed yet), the same as a late echo.
fn record_rtt(
    ch: &mut Channel,
    hist: &mut GlobalHistograms,
    echo_timeout_ns: u64,
    rtt_threshold_ns: u64,
    rtt_ns: u64,
) {
    if rtt_ns <= echo_timeout_ns {
        ch.round_trip.matched += 1;
        ch.round_trip.rtt_high += u64::from(rtt_ns > rtt_threshold_ns);
        ch.rtt.record(rtt_ns);
        hist.rtt.record(rtt_ns);
    } else {
        ch.round_trip.timeouts += 1;
        ch.round_trip.late += 1;
    }
}

/// Packet `key` of channel `ch` left for the echo at `t0`: its T0 entry takes it, and if its echo
/// came first the round trip is settled now (`limits`: the echo timeout and the RTT threshold).
pub(super) fn stamp_t0(
    ch: &mut Channel,
    hist: &mut GlobalHistograms,
    stamps: &mut TimestampCounters,
    (echo_timeout_ns, rtt_threshold_ns): (u64, u64),
    (ssrc, seq): (Ssrc, u16),
    t0: MonoTime,
) {
    match ch.t0.stamp(ssrc, seq, t0) {
        Stamp::Matched { rtt_ns } => {
            record_rtt(ch, hist, echo_timeout_ns, rtt_threshold_ns, rtt_ns);
        }
        Stamp::NotPositive => {
            ch.round_trip.unmeasured += 1;
            missing(stamps, Some(ch), MissingKind::RttNotPositive);
        }
        Stamp::Waiting | Stamp::Gone => {}
    }
}

/// Counts a time not recorded, relay-wide and for its channel when known.
pub(super) fn missing(stamps: &mut TimestampCounters, ch: Option<&mut Channel>, kind: MissingKind) {
    stamps.missing.add(kind);
    if let Some(ch) = ch {
        ch.timestamps.missing.add(kind);
    }
}
