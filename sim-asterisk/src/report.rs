//! What the simulator reports once every call has ended: per call and overall, what Asterisk
//! saw of its own callers (answers, bridging, RTP sent and returned, strict-RTP drops, returns
//! left unmeasured for want of a transmit stamp, returns whose payload changed, round trip,
//! set-up time); what its bridges forwarded for Local pairs (`bridges`: per side of the relay,
//! frames forwarded, dropped by `--bridge-loss` and unrouted, see [`super::bridge`]); the faults
//! it injected, what was left over, and the relay's own figures when it was asked for them.
//!
//! Local pairs are not calls of `per_call` (they play nothing of the simulator's): their media
//! is counted in `bridges`, and measured by whoever plays into them (`loadgen ari`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use relay_proto::stats::{LatencyHistogram, LatencySummary};
use serde::Serialize;

use super::bridge::BridgeReport;
pub use super::world::CallEnd;
use super::world::Sim;
use crate::relay_side::{Added, RelaySide};

/// One caller's record in the report.
#[derive(Clone, Debug, Serialize)]
pub struct CallReport {
    /// The caller channel.
    pub id: String,
    /// Whether it was answered.
    pub answered: bool,
    /// Whether its externalMedia channel was bridged with it and RTP flowed.
    pub bridged: bool,
    /// Its externalMedia channel's format is none of its native formats: Asterisk transcodes
    /// the call (and the relay measures the transcoder too).
    pub transcoding: bool,
    /// How it ended.
    pub end: CallEnd,
    /// RTP packets sent to the relay.
    pub sent: u64,
    /// Packets that came back (first copies).
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// Copies of a packet already received.
    pub duplicates: u64,
    /// Returned packets dropped because they came from a wrong address (strict RTP).
    pub strict_rtp_drops: u64,
    /// Returned datagrams that were not RTP or not this stream's.
    pub malformed: u64,
    /// Returns not measured: the kernel's transmit stamp of their send never came (or could not
    /// be converted, or gave a round trip of zero or less).
    pub unstamped: u64,
    /// Returns whose payload was not the 160 bytes sent, byte for byte.
    pub payload_changed: u64,
    /// The longest silence between two returns, in milliseconds: across the call's
    /// externalMedia channels too, so that a move to another relay shows here.
    pub max_gap_ms: f64,
    /// Round trip Asterisk → relay → echo → relay → Asterisk.
    pub rtt: LatencySummary,
}

/// The simulator's report.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    /// Calls originated.
    pub calls: u32,
    /// Calls answered.
    pub answered: u64,
    /// Calls bridged with RTP flowing.
    pub bridged: u64,
    /// Calls the application hung up before their time.
    pub hung_up_by_app: u64,
    /// Calls whose externalMedia format differs from the caller's native format ("transcoding
    /// calls": a real Asterisk spends CPU on each and adds its transcoder to what is measured).
    pub transcoding_calls: u64,
    /// Packets sent, all calls.
    pub sent: u64,
    /// Packets back, all calls.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// `lost / sent`.
    pub loss_ratio: f64,
    /// Duplicates back.
    pub duplicates: u64,
    /// Strict-RTP drops, all calls.
    pub strict_rtp_drops: u64,
    /// Non-RTP or foreign datagrams.
    pub malformed: u64,
    /// Returns not measured for want of a usable transmit stamp, all calls.
    pub unstamped: u64,
    /// Returns whose payload was not what was sent, all calls.
    pub payload_changed: u64,
    /// End-to-end round trip, all calls.
    pub rtt: LatencySummary,
    /// Call set-up as Asterisk sees it: StasisStart of the caller to both channels bridged.
    pub setup: LatencySummary,
    /// First answer attempts failed on purpose.
    pub answer_404_injected: u64,
    /// Requests failed on purpose with 500 (`--fail`), by operation.
    pub injected_failures: BTreeMap<String, u64>,
    /// Times the events WebSockets were dropped on purpose.
    pub ws_drops: u64,
    /// WebSocket connections accepted.
    pub ws_connections: u64,
    /// Channels still existing when the report was made (should be 0).
    pub channels_left: usize,
    /// Bridges still existing when the report was made (should be 0).
    pub bridges_left: usize,
    /// Media forwarded through bridges for Local pairs, per side of the relay.
    pub bridges: BridgeReport,
    /// What the relay measured (its global statistics), with `--relay-ctl`.
    pub relay: Option<RelaySide>,
    /// End to end minus the relay's RTT, percentile by percentile: the two extra hops through
    /// the relay (an estimate), with `--relay-ctl`.
    pub added_by_relay: Option<Added>,
    /// Every call.
    pub per_call: Vec<CallReport>,
}

