//! The relay state machine: which datagram goes where, and what it tells us.
//!
//! [`Relay`] owns every channel. The I/O layer (io_uring or tokio) owns the sockets and the clock
//! and drives it:
//! - each datagram goes to [`Relay::handle_received`] with the socket it arrived on, its source,
//!   its arrival (the kernel's receive stamp) and when it was handled; the [`Verdict`] says where
//!   to send the very same bytes, or why to drop them;
//! - each control request goes to [`Relay::handle_command`]; opening a channel is two steps
//!   (the core picks the socket slot, the backend binds, [`Relay::complete_open`] confirms), and
//!   closing one tells the backend which socket to close;
//! - [`Relay::poll_timeout`] says when to call [`Relay::handle_timeout`], which times out
//!   unanswered T0 entries and closes idle channels, reported by [`Relay::poll_event`];
//! - a forwarded datagram's send time is the kernel's transmit stamp: the backend sends it with
//!   the id [`Relay::send_id`] gives and hands the stamp back with [`Relay::tx_stamped`], which
//!   settles its forward time and (toward the echo) its T0, before or after the echo returns
//!   (`SendTimes::Estimated` keeps the old estimate, [`Relay::submitted_between`]);
//! - with one shared socket toward the echo, the backend tags each packet on its way there and
//!   untags its return ([`Relay::tag_for_echo`], [`Relay::untag_from_echo`]).
//!
//! Source rules per channel: a datagram from the echo's address goes to Asterisk (T1, RTT); one
//! from Asterisk's address goes to the echo (T0). Asterisk's address comes from control, or, unless
//! the relay is strict, is latched from the first well-formed packet from any other address.
//! Anything else is dropped and counted by reason. Malformed packets are dropped and counted, never
//! forwarded.
//!
//! Probes ([`crate::probe`]): a channel whose RTP payloads from Asterisk carry valid probe
//! headers, [`crate::probe::RECOGNISE_AFTER`] in a row of one call, is a probe channel from then
//! on. It records each probe's arrival by probe sequence and, when the probe's echo comes back,
//! records the relay's loop (arrival to the echo's arrival) and writes both times, on the wall
//! clock ([`Relay::set_wall_offset`]), into the echo's header on its way to Asterisk
//! ([`Relay::handle_received`]). Nothing else is ever written; a channel without probes pays one
//! 8-byte comparison per packet.
//!
//! Once a channel exists, handling a datagram does not allocate: the channel's T0 table and
//! histograms are sized when it opens (a probe channel's arrival ring and its two histograms
//! once, when it is recognised), and the queue of sends waiting for their time when the relay
//! is made.
//!
//! This module routes datagrams, runs commands and timers and answers statistics queries; the
//! rest is in its submodules, one concept each:
//!
//! | module | what it holds |
//! |---|---|
//! | `config` | [`RelayConfig`], its validation, and [`SendTimes`] |
//! | `channel` | one channel's state, and the measurement each of its packets makes |
//! | `probes` | a channel's probe state: recognition, arrivals, loops, the times to write |
//! | `send_timing` | when each forwarded datagram left: the send-time API from [`Relay::send_id`] to [`Relay::submitted_between`] |
//! | `tagging` | the shared echo leg's tags, per channel |
//!
//! The relay-wide histograms it records into are [`GlobalHistograms`], with the statistics.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use crate::control::{
    AddChannel, ChannelId, ChannelInfo, Command, ErrorCode, ErrorReply, Response,
};
use crate::figures::ChannelFigures;
use crate::probe::{self, RelayTimes};
use crate::rtp::{self, Packet, Ssrc};
use crate::sends::Sends;
use crate::stats::{
    ChannelStats, CloseReason, Direction, DropCounts, DropReason, EchoCounters, GlobalHistograms,
    GlobalStats, LatencyHistogram, MissingKind, PerDirection, ProbeTotals, StreamCounters,
    TimestampCounters, TrafficCounters,
};
use crate::t0::T0Table;
use crate::time::{duration_nanos, MonoTime};

