//! Counters and latency histograms, per channel and for the whole relay.
//!
//! Latencies go into HdrHistograms sized once at creation, so recording never allocates.
//! Global histograms keep 3 significant digits (0.1 %); per-channel round-trip histograms keep 2
//! (1 %) in 32-bit counts, which keeps a channel's memory at about 15 KiB for its histogram. Both
//! record nanoseconds up to 60 s; longer values saturate at 60 s. Nothing is clamped upward: a
//! round trip or forward time that would be zero or negative is not recorded but counted
//! ([`TimestampCounters`]).
//!
//! Summaries ([`LatencySummary`], [`ChannelStats`], [`GlobalStats`]) are plain serde values:
//! they are what `remove` and `stats` return over the control socket and what reports print.
//! The relay-wide histograms behind [`GlobalStats`]' percentiles are [`GlobalHistograms`]; the
//! statistics of several relays (shards) become one with [`merge_global`], which merges their
//! histograms before it reads percentiles.

use hdrhistogram::{Counter, Histogram};
use serde::{Deserialize, Serialize};

/// Largest latency a histogram resolves; larger values are recorded as this.
pub const HISTOGRAM_MAX_NS: u64 = 60_000_000_000;

/// The two directions a packet crosses the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From Asterisk to the echo server (T0 is stamped).
    ToEcho,
    /// From the echo server back to Asterisk (T1 is stamped).
    ToAsterisk,
}

impl Direction {
    /// Both directions, in index order.
    pub const ALL: [Self; 2] = [Self::ToEcho, Self::ToAsterisk];

    /// The metric label: `to_echo` or `to_asterisk`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ToEcho => "to_echo",
            Self::ToAsterisk => "to_asterisk",
        }
    }

    /// Index into per-direction arrays.
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// A latency histogram in nanoseconds.
#[derive(Clone, Debug)]
pub struct LatencyHistogram<T: Counter = u64> {
    /// The histogram; never resized after creation.
    hist: Histogram<T>,
    /// Sum of the values recorded (as recorded, after clamping), for an exact mean without a
    /// pass over the histogram.
    sum_ns: u128,
}

impl<T: Counter> LatencyHistogram<T> {
    /// A histogram from 1 ns to [`HISTOGRAM_MAX_NS`] with `sigfig` significant digits (1–5).
    #[must_use]
    pub fn new(sigfig: u8) -> Self {
        let hist = Histogram::new_with_bounds(1, HISTOGRAM_MAX_NS, sigfig.clamp(1, 5))
            .unwrap_or_else(|_| unreachable!("constant, valid bounds"));
        Self { hist, sum_ns: 0 }
    }

    /// Records one value, saturating at [`HISTOGRAM_MAX_NS`]. Zero is recorded as zero, never
    /// raised into a bucket it does not belong to: a caller whose value can only be positive (a
    /// round trip, a forward time) checks it first and counts a bad one instead. Never allocates.
    pub fn record(&mut self, ns: u64) {
        let ns = ns.min(HISTOGRAM_MAX_NS);
        self.hist.saturating_record(ns);
        self.sum_ns += u128::from(ns);
    }

    /// Records `count` copies of one value. Never allocates.
    pub fn record_n(&mut self, ns: u64, count: u64) {
        if let Some(c) = T::from_u64(count) {
            let ns = ns.min(HISTOGRAM_MAX_NS);
            self.hist.saturating_record_n(ns, c);
            self.sum_ns += u128::from(ns) * u128::from(count);
        }
    }

