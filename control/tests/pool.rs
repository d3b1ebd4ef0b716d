//! control with a pool of relays reached over mutual TLS (`--relay tls://…`), against the real
//! binaries on loopback: two relays with `--ctl-listen`, each binding and advertising its own
//! address (127.0.0.2 and 127.0.0.3), the simulated Asterisk and the echo.
//!
//! - Calls go to the connected relay with the most free capacity (ties: the first listed): with
//!   capacities 10 and 14, ten calls that overlap land 3 and 7, exactly.
//! - Each call's externalMedia channel sends to its relay's advertised address: every channel on
//!   each relay has Asterisk's address and RTP both ways, and every call comes back whole.
//! - `rtprelay_control_relays{relay,state}` and `rtprelay_control_relay_calls{relay}` say so,
//!   and `/stats` lists each relay with its id, capacity and calls.
//! - A relay that answers `hello` with another protocol version, or refuses control's, is not
//!   used, and the log names both versions.
//! - A relay killed (`kill -9`) mid-call loses none of its calls: each moves to the other relay
//!   (a channel there, a new externalMedia channel, the old one hung up) and its audio is back
//!   at the caller within 1 s of the kill (the simulator's longest silence per call); each
//!   moved call's record lists both relays, merges a's last interim figures with b's, and says
//!   how long no figures cover (at most the 2 s interim, the grace and the move); the relay
//!   restarted at its address takes new calls again.
//! - A relay restarted at its address within `--relay-grace` keeps its calls (the resync re-adds
//!   them), and each record merges what it measured before the crash (its last interim figures)
//!   with what it measured after.
//!
//! The tests run one at a time (a lock): each drives real-time RTP on a two-core machine.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use sim_asterisk::relay_client::RelayClient;
use testkit::{http_get, start, start_logged, wait_for, Log, Proc};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

const PASS: &str = "pool-secret";

