//! Control's Prometheus metrics (namespace `rtprelay_control_`): what an operator needs to see
//! whether calls are being set up, how fast, what fails and where, and whether control's links to
//! Asterisk and the relay are healthy. Registered once, updated where things happen, rendered by
//! `/metrics`.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use relay_proto::stats::{LatencyHistogram, LatencySummary};

/// Where a call's set-up failed (the `stage` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Answering the caller.
    Answer,
    /// No relay port free.
    Port,
    /// Adding or updating the relay channel.
    Relay,
    /// Creating the externalMedia channel, or waiting for it to enter Stasis.
    ExternalMedia,
    /// Creating the bridge or adding the channels to it.
    Bridge,
}

impl Stage {
    /// The label value.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Answer => "answer",
            Self::Port => "port",
            Self::Relay => "relay",
            Self::ExternalMedia => "external_media",
            Self::Bridge => "bridge",
        }
    }
}

/// How a call ended (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Bridged, then ended normally.
    Completed,
    /// The caller left before set-up finished.
    Abandoned,
    /// Hung up because no relay port was free.
    NoPort,
    /// Set-up failed at some stage.
    Failed,
    /// No relay had room: at set-up, or when the call's relay was lost.
    NoRelay,
}

impl Outcome {
    /// The label value.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Abandoned => "abandoned",
            Self::NoPort => "no_port",
            Self::Failed => "failed",
            Self::NoRelay => "no_relay",
        }
    }
}

/// Every metric control exports.
#[derive(Debug)]
pub struct Metrics {
    /// Every metric's name, as registered (a labelled one shows on `/metrics` only once it has
    /// a value; this lists it from the start).
    names: Vec<String>,
    registry: Registry,
    /// Calls in progress (set up or being set up).
    pub calls_active: IntGauge,
    /// Calls bridged so far.
    pub calls_bridged: IntCounter,
    /// Calls ended, by outcome.
    pub calls: IntCounterVec,
    /// Set-up failures, by stage.
    pub setup_failures: IntCounterVec,
    /// Set-up time, StasisStart to both channels bridged.
    pub setup_seconds: Histogram,
    /// ARI requests by operation and HTTP status (`error` when no status came back).
    pub ari_requests: IntCounterVec,
    /// ARI request time by operation.
    pub ari_seconds: HistogramVec,
    /// Ports free.
    pub ports_free: IntGauge,
    /// Ports in use.
    pub ports_in_use: IntGauge,
    /// Calls refused because no port was free.
    pub ports_exhausted: IntCounter,
    /// Events WebSocket reconnections.
    pub ws_reconnects: IntCounter,
    /// Whether the events WebSocket is connected.
    pub ws_connected: IntGauge,
    /// Relay reconnections followed by a resync.
    pub relay_resyncs: IntCounter,
    /// Whether the relay's control socket is connected.
    pub relay_connected: IntGauge,
    /// Each relay of the pool by state (`connected`, `disconnected`): 1 in its current state.
    pub relays: IntGaugeVec,
    /// Channels control holds on each relay.
    pub relay_calls: IntGaugeVec,
    /// Calls moved to another relay after theirs was lost.
    pub calls_moved: IntCounter,
    /// Relay channels re-added by resyncs.
    pub relay_readded: IntCounter,
    /// Objects cleaned up by reconciliation, by kind.
    pub reconciled: IntCounterVec,
    /// Events received, by type.
    pub events: IntCounterVec,
    /// Call records the call log could not write.
    pub call_log_errors: IntCounter,
    /// Calls whose externalMedia channel is not in the caller's native format (Asterisk
    /// transcodes them), by the caller's native format.
    pub transcoded: IntCounterVec,
    /// Set-up time percentiles for `/stats` (the histogram above is for Prometheus).
    setup_hdr: Mutex<LatencyHistogram<u64>>,
}

