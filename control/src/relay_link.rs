//! Control's connection to the relay's control socket: requests from any number of call tasks are
//! pipelined on one connection and matched to replies by id, so 200 calls setting up at once do
//! not wait on each other.
//!
//! The link remembers every channel it added (port, Asterisk's address, echo). When the socket
//! goes away it reconnects with backoff, and then resyncs: channels the relay does not have are
//! re-added (a restarted relay), and relay channels with control's prefix that no call owns are
//! removed (a previous control's leftovers). While disconnected, requests fail at once rather than
//! queue, so a call set-up fails cleanly (and unwinds) instead of hanging.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use relay_proto::control::{
    AddChannel, Frame, Hello, LineDecoder, RemoveChannel, StatsQuery, UpdateChannel,
    PROTOCOL_VERSION,
};
use relay_proto::{
    ChannelId, ChannelStats, Command, Format, GlobalStats, Reply, Request, Response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

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

/// A handle on the link (cheap to clone).
#[derive(Clone, Debug)]
pub struct RelayLink {
    tx: mpsc::UnboundedSender<Pending>,
    channels: Arc<Mutex<HashMap<ChannelId, Spec>>>,
}

impl RelayLink {
    /// Starts the link's task, which connects to `path` and keeps reconnecting.
    #[must_use]
    pub fn spawn(path: PathBuf, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let channels = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(run(path, rx, Arc::clone(&channels), metrics));
        Self { tx, channels }
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
    pub async fn remove(&self, id: &ChannelId) -> Result<ChannelStats, RelayError> {
        self.channels().remove(id);
        match self
            .request(Command::Remove(RemoveChannel {
                channel: id.clone(),
            }))
            .await?
        {
            Response::Removed { stats } => Ok(*stats),
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Longest reply line accepted (a `list` of every channel is one line).
const MAX_REPLY: usize = 64 * 1024 * 1024;

/// One connection's state. Reading is cancel-safe (the partial line lives here, not in a
/// future), because [`serve`] waits on replies and new requests at once.
struct Conn {
    write: tokio::net::unix::OwnedWriteHalf,
    read: tokio::net::unix::OwnedReadHalf,
    decoder: LineDecoder,
    lines: std::collections::VecDeque<Frame>,
    chunk: Vec<u8>,
    next_id: u64,
}

impl Conn {
    async fn connect(path: &std::path::Path) -> std::io::Result<Self> {
        let (read, write) = UnixStream::connect(path).await?.into_split();
        let mut c = Self {
            write,
            read,
            decoder: LineDecoder::new(MAX_REPLY),
            lines: std::collections::VecDeque::new(),
            chunk: vec![0; 64 * 1024],
            next_id: 1,
        };
        c.call(Command::Hello(Hello {
            version: PROTOCOL_VERSION,
            client: Some(concat!("control ", env!("CARGO_PKG_VERSION")).into()),
        }))
        .await?
        .map_err(std::io::Error::other)?;
        Ok(c)
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
    path: PathBuf,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    channels: Arc<Mutex<HashMap<ChannelId, Spec>>>,
    metrics: Arc<Metrics>,
) {
    // Connecting to a Unix socket that is not there costs microseconds: retry often, so a
    // restarted relay is reached (and resynced) within tens of milliseconds of listening.
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(20));
    let mut connected_before = false;
    loop {
        let conn = Conn::connect(&path).await;
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                if !connected_before {
                    tracing::debug!("relay socket {}: {e}", path.display());
                }
                if !wait_failing(&mut rx, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        match resync(&mut conn, &channels).await {
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
                tracing::info!(
                    readded,
                    removed,
                    "connected to the relay at {}",
                    path.display()
                );
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
        metrics.relay_connected.set(1);
        let lost = serve(&mut conn, &mut rx).await;
        metrics.relay_connected.set(0);
        match lost {
            Some(e) => tracing::warn!("lost the relay's control socket: {e}; reconnecting"),
            None => return,
        }
    }
}

/// Re-adds every remembered channel the relay lacks, removes relay channels with control's prefix
/// that the link does not remember. Returns (re-added, removed).
async fn resync(
    conn: &mut Conn,
    channels: &Mutex<HashMap<ChannelId, Spec>>,
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
                Ok(_) => readded += 1,
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
