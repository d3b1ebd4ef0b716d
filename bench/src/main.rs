//! `bench`: measures rtp-relay against what it competes with.
//!
//! - `bench compare`: the relay's two backends, a minimal io_uring forwarder and rtpengine, side
//!   by side in one run (see [`compare`]); prints a table, writes JSON and an SVG chart.
//! - `bench floor`: that minimal forwarder, run as its own process by `bench compare`.
//!
//! The criterion benches are in `benches/`: `cargo bench -p bench --bench core` (the core per
//! packet) and `--bench backends` (the two backends forwarding the same burst).
//!
//! The modules are the binary's own (`anyhow` stays in the binary): the comparison itself
//! ([`compare`]), what it measured and the table of it ([`results`]), its chart ([`chart`]), the
//! minimal forwarder ([`floor`]) and rtpengine's ng protocol ([`ng`]).
#![forbid(unsafe_code)]

mod chart;
mod compare;
mod floor;
mod ng;
mod results;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::compare::{CompareConfig, Mode, Target};
use appkit::flags::parse_duration;
use clap::{Parser, Subcommand};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "bench",
    version,
    about = "rtp-relay against a floor forwarder and rtpengine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure every target side by side: CPU per packet, enters per packet, loss, added latency.
    Compare(CompareArgs),
    /// The minimal io_uring forwarder (started by `bench compare`).
    Floor(FloorArgs),
    /// Print the table and redraw the chart of an earlier run's compare.json.
    Plot {
        /// The JSON `bench compare` wrote.
        json: PathBuf,
        /// The SVG to write.
        svg: PathBuf,
    },
}

/// `bench compare` flags.
#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// Targets, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "uring,tokio,floor,rtpengine"
    )]
    targets: Vec<Target>,
    /// Channel counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000,2000")]
    channels: Vec<u32>,
    /// Measured time per point.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up per point.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// `paced` (50 packets/s per direction per channel) or `drain` (maximum rate).
    #[arg(long, value_enum, default_value = "paced")]
    mode: Mode,
    /// Drain mode: datagrams queued per socket.
    #[arg(long, default_value_t = 16)]
    burst: u32,
    /// Directory for compare.json and compare.svg.
    #[arg(long, default_value = "target/bench-compare")]
    out: PathBuf,
    /// The forwarder's core (loadgen and the echo take the other).
    #[arg(long, default_value_t = 1)]
    core: usize,
    /// An extra flag for every relay target (repeatable), e.g. --relay-arg=--batch=16; a
    /// --relay-arg=--cores=LIST replaces the relay's --core.
    #[arg(long, allow_hyphen_values = true)]
    relay_arg: Vec<String>,
    /// The `sharded` target's --cores list, e.g. 2-5 (default: the forwarder core twice).
    #[arg(long)]
    shard_cores: Option<String>,
    /// loadgen's core (drain mode: the sender's); default the other of cores 0 and 1.
    #[arg(long)]
    load_core: Option<usize>,
    /// The echo's core; default the other of cores 0 and 1.
    #[arg(long)]
    echo_core: Option<usize>,
}

/// `bench floor` flags.
#[derive(Debug, clap::Args)]
struct FloorArgs {
    /// Address the sockets bind.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Socket i binds this port + i.
    #[arg(long, default_value_t = 30_000)]
    port_base: u16,
    /// Sockets.
    #[arg(long, default_value_t = 100)]
    channels: u32,
    /// The echo server.
    #[arg(long)]
    echo: SocketAddr,
    /// Pin to this core.
    #[arg(long)]
    core: Option<usize>,
    /// Provided buffers (a power of two).
    #[arg(long, default_value_t = 8192)]
    buffers: u16,
    /// Stop after this long (default: until killed).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Plot { json, svg } => {
            let r: anyhow::Result<()> = (|| {
                let r: results::Results = serde_json::from_slice(&std::fs::read(&json)?)?;
                print!("{}", results::table(&r));
                chart::draw(&r, &svg)
            })();
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bench plot: {}: {e:#}", json.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Floor(a) => {
            if a.channels == 0 || !a.buffers.is_power_of_two() {
                eprintln!(
                    "bench floor: invalid value for --channels or --buffers (a power of two)"
                );
                return ExitCode::from(2);
            }
            let cfg = floor::FloorConfig {
                bind: a.bind,
                port_base: a.port_base,
                channels: a.channels,
                echo: a.echo,
                core: a.core,
                buffers: a.buffers,
                duration: a.duration,
            };
            match floor::run(&cfg) {
                Ok(n) => {
                    eprintln!("floor: forwarded {n} datagrams");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bench floor: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Compare(a) => {
            if a.burst == 0 {
                eprintln!("bench compare: invalid value for --burst: at least 1");
                return ExitCode::from(2);
            }
            if a.channels.is_empty() || a.channels.contains(&0) || a.targets.is_empty() {
                eprintln!("bench compare: invalid value for --channels or --targets: at least one, none zero");
                return ExitCode::from(2);
            }
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            for (flag, c) in [
                ("--core", Some(a.core)),
                ("--load-core", a.load_core),
                ("--echo-core", a.echo_core),
            ] {
                if let Some(c) = c.filter(|&c| c > 1 && c >= cores) {
                    eprintln!(
                        "bench compare: invalid value for {flag}: this machine has no core {c}"
                    );
                    return ExitCode::from(2);
                }
            }
            let cfg = CompareConfig {
                targets: a.targets,
                channels: a.channels,
                duration: a.duration,
                warmup: a.warmup,
                mode: a.mode,
                burst: a.burst,
                out: a.out,
                core: a.core,
                relay_args: a.relay_arg,
                shard_cores: a.shard_cores,
                load_core: a.load_core,
                echo_core: a.echo_core,
            };
            // Ctrl-C or SIGTERM ends the run with what it measured (the children, which a
            // terminal's Ctrl-C reaches too, are stopped and reaped by their guards).
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&stop)) {
                    eprintln!("bench compare: cannot catch signal {sig}: {e}");
                }
            }
            match compare::run(&cfg, &stop) {
                Ok(r) => {
                    print!("{}", compare::table(&r));
                    compare::flush();
                    eprintln!(
                        "bench: wrote {}/compare.json{}",
                        cfg.out.display(),
                        if cfg.mode == Mode::Paced {
                            " and compare.svg"
                        } else {
                            ""
                        }
                    );
                    let failed = r.failures().count();
                    if failed > 0 || r.interrupted {
                        eprintln!(
                            "bench compare: {failed} point(s) failed{}",
                            if r.interrupted { ", interrupted" } else { "" }
                        );
                        return ExitCode::FAILURE;
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bench compare: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