/// What reconciliation can clean up (the `kind` label of `rtprelay_control_reconciled_total`):
/// a call whose caller vanished, a leftover externalMedia channel or bridge, a relay channel no
/// call owns.
pub const RECONCILED_KINDS: [&str; 4] = ["call", "channel", "bridge", "relay_channel"];

fn buckets() -> Vec<f64> {
    // 1 ms to 10 s, about three a decade: ARI requests take milliseconds, set-ups tens of them.
    vec![
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    ]
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Never with these constant names (registration only fails on a duplicate or bad name).
    #[must_use]
    pub fn new() -> Self {
        let ns = |name: &str, help: &str| Opts::new(name, help).namespace("rtprelay_control");
        let registry = Registry::new();
        let names = std::cell::RefCell::new(Vec::new());
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            names
                .borrow_mut()
                .extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry
                .register(c)
                .unwrap_or_else(|e| unreachable!("constant metric names: {e}"));
        };
        macro_rules! make {
            ($e:expr) => {{
                let m = $e.unwrap_or_else(|e| unreachable!("constant metric: {e}"));
                reg(Box::new(m.clone()));
                m
            }};
        }
        let mut m = Self {
            calls_active: make!(IntGauge::with_opts(ns(
                "calls_active",
                "Calls in progress (being set up or bridged)."
            ))),
            calls_bridged: make!(IntCounter::with_opts(ns(
                "calls_bridged_total",
                "Calls whose caller and externalMedia channel were bridged."
            ))),
            calls: make!(IntCounterVec::new(
                ns("calls_total", "Calls ended, by outcome."),
                &["outcome"]
            )),
            setup_failures: make!(IntCounterVec::new(
                ns("setup_failures_total", "Call set-up failures, by stage."),
                &["stage"]
            )),
            setup_seconds: make!(Histogram::with_opts(
                HistogramOpts::new(
                    "call_setup_seconds",
                    "StasisStart of the caller to both channels in the bridge."
                )
                .namespace("rtprelay_control")
                .buckets(buckets())
            )),
            ari_requests: make!(IntCounterVec::new(
                ns("ari_requests_total", "ARI REST requests, by operation and HTTP status."),
                &["op", "status"]
            )),
            ari_seconds: make!(HistogramVec::new(
                HistogramOpts::new("ari_request_seconds", "ARI REST request time, by operation.")
                    .namespace("rtprelay_control")
                    .buckets(buckets()),
                &["op"]
            )),
            ports_free: make!(IntGauge::with_opts(ns("ports_free", "Relay ports free."))),
            ports_in_use: make!(IntGauge::with_opts(ns(
                "ports_in_use",
                "Relay ports assigned to calls."
            ))),
            ports_exhausted: make!(IntCounter::with_opts(ns(
                "ports_exhausted_total",
                "Calls hung up because no relay port was free."
            ))),
            ws_reconnects: make!(IntCounter::with_opts(ns(
                "ws_reconnects_total",
                "Events WebSocket reconnections."
            ))),
            ws_connected: make!(IntGauge::with_opts(ns(
                "ws_connected",
                "1 while the events WebSocket is connected."
            ))),
            relay_resyncs: make!(IntCounter::with_opts(ns(
                "relay_resyncs_total",
                "Reconnections to the relay followed by a resync of every live channel."
            ))),
            relay_connected: make!(IntGauge::with_opts(ns(
                "relay_connected",
                "Relays whose control connection is up (1 for a single relay while connected)."
            ))),
            relays: make!(IntGaugeVec::new(
                ns("relays", "Each relay of the pool: 1 in its current state (connected or disconnected)."),
                &["relay", "state"]
            )),
            calls_moved: make!(IntCounter::with_opts(ns(
                "calls_moved_total",
                "Calls moved to another relay because theirs was lost (down for longer than --relay-grace)."
            ))),
            relay_calls: make!(IntGaugeVec::new(
                ns("relay_calls", "Channels control holds on each relay."),
                &["relay"]
            )),
            relay_readded: make!(IntCounter::with_opts(ns(
                "relay_channels_readded_total",
                "Relay channels re-added by resyncs."
            ))),
            reconciled: make!(IntCounterVec::new(
                ns(
                    "reconciled_total",
                    "Leftovers cleaned up by reconciliation, by kind (channel, bridge, relay_channel, call)."
                ),
                &["kind"]
            )),
            events: make!(IntCounterVec::new(
                ns("ari_events_total", "ARI events received, by type."),
                &["type"]
            )),
            call_log_errors: make!(IntCounter::with_opts(ns(
                "call_log_errors_total",
                "Call records --call-log could not write (each is logged; calls go on)."
            ))),
            transcoded: make!(IntCounterVec::new(
                ns(
                    "transcoded_calls_total",
                    "Calls whose externalMedia format is not the caller's native format (Asterisk transcodes them, and the relay measures the transcoder too), by the caller's native format."
                ),
                &["caller_format"]
            )),
            setup_hdr: Mutex::new(LatencyHistogram::new(2)),
            registry,
            names: Vec::new(),
        };
        m.names = names.take();
        for o in [
            Outcome::Completed,
            Outcome::Abandoned,
            Outcome::NoPort,
            Outcome::Failed,
            Outcome::NoRelay,
        ] {
            m.calls.with_label_values(&[o.label()]);
        }
        for s in [
            Stage::Answer,
            Stage::Port,
            Stage::Relay,
            Stage::ExternalMedia,
            Stage::Bridge,
        ] {
            m.setup_failures.with_label_values(&[s.label()]);
        }
        // Every reconciliation kind exists from the start, at 0.
        for kind in RECONCILED_KINDS {
            m.reconciled.with_label_values(&[kind]);
        }
        m
    }

    /// Every metric's name (with its `rtprelay_control_` namespace), labelled ones included.
    #[must_use]
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Records a finished set-up.
    pub fn setup_done(&self, took: Duration) {
        self.setup_seconds.observe(took.as_secs_f64());
        self.calls_bridged.inc();
        if let Ok(mut h) = self.setup_hdr.lock() {
            h.record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
        }
    }

    /// Calls transcoded so far, all native formats.
    #[must_use]
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // whole, non-negative counts
    pub fn transcoded_total(&self) -> u64 {
        use prometheus::core::Collector as _;
        self.transcoded
            .collect()
            .iter()
            .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
            .sum::<f64>() as u64
    }

    /// Set-up time percentiles so far.
    #[must_use]
    pub fn setup_summary(&self) -> LatencySummary {
        self.setup_hdr
            .lock()
            .map(|h| h.summary())
            .unwrap_or_default()
    }

    /// Records one ARI request.
    pub fn ari_request(&self, op: &str, status: Option<u16>, took: Duration) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.ari_requests.with_label_values(&[op, &status]).inc();
        self.ari_seconds
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
    }

    /// Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_renders_under_the_namespace() {
        let m = Metrics::new();
        m.ari_request("answer", Some(204), Duration::from_millis(2));
        m.ari_request("answer", None, Duration::from_millis(2));
        m.setup_done(Duration::from_millis(30));
        let text = m.render();
        for name in [
            "rtprelay_control_calls_active",
            "rtprelay_control_calls_total{outcome=\"no_port\"} 0",
            "rtprelay_control_setup_failures_total{stage=\"answer\"} 0",
            "rtprelay_control_call_setup_seconds_bucket",
            "rtprelay_control_ari_requests_total{op=\"answer\",status=\"204\"} 1",
            "rtprelay_control_ari_requests_total{op=\"answer\",status=\"error\"} 1",
            "rtprelay_control_ari_request_seconds_count{op=\"answer\"} 2",
            "rtprelay_control_ports_free",
            "rtprelay_control_ws_reconnects_total",
            "rtprelay_control_relay_resyncs_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert_eq!(m.setup_summary().count, 1);
    }
}
