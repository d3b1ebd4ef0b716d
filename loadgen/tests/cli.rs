//! loadgen's command line: bad values are refused up front, naming the flag, and an unreachable
//! relay fails the run at once instead of after its duration.

use std::process::Command;
use std::time::{Duration, Instant};

fn loadgen(args: &[&str]) -> (i32, String, Duration) {
    let start = Instant::now();
    let out = testkit::output(
        Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args),
        Duration::from_secs(60),
        None,
    )
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn bad_values_exit_2_naming_the_flag() {
    for (value, flag) in [
        (&["--ramp", "nan"][..], "--ramp"),
        (&["--ramp", "-1"], "--ramp"),
        (&["--channels", "0"], "--channels"),
        (&["--ptime", "0s"], "--ptime"),
        (&["--duration", "soon"], "--duration"),
        (&["--max-loss", "2"], "--max-loss"),
    ] {
        let args: Vec<&str> = ["rtp", "--relay-ctl", "/nonexistent"]
            .iter()
            .chain(value)
            .copied()
            .collect();
        let (code, err, _) = loadgen(&args);
        assert_eq!(code, 2, "{value:?}: {err}");
        assert!(err.contains(flag), "{value:?}: {err}");
    }
}

#[test]
fn an_unreachable_relay_fails_at_once() {
    let (code, err, took) = loadgen(&[
        "rtp",
        "--relay-ctl",
        "/nonexistent/relay.sock",
        "--duration",
        "30s",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/relay.sock"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn blast_with_gso_loads_a_gro_echo_in_batches() {
    if !testkit::uring_available() {
        return;
    }
    for (gso, window) in [("65", "65"), ("16", "40")] {
        let (code, err, _) = loadgen(&["blast", "--gso", gso, "--window", window]);
        assert_eq!(code, 2, "--gso {gso} --window {window}: {err}");
        assert!(err.contains("--gso"), "{err}");
    }
    let (mut echo, addr) = testkit::start(
        "echo",
        &["--listen", "127.0.0.1:0", "--metrics", "off", "--gro"],
        "echo ready",
        "listen",
    );
    let out = testkit::output(
        Command::new(env!("CARGO_BIN_EXE_loadgen")).args([
            "blast",
            "--target",
            &addr,
            "--gso",
            "16",
            "--sockets",
            "4",
            "--window",
            "32",
            "--duration",
            "1s",
        ]),
        Duration::from_secs(30),
        None,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let summary = echo.stop_for_stdout(Duration::from_secs(10));
    let s: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    eprintln!("blast {r}\necho {s}");
    assert!(r["received"].as_u64().unwrap() > 10_000, "{r}");
    assert!(
        r["coalesced"].as_u64().unwrap() > 0,
        "returns arrive coalesced: {r}"
    );
    assert!(
        s["coalesced"].as_u64().unwrap() > 0,
        "the echo received batches: {s}"
    );
    assert!(
        s["received"].as_u64().unwrap() >= r["received"].as_u64().unwrap(),
        "the echo saw every packet that came back"
    );
    // At full rate, every reflection (one GSO send per batch) was still timed by its kernel
    // transmit stamp.
    assert_eq!(s["timestamps_missing"], 0, "{s}");
    assert_eq!(s["hold"]["count"], s["sent"], "{s}");
}