    /// Number of values recorded.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// Whether nothing has been recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// Adds every value of `other` (same bounds and precision, or values saturate).
    pub fn merge(&mut self, other: &Self) {
        for v in other.hist.iter_recorded() {
            self.hist
                .saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
        self.sum_ns += other.sum_ns;
    }

    /// Adds every value of `h`, whose values sum to `sum_ns` (a histogram read back from its
    /// serialised form, which does not carry the sum).
    pub fn add_histogram<U: Counter>(&mut self, h: &Histogram<U>, sum_ns: u128) {
        for v in h.iter_recorded() {
            if let Some(c) = T::from_u64(v.count_at_value().as_u64()) {
                self.hist.saturating_record_n(v.value_iterated_to(), c);
            }
        }
        self.sum_ns += sum_ns;
    }

    /// Sum of every value recorded, in nanoseconds.
    #[must_use]
    pub const fn sum_ns(&self) -> u128 {
        self.sum_ns
    }

    /// The underlying histogram, for exporters that need its buckets.
    #[must_use]
    pub fn histogram(&self) -> &Histogram<T> {
        &self.hist
    }

    /// Count, extremes, mean and the percentiles reports use.
    #[must_use]
    pub fn summary(&self) -> LatencySummary {
        let h = &self.hist;
        if h.is_empty() {
            return LatencySummary::default();
        }
        // One pass over the counts for every percentile (the metrics publisher summarises
        // several histograms twice a second), and the mean from the running sum.
        let mut q = h.value_at_quantiles([0.50, 0.95, 0.99, 0.999]);
        let (p50_ns, p95_ns, p99_ns, p999_ns) = (
            q.next().unwrap_or(0),
            q.next().unwrap_or(0),
            q.next().unwrap_or(0),
            q.next().unwrap_or(0),
        );
        let mean_ns =
            u64::try_from((self.sum_ns + u128::from(h.len() / 2)) / u128::from(h.len().max(1)))
                .unwrap_or(u64::MAX);
        LatencySummary {
            count: h.len(),
            min_ns: h.min(),
            mean_ns,
            p50_ns,
            p95_ns,
            p99_ns,
            p999_ns,
            max_ns: h.max(),
        }
    }
}

/// Percentiles of a latency distribution, in nanoseconds (values are accurate to the
/// histogram's precision: 0.1 % globally, 1 % per channel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Smallest value.
    pub min_ns: u64,
    /// Arithmetic mean.
    pub mean_ns: u64,
    /// Median.
    pub p50_ns: u64,
    /// 95th percentile.
    pub p95_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest value.
    pub max_ns: u64,
}

/// Traffic counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficCounters {
    /// Datagrams forwarded.
    pub packets: u64,
    /// Bytes forwarded (UDP payload).
    pub bytes: u64,
    /// Of the datagrams forwarded, RTCP ones (forwarded unmeasured).
    pub rtcp: u64,
}

impl TrafficCounters {
    /// Adds `other`'s counts.
    pub fn accumulate(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.rtcp += other.rtcp;
    }
}

/// RTP stream quality of one direction, as received by the relay (RFC 3550 A.1/A.8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCounters {
    /// Packets expected from sequence numbers.
    pub expected: u64,
    /// Distinct packets received.
    pub received: u64,
    /// Expected and not received (exact; a reordered packet is not lost).
    pub lost: u64,
    /// Packets received more than once.
    pub duplicates: u64,
    /// Packets that arrived after a higher sequence number.
    pub reordered: u64,
    /// Packets whose transit exceeded the baseline by more than the lateness threshold.
    pub late: u64,
    /// Times the SSRC changed.
    pub ssrc_changes: u64,
    /// Sender restarts detected from sequence numbers.
    pub restarts: u64,
    /// Current interarrival jitter, in nanoseconds (global stats: the largest over channels).
    pub jitter_ns: u64,
    /// Largest lateness seen, in nanoseconds.
    pub max_lateness_ns: u64,
}

impl StreamCounters {
    /// Adds `other`'s counts; jitter and lateness keep the larger.
    pub fn accumulate(&mut self, other: &Self) {
        self.expected += other.expected;
        self.received += other.received;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
        self.late += other.late;
        self.ssrc_changes += other.ssrc_changes;
        self.restarts += other.restarts;
        self.jitter_ns = self.jitter_ns.max(other.jitter_ns);
        self.max_lateness_ns = self.max_lateness_ns.max(other.max_lateness_ns);
    }
}