use channel::{count_unreturned_tail, measure, Channel, Stream};
use config::usable;
use probes::{payload_start, probe_header, Probes};
use send_timing::{give_up, Unsubmitted, UNSUBMITTED_CAPACITY};

mod channel;
mod config;
mod probes;
mod send_timing;
mod tagging;

pub use config::{ConfigError, RelayConfig, SendTimes};
pub use probes::PROBE_SLOTS;

/// The socket a datagram arrived on: a slot the relay assigns when a channel opens (the io_uring
/// backend uses it as the fixed-file index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub u32);

impl SocketId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

/// What to do with a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Send the same bytes from the same socket to `to`.
    Forward {
        /// Destination.
        to: SocketAddr,
        /// Which way the packet is going.
        direction: Direction,
    },
    /// Drop it; it has been counted under this reason.
    Drop(DropReason),
}

/// Something the relay did on its own, from [`Relay::handle_timeout`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A channel closed without a command: close its socket.
    ChannelClosed {
        /// The socket to close.
        socket: SocketId,
        /// Why.
        reason: CloseReason,
        /// Its final statistics.
        stats: Box<ChannelStats>,
    },
}

/// A channel whose slot is reserved while the backend binds its socket.
#[derive(Debug)]
#[must_use = "pass it to Relay::complete_open, or the slot stays reserved"]
pub struct PendingOpen {
    /// The reserved slot.
    socket: SocketId,
    /// The request, validated.
    request: AddChannel,
}

impl PendingOpen {
    /// The slot to bind the socket in.
    #[must_use]
    pub const fn socket(&self) -> SocketId {
        self.socket
    }

    /// The local port to bind (0: any).
    #[must_use]
    pub const fn port(&self) -> u16 {
        self.request.port
    }

    /// The channel being opened.
    #[must_use]
    pub const fn channel(&self) -> &ChannelId {
        &self.request.channel
    }
}

/// What a command needs from the backend.
#[derive(Debug)]
#[must_use]
pub enum CommandOutcome {
    /// Send this reply.
    Reply(Result<Response, ErrorReply>),
    /// Bind a UDP socket on the pending channel's port, then call [`Relay::complete_open`] and
    /// send what it returns.
    Open(PendingOpen),
    /// Close the socket in this slot, then send the reply.
    Close {
        /// The slot whose socket to close.
        socket: SocketId,
        /// The reply.
        reply: Result<Response, ErrorReply>,
    },
}

/// Counters of closed channels, so global statistics survive them.
#[derive(Debug, Default)]
struct ClosedTotals {
    /// Traffic.
    traffic: PerDirection<TrafficCounters>,
    /// Stream quality.
    streams: PerDirection<StreamCounters>,
    /// Round trips.
    round_trip: EchoCounters,
    /// Probe headers.
    probe: ProbeTotals,
    /// Channels closed by `remove`.
    removed: u64,
    /// Channels closed for idleness.
    idle: u64,
}

/// The sans-IO relay: every channel's state, driven by datagrams, commands and time.
#[derive(Debug)]
pub struct Relay {
    /// Settings.
    config: RelayConfig,
    /// Channels by socket slot.
    channels: Vec<Option<Box<Channel>>>,
    /// Free slots; the lowest is handed out first.
    free: Vec<u32>,
    /// Slots by channel id (control path only).
    by_id: HashMap<ChannelId, SocketId>,
    /// Whether new channels are refused.
    draining: bool,
    /// Channels opened since start.
    opened: u64,
    /// Drops of every channel, and those with no channel.
    drops: DropCounts,
    /// Global histograms.
    hist: GlobalHistograms,
    /// Counters of closed channels.
    closed: ClosedTotals,
    /// Events not yet polled.
    events: VecDeque<Event>,
    /// When the timer next runs.
    next_timer: MonoTime,
    /// `echo_timeout` in nanoseconds.
    echo_timeout_ns: u64,
    /// `rtt_threshold` in nanoseconds.
    rtt_threshold_ns: u64,
    /// Datagrams forwarded by [`Relay::handle_received`] whose send is not submitted yet; their
    /// forward time and T0 are settled by [`Relay::submitted`].
    unsubmitted: Vec<Unsubmitted>,
    /// Sends queued since the last submission: the place the next queued send takes.
    queued: u32,
    /// Place in the queue of each gathered send (by the backend's batch number), with the
    /// submission it belongs to: an entry of an earlier `submission` is a send still gathering.
    batch_place: Vec<(u32, u32)>,
    /// Submissions reported so far (wrapping), so `batch_place` needs no clearing.
    submission: u32,
    /// Kernel send times: every forwarded datagram's send, waiting for its stamp.
    sends: Sends,
    /// The stamp id of the datagram [`Relay::handle_received`] forwarded last.
    last_send: Option<u32>,
    /// Per gathered send (by the backend's batch number): its first and last datagram's ids.
    chains: Vec<Option<(u32, u32)>>,
    /// How the relay's packets were timed, over all channels.
    stamps: TimestampCounters,
    /// `CLOCK_REALTIME` − the monotonic clock of the arrivals, ns ([`Relay::set_wall_offset`]).
    wall_offset: Option<i64>,
}

