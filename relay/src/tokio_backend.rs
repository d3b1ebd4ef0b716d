//! The tokio baseline: the same core driven the way a careful tokio user would drive it.
//!
//! A current-thread runtime per shard, on the shard's pinned core, one task per channel socket.
//! Each task waits for readiness, then drains the socket with `try_recv_from` into a buffer it
//! reuses, asks the core (which may write a probe's times into its echo there), and answers with
//! `try_send_to` (falling back to an awaited send only when the socket is full). No allocation per
//! packet, no lock: the core lives in an `Rc<RefCell<_>>` shared by the tasks of this one thread,
//! never borrowed across an `.await`.
//!
//! It exists so that `bench` compares only the I/O layer: same core, same sockets, same
//! measurement; the differences are readiness + one syscall per datagram each way here, against
//! batched completions there.
//!
//! Time: datagrams are read with `recvmsg` and their control messages; the realtime − monotonic
//! offset is re-sampled right after each read (so every stamp precedes its sample), and the
//! arrival is the kernel's receive stamp. Each forwarded datagram's `sendmsg` carries the stamp
//! id the core gives it (`SCM_TS_OPT_ID`), and its kernel transmit stamp comes back on the
//! socket's error queue: each channel task waits for error readiness beside read readiness and
//! hands every stamp to the core (`Relay::tx_stamped`): T0 toward the echo, and the end of the
//! forward time. With `--timestamps user` (estimated send times, kept for comparison) a send is
//! instead taken to leave a quarter into its `sendmsg` (the clock read just before and just
//! after it; see `Relay::submitted_between`).
//!
//! Shared echo leg (`--echo-leg shared`): channel tasks do not send toward the echo. Each writes
//! its channel's tag over the SSRC and appends the datagram to the shard's one GSO batch (equal
//! sizes to one address; anything else sends the batch first); the first datagram of a batch
//! wakes a flusher task, which the scheduler runs after the tasks already woken by the same poll
//! of the reactor, so a batch collects what one tick of the runtime received, and leaves as one
//! `sendmsg` with UDP_SEGMENT (its datagrams' T0: that send's one transmit stamp). One more task reads the
//! shared socket (UDP_GRO: a coalesced batch is one read), cuts each read by its segment size,
//! restores each datagram's SSRC from its tag, and sends it from its channel's socket.

use std::cell::RefCell;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::AsRawFd as _;
use std::rc::Rc;
use std::time::Duration;

use relay_io::SendOpts;
use relay_proto::{
    Direction, DropReason, ErrorCode, ErrorReply, GlobalStats, MonoTime, Relay, SendTimes,
    SocketId, Verdict,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, LocalSet};

use crate::arrival::{take_stamp, ArrivalClock};
use crate::counters::{BackendCounters, SendErrorLog};
use crate::shard::{self, Shard, ShardRequest};
use crate::sockets::{execute, BindConfig, SocketTable, MAX_GSO_BYTES, MAX_SEGMENTS};
use relay_io::ring::MAX_PAYLOAD;

/// The one GSO batch of a shard's shared echo leg, as the core numbers it.
const BATCH: u16 = 0;

/// The state the tasks share.
struct Shared {
    /// The core.
    relay: Relay,
    /// Backend counters.
    counters: BackendCounters,
    /// The clock and the conversion of kernel stamps (one for all tasks of this thread).
    clock: ArrivalClock,
    /// Whether the sockets' sends are stamped by the kernel (set-up only: per datagram the
    /// tasks ask the core, `Relay::unsubmitted`, never the mode).
    tx_stamps: bool,
    /// Refused sends, logged at most once a second.
    send_log: SendErrorLog,
    /// The shared echo leg, with `--echo-leg shared`.
    leg: Option<Leg>,
}

type SharedRef = Rc<RefCell<Shared>>;

impl Shared {
    /// A datagram just read, with control messages `ctl`: (its arrival, the moment it is
    /// handled): the receive stamp, and the clock re-sampled now.
    fn times(&mut self, ctl: &[u8]) -> (MonoTime, MonoTime) {
        let handled = self.clock.resample(&mut self.relay, &mut self.counters);
        (
            self.clock.arrival(ctl, handled, &mut self.counters),
            handled,
        )
    }

    /// The core's verdict on a datagram read at [`Shared::times`] (which it may write into: a
    /// probe's return, sent on as it is then).
    fn decide(
        &mut self,
        (arrival, handled): (MonoTime, MonoTime),
        id: SocketId,
        from: SocketAddr,
        payload: &mut [u8],
    ) -> Verdict {
        self.relay
            .handle_received(arrival, handled, id, from, payload)
    }

