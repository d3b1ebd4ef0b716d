//! End to end over loopback: echo, relay and loadgen as separate processes, as a user runs them,
//! against both relay backends, each also with the shared echo leg (`shared`, `tokio_shared`: GSO
//! batches to the echo, tags on that leg; the echo runs `--gro`, its faults applied to each
//! datagram of a coalesced batch). The relay's numbers must match what the echo did, exactly:
//!
//! - with `--delay 5ms` the relay's RTT p50 lies in 5.0-5.5 ms and loadgen's end-to-end p50 within
//!   1 ms above it;
//! - with seeded loss, duplication, reordering and jitter, the relay's lost, duplicate, reordered
//!   and echo-timeout counts equal the echo's own counts exactly;
//! - 200 channels for 10 s lose nothing, duplicate nothing, drop nothing from unknown sources, and
//!   every packet is measured; on the shared leg the clean run's echo must see coalesced batches.
//!
//! The tests run one at a time (a lock), so their latency assertions are not skewed by sibling
//! tests competing for the machine's two cores.
#![allow(clippy::cast_precision_loss, clippy::cast_possible_wrap)] // report figures, nanoseconds far below 2^63

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

use testkit::{bin, start, uring_available};

/// One run: echo with `echo_args`, relay on `backend` (`uring`, `tokio`, or `shared`: uring
/// with `--echo-leg shared`), loadgen with `lg_args`; returns (loadgen's JSON report, echo's
/// summary).
fn run(backend: &str, echo_args: &[&str], lg_args: &[&str]) -> (Value, Value) {
    let (backend, leg) = match backend {
        "shared" => ("uring", "shared"),
        "tokio-shared" => ("tokio", "shared"),
        b => (b, "per-channel"),
    };
    // The shared leg sends GSO batches; the echo takes them coalesced (and faults each datagram).
    let gro: &[&str] = if leg == "shared" { &["--gro"] } else { &[] };
    let ctl = std::env::temp_dir().join(format!(
        "rtp-accuracy-{}-{backend}.sock",
        std::process::id()
    ));
    let (mut echo, echo_addr) = start(
        "echo",
        &[
            &["--listen", "127.0.0.1:0", "--metrics", "off"][..],
            echo_args,
            gro,
        ]
        .concat(),
        "echo ready",
        "listen",
    );
    let ctl_s = ctl.to_str().unwrap();
    let (relay, _) = start(
        "relay",
        &[
            "--backend",
            backend,
            "--ctl",
            ctl_s,
            "--metrics",
            "127.0.0.1:0",
            "--echo",
            &echo_addr,
            "--echo-leg",
            leg,
        ],
        "relay ready",
        "backend",
    );
    let out = testkit::output(
        Command::new(bin("loadgen"))
            .args(["rtp", "--relay-ctl", ctl_s, "--json", "-", "--grace", "1s"])
            .args(lg_args),
        std::time::Duration::from_secs(120),
        None,
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "loadgen failed");
    let json = &stdout[stdout.find("\n{").map_or(0, |i| i + 1)..];
    let report: Value = serde_json::from_str(json).unwrap();
    let s = echo.stop_for_stdout(std::time::Duration::from_secs(10));
    drop(relay);
    (report, serde_json::from_str(s.trim()).unwrap())
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn delay_5ms_is_measured_between_5_0_and_5_5_ms(backend: &str) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (r, _) = run(
        backend,
        &["--delay", "5ms"],
        &["--channels", "20", "--duration", "3s", "--ramp", "0"],
    );
    let relay_p50 = u(&r["relay"]["rtt"]["p50_ns"]) as f64 / 1e6;
    let e2e_p50 = u(&r["e2e_rtt"]["p50_ns"]) as f64 / 1e6;
    assert!(
        (5.0..=5.5).contains(&relay_p50),
        "relay RTT p50 {relay_p50} ms"
    );
    assert!(
        e2e_p50 >= relay_p50,
        "end to end p50 {e2e_p50} ms vs relay {relay_p50} ms"
    );
    // Every time on both sides is a kernel stamp, over the same packets, so per packet the end to
    // end round trip is the relay's RTT plus its two forwards plus two loopback hops: the means
    // add up, whatever the load (the relay's forwards grow when it waits for its core).
    let mean = |v: &Value| u(&v["mean_ns"]) as f64 / 1e3;
    let (e2e, rtt) = (mean(&r["e2e_rtt"]), mean(&r["relay"]["rtt"]));
    let fwd = mean(&r["relay"]["forward"]["to_echo"]) + mean(&r["relay"]["forward"]["to_asterisk"]);
    let hops = e2e - rtt - fwd;
    eprintln!(
        "two loopback hops: {hops:.1} µs (end to end {e2e:.1}, RTT {rtt:.1}, forwards {fwd:.1})"
    );
    assert!(
        (0.0..50.0).contains(&hops),
        "end to end mean {e2e:.1} µs = relay RTT {rtt:.1} + forwards {fwd:.1} + two hops \
         {hops:.1} µs (expected 0..50)"
    );
    assert_eq!(r["lost"], 0);
}

