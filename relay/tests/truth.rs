//! The relay measures the network, not itself: with a busy process on the relay's core (so the
//! relay's thread waits for the CPU before it handles anything), its round trip still equals
//! what the echo held each packet for plus the wire, because arrivals are the kernel's stamps
//! and T0 is when the send left: its kernel transmit stamp (`--timestamps kernel`), or the
//! estimate from the submitting call (`--timestamps user`), which a hog that delays the relay's
//! handling does not bend either. (What bends the estimate is a co-runner that preempts the
//! relay *inside* a send: `corunner.rs`.) Before arrivals were kernel stamps, `user` over-reported
//! here by the relay's own waiting; the arrival side of that is what this test keeps checking.
//!
//! The hog is a real-time process busy 4 ms in every 5 on the relay's core; in both modes the
//! relay's round trip must lie within 2 % + 50 µs of the echo's hold.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use testkit::{bin, start, Proc};

/// One run: echo holding 2 ms (core 0), the relay on core 1 beside a CPU hog, 20 channels of
/// loadgen (core 0) for 3 s. Returns (relay RTT p50, echo hold p50), nanoseconds.
fn run(backend: &str, timestamps: &str) -> (u64, u64) {
    let ctl = std::env::temp_dir().join(format!(
        "truth-{}-{backend}-{timestamps}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&ctl);
    let (mut echo, echo_addr) = start(
        "echo",
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--core",
            "0",
            "--delay",
            "2ms",
        ],
        "echo ready",
        "listen",
    );
    let (relay, _) = start(
        "relay",
        &[
            "--backend",
            backend,
            "--timestamps",
            timestamps,
            "--ctl",
            ctl.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
            "--echo",
            &echo_addr,
            "--core",
            "1",
        ],
        "relay ready",
        "metrics",
    );
    // The hog: busy 4 ms in every 5 on the relay's core, real-time so the relay cannot preempt
    // it: most packets wait for the CPU, up to 4 ms, before the relay's thread sees them.
    let _hog = Proc(
        Command::new("chrt")
            .args(["-f", "1"])
            .arg(bin("loadgen"))
            .args(["burn", "--core", "1", "--busy", "4ms", "--idle", "1ms"])
            .args(["--duration", "20s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chrt runs"),
    );
    let out = testkit::output(
        Command::new(bin("loadgen"))
            .args(["rtp", "--relay-ctl", ctl.to_str().unwrap()])
            .args(["--channels", "20", "--duration", "3s", "--ramp", "0"])
            .args(["--core", "0", "--json", "-"])
            .arg("--relay-pid")
            .arg(relay.pid().to_string()),
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
    let json = &stdout[stdout.find("\n{").map_or(0, |i| i + 1)..];
    let report: Value = serde_json::from_str(json).unwrap();
    let summary = echo.stop_for_stdout(Duration::from_secs(10));
    let summary: Value = serde_json::from_str(summary.trim()).unwrap();
    assert_eq!(summary["timestamps"], "kernel", "{summary}");
    drop(relay);
    let rtt = report["relay"]["rtt"]["p50_ns"].as_u64().unwrap();
    let hold = summary["hold"]["p50_ns"].as_u64().unwrap();
    eprintln!(
        "{backend} {timestamps}: relay RTT p50 {:.1} µs, echo hold p50 {:.1} µs, {} round trips",
        rtt as f64 / 1e3,
        hold as f64 / 1e3,
        report["relay"]["rtt"]["count"]
    );
    (rtt, hold)
}

/// One run at a time: both use core 1 and its hog.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn the_relay_measures_the_network_not_itself(backend: &str) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !testkit::uring_available() {
        return;
    }
    if std::thread::available_parallelism().map_or(1, std::num::NonZero::get) < 2 {
        eprintln!("SKIPPED (needs two cores: the relay's, with a hog, and the echo's)");
        return;
    }
    let (kernel_rtt, kernel_hold) = run(backend, "kernel");
    let (user_rtt, user_hold) = run(backend, "user");
    let bound = |hold: u64| hold / 50 + 50_000;
    let kernel_err = kernel_rtt.abs_diff(kernel_hold);
    let user_err = user_rtt.abs_diff(user_hold);
    assert!(
        (1_900_000..2_600_000).contains(&user_hold),
        "the echo held about 2 ms: {user_hold}"
    );
    assert!(
        (1_900_000..2_600_000).contains(&kernel_hold),
        "the echo held about 2 ms: {kernel_hold}"
    );
    assert!(
        kernel_err <= bound(kernel_hold),
        "kernel timestamps: relay RTT p50 {kernel_rtt} ns is {kernel_err} ns from the echo's hold \
         {kernel_hold} ns (bound {})",
        bound(kernel_hold)
    );
    assert!(
        user_err <= bound(user_hold),
        "estimated send times with kernel arrivals: relay RTT p50 {user_rtt} ns is {user_err} ns \
         from the echo's hold {user_hold} ns (bound {}): the relay's waiting is not charged",
        bound(user_hold)
    );
}

#[test]
fn uring_measures_the_network_not_itself() {
    the_relay_measures_the_network_not_itself("uring");
}

#[test]
fn tokio_measures_the_network_not_itself() {
    the_relay_measures_the_network_not_itself("tokio");
}
