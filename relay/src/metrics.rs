//! Prometheus text: the shards' published [`Snapshot`]s rendered as the relay-wide metrics
//! (merged) and the per-shard `rtprelay_shard_*` series. Every metric the docs promise is named
//! here, with its help text.

use std::sync::Arc;

use appkit::prom::{counter_metric, encode, gauge_metric, label, named_family};
use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use relay_proto::stats::{CloseReason, PerDirection};
use relay_proto::{Direction, DropReason};

use crate::counters::{BackendCounters, BATCH_BUCKETS};
use crate::snapshot::{Buckets, Snapshot, LATENCY_BOUNDS_NS};

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    named_family(&format!("rtprelay_{name}"), help, kind, metrics)
}

fn histogram_metric(labels: Vec<LabelPair>, b: &Buckets, bounds: &[f64]) -> Metric {
    let mut h = Histogram::default();
    h.set_sample_count(b.count);
    h.set_sample_sum(b.sum_seconds);
    h.set_bucket(
        bounds
            .iter()
            .zip(b.cumulative.iter().chain(std::iter::repeat(&b.count)))
            .map(|(&ub, &c)| {
                let mut bk = Bucket::default();
                bk.set_upper_bound(ub);
                bk.set_cumulative_count(c);
                bk
            })
            .collect(),
    );
    let mut m = Metric::from_label(labels);
    m.set_histogram(h);
    m
}

fn per_direction<T>(
    p: &PerDirection<T>,
    mut f: impl FnMut(Vec<LabelPair>, &T) -> Metric,
) -> Vec<Metric> {
    Direction::ALL
        .iter()
        .map(|&d| f(vec![label("direction", d.as_str())], p.get(d)))
        .collect()
}