/// Round-trip accounting through the T0 table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoCounters {
    /// RTP packets recorded in the T0 table on their way to the echo.
    pub sent: u64,
    /// Echoes that matched a waiting entry: round trips measured.
    pub matched: u64,
    /// Further echoes of a packet already answered (not measured again).
    pub duplicates: u64,
    /// Entries that got no echo within the echo timeout, were overwritten, or were waiting when
    /// the channel closed.
    pub timeouts: u64,
    /// Echoes that arrived after their entry had timed out (not measured).
    pub late: u64,
    /// Echoes with no entry at all (never sent, or their slot reused).
    pub unmatched: u64,
    /// Round trips above the relay's RTT threshold.
    pub rtt_high: u64,
    /// Echoes that came back (so not lost) whose round trip could not be timed: the kernel's
    /// transmit stamp of the packet never came, or T1 was not after T0. Not in the RTT figures;
    /// each is counted in [`TimestampCounters::missing`] too.
    #[serde(default)]
    pub unmeasured: u64,
}

impl EchoCounters {
    /// Adds `other`'s counts.
    pub fn accumulate(&mut self, other: &Self) {
        self.sent += other.sent;
        self.matched += other.matched;
        self.duplicates += other.duplicates;
        self.timeouts += other.timeouts;
        self.late += other.late;
        self.unmatched += other.unmatched;
        self.rtt_high += other.rtt_high;
        self.unmeasured += other.unmeasured;
    }

    /// Echoes that came back, measured or not: what loss is counted against.
    #[must_use]
    pub const fn returned(&self) -> u64 {
        self.matched + self.unmeasured
    }
}

/// Why a time was not recorded. Nothing the relay reports is made up: a value it cannot take
/// from the kernel's stamps is counted here instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingKind {
    /// A forwarded datagram's kernel transmit stamp never came (within the echo timeout): its
    /// forward time, and toward the echo its round trip, are not recorded.
    NoStamp,
    /// A round trip whose T1 is not after its T0.
    RttNotPositive,
    /// A forward time whose transmit stamp is not after the arrival.
    ForwardNotPositive,
    /// A transmit stamp taken across a step of the wall clock, which cannot be converted.
    ClockStep,
}

impl MissingKind {
    /// Every kind, in index order.
    pub const ALL: [Self; 4] = [
        Self::NoStamp,
        Self::RttNotPositive,
        Self::ForwardNotPositive,
        Self::ClockStep,
    ];

    /// The metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoStamp => "no_stamp",
            Self::RttNotPositive => "rtt_not_positive",
            Self::ForwardNotPositive => "forward_not_positive",
            Self::ClockStep => "clock_step",
        }
    }
}

/// Times not recorded, by [`MissingKind`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingCounts {
    /// [`MissingKind::NoStamp`].
    pub no_stamp: u64,
    /// [`MissingKind::RttNotPositive`].
    pub rtt_not_positive: u64,
    /// [`MissingKind::ForwardNotPositive`].
    pub forward_not_positive: u64,
    /// [`MissingKind::ClockStep`].
    pub clock_step: u64,
}

impl MissingCounts {
    /// Counts one.
    pub fn add(&mut self, kind: MissingKind) {
        *self.get_mut(kind) += 1;
    }

    /// The count for `kind`.
    #[must_use]
    pub const fn get(&self, kind: MissingKind) -> u64 {
        match kind {
            MissingKind::NoStamp => self.no_stamp,
            MissingKind::RttNotPositive => self.rtt_not_positive,
            MissingKind::ForwardNotPositive => self.forward_not_positive,
            MissingKind::ClockStep => self.clock_step,
        }
    }

    fn get_mut(&mut self, kind: MissingKind) -> &mut u64 {
        match kind {
            MissingKind::NoStamp => &mut self.no_stamp,
            MissingKind::RttNotPositive => &mut self.rtt_not_positive,
            MissingKind::ForwardNotPositive => &mut self.forward_not_positive,
            MissingKind::ClockStep => &mut self.clock_step,
        }
    }

