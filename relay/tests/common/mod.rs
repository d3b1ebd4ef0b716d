//! Runs the relay binary as a user would, with test sockets playing Asterisk and the echo.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use relay_proto::control::{AddChannel, Hello, RemoveChannel, StatsQuery};
use relay_proto::rtp::RtpHeader;
use relay_proto::{ChannelId, ChannelStats, Format, GlobalStats, Reply, Request, Response, Ssrc};

pub const BACKENDS: [&str; 2] = ["uring", "tokio"];

pub use testkit::{recv, wait_for};

/// Whether this backend can run here; says why not, loudly, when it cannot.
pub fn available(backend: &str) -> bool {
    backend != "uring" || testkit::uring_available()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running relay process.
pub struct RelayProc {
    /// Killed and reaped on drop.
    pub child: testkit::Proc,
    pub ctl: PathBuf,
    pub metrics: SocketAddr,
    pub backend: String,
    /// Every line the relay has logged so far.
    pub log: testkit::Log,
}

impl RelayProc {
    pub fn start(backend: &str, extra: &[&str]) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ctl =
            std::env::temp_dir().join(format!("rtp-relay-test-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&ctl);
        Self::start_at(backend, ctl, extra)
    }

    /// Starts a relay whose control socket is `ctl` (an existing file there is its business).
    pub fn start_at(backend: &str, ctl: PathBuf, extra: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args([
                "--backend",
                backend,
                "--metrics",
                "127.0.0.1:0",
                "--publish-interval",
                "50ms",
            ])
            .arg("--ctl")
            .arg(&ctl)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("relay starts");
        // Held by its guard before anything can panic, so no relay outlives its test.
        let mut child = testkit::Proc(child);
        // The ready line names the metrics endpoint: metrics=http://ADDR/metrics.
        let log = testkit::Log::default();
        let url = testkit::ready_value_logged(
            &mut child.0,
            "relay",
            "relay ready",
            "metrics",
            Some(log.clone()),
        );
        let metrics = url
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .parse()
            .unwrap_or_else(|e| panic!("metrics address in {url:?}: {e}"));
        Self {
            child,
            ctl,
            metrics,
            backend: backend.into(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Open descriptors of the relay process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Resident memory of the relay process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn client(&self) -> Ctl {
        Ctl::connect(&self.ctl)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let status = wait_for("the relay to exit", Duration::from_secs(10), || {
            self.child.0.try_wait().unwrap()
        });
        std::mem::forget(self);
        status
    }

    /// GET `path` from the metrics endpoint.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(self.metrics).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut s, &mut body).unwrap();
        let status = body[9..12].parse().unwrap();
        let body = body
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// A metric's value from `/metrics` (the sum over its label sets matching `labels`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, text) = self.http_get("/metrics");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.starts_with(name)
                    && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{'))
            })
            .filter(|l| l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ctl);
    }
}

/// A control connection.
pub struct Ctl {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Ctl {
    pub fn connect(path: &PathBuf) -> Self {
        let stream = UnixStream::connect(path).expect("control socket accepts");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = Self {
            stream,
            reader,
            next_id: 1,
        };
        let r = c.request(relay_proto::Command::Hello(Hello {
            version: relay_proto::control::PROTOCOL_VERSION,
            client: Some("test".into()),
        }));
        assert!(matches!(r, Ok(Response::Hello { .. })), "{r:?}");
        c
    }

    pub fn send_line(&mut self, line: &[u8]) {
        self.stream.write_all(line).unwrap();
    }

    pub fn read_reply(&mut self) -> Reply {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a reply line");
        Reply::decode(line.as_bytes()).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }

    pub fn request(
        &mut self,
        command: relay_proto::Command,
    ) -> Result<Response, relay_proto::ErrorReply> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_line(
            Request {
                id: Some(id),
                command,
            }
            .encode()
            .as_bytes(),
        );
        let r = self.read_reply();
        assert_eq!(r.id, Some(id));
        r.outcome
    }

    /// Adds a channel on any port; returns the port.
    pub fn add(&mut self, channel: &str, asterisk: Option<SocketAddr>, echo: SocketAddr) -> u16 {
        self.add_on(channel, asterisk, echo).0
    }

    /// Adds a channel on any port; returns the port and the shard that took it.
    pub fn add_on(
        &mut self,
        channel: &str,
        asterisk: Option<SocketAddr>,
        echo: SocketAddr,
    ) -> (u16, u32) {
        match self.request(relay_proto::Command::Add(AddChannel {
            channel: ChannelId::try_from(channel).unwrap(),
            port: 0,
            asterisk,
            echo: Some(echo),
            format: Format::Ulaw,
        })) {
            Ok(Response::Added { port, shard, .. }) => (port, shard),
            other => panic!("add {channel}: {other:?}"),
        }
    }

    pub fn remove(&mut self, channel: &str) -> ChannelStats {
        match self.request(relay_proto::Command::Remove(RemoveChannel {
            channel: ChannelId::try_from(channel).unwrap(),
        })) {
            Ok(Response::Removed { stats, .. }) => *stats,
            other => panic!("remove {channel}: {other:?}"),
        }
    }

    pub fn channel_stats(&mut self, channel: &str) -> ChannelStats {
        match self.request(relay_proto::Command::Stats(StatsQuery {
            channel: Some(ChannelId::try_from(channel).unwrap()),
        })) {
            Ok(Response::Channel { stats }) => *stats,
            other => panic!("stats {channel}: {other:?}"),
        }
    }

    pub fn global(&mut self) -> GlobalStats {
        match self.request(relay_proto::Command::Stats(StatsQuery { channel: None })) {
            Ok(Response::Global { stats }) => *stats,
            other => panic!("stats: {other:?}"),
        }
    }
}

/// A relay with one channel "c1" between a test socket playing Asterisk and one playing the echo.
pub struct OneChannel {
    pub relay: RelayProc,
    pub ctl: Ctl,
    pub ast: UdpSocket,
    pub echo: UdpSocket,
    /// The channel's port on the relay.
    pub to: SocketAddr,
}

impl OneChannel {
    pub fn start(backend: &str, extra: &[&str]) -> Self {
        let relay = RelayProc::start(backend, extra);
        let mut ctl = relay.client();
        let (ast, echo) = (udp(), udp());
        let port = ctl.add(
            "c1",
            Some(ast.local_addr().unwrap()),
            echo.local_addr().unwrap(),
        );
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            relay,
            ctl,
            ast,
            echo,
            to,
        }
    }

    /// Sends `packet` from Asterisk, echoes it, receives it back; asserts it arrives intact at
    /// both ends and always comes from the channel's own port.
    pub fn round_trip(&self, packet: &[u8]) {
        let mut buf = [0u8; 2048];
        self.ast.send_to(packet, self.to).unwrap();
        let (n, src) = recv(&self.echo, &mut buf).unwrap();
        assert_eq!(&buf[..n], packet, "reaches the echo byte-identical");
        assert_eq!(src, self.to, "from the channel's own port");
        self.echo.send_to(&buf[..n], src).unwrap();
        let (n, src) = recv(&self.ast, &mut buf).unwrap();
        assert_eq!(&buf[..n], packet, "returns to Asterisk byte-identical");
        assert_eq!(src, self.to, "from exactly the address Asterisk sent to");
    }
}

/// A UDP socket on loopback with a large receive buffer and a read timeout.
pub fn udp() -> UdpSocket {
    let s = relay_io::bind_udp([127, 0, 0, 1].into(), 0, 8 << 20).unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// An RTP packet of 172 bytes whose payload encodes its sequence number.
pub fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut b = vec![0u8; 172];
    RtpHeader {
        marker: false,
        payload_type: 0,
        sequence: seq,
        timestamp: 160 * u32::from(seq),
        ssrc: Ssrc(ssrc),
    }
    .write(&mut b)
    .unwrap();
    for (i, x) in b[12..].iter_mut().enumerate() {
        *x = (seq as usize + i) as u8;
    }
    b
}
