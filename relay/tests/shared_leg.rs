//! `--echo-leg shared`, on both backends, over loopback with test sockets playing Asterisk and the
//! echo: the echo sees one relay socket and the relay's tags, Asterisk gets its own bytes back from
//! its channel's port, two calls with one SSRC stay apart, Opus-like mixed sizes (60-1,200 bytes)
//! survive the batching, and a forged tag is dropped and counted as `unknown_tag`.
#![allow(clippy::cast_possible_truncation)] // small known test values

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{recv, rtp, udp, wait_for, RelayProc};

fn start(backend: &str) -> Option<RelayProc> {
    (backend == "tokio" || testkit::uring_available())
        .then(|| RelayProc::start(backend, &["--echo-leg", "shared"]))
}

/// An RTP packet of `len` bytes (≥ 12) for `seq`, its payload marking `mark` and `seq`.
fn sized(seq: u16, ssrc: u32, len: usize, mark: u8) -> Vec<u8> {
    let mut p = rtp(seq, ssrc);
    p.resize(len, 0);
    for (i, x) in p[12..].iter_mut().enumerate() {
        *x = mark ^ (seq as u8).wrapping_add(i as u8);
    }
    p
}

/// Reflects `n` datagrams on `echo` unchanged; returns what it saw, with their sources.
fn reflect(echo: &UdpSocket, n: usize) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    (0..n)
        .map(|_| {
            let (len, from) = recv(echo, &mut buf).expect("the echo receives every packet");
            echo.send_to(&buf[..len], from).unwrap();
            (buf[..len].to_vec(), from)
        })
        .collect()
}

fn asterisk_gets_its_own_bytes_back_from_its_port_and_the_echo_sees_tags(backend: &str) {
    let Some(relay) = start(backend) else { return };
    let mut ctl = relay.client();
    let echo = udp();
    let (a, b) = (udp(), udp());
    let pa = ctl.add(
        "a",
        Some(a.local_addr().unwrap()),
        echo.local_addr().unwrap(),
    );
    let pb = ctl.add(
        "b",
        Some(b.local_addr().unwrap()),
        echo.local_addr().unwrap(),
    );
    let (ta, tb) = (
        SocketAddr::from(([127, 0, 0, 1], pa)),
        SocketAddr::from(([127, 0, 0, 1], pb)),
    );
    // Both calls use one SSRC; sizes vary like Opus frames, so batches break on size.
    const K: u16 = 60;
    let size = |seq: u16| [172usize, 172, 90, 1200, 60, 172][usize::from(seq) % 6];
    let mut buf = [0u8; 2048];
    let mut shared_src = None;
    for seq in 0..K {
        a.send_to(&sized(seq, 0x1234, size(seq), 0xa0), ta).unwrap();
        b.send_to(&sized(seq, 0x1234, size(seq), 0xb0), tb).unwrap();
        for (leg, from) in reflect(&echo, 2) {
            assert_ne!(
                &leg[8..12],
                &0x1234u32.to_be_bytes(),
                "the echo sees a tag, not the SSRC"
            );
            assert_ne!(from, ta, "not from a channel port");
            assert_ne!(from, tb);
            assert_eq!(
                *shared_src.get_or_insert(from),
                from,
                "one relay socket toward the echo"
            );
        }
        for (ast, to, mark) in [(&a, ta, 0xa0), (&b, tb, 0xb0)] {
            let (n, from) = recv(ast, &mut buf).unwrap();
            assert_eq!(
                &buf[..n],
                &sized(seq, 0x1234, size(seq), mark)[..],
                "seq {seq}"
            );
            assert_eq!(from, to, "from the channel's own port");
        }
    }
    for name in ["a", "b"] {
        let s = ctl.remove(name);
        assert_eq!(
            s.round_trip.matched,
            u64::from(K),
            "{name}: every packet measured"
        );
        assert_eq!(s.rtt.count, u64::from(K));
        assert_eq!(s.streams.to_asterisk.lost, 0);
        assert_eq!(s.streams.to_asterisk.duplicates, 0);
    }
}

fn a_forged_tag_is_dropped_and_counted(backend: &str) {
    let Some(relay) = start(backend) else { return };
    let mut ctl = relay.client();
    let (ast, echo) = (udp(), udp());
    let port = ctl.add(
        "c",
        Some(ast.local_addr().unwrap()),
        echo.local_addr().unwrap(),
    );
    ast.send_to(&rtp(1, 5), SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap();
    let (leg, shared) = reflect(&echo, 1).remove(0);
    let mut buf = [0u8; 2048];
    recv(&ast, &mut buf).unwrap();
    // The same packet with another tag, and one with a tag of no channel at all.
    for forged in [
        leg[8..12].iter().map(|b| b ^ 0x80).collect::<Vec<u8>>(),
        vec![0xff; 4],
    ] {
        let mut p = leg.clone();
        p[8..12].copy_from_slice(&forged);
        echo.send_to(&p, shared).unwrap();
    }
    wait_for("two unknown_tag drops", Duration::from_secs(5), || {
        (relay.metric("rtprelay_drops_total", "reason=\"unknown_tag\"") == 2.0).then_some(())
    });
    ast.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        ast.recv_from(&mut buf).is_err(),
        "nothing forged reaches Asterisk"
    );
    assert_eq!(ctl.remove("c").round_trip.matched, 1);
    assert_eq!(relay.metric("rtprelay_info", "echo_leg=\"shared\""), 1.0);
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { super::$name("uring") })*
        }
        mod tokio {
            $(#[test] fn $name() { super::$name("tokio") })*
        }
    };
}

both_backends!(
    asterisk_gets_its_own_bytes_back_from_its_port_and_the_echo_sees_tags,
    a_forged_tag_is_dropped_and_counted,
);
