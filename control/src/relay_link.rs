//! Control's connection to one relay's control protocol, on its Unix socket or over TLS to a
//! relay on another host ([`Endpoint`]): requests from any number of call tasks are pipelined on
//! one connection and matched to replies by id, so 200 calls setting up at once do not wait on
//! each other. The `hello` reply tells the link who the relay is ([`RelayIdentity`]); a relay
//! speaking another protocol version is refused, and the log names both versions.
//!
//! The link remembers every channel it added (port, Asterisk's address, echo). When the socket
//! goes away it reconnects with backoff, and then resyncs: channels the relay does not have are
//! re-added (a restarted relay), and relay channels with control's prefix that no call owns are
//! removed (a previous control's leftovers). While disconnected, requests fail at once rather than
//! queue, so a call set-up fails cleanly (and unwinds) instead of hanging.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use relay_proto::control::{
    AddChannel, Frame, Hello, LineDecoder, RelayIdentity, RemoveChannel, StatsQuery, UpdateChannel,
    PROTOCOL_VERSION,
};
use relay_proto::figures::ChannelFigures;
use relay_proto::{
    ChannelId, ChannelStats, Command, Format, GlobalStats, Reply, Request, Response,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::ari::EXTERNAL_MEDIA_PREFIX;
use crate::metrics::Metrics;

/// A relay request that failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The relay is not connected (or the connection dropped before the reply).
    #[error("the relay is not connected")]
    Disconnected,
    /// The relay refused the request.
    #[error("the relay refused `{command}`: {message}")]
    Refused {
        /// The command.
        command: &'static str,
        /// The relay's error.
        message: String,
    },
    /// A reply of the wrong kind.
    #[error("unexpected reply to `{0}`")]
    Unexpected(&'static str),
    /// No relay of the pool is connected with room for another channel.
    #[error("no relay is connected with room for another channel")]
    NoRelay,
}

/// What the link re-adds on a resync.
#[derive(Clone, Copy, Debug)]
struct Spec {
    port: u16,
    asterisk: Option<SocketAddr>,
    echo: SocketAddr,
    format: Format,
}

/// Where a reply goes.
type ReplyTo = oneshot::Sender<Result<Response, RelayError>>;
type Pending = (Command, ReplyTo);

/// How long a resync keeps retrying a channel the relay refuses (a port not yet released).
const RESYNC_RETRY: Duration = Duration::from_secs(5);

/// Where a relay's control protocol is reached.
#[derive(Clone)]
pub enum Endpoint {
    /// Its Unix socket, on this host (`unix:///path`): no TLS.
    Unix(PathBuf),
    /// TCP to a relay on another host (`tls://host:port`), behind mutual TLS: the relay's
    /// certificate must name `host` and be signed by the CA of `config`, which also holds
    /// control's own certificate.
    Tls {
        /// The relay's host name or address, as its certificate names it.
        host: String,
        /// Its port.
        port: u16,
        /// control's side of the handshake.
        config: Arc<rustls::ClientConfig>,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Tls { host, port, .. } if host.contains(':') => {
                write!(f, "tls://[{host}]:{port}")
            }
            Self::Tls { host, port, .. } => write!(f, "tls://{host}:{port}"),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The two halves of a connection, whatever carries it.
type Halves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

impl Endpoint {
    /// Connects (and for TLS, completes the handshake, bounded by [`CONNECT_TIMEOUT`]).
    async fn connect(&self) -> std::io::Result<Halves> {
        match self {
            Self::Unix(path) => {
                let (r, w) = UnixStream::connect(path).await?.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Self::Tls { host, port, config } => {
                let name = appkit::tls::server_name(host).map_err(std::io::Error::other)?;
                let connect = async {
                    let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                    tcp.set_nodelay(true)?;
                    appkit::tls::TlsConnector::from(Arc::clone(config))
                        .connect(name, tcp)
                        .await
                };
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                let (r, w) = tokio::io::split(tls);
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }

    /// How long to wait before reconnecting: a Unix socket that is not there costs
    /// microseconds, so it is retried often (a restarted relay is reached within tens of
    /// milliseconds of listening); a remote relay a little less often.
    fn backoff(&self) -> Backoff {
        match self {
            Self::Unix(_) => Backoff::new(Duration::from_millis(5), Duration::from_millis(20)),
            Self::Tls { .. } => Backoff::new(Duration::from_millis(20), Duration::from_millis(250)),
        }
    }
}

/// How long a TCP connection and its TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the link knows of its relay right now.
#[derive(Debug)]
struct LinkState {
    /// Connected and resynced (watched by calls waiting to learn that their relay is lost).
    connected: watch::Sender<bool>,
    /// What its last `hello` reply said.
    identity: Option<RelayIdentity>,
}

impl Default for LinkState {
    fn default() -> Self {
        Self {
            connected: watch::Sender::new(false),
            identity: None,
        }
    }
}

/// A handle on the link (cheap to clone).
#[derive(Clone, Debug)]
pub struct RelayLink {
    tx: mpsc::UnboundedSender<Pending>,
    channels: Arc<Mutex<HashMap<ChannelId, Spec>>>,
    state: Arc<Mutex<LinkState>>,
    endpoint: Arc<Endpoint>,
    /// What the relay measured of each channel so far.
    figures: Arc<Mutex<Figures>>,
}

/// What a relay measured of control's channels, kept until each channel ends.
#[derive(Debug, Default)]
struct Figures {
    /// Each channel's latest interim figures (`interim`, every `--interim`).
    latest: HashMap<ChannelId, ChannelFigures>,
    /// The figures of a channel's earlier lives on this relay: the last interim figures before
    /// the relay restarted and the resync re-added the channel from zero.
    banked: HashMap<ChannelId, Vec<ChannelFigures>>,
}

impl Figures {
    /// Everything kept of `id` (earlier lives, then the latest), forgotten.
    fn take(&mut self, id: &ChannelId) -> Vec<ChannelFigures> {
        let mut all = self.banked.remove(id).unwrap_or_default();
        all.extend(self.latest.remove(id));
        all
    }
}

/// A channel's end on the relay: its final statistics and, from a relay that sends them, the
/// same in mergeable form.
#[derive(Clone, Debug)]
pub struct Removed {
    /// Final statistics.
    pub stats: ChannelStats,
    /// Mergeable figures: the channel's earlier lives on this relay (before a restart the
    /// resync recovered from), then its final ones.
    pub figures: Vec<ChannelFigures>,
}

impl RelayLink {
    /// Starts the link's task, which connects to `endpoint` and keeps reconnecting, and asks
    /// the relay for its channels' figures every `interim`.
    #[must_use]
    pub fn spawn(endpoint: Endpoint, interim: Duration, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let channels = Arc::new(Mutex::new(HashMap::new()));
        let state = Arc::new(Mutex::new(LinkState::default()));
        let figures = Arc::new(Mutex::new(Figures::default()));
        let endpoint = Arc::new(endpoint);
        tokio::spawn(run(
            Arc::clone(&endpoint),
            rx,
            Arc::clone(&channels),
            Arc::clone(&state),
            Arc::clone(&figures),
            metrics,
        ));
        let link = Self {
            tx,
            channels,
            state,
            endpoint,
            figures,
        };
        tokio::spawn(poll_interim(link.clone(), interim));
        link
    }

    /// Where the relay is reached.
    #[must_use]
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether the link is connected to its relay (and has resynced).
    #[must_use]
    pub fn is_connected(&self) -> bool {
        *lock(&self.state).connected.borrow()
    }

    /// Resolves once the link is connected (at once if it is).
    pub async fn connected(&self) {
        let mut connected = lock(&self.state).connected.subscribe();
        let _ = connected.wait_for(|c| *c).await;
    }

    /// Resolves once the relay is lost: disconnected, and not connected again within `grace`.
    /// A disconnection shorter than `grace` (a relay restarted at the same address, resynced)
    /// is not a loss.
    pub async fn lost(&self, grace: Duration) {
        let mut connected = lock(&self.state).connected.subscribe();
        loop {
            if connected.wait_for(|c| !*c).await.is_err() {
                return; // the link is gone
            }
            match tokio::time::timeout(grace, connected.wait_for(|c| *c)).await {
                Ok(Ok(_)) => {}                // back in time
                Ok(Err(_)) | Err(_) => return, // lost
            }
        }
    }

    /// Forgets channel `id` without telling the relay (see
    /// [`crate::calls::RelayOps::abandon`]); what the relay measured of it: its latest interim
    /// figures (after those of any earlier life on this relay).
    pub fn forget(&self, id: &ChannelId) -> Vec<ChannelFigures> {
        self.channels().remove(id);
        lock(&self.figures).take(id)
    }

    /// Asks the relay for every channel's figures so far and keeps those of control's channels.
    async fn refresh_interim(&self) -> Result<(), RelayError> {
        match self.request(Command::Interim).await? {
            Response::Interim { channels } => {
                let held = self.channels();
                let mut figures = lock(&self.figures);
                for f in channels {
                    if held.contains_key(&f.channel) {
                        figures.latest.insert(f.channel.clone(), f);
                    }
                }
                figures.latest.retain(|id, _| held.contains_key(id));
                figures.banked.retain(|id, _| held.contains_key(id));
                Ok(())
            }
            _ => Err(RelayError::Unexpected("interim")),
        }
    }

    /// Who the relay said it is, at its last `hello` (kept while disconnected).
    #[must_use]
    pub fn identity(&self) -> Option<RelayIdentity> {
        lock(&self.state).identity.clone()
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<ChannelId, Spec>> {
        lock(&self.channels)
    }

    async fn request(&self, command: Command) -> Result<Response, RelayError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((command, tx))
            .map_err(|_| RelayError::Disconnected)?;
        rx.await.unwrap_or(Err(RelayError::Disconnected))
    }

    /// Opens a channel on `port` forwarding to `echo`; Asterisk's address comes later.
    ///
    /// # Errors
    /// See [`RelayError`].
    pub async fn add(
        &self,
        id: &ChannelId,
        port: u16,
        echo: SocketAddr,
        format: Format,
    ) -> Result<(), RelayError> {
        match self
            .request(Command::Add(AddChannel {
                channel: id.clone(),
                port,
                asterisk: None,
                echo: Some(echo),
                format,
            }))
            .await?
        {
            Response::Added { .. } => {
                self.channels().insert(
                    id.clone(),
                    Spec {
                        port,
                        asterisk: None,
                        echo,
                        format,
                    },
                );
                Ok(())
            }
            _ => Err(RelayError::Unexpected("add")),
        }
    }

    /// Tells the relay where Asterisk sends this channel's RTP from.
    ///
    /// # Errors
    /// See [`RelayError`].
    pub async fn update(&self, id: &ChannelId, asterisk: SocketAddr) -> Result<(), RelayError> {
        if let Some(s) = self.channels().get_mut(id) {
            s.asterisk = Some(asterisk);
        }
        match self
            .request(Command::Update(UpdateChannel {
                channel: id.clone(),
                asterisk,
            }))
            .await?
        {
            Response::Updated { .. } => Ok(()),
            _ => Err(RelayError::Unexpected("update")),
        }
    }

    /// Closes a channel; its final statistics when the relay had it.
    ///
    /// # Errors
    /// See [`RelayError`]. The link forgets the channel either way, so a resync will not
    /// re-add it and will remove it if the relay still has it.
    pub async fn remove(&self, id: &ChannelId) -> Result<Removed, RelayError> {
        self.channels().remove(id);
        let mut earlier = lock(&self.figures).banked.remove(id).unwrap_or_default();
        lock(&self.figures).latest.remove(id);
        match self
            .request(Command::Remove(RemoveChannel {
                channel: id.clone(),
            }))
            .await?
        {
            Response::Removed { stats, figures } => {
                earlier.extend(figures.map(|f| *f));
                Ok(Removed {
                    stats: *stats,
                    figures: earlier,
                })
            }
            _ => Err(RelayError::Unexpected("remove")),
        }
    }

    /// The relay's global statistics.
    ///
    /// # Errors
    /// See [`RelayError`].
    pub async fn global(&self) -> Result<GlobalStats, RelayError> {
        match self
            .request(Command::Stats(StatsQuery { channel: None }))
            .await?
        {
            Response::Global { stats } => Ok(*stats),
            _ => Err(RelayError::Unexpected("stats")),
        }
    }

    /// Channels the link holds on the relay.
    #[must_use]
    pub fn len(&self) -> usize {
        self.channels().len()
    }

    /// Whether the link holds no channel.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every `every`, while connected, refreshes the link's interim figures.
async fn poll_interim(link: RelayLink, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if link.is_connected() && !link.is_empty() {
            if let Err(e) = link.refresh_interim().await {
                tracing::debug!(relay = %link.endpoint, "interim: {e}");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Longest reply line accepted (a `list` of every channel is one line).
const MAX_REPLY: usize = 64 * 1024 * 1024;

/// One connection's state. Reading is cancel-safe (the partial line lives here, not in a
/// future), because [`serve`] waits on replies and new requests at once.
struct Conn {
    write: Box<dyn AsyncWrite + Send + Unpin>,
    read: Box<dyn AsyncRead + Send + Unpin>,
    decoder: LineDecoder,
    lines: std::collections::VecDeque<Frame>,
    chunk: Vec<u8>,
    next_id: u64,
}

/// Why a connection was not made.
#[derive(Debug)]
enum ConnectError {
    /// The transport (socket, TCP, TLS) failed.
    Io(std::io::Error),
    /// The relay refused the handshake or answered it wrongly (another protocol version).
    Refused(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Refused(m) => write!(f, "refused: {m}"),
        }
    }
}

impl Conn {
    /// Connects and says hello; the relay's identity.
    async fn connect(endpoint: &Endpoint) -> Result<(Self, Option<RelayIdentity>), ConnectError> {
        let (read, write) = endpoint.connect().await.map_err(ConnectError::Io)?;
        let mut c = Self {
            write,
            read,
            decoder: LineDecoder::new(MAX_REPLY),
            lines: std::collections::VecDeque::new(),
            chunk: vec![0; 64 * 1024],
            next_id: 1,
        };
        let hello = c
            .call(Command::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: Some(concat!("control ", env!("CARGO_PKG_VERSION")).into()),
            }))
            .await
            .map_err(ConnectError::Io)?;
        match hello {
            Ok(Response::Hello {
                version, identity, ..
            }) if version == PROTOCOL_VERSION => Ok((c, identity)),
            Ok(Response::Hello { version, .. }) => Err(ConnectError::Refused(format!(
                "the relay speaks protocol version {version}, control speaks {PROTOCOL_VERSION}"
            ))),
            Ok(other) => Err(ConnectError::Refused(format!(
                "unexpected reply to hello: {other:?}"
            ))),
            // The relay's own message names both versions (version_mismatch).
            Err(e) => Err(ConnectError::Refused(e)),
        }
    }

    async fn send(&mut self, command: Command) -> std::io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let line = Request {
            id: Some(id),
            command,
        }
        .encode();
        self.write.write_all(line.as_bytes()).await?;
        self.write.flush().await?;
        Ok(id)
    }

    /// The next reply. Cancel-safe: `read` consumes nothing when it does not complete.
    async fn reply(&mut self) -> std::io::Result<Reply> {
        loop {
            match self.lines.pop_front() {
                Some(Frame::Line(line)) => {
                    return Reply::decode(&line).map_err(std::io::Error::other)
                }
                Some(Frame::TooLong) => {
                    return Err(std::io::Error::other("a reply line exceeds 64 MiB"))
                }
                None => {}
            }
            let n = self.read.read(&mut self.chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let mut frames = Vec::new();
            self.decoder
                .push(self.chunk.get(..n).unwrap_or_default(), &mut frames);
            self.lines.extend(frames);
        }
    }

    /// One request, waiting for its reply (only while nothing else is in flight).
    async fn call(&mut self, command: Command) -> std::io::Result<Result<Response, String>> {
        self.send(command).await?;
        let reply = self.reply().await?;
        Ok(reply.outcome.map_err(|e| e.to_string()))
    }
}

async fn run(
    endpoint: Arc<Endpoint>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    channels: Arc<Mutex<HashMap<ChannelId, Spec>>>,
    state: Arc<Mutex<LinkState>>,
    figures: Arc<Mutex<Figures>>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = endpoint.backoff();
    let name = endpoint.to_string();
    let relay_state = |connected: bool| {
        for (state, on) in [("connected", connected), ("disconnected", !connected)] {
            metrics
                .relays
                .with_label_values(&[name.as_str(), state])
                .set(i64::from(on));
        }
    };
    relay_state(false);
    let mut connected_before = false;
    let mut last_refusal = None;
    loop {
        let conn = Conn::connect(&endpoint).await;
        let mut conn = match conn {
            Ok((c, identity)) => {
                lock(&state).identity = identity;
                c
            }
            Err(ConnectError::Refused(m)) => {
                // Said once per distinct refusal, not at every retry.
                if last_refusal.as_ref() != Some(&m) {
                    tracing::error!(relay = %endpoint, "the relay was refused: {m}");
                    last_refusal = Some(m);
                }
                if !wait_failing(&mut rx, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                if !connected_before {
                    tracing::debug!(relay = %endpoint, "{e}");
                }
                if !wait_failing(&mut rx, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        match resync(&mut conn, &channels, &figures).await {
            Ok((readded, removed)) => {
                backoff.reset();
                if connected_before {
                    metrics.relay_resyncs.inc();
                }
                metrics.relay_readded.inc_by(readded);
                metrics
                    .reconciled
                    .with_label_values(&["relay_channel"])
                    .inc_by(removed);
                tracing::info!(readded, removed, relay = %endpoint, "connected to the relay");
            }
            Err(e) => {
                tracing::warn!("relay resync failed: {e}");
                if !wait_failing(&mut rx, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        }
        connected_before = true;
        last_refusal = None;
        lock(&state).connected.send_replace(true);
        metrics.relay_connected.inc();
        relay_state(true);
        let lost = serve(&mut conn, &mut rx).await;
        lock(&state).connected.send_replace(false);
        metrics.relay_connected.dec();
        relay_state(false);
        match lost {
            Some(e) => {
                tracing::warn!(relay = %endpoint, "lost the relay's control connection: {e}; reconnecting");
            }
            None => return,
        }
    }
}

/// Re-adds every remembered channel the relay lacks, removes relay channels with control's prefix
/// that the link does not remember. Returns (re-added, removed).
async fn resync(
    conn: &mut Conn,
    channels: &Mutex<HashMap<ChannelId, Spec>>,
    figures: &Mutex<Figures>,
) -> std::io::Result<(u64, u64)> {
    let listed = match conn.call(Command::List).await? {
        Ok(Response::Channels { channels }) => channels,
        Ok(_) => return Err(std::io::Error::other("unexpected reply to list")),
        Err(e) => return Err(std::io::Error::other(e)),
    };
    let want: Vec<(ChannelId, Spec)> = lock(channels)
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let mut removed = 0;
    for c in &listed {
        let ours = c.channel.as_str().starts_with(EXTERNAL_MEDIA_PREFIX);
        if ours && !want.iter().any(|(id, _)| *id == c.channel) {
            if let Ok(Ok(_)) = conn
                .call(Command::Remove(RemoveChannel {
                    channel: c.channel.clone(),
                }))
                .await
            {
                removed += 1;
            }
        }
    }
    // A restarted relay may find a port still held for a moment: the old process's io_uring
    // releases its fixed files asynchronously after exit. Retry those for a while.
    let mut readded = 0;
    let mut todo: Vec<(ChannelId, Spec)> = want
        .into_iter()
        .filter(|(id, _)| !listed.iter().any(|c| c.channel == *id))
        .collect();
    let deadline = tokio::time::Instant::now() + RESYNC_RETRY;
    while !todo.is_empty() {
        let mut again = Vec::new();
        for (id, spec) in todo {
            if !lock(channels).contains_key(&id) {
                continue; // removed meanwhile
            }
            match conn
                .call(Command::Add(AddChannel {
                    channel: id.clone(),
                    port: spec.port,
                    asterisk: spec.asterisk,
                    echo: Some(spec.echo),
                    format: spec.format,
                }))
                .await?
            {
                Ok(_) => {
                    readded += 1;
                    // The relay restarted: what it measured before (its last interim figures)
                    // is banked, to be merged with what it measures from now on.
                    let mut f = lock(figures);
                    if let Some(before) = f.latest.remove(&id) {
                        f.banked.entry(id.clone()).or_default().push(before);
                    }
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(channel = id.as_str(), "re-add refused, retrying: {e}");
                    again.push((id, spec));
                }
                Err(e) => {
                    tracing::error!(channel = id.as_str(), "cannot re-add to the relay: {e}");
                }
            }
        }
        todo = again;
        if !todo.is_empty() {
            // The old relay's ports are released by the kernel moments after it died.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok((readded, removed))
}

/// Pipelines requests until the connection fails (`Some(error)`) or every handle is gone (`None`).
async fn serve(conn: &mut Conn, rx: &mut mpsc::UnboundedReceiver<Pending>) -> Option<String> {
    let mut waiting: HashMap<u64, (&'static str, ReplyTo)> = HashMap::new();
    let error = loop {
        tokio::select! {
            p = rx.recv() => {
                let (command, reply) = p?;
                let name = command.name();
                match conn.send(command).await {
                    Ok(id) => { waiting.insert(id, (name, reply)); }
                    Err(e) => {
                        let _ = reply.send(Err(RelayError::Disconnected));
                        break e.to_string();
                    }
                }
            }
            r = conn.reply() => match r {
                Ok(reply) => {
                    if let Some((name, tx)) = reply.id.and_then(|id| waiting.remove(&id)) {
                        let _ = tx.send(reply.outcome.map_err(|e| RelayError::Refused {
                            command: name,
                            message: e.to_string(),
                        }));
                    }
                }
                Err(e) => break e.to_string(),
            },
        }
    };
    for (_, (_, tx)) in waiting.drain() {
        let _ = tx.send(Err(RelayError::Disconnected));
    }
    Some(error)
}

/// Waits `delay`, failing every request that arrives meanwhile (a set-up must not hang on a
/// relay that is down); false when the request queue has closed.
async fn wait_failing(rx: &mut mpsc::UnboundedReceiver<Pending>, delay: Duration) -> bool {
    let wait = tokio::time::sleep(delay);
    tokio::pin!(wait);
    loop {
        tokio::select! {
            () = &mut wait => return true,
            p = rx.recv() => match p {
                Some((_, reply)) => { let _ = reply.send(Err(RelayError::Disconnected)); }
                None => return false,
            },
        }
    }
}

/// Exponential backoff with ±50 % jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    /// Starts at `base`, doubles up to `max`.
    #[must_use]
    pub fn new(base: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::from(d.subsec_nanos()) | 1);
        Self {
            base,
            max,
            current: base,
            seed,
        }
    }

    /// The next delay: the current step with jitter; the step doubles.
    pub fn next_delay(&mut self) -> Duration {
        let mut rng = relay_proto::rng::SplitMix64::new(self.seed);
        self.seed = rng.next_u64();
        let d = self.current.mul_f64(0.5 + rng.unit());
        self.current = (self.current * 2).min(self.max);
        d
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let steps: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in steps.iter().enumerate() {
            let step = Duration::from_millis(100 * (1 << i.min(10))).min(Duration::from_secs(1));
            assert!(
                *d >= step / 2 && *d <= step * 3 / 2,
                "step {i}: {d:?} vs {step:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
    }
}