    /// Reads every transmit stamp queued on `socket`'s error queue, a batch per system call, and
    /// hands each to the core. `now`: read whether or not the reactor has seen the socket's error
    /// readiness yet (a channel about to close); otherwise through that readiness, which an
    /// empty queue clears.
    fn drain_stamps(&mut self, socket: &UdpSocket, now: bool) {
        // Every stamp read below precedes this sample.
        self.clock.resample(&mut self.relay, &mut self.counters);
        let Self {
            relay,
            counters,
            clock,
            ..
        } = self;
        loop {
            let mut read = || {
                relay_io::recv_tx_stamps(socket, |r| {
                    take_stamp(relay, counters, clock, r);
                })
            };
            let read = if now {
                read()
            } else {
                socket.try_io(Interest::ERROR, || match read() {
                    // Empty: WouldBlock clears the readiness.
                    Ok(0) => Err(std::io::ErrorKind::WouldBlock.into()),
                    r => r,
                })
            };
            if !matches!(read, Ok(relay_io::socket::STAMP_BATCH)) {
                return;
            }
        }
    }
}

/// Channel sockets by slot: for the stamps of a channel about to close, and the shared echo leg's returns (each leaves from its channel's
/// socket). Apart from [`Shared`], which is borrowed while a command opens or closes a socket.
type ChannelSockets = Rc<RefCell<Vec<Option<Rc<UdpSocket>>>>>;

/// A shard's one socket toward the echo and the GSO batch being gathered for it.
struct Leg {
    /// The socket (UDP_GRO on).
    socket: Rc<UdpSocket>,
    /// The gathered datagrams, back to back ([`MAX_GSO_BYTES`] reserved once).
    batch: Vec<u8>,
    /// Where they go.
    to: Option<SocketAddr>,
    /// Size of each.
    size: usize,
    /// How many.
    count: usize,
    /// Wakes the flusher when a batch starts.
    flush: Rc<Notify>,
}

/// The channel tasks, by slot.
struct Tasks {
    /// Shared state, cloned into each task.
    shared: SharedRef,
    /// Abort handles by slot.
    tasks: Vec<Option<AbortHandle>>,
    /// The channel sockets, by slot.
    sockets: Option<ChannelSockets>,
    /// Whether to ask the kernel for transmit stamps.
    tx_stamps: bool,
}

impl SocketTable for Tasks {
    fn open(&mut self, id: SocketId, socket: StdUdpSocket) -> Result<(), ErrorReply> {
        if self.tx_stamps {
            relay_io::enable_tx_timestamps(&socket)
                .map_err(|e| ErrorReply::new(ErrorCode::Io, format!("transmit stamps: {e}")))?;
        }
        let socket =
            Rc::new(UdpSocket::from_std(socket).map_err(|e| {
                ErrorReply::new(ErrorCode::Io, format!("register with tokio: {e}"))
            })?);
        let entry = self
            .tasks
            .get_mut(id.0 as usize)
            .ok_or_else(|| ErrorReply::new(ErrorCode::Internal, "socket slot out of range"))?;
        if let Some(table) = &self.sockets {
            if let Some(e) = table.borrow_mut().get_mut(id.0 as usize) {
                *e = Some(Rc::clone(&socket));
            }
        }
        let task = tokio::task::spawn_local(channel(socket, id, Rc::clone(&self.shared)));
        *entry = Some(task.abort_handle());
        Ok(())
    }

    fn close(&mut self, id: SocketId) {
        if let Some(t) = self.tasks.get_mut(id.0 as usize).and_then(Option::take) {
            t.abort();
        }
        if let Some(table) = &self.sockets {
            if let Some(e) = table.borrow_mut().get_mut(id.0 as usize) {
                *e = None;
            }
        }
    }
}

/// Runs the tokio data plane on the calling thread until a shutdown message.
///
/// # Errors
/// The runtime could not be built, or the shared echo socket could not be set up.
pub fn run(shard: Shard) -> std::io::Result<GlobalStats> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = LocalSet::new();
    local.block_on(&rt, main_loop(shard))
}

