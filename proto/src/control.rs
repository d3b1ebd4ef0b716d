//! The control protocol between `control` and the relay: newline-delimited JSON over a Unix
//! stream socket, or over TLS on TCP for a relay on another host, one request, one reply.
//!
//! A request is one JSON object on one line: `{"id":7,"cmd":"add","channel":"c1","port":21000}`.
//! `id` (optional, a u64) is echoed in the reply so a client can pipeline. The reply is
//! `{"id":7,"ok":true,"result":{"type":"added",…}}` or
//! `{"id":7,"ok":false,"error":{"code":"port_in_use","message":"…"}}`.
//! A connection starts with `{"cmd":"hello","version":2}`; anything else first is refused with
//! `handshake_required`, and another version with `version_mismatch`, naming both. The reply
//! says who the relay is ([`RelayIdentity`]): its id, the address Asterisk must send a channel's
//! RTP to, and how many channels it holds at most.
//!
//! The relay trusts nothing it reads here: [`LineDecoder`] bounds a line's length and turns an
//! overlong one into an error without buffering it, and [`decode_request`] turns any bytes into
//! either a typed [`Request`] or an [`ErrorReply`] with a precise code (unknown fields, unknown
//! commands and out-of-range values included). Neither panics on any input.

use core::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::channel_id::{BadChannelId, ChannelId, MAX_CHANNEL_ID};
use crate::format::Format;
use crate::stats::{ChannelStats, GlobalStats, PerDirection, TrafficCounters};

/// The protocol version this crate speaks. Version 2: the `hello` reply carries the relay's
/// identity ([`RelayIdentity`]).
pub const PROTOCOL_VERSION: u32 = 2;
/// Default longest request line, newline excluded.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;

/// `hello`: the version handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The protocol version the client speaks.
    pub version: u32,
    /// Free text naming the client, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// `add`: open a channel on a local UDP port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddChannel {
    /// The new channel's identifier; must not be in use.
    pub channel: ChannelId,
    /// Local UDP port to bind; 0 lets the kernel choose (the reply names the port).
    pub port: u16,
    /// Asterisk's RTP address; when absent the relay latches the first valid packet's source
    /// (unless it runs in strict mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asterisk: Option<SocketAddr>,
    /// The echo server for this channel; the relay's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<SocketAddr>,
    /// The media format, which sets the RTP clock; ulaw when absent.
    #[serde(default)]
    pub format: Format,
}

/// `update`: set (or correct) Asterisk's RTP address of a channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateChannel {
    /// The channel.
    pub channel: ChannelId,
    /// Asterisk's RTP address (UNICASTRTP_LOCAL_ADDRESS:UNICASTRTP_LOCAL_PORT).
    pub asterisk: SocketAddr,
}

/// `remove`: close a channel; the reply carries its final statistics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveChannel {
    /// The channel.
    pub channel: ChannelId,
}

/// `stats`: the relay's global statistics, or one channel's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// The channel; global statistics when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelId>,
}

/// A command to the relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Version handshake; must come first on a connection.
    Hello(Hello),
    /// Open a channel.
    Add(AddChannel),
    /// Set Asterisk's address of a channel.
    Update(UpdateChannel),
    /// Close a channel and return its final statistics.
    Remove(RemoveChannel),
    /// List the channels.
    List,
    /// Global or per-channel statistics.
    Stats(StatsQuery),
    /// Refuse new channels from now on; existing ones carry on until removed.
    Drain,
    /// Every open channel's figures so far, in a form that merges exactly
    /// ([`crate::figures::ChannelFigures`]): control asks every `--interim`, so a relay's crash
    /// loses at most that much of a call's measurement.
    Interim,
}

impl Command {
    /// The command's name on the wire.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Add(_) => "add",
            Self::Update(_) => "update",
            Self::Remove(_) => "remove",
            Self::List => "list",
            Self::Stats(_) => "stats",
            Self::Drain => "drain",
            Self::Interim => "interim",
        }
    }
}

/// A command with the client's correlation id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the reply.
    pub id: Option<u64>,
    /// What to do.
    pub command: Command,
}

impl Request {
    /// The request as one line of JSON, newline included.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut value = serde_json::to_value(&self.command).unwrap_or(Value::Null);
        if let (Value::Object(map), Some(id)) = (&mut value, self.id) {
            map.insert("id".into(), id.into());
        }
        let mut line = value.to_string();
        line.push('\n');
        line
    }
}

/// One channel in a `list` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// The channel's identifier.
    pub channel: ChannelId,
    /// The relay's socket slot (the io_uring fixed-file index) in its shard.
    pub socket: u32,
    /// The data-plane shard that holds the channel (0 for a one-shard relay).
    #[serde(default)]
    pub shard: u32,
    /// The local UDP port.
    pub port: u16,
    /// Asterisk's RTP address, once known.
    pub asterisk: Option<SocketAddr>,
    /// The echo server.
    pub echo: SocketAddr,
    /// The media format.
    pub format: Format,
    /// Packets and bytes forwarded, per direction.
    pub traffic: PerDirection<TrafficCounters>,
}

