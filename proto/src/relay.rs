//! The relay state machine: which datagram goes where, and what it tells us.
//!
//! [`Relay`] owns every channel. The I/O layer (io_uring or tokio) owns the sockets and the clock
//! and drives it:
//! - each datagram goes to [`Relay::handle_datagram`] with the socket it arrived on, its source
//!   and the time; the [`Verdict`] says where to send the very same bytes, or why to drop them;
//! - each control request goes to [`Relay::handle_command`]; opening a channel is two steps
//!   (the core picks the socket slot, the backend binds, [`Relay::complete_open`] confirms), and
//!   closing one tells the backend which socket to close;
//! - [`Relay::poll_timeout`] says when to call [`Relay::handle_timeout`], which times out
//!   unanswered T0 entries and closes idle channels, reported by [`Relay::poll_event`];
//! - a forwarded datagram's send time is the kernel's transmit stamp: the backend sends it with
//!   the id [`Relay::send_id`] gives and hands the stamp back with [`Relay::tx_stamped`], which
//!   settles its forward time and (toward the echo) its T0, before or after the echo returns
//!   (`SendTimes::Estimated` keeps the old estimate, [`Relay::submitted_between`]).
//!
//! Source rules per channel: a datagram from the echo's address goes to Asterisk (T1, RTT); one
//! from Asterisk's address goes to the echo (T0). Asterisk's address comes from control, or, unless
//! the relay is strict, is latched from the first well-formed packet from any other address.
//! Anything else is dropped and counted by reason. Malformed packets are dropped and counted, never
//! forwarded.
//!
//! Probes ([`crate::probe`]): a channel whose RTP payloads from Asterisk carry valid probe
//! headers, [`crate::probe::RECOGNISE_AFTER`] in a row of one call, is a probe channel from then
//! on. It records each probe's arrival by probe sequence and, when the probe's echo comes back,
//! records the relay's loop (arrival to the echo's arrival) and writes both times, on the wall
//! clock ([`Relay::set_wall_offset`]), into the echo's header on its way to Asterisk
//! ([`Relay::handle_received`]). Nothing else is ever written; a channel without probes pays one
//! 8-byte comparison per packet.
//!
//! Once a channel exists, `handle_datagram` does not allocate: the channel's T0 table and
//! histograms are sized when it opens (a probe channel's arrival ring and its two histograms
//! once, when it is recognised).

use core::time::Duration;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use crate::control::{
    AddChannel, ChannelId, ChannelInfo, Command, ErrorCode, ErrorReply, Response,
};
use crate::format::Format;
use crate::probe::{self, RelayTimes};
use crate::rtp::{self, Packet, RtpPacket, Ssrc};
use crate::sends::{Record, Sends};
use crate::seq::{SeqEvent, SequenceTracker, MIN_SEQUENTIAL};
use crate::stats::{
    ChannelStats, CloseReason, Direction, DropCounts, DropReason, EchoCounters, GlobalStats,
    LatencyHistogram, MissingKind, PerDirection, ProbeStats, ProbeTotals, StreamCounters,
    TimestampCounters, TrafficCounters,
};
use crate::t0::{Insert, Lookup, Stamp, T0Table, Unstamped};
use crate::time::{duration_nanos, MonoTime};
use crate::timing::{LatenessConfig, Timing};

/// The socket a datagram arrived on: a slot the relay assigns when a channel opens (the io_uring
/// backend uses it as the fixed-file index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub u32);

impl SocketId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

/// What to do with a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Send the same bytes from the same socket to `to`.
    Forward {
        /// Destination.
        to: SocketAddr,
        /// Which way the packet is going.
        direction: Direction,
    },
    /// Drop it; it has been counted under this reason.
    Drop(DropReason),
}

/// Where the time a forwarded datagram left comes from (its T0 toward the echo, and the end of
/// its forward time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SendTimes {
    /// The kernel's transmit stamp of each send, reported with [`Relay::tx_stamped`]: exact
    /// whatever the scheduler does.
    #[default]
    Kernel,
    /// An estimate from clock reads around the system call that submitted the send
    /// ([`Relay::submitted_between`]): the way before kernel stamps, kept for comparison. Wrong
    /// whenever the relay is preempted between the reads.
    Estimated,
}

/// Settings of a relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// Most channels open at once (socket slots 0..max_channels).
    pub max_channels: u32,
    /// Echo server for channels whose `add` names none.
    pub default_echo: SocketAddr,
    /// Refuse to latch Asterisk's address from traffic: it must come from control.
    pub strict_source: bool,
    /// A channel with no media in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// A packet whose echo has not come back after this long counts as an echo timeout.
    pub echo_timeout: Duration,
    /// T0 table slots per channel (rounded up to a power of two, at most 65536).
    pub t0_slots: usize,
    /// Packets in sequence before a new RTP source is counted (RFC 3550 A.1).
    pub min_sequential: u8,
    /// When a packet is late.
    pub lateness: LatenessConfig,
    /// Round trips above this are counted as `rtt_high`.
    pub rtt_threshold: Duration,
    /// How often the timer runs (echo-timeout sweep and idle check).
    pub timer_interval: Duration,
    /// Which data-plane shard this relay is (0 for a one-shard relay): named in `add` and
    /// `list` replies and in channel statistics.
    pub shard: u32,
    /// Where send times come from.
    pub send_times: SendTimes,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_channels: 4096,
            default_echo: SocketAddr::from(([127, 0, 0, 1], 4000)),
            strict_source: false,
            idle_timeout: Duration::from_secs(60),
            echo_timeout: Duration::from_secs(2),
            t0_slots: 1024,
            min_sequential: MIN_SEQUENTIAL,
            lateness: LatenessConfig::default(),
            rtt_threshold: Duration::from_millis(50),
            timer_interval: Duration::from_millis(100),
            shard: 0,
            send_times: SendTimes::Kernel,
        }
    }
}

/// A [`RelayConfig`] value out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `max_channels` is 0 or above 1 048 576.
    #[error("max_channels must be 1..=1048576, got {0}")]
    MaxChannels(u32),
    /// `t0_slots` is not a power of two in 1..=65536.
    #[error("t0_slots must be a power of two in 1..=65536, got {0}")]
    T0Slots(usize),
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// The echo address has port 0 or an unspecified IP.
    #[error("default echo address {0} is not a usable destination")]
    Echo(SocketAddr),
}

