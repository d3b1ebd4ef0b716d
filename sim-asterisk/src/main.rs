//! `sim-asterisk`: an ARI server that behaves like Asterisk 22 (calls, externalMedia, bridges,
//! RTP) for control to drive, and for `loadgen ari` to originate through (`--calls 0`). This file
//! is the command line: flags, their checks (exit 2 naming the flag), the report on standard
//! output (and `--json`), and the SLA check (`--max-loss`, exit 1).
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use appkit::flags::parse_duration;
use clap::Parser;
use sim_asterisk::{SimConfig, FAILABLE};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "sim-asterisk",
    version,
    about = "Play Asterisk 22's ARI (REST + events + externalMedia RTP) and originate calls"
)]
struct Cli {
    /// HTTP/WebSocket address to serve ARI on.
    #[arg(long, default_value = "127.0.0.1:8088")]
    listen: SocketAddr,
    /// ARI user accepted.
    #[arg(long, env = "ARI_USER", default_value = "asterisk")]
    ari_user: String,
    /// ARI password accepted.
    #[arg(
        long,
        env = "ARI_PASS",
        hide_env_values = true,
        default_value = "asterisk"
    )]
    ari_pass: String,
    /// The Stasis application calls go to.
    #[arg(long, env = "APP_NAME", default_value = "rtp-relay")]
    app: String,
    /// Caller channels to originate (0: serve only, e.g. for `loadgen ari`).
    #[arg(long, default_value_t = 100)]
    calls: u32,
    /// Spread the originations over this long.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    ramp: Duration,
    /// How long each call lasts.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    hold: Duration,
    /// Address externalMedia channels send RTP from (UNICASTRTP_LOCAL_ADDRESS).
    #[arg(long, default_value = "127.0.0.1")]
    rtp_ip: IpAddr,
    /// Fraction (0–1) of first answer attempts that fail with 404 "Channel not found".
    #[arg(long, default_value_t = 0.0)]
    answer_404: f64,
    /// Drop every events WebSocket once, this long after the first call.
    #[arg(long, value_parser = parse_duration)]
    drop_ws_at: Option<Duration>,
    /// How long after the externalMedia request its channel enters Stasis (Asterisk: about 1 ms;
    /// addChannel before then answers 422).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    stasis_delay: Duration,
    /// Every REST request takes at least this long (a busy Asterisk).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    latency: Duration,
    /// The relay's control socket: add the relay's statistics to the report.
    #[arg(long)]
    relay_ctl: Option<PathBuf>,
    /// The relay's process id: add its CPU time per forwarded packet to the report.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Fail an operation with 500 with a probability, e.g. `external_media=0.3` (repeatable;
    /// operations: external_media, create_bridge, add_channel).
    #[arg(long, value_parser = parse_fail)]
    fail: Vec<(String, f64)>,
    /// After the last call, wait this long at most for the application to clean up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    grace: Duration,
    /// Wait this long at most for the application to connect before originating.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    wait_app: Duration,
    /// With --calls 0: serve this long, then report (default: until interrupted).
    #[arg(long, value_parser = parse_duration)]
    serve_for: Option<Duration>,
    /// Seed (SSRCs, sequence numbers, faults).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the report as JSON to this file ("-": standard output).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Fail (exit 1) when the loss ratio exceeds this fraction.
    #[arg(long)]
    max_loss: Option<f64>,
    /// Every bridge traversal of media forwarded for a Local pair (`Local/<app>@stasis/n`)
    /// takes this long; a frame crosses two bridges each way.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    bridge_delay: Duration,
    /// Each bridge traversal adds a uniform draw in [0, this) to --bridge-delay (frames are
    /// never reordered).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    bridge_jitter: Duration,
    /// Probability (0–1) that a bridge traversal drops the frame (drawn from --seed).
    #[arg(long, default_value_t = 0.0)]
    bridge_loss: f64,
}

fn parse_fail(s: &str) -> Result<(String, f64), String> {
    let (op, p) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not OP=FRACTION"))?;
    if !FAILABLE.contains(&op) {
        return Err(format!("{op:?} is not one of {}", FAILABLE.join(", ")));
    }
    let p: f64 = p
        .parse()
        .ok()
        .filter(|p: &f64| (0.0..=1.0).contains(p))
        .ok_or_else(|| format!("{p:?} is not a fraction in 0..=1"))?;
    Ok((op.to_owned(), p))
}

/// The flags as the simulator's settings, or the flag that is wrong and why.
impl TryFrom<Cli> for SimConfig {
    type Error = (&'static str, &'static str);

    fn try_from(a: Cli) -> Result<Self, Self::Error> {
        if !(0.0..=1.0).contains(&a.answer_404) {
            return Err(("--answer-404", "a fraction in 0..=1"));
        }
        if !(0.0..=1.0).contains(&a.bridge_loss) {
            return Err(("--bridge-loss", "a probability in 0..=1"));
        }
        Ok(Self {
            listen: a.listen,
            user: a.ari_user,
            pass: a.ari_pass,
            app: a.app,
            calls: a.calls,
            ramp: a.ramp,
            hold: a.hold,
            rtp_ip: a.rtp_ip,
            answer_404: a.answer_404,
            drop_ws_at: a.drop_ws_at,
            grace: a.grace,
            wait_app: a.wait_app,
            serve_for: a.serve_for,
            seed: a.seed,
            fail: a.fail,
            relay_ctl: a.relay_ctl,
            relay_pid: a.relay_pid,
            latency: a.latency,
            stasis_delay: a.stasis_delay,
            bridge_delay: a.bridge_delay,
            bridge_jitter: a.bridge_jitter,
            bridge_loss: a.bridge_loss,
        })
    }
}

fn write_json(path: &std::path::Path, json: &str) -> bool {
    let written = if path.as_os_str() == "-" {
        println!("{json}");
        Ok(())
    } else {
        std::fs::write(path, format!("{json}\n"))
    };
    if let Err(e) = &written {
        eprintln!("sim-asterisk: cannot write --json {}: {e}", path.display());
    }
    written.is_ok()
}

fn main() -> ExitCode {
    let a = Cli::parse();
    if a.max_loss.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
        eprintln!("sim-asterisk: invalid value for --max-loss: a fraction in 0..=1");
        return ExitCode::from(2);
    }
    let (json, max_loss) = (a.json.clone(), a.max_loss);
    let cfg = match SimConfig::try_from(a) {
        Ok(cfg) => cfg,
        Err((flag, why)) => {
            eprintln!("sim-asterisk: invalid value for {flag}: {why}");
            return ExitCode::from(2);
        }
    };
    appkit::init_logging();
    // Before any thread exists, so that every thread inherits it: the delay line sends on time.
    sim_asterisk::precise_timers();
    let report = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(sim_asterisk::run(cfg))
                .map_err(anyhow::Error::from)
        }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sim-asterisk: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", sim_asterisk::render(&report));
    if let Some(path) = &json {
        if !write_json(
            path,
            &serde_json::to_string_pretty(&report).unwrap_or_default(),
        ) {
            return ExitCode::FAILURE;
        }
    }
    if max_loss.is_some_and(|m| report.loss_ratio > m) {
        eprintln!(
            "sim-asterisk: SLA violated: loss {:.6} above --max-loss",
            report.loss_ratio
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
