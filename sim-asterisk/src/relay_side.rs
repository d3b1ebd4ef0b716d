//! What the relay measured over a run, as the tools report it beside their own figures: its
//! statistics ([`RelaySide`], read through [`crate::relay_client`]) and how much the relay's two
//! extra hops add to a round trip ([`Added`]). The simulator's report, `loadgen rtp`'s and
//! `loadgen ari`'s all carry them, which is why they live here, below loadgen.

use relay_proto::stats::PerDirection;
use relay_proto::{ChannelStats, GlobalStats, LatencySummary};
use serde::Serialize;

/// What the relay reported about the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RelaySide {
    /// The relay's round-trip distribution (global; assumes a relay dedicated to this run).
    pub rtt: LatencySummary,
    /// The relay's forwarding time, per direction.
    pub forward: PerDirection<LatencySummary>,
    /// Packets the relay counted lost on the echo's stream, over the run's channels.
    pub lost: u64,
    /// Duplicates it counted on the echo's stream.
    pub duplicates: u64,
    /// Reordered packets it counted on the echo's stream.
    pub reordered: u64,
    /// Echo timeouts over the run's channels.
    pub echo_timeouts: u64,
    /// Round trips it measured over the run's channels.
    pub measured: u64,
    /// Datagrams it dropped on the run's channels, all reasons.
    pub drops: u64,
    /// Of which from unknown sources.
    pub unknown_source_drops: u64,
    /// Datagrams it forwarded, both directions (global).
    pub forwarded: u64,
    /// CPU time (user + system) the relay process used over the run, when `--relay-pid` is given.
    pub cpu_ns: Option<u64>,
    /// `cpu_ns / forwarded`.
    pub cpu_ns_per_packet: Option<f64>,
}

impl RelaySide {
    /// Starts from the relay's global statistics (for the distributions).
    #[must_use]
    pub fn from_global(g: &GlobalStats) -> Self {
        Self {
            rtt: g.rtt,
            forward: g.forward,
            forwarded: g.traffic.to_echo.packets + g.traffic.to_asterisk.packets,
            ..Self::default()
        }
    }

    /// Everything from the relay's global statistics: for a relay dedicated to the run, whose
    /// closed channels' counts are in its totals.
    #[must_use]
    pub fn from_global_totals(g: &GlobalStats) -> Self {
        Self {
            lost: g.streams.to_asterisk.lost,
            duplicates: g.streams.to_asterisk.duplicates,
            reordered: g.streams.to_asterisk.reordered,
            echo_timeouts: g.round_trip.timeouts,
            measured: g.round_trip.matched,
            drops: g.drops.total(),
            unknown_source_drops: g.drops.get(relay_proto::DropReason::UnknownSource),
            ..Self::from_global(g)
        }
    }

    /// Sets the CPU figures from the relay's CPU time over the run.
    pub fn set_cpu(&mut self, cpu_ns: Option<u64>) {
        self.cpu_ns = cpu_ns;
        self.cpu_ns_per_packet = cpu_ns
            .filter(|_| self.forwarded > 0)
            .map(|c| c as f64 / self.forwarded as f64);
    }

    /// Adds one removed channel's final counts.
    pub fn add_channel(&mut self, s: &ChannelStats) {
        self.lost += s.streams.to_asterisk.lost;
        self.duplicates += s.streams.to_asterisk.duplicates;
        self.reordered += s.streams.to_asterisk.reordered;
        self.echo_timeouts += s.round_trip.timeouts;
        self.measured += s.round_trip.matched;
        self.drops += s.drops.total();
        self.unknown_source_drops += s.drops.get(relay_proto::DropReason::UnknownSource);
    }
}

/// Percentile differences, in nanoseconds (saturating at 0).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Added {
    /// p50 difference.
    pub p50_ns: u64,
    /// p95 difference.
    pub p95_ns: u64,
    /// p99 difference.
    pub p99_ns: u64,
    /// p99.9 difference.
    pub p999_ns: u64,
}

impl Added {
    /// `outer - inner`, percentile by percentile.
    #[must_use]
    pub const fn between(outer: &LatencySummary, inner: &LatencySummary) -> Self {
        Self {
            p50_ns: outer.p50_ns.saturating_sub(inner.p50_ns),
            p95_ns: outer.p95_ns.saturating_sub(inner.p95_ns),
            p99_ns: outer.p99_ns.saturating_sub(inner.p99_ns),
            p999_ns: outer.p999_ns.saturating_sub(inner.p999_ns),
        }
    }
}