pub(super) fn report(sim: &Sim) -> SimReport {
    let w = sim.world();
    let mut all = LatencyHistogram::<u64>::new(3);
    let mut per_call = Vec::new();
    let mut setup = LatencyHistogram::<u64>::new(3);
    for (id, rec) in w.calls.values() {
        if let Some(d) = rec.setup {
            setup.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        }
        let f = &rec.figures;
        all.merge(&f.rtt);
        per_call.push(CallReport {
            id: id.clone(),
            answered: rec.answered,
            bridged: rec.bridged,
            transcoding: rec.transcoding,
            end: rec.end.unwrap_or(CallEnd::Active),
            sent: f.sent,
            received: f.received,
            lost: f.sent.saturating_sub(f.received),
            duplicates: f.duplicates,
            strict_rtp_drops: f.strict_drops,
            malformed: f.malformed,
            unstamped: f.unstamped,
            payload_changed: f.payload_changed,
            max_gap_ms: f.max_gap.as_secs_f64() * 1e3,
            rtt: f.rtt.summary(),
        });
    }
    let sum = |g: fn(&CallReport) -> u64| per_call.iter().map(g).sum::<u64>();
    let (sent, received) = (sum(|c| c.sent), sum(|c| c.received));
    let lost = sent.saturating_sub(received);
    #[allow(clippy::cast_precision_loss)] // a ratio
    let loss_ratio = if sent == 0 {
        0.0
    } else {
        lost as f64 / sent as f64
    };
    SimReport {
        calls: u32::try_from(per_call.len()).unwrap_or(u32::MAX),
        answered: sum(|c| u64::from(c.answered)),
        bridged: sum(|c| u64::from(c.bridged)),
        hung_up_by_app: sum(|c| u64::from(c.end == CallEnd::HungUpByApp)),
        transcoding_calls: sum(|c| u64::from(c.transcoding)),
        sent,
        received,
        lost,
        loss_ratio,
        duplicates: sum(|c| c.duplicates),
        strict_rtp_drops: sum(|c| c.strict_rtp_drops),
        malformed: sum(|c| c.malformed),
        unstamped: sum(|c| c.unstamped),
        payload_changed: sum(|c| c.payload_changed),
        rtt: all.summary(),
        setup: setup.summary(),
        answer_404_injected: sim.injected_404.load(Ordering::Relaxed),
        injected_failures: sim
            .injected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
        ws_drops: sim.ws_drops.load(Ordering::Relaxed),
        ws_connections: sim.ws_connections.load(Ordering::Relaxed),
        channels_left: w.channels.len(),
        bridges_left: w.bridges.len(),
        bridges: sim.bridges.report(),
        relay: None,
        added_by_relay: None,
        per_call,
    }
}

/// The report as text.
#[must_use]
pub fn render(r: &SimReport) -> String {
    use std::fmt::Write as _;
    let ms = |ns: u64| ns as f64 / 1e6;
    let row = |name: &str, s: &LatencySummary| {
        format!(
            "  {name:<31} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}  ({} samples)\n",
            ms(s.p50_ns),
            ms(s.p95_ns),
            ms(s.p99_ns),
            ms(s.p999_ns),
            ms(s.max_ns),
            s.count
        )
    };
    let mut out =
        String::from("rtp-relay pipeline report (sim-asterisk -> control -> relay -> echo)\n");
    // Serving only (`--calls 0`, the callers someone else's): no calls of its own to report.
    let own_calls = r.calls > 0;
    if own_calls {
        let _ = write!(
            out,
            "calls: {} originated, {} answered, {} bridged, {} hung up by control, {} transcoding\n\
             RTP at Asterisk: sent {} returned {} lost {} ({:.4} %), duplicates {}, strict-RTP drops {}, malformed {}, unstamped {}, payload changed {}\n",
            r.calls,
            r.answered,
            r.bridged,
            r.hung_up_by_app,
            r.transcoding_calls,
            r.sent,
            r.received,
            r.lost,
            r.loss_ratio * 100.0,
            r.duplicates,
            r.strict_rtp_drops,
            r.malformed,
            r.unstamped,
            r.payload_changed,
        );
    }
    let _ = write!(
        out,
        "faults: {} answers failed with 404, {} WebSocket drops ({} connections), failed on purpose {:?}\n\
         left over: {} channels, {} bridges\n\
         latency (ms){:>30}{:>9}{:>9}{:>9}{:>9}\n",
        r.answer_404_injected,
        r.ws_drops,
        r.ws_connections,
        r.injected_failures,
        r.channels_left,
        r.bridges_left,
        "p50",
        "p95",
        "p99",
        "p99.9",
        "max",
    );
    if own_calls {
        out.push_str(&row("call set-up (StasisStart..RTP)", &r.setup));
        out.push_str(&row("end to end (at Asterisk)", &r.rtt));
    }
    if let (Some(v), Some(added)) = (&r.relay, &r.added_by_relay) {
        out.push_str(&row("relay RTT (T1 - T0)", &v.rtt));
        if own_calls {
            let _ = writeln!(
                out,
                "  {:<31} {:>8.3} {:>17.3}",
                "added by the relay",
                ms(added.p50_ns),
                ms(added.p99_ns)
            );
        }
        out.push_str(&row("relay forward to echo", &v.forward.to_echo));
        out.push_str(&row("relay forward to Asterisk", &v.forward.to_asterisk));
        let _ = write!(
            out,
            "relay: forwarded {}, measured {}, lost {}, echo timeouts {}, drops {} (unknown source {})",
            v.forwarded, v.measured, v.lost, v.echo_timeouts, v.drops, v.unknown_source_drops
        );
        if let Some(c) = v.cpu_ns_per_packet {
            let _ = write!(out, ", CPU {c:.0} ns per forwarded packet");
        }
        out.push('\n');
    }
    let b = &r.bridges;
    let side = |s: &super::bridge::SideReport| {
        format!(
            "forwarded {}, dropped {}, unrouted {}",
            s.forwarded, s.dropped, s.unrouted
        )
    };
    if b.local_pairs > 0
        || b.toward_relay != Default::default()
        || b.toward_caller != Default::default()
    {
        let _ = writeln!(
            out,
            "bridges (Local pairs: {}; per traversal {:.3} ms + jitter [0, {:.3}) ms, loss {}):\n\
             \x20 toward the relay: {}\n\
             \x20 toward the caller: {}\n\
             \x20 {} traversals, strict-RTP drops {}, malformed {}",
            b.local_pairs,
            ms(b.delay_ns),
            ms(b.jitter_ns),
            b.loss,
            side(&b.toward_relay),
            side(&b.toward_caller),
            b.traversals,
            b.strict_rtp_drops,
            b.malformed,
        );
    }
    out
}
