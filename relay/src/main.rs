//! `relay`: parse the command line, run, map the outcome to an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use relay::config::{Args, Config};

fn main() -> ExitCode {
    let config = match Config::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::from(2);
        }
    };
    appkit::init_logging();
    match relay::run(&config) {
        Ok(g) => {
            tracing::info!(
                channels_opened = g.channels_opened,
                to_echo = g.traffic.to_echo.packets,
                to_asterisk = g.traffic.to_asterisk.packets,
                rtt_count = g.rtt.count,
                rtt_p50_us = g.rtt.p50_ns as f64 / 1e3,
                rtt_p99_us = g.rtt.p99_ns as f64 / 1e3,
                rtt_max_us = g.rtt.max_ns as f64 / 1e3,
                lost = g.streams.to_asterisk.lost,
                echo_timeouts = g.round_trip.timeouts,
                drops = g.drops.total(),
                "final statistics"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}
