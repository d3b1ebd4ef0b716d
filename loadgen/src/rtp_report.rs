//! `loadgen rtp`'s report: what a run measured, printed as text ([`Report`]'s `Display`) and
//! written as JSON (`--json`), and the SLA check (`--max-loss`, `--max-p99`).
//!
//! Three views of latency:
//! - **end to end**: loadgen's own round trip, what a caller of the relay sees: from the
//!   kernel's transmit stamp of each send (T0) to the kernel's receive stamp of its return (T1);
//!   a return that cannot be timed by both stamps is counted in `timestamps_missing`, never
//!   recorded;
//! - **relay RTT**: the relay's T1 − T0, the echo round trip it measures (its global histogram);
//! - **added by the relay**: end to end minus the relay's RTT, percentile by percentile: the cost
//!   of two extra hops through the relay (an estimate: the difference of two distributions'
//!   percentiles, not the percentile of per-packet differences). The relay's own
//!   receive-to-send forwarding times are reported beside it.

use std::fmt;

use relay_proto::stats::LatencyHistogram;
use relay_proto::LatencySummary;
use serde::Serialize;
pub use sim_asterisk::relay_side::{Added, RelaySide};

/// The run as it was planned: what the report states beside what was measured.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Channels asked for.
    pub channels: u32,
    /// How long they sent.
    pub duration: std::time::Duration,
    /// Packet interval.
    pub ptime: std::time::Duration,
}

/// What one channel saw, for the report.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChanTotals {
    /// Packets sent.
    pub sent: u64,
    /// Packets whose first return was measured.
    pub matched: u64,
    /// RTP loss of the returned stream (A.1).
    pub lost: u64,
    /// Duplicates returned.
    pub duplicates: u64,
    /// Reordered returns.
    pub reordered: u64,
    /// Late returns.
    pub late: u64,
    /// Returns with a wrong payload.
    pub corrupt: u64,
    /// Datagrams from a wrong source or SSRC.
    pub wrong_source: u64,
}

/// How loadgen timed its own round trips.
#[derive(Clone, Copy, Debug, Default)]
pub struct StampTotals {
    /// `kernel` (T0 the kernel's transmit stamp, T1 its receive stamp) or `user`.
    pub source: &'static str,
    /// Where transmit stamps came from: `error_queue`, `ring` (io_uring's command) or `none`.
    pub tx_source: &'static str,
    /// Returns whose round trip could not be taken from two kernel stamps.
    pub missing: u64,
    /// Transmit stamps that settled nothing.
    pub stale: u64,
}

/// Packets of the measured window (after the warm-up).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Window {
    /// Sent.
    pub sent: u64,
    /// Returned.
    pub returned: u64,
}

/// The report of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Channels asked for.
    pub channels: u32,
    /// Channels the relay accepted.
    pub channels_added: usize,
    /// Sending time, seconds.
    pub duration_s: f64,
    /// Packet interval, milliseconds.
    pub ptime_ms: f64,
    /// Packets sent.
    pub packets_sent: u64,
    /// Packets whose first return was measured.
    pub packets_received: u64,
    /// Sent and never returned.
    pub lost: u64,
    /// `lost / packets_sent`.
    pub loss_ratio: f64,
    /// Missing from the returned RTP streams before their highest sequence (RFC 3550 A.1); packets
    /// lost at the very end of a stream count in `lost` but not here.
    pub rtp_lost: u64,
    /// Returns later than the lateness threshold.
    pub late: u64,
    /// Duplicate returns.
    pub duplicates: u64,
    /// Reordered returns.
    pub reordered: u64,
    /// Returns whose payload differed from what was sent.
    pub corrupt: u64,
    /// Datagrams from a wrong source or SSRC.
    pub wrong_source: u64,
    /// How end-to-end round trips were timed: `kernel` (T0 the kernel's transmit stamp of the
    /// send, T1 its receive stamp of the return) or `user` (the kernel refused stamps: T0 read
    /// before the submission, T1 at handling).
    pub timestamps: &'static str,
    /// Where transmit stamps came from: `error_queue` (the sockets' error queues, the default),
    /// `ring` (io_uring's command, [`crate::rtp::Tuning::tx_stamps_command`]) or `none`.
    pub tx_timestamps: &'static str,
    /// Returns (in the measured window) whose round trip could not be taken from two kernel
    /// stamps: the transmit stamp never came, a clock step, or T1 not after T0. Counted in
    /// `packets_received`, not in `e2e_rtt`.
    pub timestamps_missing: u64,
    /// Transmit stamps that settled nothing (an id no send waits for).
    pub timestamps_stale: u64,
    /// End-to-end round trip: T1 − T0 of each first return, both kernel stamps.
    pub e2e_rtt: LatencySummary,
    /// What the relay reported.
    pub relay: RelaySide,
    /// End to end minus relay RTT.
    pub added_by_relay: Added,
    /// The measured window (after `--warmup`): end-to-end latency and relay CPU cover it.
    pub window: Window,
}

