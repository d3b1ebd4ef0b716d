//! Control's configuration, from flags or from the environment variables operators already use
//! (`ARI_URL`, `ARI_USER`, `ARI_PASS`, `APP_NAME`, `BIND_IP`, `PORT_RANGE`, `ECHO_HOST`,
//! `ECHO_PORT`, `METRICS_INTERVAL_SEC`, `MEDIA_FORMAT`, `RELAY_SOCKET`, `CONTROL_METRICS`);
//! `.env.example` at
//! the repository root documents each one.
//!
//! The ARI password is held in a [`Secret`], whose `Debug` and `Display` print `***`, so no log
//! line or error message can carry it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::relay_link::Endpoint;

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that needs it (the ARI request).
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Parses `21000-31000` (both ends included).
///
/// # Errors
/// Not two ports separated by `-`, or the first above the second, or port 0.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a range such as 21000-31000"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (lo, hi) = (port(a)?, port(b)?);
    if lo > hi {
        return Err(format!("{s:?}: the first port is above the second"));
    }
    Ok(lo..=hi)
}

/// Control's raw command line.
#[derive(Debug, Parser)]
#[command(
    name = "control",
    version,
    about = "Asterisk ARI control for rtp-relay: bridges each call to an externalMedia channel on the relay"
)]
pub struct Args {
    /// Asterisk's ARI base URL.
    #[arg(long, env = "ARI_URL", default_value = "http://127.0.0.1:8088")]
    pub ari_url: String,
    /// ARI user.
    #[arg(long, env = "ARI_USER", default_value = "asterisk")]
    pub ari_user: String,
    /// ARI password (never logged).
    #[arg(long, env = "ARI_PASS", hide_env_values = true)]
    pub ari_pass: Secret,
    /// Stasis application name.
    #[arg(long, env = "APP_NAME", default_value = "rtp-relay")]
    pub app_name: String,
    /// Address Asterisk reaches the relay's channel ports on (goes into external_host).
    #[arg(long, env = "BIND_IP", default_value = "127.0.0.1")]
    pub bind_ip: IpAddr,
    /// Relay ports for calls, e.g. 21000-31000.
    #[arg(long, env = "PORT_RANGE", default_value = "21000-31000", value_parser = parse_port_range)]
    pub port_range: RangeInclusive<u16>,
    /// Echo server host the relay forwards to.
    #[arg(long, env = "ECHO_HOST", default_value = "127.0.0.1")]
    pub echo_host: IpAddr,
    /// Echo server port.
    #[arg(long, env = "ECHO_PORT", default_value_t = 4000)]
    pub echo_port: u16,
    /// Media format of the externalMedia channels: `auto` (the caller's native format, where
    /// the relay measures it, so Asterisk transcodes nothing) or a fixed one (ulaw, alaw, g722,
    /// slin, slin16, opus); sets the RTP clock the relay measures with.
    #[arg(long, env = "MEDIA_FORMAT", default_value = "auto", value_parser = parse_media_format)]
    pub format: MediaFormat,
    /// With `--format auto`: the format used when the caller's native format is none the relay
    /// measures (the call is then transcoded by Asterisk, and counted).
    #[arg(long, env = "MEDIA_FALLBACK", default_value = "ulaw")]
    pub media_fallback: relay_proto::Format,
    /// Seconds between summary log lines (0: none).
    #[arg(long, env = "METRICS_INTERVAL_SEC", default_value_t = 10)]
    pub metrics_interval_sec: u64,
    /// The relay's control socket.
    #[arg(
        long,
        env = "RELAY_SOCKET",
        default_value = "/run/rtp-relay/relay.sock"
    )]
    pub relay_socket: PathBuf,
    /// A relay to place calls on, repeatable (or comma-separated in RELAY_URLS):
    /// `unix:///path` (this host, no TLS) or `tls://host:port` (another host, mutual TLS: needs
    /// --relay-ca, --relay-cert and --relay-key). Without any, the one relay at --relay-socket.
    #[arg(long = "relay", env = "RELAY_URLS", value_delimiter = ',')]
    pub relays: Vec<String>,
    /// How long a relay may be disconnected before its calls move to other relays (20ms, 1.5s;
    /// a bare number is seconds). A relay back within it (restarted at the same address) keeps
    /// its calls, re-added by the resync.
    #[arg(long, env = "RELAY_GRACE", default_value = "500ms", value_parser = appkit::flags::parse_duration)]
    pub relay_grace: Duration,
    /// How often each relay is asked for its channels' figures so far (`interim`): a relay's
    /// crash loses at most this much of a call's measurement, and the call record says how
    /// much.
    #[arg(long, env = "RELAY_INTERIM", default_value = "2s", value_parser = appkit::flags::parse_duration)]
    pub interim: Duration,
    /// The CA the relays' certificates are signed by (PEM), for `tls://` relays.
    #[arg(long, env = "RELAY_CA")]
    pub relay_ca: Option<PathBuf>,
    /// control's client certificate chain (PEM), for `tls://` relays.
    #[arg(long, env = "RELAY_CERT")]
    pub relay_cert: Option<PathBuf>,
    /// The private key of --relay-cert (PEM).
    #[arg(long, env = "RELAY_KEY")]
    pub relay_key: Option<PathBuf>,
    /// Control's metrics endpoint (/metrics, /healthz, /stats).
    #[arg(long, env = "CONTROL_METRICS", default_value = "127.0.0.1:9102")]
    pub metrics: SocketAddr,
    /// Append one JSON line per finished call to this file (unset or empty: no call log).
    #[arg(long, env = "CALL_LOG")]
    pub call_log: Option<String>,
}

