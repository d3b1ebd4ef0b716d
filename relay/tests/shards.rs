//! A relay of two shards (`--cores 0,1`, and both on one core, `--cores 1,1`) against real loopback
//! sockets and the project's echo and loadgen, on both backends: 200 adds land 100/100 and `list`
//! agrees; removing 50 of one shard's channels sends the next 50 adds there; a 200-channel `loadgen
//! rtp` run is forwarded and measured whole, with the relay-wide counters equal to the sum of the
//! shards' and to what loadgen sent; a channel's final statistics do not depend on its shard; and
//! SIGTERM logs the merged totals.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // small known test values

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{available, recv, rtp, udp, wait_for, RelayProc};
use relay_proto::{ChannelStats, Response};
use serde_json::Value;
use testkit::{bin, start};

macro_rules! each {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { if super::available("uring") { super::$name("uring") } })*
        }
        mod tokio {
            $(#[test] fn $name() { super::$name("tokio") })*
        }
    };
}

each!(
    two_shards_on_two_cores_split_the_load_and_count_every_packet,
    two_shards_on_one_core_split_the_load_and_count_every_packet,
    a_channel_s_final_statistics_do_not_depend_on_its_shard,
    sigterm_stops_every_shard_and_reports_the_merged_totals,
);

fn two_shards_on_two_cores_split_the_load_and_count_every_packet(backend: &str) {
    split_and_count(backend, "0,1");
}

fn two_shards_on_one_core_split_the_load_and_count_every_packet(backend: &str) {
    split_and_count(backend, "1,1");
}

/// One loaded run at a time: each drives 10,000 packets/s from a debug-build loadgen (kernel
/// transmit stamps included) and asserts it kept its pace, which two of them side by side on a
/// 2-core machine, beside the relay and the echo, do not.
static LOADED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `(shard, channels)` from every `list` entry.
fn shards_of_list(ctl: &mut common::Ctl) -> HashMap<String, u32> {
    match ctl.request(relay_proto::Command::List) {
        Ok(Response::Channels { channels }) => channels
            .into_iter()
            .map(|c| (c.channel.as_str().to_owned(), c.shard))
            .collect(),
        other => panic!("list: {other:?}"),
    }
}

