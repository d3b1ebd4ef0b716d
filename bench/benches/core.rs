//! The sans-IO core per packet: parse, sequence tracking, jitter and lateness, T0 insert or
//! lookup, and the statistics and histograms, through `Relay::handle_datagram`.
//!
//! One iteration is one round trip: a packet from Asterisk (T0 insert) and its echo (T0 lookup,
//! RTT recorded), so the throughput is 2 elements and criterion's time per element is the time per
//! packet. `channels/1000` rotates over 1,000 channels, as the relay does under load, so the T0
//! tables and histograms are not all in cache. Target: ≤ 100 ns per packet.
//!
//! `interim_channels/1000`: the figures of 1,000 channels for `interim` (issue 24).
//!
//! Run: `cargo bench -p bench --bench core`.
#![allow(clippy::cast_possible_truncation)] // sequence numbers and timestamps wrap by design

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use relay_proto::control::AddChannel;
use relay_proto::rtp::{parse, RtpHeader};
use relay_proto::{
    ChannelId, Command, CommandOutcome, Format, MonoTime, Relay, RelayConfig, SocketId, Ssrc,
};

const PTIME_NS: u64 = 20_000_000;

/// A relay with `n` channels, each with Asterisk's address given.
fn relay_with(n: u32) -> (Relay, Vec<(SocketId, SocketAddr)>) {
    let config = RelayConfig {
        max_channels: n,
        ..RelayConfig::default()
    };
    let mut relay = Relay::new(config).expect("valid config");
    let mut channels = Vec::new();
    for i in 0..n {
        let asterisk = SocketAddr::from(([127, 0, 0, 2], 10_000 + (i % 50_000) as u16));
        let add = AddChannel {
            channel: ChannelId::try_from(format!("c{i}")).expect("valid id"),
            port: 0,
            asterisk: Some(asterisk),
            echo: None,
            format: Format::Ulaw,
        };
        let CommandOutcome::Open(pending) = relay.handle_command(MonoTime::ZERO, Command::Add(add))
        else {
            panic!("add refused")
        };
        let socket = pending.socket();
        relay
            .complete_open(MonoTime::ZERO, pending, Ok(20_000))
            .expect("opened");
        channels.push((socket, asterisk));
    }
    (relay, channels)
}

fn round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(2));
    for n in [1u32, 1_000] {
        g.bench_function(BenchmarkId::new("round_trip_channels", n), |b| {
            let (mut relay, channels) = relay_with(n);
            let echo = relay.config().default_echo;
            let mut buf = [0xffu8; 172];
            let mut now = 1_000_000_000u64;
            let mut k: u64 = 0;
            b.iter(|| {
                let i = (k % u64::from(n)) as usize;
                let round = k / u64::from(n);
                let (socket, asterisk) = channels[i];
                RtpHeader {
                    marker: false,
                    payload_type: 0,
                    sequence: round as u16,
                    timestamp: (160 * round) as u32,
                    ssrc: Ssrc(i as u32),
                }
                .write(&mut buf);
                now += PTIME_NS / u64::from(n);
                let t0 = MonoTime::from_nanos(now);
                let t1 = MonoTime::from_nanos(now + 40_000);
                let v0 = relay.handle_datagram(t0, socket, asterisk, black_box(&buf));
                let v1 = relay.handle_datagram(t1, socket, echo, black_box(&buf));
                k += 1;
                black_box((v0, v1))
            });
            assert_eq!(relay.global_stats().round_trip.timeouts, 0);
        });
    }
    g.finish();
}

fn parse_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));
    let mut buf = [0xffu8; 172];
    RtpHeader {
        sequence: 7,
        ..RtpHeader::default()
    }
    .write(&mut buf);
    g.bench_function("parse", |b| b.iter(|| black_box(parse(black_box(&buf)))));
    g.finish();
}

/// `interim` (every `--interim`, 2 s by default, from control): every channel's figures in
/// mergeable form, its RTT histogram serialised. It runs on the shard's thread, between
/// batches, so its time is time the packets of that shard wait: 1,000 channels of 500 round
/// trips each (10 s of a call) at once.
fn interim(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    let n = 1_000u32;
    g.throughput(Throughput::Elements(u64::from(n)));
    g.bench_function(BenchmarkId::new("interim_channels", n), |b| {
        let (mut relay, channels) = relay_with(n);
        let echo = relay.config().default_echo;
        let mut buf = [0xffu8; 172];
        let mut now = 1_000_000_000u64;
        for round in 0..500u64 {
            for (i, &(socket, asterisk)) in channels.iter().enumerate() {
                RtpHeader {
                    marker: false,
                    payload_type: 0,
                    sequence: round as u16,
                    timestamp: (160 * round) as u32,
                    ssrc: Ssrc(i as u32),
                }
                .write(&mut buf);
                now += PTIME_NS / u64::from(n);
                // Round trips of 0.3–1.3 ms, spread over the histogram's buckets.
                let rtt = 300_000 + (round * 7_919 + i as u64 * 104_729) % 1_000_000;
                let _ = relay.handle_datagram(MonoTime::from_nanos(now), socket, asterisk, &buf);
                let _ = relay.handle_datagram(MonoTime::from_nanos(now + rtt), socket, echo, &buf);
            }
        }
        let at = MonoTime::from_nanos(now + 1_000_000_000);
        b.iter(|| black_box(relay.handle_command(at, Command::Interim)));
    });
    g.finish();
}

criterion_group!(benches, round_trip, parse_only, interim);
criterion_main!(benches);
