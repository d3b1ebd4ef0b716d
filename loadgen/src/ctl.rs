//! A blocking client of the relay's control socket: what loadgen (and tests) use to add and
//! remove channels and read statistics.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use relay_proto::control::{AddChannel, Hello, RemoveChannel, StatsQuery, PROTOCOL_VERSION};
use relay_proto::{
    ChannelId, ChannelStats, Command, Format, GlobalStats, Reply, Request, Response,
};

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
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot connect to the relay's control socket {}",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
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
    pub fn request(&mut self, command: Command) -> anyhow::Result<Response> {
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
            return Err(anyhow!("the relay closed the control connection"));
        }
        let reply = Reply::decode(line.as_bytes()).context("malformed reply from the relay")?;
        reply
            .outcome
            .map_err(|e| anyhow!("relay refused `{name}`: {e}"))
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
    ) -> anyhow::Result<u16> {
        let channel = ChannelId::try_from(channel).map_err(|e| anyhow!("{e}"))?;
        match self.request(Command::Add(AddChannel {
            channel,
            port,
            asterisk: Some(asterisk),
            echo,
            format: Format::Ulaw,
        }))? {
            Response::Added { port, .. } => Ok(port),
            other => Err(anyhow!("unexpected reply to add: {other:?}")),
        }
    }

    /// Removes a channel; returns its final statistics.
    ///
    /// # Errors
    /// See [`RelayClient::request`].
    pub fn remove(&mut self, channel: &str) -> anyhow::Result<ChannelStats> {
        let channel = ChannelId::try_from(channel).map_err(|e| anyhow!("{e}"))?;
        match self.request(Command::Remove(RemoveChannel { channel }))? {
            Response::Removed { stats } => Ok(*stats),
            other => Err(anyhow!("unexpected reply to remove: {other:?}")),
        }
    }

    /// Every open channel.
    ///
    /// # Errors
    /// See [`RelayClient::request`].
    pub fn list(&mut self) -> anyhow::Result<Vec<relay_proto::control::ChannelInfo>> {
        match self.request(Command::List)? {
            Response::Channels { channels } => Ok(channels),
            other => Err(anyhow!("unexpected reply to list: {other:?}")),
        }
    }

    /// One channel's statistics.
    ///
    /// # Errors
    /// See [`RelayClient::request`].
    pub fn channel(&mut self, channel: &str) -> anyhow::Result<ChannelStats> {
        let channel = ChannelId::try_from(channel).map_err(|e| anyhow!("{e}"))?;
        match self.request(Command::Stats(StatsQuery {
            channel: Some(channel),
        }))? {
            Response::Channel { stats } => Ok(*stats),
            other => Err(anyhow!("unexpected reply to stats: {other:?}")),
        }
    }

    /// The relay's global statistics.
    ///
    /// # Errors
    /// See [`RelayClient::request`].
    pub fn global(&mut self) -> anyhow::Result<GlobalStats> {
        match self.request(Command::Stats(StatsQuery { channel: None }))? {
            Response::Global { stats } => Ok(*stats),
            other => Err(anyhow!("unexpected reply to stats: {other:?}")),
        }
    }
}
