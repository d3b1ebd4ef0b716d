//! Command line and environment → a validated [`Config`].
//!
//! Every flag can also be set by an environment variable (`RELAY_*`, named in `--help`). clap
//! parses the raw flags ([`Args`]); [`Config::try_from`] checks the values that clap cannot (ring
//! sizes, durations, the combination of limits) so that nothing starts with a bad setting and the
//! error names the flag. Libraries never see clap types.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use appkit::flags::parse_duration;
use clap::{Parser, ValueEnum};
use relay_proto::control::RelayIdentity;
use relay_proto::RelayConfig;

/// Which I/O layer drives the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// io_uring: multishot RecvMsg on a provided-buffer ring, batched SendMsg.
    Uring,
    /// tokio: a current-thread runtime, one task per channel socket.
    Tokio,
}

impl Backend {
    /// The name used on the command line and in metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::Tokio => "tokio",
        }
    }
}

/// How the relay reaches the echo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EchoLeg {
    /// From each channel's own socket, one datagram a send (any echo that answers its source).
    PerChannel,
    /// One socket per shard toward the echo: UDP GSO batches out, UDP GRO back, the SSRC
    /// replaced by a relay-owned tag on that leg (the echo must return the bytes unchanged).
    Shared,
}

impl EchoLeg {
    /// The name used on the command line and in metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PerChannel => "per-channel",
            Self::Shared => "shared",
        }
    }
}

/// How the io_uring backend collects transmit stamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TxStamps {
    /// Each socket's error queue, read (`recvmmsg(MSG_ERRQUEUE)`) once the enter that submitted
    /// its sends returns.
    ErrorQueue,
    /// io_uring's `SOCKET_URING_OP_TX_TIMESTAMP` command.
    Command,
}

/// Where the times the relay reports come from. Arrivals are the kernel's software receive
/// stamps (SO_TIMESTAMPNS) either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Timestamps {
    /// Every send's time is the kernel's transmit stamp (SO_TIMESTAMPING, read back through
    /// io_uring or the socket's error queue): T0 toward the echo, and the end of every forward.
    Kernel,
    /// Send times are estimated from clock reads around the system call that submitted the send
    /// (the way before kernel transmit stamps): wrong whenever the relay is preempted between
    /// them. Kept for comparison.
    User,
}

impl Timestamps {
    /// The name used on the command line and in metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::User => "user",
        }
    }
}