/// A successful reply's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The handshake succeeded.
    Hello {
        /// The protocol version the relay speaks.
        version: u32,
        /// The relay's name and version.
        server: String,
        /// Who the relay is (`None` only from a core without one: tests).
        #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
        identity: Option<RelayIdentity>,
    },
    /// The channel is open.
    Added {
        /// The channel.
        channel: ChannelId,
        /// The local UDP port it is bound to.
        port: u16,
        /// Its socket slot in its shard.
        socket: u32,
        /// The data-plane shard that holds it (0 for a one-shard relay, or a relay that predates
        /// shards).
        #[serde(default)]
        shard: u32,
    },
    /// Asterisk's address was set.
    Updated {
        /// The channel.
        channel: ChannelId,
        /// The address now in force.
        asterisk: SocketAddr,
    },
    /// The channel is closed; these are its final statistics.
    Removed {
        /// Final statistics.
        stats: Box<ChannelStats>,
        /// The same, mergeable (absent from a relay that predates them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        figures: Option<Box<crate::figures::ChannelFigures>>,
    },
    /// Every open channel.
    Channels {
        /// One entry a channel.
        channels: Vec<ChannelInfo>,
    },
    /// Every open channel's figures so far.
    Interim {
        /// One entry a channel.
        channels: Vec<crate::figures::ChannelFigures>,
    },
    /// One channel's statistics.
    Channel {
        /// The statistics.
        stats: Box<ChannelStats>,
    },
    /// The relay's global statistics.
    Global {
        /// The statistics.
        stats: Box<GlobalStats>,
    },
    /// The relay is draining.
    Draining {
        /// Channels still open.
        active: u32,
    },
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not valid JSON (or not UTF-8).
    BadJson,
    /// Valid JSON, but not a valid request: not an object, a missing or unknown field, a value
    /// of the wrong type or out of range.
    BadRequest,
    /// `cmd` names no command.
    UnknownCommand,
    /// The line exceeded the maximum length; it was discarded up to its newline.
    LineTooLong,
    /// A command came before a successful `hello`.
    HandshakeRequired,
    /// `hello` asked for a protocol version the relay does not speak.
    VersionMismatch,
    /// No channel has that identifier.
    UnknownChannel,
    /// A channel already has that identifier.
    DuplicateChannel,
    /// The local port is already bound.
    PortInUse,
    /// The relay is at its channel limit.
    Limit,
    /// The relay is draining and takes no new channels.
    Draining,
    /// A system call failed (the message says which).
    Io,
    /// A bug in the relay; the message says what.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::BadRequest => "bad_request",
            Self::UnknownCommand => "unknown_command",
            Self::LineTooLong => "line_too_long",
            Self::HandshakeRequired => "handshake_required",
            Self::VersionMismatch => "version_mismatch",
            Self::UnknownChannel => "unknown_channel",
            Self::DuplicateChannel => "duplicate_channel",
            Self::PortInUse => "port_in_use",
            Self::Limit => "limit",
            Self::Draining => "draining",
            Self::Io => "io",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed request's code and human-readable message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorReply {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What exactly went wrong.
    pub message: String,
}

impl ErrorReply {
    /// `unknown_channel`: no channel has identifier `id` (the one wording for the core and for a
    /// sharded relay's router).
    #[must_use]
    pub fn unknown_channel(id: &ChannelId) -> Self {
        Self::new(ErrorCode::UnknownChannel, format!("no channel {id}"))
    }

    /// `duplicate_channel`: a channel already has identifier `id`.
    #[must_use]
    pub fn duplicate_channel(id: &ChannelId) -> Self {
        Self::new(
            ErrorCode::DuplicateChannel,
            format!("channel {id} already exists"),
        )
    }

    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A reply to one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// The request's id, when it had one (and could be read).
    pub id: Option<u64>,
    /// The result or the error.
    pub outcome: Result<Response, ErrorReply>,
}

/// The wire form of a reply.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Response>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorReply>,
}

impl Reply {
    /// The reply as one line of JSON, newline included.
    #[must_use]
    pub fn encode(&self) -> String {
        let (result, error) = match &self.outcome {
            Ok(r) => (Some(r.clone()), None),
            Err(e) => (None, Some(e.clone())),
        };
        let wire = WireReply {
            id: self.id,
            ok: error.is_none(),
            result,
            error,
        };
        let mut line = serde_json::to_string(&wire).unwrap_or_else(|e| {
            format!(
                r#"{{"ok":false,"error":{{"code":"internal","message":"cannot encode reply: {e}"}}}}"#
            )
        });
        line.push('\n');
        line
    }

