//! `bench compare`: what users care about, for each forwarder side by side in one run.
//!
//! For each channel count, first a baseline (loadgen straight to the echo, no forwarder), then
//! each target in turn, alone on the forwarder core: `uring` and `tokio` (this project's relay),
//! `floor` (`bench floor`, the minimal io_uring forwarder) and `rtpengine` (the Debian daemon in
//! userspace mode, set up over its ng protocol). loadgen and the echo share the other core.
//! loadgen plays N channels at 50 packets/s each way, warms up, then measures for `--duration`:
//! - CPU per forwarded packet: the forwarder process's user + system time over the window divided
//!   by the packets that crossed it (both directions);
//! - `io_uring_enter` calls per packet where the forwarder counts them (the relay's wake-ups);
//! - packets lost (sent and never returned);
//! - latency added: loadgen's end-to-end round trip through the forwarder minus the baseline's,
//!   percentile by percentile (p50, p99, max).
//!
//! `--mode drain` instead measures the maximum forwarding rate: every socket gets a burst queued
//! while the forwarder is stopped (SIGSTOP); it is resumed and timed until the last echo is back.

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde::Serialize;
use serde_json::Value;
use testkit::Proc;

pub(crate) use crate::results::{table, Mode, Point, Results};

/// A forwarder to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Target {
    /// The relay, io_uring backend.
    Uring,
    /// The relay, io_uring backend, timing in user space (`--timestamps user`): what kernel
    /// timestamps cost, side by side.
    #[serde(rename = "uring-user")]
    #[value(name = "uring-user")]
    UringUser,
    /// The relay, io_uring backend, one shard per `--shard-cores` entry (default: two shards on
    /// the forwarder core, which shows what sharding costs; on a larger machine, distinct cores
    /// show how it scales).
    Sharded,
    /// The relay, io_uring backend, with `--echo-leg shared` (one socket toward the echo, GSO
    /// batches out, GRO back; the echo runs `--gro`). `uring` stays per-channel, so earlier
    /// tables remain comparable.
    Shared,
    /// The relay, tokio backend.
    Tokio,
    /// The relay, tokio backend, with `--echo-leg shared` (the echo runs `--gro`).
    #[value(name = "tokio-shared")]
    TokioShared,
    /// The minimal io_uring forwarder (`bench floor`).
    Floor,
    /// rtpengine in userspace mode.
    Rtpengine,
}

impl Target {
    /// Whether it is a relay with `--echo-leg shared` (its echo then runs `--gro`).
    #[must_use]
    pub(crate) const fn shared_leg(self) -> bool {
        matches!(self, Self::Shared | Self::TokioShared)
    }

    /// Its name.
    #[must_use]
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::UringUser => "uring-user",
            Self::Sharded => "sharded",
            Self::Shared => "shared",
            Self::Tokio => "tokio",
            Self::TokioShared => "tokio-shared",
            Self::Floor => "floor",
            Self::Rtpengine => "rtpengine",
        }
    }
}

/// `bench compare` settings.
#[derive(Clone, Debug)]
pub(crate) struct CompareConfig {
    /// Targets, in order.
    pub(crate) targets: Vec<Target>,
    /// Channel counts.
    pub(crate) channels: Vec<u32>,
    /// Measured time per point.
    pub(crate) duration: Duration,
    /// Warm-up per point.
    pub(crate) warmup: Duration,
    /// Paced or drain.
    pub(crate) mode: Mode,
    /// Datagrams queued per socket in drain mode.
    pub(crate) burst: u32,
    /// Where the JSON and the chart go.
    pub(crate) out: PathBuf,
    /// The forwarder's core; loadgen and the echo take the other one unless placed.
    pub(crate) core: usize,
    /// Extra flags for the relay (every relay target), e.g. `--batch=16`. A `--cores` among them
    /// replaces the relay's `--core`.
    pub(crate) relay_args: Vec<String>,
    /// The `sharded` target's `--cores` list (default: the forwarder core twice).
    pub(crate) shard_cores: Option<String>,
    /// loadgen's core (default: the other of 0 and 1).
    pub(crate) load_core: Option<usize>,
    /// The echo's core (default: the other of 0 and 1).
    pub(crate) echo_core: Option<usize>,
}

