//! Prometheus metric families built by hand from values a process already keeps (atomics,
//! snapshots), and their text exposition. The relay and the echo publish this way instead of
//! through a registry because their figures live in the data plane's own structures; control,
//! which updates metrics where things happen, uses the `prometheus` registry directly.

use std::fmt::Write as _;

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family named `name` in full (`rtprelay_…`, `rtpecho_…`).
#[must_use]
pub fn named_family(
    name: &str,
    help: &str,
    kind: MetricType,
    metrics: Vec<Metric>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

/// A label pair.
#[must_use]
pub fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

/// A counter sample with `labels`.
#[must_use]
pub fn counter_metric(labels: Vec<LabelPair>, v: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v as f64);
    let mut m = Metric::from_label(labels);
    m.set_counter(c);
    m
}

/// A gauge sample with `labels`.
#[must_use]
pub fn gauge_metric(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_gauge(g);
    m.set_label(labels);
    m
}

/// Metric families in the Prometheus text exposition format.
#[must_use]
pub fn encode(families: &[MetricFamily]) -> String {
    let mut out = String::new();
    if prometheus::TextEncoder::new()
        .encode_utf8(families, &mut out)
        .is_err()
    {
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_as_prometheus_text() {
        let text = encode(&[
            named_family(
                "x_total",
                "Things.",
                MetricType::COUNTER,
                vec![counter_metric(vec![label("kind", "a")], 3)],
            ),
            named_family(
                "x_now",
                "Now.",
                MetricType::GAUGE,
                vec![gauge_metric(vec![], 1.5)],
            ),
        ]);
        assert!(text.contains("# TYPE x_total counter"), "{text}");
        assert!(text.contains("x_total{kind=\"a\"} 3"), "{text}");
        assert!(text.contains("x_now 1.5"), "{text}");
    }
}