impl RelayConfig {
    /// Checks every value.
    ///
    /// # Errors
    /// The first value out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_channels == 0 || self.max_channels > 1 << 20 {
            return Err(ConfigError::MaxChannels(self.max_channels));
        }
        if !self.t0_slots.is_power_of_two() || self.t0_slots > 1 << 16 {
            return Err(ConfigError::T0Slots(self.t0_slots));
        }
        for (name, d) in [
            ("idle_timeout", self.idle_timeout),
            ("echo_timeout", self.echo_timeout),
            ("timer_interval", self.timer_interval),
            ("lateness window", self.lateness.window),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if !usable(self.default_echo) {
            return Err(ConfigError::Echo(self.default_echo));
        }
        Ok(())
    }
}

fn usable(a: SocketAddr) -> bool {
    a.port() != 0 && !a.ip().is_unspecified()
}

/// Something the relay did on its own, from [`Relay::handle_timeout`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A channel closed without a command: close its socket.
    ChannelClosed {
        /// The socket to close.
        socket: SocketId,
        /// Why.
        reason: CloseReason,
        /// Its final statistics.
        stats: Box<ChannelStats>,
    },
}

/// A channel whose slot is reserved while the backend binds its socket.
#[derive(Debug)]
#[must_use = "pass it to Relay::complete_open, or the slot stays reserved"]
pub struct PendingOpen {
    /// The reserved slot.
    socket: SocketId,
    /// The request, validated.
    request: AddChannel,
}

impl PendingOpen {
    /// The slot to bind the socket in.
    #[must_use]
    pub const fn socket(&self) -> SocketId {
        self.socket
    }

    /// The local port to bind (0: any).
    #[must_use]
    pub const fn port(&self) -> u16 {
        self.request.port
    }

    /// The channel being opened.
    #[must_use]
    pub const fn channel(&self) -> &ChannelId {
        &self.request.channel
    }
}

/// What a command needs from the backend.
#[derive(Debug)]
#[must_use]
pub enum CommandOutcome {
    /// Send this reply.
    Reply(Result<Response, ErrorReply>),
    /// Bind a UDP socket on the pending channel's port, then call [`Relay::complete_open`] and
    /// send what it returns.
    Open(PendingOpen),
    /// Close the socket in this slot, then send the reply.
    Close {
        /// The slot whose socket to close.
        socket: SocketId,
        /// The reply.
        reply: Result<Response, ErrorReply>,
    },
}

/// RTP stream state of one direction of a channel.
#[derive(Clone, Debug)]
struct Stream {
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
    fn new(format: Format, config: &RelayConfig) -> Self {
        Self {
            ssrc: None,
            seq: SequenceTracker::new(config.min_sequential),
            timing: Timing::new(format.clock_rate(), config.lateness),
            ssrc_changes: 0,
        }
    }