/// `bench floor`'s first port (channel i on FLOOR_BASE + i).
const FLOOR_BASE: u16 = 30_000;
/// loadgen's first port toward rtpengine (call i's caller on RTPENGINE_LOCAL_BASE + i): rtpengine
/// is told the callers' addresses in advance.
const RTPENGINE_LOCAL_BASE: u16 = 10_000;
/// rtpengine's first media port; its range is sized for the call count.
const RTPENGINE_MEDIA_BASE: u16 = 16_000;
/// Media ports rtpengine takes per call: RTP and RTCP on each of its two legs.
const RTPENGINE_PORTS_PER_CALL: u32 = 4;
const RTPENGINE_NG: &str = "127.0.0.1:22222";

/// rtpengine's media port range for `calls` calls: 4 a call and a quarter more for the ports it
/// finds taken, from [`RTPENGINE_MEDIA_BASE`]; an error when that passes 65535.
fn rtpengine_ports(calls: u32) -> anyhow::Result<(u16, u16)> {
    let need = calls * RTPENGINE_PORTS_PER_CALL;
    let last = u32::from(RTPENGINE_MEDIA_BASE) + need + need / 4 + 64;
    let last = u16::try_from(last).map_err(|_| {
        anyhow!("rtpengine needs {need} media ports for {calls} calls, more than fit above {RTPENGINE_MEDIA_BASE}")
    })?;
    Ok((RTPENGINE_MEDIA_BASE, last))
}

/// Starts a workspace binary and waits for its ready line; an error (never a panic: the release
/// profile aborts, which would leave the children running).
fn start(name: &str, args: &[&str], ready: &str, key: &str) -> anyhow::Result<(Proc, String)> {
    testkit::try_start(name, args, ready, key).map_err(|e| anyhow!(e))
}

/// The core of loadgen (or of the drain sender), and of the echo: `--load-core` and `--echo-core`,
/// by default the other of cores 0 and 1 than the forwarder's.
fn load_cores(cfg: &CompareConfig) -> (usize, usize) {
    let other = usize::from(cfg.core == 0);
    (
        cfg.load_core.unwrap_or(other),
        cfg.echo_core.unwrap_or(other),
    )
}

/// Runs the comparison, writing `compare.json` (and in paced mode `compare.svg`) in `out` after
/// every point, so what was measured survives anything that stops the run. A point that fails
/// (refused set-up, a crash, no traffic) becomes a failed cell and the run goes on; once `stop`
/// is set (Ctrl-C, SIGTERM) the point under way is abandoned and the run ends with what it has.
///
/// # Errors
/// The output directory or its files cannot be written.
pub(crate) fn run(cfg: &CompareConfig, stop: &AtomicBool) -> anyhow::Result<Results> {
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("cannot create {}", cfg.out.display()))?;
    // Before any thread is pinned (the core count follows this thread's affinity).
    let mut results = Results {
        mode: cfg.mode,
        duration_s: cfg.duration.as_secs_f64(),
        machine: machine(),
        points: Vec::new(),
        interrupted: false,
    };
    let why = |e: &anyhow::Error| {
        if stop.load(Ordering::Relaxed) {
            "interrupted".to_owned()
        } else {
            format!("{e:#}")
        }
    };
    'run: for &n in &cfg.channels {
        let baseline = match cfg.mode {
            Mode::Paced if !stop.load(Ordering::Relaxed) => match paced(cfg, None, n, stop) {
                Ok(b) => Some(b),
                Err(e) => {
                    eprintln!("bench: the baseline with {n} channels failed: {}", why(&e));
                    results.points.push(Point::failed("baseline", n, why(&e)));
                    None
                }
            },
            _ => None,
        };
        for &t in &cfg.targets {
            if stop.load(Ordering::Relaxed) {
                break 'run;
            }
            eprintln!("bench: {} with {n} channels", t.name());
            let p = match cfg.mode {
                Mode::Paced => paced(cfg, Some(t), n, stop),
                Mode::Drain => drain(cfg, t, n, stop),
            };
            let mut p = match p {
                Ok(p) => p,
                Err(e) if t == Target::Rtpengine && !rtpengine_installed() => Point {
                    skipped: Some(format!(
                        "rtpengine is not installed ({e}); scripts/bench.sh installs it"
                    )),
                    ..Point::default()
                },
                Err(e) => {
                    eprintln!("bench: {} with {n} channels failed: {}", t.name(), why(&e));
                    Point::failed(t.name(), n, why(&e))
                }
            };
            p.target = t.name().into();
            p.channels = n;
            if p.measured() && cfg.mode == Mode::Paced {
                let minus = |v: Option<f64>, b: Option<f64>| v.zip(b).map(|(v, b)| v - b);
                let b = baseline.as_ref();
                p.added_p50_us = minus(p.added_p50_us, b.and_then(|b| b.added_p50_us));
                p.added_p99_us = minus(p.added_p99_us, b.and_then(|b| b.added_p99_us));
                p.added_max_us = minus(p.added_max_us, b.and_then(|b| b.added_max_us));
            }
            results.points.push(p);
            write(cfg, &results)?;
        }
    }
    results.interrupted = stop.load(Ordering::Relaxed);
    write(cfg, &results)?;
    Ok(results)
}

