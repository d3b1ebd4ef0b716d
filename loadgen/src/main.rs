//! `loadgen`: drives rtp-relay. `loadgen rtp` plays Asterisk's RTP for N channels against a
//! running relay and prints a latency report; `loadgen ari` originates calls through ARI (a real
//! Asterisk, or the `sim-asterisk` binary); `loadgen blast` loads a reflector; `loadgen report`
//! turns a run's files into an HTML page; `loadgen burn` is a noisy neighbour.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use appkit::flags::parse_duration;
use clap::{Parser, Subcommand};
use loadgen::rtp;

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
    /// Originate calls on a real Asterisk through ARI and print the relay's and control's summaries.
    Ari(AriArgs),
    /// Turn a call log (control --call-log) into a self-contained HTML report.
    Report(ReportArgs),
    /// Keep a core busy in bursts (a noisy neighbour for tests of the relay's own scheduling;
    /// run it under `chrt -f 1` so the relay cannot preempt it).
    Burn(BurnArgs),
}

/// `loadgen report` flags.
#[derive(Debug, clap::Args)]
struct ReportArgs {
    /// The call log (one JSON record a line).
    #[arg(long)]
    calls: PathBuf,
    /// A JSON report of the same run; give it twice for one of each kind, each recognised by its
    /// keys. sim-asterisk's `--json` report (`per_call`, `transcoding_calls`): the summary adds
    /// what the simulated Asterisk measured end to end. `loadgen ari --json` (`through_asterisk`):
    /// the caller's round trip through Asterisk as one CDF per leg (total, Asterisk in, relay
    /// loop, Asterisk out) with each leg's percentiles and the loss on each side of the relay, and
    /// "RTT over time" in 1 s windows of run time from its time series (without it: 10 s windows
    /// by call end time). A file of neither kind, or a second of one kind, is refused.
    #[arg(long, value_name = "PATH")]
    run: Vec<PathBuf>,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html")]
    out: PathBuf,
}

/// `loadgen burn` flags.
#[derive(Debug, clap::Args)]
struct BurnArgs {
    /// Pin to this core.
    #[arg(long)]
    core: Option<usize>,
    /// Spin this long...
    #[arg(long, default_value = "4ms", value_parser = parse_duration)]
    busy: Duration,
    /// ...then sleep this long, and again.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    idle: Duration,
    /// Stop after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
}