    fn counters(&self) -> StreamCounters {
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
struct EchoAnchor {
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
struct Channel {
    /// Control's identifier.
    id: ChannelId,
    /// The socket slot.
    socket: SocketId,
    /// The shard (the relay's, copied for the statistics).
    shard: u32,
    /// Its echo-leg tag ([`crate::tag`]): slot and generation.
    tag: u32,
    /// Asterisk's SSRCs replaced by the tag, restored on the way back: RTP's and RTCP's.
    tagged: [Option<u32>; 2],
    /// The bound local port.
    port: u16,
    /// The media format.
    format: Format,
    /// Asterisk's RTP address, once known.
    asterisk: Option<SocketAddr>,
    /// Whether `asterisk` was latched from traffic.
    latched: bool,
    /// The echo server.
    echo: SocketAddr,
    /// When the channel opened.
    opened: MonoTime,
    /// When it last forwarded a packet.
    last_media: MonoTime,
    /// When each packet left for the echo.
    t0: T0Table,
    /// What was forwarded to the echo, for counting its return.
    anchor: Option<EchoAnchor>,
    /// Stream state per direction.
    streams: PerDirection<Stream>,
    /// Traffic per direction.
    traffic: PerDirection<TrafficCounters>,
    /// Round-trip accounting.
    round_trip: EchoCounters,
    /// How its packets were timed.
    timestamps: TimestampCounters,
    /// Drops on this socket.
    drops: DropCounts,
    /// Round-trip times.
    rtt: LatencyHistogram<u32>,
    /// Its probe headers: recognition, and once recognised the arrivals of its probes.
    probes: Probes,
}

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
struct Probes {
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
    written: u64,
    /// Approximate Asterisk in that was not positive.
    asterisk_in_negative: u64,
    /// Set when the channel is recognised.
    ring: Option<Box<ProbeRing>>,
}

impl Probes {
    fn stats(&self) -> Option<ProbeStats> {
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
    fn count_into(&self, t: &mut ProbeTotals) {
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

impl Channel {
    fn stats(&self, now: MonoTime) -> ChannelStats {
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

    fn info(&self) -> ChannelInfo {
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

/// Global histograms, recorded per packet alongside the channel's own; exporters read them.
#[derive(Clone, Debug)]
pub struct GlobalHistograms {
    /// Round-trip times.
    pub rtt: LatencyHistogram,
    /// Time inside the relay, per direction: arrival (kernel receive stamp) to the kernel's
    /// transmit stamp of the forwarded send.
    pub forward: PerDirection<LatencyHistogram>,
    /// Arrival (the kernel's receive stamp) to the moment the relay's user space handled the
    /// datagram, per direction: the wake-up part of `forward` (deferred path only).
    pub receive_delay: PerDirection<LatencyHistogram>,
    /// Jitter estimate after each packet, per direction.
    pub jitter: PerDirection<LatencyHistogram>,
    /// Lateness of each packet, per direction.
    pub lateness: PerDirection<LatencyHistogram>,
    /// The score of every closed channel.
    pub calls: crate::score::ScoreHistograms,
    /// The relay's loop of every probe whose echo came back to its recorded arrival (the probes
    /// it writes its times into): arrival from Asterisk to the arrival of its echo, both kernel
    /// receive stamps ([`crate::probe`]).
    pub probe_loop: LatencyHistogram,
    /// Approximate Asterisk in of every probe of a recognised channel: the relay's arrival
    /// minus the header's send time (a user-space reading on the sender's side).
    pub probe_asterisk_in: LatencyHistogram,
}

impl GlobalHistograms {
    /// Empty histograms.
    #[must_use]
    pub fn new() -> Self {
        let h = || LatencyHistogram::new(3);
        let pair = || PerDirection {
            to_echo: h(),
            to_asterisk: h(),
        };
        Self {
            rtt: h(),
            forward: pair(),
            receive_delay: pair(),
            jitter: pair(),
            lateness: pair(),
            calls: crate::score::ScoreHistograms::new(),
            probe_loop: h(),
            probe_asterisk_in: h(),
        }
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Self) {
        self.rtt.merge(&other.rtt);
        for d in Direction::ALL {
            self.forward.get_mut(d).merge(other.forward.get(d));
            self.receive_delay
                .get_mut(d)
                .merge(other.receive_delay.get(d));
            self.jitter.get_mut(d).merge(other.jitter.get(d));
            self.lateness.get_mut(d).merge(other.lateness.get(d));
        }
        self.calls.merge(&other.calls);
        self.probe_loop.merge(&other.probe_loop);
        self.probe_asterisk_in.merge(&other.probe_asterisk_in);
    }

    /// Writes these histograms' summaries into `stats`.
    fn summarize_into(&self, stats: &mut GlobalStats) {
        let per = |p: &PerDirection<LatencyHistogram>| PerDirection {
            to_echo: p.to_echo.summary(),
            to_asterisk: p.to_asterisk.summary(),
        };
        stats.rtt = self.rtt.summary();
        stats.forward = per(&self.forward);
        stats.receive_delay = per(&self.receive_delay);
        stats.jitter = per(&self.jitter);
        stats.lateness = per(&self.lateness);
        stats.probe.relay_loop = self.probe_loop.summary();
        stats.probe.asterisk_in = self.probe_asterisk_in.summary();
    }
}

impl Default for GlobalHistograms {
    fn default() -> Self {
        Self::new()
    }
}

/// The statistics of several relays taken as one (the shards of a data plane): counters summed
/// (jitter and lateness: the largest), `draining` if any is, histograms merged before their
/// percentiles are read, so the merged p99 is the p99 of every packet, not a mean of p99s.
#[must_use]
pub fn merge_global<'a>(
    parts: impl IntoIterator<Item = (&'a GlobalStats, &'a GlobalHistograms)>,
) -> (GlobalStats, GlobalHistograms) {
    let mut g = GlobalStats::default();
    let mut h = GlobalHistograms::new();
    for (s, hist) in parts {
        g.accumulate_counters(s);
        h.merge(hist);
    }
    h.summarize_into(&mut g);
    (g, h)
}

/// Counters of closed channels, so global statistics survive them.
#[derive(Debug, Default)]
struct ClosedTotals {
    /// Traffic.
    traffic: PerDirection<TrafficCounters>,
    /// Stream quality.
    streams: PerDirection<StreamCounters>,
    /// Round trips.
    round_trip: EchoCounters,
    /// Probe headers.
    probe: ProbeTotals,
    /// Channels closed by `remove`.
    removed: u64,
    /// Channels closed for idleness.
    idle: u64,
}

/// The sans-IO relay: every channel's state, driven by datagrams, commands and time.
#[derive(Debug)]
pub struct Relay {
    /// Settings.
    config: RelayConfig,
    /// Channels by socket slot.
    channels: Vec<Option<Box<Channel>>>,
    /// Free slots; the lowest is handed out first.
    free: Vec<u32>,
    /// Slots by channel id (control path only).
    by_id: HashMap<ChannelId, SocketId>,
    /// Whether new channels are refused.
    draining: bool,
    /// Channels opened since start.
    opened: u64,
    /// Drops of every channel, and those with no channel.
    drops: DropCounts,
    /// Global histograms.
    hist: GlobalHistograms,
    /// Counters of closed channels.
    closed: ClosedTotals,
    /// Events not yet polled.
    events: VecDeque<Event>,
    /// When the timer next runs.
    next_timer: MonoTime,
    /// `echo_timeout` in nanoseconds.
    echo_timeout_ns: u64,
    /// `rtt_threshold` in nanoseconds.
    rtt_threshold_ns: u64,
    /// Datagrams forwarded by [`Relay::handle_received`] whose send is not submitted yet; their
    /// forward time and T0 are settled by [`Relay::submitted`].
    unsubmitted: Vec<Unsubmitted>,
    /// Sends queued since the last submission: the place the next queued send takes.
    queued: u32,
    /// Place in the queue of each gathered send (by the backend's batch number), with the
    /// submission it belongs to: an entry of an earlier `submission` is a send still gathering.
    batch_place: Vec<(u32, u32)>,
    /// Submissions reported so far (wrapping), so `batch_place` needs no clearing.
    submission: u32,
    /// Kernel send times: every forwarded datagram's send, waiting for its stamp.
    sends: Sends,
    /// The stamp id of the datagram [`Relay::handle_received`] forwarded last.
    last_send: Option<u32>,
    /// Per gathered send (by the backend's batch number): its first and last datagram's ids.
    chains: Vec<Option<(u32, u32)>>,
    /// How the relay's packets were timed, over all channels.
    stamps: TimestampCounters,
    /// `CLOCK_REALTIME` − the monotonic clock of the arrivals, ns ([`Relay::set_wall_offset`]).
    wall_offset: Option<i64>,
}

/// What [`Relay::handle`] decided about one datagram.
#[derive(Clone, Copy, Debug)]
struct Handled {
    /// Where it goes.
    verdict: Verdict,
    /// The T0 entry it made, if any.
    t0: Option<(Ssrc, u16)>,
    /// A probe's return: where its RTP payload starts in the datagram, and the times to write.
    probe: Option<(usize, RelayTimes)>,
}

/// Where a forwarded datagram's send stands in the submission queue.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// Its own send, the n-th queued since the last submission.
    Queued(u32),
    /// One of several in a gathered send (GSO) the backend numbers so, queued later.
    Batch(u16),
}

/// A forwarded datagram waiting for its send's submission.
#[derive(Clone, Copy, Debug)]
struct Unsubmitted {
    /// Its channel's slot.
    socket: SocketId,
    /// Its arrival.
    arrival: MonoTime,
    /// Its direction.
    direction: Direction,
    /// The T0 entry it made, if it made one (an RTP packet toward the echo).
    t0: Option<(Ssrc, u16)>,
    /// Where its send stands in the submission queue.
    place: Place,
}

/// Unsubmitted datagrams kept without growing: more than a batch ever holds (the rings' CQ).
const UNSUBMITTED_CAPACITY: usize = 16_384;

impl Relay {
    /// A relay with no channels.
    ///
    /// # Errors
    /// A value of `config` is out of range.
    pub fn new(config: RelayConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let max = config.max_channels;
        Ok(Self {
            channels: (0..max).map(|_| None).collect(),
            free: (0..max).rev().collect(),
            by_id: HashMap::new(),
            draining: false,
            opened: 0,
            drops: DropCounts::default(),
            hist: GlobalHistograms::new(),
            closed: ClosedTotals::default(),
            events: VecDeque::new(),
            next_timer: MonoTime::ZERO,
            echo_timeout_ns: duration_nanos(config.echo_timeout),
            rtt_threshold_ns: duration_nanos(config.rtt_threshold),
            unsubmitted: Vec::with_capacity(UNSUBMITTED_CAPACITY),
            queued: 0,
            batch_place: Vec::new(),
            submission: 0,
            sends: Sends::new(),
            last_send: None,
            chains: Vec::new(),
            stamps: TimestampCounters::default(),
            wall_offset: None,
            config,
        })
    }

    /// The wall clock's offset from the arrivals' monotonic clock: `CLOCK_REALTIME` − monotonic,
    /// in nanoseconds, the very offset the backend converts kernel receive stamps with (so that
    /// `arrival + offset` is the kernel's stamp again, exactly). Set before each batch's
    /// datagrams; `None` (the start) leaves probes unwritten. The times the relay writes into
    /// probes are `CLOCK_REALTIME`: a step of the wall clock between a probe's arrival and its
    /// echo's shifts one time against the other (the relay loop it records, from the monotonic
    /// arrivals, does not move).
    pub fn set_wall_offset(&mut self, offset_ns: Option<i64>) {
        self.wall_offset = offset_ns;
    }

    /// The settings in force.
    #[must_use]
    pub const fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Channels open.
    #[must_use]
    pub fn channel_count(&self) -> usize {
        self.by_id.len()
    }

    /// The slot of a channel.
    #[must_use]
    pub fn socket_of(&self, channel: &ChannelId) -> Option<SocketId> {
        self.by_id.get(channel).copied()
    }

    /// Decides the fate of one datagram that arrived on `socket` from `from` at `now`, taking
    /// `now` as its arrival and, for a packet toward the echo, as its T0 (the send is taken to
    /// leave at once). For tests: the backends use [`Relay::handle_received`]. It has the bytes
    /// read-only, so it measures probes but never writes into them (nor counts them written).
    pub fn handle_datagram(
        &mut self,
        now: MonoTime,
        socket: SocketId,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Verdict {
        let h = self.handle(now, socket, from, bytes);
        if let (Some((ssrc, seq)), Some(Some(ch))) = (h.t0, self.channels.get_mut(socket.index())) {
            let _ = ch.t0.stamp(ssrc, seq, now);
        }
        h.verdict
    }

    /// Decides the fate of one datagram the kernel received at `arrival` (its receive stamp) and
    /// the relay handled at `handled`. Jitter, lateness and a returning echo's T1 use `arrival`.
    /// A forwarded datagram's forward time and (toward the echo) T0 are settled by its send's
    /// time: with [`SendTimes::Kernel`], its kernel transmit stamp, which the backend asks for
    /// with the id [`Relay::send_id`] gives and reports with [`Relay::tx_stamped`]; with
    /// [`SendTimes::Estimated`], when the backend reports the send submitted
    /// ([`Relay::submitted_between`]).
    ///
    /// A probe's echo on its way back to Asterisk ([`crate::probe`]) gets the relay's two times
    /// written into its header, in `bytes`, which the backend then sends as they are: only on a
    /// recognised probe channel, only into a valid header whose probe's arrival the relay
    /// recorded, and only the header's relay fields. Every other datagram is left as it came.
    pub fn handle_received(
        &mut self,
        arrival: MonoTime,
        handled: MonoTime,
        socket: SocketId,
        from: SocketAddr,
        bytes: &mut [u8],
    ) -> Verdict {
        let Handled { verdict, t0, probe } = self.handle(arrival, socket, from, bytes);
        if let Some((at, times)) = probe {
            let written = bytes
                .get_mut(at..)
                .is_some_and(|payload| probe::write_relay_times(payload, times).is_ok());
            if let (true, Some(Some(ch))) = (written, self.channels.get_mut(socket.index())) {
                ch.probes.written += 1;
            }
        }
        self.last_send = None;
        if let Verdict::Forward { direction, .. } = verdict {
            self.hist
                .receive_delay
                .get_mut(direction)
                .record(handled.nanos_since(arrival));
            if self.config.send_times == SendTimes::Kernel {
                let tag = self
                    .channels
                    .get(socket.index())
                    .and_then(Option::as_ref)
                    .map_or(0, |c| c.tag);
                let record = Record {
                    socket: socket.0,
                    tag,
                    arrival,
                    direction,
                    t0,
                };
                let (channels, stamps) = (&mut self.channels, &mut self.stamps);
                let id = self.sends.push(record, |r| {
                    give_up(channels, stamps, r, MissingKind::NoStamp);
                });
                self.last_send = Some(id);
            } else if self.unsubmitted.len() < self.unsubmitted.capacity() {
                self.unsubmitted.push(Unsubmitted {
                    socket,
                    arrival,
                    direction,
                    t0,
                    place: Place::Queued(self.queued),
                });
                self.queued += 1;
            } else {
                // More than a batch can hold: settle what is queued as submitted now, this
                // datagram with them.
                self.submitted(handled);
                let limits = (self.echo_timeout_ns, self.rtt_threshold_ns);
                let ch = self
                    .channels
                    .get_mut(socket.index())
                    .and_then(Option::as_mut);
                if let (Some(key), Some(ch)) = (t0, ch) {
                    stamp_t0(ch, &mut self.hist, &mut self.stamps, limits, key, handled);
                }
                if handled > arrival {
                    self.hist
                        .forward
                        .get_mut(direction)
                        .record(handled.nanos_since(arrival));
                }
            }
        }
        verdict
    }

    /// Every datagram forwarded since the last call has had its send submitted at `at`: each
    /// one's forward time (arrival to `at`) is recorded and each T0 toward the echo becomes `at`.
    /// ([`SendTimes::Estimated`] only.)
    pub fn submitted(&mut self, at: MonoTime) {
        self.submitted_between(at, at);
    }

    /// With [`SendTimes::Kernel`]: the id the send of the datagram [`Relay::handle_received`]
    /// just forwarded must carry (`SCM_TS_OPT_ID`), so that its kernel transmit stamp comes back
    /// with it. `None` with estimated times, after a drop, or once the datagram was gathered
    /// into a GSO send ([`Relay::gathered_last`]; that send carries [`Relay::batch_queued`]'s).
    #[must_use]
    pub const fn send_id(&self) -> Option<u32> {
        self.last_send
    }

    /// The kernel's transmit stamp for send `id` came: `at` on the monotonic clock, or `None`
    /// when it cannot be converted (a step of the wall clock). Settles each datagram of the send:
    /// its forward time ends at `at`, and toward the echo `at` is its T0, which completes the
    /// round trip if its echo came first. A time that would not be positive is not recorded but
    /// counted ([`MissingKind`]). A stamp no send waits for (given up on, or an id never handed
    /// out) is counted as stale. A datagram whose channel closed since is timed relay-wide only.
    pub fn tx_stamped(&mut self, id: u32, at: Option<MonoTime>) {
        let (channels, stamps, hist) = (&mut self.channels, &mut self.stamps, &mut self.hist);
        let (echo_timeout_ns, rtt_threshold_ns) = (self.echo_timeout_ns, self.rtt_threshold_ns);
        let settled = self.sends.settle(id, |r| {
            let Some(at) = at else {
                give_up(channels, stamps, r, MissingKind::ClockStep);
                return;
            };
            let mut ch = channel_of(channels, &r);
            stamps.kernel += 1;
            if let Some(ch) = ch.as_deref_mut() {
                ch.timestamps.kernel += 1;
            }
            if at > r.arrival {
                hist.forward
                    .get_mut(r.direction)
                    .record(at.nanos_since(r.arrival));
            } else {
                missing(stamps, ch.as_deref_mut(), MissingKind::ForwardNotPositive);
            }
            let (Some(ch), Some((ssrc, seq))) = (ch, r.t0) else {
                return;
            };
            stamp_t0(
                ch,
                hist,
                stamps,
                (echo_timeout_ns, rtt_threshold_ns),
                (ssrc, seq),
                at,
            );
        });
        if !settled {
            self.stamps.stale += 1;
        }
    }

    /// Send `id` failed (refused, or its completion reported an error): its datagrams never
    /// left, so no stamp will come and nothing is counted missing. Returns the channel slot and
    /// direction of its first datagram, for the backend's error log.
    pub fn send_failed(&mut self, id: u32) -> Option<(SocketId, Direction)> {
        let mut first = None;
        self.sends.settle(id, |r| {
            first.get_or_insert((SocketId(r.socket), r.direction));
        });
        first
    }

    /// The datagram just forwarded by [`Relay::handle_received`] does not get a send of its own:
    /// the backend gathers it into send `batch` (several datagrams, one `sendmsg` with UDP GSO),
    /// which it queues later and reports with [`Relay::batch_queued`]. Until then the datagram
    /// stays unsubmitted, even across a submission.
    pub fn gathered_last(&mut self, batch: u16) {
        if let Some(id) = self.last_send.take() {
            let i = usize::from(batch);
            if self.chains.len() <= i {
                // Grows to the backend's number of batch buffers once, then never again.
                self.chains.resize(i + 1, None);
            }
            if let Some(c) = self.chains.get_mut(i) {
                *c = match *c {
                    None => Some((id, id)),
                    Some((head, tail)) => {
                        self.sends.chain(tail, id);
                        Some((head, id))
                    }
                };
            }
            return;
        }
        if let Some(u) = self.unsubmitted.last_mut() {
            if let Place::Queued(q) = u.place {
                if q + 1 == self.queued {
                    self.queued -= 1;
                }
                u.place = Place::Batch(batch);
                let i = usize::from(batch);
                if self.batch_place.len() <= i {
                    // Grows to the backend's number of batch buffers once, then never again.
                    self.batch_place
                        .resize(i + 1, (self.submission.wrapping_sub(1), 0));
                }
            }
        }
    }

    /// The backend queued gathered send `batch`, after every send queued so far. With kernel
    /// send times, returns the id the send must carry: one stamp settles all its datagrams.
    pub fn batch_queued(&mut self, batch: u16) -> Option<u32> {
        if let Some(c) = self.chains.get_mut(usize::from(batch)) {
            if let Some((head, _)) = c.take() {
                return Some(head);
            }
        }
        if let Some(p) = self.batch_place.get_mut(usize::from(batch)) {
            *p = (self.submission, self.queued);
            self.queued += 1;
        }
        None
    }

    /// Every send queued since the last call was submitted by one system call that began at
    /// `start` and returned at `end`, which issued them in the order they were queued (io_uring
    /// issues a batch's UDP sends one after another, inline). The k-th of n (from 0) takes the
    /// k-th n-th of the call's time, and its packet meets the wire a quarter into that share: on
    /// loopback a send's call also does the receiver's work (the softirq delivery and wake-up run
    /// inside it), which comes after the packet passes the device. So it is taken to leave at
    /// `start + (end − start)·(4k + 1)/4n`. Measured against tcpdump here: the share's start put
    /// T0 ~5 µs early, its middle ~4.5 µs late; a quarter leaves under 1.5 µs.
    /// Each datagram in it has its forward time end and (toward the echo) its T0 set there, so a
    /// large batch does not charge its last send's wait to the network; the datagrams of one
    /// gathered send share its moment, as they share its one packet on the wire. Datagrams of a
    /// gathered send not queued yet wait for the next call.
    pub fn submitted_between(&mut self, start: MonoTime, end: MonoTime) {
        let n = u64::from(self.queued);
        let span = end.nanos_since(start);
        let (hist, channels, places) = (&mut self.hist, &mut self.channels, &self.batch_place);
        let stamps = &mut self.stamps;
        let (echo_timeout_ns, rtt_threshold_ns) = (self.echo_timeout_ns, self.rtt_threshold_ns);
        let this = self.submission;
        self.unsubmitted.retain(|u| {
            let k = match u.place {
                Place::Queued(q) => q,
                Place::Batch(b) => match places.get(usize::from(b)) {
                    Some(&(sub, q)) if sub == this => q,
                    _ => return true, // still gathering: settled by a later submission
                },
            };
            let at = MonoTime::from_nanos(
                start.as_nanos() + span.saturating_mul(4 * u64::from(k) + 1) / (4 * n).max(1),
            );
            let ch = channels.get_mut(u.socket.index()).and_then(Option::as_mut);
            if at > u.arrival {
                hist.forward
                    .get_mut(u.direction)
                    .record(at.nanos_since(u.arrival));
            } else {
                missing(
                    stamps,
                    ch.map(|c| &mut **c),
                    MissingKind::ForwardNotPositive,
                );
                return false;
            }
            if let (Some((ssrc, seq)), Some(ch)) = (
                u.t0,
                channels.get_mut(u.socket.index()).and_then(Option::as_mut),
            ) {
                let limits = (echo_timeout_ns, rtt_threshold_ns);
                stamp_t0(ch, hist, stamps, limits, (ssrc, seq), at);
            }
            false
        });
        self.queued = 0;
        self.submission = self.submission.wrapping_add(1);
    }

    /// Datagrams forwarded whose send has not been reported submitted.
    #[must_use]
    pub fn unsubmitted(&self) -> usize {
        self.unsubmitted.len()
    }

    fn handle(
        &mut self,
        now: MonoTime,
        socket: SocketId,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Handled {
        let wall_offset = self.wall_offset;
        let dropped = |verdict| Handled {
            verdict,
            t0: None,
            probe: None,
        };
        let Some(Some(ch)) = self.channels.get_mut(socket.index()) else {
            self.drops.add(DropReason::NoChannel);
            return dropped(Verdict::Drop(DropReason::NoChannel));
        };
        let (direction, latch) = if from == ch.echo {
            (Direction::ToAsterisk, false)
        } else if ch.asterisk == Some(from) {
            (Direction::ToEcho, false)
        } else if ch.asterisk.is_none() && !self.config.strict_source {
            (Direction::ToEcho, true)
        } else {
            return dropped(drop_packet(&mut self.drops, ch, DropReason::UnknownSource));
        };
        let packet = match rtp::parse(bytes) {
            Ok(p) => p,
            Err(e) => return dropped(drop_packet(&mut self.drops, ch, e.into())),
        };
        let to = match direction {
            Direction::ToEcho => ch.echo,
            Direction::ToAsterisk => match ch.asterisk {
                Some(a) => a,
                None => {
                    return dropped(drop_packet(
                        &mut self.drops,
                        ch,
                        DropReason::NoAsteriskAddress,
                    ))
                }
            },
        };
        if latch {
            ch.asterisk = Some(from);
            ch.latched = true;
        }
        ch.last_media = now;
        let traffic = ch.traffic.get_mut(direction);
        traffic.packets += 1;
        traffic.bytes += bytes.len() as u64;
        let (t0, probe) = match packet {
            Packet::Rtcp(_) => {
                traffic.rtcp += 1;
                (None, None)
            }
            Packet::Rtp(p) => {
                let t0 = measure(
                    ch,
                    &mut self.hist,
                    &mut self.stamps,
                    self.echo_timeout_ns,
                    self.rtt_threshold_ns,
                    now,
                    direction,
                    &p,
                )
                .then_some((p.ssrc, p.sequence));
                let probe = probe_header(ch, &mut self.hist, now, wall_offset, direction, &p)
                    .map(|times| (payload_start(bytes.len(), &p), times));
                (t0, probe)
            }
        };
        Handled {
            verdict: Verdict::Forward { to, direction },
            t0,
            probe,
        }
    }

    /// Counts a datagram the backend dropped before it could reach the core (for instance one
    /// still in flight for a channel that was just removed: `NoChannel`).
    pub fn count_drop(&mut self, reason: DropReason) {
        self.drops.add(reason);
    }

    /// Shared echo leg, on the way out: replaces the SSRC of `packet`, a datagram of channel
    /// `socket` just forwarded toward the echo, with the channel's tag, remembering Asterisk's
    /// SSRC to restore. False (the packet untouched) when the channel is gone or the packet has no
    /// SSRC field (the core forwards only what it parsed, so this does not happen for its own
    /// verdicts).
    pub fn tag_for_echo(&mut self, socket: SocketId, packet: &mut [u8]) -> bool {
        let Some(ch) = self
            .channels
            .get_mut(socket.index())
            .and_then(Option::as_mut)
        else {
            return false;
        };
        let Ok(kind) = crate::tag::kind(packet) else {
            return false;
        };
        let Some(ssrc) = crate::tag::read(packet, kind) else {
            return false;
        };
        ch.tagged[usize::from(kind == crate::tag::Kind::Rtcp)] = Some(ssrc);
        crate::tag::write(packet, kind, ch.tag)
    }

    /// Shared echo leg, on the way back: finds the channel `packet`'s tag names, puts Asterisk's
    /// SSRC back in its place, and returns the channel's socket slot, through which the caller
    /// then hands the packet to [`Relay::handle_received`] as that channel's return. `None`, the
    /// packet dropped and counted (`unknown_tag`, or why it has no SSRC), when the tag names no
    /// open channel: one closed since (its slot has moved on a generation), or a forgery.
    pub fn untag_from_echo(&mut self, packet: &mut [u8]) -> Option<SocketId> {
        let kind = match crate::tag::kind(packet) {
            Ok(k) => k,
            Err(reason) => {
                self.drops.add(reason);
                return None;
            }
        };
        let tag = crate::tag::read(packet, kind)?;
        let slot = crate::tag::slot(tag);
        let restored = self
            .channels
            .get(slot as usize)
            .and_then(Option::as_ref)
            .filter(|ch| ch.tag == tag)
            .and_then(|ch| ch.tagged[usize::from(kind == crate::tag::Kind::Rtcp)]);
        match restored {
            Some(ssrc) if crate::tag::write(packet, kind, ssrc) => Some(SocketId(slot)),
            _ => {
                self.drops.add(DropReason::UnknownTag);
                None
            }
        }
    }

    /// Executes a control command.
    pub fn handle_command(&mut self, now: MonoTime, command: Command) -> CommandOutcome {
        match command {
            Command::Hello(_) => CommandOutcome::Reply(Ok(crate::control::hello_response())),
            Command::Add(add) => match self.reserve(add) {
                Ok(pending) => CommandOutcome::Open(pending),
                Err(e) => CommandOutcome::Reply(Err(e)),
            },
            Command::Update(u) => CommandOutcome::Reply(self.update(&u.channel, u.asterisk)),
            Command::Remove(r) => match self.close(now, &r.channel, CloseReason::Removed) {
                Some((socket, stats)) => CommandOutcome::Close {
                    socket,
                    reply: Ok(Response::Removed { stats }),
                },
                None => CommandOutcome::Reply(Err(ErrorReply::unknown_channel(&r.channel))),
            },
            Command::List => {
                let mut channels: Vec<ChannelInfo> =
                    self.channels.iter().flatten().map(|c| c.info()).collect();
                channels.sort_by(|a, b| a.channel.cmp(&b.channel));
                CommandOutcome::Reply(Ok(Response::Channels { channels }))
            }
            Command::Stats(q) => CommandOutcome::Reply(match q.channel {
                None => Ok(Response::Global {
                    stats: Box::new(self.global_stats()),
                }),
                Some(id) => self
                    .channel(&id)
                    .map(|c| Response::Channel {
                        stats: Box::new(c.stats(now)),
                    })
                    .ok_or_else(|| ErrorReply::unknown_channel(&id)),
            }),
            Command::Drain => {
                self.draining = true;
                CommandOutcome::Reply(Ok(Response::Draining {
                    active: u32::try_from(self.channel_count()).unwrap_or(u32::MAX),
                }))
            }
        }
    }

    /// Validates an `add` and reserves a slot for it.
    fn reserve(&mut self, add: AddChannel) -> Result<PendingOpen, ErrorReply> {
        if self.draining {
            return Err(ErrorReply::new(
                ErrorCode::Draining,
                "the relay is draining and takes no new channels",
            ));
        }
        if self.by_id.contains_key(&add.channel) {
            return Err(ErrorReply::duplicate_channel(&add.channel));
        }
        let echo = add.echo.unwrap_or(self.config.default_echo);
        if !usable(echo) {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("echo address {echo} is not a usable destination"),
            ));
        }
        if let Some(a) = add.asterisk {
            check_asterisk(a, echo)?;
        }
        let Some(slot) = self.free.pop() else {
            return Err(ErrorReply::new(
                ErrorCode::Limit,
                format!("{} channels open, the maximum", self.config.max_channels),
            ));
        };
        Ok(PendingOpen {
            socket: SocketId(slot),
            request: AddChannel {
                echo: Some(echo),
                ..add
            },
        })
    }

    /// Finishes an `add` once the backend has tried to bind: `bound` is the local port it bound,
    /// or the error to reply with. Returns the reply.
    pub fn complete_open(
        &mut self,
        now: MonoTime,
        pending: PendingOpen,
        bound: Result<u16, ErrorReply>,
    ) -> Result<Response, ErrorReply> {
        let PendingOpen { socket, request } = pending;
        let port = match bound {
            Ok(port) => port,
            Err(e) => {
                self.free.push(socket.0);
                return Err(e);
            }
        };
        let Some(entry) = self.channels.get_mut(socket.index()) else {
            return Err(ErrorReply::new(ErrorCode::Internal, "slot out of range"));
        };
        if entry.is_some() || self.by_id.contains_key(&request.channel) {
            self.free.push(socket.0);
            return Err(ErrorReply::new(
                ErrorCode::Internal,
                "slot or channel id taken while the socket was bound",
            ));
        }
        let config = &self.config;
        let streams = PerDirection {
            to_echo: Stream::new(request.format, config),
            to_asterisk: Stream::new(request.format, config),
        };
        *entry = Some(Box::new(Channel {
            id: request.channel.clone(),
            socket,
            shard: config.shard,
            tag: crate::tag::make(socket.0, u32::try_from(self.opened).unwrap_or(0)),
            tagged: [None; 2],
            port,
            format: request.format,
            asterisk: request.asterisk,
            latched: false,
            echo: request.echo.unwrap_or(config.default_echo),
            opened: now,
            last_media: now,
            t0: T0Table::new(config.t0_slots),
            anchor: None,
            streams,
            traffic: PerDirection::default(),
            round_trip: EchoCounters::default(),
            timestamps: TimestampCounters::default(),
            drops: DropCounts::default(),
            rtt: LatencyHistogram::new(2),
            probes: Probes::default(),
        }));
        self.by_id.insert(request.channel.clone(), socket);
        self.opened += 1;
        if self.by_id.len() == 1 {
            self.next_timer = now + config.timer_interval;
        }
        Ok(Response::Added {
            channel: request.channel,
            port,
            socket: socket.0,
            shard: self.config.shard,
        })
    }

    fn update(&mut self, id: &ChannelId, asterisk: SocketAddr) -> Result<Response, ErrorReply> {
        let ch = self
            .by_id
            .get(id)
            .and_then(|s| self.channels.get_mut(s.index()))
            .and_then(Option::as_mut)
            .ok_or_else(|| ErrorReply::unknown_channel(id))?;
        check_asterisk(asterisk, ch.echo)?;
        ch.asterisk = Some(asterisk);
        ch.latched = false;
        Ok(Response::Updated {
            channel: id.clone(),
            asterisk,
        })
    }

    fn channel(&self, id: &ChannelId) -> Option<&Channel> {
        let s = self.by_id.get(id)?;
        self.channels.get(s.index())?.as_deref()
    }

    /// Removes a channel: entries still waiting for their echo time out; its counters join the
    /// closed totals; its slot is freed.
    fn close(
        &mut self,
        now: MonoTime,
        id: &ChannelId,
        reason: CloseReason,
    ) -> Option<(SocketId, Box<ChannelStats>)> {
        let socket = self.by_id.remove(id)?;
        let mut ch = self.channels.get_mut(socket.index())?.take()?;
        let (timeouts, unmeasured) = ch.t0.expire_all();
        ch.round_trip.timeouts += timeouts;
        // Echoes back whose stamp had not come: the channel counts them here; the relay when it
        // gives up on their sends.
        ch.round_trip.unmeasured += unmeasured;
        ch.timestamps.missing.no_stamp += unmeasured;
        count_unreturned_tail(&mut ch);
        let stats = ch.stats(now);
        let c = &mut self.closed;
        for d in Direction::ALL {
            c.traffic.get_mut(d).accumulate(stats.traffic.get(d));
            c.streams.get_mut(d).accumulate(stats.streams.get(d));
        }
        c.round_trip.accumulate(&stats.round_trip);
        if let Some(p) = &stats.probe {
            c.probe.add_closed(p);
        }
        self.hist.calls.observe(stats.score);
        match reason {
            CloseReason::Removed => c.removed += 1,
            CloseReason::Idle => c.idle += 1,
        }
        self.free.push(socket.0);
        Some((socket, Box::new(stats)))
    }

    /// When [`Relay::handle_timeout`] should next run; `None` while there are no channels.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<MonoTime> {
        (!self.by_id.is_empty()).then_some(self.next_timer)
    }

    /// Runs the timer if it is due: times out T0 entries older than the echo timeout and closes
    /// channels idle for the idle timeout (reported by [`Relay::poll_event`]).
    pub fn handle_timeout(&mut self, now: MonoTime) {
        if now < self.next_timer {
            return;
        }
        self.next_timer = now + self.config.timer_interval;
        let deadline = MonoTime::from_nanos(now.as_nanos().saturating_sub(self.echo_timeout_ns));
        let (channels, stamps) = (&mut self.channels, &mut self.stamps);
        self.sends.sweep(deadline, |r| {
            give_up(channels, stamps, r, MissingKind::NoStamp);
        });
        let idle_ns = duration_nanos(self.config.idle_timeout);
        let mut idle = Vec::new();
        for ch in self.channels.iter_mut().flatten() {
            ch.round_trip.timeouts += ch.t0.sweep(deadline);
            if now.nanos_since(ch.last_media) >= idle_ns {
                idle.push(ch.id.clone());
            }
        }
        for id in idle {
            if let Some((socket, stats)) = self.close(now, &id, CloseReason::Idle) {
                self.events.push_back(Event::ChannelClosed {
                    socket,
                    reason: CloseReason::Idle,
                    stats,
                });
            }
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// One channel's statistics.
    #[must_use]
    pub fn channel_stats(&self, now: MonoTime, id: &ChannelId) -> Option<ChannelStats> {
        self.channel(id).map(|c| c.stats(now))
    }

    /// Statistics over every channel, open and closed.
    #[must_use]
    pub fn global_stats(&self) -> GlobalStats {
        let c = &self.closed;
        let mut traffic = c.traffic;
        let mut streams = c.streams;
        let mut round_trip = c.round_trip;
        let mut probe = c.probe;
        for ch in self.channels.iter().flatten() {
            for d in Direction::ALL {
                traffic.get_mut(d).accumulate(ch.traffic.get(d));
                streams.get_mut(d).accumulate(&ch.streams.get(d).counters());
            }
            round_trip.accumulate(&ch.round_trip);
            ch.probes.count_into(&mut probe);
        }
        let mut g = GlobalStats {
            channels: u32::try_from(self.by_id.len()).unwrap_or(u32::MAX),
            draining: self.draining,
            channels_opened: self.opened,
            channels_removed: c.removed,
            channels_idle: c.idle,
            traffic,
            streams,
            round_trip,
            drops: self.drops,
            timestamps: self.stamps,
            probe,
            ..GlobalStats::default()
        };
        self.hist.summarize_into(&mut g);
        g
    }

    /// The global histograms (nanoseconds), for exporters.
    #[must_use]
    pub const fn histograms(&self) -> &GlobalHistograms {
        &self.hist
    }

    /// Statistics of every open channel, ordered by channel id.
    #[must_use]
    pub fn all_channel_stats(&self, now: MonoTime) -> Vec<ChannelStats> {
        let mut v: Vec<ChannelStats> = self
            .channels
            .iter()
            .flatten()
            .map(|c| c.stats(now))
            .collect();
        v.sort_by(|a, b| a.channel.cmp(&b.channel));
        v
    }
}

fn drop_packet(global: &mut DropCounts, ch: &mut Channel, reason: DropReason) -> Verdict {
    global.add(reason);
    ch.drops.add(reason);
    Verdict::Drop(reason)
}

fn check_asterisk(asterisk: SocketAddr, echo: SocketAddr) -> Result<(), ErrorReply> {
    if !usable(asterisk) {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!("asterisk address {asterisk} is not a usable destination"),
        ));
    }
    if asterisk == echo {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!("asterisk and echo are the same address {echo}"),
        ));
    }
    Ok(())
}

/// At close: packets forwarded to the echo after the highest one that came back are lost too
/// (A.1 cannot see them: nothing follows them).
fn count_unreturned_tail(ch: &mut Channel) {
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

/// Where the payload of `p`, parsed from a datagram of `len` bytes, starts in it (the payload
/// and its padding end the datagram).
fn payload_start(len: usize, p: &RtpPacket<'_>) -> usize {
    len.saturating_sub(usize::from(p.padding) + p.payload.len())
}

/// The probe header of an RTP packet of channel `ch`, if its payload starts with one
/// ([`crate::probe`]): a channel without probes pays one 8-byte comparison. From Asterisk, a
/// valid header counts toward recognition (anything else breaks the run until the channel is
/// recognised) and, once recognised, has its arrival recorded. From the echo, returns the times
/// to write into it, when the channel is recognised and recorded the probe's arrival.
fn probe_header(
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

/// Sequence, jitter and lateness of an RTP packet, and its T0 or round trip; true when it
/// recorded a T0 (a packet toward the echo that is not a duplicate of one still pending).
#[allow(clippy::too_many_arguments)] // the state a packet touches, passed apart for the borrow checker
fn measure(
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
fn stamp_t0(
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
fn missing(stamps: &mut TimestampCounters, ch: Option<&mut Channel>, kind: MissingKind) {
    stamps.missing.add(kind);
    if let Some(ch) = ch {
        ch.timestamps.missing.add(kind);
    }
}

/// The channel a send record belongs to, if it is still open (the slot's channel has the tag
/// the record was made with).
fn channel_of<'a>(channels: &'a mut [Option<Box<Channel>>], r: &Record) -> Option<&'a mut Channel> {
    channels
        .get_mut(r.socket as usize)
        .and_then(Option::as_deref_mut)
        .filter(|c| c.tag == r.tag)
}

/// Gives up on a send's stamp (never came, or cannot be converted): counted as `kind`, and its
/// packet's round trip, if its echo came back, is unmeasured.
fn give_up(
    channels: &mut [Option<Box<Channel>>],
    stamps: &mut TimestampCounters,
    r: Record,
    kind: MissingKind,
) {
    let mut ch = channel_of(channels, &r);
    missing(stamps, ch.as_deref_mut(), kind);
    if let (Some(ch), Some((ssrc, seq))) = (ch, r.t0) {
        if ch.t0.unstamped(ssrc, seq) == Unstamped::Returned {
            ch.round_trip.unmeasured += 1;
        }
    }
}