impl Report {
    /// Assembles the report.
    #[must_use]
    pub fn build(
        cfg: &Plan,
        added: usize,
        chans: &[ChanTotals],
        e2e: &LatencyHistogram<u64>,
        mut relay: RelaySide,
        window: Window,
        stamps: StampTotals,
    ) -> Self {
        // Per packet crossing the forwarder (both directions) in the measured window: the same
        // for the relay and for a static target that keeps no count.
        let crossings = window.sent + window.returned;
        relay.cpu_ns_per_packet = relay
            .cpu_ns
            .filter(|_| crossings > 0)
            .map(|c| c as f64 / crossings as f64);
        let sum = |f: fn(&ChanTotals) -> u64| chans.iter().map(f).sum::<u64>();
        let sent = sum(|c| c.sent);
        let received = sum(|c| c.matched);
        let e2e = e2e.summary();
        let r = relay.rtt;
        Self {
            channels: cfg.channels,
            channels_added: added,
            duration_s: cfg.duration.as_secs_f64(),
            ptime_ms: cfg.ptime.as_secs_f64() * 1e3,
            packets_sent: sent,
            packets_received: received,
            lost: sent - received.min(sent),
            loss_ratio: if sent == 0 {
                0.0
            } else {
                (sent - received.min(sent)) as f64 / sent as f64
            },
            rtp_lost: sum(|c| c.lost),
            late: sum(|c| c.late),
            duplicates: sum(|c| c.duplicates),
            reordered: sum(|c| c.reordered),
            corrupt: sum(|c| c.corrupt),
            wrong_source: sum(|c| c.wrong_source),
            timestamps: stamps.source,
            tx_timestamps: stamps.tx_source,
            timestamps_missing: stamps.missing,
            timestamps_stale: stamps.stale,
            added_by_relay: Added::between(&e2e, &r),
            e2e_rtt: e2e,
            relay,
            window,
        }
    }

    /// The SLA violations, if any.
    #[must_use]
    pub fn violations(
        &self,
        max_loss: Option<f64>,
        max_p99: Option<std::time::Duration>,
    ) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(m) = max_loss {
            if self.loss_ratio > m {
                v.push(format!(
                    "loss {:.4}% exceeds --max-loss {:.4}%",
                    self.loss_ratio * 100.0,
                    m * 100.0
                ));
            }
        }
        if let Some(m) = max_p99 {
            let p99 = std::time::Duration::from_nanos(self.e2e_rtt.p99_ns);
            if p99 > m {
                v.push(format!("end-to-end p99 {p99:?} exceeds --max-p99 {m:?}"));
            }
        }
        v
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn row(f: &mut fmt::Formatter<'_>, name: &str, s: &LatencySummary) -> fmt::Result {
    writeln!(
        f,
        "  {name:<22} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}   ({} samples)",
        ms(s.p50_ns),
        ms(s.p95_ns),
        ms(s.p99_ns),
        ms(s.p999_ns),
        ms(s.max_ns),
        s.count
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "rtp-relay load report")?;
        writeln!(
            f,
            "  channels {}/{}   duration {:.1} s   ptime {:.0} ms",
            self.channels_added, self.channels, self.duration_s, self.ptime_ms
        )?;
        writeln!(
            f,
            "  packets sent {}   returned {}   lost {} ({:.4} %)   late {}   duplicates {}   reordered {}   corrupt {}   wrong source {}",
            self.packets_sent,
            self.packets_received,
            self.lost,
            self.loss_ratio * 100.0,
            self.late,
            self.duplicates,
            self.reordered,
            self.corrupt,
            self.wrong_source
        )?;
        writeln!(
            f,
            "  relay: measured {}   lost {}   duplicates {}   reordered {}   echo timeouts {}   drops {} (unknown source {})",
            self.relay.measured,
            self.relay.lost,
            self.relay.duplicates,
            self.relay.reordered,
            self.relay.echo_timeouts,
            self.relay.drops,
            self.relay.unknown_source_drops
        )?;
        writeln!(
            f,
            "  end to end timed by {} stamps   not timed {}",
            self.timestamps, self.timestamps_missing
        )?;
        writeln!(
            f,
            "  latency (ms)                 p50       p95       p99     p99.9       max"
        )?;
        row(f, "end to end", &self.e2e_rtt)?;
        row(f, "relay RTT (echo)", &self.relay.rtt)?;
        let a = self.added_by_relay;
        writeln!(
            f,
            "  {:<22} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            "added by the relay",
            ms(a.p50_ns),
            ms(a.p95_ns),
            ms(a.p99_ns),
            ms(a.p999_ns)
        )?;
        row(f, "relay forward to echo", &self.relay.forward.to_echo)?;
        row(f, "relay forward to ast.", &self.relay.forward.to_asterisk)?;
        match self.relay.cpu_ns_per_packet {
            Some(c) => writeln!(
                f,
                "  relay CPU: {:.3} s for {} packets forwarded = {:.0} ns per packet",
                self.relay.cpu_ns.unwrap_or(0) as f64 / 1e9,
                self.window.sent + self.window.returned,
                c
            ),
            None => writeln!(f, "  relay CPU: not measured (give --relay-pid)"),
        }
    }
}