fn split_and_count(backend: &str, cores: &str) {
    let _one_at_a_time = LOADED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (_echo, echo_addr) = start(
        "echo",
        &["--listen", "127.0.0.1:0", "--metrics", "off"],
        "echo ready",
        "listen",
    );
    let relay = RelayProc::start(backend, &["--cores", cores, "--echo", &echo_addr]);
    let mut ctl = relay.client();
    let echo: SocketAddr = echo_addr.parse().unwrap();

    // Placement: 200 adds land 100/100, alternating; `list` says the same.
    let mut on = [Vec::new(), Vec::new()];
    for i in 0..200 {
        let name = format!("p{i}");
        let (_, shard) = ctl.add_on(&name, None, echo);
        on[shard as usize].push(name);
    }
    assert_eq!((on[0].len(), on[1].len()), (100, 100));
    let listed = shards_of_list(&mut ctl);
    assert_eq!(listed.len(), 200);
    for (s, names) in on.iter().enumerate() {
        assert!(
            names.iter().all(|n| listed[n] == s as u32),
            "list names the shard"
        );
    }
    wait_for("per-shard channel gauges", Duration::from_secs(5), || {
        (relay.metric("rtprelay_shard_channels", "shard=\"0\"") == 100.0
            && relay.metric("rtprelay_shard_channels", "shard=\"1\"") == 100.0
            && relay.metric("rtprelay_channels", "") == 200.0)
            .then_some(())
    });
    // Removing half of shard 1's channels sends the next 50 adds all there.
    for name in on[1].drain(..50) {
        ctl.remove(&name);
    }
    for i in 0..50 {
        let name = format!("q{i}");
        let (_, shard) = ctl.add_on(&name, None, echo);
        assert_eq!(shard, 1, "add {name} goes to the emptier shard");
        on[1].push(name);
    }
    // …and then they alternate again, the lower index first on a tie.
    for (name, want) in [("r0", 0), ("r1", 1)] {
        let (_, shard) = ctl.add_on(name, None, echo);
        assert_eq!(shard, want, "{name}");
        on[shard as usize].push(name.to_owned());
    }
    for name in on.iter().flatten() {
        ctl.remove(name);
    }
    assert_eq!(ctl.global().channels, 0, "every channel removed");

    // Traffic: loadgen's 200 channels through both shards; nothing lost, every packet measured.
    let out = testkit::output(
        std::process::Command::new(bin("loadgen"))
            .args(["rtp", "--relay-ctl", relay.ctl.to_str().unwrap()])
            .args(["--channels", "200", "--duration", "2s", "--ramp", "0"])
            .args(["--core", "0", "--json", "-"]),
        Duration::from_secs(60),
        None,
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadgen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout[stdout.find("\n{").map_or(0, |i| i + 1)..])
        .unwrap_or_else(|e| panic!("loadgen's JSON: {e}\n{stdout}"));
    let sent = report["packets_sent"].as_u64().unwrap();
    assert!(sent >= 200 * 50, "{sent} packets in 2 s over 200 channels");
    assert_eq!(report["packets_received"].as_u64(), Some(sent), "{report}");
    assert_eq!(report["lost"].as_u64(), Some(0), "{report}");
    assert_eq!(report["relay"]["measured"].as_u64(), Some(sent), "{report}");
    assert_eq!(
        report["relay"]["forwarded"].as_u64(),
        Some(2 * sent),
        "{report}"
    );

    // Relay-wide counters = the sum of the shards' = loadgen's count.
    let to_echo = f64::from(u32::try_from(sent).unwrap());
    wait_for(
        "metrics to show every packet",
        Duration::from_secs(5),
        || {
            (relay.metric("rtprelay_packets_total", "direction=\"to_asterisk\"") == to_echo)
                .then_some(())
        },
    );
    for d in ["to_echo", "to_asterisk"] {
        let total = relay.metric("rtprelay_packets_total", &format!("direction=\"{d}\""));
        let per: Vec<f64> = (0..2)
            .map(|s| {
                relay.metric(
                    "rtprelay_shard_packets_total",
                    &format!("shard=\"{s}\",direction=\"{d}\""),
                )
            })
            .collect();
        assert_eq!(total, to_echo, "{d}");
        assert_eq!(per[0] + per[1], total, "{d}: shards {per:?}");
        // 100 channels each, sending alike: each shard carries about half.
        for p in &per {
            assert!((p / total - 0.5).abs() < 0.05, "{d}: shards {per:?}");
        }
    }
    assert_eq!(relay.metric("rtprelay_rtt_seconds_count", ""), to_echo);
    // The CPU series exist for both shards, and the busy relay used some (10 ms resolution).
    let (_, text) = relay.http_get("/metrics");
    for s in 0..2 {
        assert!(
            text.contains(&format!(
                "rtprelay_shard_cpu_seconds_total{{shard=\"{s}\"}}"
            )),
            "shard {s}'s CPU series"
        );
    }
    assert!(relay.metric("rtprelay_shard_cpu_seconds_total", "") > 0.0);
    assert!(relay.metric("rtprelay_shard_batch_size_count", "shard=\"0\"") > 0.0);
    assert!(relay.metric("rtprelay_shard_batch_size_count", "shard=\"1\"") > 0.0);

    // /stats: a summary per shard, summing to the relay's.
    let (status, body) = relay.http_get("/stats");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    let shards = doc["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    let packets = |v: &Value| {
        v["global"]["traffic"]["to_echo"]["packets"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(packets(&shards[0]) + packets(&shards[1]), packets(&doc));
    assert_eq!(packets(&doc), sent);
    let rtt_count = |v: &Value| v["global"]["rtt"]["count"].as_u64().unwrap();
    assert_eq!(
        rtt_count(&shards[0]) + rtt_count(&shards[1]),
        rtt_count(&doc)
    );
    let core = |i: usize| shards[i]["core"].as_u64().unwrap();
    let want: Vec<u64> = cores.split(',').map(|c| c.parse().unwrap()).collect();
    assert_eq!(vec![core(0), core(1)], want);
    // And the control protocol's global stats say the same.
    let g = ctl.global();
    assert_eq!(g.traffic.to_echo.packets, sent);
    assert_eq!(g.rtt.count, sent);
    assert_eq!(g.channels_opened, 200 + 50 + 2 + 200);
}

/// A channel between test sockets playing Asterisk and the echo.
struct Chan {
    ast: std::net::UdpSocket,
    echo: std::net::UdpSocket,
    to: SocketAddr,
    shard: u32,
}

fn open(ctl: &mut common::Ctl, name: &str) -> Chan {
    let (ast, echo) = (udp(), udp());
    let (port, shard) = ctl.add_on(
        name,
        Some(ast.local_addr().unwrap()),
        echo.local_addr().unwrap(),
    );
    Chan {
        ast,
        echo,
        to: SocketAddr::from(([127, 0, 0, 1], port)),
        shard,
    }
}

/// Sends the same packets (a gap every 17, a duplicate, a reordered pair) through `c`,
/// echoing each.
fn exercise(c: &Chan) {
    let mut buf = [0u8; 2048];
    let mut seqs: Vec<u16> = (0..100).filter(|s| s % 17 != 5).collect();
    seqs.insert(40, 38); // a duplicate
    seqs.swap(60, 61); // a reordered pair
    for &seq in &seqs {
        c.ast.send_to(&rtp(seq, 0x5eed), c.to).unwrap();
        let (n, src) = recv(&c.echo, &mut buf).unwrap();
        c.echo.send_to(&buf[..n], src).unwrap();
        let (n, _) = recv(&c.ast, &mut buf).unwrap();
        assert_eq!(&buf[..n], &rtp(seq, 0x5eed)[..]);
    }
}

/// Two channels, one per shard, each exercised, then removed: their final statistics.
fn one_on_each(ctl: &mut common::Ctl) -> (ChannelStats, ChannelStats) {
    let (a, b) = (open(ctl, "first"), open(ctl, "second"));
    assert_eq!((a.shard, b.shard), (0, 1), "one channel on each shard");
    exercise(&a);
    exercise(&b);
    (ctl.remove("first"), ctl.remove("second"))
}

fn a_channel_s_final_statistics_do_not_depend_on_its_shard(backend: &str) {
    let relay = RelayProc::start(backend, &["--cores", "0,1"]);
    let mut ctl = relay.client();
    let (a, b) = one_on_each(&mut ctl);
    assert_eq!((a.shard, b.shard), (0, 1), "the statistics name the shard");
    // Everything that does not depend on time or identity is the same.
    let same = |s: &ChannelStats| {
        let mut s = s.clone();
        for d in [&mut s.streams.to_echo, &mut s.streams.to_asterisk] {
            d.jitter_ns = 0;
            d.max_lateness_ns = 0;
        }
        (
            s.traffic,
            s.streams,
            s.round_trip,
            s.drops,
            s.rtt.count,
            s.format,
        )
    };
    assert_eq!(same(&a), same(&b));
    assert_eq!(a.streams.to_echo.lost, 6, "{a:?}");
    assert_eq!(a.streams.to_echo.duplicates, 1);
    assert_eq!(a.streams.to_echo.reordered, 1);
    assert_eq!(
        a.round_trip.matched,
        a.traffic.to_echo.packets - 1,
        "the duplicate is not measured twice"
    );
}

fn sigterm_stops_every_shard_and_reports_the_merged_totals(backend: &str) {
    let relay = RelayProc::start(backend, &["--cores", "0,1"]);
    let mut ctl = relay.client();
    let (a, b) = one_on_each(&mut ctl);
    let to_echo = a.traffic.to_echo.packets + b.traffic.to_echo.packets;
    let rtts = a.rtt.count + b.rtt.count;
    drop(ctl);
    let log = relay.log.clone();
    let status = relay.terminate();
    assert!(status.success(), "{status:?}");
    let line = wait_for("the final statistics line", Duration::from_secs(5), || {
        log.lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("final statistics"))
            .cloned()
    });
    assert!(line.contains(&format!("to_echo={to_echo}")), "{line}");
    assert!(line.contains(&format!("rtt_count={rtts}")), "{line}");
    assert!(line.contains("channels_opened=2"), "{line}");
}
