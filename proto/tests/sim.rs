//! End-to-end runs of the relay state machine on a virtual clock (the harness in `common/mod.rs`):
//! a synthetic Asterisk stream goes through the relay to an echo that injects delay, jitter, loss,
//! duplication and reordering with a seed, and every count the relay reports (lost, duplicates,
//! reordered, echo timeouts, measured) must equal what the echo did, exactly, and its RTT
//! percentiles the imposed delays within the histogram's precision.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)] // test values come from small, known ranges

mod common;

use std::time::Duration;

use common::{EchoFaults, Sim, MS};
use relay_proto::{Direction, MonoTime, RelayConfig};

/// The exact q-quantile of `v` as HdrHistogram defines it (the smallest value with at least
/// q·n values at or below it).
fn quantile(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn assert_close(what: &str, got: u64, want: u64, rel: f64) {
    let err = got.abs_diff(want) as f64 / want.max(1) as f64;
    assert!(
        err <= rel,
        "{what}: relay says {got} ns, exact {want} ns ({err:.5} off)"
    );
}

#[test]
fn clean_calls_are_measured_exactly_across_the_sequence_wrap() {
    let faults = EchoFaults {
        delay: Duration::from_millis(5),
        ..EchoFaults::default()
    };
    let mut sim = Sim::new(RelayConfig::default(), faults, 1);
    for i in 0..20u16 {
        // Starting near 65535 so every call wraps its sequence numbers.
        let _ = sim.add_call(1_500, 65_000 + i * 20, u64::from(i) * MS, i % 2 == 0);
    }
    sim.run();
    for call in 0..sim.calls.len() {
        let s = sim.remove(call);
        let c = &sim.calls[call];
        assert_eq!(c.returned, 1_500, "{}: every packet came back", c.channel);
        assert_eq!(s.round_trip.sent, 1_500);
        assert_eq!(s.round_trip.matched, 1_500, "every packet measured");
        assert_eq!(s.rtt.count, 1_500);
        assert_close("p50", s.rtt.p50_ns, 5 * MS, 0.01);
        assert_close("max", s.rtt.max_ns, 5 * MS, 0.01);
        for d in Direction::ALL {
            let st = s.streams.get(d);
            // Asterisk's stream passes probation (its first packet is not counted); the echo's
            // return is counted from the first packet the relay sent.
            let expected = if d == Direction::ToEcho { 1_499 } else { 1_500 };
            assert_eq!(st.expected, expected, "{d:?}");
            assert_eq!(
                (st.lost, st.duplicates, st.reordered, st.late),
                (0, 0, 0, 0)
            );
            assert_eq!(st.jitter_ns, 0);
            assert_eq!(s.traffic.get(d).packets, 1_500);
            assert_eq!(s.traffic.get(d).bytes, 1_500 * 172);
        }
        assert_eq!(s.round_trip.timeouts, 0);
        assert_eq!(s.drops.total(), 0);
        assert_eq!(
            s.latched,
            call % 2 == 1,
            "odd calls latch Asterisk's address"
        );
    }
    let g = sim.relay.global_stats();
    assert_eq!(g.channels, 0);
    assert_eq!(g.channels_removed, 20);
    assert_eq!(g.rtt.count, 30_000);
    assert_close("global p99", g.rtt.p99_ns, 5 * MS, 0.001);
    assert_eq!(g.traffic.to_echo.packets, 30_000);
    assert_eq!(g.traffic.to_asterisk.packets, 30_000);
    assert_eq!(g.round_trip.matched, 30_000);
}

#[test]
fn injected_faults_are_counted_exactly() {
    for seed in 1..=6 {
        let faults = EchoFaults {
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(15),
            loss: 0.03,
            duplicate: 0.02,
            reorder: 0.03,
            // Faults anywhere, the first and the last packets of a stream included.
            clean_head: 0,
            clean_tail: false,
        };
        let mut sim = Sim::new(RelayConfig::default(), faults, seed);
        for i in 0..8u16 {
            let first =
                u16::try_from(common::Rng::new(seed * 100 + u64::from(i)).below(65_536)).unwrap();
            let _ = sim.add_call(3_000, first, u64::from(i) * 2 * MS, true);
        }
        sim.run();
        // Let every unanswered entry reach its echo timeout.
        let t = MonoTime::from_nanos(sim.now.as_nanos() + 3_000 * MS);
        sim.advance_to(t);

        let mut imposed_all = Vec::new();
        for call in 0..sim.calls.len() {
            let s = sim.remove(call);
            let c = &sim.calls[call];
            let e = &c.echo;
            let back = s.streams.to_asterisk;
            let ctx = format!(
                "seed {seed} {}: echo {e:?}, relay {back:?} {:?}",
                c.channel, s.round_trip
            );
            assert!(
                e.dropped > 0 && e.duplicated > 0 && e.reordered > 0,
                "faults happened: {ctx}"
            );
            assert_eq!(back.lost, e.dropped, "lost: {ctx}");
            assert_eq!(back.duplicates, e.duplicated, "duplicates: {ctx}");
            assert_eq!(back.reordered, e.reordered, "reordered: {ctx}");
            assert_eq!(s.round_trip.matched, e.emitted, "measured: {ctx}");
            assert_eq!(
                s.round_trip.duplicates, e.duplicated,
                "echo duplicates: {ctx}"
            );
            assert_eq!(
                s.round_trip.timeouts, e.dropped,
                "timeouts equal losses: {ctx}"
            );
            assert_eq!(s.round_trip.late + s.round_trip.unmatched, 0, "{ctx}");
            assert_eq!(s.traffic.to_echo.packets, 3_000);
            assert_eq!(s.traffic.to_asterisk.packets, e.emitted + e.duplicated);
            let fwd = s.streams.to_echo;
            assert_eq!(
                (fwd.lost, fwd.duplicates, fwd.reordered),
                (0, 0, 0),
                "{ctx}"
            );
            assert!(back.jitter_ns > 0, "jitter measured: {ctx}");

            let mut imposed = c.imposed_rtt_ns.clone();
            assert_eq!(s.rtt.count, imposed.len() as u64);
            assert_close(
                "channel min",
                s.rtt.min_ns,
                quantile(&mut imposed, 0.0),
                0.01,
            );
            assert_close(
                "channel p50",
                s.rtt.p50_ns,
                quantile(&mut imposed, 0.5),
                0.01,
            );
            assert_close(
                "channel max",
                s.rtt.max_ns,
                quantile(&mut imposed, 1.0),
                0.01,
            );
            imposed_all.extend(imposed);
        }
        let g = sim.relay.global_stats();
        assert_eq!(g.rtt.count, imposed_all.len() as u64);
        for q in [0.5, 0.95, 0.99, 0.999] {
            let got = match q {
                0.5 => g.rtt.p50_ns,
                0.95 => g.rtt.p95_ns,
                0.99 => g.rtt.p99_ns,
                _ => g.rtt.p999_ns,
            };
            assert_close(
                &format!("global p{q}"),
                got,
                quantile(&mut imposed_all, q),
                0.001,
            );
        }
        let dropped: u64 = sim.calls.iter().map(|c| c.echo.dropped).sum();
        assert_eq!(g.streams.to_asterisk.lost, dropped);
        assert_eq!(g.round_trip.timeouts, dropped);
    }
}

#[test]
fn a_stream_whose_echo_never_returns_is_all_lost() {
    let faults = EchoFaults {
        loss: 1.0,
        clean_tail: false,
        ..EchoFaults::default()
    };
    let mut sim = Sim::new(RelayConfig::default(), faults, 5);
    let _ = sim.add_call(300, 65_400, 0, true);
    sim.run();
    let s = sim.remove(0);
    assert_eq!(sim.calls[0].echo.dropped, 300);
    assert_eq!(s.streams.to_asterisk.lost, 300);
    assert_eq!(s.streams.to_asterisk.expected, 300);
    assert_eq!(s.round_trip.timeouts, 300);
}

#[test]
fn echoes_after_the_timeout_are_late_not_measured() {
    let faults = EchoFaults {
        delay: Duration::from_millis(2_500),
        ..EchoFaults::default()
    };
    let mut sim = Sim::new(RelayConfig::default(), faults, 3);
    let _ = sim.add_call(200, 100, 0, true);
    sim.run();
    let s = sim.remove(0);
    assert_eq!(s.round_trip.matched, 0);
    assert_eq!(s.rtt.count, 0);
    assert_eq!(s.round_trip.timeouts, 200);
    assert_eq!(s.round_trip.late, 200);
    assert_eq!(
        sim.calls[0].returned, 200,
        "late echoes are still forwarded"
    );
}

#[test]
fn a_slow_echo_counts_rtt_high() {
    let faults = EchoFaults {
        delay: Duration::from_millis(60),
        ..EchoFaults::default()
    };
    let mut sim = Sim::new(RelayConfig::default(), faults, 4);
    let _ = sim.add_call(100, 1, 0, true);
    sim.run();
    let s = sim.remove(0);
    assert_eq!(s.round_trip.matched, 100);
    assert_eq!(
        s.round_trip.rtt_high, 100,
        "60 ms is above the 50 ms threshold"
    );
    assert_eq!(
        s.streams.to_asterisk.late, 0,
        "a constant delay is not lateness"
    );
}