    /// Every kind together.
    #[must_use]
    pub const fn total(&self) -> u64 {
        self.no_stamp + self.rtt_not_positive + self.forward_not_positive + self.clock_step
    }

    /// Adds `other`'s counts.
    pub fn accumulate(&mut self, other: &Self) {
        for k in MissingKind::ALL {
            *self.get_mut(k) += other.get(k);
        }
    }
}

/// How the times of a channel's (or the relay's) packets were taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimestampCounters {
    /// Forwarded datagrams whose send the kernel stamped: their forward time ends at that stamp
    /// and, toward the echo, it is their T0. (0 with `--timestamps user`, whose times are
    /// estimates.)
    pub kernel: u64,
    /// Times not recorded, by why.
    pub missing: MissingCounts,
    /// Stamps that found no send waiting for them (given up on already, or a send of a channel
    /// whose record was lost): relay-wide only. (A stamp for a channel closed since still finds
    /// its send and counts as `kernel`, relay-wide.)
    #[serde(default)]
    pub stale: u64,
}

impl TimestampCounters {
    /// Adds `other`'s counts.
    pub fn accumulate(&mut self, other: &Self) {
        self.kernel += other.kernel;
        self.missing.accumulate(&other.missing);
        self.stale += other.stale;
    }
}

/// Why the relay dropped a datagram instead of forwarding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// It arrived on a socket with no channel (a race with removal).
    NoChannel,
    /// It came from neither Asterisk's address nor the echo's.
    UnknownSource,
    /// It came from the echo before Asterisk's address was known, so it has nowhere to go.
    NoAsteriskAddress,
    /// Shorter than an RTP or RTCP header.
    TooShort,
    /// Not RTP version 2.
    BadVersion,
    /// The CSRC list runs past the end.
    CsrcOverrun,
    /// The header extension runs past the end.
    ExtensionOverrun,
    /// The padding count is zero or too large.
    BadPadding,
    /// The RTCP length runs past the end.
    RtcpLength,
    /// A return on the shared echo leg whose tag names no open channel (a channel closed since,
    /// or a packet the relay never sent).
    UnknownTag,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [Self; 10] = [
        Self::NoChannel,
        Self::UnknownSource,
        Self::NoAsteriskAddress,
        Self::TooShort,
        Self::BadVersion,
        Self::CsrcOverrun,
        Self::ExtensionOverrun,
        Self::BadPadding,
        Self::RtcpLength,
        Self::UnknownTag,
    ];

    /// The metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoChannel => "no_channel",
            Self::UnknownSource => "unknown_source",
            Self::NoAsteriskAddress => "no_asterisk_address",
            Self::TooShort => "too_short",
            Self::BadVersion => "bad_version",
            Self::CsrcOverrun => "csrc_overrun",
            Self::ExtensionOverrun => "extension_overrun",
            Self::BadPadding => "bad_padding",
            Self::RtcpLength => "rtcp_length",
            Self::UnknownTag => "unknown_tag",
        }
    }

    /// Index into [`DropCounts`].
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl From<crate::rtp::RtpError> for DropReason {
    fn from(e: crate::rtp::RtpError) -> Self {
        use crate::rtp::RtpError;
        match e {
            RtpError::TooShort => Self::TooShort,
            RtpError::BadVersion => Self::BadVersion,
            RtpError::CsrcOverrun => Self::CsrcOverrun,
            RtpError::ExtensionOverrun => Self::ExtensionOverrun,
            RtpError::BadPadding => Self::BadPadding,
            RtpError::RtcpLength => Self::RtcpLength,
        }
    }
}

/// Drops counted by reason. Serialised as an object with every reason as a key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    /// Counts one drop.
    pub fn add(&mut self, reason: DropReason) {
        if let Some(c) = self.0.get_mut(reason.index()) {
            *c += 1;
        }
    }

    /// Drops for `reason`.
    #[must_use]
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0.get(reason.index()).copied().unwrap_or(0)
    }

    /// Drops for every reason.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Adds `other`'s counts.
    pub fn accumulate(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }
}