/// Binds the shard's shared echo socket (kernel stamps, UDP_GRO).
fn shared_socket(bind: BindConfig, tx_stamps: bool) -> std::io::Result<UdpSocket> {
    let socket = relay_io::bind_udp(bind.ip, 0, bind.rcvbuf)?;
    if bind.timestamps {
        relay_io::enable_rx_timestamps(&socket)?;
    }
    if tx_stamps {
        relay_io::enable_tx_timestamps(&socket)?;
    }
    relay_io::enable_udp_gro(&socket)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

async fn main_loop(shard: Shard) -> std::io::Result<GlobalStats> {
    let Shard {
        relay,
        mut rx,
        mut publisher,
        bind,
        closed,
    } = shard;
    let clock = ArrivalClock::new();
    let start = tokio::time::Instant::now();
    let n = relay.config().max_channels as usize;
    let tx_stamps = relay.config().send_times == SendTimes::Kernel;
    let leg = if bind.shared_echo {
        let socket = Rc::new(shared_socket(bind, tx_stamps)?);
        tracing::info!(shard = relay.config().shard, fd = socket.as_raw_fd(), local = %socket.local_addr()?, "shared echo leg");
        Some(Leg {
            socket,
            batch: Vec::with_capacity(MAX_GSO_BYTES),
            to: None,
            size: 0,
            count: 0,
            flush: Rc::new(Notify::new()),
        })
    } else {
        None
    };
    let leg_parts = leg
        .as_ref()
        .map(|l| (Rc::clone(&l.socket), Rc::clone(&l.flush)));
    let shared = Rc::new(RefCell::new(Shared {
        relay,
        counters: BackendCounters::default(),
        clock,
        tx_stamps,
        send_log: SendErrorLog::default(),
        leg,
    }));
    let sockets: ChannelSockets = Rc::new(RefCell::new((0..n).map(|_| None).collect()));
    let mut tasks = Tasks {
        shared: Rc::clone(&shared),
        tasks: (0..n).map(|_| None).collect(),
        sockets: Some(Rc::clone(&sockets)),
        tx_stamps,
    };
    if let Some((socket, notify)) = leg_parts {
        let table = Rc::clone(&sockets);
        tokio::task::spawn_local(echo_leg(socket, table, Rc::clone(&shared)));
        tokio::task::spawn_local(flusher(Rc::clone(&shared), notify));
    }
    loop {
        let next = {
            let sh = shared.borrow();
            sh.relay
                .poll_timeout()
                .map_or(publisher.deadline(), |t| t.min(publisher.deadline()))
        };
        let at = start + Duration::from_nanos(next.as_nanos());
        tokio::select! {
            msg = rx.recv() => {
                let now = clock.now();
                match msg {
                    Some(ShardRequest::Command { command, reply }) => {
                        let mut sh = shared.borrow_mut();
                        // A channel about to close takes the stamps already queued for its
                        // last sends.
                        if let relay_proto::Command::Remove(r) = &command {
                            let socket = sh.relay.socket_of(&r.channel).and_then(|id| {
                                sockets.borrow().get(id.0 as usize).cloned().flatten()
                            });
                            if let Some(socket) = socket.filter(|_| tx_stamps) {
                                sh.drain_stamps(&socket, true);
                            }
                        }
                        let r = execute(&mut sh.relay, &mut tasks, bind, now, command);
                        let _ = reply.send(r);
                    }
                    Some(ShardRequest::Snapshot { reply }) => {
                        let sh = shared.borrow();
                        let _ = reply.send(shard::shard_doc(&sh.relay, &sh.counters, now));
                    }
                    Some(ShardRequest::Shutdown { reply }) => {
                        let mut sh = shared.borrow_mut();
                        flush(&mut sh);
                        publisher.publish(now, &sh.relay, &sh.counters);
                        let _ = reply.send(shard::shard_stats(&sh.relay));
                        return Ok(sh.relay.global_stats());
                    }
                    None => return Ok(shared.borrow().relay.global_stats()),
                }
            }
            () = tokio::time::sleep_until(at) => {
                let now = clock.now();
                let mut sh = shared.borrow_mut();
                if sh.relay.poll_timeout().is_some_and(|t| t <= now) {
                    sh.relay.handle_timeout(now);
                    shard::close_expired(&mut sh.relay, &mut tasks, &closed);
                }
                let Shared { relay, counters, .. } = &*sh;
                publisher.maybe_publish(now, relay, counters);
            }
        }
    }
}

/// One channel's socket: drain on readiness, forward from the same socket (toward the echo: into
/// the shared leg's batch, when there is one).
async fn channel(socket: Rc<UdpSocket>, id: SocketId, shared: SharedRef) {
    // One byte more than the largest payload, to tell an oversize datagram from a full one.
    let mut buf = vec![0u8; MAX_PAYLOAD + 1];
    let mut control = [0u8; relay_io::socket::CONTROL_LEN];
    let interest = interest(&shared);
    loop {
        let Ok(ready) = socket.ready(interest).await else {
            return;
        };
        if ready.is_error() {
            shared.borrow_mut().drain_stamps(&socket, false);
        }
        if !ready.is_readable() {
            continue;
        }
        let mut drained = 0usize;
        while let Some(meta) = recv_one(&socket, &mut buf, &mut control, &shared) {
            drained += 1;
            if meta.truncated || meta.len > MAX_PAYLOAD {
                shared.borrow_mut().counters.oversize += 1;
                continue;
            }
            let (Some(payload), Some(from)) = (buf.get_mut(..meta.len), meta.from) else {
                shared.borrow_mut().counters.recv_errors += 1;
                continue;
            };
            let verdict = {
                let mut sh = shared.borrow_mut();
                let times = sh.times(control.get(..meta.control_len).unwrap_or_default());
                sh.decide(times, id, from, payload)
            };
            match verdict {
                Verdict::Forward {
                    to,
                    direction: Direction::ToEcho,
                } if shared.borrow().leg.is_some() => {
                    gather(&mut shared.borrow_mut(), id, payload, to);
                }
                Verdict::Forward { to, direction } => {
                    send_one(&socket, &shared, id, payload, to, direction).await;
                }
                Verdict::Drop(_) => {}
            }
        }
        shared.borrow_mut().counters.batch(drained);
    }
}

/// Reads one datagram (with its control messages) from a socket that was readable; `None` once
/// it is drained, or on an error (counted), either of which ends the drain.
fn recv_one(
    socket: &UdpSocket,
    buf: &mut [u8],
    control: &mut [u8],
    shared: &SharedRef,
) -> Option<relay_io::RecvMeta> {
    match socket.try_io(Interest::READABLE, || {
        relay_io::recv_msg(socket, buf, control)
    }) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(_) => {
            shared.borrow_mut().counters.recv_errors += 1;
            None
        }
    }
}