/// How control picks the externalMedia channel's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaFormat {
    /// The caller's native format (`CHANNEL(audionativeformat)`), where the relay measures it.
    Auto,
    /// Always this one.
    Fixed(relay_proto::Format),
}

fn parse_media_format(s: &str) -> Result<MediaFormat, String> {
    if s == "auto" {
        return Ok(MediaFormat::Auto);
    }
    s.parse()
        .map(MediaFormat::Fixed)
        .map_err(|e| format!("{e}, or auto"))
}

/// The first format of Asterisk's `CHANNEL(audionativeformat)` value (`(slin192)`, `(ulaw|alaw)`)
/// that the relay measures; `None` when there is none.
#[must_use]
pub fn pick_native(value: &str) -> Option<relay_proto::Format> {
    value
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split('|')
        .find_map(|f| f.trim().parse().ok())
}

/// A setting out of range.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for --{flag}: {reason}")]
pub struct ConfigError {
    /// The flag.
    pub flag: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Control's validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// ARI base URL, without a trailing slash, `http` or `https`.
    pub ari_url: String,
    /// ARI user.
    pub ari_user: String,
    /// ARI password.
    pub ari_pass: Secret,
    /// Stasis application.
    pub app_name: String,
    /// external_host address.
    pub bind_ip: IpAddr,
    /// Relay ports.
    pub port_range: RangeInclusive<u16>,
    /// The echo server.
    pub echo: SocketAddr,
    /// externalMedia format, or `auto`.
    pub format: MediaFormat,
    /// The format `auto` falls back to.
    pub media_fallback: relay_proto::Format,
    /// Summary log interval; `None` for none.
    pub summary_interval: Option<Duration>,
    /// The relays calls are placed on (at least one).
    pub relays: Vec<Endpoint>,
    /// How long a relay may be disconnected before its calls move.
    pub relay_grace: Duration,
    /// How often each relay is asked for its channels' figures so far.
    pub interim: Duration,
    /// Metrics endpoint.
    pub metrics: SocketAddr,
    /// The call log, if any.
    pub call_log: Option<PathBuf>,
}