/// What [`Relay::handle`] decided about one datagram.
#[derive(Clone, Copy, Debug)]
struct Handled {
    /// Where it goes.
    verdict: Verdict,
    /// The T0 entry it made, if any.
    t0: Option<(Ssrc, u16)>,
    /// A probe's return: where its RTP payload starts in the datagram, and the times to write.
    probe: Option<(usize, RelayTimes)>,
}

impl Relay {
    /// A relay with no channels.
    ///
    /// # Errors
    /// A value of `config` is out of range.
    pub fn new(config: RelayConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let max = config.max_channels;
        Ok(Self {
            channels: (0..max).map(|_| None).collect(),
            free: (0..max).rev().collect(),
            by_id: HashMap::new(),
            draining: false,
            opened: 0,
            drops: DropCounts::default(),
            hist: GlobalHistograms::new(),
            closed: ClosedTotals::default(),
            events: VecDeque::new(),
            next_timer: MonoTime::ZERO,
            echo_timeout_ns: duration_nanos(config.echo_timeout),
            rtt_threshold_ns: duration_nanos(config.rtt_threshold),
            unsubmitted: Vec::with_capacity(UNSUBMITTED_CAPACITY),
            queued: 0,
            batch_place: Vec::new(),
            submission: 0,
            sends: Sends::new(),
            last_send: None,
            chains: Vec::new(),
            stamps: TimestampCounters::default(),
            wall_offset: None,
            config,
        })
    }

    /// The wall clock's offset from the arrivals' monotonic clock: `CLOCK_REALTIME` − monotonic,
    /// in nanoseconds, the very offset the backend converts kernel receive stamps with (so that
    /// `arrival + offset` is the kernel's stamp again, exactly). Set before each batch's
    /// datagrams; `None` (the start) leaves probes unwritten. The times the relay writes into
    /// probes are `CLOCK_REALTIME`: a step of the wall clock between a probe's arrival and its
    /// echo's shifts one time against the other (the relay loop it records, from the monotonic
    /// arrivals, does not move).
    pub fn set_wall_offset(&mut self, offset_ns: Option<i64>) {
        self.wall_offset = offset_ns;
    }

    /// The settings in force.
    #[must_use]
    pub const fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Channels open.
    #[must_use]
    pub fn channel_count(&self) -> usize {
        self.by_id.len()
    }

    /// The slot of a channel.
    #[must_use]
    pub fn socket_of(&self, channel: &ChannelId) -> Option<SocketId> {
        self.by_id.get(channel).copied()
    }

