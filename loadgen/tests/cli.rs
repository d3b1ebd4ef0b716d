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
