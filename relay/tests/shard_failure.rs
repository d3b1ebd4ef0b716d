//! Failure is whole: when one shard's loop fails, the relay stops every other shard and ends with
//! an error naming the failed one (`shard 1 (core 0) failed`); it never goes on serving half its
//! channels. Run in-process with a stand-in for shard 1's loop that fails at its first control
//! message (a ring failure cannot be caused from outside), while shard 0 runs the real loop.

#![allow(clippy::cast_possible_truncation)] // the shared helpers' small test values

mod common;

use std::time::{Duration, Instant};

use clap::Parser as _;
use relay::config::{Args, Config};
use relay::shard::ShardStart;
use relay_proto::GlobalStats;

/// Shard 1 says it is ready, then fails when its first command arrives; the others run for real.
fn failing_shard_one(start: ShardStart) -> std::io::Result<GlobalStats> {
    if start.index != 1 {
        return relay::shard_main(start);
    }
    let ShardStart {
        mut shard, ready, ..
    } = start;
    let _ = ready.send(Ok(None));
    let _first = shard.rx.blocking_recv();
    Err(std::io::Error::other("injected ring failure"))
}

#[test]
fn a_failing_shard_ends_the_relay_naming_it() {
    let ctl = std::env::temp_dir().join(format!("shard-failure-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&ctl);
    let args = Args::try_parse_from([
        "relay",
        "--backend",
        "tokio",
        "--cores",
        "0,0",
        "--metrics",
        "127.0.0.1:0",
        "--ctl",
        ctl.to_str().unwrap(),
    ])
    .unwrap();
    let config = Config::try_from(args).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ =
            done_tx.send(relay::run_with(&config, failing_shard_one).map_err(|e| format!("{e:#}")));
    });
    let mut c = common::wait_for("the control socket", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&ctl)
            .ok()
            .map(|_| common::Ctl::connect(&ctl))
    });
    let echo = common::udp();
    let to = echo.local_addr().unwrap();
    // The first channel goes to shard 0, which works; the second to shard 1, which fails.
    let (_, shard) = c.add_on("ok", None, to);
    assert_eq!(shard, 0);
    let r = c.request(relay_proto::Command::Add(
        relay_proto::control::AddChannel {
            channel: relay_proto::ChannelId::try_from("doomed").unwrap(),
            port: 0,
            asterisk: None,
            echo: Some(to),
            format: relay_proto::Format::Ulaw,
        },
    ));
    let e = r.expect_err("shard 1 cannot answer");
    assert!(e.message.contains("stopped"), "{e:?}");
    let started = Instant::now();
    let outcome = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the relay ends when a shard fails");
    let err = outcome.expect_err("the relay's run is a failure");
    assert!(
        err.contains("shard 1 (core 0) failed: injected ring failure"),
        "{err}"
    );
    eprintln!(
        "relay ended {:?} after the failure: {err}",
        started.elapsed()
    );
    assert!(!ctl.exists(), "the control socket is removed");
}