fn injected_faults_are_counted_exactly(backend: &str) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (r, e) = run(
        backend,
        &[
            "--loss",
            "0.02",
            "--duplicate",
            "0.02",
            "--reorder",
            "0.02",
            "--jitter",
            "2ms",
            "--seed",
            "7",
        ],
        &["--channels", "20", "--duration", "4s", "--ramp", "0"],
    );
    let relay = &r["relay"];
    assert!(
        u(&e["dropped"]) > 0 && u(&e["duplicated"]) > 0 && u(&e["reordered"]) > 0,
        "faults happened: {e}"
    );
    assert_eq!(
        u(&relay["lost"]),
        u(&e["dropped"]),
        "relay lost = echo dropped\n{r}\n{e}"
    );
    assert_eq!(
        u(&relay["duplicates"]),
        u(&e["duplicated"]),
        "relay duplicates = echo duplicated"
    );
    assert_eq!(
        u(&relay["reordered"]),
        u(&e["reordered"]),
        "relay reordered = echo reordered"
    );
    assert_eq!(
        u(&relay["echo_timeouts"]),
        u(&e["dropped"]),
        "echo timeouts = losses"
    );
    assert_eq!(u(&r["lost"]), u(&e["dropped"]), "loadgen's own loss agrees");
    assert_eq!(
        u(&relay["measured"]),
        u(&r["packets_sent"]) - u(&e["dropped"])
    );
}

fn a_clean_run_of_200_channels_loses_nothing_and_measures_everything(backend: &str) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (r, e) = run(
        backend,
        &[],
        &["--channels", "200", "--duration", "10s", "--ramp", "0"],
    );
    let sent = u(&r["packets_sent"]);
    assert!(sent >= 200 * 490, "sent {sent}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicates"], 0);
    assert_eq!(r["corrupt"], 0);
    assert_eq!(r["wrong_source"], 0);
    assert_eq!(u(&r["packets_received"]), sent, "every packet returned");
    // And every round trip was timed by two kernel stamps.
    assert_eq!(r["timestamps"], "kernel", "{r}");
    assert_eq!(r["timestamps_missing"], 0, "{r}");
    assert_eq!(u(&r["e2e_rtt"]["count"]), sent, "{r}");
    assert_eq!(
        u(&r["relay"]["measured"]),
        sent,
        "every packet measured by the relay"
    );
    assert_eq!(r["relay"]["lost"], 0);
    assert_eq!(r["relay"]["duplicates"], 0);
    assert_eq!(r["relay"]["unknown_source_drops"], 0);
    assert_eq!(r["relay"]["echo_timeouts"], 0);
    assert_eq!(u(&e["received"]), sent);
    if e["gro"] == true {
        assert!(u(&e["coalesced"]) > 0, "the shared leg sent batches: {e}");
    }
}

/// loadgen straight against an echo holding 2 ms (no relay), as a process or (`command`: reading
/// its transmit stamps through io_uring's command instead of the error queues) in this process;
/// returns (loadgen's report, the echo's summary).
fn against_the_echo(command: bool) -> (Value, Value) {
    let (mut echo, echo_addr) = start(
        "echo",
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--delay",
            "2ms",
        ],
        "echo ready",
        "listen",
    );
    let r = if command {
        let cfg = loadgen::rtp::RtpConfig {
            relay_ctl: "/nonexistent".into(),
            channels: 20,
            duration: std::time::Duration::from_secs(2),
            ramp: 0.0,
            ptime: std::time::Duration::from_millis(20),
            bind: [127, 0, 0, 1].into(),
            echo: None,
            seed: 1,
            core: None,
            grace: std::time::Duration::from_millis(500),
            progress: false,
            relay_pid: None,
            targets: Some(vec![echo_addr.parse().unwrap()]),
            local_port_base: None,
            warmup: std::time::Duration::ZERO,
        };
        let tuning = loadgen::rtp::Tuning {
            tx_stamps_command: true,
        };
        serde_json::to_value(loadgen::rtp::run_with(&cfg, tuning).unwrap()).unwrap()
    } else {
        let out = testkit::output(
            Command::new(bin("loadgen")).args([
                "rtp",
                "--to",
                &echo_addr,
                "--channels",
                "20",
                "--duration",
                "2s",
                "--grace",
                "500ms",
                "--json",
                "-",
            ]),
            std::time::Duration::from_secs(60),
            None,
        )
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "loadgen failed");
        let json = &stdout[stdout.find("\n{").map_or(0, |i| i + 1)..];
        serde_json::from_str(json).unwrap()
    };
    let e: Value = serde_json::from_str(
        echo.stop_for_stdout(std::time::Duration::from_secs(10))
            .trim(),
    )
    .unwrap();
    eprintln!("loadgen: {r}\necho: {e}");
    (r, e)
}