/// The snapshot as Prometheus metric families.
#[must_use]
pub fn families(s: &Snapshot) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    let g = s.global.clone().unwrap_or_default();
    let c = &s.counters;
    let lat_bounds: Vec<f64> = LATENCY_BOUNDS_NS
        .iter()
        .map(|&ns| ns as f64 / 1e9)
        .collect();
    let counter = |labels, v| counter_metric(labels, v);
    let total =
        |name: &str, help: &str, v: u64| family(name, help, COUNTER, vec![counter(vec![], v)]);
    let stream = |name: &str, help: &str, f: fn(&relay_proto::stats::StreamCounters) -> u64| {
        family(
            name,
            help,
            COUNTER,
            per_direction(&g.streams, |l, st| counter(l, f(st))),
        )
    };
    let mut drops: Vec<Metric> = DropReason::ALL
        .iter()
        .map(|&r| counter(vec![label("reason", r.as_str())], g.drops.get(r)))
        .collect();
    drops.push(counter(vec![label("reason", "oversize")], c.oversize));
    let batch = batch_buckets(c);
    let batch_bounds = batch_bounds();
    vec![
        family("info", "Relay build and backend (value 1).", GAUGE, vec![gauge_metric(
            vec![
                label("backend", s.backend),
                label("timestamps", s.timestamps),
                label("echo_leg", s.echo_leg),
                label("version", env!("CARGO_PKG_VERSION")),
            ],
            1.0,
        )]),
        family("rtt_seconds", "Echo round-trip time, T1 - T0, of every RTP packet measured.", HISTOGRAM,
            vec![histogram_metric(vec![], &s.rtt, &lat_bounds)]),
        family("forward_seconds", "Time inside the relay: the datagram's kernel receive stamp to the kernel's transmit stamp of its forwarded send (with --timestamps user, an estimate of when that send left).", HISTOGRAM,
            per_direction(&s.forward, |l, b| histogram_metric(l, b, &lat_bounds))),
        family("receive_delay_seconds", "Kernel arrival of a datagram to the moment the relay's user space handled it (the wake-up part of forward_seconds).", HISTOGRAM,
            per_direction(&s.receive_delay, |l, b| histogram_metric(l, b, &lat_bounds))),
        family("jitter_seconds", "RFC 3550 interarrival jitter estimate after each packet, by the direction the packet travelled.", HISTOGRAM,
            per_direction(&s.jitter, |l, b| histogram_metric(l, b, &lat_bounds))),
        family("lateness_seconds", "Transit of each packet above the stream's baseline transit.", HISTOGRAM,
            per_direction(&s.lateness, |l, b| histogram_metric(l, b, &lat_bounds))),
        family("call_mos", "MOS of each channel at its close (E-model from its mean RTT, jitter and round-trip loss; no RTCP).", HISTOGRAM,
            vec![histogram_metric(vec![], &Buckets {
                cumulative: s.calls.mos.clone(),
                count: s.calls.count,
                sum_seconds: s.calls.mos_sum,
            }, &relay_proto::score::MOS_BOUNDS)]),
        family("call_r_factor", "E-model R-factor of each channel at its close.", HISTOGRAM,
            vec![histogram_metric(vec![], &Buckets {
                cumulative: s.calls.r_factor.clone(),
                count: s.calls.count,
                sum_seconds: s.calls.r_sum,
            }, &relay_proto::score::R_BOUNDS)]),
        family("probe_loop_seconds", "The relay's loop of each probe (loadgen ari --callers rtp) of a recognised probe channel: the probe's kernel arrival from Asterisk to the kernel arrival of its echo, exact.", HISTOGRAM,
            vec![histogram_metric(vec![], &s.probe_loop, &lat_bounds)]),
        family("probe_asterisk_in_seconds", "Approximate Asterisk in of each probe of a recognised probe channel: the relay's kernel arrival (CLOCK_REALTIME) minus the send time in the probe's header, a user-space clock reading the sender took before its send (so it includes the sender's own way into its kernel, and across hosts compares two clocks). Values not above zero are counted in rtprelay_probe_asterisk_in_negative_total instead.", HISTOGRAM,
            vec![histogram_metric(vec![], &s.probe_asterisk_in, &lat_bounds)]),
        family("probes_total", "Valid probe headers received, by direction: to_echo from Asterisk (distinct probes, from a channel's first), to_asterisk back from the echo.", COUNTER, vec![
            counter(vec![label("direction", Direction::ToEcho.as_str())], g.probe.received),
            counter(vec![label("direction", Direction::ToAsterisk.as_str())], g.probe.returned),
        ]),
        total("probes_written_total", "Probe echoes the relay wrote its two times into (arrival from Asterisk, arrival of the echo) on their way back to Asterisk.", g.probe.written),
        total("probe_asterisk_in_negative_total", "Probes whose approximate Asterisk in came out zero or negative (the sender's clock ahead of the relay's): not in rtprelay_probe_asterisk_in_seconds.", g.probe.asterisk_in_negative),
        family("probe_channels", "Open channels recognised as carrying probes (three valid probe headers in a row from Asterisk).", GAUGE, vec![gauge_metric(vec![], f64::from(g.probe.channels))]),
        family("packets_total", "Datagrams forwarded.", COUNTER,
            per_direction(&g.traffic, |l, t| counter(l, t.packets))),
        family("bytes_total", "UDP payload bytes forwarded.", COUNTER,
            per_direction(&g.traffic, |l, t| counter(l, t.bytes))),
        family("rtcp_packets_total", "RTCP datagrams forwarded unmeasured.", COUNTER,
            per_direction(&g.traffic, |l, t| counter(l, t.rtcp))),
        family("drops_total", "Datagrams dropped, by reason.", COUNTER, drops),
        family("rtp_lost_total", "RTP packets missing before the highest sequence received (RFC 3550 A.1), by the direction of the stream.", COUNTER,
            per_direction(&s.lost, |l, &v| counter(l, v))),
        stream("rtp_duplicates_total", "RTP packets received more than once.", |st| st.duplicates),
        stream("rtp_reordered_total", "RTP packets that arrived after a higher sequence number.", |st| st.reordered),
        stream("rtp_late_total", "RTP packets later than the lateness threshold.", |st| st.late),
        stream("rtp_expected_total", "RTP packets expected from sequence numbers.", |st| st.expected),
        total("echo_timeouts_total", "Packets sent to the echo whose echo did not return within the echo timeout.", g.round_trip.timeouts),
        total("echo_duplicates_total", "Further echoes of a packet already measured.", g.round_trip.duplicates),
        total("echo_late_total", "Echoes that returned after their packet timed out.", g.round_trip.late),
        total("echo_unmatched_total", "Echoes that matched no packet sent.", g.round_trip.unmatched),
        total("rtt_high_total", "Round trips above --rtt-threshold-ms.", g.round_trip.rtt_high),
        total("echo_unmeasured_total", "Echoes that came back whose round trip could not be timed (no usable transmit stamp, or T1 not after T0): not lost, not in rtt_seconds.", g.round_trip.unmeasured),
        total("timestamps_kernel_total", "Forwarded datagrams whose send the kernel stamped (T0 toward the echo; the end of the forward time both ways).", g.timestamps.kernel),
        family("timestamps_missing_total", "Times not recorded, by kind: no_stamp (a send's transmit stamp never came), rtt_not_positive, forward_not_positive, clock_step (a stamp taken across a step of the wall clock).", COUNTER,
            relay_proto::MissingKind::ALL
                .iter()
                .map(|&k| counter(vec![label("kind", k.as_str())], g.timestamps.missing.get(k)))
                .collect()),
        total("timestamps_stale_total", "Transmit stamps no send was waiting for (given up on already).", g.timestamps.stale),
        family("channels", "Channels open.", GAUGE, vec![gauge_metric(vec![], f64::from(g.channels))]),
        total("channels_opened_total", "Channels opened.", g.channels_opened),
        family("channels_closed_total", "Channels closed, by reason.", COUNTER, vec![
            counter(vec![label("reason", CloseReason::Removed.as_str())], g.channels_removed),
            counter(vec![label("reason", CloseReason::Idle.as_str())], g.channels_idle),
        ]),
        family("batch_size", "Completions (io_uring) or datagrams (tokio) handled per data-plane wake-up.", HISTOGRAM,
            vec![histogram_metric(vec![], &batch, &batch_bounds)]),
        family("send_errors_total", "Sends the kernel refused, by errno (each one is logged, at most a line a second).", COUNTER, {
            let mut v: Vec<Metric> = c
                .send_errnos
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(e, &n)| counter(vec![label("errno", &crate::counters::errno_name(e))], n))
                .collect();
            if v.is_empty() {
                // The family exists from the start (a series per errno appears when one happens).
                v.push(counter(vec![label("errno", "none")], 0));
            }
            v
        }),
        total("recv_errors_total", "Receives that failed.", c.recv_errors),
        total("enters_total", "io_uring_enter calls (io_uring backend): waits, and the submissions of sends that kernel timestamps give an enter of their own.", c.enters),
        total("clock_steps_total", "Steps of the wall clock seen while converting kernel receive stamps (the batch's arrivals were taken at handling time).", c.clock_steps),
        family("timestamps_fallback_total", "Datagrams whose arrival was taken at handling time for want of a usable receive stamp, by cause.", COUNTER, vec![
            counter(vec![label("cause", "missing")], c.missing_timestamps),
            counter(vec![label("cause", "untrusted")], c.untrusted_timestamps),
        ]),
        total("tx_stamps_read_total", "Kernel transmit stamps read (io_uring command completions or error-queue entries).", c.tx_stamps),
        total("tx_stamps_bad_total", "Transmit-stamp completions or error-queue entries that held no usable stamp.", c.bad_stamps),
        family("recv_rearms_total", "Multishot receives re-armed, by cause.", COUNTER, vec![
            counter(vec![label("cause", "no_buffers")], c.rearm_nobufs),
            counter(vec![label("cause", "other")], c.rearm_other),
        ]),
    ]
}

