//! The packet path allocates nothing, and a channel costs what the docs say.
//!
//! Zero allocations in `handle_datagram` once a channel exists, on the kernel-timestamp path and on
//! the estimate's (`--timestamps user`); and the memory of one channel, printed with `--nocapture`
//! (docs/measurement.md, "Memory").
//!
//! `allocation-counter` installs a counting global allocator in this test binary; it counts per
//! thread, so the measurement is not disturbed by the test harness's other threads.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)] // test values come from small, known ranges

mod common;

use common::{open, rtp, MS};
use relay_proto::control::AddChannel;
use relay_proto::{ChannelId, Format, MonoTime, Relay, RelayConfig, SendTimes};

#[test]
fn handle_datagram_allocates_nothing_and_a_channel_costs_under_64_kib() {
    // Idle closing allocates (a stats snapshot and an event); keep it out of this 60 s run.
    let config = RelayConfig {
        idle_timeout: std::time::Duration::from_secs(3_600),
        ..RelayConfig::default()
    };
    let mut relay = Relay::new(config).unwrap();
    let echo = relay.config().default_echo;
    let asterisk = "127.0.0.2:5000".parse().unwrap();
    let stranger = "127.0.0.3:5000".parse().unwrap();
    let add = |name: &str| AddChannel {
        channel: ChannelId::try_from(name).unwrap(),
        port: 21_000,
        asterisk: Some(asterisk),
        echo: None,
        format: Format::Ulaw,
    };
    // Warm up: the first channel also grows the id map.
    let _ = open(&mut relay, MonoTime::ZERO, add("warm"));
    let mut socket = None;
    let bytes = allocation_counter::measure(|| {
        socket = Some(open(&mut relay, MonoTime::ZERO, add("measured")));
    })
    .bytes_total;
    let socket = socket.unwrap();
    println!(
        "one channel allocates {bytes} bytes ({:.1} KiB)",
        bytes as f64 / 1024.0
    );
    assert!(
        bytes < 64 * 1024,
        "a channel must cost under 64 KiB, costs {bytes}"
    );

    // Every kind of datagram: in order, lost, reordered, duplicated, echoed, echoed twice,
    // stray, malformed, RTCP; and timer runs in between.
    let packets: Vec<(u64, u16, bool)> = (0..3_000u64)
        .map(|k| {
            let seq = match k % 10 {
                3 => k + 1,
                4 => k - 1,
                _ => k,
            };
            (k, u16::try_from(seq & 0xffff).unwrap(), k % 7 != 0)
        })
        .collect();
    let built: Vec<Vec<u8>> = packets
        .iter()
        .map(|&(k, seq, _)| rtp(seq.wrapping_add(65_000), u32::try_from(160 * k).unwrap(), 9))
        .collect();
    let rr = [0x80, 201, 0, 1, 0, 0, 0, 42];
    let allocs = allocation_counter::measure(|| {
        for (&(k, _, echoed), p) in packets.iter().zip(&built) {
            let now = MonoTime::from_nanos(1_000 * MS + k * 20 * MS);
            let _ = relay.handle_datagram(now, socket, asterisk, p);
            if k % 13 == 0 {
                let _ = relay.handle_datagram(now, socket, asterisk, p);
            }
            if echoed {
                let later = MonoTime::from_nanos(now.as_nanos() + 3 * MS);
                let _ = relay.handle_datagram(later, socket, echo, p);
                if k % 11 == 0 {
                    let _ = relay.handle_datagram(later, socket, echo, p);
                }
            }
            let _ = relay.handle_datagram(now, socket, stranger, p);
            let _ = relay.handle_datagram(now, socket, asterisk, &p[..5]);
            let _ = relay.handle_datagram(now, socket, asterisk, &rr);
            relay.handle_timeout(now);
        }
    })
    .count_total;
    let s = relay
        .channel_stats(
            MonoTime::from_nanos(70_000 * MS),
            &ChannelId::try_from("measured").unwrap(),
        )
        .unwrap();
    assert!(
        s.round_trip.matched > 2_000,
        "the loop did real work: {:?}",
        s.round_trip
    );
    assert!(s.round_trip.timeouts > 0 && s.streams.to_echo.reordered > 0);
    assert_eq!(allocs, 0, "the packet path allocated {allocs} times");
}