fn log_value(log: &Log, line: &str, key: &str) -> String {
    let log = log.lock().unwrap();
    let l = log
        .iter()
        .find(|l| l.contains(line))
        .expect("the ready line");
    let at = l.find(&format!("{key}=")).expect("the key") + key.len() + 1;
    l[at..].split_whitespace().next().unwrap_or("").to_owned()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A relay with the control protocol on TLS; (process, its Unix socket, its `tls://` URL).
fn relay(
    dir: &Path,
    pki: &testkit::pki::Pki,
    id: &str,
    bind: &str,
    capacity: &str,
    echo: &str,
) -> (Proc, std::path::PathBuf, String) {
    relay_at(dir, pki, id, bind, capacity, echo, "tcp://127.0.0.1:0")
}

/// [`relay`], its control protocol on TCP at `listen`.
fn relay_at(
    dir: &Path,
    pki: &testkit::pki::Pki,
    id: &str,
    bind: &str,
    capacity: &str,
    echo: &str,
    listen: &str,
) -> (Proc, std::path::PathBuf, String) {
    let ctl = dir.join(format!("{id}.sock"));
    let (p, _, log) = start_logged(
        "relay",
        &[
            "--backend",
            "tokio",
            "--ctl",
            ctl.to_str().unwrap(),
            "--ctl-listen",
            listen,
            "--tls-cert",
            pki.relay.cert.to_str().unwrap(),
            "--tls-key",
            pki.relay.key.to_str().unwrap(),
            "--tls-client-ca",
            pki.ca.to_str().unwrap(),
            "--relay-id",
            id,
            "--bind",
            bind,
            "--max-channels",
            capacity,
            "--metrics",
            "127.0.0.1:0",
            "--echo",
            echo,
            "--strict",
        ],
        "relay ready",
        "metrics",
    );
    let url = log_value(&log, "relay ready", "ctl_tcp").replacen("tcp://", "tls://", 1);
    (p, ctl, url)
}

/// control with the relays `relays` (`tls://` URLs, comma-separated), control's certificate from
/// `pki`, the echo at `echo`, ports `ports`, and `extra` flags; (process, its metrics address).
fn control(
    sim_addr: &str,
    relays: &str,
    pki: &testkit::pki::Pki,
    echo: &str,
    ports: &str,
    extra: &[&str],
) -> (Proc, String) {
    let (echo_host, echo_port) = echo.rsplit_once(':').unwrap();
    let ari = format!("http://{sim_addr}");
    let mut args = vec![
        "--ari-url",
        &ari,
        "--ari-pass",
        PASS,
        "--relay",
        relays,
        "--relay-ca",
        pki.ca.to_str().unwrap(),
        "--relay-cert",
        pki.control.cert.to_str().unwrap(),
        "--relay-key",
        pki.control.key.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
        "--port-range",
        ports,
        "--echo-host",
        echo_host,
        "--echo-port",
        echo_port,
    ];
    args.extend_from_slice(extra);
    let (p, http, _) = start_logged("control", &args, "control ready", "metrics");
    (p, http)
}

#[test]
fn calls_spread_over_two_tls_relays_by_free_capacity_and_reach_each_ones_address() {
    let _s = serial();
    let dir = testkit::TempDir::new("control-pool");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let (_echo, echo_addr) = start(
        "echo",
        &["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
        "echo ready",
        "listen",
    );
    let (_a, a_ctl, a_url) = relay(dir.path(), &pki, "relay-a", "127.0.0.2", "10", &echo_addr);
    let (_b, b_ctl, b_url) = relay(dir.path(), &pki, "relay-b", "127.0.0.3", "14", &echo_addr);
    let json = dir.path().join("sim.json");
    let (mut sim, sim_addr) = start(
        "sim-asterisk",
        &[
            "--listen",
            "127.0.0.1:0",
            "--ari-pass",
            PASS,
            "--json",
            json.to_str().unwrap(),
            "--grace",
            "5s",
            "--calls",
            "10",
            "--ramp",
            "1s",
            "--hold",
            "6s",
        ],
        "sim-asterisk ready",
        "listen",
    );
    let (_control, http) = control(
        &sim_addr,
        &format!("{a_url},{b_url}"),
        &pki,
        &echo_addr,
        "22000-22099",
        &[],
    );
    // Each relay's channels, once all ten calls flow: Asterisk's address known, RTP both ways.
    let flowing = |ctl: &Path, n: usize| {
        let mut c = RelayClient::connect(ctl).unwrap();
        wait_for(
            &format!("{n} channels flowing on {}", ctl.display()),
            Duration::from_secs(15),
            || {
                let list = c.list().ok()?;
                (list.len() == n
                    && list.iter().all(|c| {
                        c.asterisk.is_some()
                            && c.traffic.to_echo.packets > 0
                            && c.traffic.to_asterisk.packets > 0
                    }))
                .then_some(list)
            },
        )
    };
    // Capacities 10 and 14: the first four go to b, then they alternate from a: 3 and 7.
    let on_a = flowing(&a_ctl, 3);
    let on_b = flowing(&b_ctl, 7);
    // Ports are unique across the pool.
    let mut ports: Vec<u16> = on_a.iter().chain(&on_b).map(|c| c.port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 10, "{ports:?}");
    let metrics = http_get(&http, "/metrics").unwrap().1;
    for (url, calls) in [(&a_url, 3.0), (&b_url, 7.0)] {
        let state = |s: &str| {
            metric(
                &metrics,
                &format!("rtprelay_control_relays{{relay=\"{url}\",state=\"{s}\"}}"),
            )
        };
        assert_eq!(state("connected"), Some(1.0), "{metrics}");
        assert_eq!(state("disconnected"), Some(0.0), "{metrics}");
        assert_eq!(
            metric(
                &metrics,
                &format!("rtprelay_control_relay_calls{{relay=\"{url}\"}}")
            ),
            Some(calls),
            "{metrics}"
        );
    }
    assert_eq!(
        metric(&metrics, "rtprelay_control_relay_connected"),
        Some(2.0)
    );
    let stats: Value = serde_json::from_str(&http_get(&http, "/stats").unwrap().1).unwrap();
    let relays = stats["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 2, "{stats}");
    assert_eq!(relays[0]["relay_id"], "relay-a");
    assert_eq!(relays[0]["capacity"], 10);
    assert_eq!(relays[1]["relay_id"], "relay-b");
    assert_eq!(relays[1]["calls"], 7);
    assert!(relays.iter().all(|r| r["connected"] == true), "{stats}");

    // Every call comes back whole through its own relay.
    let end = Instant::now() + Duration::from_secs(30);
    while sim.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "sim-asterisk did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["bridged"], 10, "{r}");
    for c in r["per_call"].as_array().unwrap() {
        assert_eq!(c["end"], "completed", "{c}");
        let (sent, received) = (c["sent"].as_u64().unwrap(), c["received"].as_u64().unwrap());
        assert!(sent >= 250 && received + 2 >= sent, "RTP lost: {c}");
    }
    wait_for("the pool empty", Duration::from_secs(10), || {
        let m = http_get(&http, "/metrics").ok()?.1;
        [&a_url, &b_url]
            .iter()
            .all(|u| {
                metric(
                    &m,
                    &format!("rtprelay_control_relay_calls{{relay=\"{u}\"}}"),
                ) == Some(0.0)
            })
            .then_some(())
    });
}

/// A Unix-socket stand-in for a relay that answers `hello` with `reply` (its `id` set to the
/// request's), then keeps the connection open.
fn fake_relay(path: &Path, reply: &'static str) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        // A few connections (control retries), each answered the same way.
        for stream in listener.incoming().take(3) {
            let Ok(mut s) = stream else { return };
            let mut line = String::new();
            if BufReader::new(&s).read_line(&mut line).is_err() {
                continue;
            }
            let _ = s.write_all(format!("{reply}\n").as_bytes());
        }
    })
}

#[test]
fn a_relay_speaking_another_protocol_version_is_refused_naming_both() {
    let _s = serial();
    let dir = testkit::TempDir::new("control-pool-version");
    let old = dir.path().join("old.sock");
    let newer = dir.path().join("newer.sock");
    // An old relay that accepts the hello but says it speaks 1; a relay that refuses ours.
    let _old = fake_relay(
        &old,
        r#"{"id":1,"ok":true,"result":{"type":"hello","version":1,"server":"rtp-relay 0.0.9"}}"#,
    );
    let _newer = fake_relay(
        &newer,
        r#"{"id":1,"ok":false,"error":{"code":"version_mismatch","message":"client speaks version 2, relay speaks 3"}}"#,
    );
    let (_sim, sim_addr) = start(
        "sim-asterisk",
        &[
            "--listen",
            "127.0.0.1:0",
            "--ari-pass",
            PASS,
            "--calls",
            "0",
            "--serve-for",
            "20s",
        ],
        "sim-asterisk ready",
        "listen",
    );
    let relays = format!("unix://{},unix://{}", old.display(), newer.display());
    let (_control, http, log) = start_logged(
        "control",
        &[
            "--ari-url",
            &format!("http://{sim_addr}"),
            "--ari-pass",
            PASS,
            "--relay",
            &relays,
            "--metrics",
            "127.0.0.1:0",
        ],
        "control ready",
        "metrics",
    );
    wait_for("both refusals logged", Duration::from_secs(10), || {
        let log = log.lock().unwrap();
        let refused = |needle: &str| {
            log.iter()
                .any(|l| l.contains("refused") && l.contains(needle))
        };
        (refused("the relay speaks protocol version 1, control speaks 2")
            && refused("client speaks version 2, relay speaks 3"))
        .then_some(())
    });
    // No relay is usable: control is not healthy, and no relay counts as connected.
    let (status, body) = http_get(&http, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    let metrics = http_get(&http, "/metrics").unwrap().1;
    assert_eq!(
        metric(&metrics, "rtprelay_control_relay_connected"),
        Some(0.0)
    );
}

/// A TCP port free now on 127.0.0.1 (for a relay to be restarted at the same address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_relay_killed_mid_call_loses_no_call_and_is_used_again_once_back() {
    let _s = serial();
    let dir = testkit::TempDir::new("control-pool-kill");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let (_echo, echo_addr) = start(
        "echo",
        &["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
        "echo ready",
        "listen",
    );
    let a_listen = format!("tcp://127.0.0.1:{}", free_port());
    let (a, a_ctl, a_url) = relay_at(
        dir.path(),
        &pki,
        "relay-a",
        "127.0.0.2",
        "20",
        &echo_addr,
        &a_listen,
    );
    let (_b, b_ctl, b_url) = relay(dir.path(), &pki, "relay-b", "127.0.0.3", "20", &echo_addr);
    let json = dir.path().join("sim.json");
    // A call every 0.5 s for 6 s, each held 9 s: calls placed before, during and after the kill.
    let (mut sim, sim_addr) = start(
        "sim-asterisk",
        &[
            "--listen",
            "127.0.0.1:0",
            "--ari-pass",
            PASS,
            "--json",
            json.to_str().unwrap(),
            "--grace",
            "5s",
            "--calls",
            "12",
            "--ramp",
            "6s",
            "--hold",
            "9s",
        ],
        "sim-asterisk ready",
        "listen",
    );
    let calls_log = dir.path().join("calls.jsonl");
    let (_control, http) = control(
        &sim_addr,
        &format!("{a_url},{b_url}"),
        &pki,
        &echo_addr,
        "22100-22199",
        &[
            "--relay-grace",
            "500ms",
            "--interim",
            "2s",
            "--call-log",
            calls_log.to_str().unwrap(),
        ],
    );
    // Two calls flowing on each relay; then a is killed.
    let flowing = |ctl: &Path, n: usize| {
        let mut c = RelayClient::connect(ctl).unwrap();
        wait_for(
            &format!("{n} channels flowing on {}", ctl.display()),
            Duration::from_secs(15),
            || {
                let list = c.list().ok()?;
                (list.len() >= n
                    && list.iter().all(|c| {
                        c.traffic.to_echo.packets > 0 && c.traffic.to_asterisk.packets > 0
                    }))
                .then_some(list)
            },
        )
    };
    flowing(&b_ctl, 2);
    let on_a: Vec<String> = flowing(&a_ctl, 2)
        .iter()
        .map(|c| c.channel.as_str().to_owned())
        .collect();
    let killed_at = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-9", &a.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    drop(a);
    let moved = |m: &str| metric(m, "rtprelay_control_calls_moved_total").unwrap_or(0.0);
    let n = on_a.len();
    wait_for(&format!("{n} calls moved"), Duration::from_secs(10), || {
        let m = http_get(&http, "/metrics").ok()?.1;
        (moved(&m) >= n as f64).then_some(())
    });
    let moved_after = killed_at.elapsed();
    // Every channel of a now lives on b, under its next generation's id.
    let mut b = RelayClient::connect(&b_ctl).unwrap();
    wait_for("the moved calls on b", Duration::from_secs(5), || {
        let list = b.list().ok()?;
        on_a.iter()
            .all(|id| {
                list.iter()
                    .any(|c| c.channel.as_str() == format!("{id}-m1"))
            })
            .then_some(())
    });
    // a comes back at its address: a call placed from now on may go there again.
    let (_a2, _, _) = relay_at(
        dir.path(),
        &pki,
        "relay-a",
        "127.0.0.2",
        "20",
        &echo_addr,
        &a_listen,
    );
    let mut a2 = RelayClient::connect(&a_ctl).unwrap();
    wait_for(
        "a new call on the restarted relay",
        Duration::from_secs(10),
        || (!a2.list().ok()?.is_empty()).then_some(()),
    );

    let end = Instant::now() + Duration::from_secs(40);
    while sim.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "sim-asterisk did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["bridged"], 12, "{r}");
    let callers_on_a: Vec<String> = on_a
        .iter()
        .map(|id| id.trim_start_matches("rtprelay-em-").to_owned())
        .collect();
    // Control's records: each moved call lists both relays, its figures merged from a's last
    // interim report and b's final ones, and how long no relay's figures cover.
    let records: Vec<Value> = wait_for("12 call records", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&calls_log).ok()?;
        let v: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (v.len() == 12).then_some(v)
    });
    for c in r["per_call"].as_array().unwrap() {
        assert_eq!(c["end"], "completed", "every call survives: {c}");
        let gap = c["max_gap_ms"].as_f64().unwrap();
        let id = c["id"].as_str().unwrap();
        let rec = records
            .iter()
            .find(|r| r["caller_id"] == id)
            .unwrap_or_else(|| panic!("no record for {id}"));
        let unmeasured = rec["unmeasured_ms"].as_f64().unwrap();
        let (sent, measured) = (
            c["sent"].as_u64().unwrap(),
            rec["relay"]["packets_to_echo"].as_u64().unwrap(),
        );
        if callers_on_a.iter().any(|a| a == id) {
            assert_eq!(
                rec["relays"],
                serde_json::json!(["relay-a", "relay-b"]),
                "{rec}"
            );
            // At most one interim interval (2 s), the grace (0.5 s) and the move.
            assert!((500.0..=3_000.0).contains(&unmeasured), "{rec}");
            // Both relays' figures: everything sent but what no figures cover (20 ms a packet).
            let uncovered = unmeasured / 20.0 + 10.0;
            assert!(
                measured <= sent && measured as f64 + uncovered >= sent as f64,
                "merged {measured} of {sent} sent, {unmeasured} ms unmeasured: {rec}"
            );
            eprintln!("moved call {id}: {measured} of {sent} packets measured, {unmeasured:.0} ms unmeasured");
        } else {
            assert_eq!(rec["relays"].as_array().unwrap().len(), 1, "{rec}");
            assert!(unmeasured < 100.0, "{rec}");
            assert!(measured + 2 >= sent, "{rec}");
        }
        if callers_on_a.iter().any(|a| a == id) {
            eprintln!("moved call {id}: silent for {gap:.0} ms at the caller");
            // Silent from the kill until the move: the grace period and the move.
            assert!(
                (500.0..1000.0).contains(&gap),
                "audio back within 1 s of the loss: {gap} ms for {c} (all moved {moved_after:?} after the kill)"
            );
        } else {
            assert!(gap < 200.0, "a call the kill did not touch: {c}");
            let (sent, received) = (c["sent"].as_u64().unwrap(), c["received"].as_u64().unwrap());
            assert!(received + 2 >= sent, "RTP lost: {c}");
        }
    }
}