impl Serialize for DropCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(DropReason::ALL.len()))?;
        for r in DropReason::ALL {
            m.serialize_entry(r.as_str(), &self.get(r))?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for DropCounts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = std::collections::BTreeMap::<DropReason, u64>::deserialize(d)?;
        let mut out = Self::default();
        for (r, n) in map {
            if let Some(c) = out.0.get_mut(r.index()) {
                *c = n;
            }
        }
        Ok(out)
    }
}

impl PartialOrd for DropReason {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DropReason {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.index().cmp(&other.index())
    }
}

/// A pair of values, one per [`Direction`]; serialised as `{"to_echo":…,"to_asterisk":…}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerDirection<T> {
    /// Packets from Asterisk toward the echo.
    pub to_echo: T,
    /// Packets from the echo toward Asterisk.
    pub to_asterisk: T,
}

impl<T> PerDirection<T> {
    /// The value for `d`.
    #[must_use]
    pub const fn get(&self, d: Direction) -> &T {
        match d {
            Direction::ToEcho => &self.to_echo,
            Direction::ToAsterisk => &self.to_asterisk,
        }
    }

    /// The value for `d`, mutably.
    pub fn get_mut(&mut self, d: Direction) -> &mut T {
        match d {
            Direction::ToEcho => &mut self.to_echo,
            Direction::ToAsterisk => &mut self.to_asterisk,
        }
    }
}

/// Why a channel closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Control removed it.
    Removed,
    /// No media in either direction for the idle timeout.
    Idle,
}

impl CloseReason {
    /// The metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Removed => "removed",
            Self::Idle => "idle",
        }
    }
}

/// Statistics of one channel: what `stats` and `remove` return.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// The channel's identifier.
    pub channel: crate::channel_id::ChannelId,
    /// Its socket slot in its shard.
    pub socket: u32,
    /// The data-plane shard that held it.
    #[serde(default)]
    pub shard: u32,
    /// Its local UDP port.
    pub port: u16,
    /// Its media format.
    pub format: crate::format::Format,
    /// Asterisk's RTP address, once known.
    pub asterisk: Option<std::net::SocketAddr>,
    /// Whether that address was latched from traffic rather than given by control.
    pub latched: bool,
    /// The echo server.
    pub echo: std::net::SocketAddr,
    /// Time since the channel opened, in nanoseconds.
    pub age_ns: u64,
    /// Time since its last forwarded packet (or its opening), in nanoseconds.
    pub idle_ns: u64,
    /// Packets and bytes forwarded, per direction.
    pub traffic: PerDirection<TrafficCounters>,
    /// RTP stream quality as received, per direction.
    pub streams: PerDirection<StreamCounters>,
    /// Round-trip accounting.
    pub round_trip: EchoCounters,
    /// Round-trip time distribution (T1 − T0).
    pub rtt: LatencySummary,
    /// How its packets were timed: by the kernel, or not at all (and why).
    #[serde(default)]
    pub timestamps: TimestampCounters,
    /// Datagrams dropped on this channel's socket, by reason.
    pub drops: DropCounts,
    /// The call's E-model score so far (final in the `remove` reply): see [`crate::score`].
    #[serde(default)]
    pub score: crate::score::Score,
    /// Its probe headers ([`crate::probe`]): `None` (left out of the JSON) while no valid probe
    /// header has crossed the channel either way, which is every real call's case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeStats>,
}

impl ChannelStats {
    /// A channel's statistics with nothing measured: zero counters, no addresses (the echo
    /// `0.0.0.0:0`), `ulaw`. What mergeable figures fill in when the channel's own final
    /// statistics are not there (its relay was lost).
    #[must_use]
    pub fn empty(channel: crate::channel_id::ChannelId) -> Self {
        Self {
            channel,
            socket: 0,
            shard: 0,
            port: 0,
            format: crate::format::Format::Ulaw,
            asterisk: None,
            latched: false,
            echo: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            age_ns: 0,
            idle_ns: 0,
            traffic: PerDirection::default(),
            streams: PerDirection::default(),
            round_trip: EchoCounters::default(),
            rtt: LatencySummary::default(),
            timestamps: TimestampCounters::default(),
            drops: DropCounts::default(),
            score: crate::score::Score::default(),
            probe: None,
        }
    }
}