/// What a socket task waits for: datagrams, and with kernel send times its transmit stamps.
fn interest(shared: &SharedRef) -> Interest {
    if shared.borrow().tx_stamps {
        Interest::READABLE | Interest::ERROR
    } else {
        Interest::READABLE
    }
}

/// Sends one forwarded datagram from `socket`. With kernel send times the send carries the stamp
/// id the core gave the datagram, and its stamp settles T0 / the forward time when it comes;
/// with estimated ones, they are taken a quarter into its `sendmsg`.
async fn send_one(
    socket: &UdpSocket,
    shared: &SharedRef,
    id: SocketId,
    payload: &[u8],
    to: SocketAddr,
    direction: Direction,
) {
    // Sends the core times by their submission (estimated send times) wait in `unsubmitted`;
    // with kernel stamps none do, and the send carries its stamp id instead.
    let (timed_here, stamp_id, before) = {
        let sh = shared.borrow();
        (
            sh.relay.unsubmitted() > 0,
            sh.relay.send_id(),
            sh.clock.now(),
        )
    };
    let opts = SendOpts {
        segment: None,
        stamp_id,
    };
    let send = || relay_io::send_msg(socket, payload, to, opts);
    let sent = match socket.try_io(Interest::WRITABLE, send) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            if timed_here {
                // Other tasks run while this one waits: settle it first.
                shared.borrow_mut().relay.submitted(before);
            }
            socket.async_io(Interest::WRITABLE, send).await
        }
        r => {
            if timed_here {
                let mut sh = shared.borrow_mut();
                let after = sh.clock.now();
                sh.relay.submitted_between(before, after);
            }
            r
        }
    };
    if let Err(e) = sent {
        let mut sh = shared.borrow_mut();
        let now = sh.clock.now();
        let Shared {
            counters,
            send_log,
            relay,
            ..
        } = &mut *sh;
        if let Some(stamp) = stamp_id {
            let _ = relay.send_failed(stamp);
        }
        send_log.note(
            counters,
            now,
            e.raw_os_error().unwrap_or(0),
            id.0,
            direction,
        );
    }
}

/// Shared echo leg, on the way out: writes the channel's tag over the datagram's SSRC and
/// appends it to the batch, sending the batch first when the datagram's size or address differs
/// or it is full. The first datagram of a batch wakes the flusher.
fn gather(sh: &mut Shared, id: SocketId, payload: &mut [u8], to: SocketAddr) {
    let n = payload.len();
    if let Some(leg) = sh.leg.as_ref() {
        let fits = leg.to == Some(to)
            && leg.size == n
            && leg.count < MAX_SEGMENTS
            && leg.batch.len() + n <= MAX_GSO_BYTES;
        if leg.count > 0 && !fits {
            flush(sh);
        }
    }
    sh.relay.tag_for_echo(id, payload);
    let Some(leg) = sh.leg.as_mut() else { return };
    if leg.count == 0 {
        leg.to = Some(to);
        leg.size = n;
        leg.flush.notify_one();
    }
    leg.batch.extend_from_slice(payload);
    leg.count += 1;
    sh.relay.gathered_last(BATCH);
}