    /// The tests' shorthand for [`Relay::handle_received`] with the send taken at arrival:
    /// decides the fate of one datagram that arrived on `socket` from `from` at `now`, taking
    /// `now` as its arrival and, for a packet toward the echo, as its T0 at once, so that nothing
    /// waits for a send time (and no forward time or receive delay is recorded). It has the bytes
    /// read-only, so it measures probes but never writes into them (nor counts them written).
    ///
    /// Only in tests and with the `test-util` feature: the backends use `handle_received` and
    /// the send-time API ([`Relay::send_id`], [`Relay::tx_stamped`], [`Relay::submitted`]).
    #[cfg(any(test, feature = "test-util"))]
    pub fn handle_datagram(
        &mut self,
        now: MonoTime,
        socket: SocketId,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Verdict {
        let h = self.handle(now, socket, from, bytes);
        if let (Some((ssrc, seq)), Some(Some(ch))) = (h.t0, self.channels.get_mut(socket.index())) {
            let _ = ch.t0.stamp(ssrc, seq, now);
        }
        h.verdict
    }

    /// Decides the fate of one datagram the kernel received at `arrival` (its receive stamp) and
    /// the relay handled at `handled`. Jitter, lateness and a returning echo's T1 use `arrival`.
    /// A forwarded datagram's forward time and (toward the echo) T0 are settled by its send's
    /// time: with [`SendTimes::Kernel`], its kernel transmit stamp, which the backend asks for
    /// with the id [`Relay::send_id`] gives and reports with [`Relay::tx_stamped`]; with
    /// [`SendTimes::Estimated`], when the backend reports the send submitted
    /// ([`Relay::submitted_between`]).
    ///
    /// A probe's echo on its way back to Asterisk ([`crate::probe`]) gets the relay's two times
    /// written into its header, in `bytes`, which the backend then sends as they are: only on a
    /// recognised probe channel, only into a valid header whose probe's arrival the relay
    /// recorded, and only the header's relay fields. Every other datagram is left as it came.
    pub fn handle_received(
        &mut self,
        arrival: MonoTime,
        handled: MonoTime,
        socket: SocketId,
        from: SocketAddr,
        bytes: &mut [u8],
    ) -> Verdict {
        let Handled { verdict, t0, probe } = self.handle(arrival, socket, from, bytes);
        if let Some((at, times)) = probe {
            let written = bytes
                .get_mut(at..)
                .is_some_and(|payload| probe::write_relay_times(payload, times).is_ok());
            if let (true, Some(Some(ch))) = (written, self.channels.get_mut(socket.index())) {
                ch.probes.written += 1;
            }
        }
        self.await_send(verdict, t0, arrival, handled, socket);
        verdict
    }

    fn handle(
        &mut self,
        now: MonoTime,
        socket: SocketId,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Handled {
        let wall_offset = self.wall_offset;
        let dropped = |verdict| Handled {
            verdict,
            t0: None,
            probe: None,
        };
        let Some(Some(ch)) = self.channels.get_mut(socket.index()) else {
            self.drops.add(DropReason::NoChannel);
            return dropped(Verdict::Drop(DropReason::NoChannel));
        };
        let (direction, latch) = if from == ch.echo {
            (Direction::ToAsterisk, false)
        } else if ch.asterisk == Some(from) {
            (Direction::ToEcho, false)
        } else if ch.asterisk.is_none() && !self.config.strict_source {
            (Direction::ToEcho, true)
        } else {
            return dropped(drop_packet(&mut self.drops, ch, DropReason::UnknownSource));
        };
        let packet = match rtp::parse(bytes) {
            Ok(p) => p,
            Err(e) => return dropped(drop_packet(&mut self.drops, ch, e.into())),
        };
        let to = match direction {
            Direction::ToEcho => ch.echo,
            Direction::ToAsterisk => match ch.asterisk {
                Some(a) => a,
                None => {
                    return dropped(drop_packet(
                        &mut self.drops,
                        ch,
                        DropReason::NoAsteriskAddress,
                    ))
                }
            },
        };
        if latch {
            ch.asterisk = Some(from);
            ch.latched = true;
        }
        ch.last_media = now;
        let traffic = ch.traffic.get_mut(direction);
        traffic.packets += 1;
        traffic.bytes += bytes.len() as u64;
        let (t0, probe) = match packet {
            Packet::Rtcp(_) => {
                traffic.rtcp += 1;
                (None, None)
            }
            Packet::Rtp(p) => {
                let t0 = measure(
                    ch,
                    &mut self.hist,
                    &mut self.stamps,
                    self.echo_timeout_ns,
                    self.rtt_threshold_ns,
                    now,
                    direction,
                    &p,
                )
                .then_some((p.ssrc, p.sequence));
                let probe = probe_header(ch, &mut self.hist, now, wall_offset, direction, &p)
                    .map(|times| (payload_start(bytes.len(), &p), times));
                (t0, probe)
            }
        };
        Handled {
            verdict: Verdict::Forward { to, direction },
            t0,
            probe,
        }
    }

    /// Counts a datagram the backend dropped before it could reach the core (for instance one
    /// still in flight for a channel that was just removed: `NoChannel`).
    pub fn count_drop(&mut self, reason: DropReason) {
        self.drops.add(reason);
    }

    /// Executes a control command.
    pub fn handle_command(&mut self, now: MonoTime, command: Command) -> CommandOutcome {
        match command {
            Command::Hello(_) => CommandOutcome::Reply(Ok(crate::control::hello_response(None))),
            Command::Add(add) => match self.reserve(add) {
                Ok(pending) => CommandOutcome::Open(pending),
                Err(e) => CommandOutcome::Reply(Err(e)),
            },
            Command::Update(u) => CommandOutcome::Reply(self.update(&u.channel, u.asterisk)),
            Command::Remove(r) => match self.close(now, &r.channel, CloseReason::Removed) {
                Some((socket, stats, figures)) => CommandOutcome::Close {
                    socket,
                    reply: Ok(Response::Removed {
                        stats,
                        figures: Some(figures),
                    }),
                },
                None => CommandOutcome::Reply(Err(ErrorReply::unknown_channel(&r.channel))),
            },
            Command::Interim => CommandOutcome::Reply(Ok(Response::Interim {
                channels: self
                    .channels
                    .iter()
                    .flatten()
                    .map(|c| c.figures(now))
                    .collect(),
            })),
            Command::List => {
                let mut channels: Vec<ChannelInfo> =
                    self.channels.iter().flatten().map(|c| c.info()).collect();
                channels.sort_by(|a, b| a.channel.cmp(&b.channel));
                CommandOutcome::Reply(Ok(Response::Channels { channels }))
            }
            Command::Stats(q) => CommandOutcome::Reply(match q.channel {
                None => Ok(Response::Global {
                    stats: Box::new(self.global_stats()),
                }),
                Some(id) => self
                    .channel(&id)
                    .map(|c| Response::Channel {
                        stats: Box::new(c.stats(now)),
                    })
                    .ok_or_else(|| ErrorReply::unknown_channel(&id)),
            }),
            Command::Drain => {
                self.draining = true;
                CommandOutcome::Reply(Ok(Response::Draining {
                    active: u32::try_from(self.channel_count()).unwrap_or(u32::MAX),
                }))
            }
        }
    }

    /// Validates an `add` and reserves a slot for it.
    fn reserve(&mut self, add: AddChannel) -> Result<PendingOpen, ErrorReply> {
        if self.draining {
            return Err(ErrorReply::new(
                ErrorCode::Draining,
                "the relay is draining and takes no new channels",
            ));
        }
        if self.by_id.contains_key(&add.channel) {
            return Err(ErrorReply::duplicate_channel(&add.channel));
        }
        let echo = add.echo.unwrap_or(self.config.default_echo);
        if !usable(echo) {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("echo address {echo} is not a usable destination"),
            ));
        }
        if let Some(a) = add.asterisk {
            check_asterisk(a, echo)?;
        }
        let Some(slot) = self.free.pop() else {
            return Err(ErrorReply::new(
                ErrorCode::Limit,
                format!("{} channels open, the maximum", self.config.max_channels),
            ));
        };
        Ok(PendingOpen {
            socket: SocketId(slot),
            request: AddChannel {
                echo: Some(echo),
                ..add
            },
        })
    }