/// What the relay saw of one channel's probe headers ([`crate::probe`]), the payloads of
/// `loadgen ari --callers rtp`.
///
/// Counts are of valid headers (magic and check), from the first one, before recognition too.
/// The two distributions start with the probe that completes recognition (the one before have no
/// recorded arrival), and are per channel at the precision of its round-trip histogram (1 %).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStats {
    /// Whether the channel is taken as carrying probes: [`crate::probe::RECOGNISE_AFTER`] valid
    /// headers in a row from Asterisk, of one call. Once recognised it stays so.
    pub recognised: bool,
    /// Distinct valid probes received from Asterisk (a duplicate counted once): what the caller
    /// sent minus this is what was lost before the relay, exactly.
    pub received: u64,
    /// Valid probes received back from the echo.
    pub returned: u64,
    /// Returns the relay wrote its two times into (on their way to Asterisk): those of a
    /// recognised channel whose arrival it had recorded, once each.
    pub written: u64,
    /// The relay's loop of each probe whose echo came back to its recorded arrival (the ones
    /// written, unless the relay had no wall-clock offset yet): its kernel arrival from Asterisk
    /// to the kernel arrival of its echo, exact.
    pub relay_loop: LatencySummary,
    /// Approximate Asterisk in: the relay's kernel arrival (`CLOCK_REALTIME`) minus the header's
    /// send time, a user-space clock reading the sender took before its send (so this includes
    /// the sender's own way into the kernel, and compares two hosts' clocks when they differ).
    pub asterisk_in: LatencySummary,
    /// Probes whose approximate Asterisk in came out zero or negative (the sender's clock ahead
    /// of the relay's): counted here, not recorded.
    pub asterisk_in_negative: u64,
}

/// The probe counters of a whole relay, over open and closed channels, with the distributions
/// of every probe channel merged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeTotals {
    /// Open channels recognised as carrying probes.
    pub channels: u32,
    /// Channels recognised since start (open and closed).
    pub recognised: u64,
    /// Valid probes received from Asterisk ([`ProbeStats::received`], summed).
    pub received: u64,
    /// Valid probes received back from the echo.
    pub returned: u64,
    /// Returns the relay wrote its times into.
    pub written: u64,
    /// Probes whose approximate Asterisk in was not positive.
    pub asterisk_in_negative: u64,
    /// The relay's loop of every probe measured (global precision, 0.1 %).
    pub relay_loop: LatencySummary,
    /// Approximate Asterisk in of every probe of a recognised channel.
    pub asterisk_in: LatencySummary,
}

impl ProbeTotals {
    /// Adds `other`'s counters (the distributions are left alone: they are recomputed from
    /// merged histograms).
    pub fn accumulate_counters(&mut self, other: &Self) {
        self.channels += other.channels;
        self.recognised += other.recognised;
        self.received += other.received;
        self.returned += other.returned;
        self.written += other.written;
        self.asterisk_in_negative += other.asterisk_in_negative;
    }

    /// Adds a closed channel's counters (it no longer counts in `channels`).
    pub fn add_closed(&mut self, p: &ProbeStats) {
        self.recognised += u64::from(p.recognised);
        self.received += p.received;
        self.returned += p.returned;
        self.written += p.written;
        self.asterisk_in_negative += p.asterisk_in_negative;
    }
}