/// Sends the gathered batch, if any: one `sendmsg`, with UDP_SEGMENT when it holds more than one
/// datagram. Its datagrams' T0 is that send's one transmit stamp (estimated: a quarter into that
/// call). A refused send counts every datagram in it as a send error.
fn flush(sh: &mut Shared) {
    let Shared {
        relay,
        counters,
        clock,
        send_log,
        leg: Some(leg),
        ..
    } = sh
    else {
        return;
    };
    let Some(to) = leg.to.take().filter(|_| leg.count > 0) else {
        return;
    };
    let count = leg.count;
    let segment = (count > 1).then(|| u16::try_from(leg.size).unwrap_or(u16::MAX));
    let stamp_id = relay.batch_queued(BATCH);
    let before = clock.now();
    let sent = leg.socket.try_io(Interest::WRITABLE, || {
        relay_io::send_msg(&*leg.socket, &leg.batch, to, SendOpts { segment, stamp_id })
    });
    let after = clock.now();
    if relay.unsubmitted() > 0 {
        relay.submitted_between(before, after);
    }
    if let Err(e) = sent {
        if let Some(stamp) = stamp_id {
            let _ = relay.send_failed(stamp);
        }
        let errno = e.raw_os_error().unwrap_or(libc::EAGAIN);
        let slot = relay.config().max_channels;
        send_log.note(counters, after, errno, slot, Direction::ToEcho);
        counters.send_errors += count as u64 - 1;
    }
    leg.batch.clear();
    leg.count = 0;
}

/// Sends each batch once the tasks woken with its first datagram have run.
async fn flusher(shared: SharedRef, notify: Rc<Notify>) {
    loop {
        notify.notified().await;
        flush(&mut shared.borrow_mut());
    }
}

/// Shared echo leg, on the way back: each read of the shared socket holds one datagram or, with
/// GRO, several of one size; each is untagged (Asterisk's SSRC back in place), handed to the core
/// as its channel's return (arrival: the read's kernel stamp), and sent from that channel's
/// socket.
async fn echo_leg(socket: Rc<UdpSocket>, channels: ChannelSockets, shared: SharedRef) {
    let mut buf = vec![0u8; relay_io::ring::MAX_BUFFER_SIZE];
    let mut control = [0u8; relay_io::socket::CONTROL_LEN];
    let interest = interest(&shared);
    loop {
        let Ok(ready) = socket.ready(interest).await else {
            return;
        };
        if ready.is_error() {
            shared.borrow_mut().drain_stamps(&socket, false);
        }
        if !ready.is_readable() {
            continue;
        }
        let mut drained = 0usize;
        while let Some(meta) = recv_one(&socket, &mut buf, &mut control, &shared) {
            drained += 1;
            let (Some(bytes), Some(from)) = (
                buf.get_mut(..meta.len).filter(|_| !meta.truncated),
                meta.from,
            ) else {
                shared.borrow_mut().counters.oversize += 1;
                continue;
            };
            let ctl = control.get(..meta.control_len).unwrap_or_default();
            let segment = relay_io::gro_segment(ctl).ok().flatten();
            let times = shared.borrow_mut().times(ctl);
            let seg = segment.map_or(meta.len, usize::from).max(1);
            for datagram in bytes.chunks_mut(seg) {
                if datagram.len() > MAX_PAYLOAD {
                    shared.borrow_mut().counters.oversize += 1;
                    continue;
                }
                let (out, id, verdict) = {
                    let mut sh = shared.borrow_mut();
                    let Some(id) = sh.relay.untag_from_echo(datagram) else {
                        continue;
                    };
                    let Some(out) = channels.borrow().get(id.0 as usize).cloned().flatten() else {
                        sh.relay.count_drop(DropReason::NoChannel);
                        continue;
                    };
                    (out, id, sh.decide(times, id, from, datagram))
                };
                if let Verdict::Forward { to, direction } = verdict {
                    send_one(&out, &shared, id, datagram, to, direction).await;
                }
            }
        }
        shared.borrow_mut().counters.batch(drained);
    }
}