/// Writes `compare.json` and, in paced mode, `compare.svg` for the points so far.
fn write(cfg: &CompareConfig, results: &Results) -> anyhow::Result<()> {
    let json = cfg.out.join("compare.json");
    std::fs::write(&json, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("cannot write {}", json.display()))?;
    if cfg.mode == Mode::Paced {
        crate::chart::draw(results, &cfg.out.join("compare.svg"))?;
    }
    Ok(())
}

fn rtpengine_installed() -> bool {
    std::process::Command::new("rtpengine")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {} cores, Linux {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        kernel.trim()
    )
}

/// How traffic reaches a forwarder.
enum Reach {
    /// The relay: channels are added on its control socket.
    Relay(PathBuf),
    /// Fixed addresses (`loadgen rtp --to` syntax), with the callers' first port when the
    /// forwarder was told the callers' addresses in advance.
    Static {
        targets: String,
        local_port_base: Option<u16>,
    },
}

/// A forwarder running, and how loadgen reaches it.
struct Running {
    /// Killed (and reaped) when the point is done.
    _procs: Vec<Proc>,
    pid: u32,
    reach: Reach,
    metrics: Option<String>,
}

impl Running {
    /// The `loadgen rtp` flags that reach it.
    fn loadgen_args(&self) -> Vec<String> {
        match &self.reach {
            Reach::Relay(ctl) => vec!["--relay-ctl".into(), ctl.to_string_lossy().into_owned()],
            Reach::Static {
                targets,
                local_port_base,
            } => {
                let mut a = vec!["--to".into(), targets.clone()];
                if let Some(p) = local_port_base {
                    a.extend(["--local-port-base".into(), p.to_string()]);
                }
                a
            }
        }
    }
}

/// The echo for a point; with `gro` (the `shared` target) it takes the relay's GSO batches whole.
fn start_echo(cfg: &CompareConfig, gro: bool) -> anyhow::Result<(Proc, String)> {
    let core = load_cores(cfg).1.to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "off",
        "--core",
        &core,
    ];
    if gro {
        args.push("--gro");
    }
    start("echo", &args, "echo ready", "listen")
}

