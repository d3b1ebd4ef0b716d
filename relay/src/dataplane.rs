//! What both backends share: the messages the control thread sends the data plane, the clock,
//! channel-socket binding, the backend's own counters, and the handling of commands and timer
//! events against the core, so that the io_uring and tokio backends differ only in their I/O.

use std::io;
use std::net::{IpAddr, UdpSocket};
use std::sync::Arc;

use relay_proto::relay::GlobalHistograms;
use relay_proto::{
    ChannelId, ChannelStats, Command, ErrorCode, ErrorReply, GlobalStats, MonoTime, Relay, Response,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Publisher;

use relay_io::ring::EventFd;

/// A request from the control thread to the data plane.
#[derive(Debug)]
pub enum CtlMsg {
    /// Execute a control command and send back its reply.
    Command {
        /// The command.
        command: Command,
        /// Where the reply goes.
        reply: oneshot::Sender<Result<Response, ErrorReply>>,
    },
    /// Send back this shard's global and per-channel statistics (for `/stats`), and for the
    /// relay-wide `stats`, its histograms.
    Snapshot {
        /// Where the statistics go.
        reply: oneshot::Sender<ShardDoc>,
    },
    /// Stop: reply with the final statistics.
    Shutdown {
        /// Where the final statistics go.
        reply: oneshot::Sender<ShardStats>,
    },
}

/// One shard's statistics with the histograms behind their percentiles, so that several shards'
/// can be merged exactly ([`relay_proto::merge_global`]).
#[derive(Debug)]
pub struct ShardStats {
    /// The shard's global statistics.
    pub stats: GlobalStats,
    /// Its global histograms.
    pub hist: Box<GlobalHistograms>,
}

/// What one shard reports for `/stats`.
#[derive(Debug)]
pub struct ShardDoc {
    /// Its global statistics and histograms.
    pub global: ShardStats,
    /// Its backend's counters.
    pub counters: BackendCounters,
    /// Its open channels.
    pub channels: Vec<ChannelStats>,
}

/// Where a shard reports the channels it closed on its own (idle), so the control thread's
/// placement forgets them: (shard, channel).
pub type ClosedTx = mpsc::UnboundedSender<(u32, ChannelId)>;

/// Everything one shard's loop runs on, whichever backend drives it.
#[derive(Debug)]
pub struct Shard {
    /// The core, with this shard's slice of the channel limit.
    pub relay: Relay,
    /// Control requests for this shard.
    pub rx: mpsc::UnboundedReceiver<CtlMsg>,
    /// Publishes this shard's metrics snapshot.
    pub publisher: Publisher,
    /// Where channel sockets bind.
    pub bind: BindConfig,
    /// Channels closed for idleness go here.
    pub closed: ClosedTx,
}

/// How the control thread reaches the data plane: a lock-free queue, plus an eventfd for the
/// io_uring backend, which sleeps in `io_uring_enter` rather than in tokio.
#[derive(Clone, Debug)]
pub struct Handle {
    /// The queue.
    tx: mpsc::UnboundedSender<CtlMsg>,
    /// Wakes the ring after a message is queued.
    waker: Option<Arc<EventFd>>,
}

impl Handle {
    /// A handle over `tx`, waking `waker` (if any) after each message.
    #[must_use]
    pub fn new(tx: mpsc::UnboundedSender<CtlMsg>, waker: Option<Arc<EventFd>>) -> Self {
        Self { tx, waker }
    }

    /// Queues a message.
    ///
    /// # Errors
    /// The data plane has stopped.
    pub fn send(&self, msg: CtlMsg) -> Result<(), Stopped> {
        self.tx.send(msg).map_err(|_| Stopped)?;
        if let Some(w) = &self.waker {
            w.notify();
        }
        Ok(())
    }

    /// Executes a command on the data plane and waits for its reply.
    pub async fn command(&self, command: Command) -> Result<Response, ErrorReply> {
        let (reply, rx) = oneshot::channel();
        let stopped = || ErrorReply::new(ErrorCode::Internal, "the data plane has stopped");
        self.send(CtlMsg::Command { command, reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// The data plane is gone.
#[derive(Debug, thiserror::Error)]
#[error("the data plane has stopped")]
pub struct Stopped;

/// The monotonic clock the I/O layer reads, as [`MonoTime`] since the relay started, and the
/// conversion of the kernel's receive stamps to it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock {
    /// The monotonic clock.
    mono: relay_io::Clock,
    /// Kernel stamps → monotonic time, re-sampled every batch.
    wall: relay_io::WallToMono,
}

impl Clock {
    /// A clock starting now, with no sample yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Now.
    #[must_use]
    pub fn now(&self) -> MonoTime {
        MonoTime::from_nanos(self.mono.now_ns())
    }

    /// Re-samples the realtime − monotonic offset (once per batch, after the wait and before
    /// the batch's datagrams are read) and gives it to the core, which writes probes' arrivals
    /// on the wall clock with it (`arrival + offset`: the kernel's stamp itself); returns now,
    /// and counts a wall-clock step in `counters`.
    pub fn resample(&mut self, relay: &mut Relay, counters: &mut BackendCounters) -> MonoTime {
        let s = self.mono.sample();
        if self.wall.resample(s) {
            counters.clock_steps += 1;
            tracing::warn!(
                "the wall clock stepped: this batch's arrivals are taken at handling time \
                 (rtprelay_clock_steps_total)"
            );
        }
        relay.set_wall_offset(self.wall.offset_ns().and_then(|o| i64::try_from(o).ok()));
        MonoTime::from_nanos(s.mono_after)
    }

    /// A kernel transmit stamp on the monotonic clock; `None` when it cannot be trusted (a step
    /// of the wall clock in this batch, or out of range), which the core counts as missing.
    #[must_use]
    pub fn convert(&self, t: relay_io::WallTime) -> Option<MonoTime> {
        self.wall.to_mono(t).map(MonoTime::from_nanos)
    }

    /// The arrival of a datagram whose control messages are `control`: the kernel's stamp on
    /// the monotonic clock, or `handled` where there is none or it cannot be trusted (counted).
    pub fn arrival(
        &self,
        control: &[u8],
        handled: MonoTime,
        counters: &mut BackendCounters,
    ) -> MonoTime {
        match relay_io::rx_timestamp(control) {
            Ok(Some(t)) => match self.wall.to_mono(t) {
                Some(ns) => MonoTime::from_nanos(ns),
                None => {
                    counters.untrusted_timestamps += 1;
                    handled
                }
            },
            Ok(None) | Err(_) => {
                counters.missing_timestamps += 1;
                handled
            }
        }
    }
}

/// A transmit stamp read from an error queue or an io_uring completion: to the core, converted
/// to its clock (a stamp that cannot be converted is counted missing there); an entry that held
/// no usable stamp is counted.
pub fn take_stamp(
    relay: &mut Relay,
    counters: &mut BackendCounters,
    clock: &Clock,
    stamp: Result<relay_io::TxStamp, relay_io::TxStampError>,
) {
    match stamp {
        Ok(st) => {
            counters.tx_stamps += 1;
            relay.tx_stamped(st.id, clock.convert(st.at));
        }
        Err(_) => counters.bad_stamps += 1,
    }
}

/// Binds a channel's UDP socket on `ip:port` (see [`relay_io::bind_udp`]) and turns a failure
/// into the reply control gets.
///
/// # Errors
/// `port_in_use` when the port is taken, `io` for anything else, with the system's message.
pub fn bind_channel_socket(ip: IpAddr, port: u16, rcvbuf: usize) -> Result<UdpSocket, ErrorReply> {
    relay_io::bind_udp(ip, port, rcvbuf).map_err(|e| {
        let code = if e.kind() == io::ErrorKind::AddrInUse {
            ErrorCode::PortInUse
        } else {
            ErrorCode::Io
        };
        ErrorReply::new(code, e.to_string())
    })
}

/// Counters only the backend can keep.
#[derive(Clone, Debug, Serialize)]
pub struct BackendCounters {
    /// Wake-ups of the data plane (ring waits returning, or socket readiness events).
    pub wakeups: u64,
    /// Completions (or datagrams) handled per wake-up: counts in power-of-two buckets, bucket i
    /// holding sizes in (2^(i-1), 2^i].
    pub batch_buckets: [u64; BATCH_BUCKETS],
    /// Sum of all batch sizes.
    pub batch_sum: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// Of those, by errno (index: the errno, up to [`ERRNO_SLOTS`]; larger ones in the last).
    #[serde(serialize_with = "errno_counts")]
    pub send_errnos: [u64; ERRNO_SLOTS],
    /// Receives that failed with an error other than running out of buffers.
    pub recv_errors: u64,
    /// Datagrams longer than a receive buffer, dropped.
    pub oversize: u64,
    /// Multishot receives re-armed after they ran out of buffers.
    pub rearm_nobufs: u64,
    /// Multishot receives re-armed for any other reason (CQ overflow, errors).
    pub rearm_other: u64,
    /// `io_uring_enter` calls (io_uring backend): the waits, and the submissions of a batch's
    /// sends that kernel timestamps give an enter of their own.
    pub enters: u64,
    /// Steps of the wall clock seen while converting kernel stamps.
    pub clock_steps: u64,
    /// Datagrams that came without a kernel timestamp (kernel mode): their arrival is the
    /// moment they were handled.
    pub missing_timestamps: u64,
    /// Kernel stamps refused (in the future, too old, or in a batch with a clock step): their
    /// arrival is the moment they were handled.
    pub untrusted_timestamps: u64,
    /// Kernel transmit stamps read (from the ring's command or the error queues).
    pub tx_stamps: u64,
    /// Transmit-stamp completions or error-queue entries that held no usable stamp.
    pub bad_stamps: u64,
    /// Transmit-stamp commands (`--tx-stamps command`) re-armed after they ended.
    pub stamp_rearms: u64,
}

impl Default for BackendCounters {
    fn default() -> Self {
        Self {
            wakeups: 0,
            batch_buckets: [0; BATCH_BUCKETS],
            batch_sum: 0,
            send_errors: 0,
            send_errnos: [0; ERRNO_SLOTS],
            recv_errors: 0,
            oversize: 0,
            rearm_nobufs: 0,
            rearm_other: 0,
            enters: 0,
            clock_steps: 0,
            missing_timestamps: 0,
            untrusted_timestamps: 0,
            tx_stamps: 0,
            bad_stamps: 0,
            stamp_rearms: 0,
        }
    }
}

/// Batch-size buckets: 1, 2, 4, … 2^15 and above.
pub const BATCH_BUCKETS: usize = 17;

/// Errno values counted one by one (Linux's go up to 133); the last slot takes any above.
pub const ERRNO_SLOTS: usize = 136;

/// Serialises per-errno counts as `{"ECONNREFUSED": 3, …}`, the non-zero ones only.
fn errno_counts<S: serde::Serializer>(
    counts: &[u64; ERRNO_SLOTS],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(e, n)| (errno_name(e), n)),
    )
}

/// The symbolic name of `errno`, as the `errno` label of `rtprelay_send_errors_total`.
#[must_use]
pub fn errno_name(errno: usize) -> String {
    let known = [
        (libc::EPERM, "EPERM"),
        (libc::EINTR, "EINTR"),
        (libc::EBADF, "EBADF"),
        (libc::EAGAIN, "EAGAIN"),
        (libc::ENOMEM, "ENOMEM"),
        (libc::EACCES, "EACCES"),
        (libc::EFAULT, "EFAULT"),
        (libc::EINVAL, "EINVAL"),
        (libc::EPIPE, "EPIPE"),
        (libc::EMSGSIZE, "EMSGSIZE"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::EDESTADDRREQ, "EDESTADDRREQ"),
        (libc::ENOBUFS, "ENOBUFS"),
        (libc::ECONNREFUSED, "ECONNREFUSED"),
        (libc::ENETUNREACH, "ENETUNREACH"),
        (libc::EHOSTUNREACH, "EHOSTUNREACH"),
        (libc::EADDRNOTAVAIL, "EADDRNOTAVAIL"),
        (libc::ECANCELED, "ECANCELED"),
    ];
    known
        .iter()
        .find(|(n, _)| usize::try_from(*n).is_ok_and(|n| n == errno))
        .map_or_else(|| format!("errno_{errno}"), |(_, s)| (*s).to_owned())
}

/// Logs refused sends at most once a second, with their errno and what was suppressed.
#[derive(Debug, Default)]
pub struct SendErrorLog {
    /// When the last line was written.
    last: Option<MonoTime>,
    /// Errors not logged since.
    suppressed: u64,
}

impl SendErrorLog {
    /// Counts a send refused with `errno` (positive) on channel slot `slot`, logging it unless
    /// a line was written less than a second ago.
    pub fn note(
        &mut self,
        counters: &mut BackendCounters,
        now: MonoTime,
        errno: i32,
        slot: u32,
        direction: relay_proto::Direction,
    ) {
        counters.send_errors += 1;
        let i = usize::try_from(errno).unwrap_or(0).min(ERRNO_SLOTS - 1);
        if let Some(n) = counters.send_errnos.get_mut(i) {
            *n += 1;
        }
        if self
            .last
            .is_some_and(|t| now.nanos_since(t) < 1_000_000_000)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            errno = %errno_name(i),
            slot,
            direction = direction.as_str(),
            suppressed = self.suppressed,
            "a send was refused: {} (rtprelay_send_errors_total; at most one line a second)",
            io::Error::from_raw_os_error(errno)
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

impl BackendCounters {
    /// Adds `other`'s counts (several shards as one relay).
    pub fn accumulate(&mut self, other: &Self) {
        // Destructured, so that a new counter cannot be left out of the sum.
        let Self {
            wakeups,
            batch_buckets,
            batch_sum,
            send_errors,
            send_errnos,
            recv_errors,
            oversize,
            rearm_nobufs,
            rearm_other,
            enters,
            clock_steps,
            missing_timestamps,
            untrusted_timestamps,
            tx_stamps,
            bad_stamps,
            stamp_rearms,
        } = other;
        for (a, b) in self.batch_buckets.iter_mut().zip(batch_buckets) {
            *a += b;
        }
        for (a, b) in self.send_errnos.iter_mut().zip(send_errnos) {
            *a += b;
        }
        for (a, b) in [
            (&mut self.wakeups, wakeups),
            (&mut self.batch_sum, batch_sum),
            (&mut self.send_errors, send_errors),
            (&mut self.recv_errors, recv_errors),
            (&mut self.oversize, oversize),
            (&mut self.rearm_nobufs, rearm_nobufs),
            (&mut self.rearm_other, rearm_other),
            (&mut self.enters, enters),
            (&mut self.clock_steps, clock_steps),
            (&mut self.missing_timestamps, missing_timestamps),
            (&mut self.untrusted_timestamps, untrusted_timestamps),
            (&mut self.tx_stamps, tx_stamps),
            (&mut self.bad_stamps, bad_stamps),
            (&mut self.stamp_rearms, stamp_rearms),
        ] {
            *a += b;
        }
    }

    /// Records one wake-up that handled `n` completions.
    pub fn batch(&mut self, n: usize) {
        self.wakeups += 1;
        self.batch_sum += n as u64;
        let i = (usize::BITS - n.saturating_sub(1).leading_zeros()) as usize;
        if let Some(b) = self.batch_buckets.get_mut(i.min(BATCH_BUCKETS - 1)) {
            *b += 1;
        }
    }
}

/// What a backend must do after a command: nothing, open a socket, or close one.
pub use relay_proto::CommandOutcome;

/// The backend's side of opening and closing channel sockets.
pub trait SocketTable {
    /// Starts receiving on `socket` for channel slot `id`.
    ///
    /// # Errors
    /// The backend could not take the socket (the reply to send).
    fn open(&mut self, id: relay_proto::SocketId, socket: UdpSocket) -> Result<(), ErrorReply>;
    /// Stops receiving on slot `id` and closes its socket.
    fn close(&mut self, id: relay_proto::SocketId);
}

/// Shared echo leg: most datagrams in one GSO send (the kernel's UDP_MAX_SEGMENTS is 64 or more).
pub const MAX_SEGMENTS: usize = 64;
/// Shared echo leg: most bytes in one GSO send (under the 64 KiB of one UDP datagram).
pub const MAX_GSO_BYTES: usize = 65_000;

/// Where channel sockets bind.
#[derive(Clone, Copy, Debug)]
pub struct BindConfig {
    /// Address.
    pub ip: IpAddr,
    /// SO_RCVBUF in bytes.
    pub rcvbuf: usize,
    /// Ask the kernel for receive timestamps on every channel socket (the core's `send_times`
    /// says whether sends are stamped too).
    pub timestamps: bool,
    /// io_uring: collect transmit stamps with the ring's command rather than from error queues.
    pub stamp_command: bool,
    /// One shared socket per shard toward the echo (`--echo-leg shared`).
    pub shared_echo: bool,
}

/// Executes one command against the core, opening or closing sockets as it says.
pub fn execute(
    relay: &mut Relay,
    table: &mut impl SocketTable,
    bind: BindConfig,
    now: MonoTime,
    command: Command,
) -> Result<Response, ErrorReply> {
    match relay.handle_command(now, command) {
        CommandOutcome::Reply(r) => r,
        CommandOutcome::Close { socket, reply } => {
            table.close(socket);
            reply
        }
        CommandOutcome::Open(pending) => {
            let id = pending.socket();
            let mut opened = false;
            let bound = bind_channel_socket(bind.ip, pending.port(), bind.rcvbuf).and_then(|s| {
                if bind.timestamps {
                    if let Err(e) = relay_io::enable_rx_timestamps(&s) {
                        warn_timestamps_refused(&e);
                    }
                }
                let port = s
                    .local_addr()
                    .map_err(|e| ErrorReply::new(ErrorCode::Io, format!("local address: {e}")))?
                    .port();
                table.open(id, s)?;
                opened = true;
                Ok(port)
            });
            let reply = relay.complete_open(now, pending, bound);
            if reply.is_err() && opened {
                table.close(id);
            }
            if let Ok(Response::Added { channel, port, .. }) = &reply {
                tracing::debug!(%channel, port, "channel added");
            }
            reply
        }
    }
}

/// Logs, once per process, that a channel socket refused kernel timestamps (its datagrams are
/// then taken at handling time and counted in `rtprelay_timestamps_missing_total`).
fn warn_timestamps_refused(e: &io::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!("a channel socket refused SO_TIMESTAMPNS ({e}); its arrivals are user time");
    });
}

/// Whether the kernel gives UDP sockets receive timestamps here; why not, if it does not.
///
/// # Errors
/// The probe socket could not be made, or the option was refused.
pub fn probe_timestamps(ip: IpAddr) -> io::Result<()> {
    let s = relay_io::bind_udp(ip, 0, 4096)?;
    relay_io::enable_rx_timestamps(&s)
}

/// Whether the kernel stamps UDP sends here with the id each carries (SO_TIMESTAMPING with
/// OPT_ID, OPT_TSONLY and OPT_RX_FILTER, and SCM_TS_OPT_ID: Linux 6.13+); why not, if it does not.
///
/// # Errors
/// See [`relay_io::probe_tx_stamps`].
pub fn probe_tx_timestamps(ip: IpAddr) -> io::Result<()> {
    relay_io::probe_tx_stamps(ip)
}

/// Closes the sockets of channels the core closed on its own (idle), logging their statistics
/// and telling the control thread's placement.
pub fn close_expired(relay: &mut Relay, table: &mut impl SocketTable, closed: &ClosedTx) {
    while let Some(relay_proto::Event::ChannelClosed {
        socket,
        reason,
        stats,
    }) = relay.poll_event()
    {
        table.close(socket);
        let _ = closed.send((relay.config().shard, stats.channel.clone()));
        tracing::info!(
            channel = %stats.channel,
            shard = relay.config().shard,
            reason = reason.as_str(),
            rtt_p50_us = stats.rtt.p50_ns / 1_000,
            lost = stats.streams.to_asterisk.lost,
            "channel closed"
        );
    }
}

/// This shard's final or current statistics, with its histograms.
#[must_use]
pub fn shard_stats(relay: &Relay) -> ShardStats {
    ShardStats {
        stats: relay.global_stats(),
        hist: Box::new(relay.histograms().clone()),
    }
}

/// This shard's part of the `/stats` document.
#[must_use]
pub fn shard_doc(relay: &Relay, counters: &BackendCounters, now: MonoTime) -> ShardDoc {
    ShardDoc {
        global: shard_stats(relay),
        counters: counters.clone(),
        channels: relay.all_channel_stats(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_fall_in_power_of_two_buckets() {
        let mut c = BackendCounters::default();
        for n in [0, 1, 2, 3, 4, 5, 1000, 1 << 20] {
            c.batch(n);
        }
        assert_eq!(c.batch_buckets[0], 2, "0 and 1");
        assert_eq!(c.batch_buckets[1], 1, "2");
        assert_eq!(c.batch_buckets[2], 2, "3 and 4");
        assert_eq!(c.batch_buckets[3], 1, "5");
        assert_eq!(c.batch_buckets[10], 1, "1000 ≤ 1024");
        assert_eq!(c.batch_buckets[16], 1, "the rest");
        assert_eq!(c.wakeups, 8);
    }

    #[test]
    fn a_taken_port_is_port_in_use() {
        let a = bind_channel_socket("127.0.0.1".parse().unwrap(), 0, 65_536).unwrap();
        let port = a.local_addr().unwrap().port();
        let e = bind_channel_socket("127.0.0.1".parse().unwrap(), port, 65_536).unwrap_err();
        assert_eq!(e.code, ErrorCode::PortInUse);
        assert!(e.message.contains(&port.to_string()));
    }
}