#[test]
fn the_kernel_timestamp_path_allocates_nothing_either() {
    for send_times in [SendTimes::Kernel, SendTimes::Estimated] {
        let mut relay = Relay::new(RelayConfig {
            idle_timeout: std::time::Duration::from_secs(3_600),
            send_times,
            ..RelayConfig::default()
        })
        .unwrap();
        let echo = relay.config().default_echo;
        let asterisk = "127.0.0.2:5000".parse().unwrap();
        let socket = open(
            &mut relay,
            MonoTime::ZERO,
            AddChannel {
                channel: ChannelId::try_from("k").unwrap(),
                port: 21_000,
                asterisk: Some(asterisk),
                echo: None,
                format: Format::Ulaw,
            },
        );
        let mut built: Vec<Vec<u8>> = (0..3_000u32)
            .map(|k| rtp(u16::try_from(k).unwrap(), 160 * k, 9))
            .collect();
        let mut ids = Vec::with_capacity(64);
        let allocs = allocation_counter::measure(|| {
            // Batches of 50: handled 30 µs after arrival, sent together 20 µs later (the
            // kernel's stamps, or the submission the estimate is taken from).
            for (b, batch) in built.chunks_mut(50).enumerate() {
                let now = MonoTime::from_nanos(1_000 * MS + b as u64 * 20 * MS);
                let handled = MonoTime::from_nanos(now.as_nanos() + 30_000);
                let left = MonoTime::from_nanos(handled.as_nanos() + 20_000);
                ids.clear();
                for p in batch.iter_mut() {
                    let _ = relay.handle_received(now, handled, socket, asterisk, p);
                    ids.extend(relay.send_id());
                }
                relay.submitted(left);
                for &id in &ids {
                    relay.tx_stamped(id, Some(left));
                }
                let back = MonoTime::from_nanos(now.as_nanos() + 3 * MS);
                ids.clear();
                for p in batch.iter_mut() {
                    let _ = relay.handle_received(back, back, socket, echo, p);
                    ids.extend(relay.send_id());
                }
                let left = MonoTime::from_nanos(back.as_nanos() + 10_000);
                relay.submitted(left);
                for &id in &ids {
                    relay.tx_stamped(id, Some(left));
                }
                relay.handle_timeout(now);
            }
        })
        .count_total;
        let g = relay.global_stats();
        assert_eq!(
            g.round_trip.matched, 3_000,
            "{send_times:?}: {:?}",
            g.round_trip
        );
        let kernel = if send_times == SendTimes::Kernel {
            6_000
        } else {
            0
        };
        assert_eq!(g.timestamps.kernel, kernel, "{send_times:?}");
        assert_eq!(g.timestamps.missing.total(), 0, "{send_times:?}");
        assert_eq!(
            allocs, 0,
            "the deferred packet path allocated {allocs} times ({send_times:?})"
        );
    }
}

#[test]
fn a_probe_channel_allocates_once_when_recognised_and_never_per_packet() {
    use relay_proto::probe::{self, Probe};
    let mut relay = Relay::new(RelayConfig {
        idle_timeout: std::time::Duration::from_secs(3_600),
        send_times: SendTimes::Estimated,
        ..RelayConfig::default()
    })
    .unwrap();
    relay.set_wall_offset(Some(1_764_547_200_000_000_000));
    let echo = relay.config().default_echo;
    let asterisk = "127.0.0.2:5000".parse().unwrap();
    let socket = open(
        &mut relay,
        MonoTime::ZERO,
        AddChannel {
            channel: ChannelId::try_from("probes").unwrap(),
            port: 21_000,
            asterisk: Some(asterisk),
            echo: None,
            format: Format::Ulaw,
        },
    );
    let packet = |k: u32| {
        let mut b = rtp(u16::try_from(k & 0xffff).unwrap(), 160 * k, 9);
        probe::write(
            &mut b[12..],
            Probe {
                call: 1,
                seq: k,
                sent_ns: 1_764_547_200_000_000_000,
            },
        )
        .unwrap();
        b
    };
    let ms = std::cell::Cell::new(1_000u64);
    let round_trip = |relay: &mut Relay, b: &mut Vec<u8>| {
        ms.set(ms.get() + 20);
        let ms = ms.get();
        let now = MonoTime::from_nanos(ms * MS);
        let _ = relay.handle_received(now, now, socket, asterisk, b);
        let back = MonoTime::from_nanos(ms * MS + 300_000);
        let _ = relay.handle_received(back, back, socket, echo, b);
        relay.submitted(back);
    };
    // Recognition: the channel's one allocation for its probes (the arrival ring and two
    // histograms), on the third probe.
    let mut warm: Vec<Vec<u8>> = (0..3).map(packet).collect();
    let bytes = allocation_counter::measure(|| {
        for b in &mut warm {
            round_trip(&mut relay, b);
        }
    })
    .bytes_total;
    println!(
        "recognising a probe channel allocates {bytes} bytes ({:.1} KiB)",
        bytes as f64 / 1024.0
    );
    assert!(bytes > 0 && bytes < 80 * 1024, "{bytes}");
    // Then: probes written, duplicates, audio, broken headers and returns with no arrival,
    // across the ring's wrap.
    let mut built: Vec<Vec<u8>> = (3..3_000).map(packet).collect();
    let mut audio = rtp(1, 160, 9);
    let allocs = allocation_counter::measure(|| {
        for (k, b) in built.iter_mut().enumerate() {
            if k % 10 == 3 {
                b[12 + 20] ^= 1; // a broken check both ways
            }
            round_trip(&mut relay, b);
            if k % 17 == 0 {
                round_trip(&mut relay, b);
                round_trip(&mut relay, &mut audio);
            }
            relay.handle_timeout(MonoTime::from_nanos(ms.get() * MS));
        }
    })
    .count_total;
    let s = relay
        .channel_stats(
            MonoTime::from_nanos(ms.get() * MS),
            &ChannelId::try_from("probes").unwrap(),
        )
        .unwrap();
    let p = s.probe.unwrap();
    assert!(
        p.recognised && p.written > 2_000,
        "the loop did real work: {p:?}"
    );
    assert_eq!(allocs, 0, "the probe path allocated {allocs} times");
}
