//! What `bench compare` measured, apart from how: the points, the whole result as it is written
//! to `compare.json` (and read back by `bench plot`), and the table printed from it. The chart
//! ([`crate::chart`]) and the comparison ([`crate::compare`]) both use these types; neither
//! depends on the other.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Paced load: 50 packets/s per direction per channel.
    Paced,
    /// Maximum rate: queued bursts drained.
    Drain,
}

/// One measured point.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Point {
    /// Target name.
    pub(crate) target: String,
    /// Channels.
    pub(crate) channels: u32,
    /// Packets that crossed the forwarder in the window (both directions).
    pub(crate) packets: u64,
    /// Forwarder CPU time over the window, nanoseconds.
    pub(crate) cpu_ns: u64,
    /// `cpu_ns / packets`.
    pub(crate) cpu_ns_per_packet: f64,
    /// io_uring_enter calls (or wake-ups) per packet, where counted.
    pub(crate) enters_per_packet: Option<f64>,
    /// Packets sent and not returned (whole run).
    pub(crate) lost: u64,
    /// End-to-end p50 minus the baseline's, microseconds (paced mode, when the baseline was
    /// measured).
    pub(crate) added_p50_us: Option<f64>,
    /// End-to-end p99 minus the baseline's, microseconds.
    pub(crate) added_p99_us: Option<f64>,
    /// End-to-end max minus the baseline's, microseconds.
    pub(crate) added_max_us: Option<f64>,
    /// The relay's own receive-to-send time, p99 over both directions' worst, microseconds
    /// (relay targets only: the others do not measure themselves).
    pub(crate) forward_p99_us: Option<f64>,
    /// Drain mode: packets per second forwarded.
    pub(crate) drain_pps: Option<f64>,
    /// Why the point was not run, if it was not (the target is not installed here).
    pub(crate) skipped: Option<String>,
    /// Why the point failed, if it did (refused set-up, a crash, no traffic, an interruption):
    /// the run went on without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

impl Point {
    /// A point that could not be measured, and why.
    #[must_use]
    pub(crate) fn failed(target: &str, channels: u32, error: String) -> Self {
        Self {
            target: target.into(),
            channels,
            error: Some(error),
            ..Self::default()
        }
    }

    /// Whether it holds figures (neither skipped nor failed).
    #[must_use]
    pub(crate) fn measured(&self) -> bool {
        self.skipped.is_none() && self.error.is_none()
    }
}

/// The whole result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Results {
    /// The mode.
    pub(crate) mode: Mode,
    /// Measured seconds per point.
    pub(crate) duration_s: f64,
    /// Machine description.
    pub(crate) machine: String,
    /// Every point.
    pub(crate) points: Vec<Point>,
    /// The run stopped early (Ctrl-C or SIGTERM): the points are what was measured so far.
    #[serde(default)]
    pub(crate) interrupted: bool,
}

impl Results {
    /// Points that failed.
    pub(crate) fn failures(&self) -> impl Iterator<Item = &Point> {
        self.points.iter().filter(|p| p.error.is_some())
    }
}

/// The table: one block per channel count, CPU ratios against `uring`.
#[must_use]
pub(crate) fn table(r: &Results) -> String {
    let mut out = String::new();
    let mut by_n: BTreeMap<u32, Vec<&Point>> = BTreeMap::new();
    for p in &r.points {
        by_n.entry(p.channels).or_default().push(p);
    }
    let paced = r.mode == Mode::Paced;
    let _ = if paced {
        writeln!(
            out,
            "machine: {}; paced, {:.0} s measured per point after a warm-up",
            r.machine, r.duration_s
        )
    } else {
        writeln!(
            out,
            "machine: {}; drain: bursts queued on every socket while the forwarder is stopped",
            r.machine
        )
    };
    let opt = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"));
    for (n, ps) in by_n {
        let uring = ps
            .iter()
            .find(|p| p.target == "uring" && p.measured())
            .map(|p| p.cpu_ns_per_packet);
        let _ = if paced {
            writeln!(
                out,
                "\n{n} channels ({} packets/s through the forwarder)",
                u64::from(n) * 100
            )
        } else {
            writeln!(out, "\n{n} channels")
        };
        let _ = if paced {
            writeln!(
                out,
                "  {:<10} {:>11} {:>9} {:>11} {:>7} {:>13} {:>13} {:>13} {:>13}",
                "target",
                "CPU ns/pkt",
                "vs uring",
                "enters/pkt",
                "lost",
                "added p50 µs",
                "added p99 µs",
                "added max µs",
                "fwd p99 µs"
            )
        } else {
            writeln!(
                out,
                "  {:<10} {:>11} {:>9} {:>7} {:>14}",
                "target", "CPU ns/pkt", "vs uring", "lost", "packets/s"
            )
        };
        for p in ps {
            if let Some(why) = &p.skipped {
                let _ = writeln!(out, "  {:<10} skipped: {why}", p.target);
                continue;
            }
            if let Some(why) = &p.error {
                let _ = writeln!(out, "  {:<10} failed: {why}", p.target);
                continue;
            }
            let ratio = uring.filter(|u| *u > 0.0).map_or_else(
                || "-".into(),
                |u| format!("{:.2}x", p.cpu_ns_per_packet / u),
            );
            let _ = if paced {
                writeln!(
                    out,
                    "  {:<10} {:>11.0} {:>9} {:>11} {:>7} {:>13} {:>13} {:>13} {:>13}",
                    p.target,
                    p.cpu_ns_per_packet,
                    ratio,
                    opt(p.enters_per_packet, 3),
                    p.lost,
                    opt(p.added_p50_us, 1),
                    opt(p.added_p99_us, 1),
                    opt(p.added_max_us, 1),
                    opt(p.forward_p99_us, 1),
                )
            } else {
                writeln!(
                    out,
                    "  {:<10} {:>11.0} {:>9} {:>7} {:>14}",
                    p.target,
                    p.cpu_ns_per_packet,
                    ratio,
                    p.lost,
                    opt(p.drain_pps, 0),
                )
            };
        }
    }
    if r.interrupted {
        out.push_str("\ninterrupted: the points above are what was measured before the stop\n");
    }
    out
}