/// Bounds of the batch-size histograms: 1, 2, 4, … 2^15.
fn batch_bounds() -> Vec<f64> {
    (0..BATCH_BUCKETS - 1)
        .map(|i| f64::from(1u32 << i))
        .collect()
}

/// The batch sizes of `c` as a histogram (count: wake-ups; sum: completions).
fn batch_buckets(c: &BackendCounters) -> Buckets {
    let mut acc = 0;
    Buckets {
        cumulative: c
            .batch_buckets
            .iter()
            .take(BATCH_BUCKETS - 1)
            .map(|&n| {
                acc += n;
                acc
            })
            .collect(),
        count: c.wakeups,
        sum_seconds: c.batch_sum as f64,
    }
}

/// The per-shard families: how the load is balanced over shards.
#[must_use]
pub fn shard_families(parts: &[Arc<Snapshot>]) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    let shard = |p: &Snapshot| label("shard", &p.shard.to_string());
    let bounds = batch_bounds();
    vec![
        family(
            "shard_channels",
            "Channels open on each data-plane shard.",
            GAUGE,
            parts
                .iter()
                .map(|p| {
                    gauge_metric(
                        vec![shard(p)],
                        f64::from(p.global.as_ref().map_or(0, |g| g.channels)),
                    )
                })
                .collect(),
        ),
        family(
            "shard_packets_total",
            "Datagrams forwarded by each shard, per direction.",
            COUNTER,
            parts
                .iter()
                .flat_map(|p| {
                    Direction::ALL.iter().map(move |&d| {
                        counter_metric(
                            vec![shard(p), label("direction", d.as_str())],
                            p.global.as_ref().map_or(0, |g| g.traffic.get(d).packets),
                        )
                    })
                })
                .collect(),
        ),
        family(
            "shard_batch_size",
            "Completions (io_uring) or datagrams (tokio) handled per wake-up, per shard.",
            HISTOGRAM,
            parts
                .iter()
                .map(|p| histogram_metric(vec![shard(p)], &batch_buckets(&p.counters), &bounds))
                .collect(),
        ),
        family(
            "shard_cpu_seconds_total",
            "CPU time (user + system) of each shard's thread, at 10 ms resolution.",
            COUNTER,
            parts
                .iter()
                .map(|p| {
                    let mut m = Metric::from_label(vec![shard(p)]);
                    let mut c = prometheus::proto::Counter::default();
                    c.set_value(p.cpu_ns as f64 / 1e9);
                    m.set_counter(c);
                    m
                })
                .collect(),
        ),
    ]
}