impl Config {
    /// The events WebSocket URL: `ws(s)://…/ari/events?app=APP&api_key=USER:PASS`. It contains
    /// the password: never log it.
    #[must_use]
    pub fn events_url(&self) -> String {
        let ws = self
            .ari_url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        format!(
            "{ws}/ari/events?app={}&api_key={}:{}&subscribeAll=false",
            self.app_name,
            self.ari_user,
            self.ari_pass.expose()
        )
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, Self::Error> {
        let bad = |flag, reason: String| ConfigError { flag, reason };
        let url = a.ari_url.trim_end_matches('/').to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad(
                "ari-url",
                format!("{url:?} must start with http:// or https://"),
            ));
        }
        if a.app_name.is_empty()
            || !a
                .app_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(
                "app-name",
                format!("{:?} must be letters, digits, - or _", a.app_name),
            ));
        }
        if a.ari_user.contains(':') {
            return Err(bad("ari-user", "must not contain ':'".into()));
        }
        if a.echo_port == 0 || a.echo_host.is_unspecified() {
            return Err(bad(
                "echo-port",
                "the echo server needs a real address and a port".into(),
            ));
        }
        if a.bind_ip.is_unspecified() {
            return Err(bad(
                "bind-ip",
                "Asterisk must be told a reachable address, not 0.0.0.0".into(),
            ));
        }
        Ok(Self {
            ari_url: url,
            ari_user: a.ari_user,
            ari_pass: a.ari_pass,
            app_name: a.app_name,
            bind_ip: a.bind_ip,
            port_range: a.port_range,
            echo: SocketAddr::new(a.echo_host, a.echo_port),
            format: a.format,
            media_fallback: a.media_fallback,
            summary_interval: (a.metrics_interval_sec > 0)
                .then(|| Duration::from_secs(a.metrics_interval_sec)),
            relays: relays(
                &a.relays,
                a.relay_socket,
                [&a.relay_ca, &a.relay_cert, &a.relay_key],
            )?,
            interim: if a.interim < Duration::from_millis(100)
                || a.interim > Duration::from_secs(60)
            {
                return Err(bad("interim", "must be in [100ms, 60s]".into()));
            } else {
                a.interim
            },
            relay_grace: if a.relay_grace.is_zero() || a.relay_grace > Duration::from_secs(60) {
                return Err(bad("relay-grace", "must be in (0, 60s]".into()));
            } else {
                a.relay_grace
            },
            metrics: a.metrics,
            call_log: a.call_log.filter(|p| !p.is_empty()).map(PathBuf::from),
        })
    }
}