/// loadgen's end-to-end round trip against the echo is the echo's hold plus loopback transit,
/// because T0 is the kernel's transmit stamp of each send and T1 the kernel's receive stamp of
/// the return: at least 2 ms, within microseconds of the hold at the median, every one timed.
fn round_trips_run_from_transmit_stamp_to_receive_stamp(r: &Value, e: &Value) {
    assert_eq!(r["timestamps"], "kernel", "{r}");
    assert_eq!(u(&r["timestamps_missing"]), 0, "{r}");
    assert_eq!(u(&r["timestamps_stale"]), 0, "{r}");
    let sent = u(&r["packets_sent"]);
    assert!(sent >= 20 * 95, "sent {sent}");
    assert_eq!(u(&r["packets_received"]), sent, "{r}");
    assert_eq!(
        u(&r["e2e_rtt"]["count"]),
        sent,
        "every round trip timed: {r}"
    );
    let ms = |v: &Value| u(v) as f64 / 1e6;
    let (min, p50) = (ms(&r["e2e_rtt"]["min_ns"]), ms(&r["e2e_rtt"]["p50_ns"]));
    assert!(min >= 2.0, "round trip min {min} ms");
    assert!(p50 < 2.3, "round trip p50 {p50} ms");
    // Each round trip contains its hold: at the smallest and the median, the round trip is the
    // hold plus microseconds of loopback (both histograms round to 3 significant digits).
    assert_eq!(e["timestamps_missing"], 0, "{e}");
    let hold = &e["hold"];
    // A bucket is 1/1024 to 1/512 of its value wide (1 to 2 µs at 2 ms).
    let slack = |ns: u64| ns / 500 + 1_000;
    assert!(
        u(&r["e2e_rtt"]["min_ns"]) + slack(u(&hold["min_ns"])) >= u(&hold["min_ns"]),
        "round trip min {} ns < echo hold min {} ns",
        r["e2e_rtt"]["min_ns"],
        hold["min_ns"]
    );
    let diff = u(&r["e2e_rtt"]["p50_ns"]) as i64 - u(&hold["p50_ns"]) as i64;
    assert!(
        (-(slack(u(&hold["p50_ns"])) as i64)..100_000).contains(&diff),
        "round trip p50 − echo hold p50 = {diff} ns"
    );
}

#[test]
fn against_the_echo_the_round_trip_runs_from_transmit_stamp_to_receive_stamp() {
    if !uring_available() {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (r, e) = against_the_echo(false);
    assert_eq!(r["tx_timestamps"], "error_queue", "{r}");
    round_trips_run_from_transmit_stamp_to_receive_stamp(&r, &e);
}

#[test]
fn through_io_urings_command_the_round_trip_is_timed_the_same() {
    if !uring_available() {
        return;
    }
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (r, e) = against_the_echo(true);
    assert_eq!(
        r["tx_timestamps"], "ring",
        "this kernel has io_uring's command: {r}"
    );
    round_trips_run_from_transmit_stamp_to_receive_stamp(&r, &e);
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { if super::uring_available() { super::$name("uring") } })*
        }
        mod tokio {
            $(#[test] fn $name() { super::$name("tokio") })*
        }
        mod shared {
            $(#[test] fn $name() { if super::uring_available() { super::$name("shared") } })*
        }
        mod tokio_shared {
            $(#[test] fn $name() { if super::uring_available() { super::$name("tokio-shared") } })*
        }
    };
}

both_backends!(
    delay_5ms_is_measured_between_5_0_and_5_5_ms,
    injected_faults_are_counted_exactly,
    a_clean_run_of_200_channels_loses_nothing_and_measures_everything,
);
