//! `loadgen`: drives rtp-relay. `loadgen rtp` plays Asterisk's RTP for N channels against a
//! running relay and prints a latency report.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use loadgen::rtp;
use relay_proto::time::parse_duration;

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about = "Load generator for rtp-relay")]
struct Cli {
    /// What to run.
    #[command(subcommand)]
    command: Mode,
}

/// Modes.
#[derive(Debug, Subcommand)]
enum Mode {
    /// Play Asterisk's externalMedia RTP for N channels against a running relay.
    Rtp(RtpArgs),
    /// Measure the maximum rate a reflector (the echo) sustains, in a closed loop.
    Blast(BlastArgs),
}

/// `loadgen blast` flags.
#[derive(Debug, clap::Args)]
struct BlastArgs {
    /// The reflector to load.
    #[arg(long, default_value = "127.0.0.1:4000")]
    target: SocketAddr,
    /// Sockets.
    #[arg(long, default_value_t = 16)]
    sockets: u32,
    /// Packets in flight per socket.
    #[arg(long, default_value_t = 64)]
    window: u32,
    /// How long to measure (after 0.5 s of warm-up).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Pin to this core.
    #[arg(long)]
    core: Option<usize>,
}

/// `loadgen rtp` flags.
#[derive(Debug, clap::Args)]
struct RtpArgs {
    /// The relay's control socket.
    #[arg(long, env = "RELAY_CTL", default_value = "/run/rtp-relay/relay.sock")]
    relay_ctl: PathBuf,
    /// Channels (concurrent calls).
    #[arg(long, default_value_t = 200)]
    channels: u32,
    /// How long to send (e.g. 20s).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Channels added per second; 0 adds them all at once.
    #[arg(long, default_value_t = 100.0, allow_negative_numbers = true)]
    ramp: f64,
    /// Packet interval.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    ptime: Duration,
    /// Address the channel sockets bind.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Echo server to give the relay for each channel (default: the relay's own default).
    #[arg(long)]
    echo: Option<SocketAddr>,
    /// Seed of SSRCs and starting sequence numbers.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pin loadgen's I/O thread to this core.
    #[arg(long)]
    core: Option<usize>,
    /// How long to wait for returns after the last send.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    grace: Duration,
    /// Also write the report as JSON to this file ("-": standard output).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Fail (exit 1) when the loss ratio exceeds this fraction (e.g. 0.001).
    #[arg(long)]
    max_loss: Option<f64>,
    /// The relay's process id: report its CPU time per forwarded packet.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Fail (exit 1) when the end-to-end p99 exceeds this (e.g. 5ms).
    #[arg(long, value_parser = parse_duration)]
    max_p99: Option<Duration>,
}

fn blast(b: &BlastArgs) -> ExitCode {
    let cfg = loadgen::blast::BlastConfig {
        target: b.target,
        sockets: b.sockets,
        window: b.window,
        duration: b.duration,
        core: b.core,
    };
    match loadgen::blast::run(&cfg) {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let a = match Cli::parse().command {
        Mode::Rtp(a) => a,
        Mode::Blast(b) => return blast(&b),
    };
    let bad = [
        (a.channels == 0, "--channels", "must be at least 1"),
        (a.ptime.is_zero(), "--ptime", "must be greater than zero"),
        (
            a.duration.is_zero(),
            "--duration",
            "must be greater than zero",
        ),
        (
            !(a.ramp.is_finite() && a.ramp >= 0.0),
            "--ramp",
            "must be a number of channels per second, 0 or more",
        ),
    ];
    if let Some((_, flag, why)) = bad.iter().find(|(b, ..)| *b) {
        eprintln!("loadgen: invalid value for {flag}: {why}");
        return ExitCode::from(2);
    }
    if a.max_loss.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
        eprintln!("loadgen: invalid value for --max-loss: a fraction in 0..=1");
        return ExitCode::from(2);
    }
    let cfg = rtp::RtpConfig {
        relay_ctl: a.relay_ctl,
        channels: a.channels,
        duration: a.duration,
        ramp: a.ramp,
        ptime: a.ptime,
        bind: a.bind,
        echo: a.echo,
        seed: a.seed,
        core: a.core,
        grace: a.grace,
        progress: std::io::stderr().is_terminal(),
        relay_pid: a.relay_pid,
    };
    let report = match rtp::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    print!("{report}");
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        let written = if path.as_os_str() == "-" {
            println!("{json}");
            Ok(())
        } else {
            std::fs::write(path, json + "\n")
        };
        if let Err(e) = written {
            eprintln!("loadgen: cannot write --json {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let violations = report.violations(a.max_loss, a.max_p99);
    for v in &violations {
        eprintln!("loadgen: SLA violated: {v}");
    }
    if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