/// `--relay` URLs as endpoints (the one `--relay-socket` without any), with the TLS client
/// configuration loaded once for the `tls://` ones.
fn relays(
    urls: &[String],
    socket: PathBuf,
    [ca, cert, key]: [&Option<PathBuf>; 3],
) -> Result<Vec<Endpoint>, ConfigError> {
    let bad = |flag, reason: String| ConfigError { flag, reason };
    // Empty values (an `.env` file's `RELAY_URLS=`) are unset.
    let urls: Vec<&String> = urls.iter().filter(|u| !u.trim().is_empty()).collect();
    let set = |f: &Option<PathBuf>| f.clone().filter(|p| !p.as_os_str().is_empty());
    let (ca, cert, key) = (&set(ca), &set(cert), &set(key));
    let files = [("relay-ca", ca), ("relay-cert", cert), ("relay-key", key)];
    let needs_tls = urls.iter().any(|u| u.starts_with("tls://"));
    if !needs_tls {
        if let Some((flag, _)) = files.iter().find(|(_, f)| f.is_some()) {
            return Err(bad(flag, "only used with a tls:// --relay".into()));
        }
    }
    let tls = if needs_tls {
        let [ca, cert, key] = files.map(|(flag, f)| {
            f.as_deref()
                .ok_or_else(|| bad(flag, "required with a tls:// --relay".into()))
        });
        let (ca, cert, key) = (ca?, cert?, key?);
        appkit::tls::certificates(ca).map_err(|e| bad("relay-ca", e.to_string()))?;
        appkit::tls::certificates(cert).map_err(|e| bad("relay-cert", e.to_string()))?;
        appkit::tls::private_key(key).map_err(|e| bad("relay-key", e.to_string()))?;
        Some(
            appkit::tls::client_config(ca, cert, key)
                .map_err(|e| bad("relay-key", e.to_string()))?,
        )
    } else {
        None
    };
    if urls.is_empty() {
        return Ok(vec![Endpoint::Unix(socket)]);
    }
    let mut out: Vec<Endpoint> = Vec::with_capacity(urls.len());
    for url in urls {
        let e = if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "relay",
                    format!("{url:?}: a unix:// URL takes an absolute path"),
                ));
            }
            Endpoint::Unix(PathBuf::from(path))
        } else if let Some(rest) = url.strip_prefix("tls://") {
            let (host, port) = rest
                .rsplit_once(':')
                .and_then(|(h, p)| {
                    Some((
                        h.trim_start_matches('[').trim_end_matches(']'),
                        p.parse::<u16>().ok()?,
                    ))
                })
                .filter(|(h, p)| !h.is_empty() && *p > 0)
                .ok_or_else(|| bad("relay", format!("{url:?} is not tls://HOST:PORT")))?;
            appkit::tls::server_name(host).map_err(|e| bad("relay", format!("{url:?}: {e}")))?;
            Endpoint::Tls {
                host: host.to_owned(),
                port,
                config: tls
                    .clone()
                    .unwrap_or_else(|| unreachable!("loaded for tls:// URLs")),
            }
        } else {
            return Err(bad(
                "relay",
                format!("{url:?} is neither unix:///PATH nor tls://HOST:PORT"),
            ));
        };
        if out.iter().any(|o| o.to_string() == e.to_string()) {
            return Err(bad("relay", format!("{url:?} is given twice")));
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_call_log_is_off_unless_given() {
        assert_eq!(parse(&["--ari-pass", "x"]).unwrap().call_log, None);
        let c = parse(&["--ari-pass", "x", "--call-log", "/tmp/calls.jsonl"]).unwrap();
        assert_eq!(
            c.call_log.as_deref(),
            Some(std::path::Path::new("/tmp/calls.jsonl"))
        );
    }

    #[test]
    fn media_format_is_auto_by_default_or_fixed() {
        let c = parse(&["--ari-pass", "x"]).unwrap();
        assert_eq!(c.format, MediaFormat::Auto);
        assert_eq!(c.media_fallback, relay_proto::Format::Ulaw);
        let c = parse(&[
            "--ari-pass",
            "x",
            "--format",
            "alaw",
            "--media-fallback",
            "slin16",
        ])
        .unwrap();
        assert_eq!(c.format, MediaFormat::Fixed(relay_proto::Format::Alaw));
        assert_eq!(c.media_fallback, relay_proto::Format::Slin16);
        let e = parse(&["--ari-pass", "x", "--format", "gsm"]).unwrap_err();
        assert!(e.contains("--format") && e.contains("auto"), "{e}");
    }

    #[test]
    fn the_first_measured_native_format_is_picked() {
        use relay_proto::Format;
        assert_eq!(pick_native("(ulaw)"), Some(Format::Ulaw));
        assert_eq!(pick_native("(slin192)"), None);
        assert_eq!(pick_native("(slin192|alaw)"), Some(Format::Alaw));
        assert_eq!(pick_native("(ulaw|alaw)"), Some(Format::Ulaw));
        assert_eq!(pick_native("(opus)"), Some(Format::Opus));
        assert_eq!(pick_native(""), None);
        assert_eq!(pick_native("()"), None);
    }

    fn parse(args: &[&str]) -> Result<Config, String> {
        let a = Args::try_parse_from(std::iter::once("control").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::try_from(a).map_err(|e| e.to_string())
    }

    #[test]
    fn relays_are_the_socket_alone_or_the_urls_given() {
        let c = parse(&["--ari-pass", "x", "--relay-socket", "/tmp/r.sock"]).unwrap();
        assert_eq!(
            c.relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["unix:///tmp/r.sock"]
        );
        let dir = testkit::TempDir::new("control-config");
        let pki = testkit::pki::Pki::new(dir.path(), &[]);
        let (ca, cert, key) = (
            pki.ca.display().to_string(),
            pki.control.cert.display().to_string(),
            pki.control.key.display().to_string(),
        );
        let tls = [
            "--relay-ca",
            &ca,
            "--relay-cert",
            &cert,
            "--relay-key",
            &key,
        ];
        let c = parse(
            &[
                &[
                    "--ari-pass",
                    "x",
                    "--relay",
                    "tls://relay-a:7000,tls://[fd00::2]:7000",
                ][..],
                &["--relay", "unix:///run/r.sock"],
                &tls,
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            c.relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "tls://relay-a:7000",
                "tls://[fd00::2]:7000",
                "unix:///run/r.sock"
            ]
        );
        let missing = dir.path().join("missing.pem").display().to_string();
        for (args, flag) in [
            (vec!["--relay", "relay-a:7000"], "--relay"),
            (vec!["--relay", "tls://relay-a"], "--relay"),
            (vec!["--relay", "unix://relative.sock"], "--relay"),
            (vec!["--relay", "unix:///a.sock,unix:///a.sock"], "--relay"),
            (
                vec![
                    "--relay",
                    "tls://relay-a:7000",
                    "--relay-cert",
                    &cert,
                    "--relay-key",
                    &key,
                ],
                "--relay-ca",
            ),
            (
                vec![
                    "--relay",
                    "tls://relay-a:7000",
                    "--relay-ca",
                    &ca,
                    "--relay-key",
                    &key,
                ],
                "--relay-cert",
            ),
            (
                vec![
                    "--relay",
                    "tls://relay-a:7000",
                    "--relay-ca",
                    &ca,
                    "--relay-cert",
                    &cert,
                ],
                "--relay-key",
            ),
            (
                vec![
                    "--relay",
                    "tls://relay-a:7000",
                    "--relay-ca",
                    &missing,
                    "--relay-cert",
                    &cert,
                    "--relay-key",
                    &key,
                ],
                "--relay-ca",
            ),
            (
                vec![
                    "--relay",
                    "tls://relay-a:7000",
                    "--relay-ca",
                    &ca,
                    "--relay-cert",
                    &missing,
                    "--relay-key",
                    &key,
                ],
                "--relay-cert",
            ),
            (vec!["--relay-ca", &ca], "--relay-ca"),
        ] {
            let e = parse(&[&["--ari-pass", "x"][..], &args].concat()).unwrap_err();
            assert!(e.contains(flag), "{args:?} should name {flag}: {e}");
        }
        // An empty URL (as `RELAY_URLS=,` leaves one) is none.
        let c = parse(&["--ari-pass", "x", "--relay", ""]).unwrap();
        assert_eq!(c.relays.len(), 1);
    }

    #[test]
    fn port_ranges_parse_and_bad_ones_are_named() {
        assert_eq!(parse_port_range("21000-31000"), Ok(21_000..=31_000));
        assert_eq!(parse_port_range("5-5"), Ok(5..=5));
        for bad in ["21000", "0-10", "10-5", "a-b", "1-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_password_is_never_printed() {
        let c = parse(&["--ari-pass", "hunter2"]).unwrap();
        let shown = format!("{c:?} {}", c.ari_pass);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(c.ari_pass.expose(), "hunter2");
        assert_eq!(
            c.events_url(),
            "ws://127.0.0.1:8088/ari/events?app=rtp-relay&api_key=asterisk:hunter2&subscribeAll=false"
        );
    }

    #[test]
    fn env_example_documents_every_variable() {
        use clap::CommandFactory;
        let example = include_str!("../../.env.example");
        let names: Vec<String> = Args::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        assert!(names.len() >= 12, "{names:?}");
        for name in names {
            assert!(
                example.lines().any(|l| l.starts_with(&format!("{name}="))),
                "{name} is missing from .env.example"
            );
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (
                &["--ari-pass", "x", "--ari-url", "ftp://x"][..],
                "--ari-url",
            ),
            (&["--ari-pass", "x", "--port-range", "9-1"], "--port-range"),
            (&["--ari-pass", "x", "--app-name", "a b"], "--app-name"),
            (&["--ari-pass", "x", "--bind-ip", "0.0.0.0"], "--bind-ip"),
            (&[], "--ari-pass"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }
}
