//! Probes (`relay_proto::probe`) through the relay binary, on both backends and both echo legs,
//! over loopback: a caller's probes come back with the relay's two kernel times written in their
//! header, in order (arrival before return), and nothing else changed; the times agree with what
//! the relay reports (the mean of its loop in `remove`'s statistics equals the mean over the
//! headers; `/metrics`); and a call without probes comes back byte for byte.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // small known test values

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{available, recv, rtp, udp, wait_for, RelayProc};
use relay_proto::probe::{self, Probe, RELAY_FIELDS};

/// Probes each call sends, one at a time.
const N: u32 = 40;

macro_rules! both_backends_and_legs {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() {
                if super::available("uring") {
                    super::$name("uring", "per-channel");
                    super::$name("uring", "shared");
                }
            })*
        }
        mod tokio {
            $(#[test] fn $name() {
                super::$name("tokio", "per-channel");
                super::$name("tokio", "shared");
            })*
        }
    };
}

both_backends_and_legs!(probes_come_back_with_the_relays_times_and_audio_untouched);

fn wall_now() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

/// A 172-byte ulaw RTP packet whose payload starts with probe `seq` of call 5.
fn probe_packet(seq: u32) -> Vec<u8> {
    let mut b = rtp(seq as u16, 7);
    let sent_ns = wall_now();
    probe::write(
        &mut b[12..],
        Probe {
            call: 5,
            seq,
            sent_ns,
        },
    )
    .unwrap();
    b
}

/// Reflects every datagram to its source, unchanged, until `n` have gone back.
fn reflect(echo: UdpSocket, n: u32) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..n {
            let (len, from) = recv(&echo, &mut buf).expect("the echo receives every packet");
            echo.send_to(&buf[..len], from).unwrap();
        }
    })
}

/// Sends `packet` to `to` from `s` and returns what comes back, and the wall clock just after.
fn exchange(s: &UdpSocket, to: SocketAddr, packet: &[u8]) -> (Vec<u8>, u64) {
    let mut buf = [0u8; 2048];
    s.send_to(packet, to).unwrap();
    let (n, from) = recv(s, &mut buf).expect("the packet comes back");
    let after = wall_now();
    assert_eq!(from, to, "from the channel's own port");
    (buf[..n].to_vec(), after)
}

fn probes_come_back_with_the_relays_times_and_audio_untouched(backend: &str, leg: &str) {
    let relay = RelayProc::start(backend, &["--echo-leg", leg]);
    let mut ctl = relay.client();
    let (caller, audio, echo) = (udp(), udp(), udp());
    let echo_addr = echo.local_addr().unwrap();
    let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let to_probe = port(ctl.add("probe", Some(caller.local_addr().unwrap()), echo_addr));
    let to_audio = port(ctl.add("audio", Some(audio.local_addr().unwrap()), echo_addr));
    let echoer = reflect(echo, 2 * N);

    // (sent, back) of each probe.
    let mut loops = Vec::new();
    let mut asterisk_in = Vec::new();
    for seq in 0..N {
        let sent = probe_packet(seq);
        let (back, after) = exchange(&caller, to_probe, &sent);
        // A call's audio, some of it starting with the probe magic, beside the probes.
        let mut a = rtp(seq as u16, 9);
        if seq % 3 == 0 {
            a[12..20].copy_from_slice(&probe::MAGIC);
        }
        assert_eq!(
            exchange(&audio, to_audio, &a).0,
            a,
            "{backend} {leg}: audio"
        );
        if seq + 1 < probe::RECOGNISE_AFTER {
            assert_eq!(
                back, sent,
                "{backend} {leg}: probe {seq} before recognition"
            );
            continue;
        }
        let changed: Vec<usize> = (0..sent.len()).filter(|&i| sent[i] != back[i]).collect();
        assert!(
            changed
                .iter()
                .all(|i| (RELAY_FIELDS.start + 12..RELAY_FIELDS.end + 12).contains(i)),
            "{backend} {leg}: probe {seq} changed outside the relay's fields: {changed:?}"
        );
        let t = probe::relay_times(&back[12..])
            .unwrap_or_else(|| panic!("{backend} {leg}: probe {seq} has no relay times"));
        let sent_ns = probe::parse(&sent[12..]).unwrap().sent_ns;
        // One host, one clock: the probe was sent, reached the relay, its echo came back to the
        // relay, and then to the caller, in that order.
        assert!(
            sent_ns < t.arrival_ns && t.arrival_ns < t.returned_ns && t.returned_ns < after,
            "{backend} {leg}: probe {seq}: sent {sent_ns}, {t:?}, back {after}"
        );
        loops.push(t.returned_ns - t.arrival_ns);
        asterisk_in.push(t.arrival_ns - sent_ns);
    }
    echoer.join().unwrap();

    let written = u64::from(N - (probe::RECOGNISE_AFTER - 1));
    let mean = |v: &[u64]| {
        let n = v.len() as u64;
        (v.iter().sum::<u64>() + n / 2) / n
    };
    wait_for(
        "the probe metrics to be published",
        Duration::from_secs(5),
        || (relay.metric("rtprelay_probes_written_total", "") == written as f64).then_some(()),
    );
    assert_eq!(relay.metric("rtprelay_probe_channels", ""), 1.0);
    assert_eq!(
        relay.metric("rtprelay_probes_total", "direction=\"to_echo\""),
        f64::from(N)
    );
    assert_eq!(
        relay.metric("rtprelay_probe_loop_seconds_count", ""),
        written as f64
    );
    let sum = relay.metric("rtprelay_probe_loop_seconds_sum", "");
    let header_sum = loops.iter().sum::<u64>() as f64 / 1e9;
    assert!(
        (sum - header_sum).abs() < 1e-6 * written as f64,
        "{backend} {leg}: Prometheus {sum} s, headers {header_sum} s"
    );

    let s = ctl.remove("probe").probe.expect("probe figures");
    assert!(s.recognised);
    assert_eq!(
        (s.received, s.returned, s.written),
        (u64::from(N), u64::from(N), written),
        "{backend} {leg}: {s:?}"
    );
    // The loop the relay records is the difference of its monotonic arrivals; the header's,
    // of the same two kernel stamps on the wall clock: the same but for a refinement of the
    // realtime − monotonic anchor between them (nanoseconds).
    assert_eq!(s.relay_loop.count, written);
    let (relay_mean, header_mean) = (s.relay_loop.mean_ns, mean(&loops));
    eprintln!(
        "{backend} {leg}: relay loop mean {relay_mean} ns, from the headers {header_mean} ns"
    );
    assert!(
        relay_mean.abs_diff(header_mean) <= 1_000,
        "{backend} {leg}: relay {relay_mean} ns, headers {header_mean} ns"
    );
    // Asterisk in is the written arrival minus the header's send time: exactly.
    assert_eq!(s.asterisk_in.count, written);
    assert_eq!(s.asterisk_in.mean_ns, mean(&asterisk_in), "{backend} {leg}");
    assert_eq!(s.asterisk_in_negative, 0);
    assert_eq!(ctl.remove("audio").probe, None, "{backend} {leg}");
}