/// The relay's raw command line.
#[derive(Debug, Parser)]
#[command(
    name = "relay",
    version,
    about = "RTP latency relay: forwards each call's RTP to an echo server and back, measuring every packet"
)]
pub struct Args {
    /// Unix socket on which control connects (always served; needs no TLS).
    #[arg(long, env = "RELAY_CTL", default_value = "/run/rtp-relay/relay.sock")]
    pub ctl: PathBuf,
    /// Also serve the control protocol on TCP, for control on another host: `tcp://ADDR:PORT`
    /// (port 0 picks one, logged). TLS 1.3 with mutual authentication: needs --tls-cert,
    /// --tls-key and --tls-client-ca.
    #[arg(long, env = "RELAY_CTL_LISTEN")]
    pub ctl_listen: Option<String>,
    /// With --ctl-listen: the relay's certificate chain (PEM).
    #[arg(long, env = "RELAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// With --ctl-listen: the private key of --tls-cert (PEM).
    #[arg(long, env = "RELAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// With --ctl-listen: the CA a client's certificate must be signed by (PEM); a client
    /// without such a certificate is refused before any command.
    #[arg(long, env = "RELAY_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// The address Asterisk must send a channel's RTP to, when it is not --bind (NAT, or --bind
    /// 0.0.0.0); told to control in the `hello` reply.
    #[arg(long, env = "RELAY_ADVERTISE")]
    pub advertise: Option<IpAddr>,
    /// This relay's id in control's pool, metrics and call records (default: the host name).
    #[arg(long, env = "RELAY_ID")]
    pub relay_id: Option<String>,
    /// Address of the metrics endpoint (/metrics, /stats, /healthz); port 0 picks one (logged).
    #[arg(long, env = "RELAY_METRICS", default_value = "127.0.0.1:9100")]
    pub metrics: SocketAddr,
    /// Pin the data-plane thread to this CPU core (the one-shard form of --cores).
    #[arg(long, env = "RELAY_CORE", conflicts_with = "cores")]
    pub core: Option<usize>,
    /// One data-plane shard per listed core, each pinned to its core: `2-5`, `1,3,5`, `0-1,4`.
    /// A core may be listed twice (shards then share it). Without --cores or --core: one
    /// shard, not pinned.
    #[arg(long, env = "RELAY_CORES", value_parser = parse_cores)]
    pub cores: Option<CoreList>,
    /// I/O backend.
    #[arg(long, env = "RELAY_BACKEND", value_enum, default_value = "uring")]
    pub backend: Backend,
    /// Send times (T0 and the end of a forward): the kernel's transmit stamps, or estimates from
    /// user-space clock reads around each send (for comparison). Arrivals are the kernel's
    /// receive stamps either way.
    #[arg(long, env = "RELAY_TIMESTAMPS", value_enum, default_value = "kernel")]
    pub timestamps: Timestamps,
    /// io_uring backend, kernel timestamps: how transmit stamps reach the ring. `error-queue`
    /// (default): each socket's error queue read with recvmmsg(MSG_ERRQUEUE) once the enter that
    /// submitted its sends returns. `command`:
    /// io_uring's SOCKET_URING_OP_TX_TIMESTAMP (Linux 6.15+), no system call per stamp, but on
    /// Linux 6.18 it was seen to corrupt provided-buffer receives on the same socket when the
    /// buffer ring runs dry (docs/measurement.md); for experiments only.
    #[arg(
        long,
        env = "RELAY_TX_STAMPS",
        value_enum,
        default_value = "error-queue"
    )]
    pub tx_stamps: TxStamps,
    /// How packets reach the echo: from each channel's socket, or one shared socket per shard
    /// with UDP GSO/GRO and an SSRC tag (both backends).
    #[arg(
        long,
        env = "RELAY_ECHO_LEG",
        value_enum,
        default_value = "per-channel"
    )]
    pub echo_leg: EchoLeg,
    /// Address the channel sockets bind.
    #[arg(long, env = "RELAY_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Echo server for channels whose `add` names none.
    #[arg(long, env = "RELAY_ECHO", default_value = "127.0.0.1:4000")]
    pub echo: SocketAddr,
    /// Most channels open at once, relay-wide (split evenly over the shards).
    #[arg(long, env = "RELAY_MAX_CHANNELS", default_value_t = 4096)]
    pub max_channels: u32,
    /// A channel with no media for this long is closed (20ms, 1.5s, 2m; a bare number is seconds).
    #[arg(long, env = "RELAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub idle_timeout: Duration,
    /// A packet whose echo has not returned after this long counts as an echo timeout.
    #[arg(long, env = "RELAY_ECHO_TIMEOUT", default_value = "2s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub echo_timeout: Duration,
    /// Round trips above this count in rtprelay_rtt_high_total.
    #[arg(long, env = "RELAY_RTT_THRESHOLD", default_value = "50ms", value_parser = parse_duration, allow_hyphen_values = true)]
    pub rtt_threshold: Duration,
    /// A packet whose transit exceeds its stream's baseline by more than this is late.
    #[arg(long, env = "RELAY_LATE_THRESHOLD", default_value = "40ms", value_parser = parse_duration, allow_hyphen_values = true)]
    pub late_threshold: Duration,
    /// Refuse to latch Asterisk's address from traffic; control must give it.
    #[arg(long, env = "RELAY_STRICT")]
    pub strict: bool,
    /// io_uring submission queue entries of each shard's ring (power of two; the completion
    /// queue is 4x).
    #[arg(long, env = "RELAY_SQ_ENTRIES", default_value_t = 4096)]
    pub sq_entries: u32,
    /// Receive buffers in each shard's provided-buffer ring (power of two, at most 32768).
    #[arg(long, env = "RELAY_BUFFERS", default_value_t = 4096)]
    pub buffers: u32,
    /// io_uring backend: completions a wait gathers before waking (1: wake on the first).
    #[arg(long, env = "RELAY_BATCH", default_value_t = 1)]
    pub batch: u32,
    /// io_uring backend: with --batch above 1, the longest a wait holds for the batch before
    /// returning on what has arrived (Linux 6.12+ min_wait): added latency, at most this.
    #[arg(long, env = "RELAY_BATCH_WAIT", default_value = "0us", value_parser = parse_duration)]
    pub batch_wait: Duration,
    /// Receive buffer (SO_RCVBUF) of each channel socket, in bytes.
    #[arg(long, env = "RELAY_SOCKET_RCVBUF", default_value_t = 2 << 20)]
    pub socket_rcvbuf: usize,
    /// How often the data plane publishes the snapshot /metrics serves.
    #[arg(long, env = "RELAY_PUBLISH_INTERVAL", default_value = "500ms", value_parser = parse_duration, allow_hyphen_values = true)]
    pub publish_interval: Duration,
}

