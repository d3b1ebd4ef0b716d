//! The echo binary over loopback: clean reflection, fault counts that equal what a client observes,
//! reproducibly, and holds timed from kernel receive stamp to kernel transmit stamp that agree with
//! the client's own kernel-stamped round trips. With `--gro`: a GSO batch comes back as its
//! datagrams, byte-identical and counted one by one, and seeded faults on GSO batches of 8 are
//! counted exactly and meet the same fates as the same packets sent one by one.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)] // small known test values, nanoseconds far below 2^53

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use relay_io::ring::{Group, SendOpts, UserData};
use relay_proto::rtp::{parse_rtp, RtpHeader};
use relay_proto::Ssrc;

/// Send options for one GSO send of `segment`-byte datagrams.
fn gso(segment: u16) -> SendOpts {
    SendOpts {
        segment: Some(segment),
        stamp_id: None,
    }
}

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
    // Each reflection was timed by its kernel transmit stamp.
    assert_eq!(s["hold"]["count"].as_u64(), Some(301), "{s}");
    assert_eq!(s["timestamps_missing"].as_u64(), Some(0), "{s}");
    assert!(s["hold"]["min_ns"].as_u64().unwrap() > 0, "{s}");
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
    let mut ring = relay_io::ring::Ring::builder(8)
        .buffers(2)
        .tx(2)
        .buffer_size(1 << 16)
        .build()
        .unwrap();
    ring.register_socket(0, std::os::fd::AsRawFd::as_raw_fd(&c))
        .unwrap();
    let mut i = ring.tx_acquire(Group::Small).unwrap();
    let b = ring.tx_buffer(&mut i).unwrap();
    for seq in 0..10u16 {
        let at = usize::from(seq) * 172;
        b[at..at + 172].copy_from_slice(&packet(seq));
    }
    ring.send(0, i, 1720, addr, UserData::of(1), gso(172))
        .unwrap();
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
    assert_eq!(s["timestamps_missing"].as_u64(), Some(0), "{s}");
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
        let mut ring = relay_io::ring::Ring::builder(8)
            .buffers(2)
            .tx(2)
            .buffer_size(1 << 16)
            .build()
            .unwrap();
        ring.register_socket(0, std::os::fd::AsRawFd::as_raw_fd(&c))
            .unwrap();
        for first in (0..n).step_by(usize::from(gso)) {
            let mut i = ring.tx_acquire(Group::Small).unwrap();
            let b = ring.tx_buffer(&mut i).unwrap();
            let count = gso.min(n - first);
            for k in 0..count {
                let at = usize::from(k) * 172;
                b[at..at + 172].copy_from_slice(&packet(first + k));
            }
            let len = usize::from(count) * 172;
            ring.send(0, i, len, addr, UserData::of(1), self::gso(172))
                .unwrap();
            ring.submit_and_wait(Some(Duration::from_millis(100)))
                .unwrap();
            let mut cs = ring.drain_completions();
            for cq in &mut cs {
                assert!(cq.result > 0, "GSO send: {}", cq.result);
                if let Some(i) = cq.take_tx() {
                    ring.recycle(i);
                }
            }
            ring.give_back(cs);
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
    // Every datagram sent, duplicates included, had its hold timed by its send's stamp.
    assert_eq!(s["timestamps_missing"].as_u64(), Some(0), "{s}");
    assert_eq!(s["hold"]["count"].as_u64(), Some(got.len() as u64), "{s}");
    assert!(
        s["hold"]["min_ns"].as_u64().unwrap() >= 3_000_000,
        "--delay 3ms: {s}"
    );
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
        (&["--clock-rate", "0"], "--clock-rate"),
        (&["--metrics", "nowhere"], "--metrics"),
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

/// A client that times its own round trips with kernel stamps, as the wire would: the kernel's
/// transmit stamp of each send (by the id it carried, from the client's error queue) and the
/// kernel's receive stamp of each datagram that comes back. Nothing else is subtracted: loopback
/// transit is microseconds.
struct StampedClient {
    socket: UdpSocket,
    /// Transmit stamp of send k (wall-clock ns).
    sent: Vec<Option<u64>>,
    /// Receive stamp of datagram q (wall-clock ns).
    back: Vec<Option<u64>>,
}

impl StampedClient {
    /// None (the test is skipped, loudly) where the kernel has no transmit stamps with ids.
    fn new(sends: usize, datagrams: usize) -> Option<Self> {
        let socket = relay_io::bind_udp("127.0.0.1".parse().unwrap(), 0, 4 << 20).unwrap();
        if let Err(e) = relay_io::enable_tx_timestamps(&socket) {
            eprintln!("SKIPPED (no kernel transmit stamps here): {e}");
            return None;
        }
        relay_io::enable_rx_timestamps(&socket).unwrap();
        Some(Self {
            socket,
            sent: vec![None; sends],
            back: vec![None; datagrams],
        })
    }

    /// Reads every transmit stamp and returned datagram queued, without blocking.
    fn poll(&mut self) {
        loop {
            match relay_io::recv_tx_stamp(&self.socket) {
                Ok(s) => self.sent[s.id as usize] = Some(s.at.0),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("error queue: {e}"),
            }
        }
        let (mut buf, mut control) = ([0u8; 2048], [0u8; relay_io::socket::CONTROL_LEN]);
        loop {
            match relay_io::recv_msg(&self.socket, &mut buf, &mut control) {
                Ok(m) => {
                    let seq = parse_rtp(&buf[..m.len]).unwrap().sequence;
                    let at = relay_io::rx_timestamp(&control[..m.control_len])
                        .unwrap()
                        .expect("a receive stamp");
                    assert!(self.back[usize::from(seq)].is_none(), "one copy of {seq}");
                    self.back[usize::from(seq)] = Some(at.0);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("receive: {e}"),
            }
        }
    }

    /// Sends `sends` sends of `gso` datagrams each (one UDP GSO send when `gso` > 1), one a
    /// millisecond, to `to`; waits (5 s at most) for every stamp and every datagram back;
    /// returns each datagram's round trip, nanoseconds.
    fn round_trips(mut self, to: SocketAddr, gso: u16) -> Vec<u64> {
        let sends = self.sent.len();
        let start = std::time::Instant::now();
        for k in 0..sends {
            let mut batch = Vec::new();
            for j in 0..gso {
                batch.extend_from_slice(&packet(k as u16 * gso + j));
            }
            let opts = SendOpts {
                segment: (gso > 1).then_some(172),
                stamp_id: Some(k as u32),
            };
            assert_eq!(
                relay_io::send_msg(&self.socket, &batch, to, opts).unwrap(),
                batch.len()
            );
            // Paced on absolute deadlines; the stamps, not this loop, time everything.
            let next = start + Duration::from_millis(k as u64 + 1);
            while std::time::Instant::now() < next {
                self.poll();
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        testkit::wait_for(
            "every stamp and every datagram",
            Duration::from_secs(5),
            || {
                self.poll();
                (self.sent.iter().all(Option::is_some) && self.back.iter().all(Option::is_some))
                    .then_some(())
            },
        );
        self.back
            .iter()
            .enumerate()
            .map(|(q, back)| {
                let sent = self.sent[q / usize::from(gso)].unwrap();
                back.unwrap()
                    .checked_sub(sent)
                    .unwrap_or_else(|| panic!("datagram {q} came back before it left"))
            })
            .collect()
    }
}

/// The value at quantile `q` of sorted `v`, as hdrhistogram ranks it (the first value with at
/// least `q` of the count at or below it).
fn quantile(v: &[u64], q: f64) -> u64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The echo held each datagram 2 ms, measured from kernel stamps to kernel stamps, and agrees
/// with the client's own kernel round trip: that is at least the hold at every quantile (each
/// round trip contains its hold), and above it at p50 by the loopback transit only.
fn hold_is_2ms_and_matches_the_client(s: &serde_json::Value, rtts: &mut [u64]) {
    let ms = |v: &serde_json::Value| v.as_u64().unwrap() as f64 / 1e6;
    let hold = &s["hold"];
    eprintln!("echo: {s}");
    assert_eq!(s["timestamps"], "kernel", "{s}");
    assert_eq!(s["timestamps_missing"].as_u64(), Some(0), "{s}");
    assert_eq!(s["timestamps_stale"].as_u64(), Some(0), "{s}");
    assert_eq!(hold["count"].as_u64(), Some(rtts.len() as u64), "{s}");
    assert!(
        ms(&hold["min_ns"]) >= 2.0,
        "min hold {} ms",
        ms(&hold["min_ns"])
    );
    let p50 = ms(&hold["p50_ns"]);
    assert!((2.0..=2.3).contains(&p50), "hold p50 {p50} ms");
    rtts.sort_unstable();
    assert!(rtts[0] >= 2_000_000, "client round trip {} ns", rtts[0]);
    // The echo's histogram reports a bucket's top (3 significant digits: its buckets are 1/1024
    // to 1/512 of the value wide, 1 to 2 µs at 2 ms, 4 µs at 5 ms).
    let slack = |ns: u64| ns / 500 + 1_000;
    for (name, q) in [
        ("min", 0.0),
        ("p50", 0.5),
        ("p95", 0.95),
        ("p99", 0.99),
        ("max", 1.0),
    ] {
        let key = match name {
            "min" => "min_ns".to_owned(),
            "max" => "max_ns".to_owned(),
            p => format!("{p}_ns"),
        };
        let (client, echo) = (quantile(rtts, q), hold[&key].as_u64().unwrap());
        eprintln!("{name}: client round trip {client} ns, echo hold {echo} ns");
        assert!(
            client + slack(echo) >= echo,
            "{name}: the client's round trip {client} ns is shorter than the echo's hold {echo} ns"
        );
    }
    let hold_p50 = hold["p50_ns"].as_u64().unwrap();
    let diff = quantile(rtts, 0.5) as i64 - hold_p50 as i64;
    assert!(
        (-(slack(hold_p50) as i64)..20_000).contains(&diff),
        "client round trip p50 − echo hold p50 = {diff} ns (loopback transit is µs)"
    );
}

#[test]
fn a_2ms_hold_runs_from_kernel_receive_to_kernel_transmit_stamp() {
    if skip_without_uring() {
        return;
    }
    let Some(client) = StampedClient::new(300, 300) else {
        return;
    };
    let (echo, addr) = start(&["--delay", "2ms"]);
    let mut rtts = client.round_trips(addr, 1);
    let s = stop(echo);
    assert_eq!(s["tx_timestamps"], "error_queue", "{s}");
    hold_is_2ms_and_matches_the_client(&s, &mut rtts);
}

#[test]
fn with_gro_a_2ms_hold_times_gso_batches_from_their_stamps() {
    if skip_without_uring() {
        return;
    }
    // 40 GSO sends of 8: each arrives as one coalesced receive, is held 2 ms, and leaves as one
    // regathered GSO send whose one stamp times its 8 datagrams.
    let Some(client) = StampedClient::new(40, 320) else {
        return;
    };
    let (echo, addr) = start(&["--delay", "2ms", "--gro"]);
    let mut rtts = client.round_trips(addr, 8);
    let s = stop(echo);
    assert_eq!(s["tx_timestamps"], "error_queue", "with --gro: {s}");
    assert!(s["coalesced"].as_u64().unwrap() >= 30, "{s}");
    // (Batches due together on a busy machine leave in one send: fewer sends, never none.)
    assert!(s["gso_sends"].as_u64().unwrap() > 0, "{s}");
    hold_is_2ms_and_matches_the_client(&s, &mut rtts);
}

/// The echo in this process (its I/O thread), stopped on drop, panics included.
struct InProcess {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    waker: std::sync::Arc<relay_io::ring::EventFd>,
    thread: Option<std::thread::JoinHandle<Result<echo::Summary, echo::RunError>>>,
}

impl InProcess {
    fn start(config: echo::Config) -> (Self, SocketAddr) {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let shared = echo::SharedCounts::default();
                echo::run(&config, &stop, &shared, |addr, waker| {
                    let _ = tx.send((addr, waker));
                })
            })
        };
        let (addr, waker) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the echo started");
        let echo = Self {
            stop,
            waker,
            thread: Some(thread),
        };
        (echo, addr)
    }

    fn summary(mut self) -> serde_json::Value {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.waker.notify();
        let s = self.thread.take().unwrap().join().unwrap().unwrap();
        serde_json::to_value(&s).unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.waker.notify();
    }
}

#[test]
fn through_io_urings_command_a_2ms_hold_is_timed_the_same() {
    if skip_without_uring() {
        return;
    }
    // `--tx-stamps command`: the stamps come back as completions of io_uring's command (Linux
    // 6.15+; the error queue where the kernel refuses it).
    let Some(client) = StampedClient::new(300, 300) else {
        return;
    };
    let (echo, addr) = InProcess::start(echo::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics: None,
        core: None,
        faults: echo::faults::FaultConfig {
            delay: Duration::from_millis(2),
            clock_hz: 8000,
            reorder_hold: Duration::from_millis(200),
            ..echo::faults::FaultConfig::default()
        },
        buffers: 1024,
        rcvbuf: 4 << 20,
        duration: None,
        gro: false,
        tx_stamps: echo::TxStamps::Command,
    });
    let mut rtts = client.round_trips(addr, 1);
    let s = echo.summary();
    assert_eq!(
        s["tx_timestamps"], "ring",
        "this kernel has io_uring's command: {s}"
    );
    hold_is_2ms_and_matches_the_client(&s, &mut rtts);
}
