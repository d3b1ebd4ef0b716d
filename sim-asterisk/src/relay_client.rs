//! A blocking client of the relay's control socket: one request, then its reply. The tools and
//! tests that talk to a relay directly use it: `loadgen rtp` adds and removes its channels,
//! `loadgen ari` and the simulator (`--relay-ctl`) read its statistics for their reports, and
//! the pipeline tests list what is left. It lives here, in the lowest of the tool crates, so that
//! none of them depends on loadgen for it. (Control has its own, pipelined and self-resyncing:
//! `control::relay_link`.)

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_proto::channel_id::BadChannelId;
use relay_proto::control::{
    AddChannel, ChannelInfo, ErrorReply, Hello, RemoveChannel, StatsQuery, PROTOCOL_VERSION,
};
use relay_proto::{
    ChannelId, ChannelStats, Command, Format, GlobalStats, Reply, Request, Response,
};

/// How long a reply may take before the request fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A request to the relay that failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayClientError {
    /// The control socket could not be connected to.
    #[error("cannot connect to the relay's control socket {}", path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the request or reading the reply failed (a reply timeout included).
    #[error("the relay's control connection failed")]
    Io(#[from] std::io::Error),
    /// The relay closed the connection instead of replying.
    #[error("the relay closed the control connection")]
    Closed,
    /// The reply is not a well-formed reply line.
    #[error("malformed reply from the relay")]
    Malformed(#[source] serde_json::Error),
    /// The relay answered with an error.
    #[error("relay refused `{command}`: {reply}")]
    Refused {
        /// The command's name.
        command: &'static str,
        /// The relay's error.
        reply: ErrorReply,
    },
    /// The channel name is not a valid channel identifier.
    #[error("{0}")]
    BadChannel(#[from] BadChannelId),
    /// A reply of the wrong kind.
    #[error("unexpected reply to {command}: {reply:?}")]
    Unexpected {
        /// The command's name.
        command: &'static str,
        /// What came back.
        reply: Box<Response>,
    },
}

/// A control connection.
#[derive(Debug)]
pub struct RelayClient {
    /// For writing requests.
    stream: UnixStream,
    /// For reading replies.
    reader: BufReader<UnixStream>,
    /// Next request id.
    next_id: u64,
}

impl RelayClient {
    /// Connects and says hello.
    ///
    /// # Errors
    /// The socket is not there, or the relay refused the handshake.
    pub fn connect(path: &Path) -> Result<Self, RelayClientError> {
        let stream = UnixStream::connect(path).map_err(|source| RelayClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut c = Self {
            stream,
            reader,
            next_id: 1,
        };
        c.request(Command::Hello(Hello {
            version: PROTOCOL_VERSION,
            client: Some(concat!("loadgen ", env!("CARGO_PKG_VERSION")).into()),
        }))?;
        Ok(c)
    }

    /// Sends a command and waits for its reply.
    ///
    /// # Errors
    /// The connection failed, or the relay answered with an error.
    pub fn request(&mut self, command: Command) -> Result<Response, RelayClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let name = command.name();
        self.stream.write_all(
            Request {
                id: Some(id),
                command,
            }
            .encode()
            .as_bytes(),
        )?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(RelayClientError::Closed);
        }
        let reply = Reply::decode(line.as_bytes()).map_err(RelayClientError::Malformed)?;
        reply.outcome.map_err(|reply| RelayClientError::Refused {
            command: name,
            reply,
        })
    }

    /// Adds a channel; returns the relay's port for it.
    ///
    /// # Errors
    /// See [`RelayClient::request`].
    pub fn add(
        &mut self,
        channel: &str,
        port: u16,
        asterisk: SocketAddr,
        echo: Option<SocketAddr>,
    ) -> Result<u16, RelayClientError> {
        let channel = ChannelId::try_from(channel)?;
        match self.request(Command::Add(AddChannel {
            channel,
            port,
            asterisk: Some(asterisk),
            echo,
            format: Format::Ulaw,
        }))? {
            Response::Added { port, .. } => Ok(port),
            other => Err(unexpected("add", other)),
        }
    }

    /// Removes a channel; returns its final statistics.
    ///
    /// # Errors
    /// See [`RelayClient::request`].
    pub fn remove(&mut self, channel: &str) -> Result<ChannelStats, RelayClientError> {
        let channel = ChannelId::try_from(channel)?;
        match self.request(Command::Remove(RemoveChannel { channel }))? {
            Response::Removed { stats, .. } => Ok(*stats),
            other => Err(unexpected("remove", other)),
        }
    }

    /// Every open channel.
    ///
    /// # Errors
    /// See [`RelayClient::request`].
    pub fn list(&mut self) -> Result<Vec<ChannelInfo>, RelayClientError> {
        match self.request(Command::List)? {
            Response::Channels { channels } => Ok(channels),
            other => Err(unexpected("list", other)),
        }
    }

    /// One channel's statistics.
    ///
    /// # Errors
    /// See [`RelayClient::request`].
    pub fn channel(&mut self, channel: &str) -> Result<ChannelStats, RelayClientError> {
        let channel = ChannelId::try_from(channel)?;
        match self.request(Command::Stats(StatsQuery {
            channel: Some(channel),
        }))? {
            Response::Channel { stats } => Ok(*stats),
            other => Err(unexpected("stats", other)),
        }
    }

    /// The relay's global statistics.
    ///
    /// # Errors
    /// See [`RelayClient::request`].
    pub fn global(&mut self) -> Result<GlobalStats, RelayClientError> {
        match self.request(Command::Stats(StatsQuery { channel: None }))? {
            Response::Global { stats } => Ok(*stats),
            other => Err(unexpected("stats", other)),
        }
    }
}

fn unexpected(command: &'static str, reply: Response) -> RelayClientError {
    RelayClientError::Unexpected {
        command,
        reply: Box::new(reply),
    }
}