/// A list of CPU cores, as `--cores` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreList(pub Vec<usize>);

/// Most shards a relay runs.
pub const MAX_SHARDS: usize = 256;

/// Parses `2-5`, `1,3,5`, `0-1,4`, `1,1` (order kept, repeats allowed).
///
/// # Errors
/// An empty list, a part that is not a core number or a rising range, or more than
/// [`MAX_SHARDS`] cores.
pub fn parse_cores(s: &str) -> Result<CoreList, String> {
    let mut cores = Vec::new();
    for part in s.split(',').map(str::trim) {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("{t:?} in {s:?} is not a core number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {part:?} in {s:?} runs backwards"));
                }
                if b - a >= MAX_SHARDS {
                    return Err(format!("range {part:?} is more than {MAX_SHARDS} cores"));
                }
                cores.extend(a..=b);
            }
            None => cores.push(num(part)?),
        }
        if cores.len() > MAX_SHARDS {
            return Err(format!("more than {MAX_SHARDS} cores"));
        }
    }
    Ok(CoreList(cores))
}

/// A flag whose value is out of range.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for --{flag}: {reason}")]
pub struct ConfigError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn bad(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        reason: reason.into(),
    }
}

/// io_uring sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Submission queue entries.
    pub sq_entries: u32,
    /// Provided receive buffers.
    pub buffers: u16,
    /// Completions a wait gathers.
    pub batch: usize,
    /// How long a wait holds for them.
    pub batch_wait: Duration,
}

/// The control protocol on TCP, behind mutual TLS.
#[derive(Clone, Debug)]
pub struct TcpControl {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The relay's side of the handshake.
    pub tls: std::sync::Arc<rustls::ServerConfig>,
}

/// Everything the relay needs, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// Control socket path.
    pub ctl: PathBuf,
    /// The control protocol on TCP with TLS, if asked for.
    pub ctl_listen: Option<TcpControl>,
    /// Who this relay is, as its `hello` replies say.
    pub identity: RelayIdentity,
    /// Metrics listen address.
    pub metrics: SocketAddr,
    /// One entry per shard: the core it is pinned to (`None`: not pinned).
    pub shards: Vec<Option<usize>>,
    /// I/O backend.
    pub backend: Backend,
    /// Where send times come from (as asked; the relay falls back to `user` where the kernel
    /// refuses).
    pub timestamps: Timestamps,
    /// How the io_uring backend collects transmit stamps.
    pub tx_stamps: TxStamps,
    /// Address channel sockets bind.
    pub bind: IpAddr,
    /// How packets reach the echo.
    pub echo_leg: EchoLeg,
    /// The core's settings.
    pub relay: RelayConfig,
    /// io_uring sizes.
    pub ring: RingConfig,
    /// SO_RCVBUF of each channel socket.
    pub socket_rcvbuf: usize,
    /// How often the data plane publishes metrics.
    pub publish_interval: Duration,
}