fn start_target(cfg: &CompareConfig, t: Target, n: u32, echo: &str) -> anyhow::Result<Running> {
    let core = cfg.core.to_string();
    Ok(match t {
        Target::Uring
        | Target::UringUser
        | Target::Sharded
        | Target::Shared
        | Target::Tokio
        | Target::TokioShared => {
            let (backend, timestamps) = match t {
                Target::Tokio | Target::TokioShared => ("tokio", "kernel"),
                Target::UringUser => ("uring", "user"),
                _ => ("uring", "kernel"),
            };
            // Where its shards run: `--cores` for `sharded` (or given by --relay-arg), else the
            // forwarder core.
            let cores_given = cfg.relay_args.iter().any(|a| a.starts_with("--cores"));
            let placement = match t {
                Target::Sharded if !cores_given => [
                    "--cores".to_owned(),
                    cfg.shard_cores
                        .clone()
                        .unwrap_or_else(|| format!("{core},{core}")),
                ],
                _ if cores_given => [String::new(), String::new()],
                _ => ["--core".to_owned(), core.clone()],
            };
            let leg = if t.shared_leg() {
                "shared"
            } else {
                "per-channel"
            };
            let ctl = std::env::temp_dir().join(format!(
                "bench-{}-{}.sock",
                std::process::id(),
                t.name()
            ));
            let ctl_s = ctl.to_string_lossy().into_owned();
            let (p, metrics) = start(
                "relay",
                &[
                    "--backend",
                    backend,
                    "--timestamps",
                    timestamps,
                    "--ctl",
                    &ctl_s,
                    "--metrics",
                    "127.0.0.1:0",
                    "--echo",
                    echo,
                    "--max-channels",
                    &n.max(16).to_string(),
                    "--echo-leg",
                    leg,
                ]
                .into_iter()
                .chain(
                    placement
                        .iter()
                        .map(String::as_str)
                        .filter(|a| !a.is_empty()),
                )
                .chain(cfg.relay_args.iter().map(String::as_str))
                .collect::<Vec<_>>(),
                "relay ready",
                "metrics",
            )?;
            Running {
                pid: p.pid(),
                _procs: vec![p],
                reach: Reach::Relay(ctl),
                metrics: Some(metrics),
            }
        }
        Target::Floor => {
            let (p, _) = start(
                "bench",
                &[
                    "floor",
                    "--port-base",
                    &FLOOR_BASE.to_string(),
                    "--channels",
                    &n.to_string(),
                    "--echo",
                    echo,
                    "--core",
                    &core,
                ],
                "floor ready",
                "ports",
            )?;
            Running {
                pid: p.pid(),
                _procs: vec![p],
                reach: Reach::Static {
                    targets: format!("127.0.0.1:{FLOOR_BASE}-{}", u32::from(FLOOR_BASE) + n - 1),
                    local_port_base: None,
                },
                metrics: None,
            }
        }
        Target::Rtpengine => {
            if !rtpengine_installed() {
                bail!("no rtpengine binary");
            }
            if UdpSocket::bind(RTPENGINE_NG).is_err() {
                bail!("{RTPENGINE_NG} is taken: is another rtpengine running?");
            }
            let (first, last) = rtpengine_ports(n)?;
            let child = std::process::Command::new("taskset")
                .args([
                    "-c",
                    &core,
                    "rtpengine",
                    "--config-file=none",
                    "-f",
                    "-E",
                    "-L",
                    "4",
                ])
                .args([
                    "-t",
                    "-1",
                    "-i",
                    "127.0.0.1",
                    "-n",
                    RTPENGINE_NG,
                    "-m",
                    &first.to_string(),
                    "-M",
                    &last.to_string(),
                ])
                .args(["--num-threads", "1", "--delete-delay", "0"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting rtpengine")?;
            let p = Proc(child);
            let ng_addr: SocketAddr = RTPENGINE_NG.parse()?;
            let mut ng = crate::ng::NgClient::new(ng_addr)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let ping = crate::ng::Request {
                command: "ping",
                ..crate::ng::Request::default()
            };
            while let Err(e) = ng.call(&ping) {
                if Instant::now() > deadline {
                    return Err(e.context("rtpengine did not answer ping within 10 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let echo: SocketAddr = echo.parse()?;
            let mut lines = String::new();
            for i in 0..n as usize {
                let local = SocketAddr::new(
                    "127.0.0.1".parse()?,
                    u16::try_from(usize::from(RTPENGINE_LOCAL_BASE) + i)?,
                );
                let to = crate::ng::setup_call(&mut ng, i, local, echo)?;
                lines.push_str(&format!("{to}\n"));
            }
            let file = std::env::temp_dir()
                .join(format!("bench-{}-rtpengine.targets", std::process::id()));
            std::fs::write(&file, lines)?;
            Running {
                pid: p.pid(),
                _procs: vec![p],
                reach: Reach::Static {
                    targets: format!("@{}", file.display()),
                    local_port_base: Some(RTPENGINE_LOCAL_BASE),
                },
                metrics: None,
            }
        }
    })
}

/// The relay's `io_uring_enter` count (tokio: its wake-ups), from its `/metrics`.
fn wakeups(metrics_url: &str) -> Option<f64> {
    let addr = metrics_url
        .strip_prefix("http://")?
        .split('/')
        .next()?
        .to_owned();
    let (_, body) = testkit::http_get(&addr, "/metrics").ok()?;
    let read = |name: &str| {
        body.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
    };
    // io_uring counts its enters (waits and submissions); tokio its wake-ups.
    read("rtprelay_enters_total ")
        .filter(|&n| n > 0.0)
        .or_else(|| read("rtprelay_batch_size_count "))
}

fn paced(
    cfg: &CompareConfig,
    t: Option<Target>,
    n: u32,
    stop: &AtomicBool,
) -> anyhow::Result<Point> {
    let (_echo, echo_addr) = start_echo(cfg, t.is_some_and(Target::shared_leg))?;
    let running = match t {
        Some(t) => Some(start_target(cfg, t, n, &echo_addr)?),
        None => None,
    };
    let mut args: Vec<String> = vec![
        "rtp".into(),
        "--channels".into(),
        n.to_string(),
        "--duration".into(),
        format!("{}ms", cfg.duration.as_millis()),
        "--warmup".into(),
        format!("{}ms", cfg.warmup.as_millis()),
        "--ramp".into(),
        "0".into(),
        "--core".into(),
        load_cores(cfg).0.to_string(),
        "--json".into(),
        "-".into(),
    ];
    match &running {
        Some(r) => {
            args.extend(r.loadgen_args());
            args.extend(["--relay-pid".into(), r.pid.to_string()]);
        }
        None => args.extend(["--to".into(), echo_addr.clone()]),
    }
    let before = running
        .as_ref()
        .and_then(|r| r.metrics.as_deref())
        .and_then(wakeups);
    // loadgen ends by itself after the warm-up and the window; a minute more is a hang.
    let limit = cfg.warmup + cfg.duration + Duration::from_secs(60);
    let out = testkit::output(
        std::process::Command::new(testkit::bin("loadgen")).args(&args),
        limit,
        Some(stop),
    )
    .context("running loadgen")?;
    let after = running
        .as_ref()
        .and_then(|r| r.metrics.as_deref())
        .and_then(wakeups);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "loadgen failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    let json = &stdout[stdout.find("\n{").map_or(0, |i| i + 1)..];
    let r: Value = serde_json::from_str(json).context("loadgen's JSON report")?;
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let packets = u(&r["window"]["sent"]) + u(&r["window"]["returned"]);
    let cpu_ns = u(&r["relay"]["cpu_ns"]);
    let us = |v: &Value| u(v) as f64 / 1e3;
    let total_packets = u(&r["packets_sent"]) + u(&r["packets_received"]);
    drop(running);
    if packets == 0 {
        bail!("no packet crossed the forwarder in the measured window");
    }
    Ok(Point {
        packets,
        cpu_ns,
        #[allow(clippy::cast_precision_loss)] // a ratio
        cpu_ns_per_packet: if packets == 0 { 0.0 } else { cpu_ns as f64 / packets as f64 },
        enters_per_packet: before
            .zip(after)
            .filter(|_| total_packets > 0)
            .map(|(b, a)| (a - b) / total_packets as f64),
        lost: u(&r["lost"]),
        forward_p99_us: (u(&r["relay"]["forward"]["to_echo"]["count"]) > 0).then(|| {
            us(&r["relay"]["forward"]["to_echo"]["p99_ns"])
                .max(us(&r["relay"]["forward"]["to_asterisk"]["p99_ns"]))
        }),
        added_p50_us: Some(us(&r["e2e_rtt"]["p50_ns"])),
        added_p99_us: Some(us(&r["e2e_rtt"]["p99_ns"])),
        added_max_us: Some(us(&r["e2e_rtt"]["max_ns"])),
        ..Point::default()
    })
}

/// Drain: `burst` datagrams queued on each of `n` sockets while the forwarder is stopped, then
/// timed from SIGCONT until every echo is back (or 10 s).
fn drain(cfg: &CompareConfig, t: Target, n: u32, stop: &AtomicBool) -> anyhow::Result<Point> {
    // This thread plays loadgen: on the other core, with the echo.
    let _ = relay_io::pin_current_thread(load_cores(cfg).0);
    let (_echo, echo_addr) = start_echo(cfg, t.shared_leg())?;
    let running = start_target(cfg, t, n, &echo_addr)?;
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|i| {
            let port = if t == Target::Rtpengine {
                u16::try_from(u32::from(RTPENGINE_LOCAL_BASE) + i)?
            } else {
                0
            };
            let s = relay_io::bind_udp("127.0.0.1".parse()?, port, 8 << 20)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<anyhow::Result<_>>()?;
    let targets = drain_targets(&running, &sockets)?;
    // Let the forwarder learn each socket (latching) with one round trip first.
    send_burst(&sockets, &targets, 1)?;
    let mut got = 0u64;
    wait_back(&sockets, u64::from(n), &mut got, Duration::from_secs(5))?;
    // Rounds until a second of forwarding has been timed (the CPU clock ticks in 10 ms).
    let pid = running.pid.to_string();
    let stat = PathBuf::from(format!("/proc/{}/stat", running.pid));
    let per_round = u64::from(n) * u64::from(cfg.burst);
    let (mut took, mut cpu, mut back, mut want) = (Duration::ZERO, 0u64, 0u64, 0u64);
    for _ in 0..200 {
        if took >= Duration::from_secs(1) {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status();
        send_burst(&sockets, &targets, cfg.burst)?;
        want += per_round;
        let cpu0 = relay_io::cpu_time_ns(&stat).unwrap_or(0);
        let start = Instant::now();
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status();
        let mut got = 0u64;
        wait_back(&sockets, per_round, &mut got, Duration::from_secs(10))?;
        took += start.elapsed();
        cpu += relay_io::cpu_time_ns(&stat)
            .unwrap_or(0)
            .saturating_sub(cpu0);
        back += got;
        if got < per_round {
            break; // datagrams lost: the rate is what came back
        }
    }
    drop(running);
    if back == 0 {
        bail!("no packet came back through the forwarder");
    }
    #[allow(clippy::cast_precision_loss)] // rates
    Ok(Point {
        packets: back * 2,
        cpu_ns: cpu,
        cpu_ns_per_packet: if back == 0 {
            0.0
        } else {
            cpu as f64 / (back * 2) as f64
        },
        lost: want - back.min(want),
        drain_pps: Some(back as f64 * 2.0 / took.as_secs_f64().max(1e-9)),
        ..Point::default()
    })
}

fn drain_targets(r: &Running, sockets: &[UdpSocket]) -> anyhow::Result<Vec<SocketAddr>> {
    match &r.reach {
        Reach::Relay(ctl) => {
            let mut c = loadgen::ctl::RelayClient::connect(ctl)?;
            sockets
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let port = c.add(&format!("drain-{i}"), 0, s.local_addr()?, None)?;
                    Ok(SocketAddr::new("127.0.0.1".parse()?, port))
                })
                .collect()
        }
        Reach::Static { targets, .. } => {
            let list = loadgen::rtp::parse_targets(targets)
                .map_err(|e| anyhow!(e))?
                .0;
            anyhow::ensure!(!list.is_empty(), "{targets} names no address");
            Ok(list.iter().copied().cycle().take(sockets.len()).collect())
        }
    }
}

fn send_burst(sockets: &[UdpSocket], targets: &[SocketAddr], burst: u32) -> anyhow::Result<()> {
    let mut pkt = [0u8; 172];
    for k in 0..burst {
        for (i, (s, to)) in sockets.iter().zip(targets).enumerate() {
            #[allow(clippy::cast_possible_truncation)] // sequence numbers wrap
            relay_proto::RtpHeader {
                marker: false,
                payload_type: 0,
                sequence: k as u16,
                timestamp: k.wrapping_mul(160),
                ssrc: relay_proto::Ssrc(i as u32 + 1),
            }
            .write(&mut pkt);
            loop {
                match s.send_to(&pkt, to) {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::yield_now();
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

fn wait_back(
    sockets: &[UdpSocket],
    want: u64,
    got: &mut u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let end = Instant::now() + limit;
    let mut buf = [0u8; 2048];
    while *got < want && Instant::now() < end {
        let mut any = false;
        for s in sockets {
            while s.recv_from(&mut buf).is_ok() {
                *got += 1;
                any = true;
            }
        }
        if !any {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(())
}

/// Flushes standard output (the table is printed before the chart is drawn).
pub(crate) fn flush() {
    let _ = std::io::stdout().flush();
}
