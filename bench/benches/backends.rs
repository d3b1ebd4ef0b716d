//! Criterion group `rtp-relay`: the io_uring and tokio backends forward the same burst across N
//! channel sockets (N = 100 and 1,000), with the same configuration, measured as throughput in
//! packets, so criterion's report compares them directly.
//!
//! Each backend runs as the real `relay` process (release build), pinned to core 1; this process
//! (core 0) plays Asterisk with one socket per channel and the echo with one sink socket. One
//! iteration sends one RTP packet on every channel socket, back to back, and waits until the sink
//! has all N: the relay's receive, parse, measure and send for a burst of N, across N sockets.
//!
//! `cargo bench -p bench --bench backends`

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use loadgen::ctl::RelayClient;
use relay_proto::{RtpHeader, Ssrc};

/// A relay process with N channels from `senders` to `sink`.
struct Rig {
    _relay: testkit::Proc,
    senders: Vec<(UdpSocket, SocketAddr)>,
    sink: UdpSocket,
    seq: u16,
    short: u64,
}

impl Rig {
    fn new(backend: &str, n: usize) -> Self {
        let ctl = std::env::temp_dir().join(format!(
            "bench-backends-{}-{backend}.sock",
            std::process::id()
        ));
        let sink =
            relay_io::bind_udp("127.0.0.1".parse().unwrap(), 0, 16 << 20).expect("sink socket");
        let sink_addr = sink.local_addr().unwrap();
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let core = if cores > 1 { "1" } else { "0" };
        let (relay, _) = testkit::start(
            "relay",
            &[
                "--backend",
                backend,
                "--ctl",
                ctl.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:0",
                "--echo",
                &sink_addr.to_string(),
                "--core",
                core,
                "--max-channels",
                &n.to_string(),
            ],
            "relay ready",
            "backend",
        );
        let mut c = RelayClient::connect(&ctl).unwrap();
        let senders = (0..n)
            .map(|i| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                let port = c
                    .add(&format!("b{i}"), 0, s.local_addr().unwrap(), None)
                    .unwrap();
                (s, SocketAddr::new("127.0.0.1".parse().unwrap(), port))
            })
            .collect();
        // bind_channel_socket makes it non-blocking, for the relay; the sink blocks, with a limit.
        sink.set_nonblocking(false).unwrap();
        sink.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self {
            _relay: relay,
            senders,
            sink,
            seq: 0,
            short: 0,
        }
    }

    /// One burst: a packet on every channel, then all N back at the sink.
    fn burst(&mut self) {
        let mut pkt = [0u8; 172];
        for (i, (s, to)) in self.senders.iter().enumerate() {
            RtpHeader {
                marker: false,
                payload_type: 0,
                sequence: self.seq,
                timestamp: u32::from(self.seq).wrapping_mul(160),
                ssrc: Ssrc(u32::try_from(i).unwrap() + 1),
            }
            .write(&mut pkt);
            s.send_to(&pkt, to).unwrap();
        }
        self.seq = self.seq.wrapping_add(1);
        let mut buf = [0u8; 2048];
        for _ in 0..self.senders.len() {
            if testkit::recv(&self.sink, &mut buf).is_err() {
                self.short += 1; // lost: counted, reported at the end
                break;
            }
        }
    }
}

fn backends(c: &mut Criterion) {
    let uring = relay_io::ring::probe().is_ok();
    let mut group = c.benchmark_group("rtp-relay");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    if let Ok(cores) = std::thread::available_parallelism() {
        if cores.get() > 1 {
            let _ = relay_io::pin_current_thread(0);
        }
    }
    for n in [100usize, 1_000] {
        group.throughput(Throughput::Elements(n as u64));
        for backend in ["uring", "tokio"] {
            if backend == "uring" && !uring {
                eprintln!("SKIPPED uring/{n}: io_uring unavailable here");
                continue;
            }
            let mut rig = Rig::new(backend, n);
            let start = Instant::now();
            group.bench_function(BenchmarkId::new(backend, n), |b| b.iter(|| rig.burst()));
            if rig.short > 0 {
                eprintln!(
                    "{backend}/{n}: {} bursts came back short within 200 ms (lost datagrams) in {:?}",
                    rig.short,
                    start.elapsed()
                );
            }
        }
    }
    group.finish();
}

criterion_group!(benches, backends);
criterion_main!(benches);