    /// Finishes an `add` once the backend has tried to bind: `bound` is the local port it bound,
    /// or the error to reply with. Returns the reply.
    pub fn complete_open(
        &mut self,
        now: MonoTime,
        pending: PendingOpen,
        bound: Result<u16, ErrorReply>,
    ) -> Result<Response, ErrorReply> {
        let PendingOpen { socket, request } = pending;
        let port = match bound {
            Ok(port) => port,
            Err(e) => {
                self.free.push(socket.0);
                return Err(e);
            }
        };
        let Some(entry) = self.channels.get_mut(socket.index()) else {
            return Err(ErrorReply::new(ErrorCode::Internal, "slot out of range"));
        };
        if entry.is_some() || self.by_id.contains_key(&request.channel) {
            self.free.push(socket.0);
            return Err(ErrorReply::new(
                ErrorCode::Internal,
                "slot or channel id taken while the socket was bound",
            ));
        }
        let config = &self.config;
        let streams = PerDirection {
            to_echo: Stream::new(request.format, config),
            to_asterisk: Stream::new(request.format, config),
        };
        *entry = Some(Box::new(Channel {
            id: request.channel.clone(),
            socket,
            shard: config.shard,
            tag: crate::tag::make(socket.0, u32::try_from(self.opened).unwrap_or(0)),
            tagged: [None; 2],
            port,
            format: request.format,
            asterisk: request.asterisk,
            latched: false,
            echo: request.echo.unwrap_or(config.default_echo),
            opened: now,
            last_media: now,
            t0: T0Table::new(config.t0_slots),
            anchor: None,
            streams,
            traffic: PerDirection::default(),
            round_trip: EchoCounters::default(),
            timestamps: TimestampCounters::default(),
            drops: DropCounts::default(),
            rtt: LatencyHistogram::new(2),
            probes: Probes::default(),
        }));
        self.by_id.insert(request.channel.clone(), socket);
        self.opened += 1;
        if self.by_id.len() == 1 {
            self.next_timer = now + config.timer_interval;
        }
        Ok(Response::Added {
            channel: request.channel,
            port,
            socket: socket.0,
            shard: self.config.shard,
        })
    }