fn positive(flag: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(bad(flag, "must be greater than zero"))
    } else {
        Ok(d)
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, Self::Error> {
        if !a.sq_entries.is_power_of_two() || !(8..=32_768).contains(&a.sq_entries) {
            return Err(bad("sq-entries", "must be a power of two in 8..=32768"));
        }
        let buffers = u16::try_from(a.buffers)
            .ok()
            .filter(|b| b.is_power_of_two() && *b <= 1 << 15)
            .ok_or_else(|| bad("buffers", "must be a power of two in 1..=32768"))?;
        if a.max_channels == 0 || a.max_channels > 1 << 20 {
            return Err(bad("max-channels", "must be in 1..=1048576"));
        }
        if a.echo.port() == 0 || a.echo.ip().is_unspecified() {
            return Err(bad(
                "echo",
                format!("{} is not a usable destination", a.echo),
            ));
        }
        if a.socket_rcvbuf < 4096 {
            return Err(bad("socket-rcvbuf", "must be at least 4096"));
        }
        let shards: Vec<Option<usize>> = match (&a.cores, a.core) {
            (Some(list), _) => list.0.iter().copied().map(Some).collect(),
            (None, core) => vec![core],
        };
        if a.max_channels < u32::try_from(shards.len()).unwrap_or(u32::MAX) {
            return Err(bad(
                "max-channels",
                format!(
                    "{} is fewer than the {} shards",
                    a.max_channels,
                    shards.len()
                ),
            ));
        }
        let relay = RelayConfig {
            max_channels: a.max_channels,
            default_echo: a.echo,
            strict_source: a.strict,
            idle_timeout: positive("idle-timeout", a.idle_timeout)?,
            echo_timeout: positive("echo-timeout", a.echo_timeout)?,
            rtt_threshold: positive("rtt-threshold", a.rtt_threshold)?,
            lateness: relay_proto::timing::LatenessConfig {
                threshold: positive("late-threshold", a.late_threshold)?,
                ..Default::default()
            },
            ..RelayConfig::default()
        };
        relay
            .validate()
            .map_err(|e| bad("max-channels", e.to_string()))?;
        let ctl_listen = tcp_control(&a)?;
        let advertise = match a.advertise {
            Some(ip) if ip.is_unspecified() => {
                return Err(bad("advertise", "must be an address Asterisk can send to"))
            }
            Some(ip) => ip,
            None if a.bind.is_unspecified() && ctl_listen.is_some() => {
                return Err(bad(
                    "advertise",
                    format!("needed with --bind {}: say where Asterisk sends", a.bind),
                ))
            }
            None => a.bind,
        };
        let relay_id = match a.relay_id {
            Some(id) if id.trim().is_empty() || id.len() > 128 => {
                return Err(bad("relay-id", "must be 1 to 128 characters"))
            }
            Some(id) => id,
            None => host_name(),
        };
        Ok(Self {
            ctl: a.ctl,
            ctl_listen,
            identity: RelayIdentity {
                relay_id,
                advertise,
                capacity: a.max_channels,
            },
            metrics: a.metrics,
            shards,
            backend: a.backend,
            timestamps: a.timestamps,
            tx_stamps: a.tx_stamps,
            bind: a.bind,
            echo_leg: a.echo_leg,
            relay,
            ring: RingConfig {
                sq_entries: a.sq_entries,
                buffers,
                batch: match a.batch {
                    1..=256 => a.batch as usize,
                    _ => return Err(bad("batch", "must be in 1..=256")),
                },
                batch_wait: if a.batch_wait <= Duration::from_millis(10) {
                    a.batch_wait
                } else {
                    return Err(bad("batch-wait", "must be at most 10ms"));
                },
            },
            socket_rcvbuf: a.socket_rcvbuf,
            publish_interval: positive("publish-interval", a.publish_interval)?,
        })
    }
}