#[test]
fn a_relay_restarted_at_its_address_within_the_grace_keeps_its_calls_and_their_figures() {
    let _s = serial();
    let dir = testkit::TempDir::new("control-pool-restart");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let (_echo, echo_addr) = start(
        "echo",
        &["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
        "echo ready",
        "listen",
    );
    let listen = format!("tcp://127.0.0.1:{}", free_port());
    let (a, a_ctl, a_url) = relay_at(
        dir.path(),
        &pki,
        "relay-a",
        "127.0.0.2",
        "20",
        &echo_addr,
        &listen,
    );
    let json = dir.path().join("sim.json");
    let (mut sim, sim_addr) = start(
        "sim-asterisk",
        &[
            "--listen",
            "127.0.0.1:0",
            "--ari-pass",
            PASS,
            "--json",
            json.to_str().unwrap(),
            "--grace",
            "5s",
            "--calls",
            "4",
            "--ramp",
            "200ms",
            "--hold",
            "7s",
        ],
        "sim-asterisk ready",
        "listen",
    );
    let calls_log = dir.path().join("calls.jsonl");
    let (_control, http) = control(
        &sim_addr,
        &a_url,
        &pki,
        &echo_addr,
        "22200-22299",
        &[
            "--relay-grace",
            "3s",
            "--interim",
            "500ms",
            "--call-log",
            calls_log.to_str().unwrap(),
        ],
    );
    let mut c = RelayClient::connect(&a_ctl).unwrap();
    wait_for("4 calls flowing", Duration::from_secs(15), || {
        let list = c.list().ok()?;
        (list.len() == 4 && list.iter().all(|c| c.traffic.to_asterisk.packets > 100)).then_some(())
    });
    drop(c);
    let killed = std::process::Command::new("kill")
        .args(["-9", &a.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    drop(a);
    let (_a2, _, _) = relay_at(
        dir.path(),
        &pki,
        "relay-a",
        "127.0.0.2",
        "20",
        &echo_addr,
        &listen,
    );
    let mut c = RelayClient::connect(&a_ctl).unwrap();
    wait_for(
        "the 4 calls re-added and flowing",
        Duration::from_secs(10),
        || {
            let list = c.list().ok()?;
            (list.len() == 4 && list.iter().all(|c| c.traffic.to_asterisk.packets > 0))
                .then_some(())
        },
    );
    let end = Instant::now() + Duration::from_secs(30);
    while sim.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "sim-asterisk did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = http_get(&http, "/metrics").unwrap().1;
    assert_eq!(
        metric(&m, "rtprelay_control_calls_moved_total"),
        Some(0.0),
        "no move"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records: Vec<Value> = wait_for("4 call records", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&calls_log).ok()?;
        let v: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (v.len() == 4).then_some(v)
    });
    for call in r["per_call"].as_array().unwrap() {
        assert_eq!(call["end"], "completed", "{call}");
        let rec = records
            .iter()
            .find(|x| x["caller_id"] == call["id"])
            .unwrap();
        assert_eq!(rec["relays"], serde_json::json!(["relay-a"]), "{rec}");
        let unmeasured = rec["unmeasured_ms"].as_f64().unwrap();
        let (sent, measured) = (
            call["sent"].as_u64().unwrap(),
            rec["relay"]["packets_to_echo"].as_u64().unwrap(),
        );
        // The figures before the crash (its last interim, at most 500 ms old) and after the
        // restart, merged: what is missing is what no figures cover.
        assert!(unmeasured > 0.0 && unmeasured <= 1_000.0, "{rec}");
        assert!(
            measured <= sent && measured as f64 + unmeasured / 20.0 + 10.0 >= sent as f64,
            "merged {measured} of {sent} sent, {unmeasured} ms unmeasured: {rec}"
        );
        // More than the restarted relay alone saw (it came back after more than a second).
        assert!(measured > sent / 2, "{rec}");
        eprintln!("restart: {measured} of {sent} packets measured, {unmeasured:.0} ms unmeasured");
    }
}
