//! The published snapshot: what each shard hands the scrape, so that the data plane never shares a
//! lock with it. Every publish interval (default 500 ms) a shard's [`Publisher`] builds a
//! [`Snapshot`] (global counters, the backend's counters, the thread's CPU time, and Prometheus
//! buckets derived from the core's HdrHistograms) and swaps it into its own [`ArcSwap`]; the
//! scrape merges whatever snapshots are current ([`Snapshot::merge`]: counters and bucket counts
//! summed, on the scraping thread). Deriving buckets from the HdrHistograms at publish time costs
//! the packet path nothing, and the Prometheus quantiles agree with the relay's own percentiles
//! to within one bucket because they come from the same data.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use relay_proto::stats::GlobalHistograms;
use relay_proto::stats::{LatencyHistogram, PerDirection};
use relay_proto::{Direction, GlobalStats, MonoTime, Relay};

use crate::counters::BackendCounters;

/// Upper bounds of the latency histograms' buckets, in nanoseconds: 10 µs to 1 s, six a decade.
pub const LATENCY_BOUNDS_NS: [u64; 31] = [
    10_000,
    15_000,
    20_000,
    30_000,
    50_000,
    75_000, //
    100_000,
    150_000,
    200_000,
    300_000,
    500_000,
    750_000, //
    1_000_000,
    1_500_000,
    2_000_000,
    3_000_000,
    5_000_000,
    7_500_000, //
    10_000_000,
    15_000_000,
    20_000_000,
    30_000_000,
    50_000_000,
    75_000_000, //
    100_000_000,
    150_000_000,
    200_000_000,
    300_000_000,
    500_000_000,
    750_000_000, //
    1_000_000_000,
];

/// A histogram in Prometheus form: cumulative counts at [`LATENCY_BOUNDS_NS`], total, sum.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    /// Cumulative count at each bound.
    pub cumulative: Vec<u64>,
    /// Values recorded.
    pub count: u64,
    /// Sum of the values, in seconds.
    pub sum_seconds: f64,
}

impl Buckets {
    /// Adds `other`'s counts (the same bounds).
    pub fn accumulate(&mut self, other: &Self) {
        if self.cumulative.len() < other.cumulative.len() {
            // An empty one (a shard that has not published yet) has no bounds: take the other's
            // shape, keeping this one's total in every bucket.
            self.cumulative.resize(other.cumulative.len(), self.count);
        }
        for (a, b) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *a += b;
        }
        self.count += other.count;
        self.sum_seconds += other.sum_seconds;
    }

    /// Bins every recorded value of `h` by its lowest equivalent value.
    #[must_use]
    pub fn from_hdr<T: hdrhistogram::Counter>(h: &LatencyHistogram<T>) -> Self {
        let hist = h.histogram();
        let mut per = vec![0u64; LATENCY_BOUNDS_NS.len()];
        for v in hist.iter_recorded() {
            let low = hist.lowest_equivalent(v.value_iterated_to());
            let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < low);
            if let Some(c) = per.get_mut(i) {
                *c += v.count_at_value().as_u64();
            }
        }
        let mut acc = 0;
        let cumulative = per
            .into_iter()
            .map(|c| {
                acc += c;
                acc
            })
            .collect();
        Self {
            cumulative,
            count: hist.len(),
            sum_seconds: h.sum_ns() as f64 / 1e9,
        }
    }
}

/// Everything `/metrics` shows, as of one moment on the data plane.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The backend's name.
    pub backend: &'static str,
    /// Where send times come from (`kernel` or `user`).
    pub timestamps: &'static str,
    /// How packets reach the echo (`per-channel` or `shared`).
    pub echo_leg: &'static str,
    /// When it was taken, on the relay's clock.
    pub taken: MonoTime,
    /// The core's global statistics.
    pub global: Option<GlobalStats>,
    /// The backend's counters.
    pub counters: BackendCounters,
    /// Round-trip times.
    pub rtt: Buckets,
    /// Time inside the relay, per direction.
    pub forward: PerDirection<Buckets>,
    /// Kernel arrival to user-space handling, per direction.
    pub receive_delay: PerDirection<Buckets>,
    /// Jitter estimates, per direction.
    pub jitter: PerDirection<Buckets>,
    /// Lateness, per direction.
    pub lateness: PerDirection<Buckets>,
    /// Scores of closed channels.
    pub calls: relay_proto::score::ScoreHistograms,
    /// The relay's loop of each probe (arrival from Asterisk to its echo's arrival).
    pub probe_loop: Buckets,
    /// Approximate Asterisk in of each probe of a recognised probe channel.
    pub probe_asterisk_in: Buckets,
    /// Lost packets, per direction, never decreasing between snapshots (a late packet that
    /// fills a gap lowers the core's count; a Prometheus counter must not go down).
    pub lost: PerDirection<u64>,
    /// The shard that published it.
    pub shard: u32,
    /// CPU time its thread has used, in nanoseconds (10 ms resolution: `/proc`'s).
    pub cpu_ns: u64,
}