    fn update(&mut self, id: &ChannelId, asterisk: SocketAddr) -> Result<Response, ErrorReply> {
        let ch = self
            .by_id
            .get(id)
            .and_then(|s| self.channels.get_mut(s.index()))
            .and_then(Option::as_mut)
            .ok_or_else(|| ErrorReply::unknown_channel(id))?;
        check_asterisk(asterisk, ch.echo)?;
        ch.asterisk = Some(asterisk);
        ch.latched = false;
        Ok(Response::Updated {
            channel: id.clone(),
            asterisk,
        })
    }

    fn channel(&self, id: &ChannelId) -> Option<&Channel> {
        let s = self.by_id.get(id)?;
        self.channels.get(s.index())?.as_deref()
    }

    /// Removes a channel: entries still waiting for their echo time out; its counters join the
    /// closed totals; its slot is freed.
    fn close(
        &mut self,
        now: MonoTime,
        id: &ChannelId,
        reason: CloseReason,
    ) -> Option<(SocketId, Box<ChannelStats>, Box<ChannelFigures>)> {
        let socket = self.by_id.remove(id)?;
        let mut ch = self.channels.get_mut(socket.index())?.take()?;
        let (timeouts, unmeasured) = ch.t0.expire_all();
        ch.round_trip.timeouts += timeouts;
        // Echoes back whose stamp had not come: the channel counts them here; the relay when it
        // gives up on their sends.
        ch.round_trip.unmeasured += unmeasured;
        ch.timestamps.missing.no_stamp += unmeasured;
        count_unreturned_tail(&mut ch);
        let stats = ch.stats(now);
        let figures = Box::new(ChannelFigures::new(&stats, &ch.rtt));
        let c = &mut self.closed;
        for d in Direction::ALL {
            c.traffic.get_mut(d).accumulate(stats.traffic.get(d));
            c.streams.get_mut(d).accumulate(stats.streams.get(d));
        }
        c.round_trip.accumulate(&stats.round_trip);
        if let Some(p) = &stats.probe {
            c.probe.add_closed(p);
        }
        self.hist.calls.observe(stats.score);
        match reason {
            CloseReason::Removed => c.removed += 1,
            CloseReason::Idle => c.idle += 1,
        }
        self.free.push(socket.0);
        Some((socket, Box::new(stats), figures))
    }