    /// Parses a reply line (what a client reads).
    ///
    /// # Errors
    /// The line is not a well-formed reply.
    pub fn decode(line: &[u8]) -> Result<Self, serde_json::Error> {
        let wire: WireReply = serde_json::from_slice(line)?;
        let outcome = match (wire.ok, wire.result, wire.error) {
            (true, Some(r), None) => Ok(r),
            (false, None, Some(e)) => Err(e),
            _ => {
                return Err(serde::de::Error::custom(
                    "a reply has ok:true with result, or ok:false with error",
                ))
            }
        };
        Ok(Self {
            id: wire.id,
            outcome,
        })
    }
}

/// A line that could not become a request: the reply to send, with the id when it was readable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError {
    /// The request's id, when the line got that far.
    pub id: Option<u64>,
    /// The error to reply with.
    pub error: ErrorReply,
}

impl RequestError {
    /// The reply to send for this error.
    #[must_use]
    pub fn into_reply(self) -> Reply {
        Reply {
            id: self.id,
            outcome: Err(self.error),
        }
    }
}

/// Decodes one request line (without its newline). Never panics.
///
/// # Errors
/// A [`RequestError`] whose code says what is wrong: `bad_json`, `bad_request` (not an object,
/// bad `id`, missing `cmd`, unknown field, wrong type, bad value) or `unknown_command`.
pub fn decode_request(line: &[u8]) -> Result<Request, RequestError> {
    let fail = |id, code, message: String| RequestError {
        id,
        error: ErrorReply::new(code, message),
    };
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| fail(None, ErrorCode::BadJson, format!("invalid JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(fail(
            None,
            ErrorCode::BadRequest,
            "a request is a JSON object".into(),
        ));
    };
    let id = match map.remove("id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            fail(
                None,
                ErrorCode::BadRequest,
                "`id` must be an unsigned integer".into(),
            )
        })?),
    };
    let cmd = match map.remove("cmd") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(fail(
                id,
                ErrorCode::BadRequest,
                "`cmd` must be a string".into(),
            ))
        }
        None => return Err(fail(id, ErrorCode::BadRequest, "missing `cmd`".into())),
    };
    let args = |map: Map<String, Value>| Value::Object(map);
    let bad = |e: serde_json::Error| fail(id, ErrorCode::BadRequest, format!("{cmd}: {e}"));
    let unit = |map: &Map<String, Value>| match map.keys().next() {
        Some(k) => Err(fail(
            id,
            ErrorCode::BadRequest,
            format!("{cmd}: unknown field `{k}`, this command takes none"),
        )),
        None => Ok(()),
    };
    let command = match cmd.as_str() {
        "hello" => Command::Hello(serde_json::from_value(args(map)).map_err(bad)?),
        "add" => Command::Add(serde_json::from_value(args(map)).map_err(bad)?),
        "update" => Command::Update(serde_json::from_value(args(map)).map_err(bad)?),
        "remove" => Command::Remove(serde_json::from_value(args(map)).map_err(bad)?),
        "stats" => Command::Stats(serde_json::from_value(args(map)).map_err(bad)?),
        "list" => {
            unit(&map)?;
            Command::List
        }
        "drain" => {
            unit(&map)?;
            Command::Drain
        }
        "interim" => {
            unit(&map)?;
            Command::Interim
        }
        _ => {
            let shown: String = cmd.chars().take(64).collect();
            return Err(fail(
                id,
                ErrorCode::UnknownCommand,
                format!(
                    "unknown command {shown:?} (known: hello, add, update, remove, list, stats, drain, interim)"
                ),
            ));
        }
    };
    Ok(Request { id, command })
}

/// What [`LineDecoder::push`] found: a complete line, or a line that was too long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, newline (and a trailing `\r`) removed; never empty.
    Line(Vec<u8>),
    /// A line exceeded the limit; its bytes up to the next newline are discarded.
    TooLong,
}

/// Splits a byte stream into lines of at most `max_line` bytes, holding at most that many.
#[derive(Clone, Debug)]
pub struct LineDecoder {
    /// The incomplete line so far.
    buf: Vec<u8>,
    /// Longest accepted line, newline excluded.
    max_line: usize,
    /// Whether the current line already overflowed and is being skipped.
    skipping: bool,
}