impl Snapshot {
    /// Several shards' snapshots as one relay's: every counter and bucket count summed (the
    /// global statistics' percentiles are not used by the metrics, so not merged here).
    #[must_use]
    pub fn merge(parts: &[Arc<Self>]) -> Self {
        let Some(first) = parts.first() else {
            return Self::default();
        };
        let mut m = Self {
            backend: first.backend,
            timestamps: first.timestamps,
            echo_leg: first.echo_leg,
            taken: parts.iter().map(|p| p.taken).max().unwrap_or_default(),
            calls: relay_proto::score::ScoreHistograms::new(),
            ..Self::default()
        };
        let mut global = GlobalStats::default();
        for p in parts {
            if let Some(g) = &p.global {
                global.accumulate_counters(g);
            }
            m.counters.accumulate(&p.counters);
            m.rtt.accumulate(&p.rtt);
            m.probe_loop.accumulate(&p.probe_loop);
            m.probe_asterisk_in.accumulate(&p.probe_asterisk_in);
            for d in Direction::ALL {
                for (a, b) in [
                    (&mut m.forward, &p.forward),
                    (&mut m.receive_delay, &p.receive_delay),
                    (&mut m.jitter, &p.jitter),
                    (&mut m.lateness, &p.lateness),
                ] {
                    a.get_mut(d).accumulate(b.get(d));
                }
                *m.lost.get_mut(d) += p.lost.get(d);
            }
            m.calls.merge(&p.calls);
            m.cpu_ns += p.cpu_ns;
        }
        m.global = Some(global);
        m
    }
}

/// The data plane's side: builds and swaps in snapshots.
#[derive(Debug)]
pub struct Publisher {
    /// Where snapshots go.
    shared: Arc<ArcSwap<Snapshot>>,
    /// The backend's name.
    backend: &'static str,
    /// Where send times come from.
    timestamps: &'static str,
    /// How often to publish.
    interval: Duration,
    /// When to publish next.
    next: MonoTime,
    /// The shard publishing.
    shard: u32,
}

impl Publisher {
    /// A publisher for shard `shard` of `backend` into `shared`, every `interval`.
    #[must_use]
    pub fn new(
        shared: Arc<ArcSwap<Snapshot>>,
        backend: &'static str,
        timestamps: &'static str,
        interval: Duration,
        shard: u32,
    ) -> Self {
        Self {
            shared,
            backend,
            timestamps,
            interval,
            next: MonoTime::ZERO,
            shard,
        }
    }

    /// When the next snapshot is due.
    #[must_use]
    pub const fn deadline(&self) -> MonoTime {
        self.next
    }

    /// Publishes if due.
    pub fn maybe_publish(&mut self, now: MonoTime, relay: &Relay, counters: &BackendCounters) {
        if now >= self.next {
            self.publish(now, relay, counters);
        }
    }

    /// Publishes now (on the shard's own thread: it reads that thread's CPU time).
    pub fn publish(&mut self, now: MonoTime, relay: &Relay, counters: &BackendCounters) {
        self.next = now + self.interval;
        let global = relay.global_stats();
        let h: &GlobalHistograms = relay.histograms();
        let per = |p: &PerDirection<LatencyHistogram>| PerDirection {
            to_echo: Buckets::from_hdr(&p.to_echo),
            to_asterisk: Buckets::from_hdr(&p.to_asterisk),
        };
        let prev = self.shared.load();
        let lost = PerDirection {
            to_echo: global.streams.to_echo.lost.max(prev.lost.to_echo),
            to_asterisk: global.streams.to_asterisk.lost.max(prev.lost.to_asterisk),
        };
        self.shared.store(Arc::new(Snapshot {
            backend: self.backend,
            timestamps: self.timestamps,
            echo_leg: prev.echo_leg,
            taken: now,
            global: Some(global),
            counters: counters.clone(),
            rtt: Buckets::from_hdr(&h.rtt),
            forward: per(&h.forward),
            receive_delay: per(&h.receive_delay),
            jitter: per(&h.jitter),
            lateness: per(&h.lateness),
            calls: h.calls.clone(),
            probe_loop: Buckets::from_hdr(&h.probe_loop),
            probe_asterisk_in: Buckets::from_hdr(&h.probe_asterisk_in),
            lost,
            shard: self.shard,
            cpu_ns: relay_io::thread_cpu_ns().unwrap_or(prev.cpu_ns),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_match_hdr() {
        let mut h = LatencyHistogram::<u64>::new(3);
        for ns in [9_000, 10_000, 12_000, 40_000, 40_000, 2_000_000_000] {
            h.record(ns);
        }
        let b = Buckets::from_hdr(&h);
        assert_eq!(b.count, 6);
        assert_eq!(b.cumulative[0], 2, "≤ 10 µs");
        assert_eq!(b.cumulative[1], 3, "≤ 15 µs");
        assert_eq!(b.cumulative[4], 5, "≤ 50 µs");
        assert_eq!(*b.cumulative.last().unwrap(), 5, "2 s is above every bound");
        assert!((b.sum_seconds - 2.000_111).abs() < 0.01);
    }
}