    /// When [`Relay::handle_timeout`] should next run; `None` while there are no channels.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<MonoTime> {
        (!self.by_id.is_empty()).then_some(self.next_timer)
    }

    /// Runs the timer if it is due: times out T0 entries older than the echo timeout and closes
    /// channels idle for the idle timeout (reported by [`Relay::poll_event`]).
    pub fn handle_timeout(&mut self, now: MonoTime) {
        if now < self.next_timer {
            return;
        }
        self.next_timer = now + self.config.timer_interval;
        let deadline = MonoTime::from_nanos(now.as_nanos().saturating_sub(self.echo_timeout_ns));
        let (channels, stamps) = (&mut self.channels, &mut self.stamps);
        self.sends.sweep(deadline, |r| {
            give_up(channels, stamps, r, MissingKind::NoStamp);
        });
        let idle_ns = duration_nanos(self.config.idle_timeout);
        let mut idle = Vec::new();
        for ch in self.channels.iter_mut().flatten() {
            ch.round_trip.timeouts += ch.t0.sweep(deadline);
            if now.nanos_since(ch.last_media) >= idle_ns {
                idle.push(ch.id.clone());
            }
        }
        for id in idle {
            if let Some((socket, stats, _)) = self.close(now, &id, CloseReason::Idle) {
                self.events.push_back(Event::ChannelClosed {
                    socket,
                    reason: CloseReason::Idle,
                    stats,
                });
            }
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// One channel's statistics.
    #[must_use]
    pub fn channel_stats(&self, now: MonoTime, id: &ChannelId) -> Option<ChannelStats> {
        self.channel(id).map(|c| c.stats(now))
    }

    /// Statistics over every channel, open and closed.
    #[must_use]
    pub fn global_stats(&self) -> GlobalStats {
        let c = &self.closed;
        let mut traffic = c.traffic;
        let mut streams = c.streams;
        let mut round_trip = c.round_trip;
        let mut probe = c.probe;
        for ch in self.channels.iter().flatten() {
            for d in Direction::ALL {
                traffic.get_mut(d).accumulate(ch.traffic.get(d));
                streams.get_mut(d).accumulate(&ch.streams.get(d).counters());
            }
            round_trip.accumulate(&ch.round_trip);
            ch.probes.count_into(&mut probe);
        }
        let mut g = GlobalStats {
            channels: u32::try_from(self.by_id.len()).unwrap_or(u32::MAX),
            draining: self.draining,
            channels_opened: self.opened,
            channels_removed: c.removed,
            channels_idle: c.idle,
            traffic,
            streams,
            round_trip,
            drops: self.drops,
            timestamps: self.stamps,
            probe,
            ..GlobalStats::default()
        };
        self.hist.summarize_into(&mut g);
        g
    }

    /// The global histograms (nanoseconds), for exporters.
    #[must_use]
    pub const fn histograms(&self) -> &GlobalHistograms {
        &self.hist
    }

    /// Statistics of every open channel, ordered by channel id.
    #[must_use]
    pub fn all_channel_stats(&self, now: MonoTime) -> Vec<ChannelStats> {
        let mut v: Vec<ChannelStats> = self
            .channels
            .iter()
            .flatten()
            .map(|c| c.stats(now))
            .collect();
        v.sort_by(|a, b| a.channel.cmp(&b.channel));
        v
    }
}

fn drop_packet(global: &mut DropCounts, ch: &mut Channel, reason: DropReason) -> Verdict {
    global.add(reason);
    ch.drops.add(reason);
    Verdict::Drop(reason)
}

fn check_asterisk(asterisk: SocketAddr, echo: SocketAddr) -> Result<(), ErrorReply> {
    if !usable(asterisk) {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!("asterisk address {asterisk} is not a usable destination"),
        ));
    }
    if asterisk == echo {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!("asterisk and echo are the same address {echo}"),
        ));
    }
    Ok(())
}
