//! The echo binary over loopback: clean reflection, and fault counts that equal what a client
//! observes, reproducibly.
#![allow(clippy::cast_possible_truncation)] // small known test values

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use relay_proto::rtp::{parse_rtp, RtpHeader};
use relay_proto::Ssrc;

fn skip_without_uring() -> bool {
    !testkit::uring_available()
}

/// Starts the echo on a free port with `args`; returns it (killed on drop) and its address.
fn start(args: &[&str]) -> (testkit::Proc, SocketAddr) {
    let mut all = vec!["--listen", "127.0.0.1:0", "--metrics", "off"];
    all.extend_from_slice(args);
    let (echo, addr) = testkit::start("echo", &all, "echo ready", "listen");
    (echo, addr.parse().unwrap())
}

/// Stops the echo (SIGTERM) and parses its summary line.
fn stop(mut echo: testkit::Proc) -> serde_json::Value {
    let out = echo.stop_for_stdout(Duration::from_secs(10));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("summary {out:?}: {e}"))
}

fn packet(seq: u16) -> Vec<u8> {
    let mut b = vec![0u8; 172];
    RtpHeader {
        sequence: seq,
        timestamp: 160 * u32::from(seq),
        ssrc: Ssrc(77),
        ..RtpHeader::default()
    }
    .write(&mut b)
    .unwrap();
    b[12] = seq as u8;
    b
}

fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

#[test]
fn clean_echo_returns_every_datagram_byte_identical() {
    if skip_without_uring() {
        return;
    }
    let (echo, addr) = start(&[]);
    let c = client();
    let mut buf = [0u8; 2048];
    for seq in 0..300 {
        c.send_to(&packet(seq), addr).unwrap();
        let (n, from) = testkit::recv(&c, &mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&packet(seq)[..], addr));
    }
    c.send_to(b"not rtp", addr).unwrap();
    let (n, _) = testkit::recv(&c, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"not rtp");
    let s = stop(echo);
    assert_eq!(
        (s["received"].as_u64(), s["sent"].as_u64()),
        (Some(301), Some(301))
    );
}

#[test]
fn with_gro_a_gso_batch_comes_back_as_its_datagrams_byte_identical() {
    if skip_without_uring() {
        return;
    }
    let (echo, addr) = start(&["--gro"]);
    // The client sends 10 packets in one GSO send from a ring; its plain socket gets the echo's
    // reflection (one GSO send) cut back into the 10 datagrams by the kernel.
    let c = client();
    let mut ring = relay_io::ring::Ring::with_buffer_size(8, 2, 1, 2, 1 << 16).unwrap();
    ring.register_socket(0, std::os::fd::AsRawFd::as_raw_fd(&c))
        .unwrap();
    let i = ring.tx_acquire().unwrap();
    let b = ring.tx_buffer(i).unwrap();
    for seq in 0..10u16 {
        let at = usize::from(seq) * 172;
        b[at..at + 172].copy_from_slice(&packet(seq));
    }
    ring.send_tx_gso(0, i, 1720, Some(172), addr, 1).unwrap();
    ring.submit_and_wait(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for seq in 0..10 {
        let (n, from) = testkit::recv(&c, &mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&packet(seq)[..], addr),
            "datagram {seq}"
        );
    }
    // A plain datagram still goes back as itself.
    c.send_to(&packet(99), addr).unwrap();
    let (n, _) = testkit::recv(&c, &mut buf).unwrap();
    assert_eq!(&buf[..n], &packet(99)[..]);
    let s = stop(echo);
    assert_eq!(s["gro"], true, "{s}");
    assert_eq!(
        (s["received"].as_u64(), s["sent"].as_u64()),
        (Some(11), Some(11)),
        "{s}"
    );
    assert!(
        s["coalesced"].as_u64().unwrap() >= 1,
        "the batch arrived coalesced: {s}"
    );
    assert!(
        s["gso_sends"].as_u64().unwrap() >= 1,
        "and went back as one GSO send: {s}"
    );
    assert_eq!(
        s["hold"]["count"].as_u64(),
        Some(11),
        "a hold per datagram: {s}"
    );
}

/// Sends `n` packets 2 ms apart through an echo with faults; returns what came back, in order.
fn faulted_run(seed: &str, n: u16) -> (Vec<u16>, serde_json::Value) {
    faulted_run_in(seed, n, 1)
}