/// `--ctl-listen` with its TLS files, checked: the address, and each file loaded (a bad one is
/// named with its flag).
fn tcp_control(a: &Args) -> Result<Option<TcpControl>, ConfigError> {
    let files = [
        ("tls-cert", &a.tls_cert),
        ("tls-key", &a.tls_key),
        ("tls-client-ca", &a.tls_client_ca),
    ];
    let Some(listen) = &a.ctl_listen else {
        if let Some((flag, _)) = files.iter().find(|(_, f)| f.is_some()) {
            return Err(bad(flag, "only used with --ctl-listen"));
        }
        return Ok(None);
    };
    let addr = listen
        .strip_prefix("tcp://")
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .ok_or_else(|| bad("ctl-listen", format!("{listen:?} is not tcp://ADDR:PORT")))?;
    let [cert, key, ca] = files.map(|(flag, f)| {
        f.as_deref()
            .ok_or_else(|| bad(flag, "required with --ctl-listen (the control link is TLS)"))
    });
    let (cert, key, ca) = (cert?, key?, ca?);
    appkit::tls::certificates(cert).map_err(|e| bad("tls-cert", e.to_string()))?;
    appkit::tls::private_key(key).map_err(|e| bad("tls-key", e.to_string()))?;
    appkit::tls::certificates(ca).map_err(|e| bad("tls-client-ca", e.to_string()))?;
    let tls = appkit::tls::server_config(cert, key, ca).map_err(|e| {
        let flag = match e {
            appkit::tls::TlsError::BadCa { .. } => "tls-client-ca",
            _ => "tls-key",
        };
        bad(flag, e.to_string())
    })?;
    Ok(Some(TcpControl { addr, tls }))
}

/// This host's name, the default relay id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let a = Args::try_parse_from(std::iter::once("relay").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::try_from(a).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.backend, Backend::Uring);
        assert_eq!(c.timestamps, Timestamps::Kernel);
        assert_eq!(
            parse(&["--timestamps", "user"]).unwrap().timestamps,
            Timestamps::User
        );
        assert_eq!(c.metrics, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(c.relay.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.ring.buffers, 4096);
    }

    #[test]
    fn core_lists_give_one_shard_per_entry() {
        assert_eq!(parse(&[]).unwrap().shards, [None]);
        assert_eq!(parse(&["--core", "3"]).unwrap().shards, [Some(3)]);
        for (list, want) in [
            ("2-5", &[2, 3, 4, 5][..]),
            ("1,3,5", &[1, 3, 5]),
            ("0-1,4", &[0, 1, 4]),
            ("1,1", &[1, 1]),
            (" 0 , 1 ", &[0, 1]),
        ] {
            let got: Vec<usize> = parse(&["--cores", list])
                .unwrap()
                .shards
                .into_iter()
                .flatten()
                .collect();
            assert_eq!(got, want, "{list}");
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (&["--buffers", "1000"][..], "--buffers"),
            (&["--sq-entries", "3"], "--sq-entries"),
            (&["--max-channels", "0"], "--max-channels"),
            (&["--idle-timeout", "-1s"], "--idle-timeout"),
            (&["--idle-timeout", "0s"], "--idle-timeout"),
            (&["--rtt-threshold", "50 parsecs"], "--rtt-threshold"),
            (&["--echo", "127.0.0.1:0"], "--echo"),
            (&["--backend", "epoll"], "--backend"),
            (&["--timestamps", "gps"], "--timestamps"),
            (&["--bind", "not-an-ip"], "--bind"),
            (&["--publish-interval", "0ms"], "--publish-interval"),
            (&["--cores", ""], "--cores"),
            (&["--cores", "1,x"], "--cores"),
            (&["--cores", "3-1"], "--cores"),
            (&["--cores", "0-100000"], "--cores"),
            (&["--cores", "0,1", "--core", "1"], "--core"),
            (
                &["--cores", "0,1,2", "--max-channels", "2"],
                "--max-channels",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }
}
