//! Figures merge exactly: two channels' merged figures equal one channel's fed both, and they
//! survive JSON; unreadable figures are refused without changing anything.

use super::*;
use crate::stats::LatencyHistogram;

fn stats(id: &str, packets: u64, sent: u64, matched: u64, age_ns: u64) -> ChannelStats {
    let mut s = ChannelStats::empty(ChannelId::try_from(id).unwrap());
    s.age_ns = age_ns;
    s.traffic.to_echo.packets = packets;
    s.traffic.to_asterisk.packets = matched;
    s.round_trip.sent = sent;
    s.round_trip.matched = matched;
    s.streams.to_asterisk.jitter_ns = packets * 1_000;
    s
}

fn hist(values: &[u64]) -> LatencyHistogram<u32> {
    let mut h = LatencyHistogram::<u32>::new(2);
    for &v in values {
        h.record(v);
    }
    h
}

#[test]
fn two_relays_figures_merge_into_one_calls() {
    let (first, second): (Vec<u64>, Vec<u64>) = (
        (1..=300).map(|i| 1_000_000 + i * 3_000).collect(),
        (1..=200).map(|i| 4_000_000 + i * 7_000).collect(),
    );
    let mut a = ChannelFigures::new(&stats("c", 300, 300, 300, 6_000_000_000), &hist(&first));
    let b = ChannelFigures::new(&stats("c-m1", 210, 205, 200, 4_000_000_000), &hist(&second));
    let line = serde_json::to_string(&b).unwrap();
    let b: ChannelFigures = serde_json::from_str(&line).unwrap();
    assert!(b.rtt.len() < 2_000, "compact: {} bytes", b.rtt.len());
    a.merge(&b).unwrap();
    let all: Vec<u64> = first.iter().chain(&second).copied().collect();
    let one = hist(&all);
    let merged = a.rtt_histogram().unwrap();
    assert_eq!(merged.len(), 500);
    assert_eq!(merged.sum_ns(), one.sum_ns());
    assert_eq!(
        merged.summary(),
        one.summary(),
        "the same percentiles as one histogram"
    );
    assert_eq!(a.traffic.to_echo.packets, 510);
    assert_eq!(a.round_trip.sent, 505);
    assert_eq!(a.round_trip.matched, 500);
    assert_eq!(a.age_ns, 10_000_000_000);
    assert_eq!(
        a.streams.to_asterisk.jitter_ns, 300_000,
        "the larger jitter"
    );
    let last = stats("c-m1", 0, 0, 0, 0);
    let s = a.stats(Some(&last)).unwrap();
    assert_eq!(
        a.stats(None).unwrap().rtt,
        s.rtt,
        "the figures' own, without a last channel"
    );
    assert_eq!(s.rtt, one.summary());
    assert_eq!(s.channel.as_str(), "c-m1");
    assert!(s.score.mos > 1.0);
}

#[test]
fn figures_without_round_trips_merge_and_read_back_empty() {
    let mut a = ChannelFigures::new(&stats("c", 5, 0, 0, 1), &hist(&[]));
    assert!(a.rtt.is_empty());
    a.merge(&a.clone()).unwrap();
    assert!(a.rtt_histogram().unwrap().is_empty());
    assert_eq!(a.traffic.to_echo.packets, 10);
}

#[test]
fn unreadable_figures_are_refused_and_change_nothing() {
    let mut a = ChannelFigures::new(&stats("c", 1, 1, 1, 1), &hist(&[5_000]));
    let before = a.clone();
    let mut bad = a.clone();
    bad.rtt = "not base64!".into();
    assert!(matches!(a.merge(&bad), Err(FiguresError::Base64(_))));
    bad.rtt = base64::engine::general_purpose::STANDARD.encode(b"not a histogram");
    assert!(matches!(a.merge(&bad), Err(FiguresError::Histogram(_))));
    assert_eq!(a, before);
}