/// [`faulted_run`], the packets sent `gso` at a time by one UDP GSO send (`2·gso` ms apart) to an
/// echo with `--gro` when `gso` > 1.
fn faulted_run_in(seed: &str, n: u16, gso: u16) -> (Vec<u16>, serde_json::Value) {
    let mut args = vec![
        "--loss",
        "0.05",
        "--duplicate",
        "0.05",
        "--reorder",
        "0.05",
        "--delay",
        "3ms",
        "--seed",
        seed,
    ];
    if gso > 1 {
        args.push("--gro");
    }
    let (echo, addr) = start(&args);
    let c = client();
    let rx = c.try_clone().unwrap();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        while let Ok((len, _)) = testkit::recv(&rx, &mut buf) {
            got.push(parse_rtp(&buf[..len]).unwrap().sequence);
        }
        got
    });
    if gso > 1 {
        let mut ring = relay_io::ring::Ring::with_buffer_size(8, 2, 1, 2, 1 << 16).unwrap();
        ring.register_socket(0, std::os::fd::AsRawFd::as_raw_fd(&c))
            .unwrap();
        for first in (0..n).step_by(usize::from(gso)) {
            let i = ring.tx_acquire().unwrap();
            let b = ring.tx_buffer(i).unwrap();
            let count = gso.min(n - first);
            for k in 0..count {
                let at = usize::from(k) * 172;
                b[at..at + 172].copy_from_slice(&packet(first + k));
            }
            ring.send_tx_gso(0, i, usize::from(count) * 172, Some(172), addr, 1)
                .unwrap();
            ring.submit_and_wait(Some(Duration::from_millis(100)))
                .unwrap();
            for cq in ring.drain_completions() {
                assert!(cq.result > 0, "GSO send: {}", cq.result);
            }
            ring.tx_release(i);
            std::thread::sleep(Duration::from_millis(2 * u64::from(gso)));
        }
    } else {
        for seq in 0..n {
            c.send_to(&packet(seq), addr).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let got = receiver.join().unwrap(); // ends 500 ms after the last echo
    (got, stop(echo))
}

/// The echo's fault counts in summary `s` equal what the client saw of `n` packets sent in order
/// (`got`, in arrival order), and every kind of fault happened.
fn faults_match_what_was_seen(got: &[u16], n: u16, s: &serde_json::Value) {
    let (lost, dups, reordered) = observed(got, n);
    assert!(
        lost > 0 && dups > 0 && reordered > 0,
        "faults happened: {s}"
    );
    assert_eq!(s["dropped"].as_u64(), Some(lost), "{s}");
    assert_eq!(s["duplicated"].as_u64(), Some(dups), "{s}");
    assert_eq!(s["reordered"].as_u64(), Some(reordered), "{s}");
    assert_eq!(s["sent"].as_u64(), Some(got.len() as u64), "{s}");
}

/// What a client saw: (lost, duplicates, reordered) of `n` packets sent in order.
fn observed(got: &[u16], n: u16) -> (u64, u64, u64) {
    let (mut seen, mut max, mut reordered, mut dups) = (HashSet::new(), None, 0u64, 0u64);
    for &q in got {
        if !seen.insert(q) {
            dups += 1;
            continue;
        }
        if max.is_some_and(|m| q < m) {
            reordered += 1;
        }
        max = Some(max.map_or(q, |m: u16| m.max(q)));
    }
    (u64::from(n) - seen.len() as u64, dups, reordered)
}

#[test]
fn with_gro_faults_apply_to_each_datagram_of_a_coalesced_batch() {
    if skip_without_uring() {
        return;
    }
    // 600 packets in GSO sends of 8: the echo receives 75 coalesced batches and decides on each
    // datagram in them as if it had come alone.
    let (got, s) = faulted_run_in("11", 600, 8);
    assert_eq!(s["gro"], true, "{s}");
    assert!(
        s["coalesced"].as_u64().unwrap() >= 60,
        "batches arrived coalesced: {s}"
    );
    assert_eq!(s["no_buffer"].as_u64(), Some(0), "{s}");
    // What leaves together goes back together: the 3 ms delay keeps a batch's survivors due at
    // one moment, so they are reflected by GSO sends of several datagrams.
    assert!(s["gso_sends"].as_u64().unwrap() >= 30, "regathered: {s}");
    assert_eq!(s["received"].as_u64(), Some(600), "{s}");
    faults_match_what_was_seen(&got, 600, &s);
    // The seed decides per datagram, so the same packets sent one by one meet the same fates.
    let (_, plain) = faulted_run("11", 600);
    for k in ["dropped", "duplicated"] {
        assert_eq!(plain[k], s[k], "{k}: plain {plain}, coalesced {s}");
    }
}

#[test]
fn fault_counts_equal_what_the_client_sees_and_the_seed_reproduces_them() {
    if skip_without_uring() {
        return;
    }
    let (got, s) = faulted_run("11", 600);
    faults_match_what_was_seen(&got, 600, &s);
    // The same seed makes the same decisions.
    let (_, again) = faulted_run("11", 600);
    for k in ["dropped", "duplicated", "reordered"] {
        assert_eq!(again[k], s[k], "{k}");
    }
}

#[test]
fn bad_flags_exit_non_zero_naming_the_flag() {
    for (args, flag) in [
        (&["--loss", "1.5"][..], "--loss"),
        (&["--buffers", "1000"], "--buffers"),
        (&["--delay", "soon"], "--delay"),
    ] {
        let out = testkit::output(
            Command::new(env!("CARGO_BIN_EXE_echo")).args(args),
            Duration::from_secs(20),
            None,
        )
        .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(flag),
            "{args:?}"
        );
    }
}