/// Statistics of the whole relay, over open and closed channels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GlobalStats {
    /// Channels open.
    pub channels: u32,
    /// Whether the relay refuses new channels.
    pub draining: bool,
    /// Channels opened since start.
    pub channels_opened: u64,
    /// Channels closed because control removed them.
    pub channels_removed: u64,
    /// Channels closed for lack of media.
    pub channels_idle: u64,
    /// Packets and bytes forwarded, per direction.
    pub traffic: PerDirection<TrafficCounters>,
    /// RTP stream quality as received, per direction, summed over channels (jitter: the largest
    /// current value of an open channel).
    pub streams: PerDirection<StreamCounters>,
    /// Round-trip accounting.
    pub round_trip: EchoCounters,
    /// Datagrams dropped, by reason.
    pub drops: DropCounts,
    /// How packets were timed: by the kernel, or not at all (and why).
    #[serde(default)]
    pub timestamps: TimestampCounters,
    /// Round-trip time distribution.
    pub rtt: LatencySummary,
    /// Time inside the relay, per direction: the datagram's arrival (the kernel's receive stamp)
    /// to the kernel's transmit stamp of its forwarded send (with `--timestamps user`, an
    /// estimate of when that send left).
    pub forward: PerDirection<LatencySummary>,
    /// The wake-up part of `forward`: kernel arrival to the moment the relay's user space
    /// handled the datagram, per direction (empty with `--timestamps user`).
    #[serde(default)]
    pub receive_delay: PerDirection<LatencySummary>,
    /// Distribution of the per-packet jitter estimate, per direction.
    pub jitter: PerDirection<LatencySummary>,
    /// Distribution of per-packet lateness (transit above baseline), per direction.
    pub lateness: PerDirection<LatencySummary>,
    /// Probe headers ([`crate::probe`]) over every channel, and the two legs the relay sees.
    #[serde(default)]
    pub probe: ProbeTotals,
}

impl GlobalStats {
    /// Adds `other`'s counters (channels, traffic, streams, round trips, drops; `draining` if
    /// either is). The percentiles are left alone: they cannot be added, only recomputed from
    /// merged histograms ([`merge_global`]).
    pub fn accumulate_counters(&mut self, other: &Self) {
        self.channels += other.channels;
        self.draining |= other.draining;
        self.channels_opened += other.channels_opened;
        self.channels_removed += other.channels_removed;
        self.channels_idle += other.channels_idle;
        for d in Direction::ALL {
            self.traffic.get_mut(d).accumulate(other.traffic.get(d));
            self.streams.get_mut(d).accumulate(other.streams.get(d));
        }
        self.round_trip.accumulate(&other.round_trip);
        self.drops.accumulate(&other.drops);
        self.timestamps.accumulate(&other.timestamps);
        self.probe.accumulate_counters(&other.probe);
    }
}

/// A relay's global histograms: recorded per packet alongside each channel's own, they are the
/// distributions behind [`GlobalStats`]' percentiles. Exporters read them
/// ([`crate::Relay::histograms`]); [`merge_global`] merges several relays'.
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
    pub(crate) fn summarize_into(&self, stats: &mut GlobalStats) {
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

/// The one-pass summary gives each quantile as the histogram does and the exact mean, and a merge
/// keeps both.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_summary_matches_each_quantile_and_the_exact_mean() {
        let mut h = LatencyHistogram::<u64>::new(3);
        let mut rng = crate::rng::SplitMix64::new(9);
        let mut sum = 0u128;
        for _ in 0..50_000 {
            let v = 1_000 + rng.below(5_000_000);
            h.record(v);
            sum += u128::from(v);
        }
        h.record_n(7_000_000, 3);
        sum += 21_000_000;
        let s = h.summary();
        for (q, got) in [
            (0.5, s.p50_ns),
            (0.95, s.p95_ns),
            (0.99, s.p99_ns),
            (0.999, s.p999_ns),
        ] {
            assert_eq!(got, h.histogram().value_at_quantile(q), "q {q}");
        }
        assert_eq!(u128::from(s.mean_ns), (sum + 25_001) / 50_003);
        assert_eq!(h.sum_ns(), sum);
        let mut m = LatencyHistogram::<u64>::new(3);
        m.merge(&h);
        assert_eq!((m.sum_ns(), m.summary()), (h.sum_ns(), s));
    }
}