fn burn(b: &BurnArgs) -> ExitCode {
    if let Some(id) = b.core {
        if !relay_io::pin_current_thread(id) {
            eprintln!("loadgen burn: invalid value for --core: cannot pin to core {id}");
            return ExitCode::from(2);
        }
    }
    let end = std::time::Instant::now() + b.duration;
    let mut x = 0u64;
    while std::time::Instant::now() < end {
        let spin_end = std::time::Instant::now() + b.busy;
        while std::time::Instant::now() < spin_end {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        std::thread::sleep(b.idle);
    }
    ExitCode::SUCCESS
}

/// `loadgen ari` flags.
#[derive(Debug, clap::Args)]
struct AriArgs {
    /// Asterisk's ARI base URL.
    #[arg(long, env = "ARI_URL", default_value = "http://127.0.0.1:8088")]
    ari_url: String,
    /// ARI user.
    #[arg(long, env = "ARI_USER", default_value = "asterisk")]
    ari_user: String,
    /// ARI password.
    #[arg(long, env = "ARI_PASS", hide_env_values = true)]
    ari_pass: String,
    /// The Stasis application control serves.
    #[arg(long, env = "APP_NAME", default_value = "rtp-relay")]
    app: String,
    /// Who the calls are: `rtp`, loadgen itself, playing probes it times on both sides of
    /// Asterisk (through `Local/<--app>@<--context>/n` into its own application); `tone`,
    /// `--endpoint` playing a tone into control's application (only the relay's loop measured).
    #[arg(long, value_enum, default_value = "rtp")]
    callers: loadgen::ari::Callers,
    /// rtp callers: loadgen's own Stasis application (its own events WebSocket).
    #[arg(long, default_value = "rtp-relay-loadgen")]
    loadgen_app: String,
    /// rtp callers: the dialplan context whose extension `<--app>` runs `Stasis(${EXTEN})`.
    #[arg(long, default_value = "stasis")]
    context: String,
    /// rtp callers: the address loadgen's RTP sockets bind; Asterisk sends the returns there.
    #[arg(long, default_value = "127.0.0.1")]
    rtp_ip: IpAddr,
    /// rtp callers: after a call's last probe, wait this long at most for the rest to come back.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    drain: Duration,
    /// Also write the report as JSON to this file ("-": standard output).
    #[arg(long)]
    json: Option<PathBuf>,
    /// rtp callers: write every probe's four kernel stamps to this CSV file (`call, probe,
    /// sent_ns, relay_arrival_ns, relay_returned_ns, back_ns`; 0 where not known).
    #[arg(long)]
    probes: Option<PathBuf>,
    /// tone callers: the endpoint to originate, a Local channel into a context that answers and
    /// plays a tone.
    #[arg(long, default_value = "Local/s@load")]
    endpoint: String,
    /// tone callers: `formats` for every originate, the caller's native format (default: ulaw,
    /// the format control bridges with). Without it Asterisk gives a Local channel slin192 and
    /// transcodes every call; an empty value leaves it out. rtp callers always ask for ulaw.
    #[arg(long, default_value = "ulaw")]
    formats: String,
    /// Calls.
    #[arg(long, default_value_t = 10)]
    calls: u32,
    /// Spread the originations over this long.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    ramp: Duration,
    /// How long each call lasts.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    hold: Duration,
    /// The relay's control socket, for its summary.
    #[arg(long, env = "RELAY_SOCKET")]
    relay_ctl: Option<PathBuf>,
    /// Control's metrics endpoint, for its /stats (e.g. http://127.0.0.1:9102).
    #[arg(long)]
    control: Option<String>,
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // reqwest uses rustls for https ARI URLs; ring is the process's provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn write_json(path: &std::path::Path, json: &str) -> bool {
    let written = if path.as_os_str() == "-" {
        println!("{json}");
        Ok(())
    } else {
        std::fs::write(path, format!("{json}\n"))
    };
    if let Err(e) = &written {
        eprintln!("loadgen: cannot write --json {}: {e}", path.display());
    }
    written.is_ok()
}

fn ari(a: AriArgs) -> ExitCode {
    if a.calls == 0 {
        eprintln!("loadgen: invalid value for --calls: must be at least 1");
        return ExitCode::from(2);
    }
    let cfg = loadgen::ari::AriLoadConfig {
        url: a.ari_url,
        user: a.ari_user,
        pass: a.ari_pass,
        app: a.app,
        endpoint: a.endpoint,
        formats: Some(a.formats).filter(|f| !f.is_empty()),
        calls: a.calls,
        ramp: a.ramp,
        hold: a.hold,
        relay_ctl: a.relay_ctl,
        control: a.control,
        callers: a.callers,
        rtp: loadgen::ari::RtpCallers {
            app: a.loadgen_app,
            context: a.context,
            rtp_ip: a.rtp_ip,
            drain: a.drain,
        },
        probes: a.probes,
    };
    match runtime().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(loadgen::ari::run(&cfg))
            .map_err(anyhow::Error::from)
    }) {
        Ok(r) => {
            // With the JSON on stdout (`--json -`), the summary goes to stderr.
            let summary = loadgen::ari::render(&r);
            if a.json.as_deref() == Some(std::path::Path::new("-")) {
                eprint!("{summary}");
            } else {
                print!("{summary}");
            }
            if let Some(path) = &a.json {
                if !write_json(path, &serde_json::to_string_pretty(&r).unwrap_or_default()) {
                    return ExitCode::FAILURE;
                }
            }
            if r.originated == 0 {
                eprintln!(
                    "loadgen: no call could be originated: {}",
                    r.first_error.unwrap_or_default()
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    /// Send in UDP GSO batches of this many packets and receive with UDP GRO (0: one datagram
    /// a send, plain receives); at most 64. The window must be a multiple of it.
    #[arg(long, default_value_t = 0)]
    gso: u32,
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
    /// Send to these addresses instead of a relay's channels: IP:PORT (all channels), IP:LO-HI
    /// (channel i to LO + i) or @FILE (one address a line). For other forwarders and baselines.
    #[arg(long, value_parser = rtp::parse_targets)]
    to: Option<rtp::Targets>,
    /// Bind channel i's socket to this port + i (default: any free port).
    #[arg(long)]
    local_port_base: Option<u16>,
    /// Send this long before measuring (latency and relay CPU cover only what follows).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
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
        gso: b.gso,
    };
    if b.gso > 64 || (b.gso > 0 && b.window % b.gso != 0) {
        eprintln!(
            "loadgen: invalid value for --gso: at most 64, and --window must be a multiple of it"
        );
        return ExitCode::from(2);
    }
    match loadgen::blast::run(&cfg) {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let a = match Cli::parse().command {
        Mode::Rtp(a) => a,
        Mode::Blast(b) => return blast(&b),
        Mode::Ari(a) => return ari(a),
        Mode::Burn(b) => return burn(&b),
        Mode::Report(r) => {
            return match loadgen::html::run(&r.calls, &r.run, &r.out) {
                Ok(n) => {
                    eprintln!("loadgen report: {n} calls -> {}", r.out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("loadgen report: {:#}", anyhow::Error::from(e));
                    ExitCode::FAILURE
                }
            }
        }
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
        targets: a.to.map(|t| t.0),
        local_port_base: a.local_port_base,
        warmup: a.warmup,
    };
    let report = match rtp::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {:#}", anyhow::Error::from(e));
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