impl LineDecoder {
    /// A decoder accepting lines of up to `max_line` bytes.
    #[must_use]
    pub const fn new(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_line,
            skipping: false,
        }
    }

    /// Feeds bytes read from the stream; complete lines and overflows are appended to `out`.
    /// An overlong line is reported as soon as it passes the limit, once, and then skipped.
    /// Blank lines are ignored.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Frame>) {
        while !data.is_empty() {
            let (chunk, ended) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (data.get(..i).unwrap_or_default(), true),
                None => (data, false),
            };
            data = data
                .get(chunk.len() + usize::from(ended)..)
                .unwrap_or_default();
            if !self.skipping {
                if self.buf.len() + chunk.len() > self.max_line + 1 {
                    // Over the limit, allowing one byte that may turn out to be a `\r`.
                    self.buf.clear();
                    self.skipping = true;
                    out.push(Frame::TooLong);
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            if ended {
                if !self.skipping {
                    if self.buf.last() == Some(&b'\r') {
                        self.buf.pop();
                    }
                    if self.buf.len() > self.max_line {
                        out.push(Frame::TooLong);
                    } else if !self.buf.is_empty() {
                        out.push(Frame::Line(core::mem::take(&mut self.buf)));
                    }
                }
                self.buf.clear();
                self.skipping = false;
            }
        }
    }

    /// Bytes held of an incomplete line.
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

impl Default for LineDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

/// What a control connection produced from its input.
#[derive(Clone, Debug, PartialEq)]
pub enum SessionItem {
    /// A valid request after the handshake: the relay executes it and replies.
    Execute(Request),
    /// A reply the session produced itself (the handshake, or an error): send it as is.
    Reply(Reply),
}

/// One control connection: framing, decoding and the version handshake.
#[derive(Clone, Debug, Default)]
pub struct ControlSession {
    /// Splits the stream into lines.
    decoder: LineDecoder,
    /// Whether `hello` succeeded.
    greeted: bool,
    /// What the `hello` reply says the relay is.
    identity: Option<RelayIdentity>,
    /// Scratch for frames, reused across reads.
    frames: Vec<Frame>,
}

impl ControlSession {
    /// A session accepting lines of up to `max_line` bytes.
    #[must_use]
    pub fn new(max_line: usize) -> Self {
        Self {
            decoder: LineDecoder::new(max_line),
            greeted: false,
            identity: None,
            frames: Vec::new(),
        }
    }

    /// The same, whose `hello` reply carries `identity`.
    #[must_use]
    pub fn with_identity(mut self, identity: RelayIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Whether the handshake has succeeded.
    #[must_use]
    pub const fn is_greeted(&self) -> bool {
        self.greeted
    }

    /// Feeds bytes read from the connection; what to do about them is appended to `out`, in
    /// order: one item per request line.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<SessionItem>) {
        self.decoder.push(data, &mut self.frames);
        for frame in self.frames.drain(..) {
            let item = match frame {
                Frame::TooLong => SessionItem::Reply(Reply {
                    id: None,
                    outcome: Err(ErrorReply::new(
                        ErrorCode::LineTooLong,
                        format!(
                            "request line longer than {} bytes; discarded",
                            self.decoder.max_line
                        ),
                    )),
                }),
                Frame::Line(line) => match decode_request(&line) {
                    Err(e) => SessionItem::Reply(e.into_reply()),
                    Ok(Request {
                        id,
                        command: Command::Hello(hello),
                    }) => SessionItem::Reply(Reply {
                        id,
                        outcome: if hello.version == PROTOCOL_VERSION {
                            self.greeted = true;
                            Ok(hello_response(self.identity.as_ref()))
                        } else {
                            Err(ErrorReply::new(
                                ErrorCode::VersionMismatch,
                                format!(
                                    "client speaks version {}, relay speaks {PROTOCOL_VERSION}",
                                    hello.version
                                ),
                            ))
                        },
                    }),
                    Ok(req) if !self.greeted => SessionItem::Reply(Reply {
                        id: req.id,
                        outcome: Err(ErrorReply::new(
                            ErrorCode::HandshakeRequired,
                            format!(
                                "send {{\"cmd\":\"hello\",\"version\":{PROTOCOL_VERSION}}} before `{}`",
                                req.command.name()
                            ),
                        )),
                    }),
                    Ok(req) => SessionItem::Execute(req),
                },
            };
            out.push(item);
        }
    }
}

/// Who a relay is, as its `hello` reply tells a client that places calls on several relays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayIdentity {
    /// Its id (`--relay-id`: by default its host name), stable across restarts.
    pub relay_id: String,
    /// The address Asterisk must send a channel's RTP to: `--advertise`, or `--bind`.
    pub advertise: IpAddr,
    /// The most channels it holds at once (`--max-channels`).
    pub capacity: u32,
}

/// The relay's answer to a successful `hello`.
#[must_use]
pub fn hello_response(identity: Option<&RelayIdentity>) -> Response {
    Response::Hello {
        version: PROTOCOL_VERSION,
        server: concat!("rtp-relay ", env!("CARGO_PKG_VERSION")).into(),
        identity: identity.cloned(),
    }
}