/// The shards' snapshots in the Prometheus text exposition format: the relay-wide metrics
/// (merged) and the per-shard ones.
#[must_use]
pub fn render(parts: &[Arc<Snapshot>]) -> String {
    let mut f = families(&Snapshot::merge(parts));
    f.extend(shard_families(parts));
    encode(&f)
}

#[cfg(test)]
mod tests {
    use relay_proto::stats::LatencyHistogram;
    use relay_proto::GlobalStats;

    use super::*;

    #[test]
    fn rendering_names_every_metric_the_readme_promises() {
        let text = render(&[Arc::new(Snapshot {
            backend: "uring",
            echo_leg: "per-channel",
            ..Snapshot::default()
        })]);
        for name in [
            "rtprelay_rtt_seconds_bucket{le=\"0.00001\"}",
            "rtprelay_forward_seconds_bucket{direction=\"to_echo\"",
            "rtprelay_packets_total{direction=\"to_asterisk\"}",
            "rtprelay_bytes_total{direction=\"to_echo\"}",
            "rtprelay_drops_total{reason=\"unknown_source\"}",
            "rtprelay_drops_total{reason=\"oversize\"}",
            "rtprelay_rtp_lost_total{direction=\"to_asterisk\"}",
            "rtprelay_rtp_duplicates_total",
            "rtprelay_rtp_reordered_total",
            "rtprelay_rtp_late_total",
            "rtprelay_echo_timeouts_total",
            "rtprelay_jitter_seconds_bucket",
            "rtprelay_channels 0",
            "rtprelay_channels_opened_total",
            "rtprelay_channels_closed_total{reason=\"idle\"}",
            "rtprelay_batch_size_bucket{le=\"1\"}",
            "rtprelay_rtt_high_total",
            "rtprelay_info{backend=\"uring\"",
            "echo_leg=\"per-channel\"",
            "rtprelay_receive_delay_seconds_bucket{direction=\"to_echo\"",
            "rtprelay_clock_steps_total 0",
            "rtprelay_call_mos_bucket{le=\"4.5\"} 0",
            "rtprelay_call_r_factor_count 0",
            "rtprelay_timestamps_fallback_total{cause=\"missing\"}",
            "rtprelay_shard_channels{shard=\"0\"} 0",
            "rtprelay_shard_packets_total{shard=\"0\",direction=\"to_echo\"} 0",
            "rtprelay_shard_batch_size_bucket{shard=\"0\",le=\"1\"} 0",
            "rtprelay_shard_cpu_seconds_total{shard=\"0\"} 0",
            "rtprelay_probe_loop_seconds_bucket{le=\"0.00001\"} 0",
            "rtprelay_probe_asterisk_in_seconds_count 0",
            "rtprelay_probes_total{direction=\"to_echo\"} 0",
            "rtprelay_probes_total{direction=\"to_asterisk\"} 0",
            "rtprelay_probes_written_total 0",
            "rtprelay_probe_asterisk_in_negative_total 0",
            "rtprelay_probe_channels 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn shard_snapshots_merge_by_summing_and_keep_their_own_series() {
        let part = |shard: u32, packets: u64, rtt: &[u64]| {
            let mut h = LatencyHistogram::<u64>::new(3);
            for &ns in rtt {
                h.record(ns);
            }
            let mut g = GlobalStats {
                channels: shard + 1,
                ..GlobalStats::default()
            };
            g.traffic.to_echo.packets = packets;
            g.probe.received = packets + 1;
            g.probe.written = packets;
            g.probe.channels = 1;
            let mut counters = BackendCounters::default();
            counters.batch(3);
            Arc::new(Snapshot {
                backend: "uring",
                global: Some(g),
                counters,
                rtt: Buckets::from_hdr(&h),
                probe_loop: Buckets::from_hdr(&h),
                shard,
                cpu_ns: 20_000_000,
                ..Snapshot::default()
            })
        };
        let parts = [part(0, 10, &[12_000, 40_000]), part(1, 5, &[9_000])];
        let m = Snapshot::merge(&parts);
        let g = m.global.as_ref().unwrap();
        assert_eq!((g.channels, g.traffic.to_echo.packets), (3, 15));
        assert_eq!(m.rtt.count, 3);
        assert_eq!(m.rtt.cumulative[0], 1, "≤ 10 µs: shard 1's");
        assert_eq!(m.rtt.cumulative[1], 2, "≤ 15 µs");
        assert_eq!(m.counters.wakeups, 2);
        let text = render(&parts);
        for line in [
            "rtprelay_packets_total{direction=\"to_echo\"} 15",
            "rtprelay_channels 3",
            "rtprelay_shard_channels{shard=\"1\"} 2",
            "rtprelay_shard_packets_total{shard=\"0\",direction=\"to_echo\"} 10",
            "rtprelay_shard_cpu_seconds_total{shard=\"1\"} 0.02",
            "rtprelay_shard_batch_size_count{shard=\"0\"} 1",
            "rtprelay_rtt_seconds_count 3",
            "rtprelay_probe_loop_seconds_count 3",
            "rtprelay_probe_loop_seconds_bucket{le=\"0.00001\"} 1",
            "rtprelay_probes_total{direction=\"to_echo\"} 17",
            "rtprelay_probes_written_total 15",
            "rtprelay_probe_channels 2",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // A shard that has not published yet (no buckets) adds nothing.
        let fresh = Arc::new(Snapshot::default());
        let m2 = Snapshot::merge(&[fresh, Arc::clone(&parts[0])]);
        assert_eq!(m2.rtt, parts[0].rtt);
    }
}
