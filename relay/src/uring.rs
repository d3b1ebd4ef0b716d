//! The io_uring data plane: every channel socket of a shard in one ring, on the shard's pinned
//! thread.
//!
//! Each channel socket sits in the ring's fixed-file table (slot = the core's `SocketId`) with one
//! multishot `RecvMsg` armed on a shared provided-buffer ring. A completion hands us a buffer
//! holding the source address and the datagram; the core decides; a forwarded datagram leaves
//! from the same fixed socket by `SendMsg` straight out of the buffer it arrived in (no copy), so
//! the echo's reply reaches Asterisk from exactly the address Asterisk sent to. The buffer goes
//! back to the ring when its send completes (or at once when the datagram is dropped). The core
//! sees the datagram in its buffer writable: a probe's echo gets the relay's times written into
//! its header there (`Relay::handle_received`), and leaves as the core left it.
//!
//! One loop iteration is one batch: one `io_uring_enter` submits every send queued by the last
//! batch and waits for completions (or the next timer); the buffer ring's tail is published once
//! per batch.
//!
//! Time: each socket asks for the kernel's receive stamp, which lands in the buffer's control
//! field; a datagram's arrival is that stamp on the monotonic clock. With `--timestamps kernel`
//! (the default) every send also asks for the kernel's transmit stamp: it carries the id the core
//! gave the datagram (`SCM_TS_OPT_ID`; a GSO send of the shared echo leg carries its first
//! datagram's, and its one stamp settles them all), and once the `io_uring_enter` that submitted
//! it returns, the socket's error queue is read (`recvmmsg`, a batch of stamps per call: on
//! loopback and veth the kernel queues the stamp inside that very call; a later one is read with
//! the socket's next send). Each stamp goes to the core (`Relay::tx_stamped`): the datagram's T0
//! toward the echo, and the end of its forward time. `--tx-stamps command` takes the stamps from
//! io_uring's `SOCKET_URING_OP_TX_TIMESTAMP` completions instead (experimental: on Linux 6.18 it
//! was seen to corrupt provided-buffer receives). `--timestamps user` keeps the old estimate: a
//! batch's sends get an `io_uring_enter` of their own between two clock reads, and the k-th of n
//! is taken to leave a quarter into its share (`Relay::submitted_between`).
//!
//! A multishot receive ends when the buffer ring is empty (`ENOBUFS`) or the completion queue
//! overflowed; the datagram stays queued in the socket, and the receive is re-armed once buffers
//! are back, so nothing is lost. Control commands arrive on a queue; the control thread writes an
//! eventfd whose read is always armed in the ring, so a command wakes the loop at once.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

use relay_io::SendOpts;
use relay_proto::{
    Direction, ErrorCode, ErrorReply, GlobalStats, Relay, SendTimes, SocketId, Verdict,
};

use crate::arrival::{take_stamp, ArrivalClock};
use crate::counters::{BackendCounters, SendErrorLog};
use crate::shard::{self, Shard, ShardRequest};
use crate::sockets::{execute, BindConfig, SocketTable, MAX_GSO_BYTES, MAX_SEGMENTS};
use relay_io::ring::{Completion, Ring, MAX_PAYLOAD};
use relay_proto::MonoTime;

const KIND_SHIFT: u32 = 56;
const RECV: u64 = 1;
const SEND: u64 = 2;
const WAKE: u64 = 3;
const CANCEL: u64 = 4;
/// A receive on the shared echo socket (large buffers).
const ECHO_RECV: u64 = 5;
/// A send from a small transmit buffer (a return cut out of a coalesced batch).
const SEND_TX: u64 = 6;
/// A GSO send of a batch toward the echo from a large transmit buffer.
const LARGE_TX: u64 = 7;
/// The transmit-stamp command of a socket (slot and generation, as a receive's).
const STAMPS: u64 = 8;
/// No stamp id: a send the core gave none (estimated send times, or a failed one).
const NO_ID: u32 = u32::MAX;

fn stamps_data(kind: u64, slot: u32, gen: u32) -> u64 {
    (kind << KIND_SHIFT) | (u64::from(gen & 0xff_ffff) << 32) | u64::from(slot)
}

fn recv_data(slot: u32, gen: u32) -> u64 {
    (RECV << KIND_SHIFT) | (u64::from(gen & 0xff_ffff) << 32) | u64::from(slot)
}

fn send_data(slot: u32, bid: u16, direction: Direction) -> u64 {
    (SEND << KIND_SHIFT)
        | (u64::from(slot & 0xff_ffff) << 32)
        | ((direction.index() as u64) << 16)
        | u64::from(bid)
}

/// What the loop knows of one fixed-file slot.
#[derive(Debug, Default)]
struct Slot {
    /// The channel's socket while open (the ring holds its own reference too).
    socket: Option<UdpSocket>,
    /// Bumped on every close, so completions of a previous channel in this slot are recognised.
    gen: u32,
    /// Whether a multishot receive is armed.
    armed: bool,
    /// Whether it sends with transmit stamps (collected by the command, or from its error queue).
    stamps: bool,
    /// Whether it is in the batch's list of error queues to read.
    draining: bool,
}

/// The ring plus the slots: the io_uring backend's socket table.
struct Sockets {
    /// The ring.
    ring: Ring,
    /// Per fixed-file slot.
    slots: Vec<Slot>,
    /// Slots whose receive ended and must be re-armed.
    rearm: Vec<u32>,
    /// The shared echo leg, with `--echo-leg shared`.
    shared: Option<SharedLeg>,
    /// With kernel send times: where the transmit stamps come from.
    stamps: Option<StampSource>,
    /// Slots whose stamp collection ended and must be re-armed.
    restamp: Vec<u32>,

    /// The stamp id of each send in flight, by the buffer it is sent from (receive buffers,
    /// small and large transmit buffers), so a failed send gives its records back.
    ids: SendIds,
}

/// Where transmit stamps come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StampSource {
    /// io_uring's `SOCKET_URING_OP_TX_TIMESTAMP` command (Linux 6.15+).
    Command,
    /// The socket's error queue, read once the enter that submitted its sends returns.
    ErrorQueue,
}

/// Stamp ids of sends in flight, by buffer, and the sockets whose error queue holds their stamps.
#[derive(Debug, Default)]
struct SendIds {
    /// Slots that sent a stamped datagram since their error queue was last read: read once the
    /// enter that submits the sends returns (on loopback and veth the kernel queues a send's
    /// stamp inside that very call).
    drain: Vec<u32>,
    /// By receive buffer.
    rx: Vec<u32>,
    /// By small transmit buffer.
    tx: Vec<u32>,
    /// By large transmit buffer.
    large: Vec<u32>,
}

impl SendIds {
    fn set(v: &mut [u32], i: u16, id: Option<u32>) {
        if let Some(x) = v.get_mut(usize::from(i)) {
            *x = id.unwrap_or(NO_ID);
        }
    }

    fn take(v: &mut [u32], i: u16) -> Option<u32> {
        v.get_mut(usize::from(i))
            .map(|x| std::mem::replace(x, NO_ID))
            .filter(|&id| id != NO_ID)
    }
}

/// The shard's one socket toward the echo, and the GSO batch being gathered for it.
struct SharedLeg {
    /// The socket (the ring holds it in fixed-file slot `slot`).
    socket: UdpSocket,
    /// Its fixed-file slot (after the channels').
    slot: u32,
    /// Whether its multishot receive is armed.
    armed: bool,
    /// Whether it is in the batch's list of error queues to read.
    draining: bool,
    /// The batch being gathered: equal-size packets to one address in one large buffer.
    batch: Option<Batch>,
}

/// Packets gathered for one GSO send.
#[derive(Clone, Copy, Debug)]
struct Batch {
    /// Large transmit buffer.
    buffer: u16,
    /// Where they go.
    to: std::net::SocketAddr,
    /// Size of each (the last may be shorter, which ends the batch).
    size: usize,
    /// How many.
    count: usize,
    /// Bytes used.
    used: usize,
}

impl SharedLeg {
    /// Queues the gathered batch's send, if any: one `sendmsg` with UDP_SEGMENT when it holds
    /// more than one packet. The core learns its place in the queue (its datagrams' T0).
    fn flush(
        &mut self,
        ring: &mut Ring,
        relay: &mut Relay,
        counters: &mut BackendCounters,
        ids: &mut SendIds,
    ) {
        let Some(b) = self.batch.take() else { return };
        let segment = (b.count > 1).then(|| u16::try_from(b.size).unwrap_or(u16::MAX));
        let ud = (LARGE_TX << KIND_SHIFT) | u64::from(b.buffer);
        // Queued either way: a refused send's datagrams must not wait for a later batch that
        // reuses the buffer. With kernel send times, the id its one stamp comes back with.
        let stamp_id = relay.batch_queued(b.buffer);
        let opts = SendOpts { segment, stamp_id };
        if ring
            .send_large_tx(self.slot, b.buffer, b.used, b.to, ud, opts)
            .is_err()
        {
            counters.send_errors += b.count as u64;
            ring.large_tx_release(b.buffer);
            if let Some(id) = stamp_id {
                let _ = relay.send_failed(id);
            }
        } else {
            SendIds::set(&mut ids.large, b.buffer, stamp_id);
            if stamp_id.is_some() && !self.draining {
                self.draining = true;
                ids.drain.push(self.slot);
            }
        }
    }
}

impl SocketTable for Sockets {
    fn open(&mut self, id: SocketId, socket: UdpSocket) -> Result<(), ErrorReply> {
        let io =
            |what: &str, e: std::io::Error| ErrorReply::new(ErrorCode::Io, format!("{what}: {e}"));
        let slot = self
            .slots
            .get_mut(id.0 as usize)
            .ok_or_else(|| ErrorReply::new(ErrorCode::Internal, "socket slot out of range"))?;
        if self.stamps.is_some() {
            relay_io::enable_tx_timestamps(&socket).map_err(|e| io("transmit stamps", e))?;
        }
        self.ring
            .register_socket(id.0, socket.as_raw_fd())
            .map_err(|e| io("register fixed file", e))?;
        self.ring
            .arm_recv(id.0, recv_data(id.0, slot.gen))
            .map_err(|e| io("arm receive", e))?;
        if let Some(source) = self.stamps {
            slot.stamps = true;
            if let Err(e) = arm_stamps(&mut self.ring, source, id.0, slot.gen) {
                // Undo what is armed, so the next channel in this slot sees none of it.
                slot.socket = Some(socket);
                slot.armed = true;
                self.close(id);
                return Err(io("arm transmit stamps", e));
            }
        }
        slot.socket = Some(socket);
        slot.armed = true;
        Ok(())
    }

    fn close(&mut self, id: SocketId) {
        let Some(slot) = self.slots.get_mut(id.0 as usize) else {
            return;
        };
        if slot.armed {
            let _ = self
                .ring
                .cancel(recv_data(id.0, slot.gen), CANCEL << KIND_SHIFT);
        }
        if slot.stamps {
            let _ = self
                .ring
                .cancel(stamps_data(STAMPS, id.0, slot.gen), CANCEL << KIND_SHIFT);
        }
        let _ = self.ring.unregister_socket(id.0);
        slot.socket = None;
        slot.armed = false;
        slot.stamps = false;
        slot.gen = slot.gen.wrapping_add(1);
    }
}

/// Runs the io_uring data plane until a shutdown message; returns the final statistics.
///
/// # Errors
/// The ring failed in a way the loop cannot recover from.
pub fn run(ring: Ring, shard: Shard) -> std::io::Result<GlobalStats> {
    let Shard {
        mut relay,
        mut rx,
        mut publisher,
        bind,
        closed,
    } = shard;
    let mut clock = ArrivalClock::new();
    // Estimated send times: clock reads around the enters that submit sends.
    let estimated = relay.config().send_times == SendTimes::Estimated;
    let slots = (0..relay.config().max_channels)
        .map(|_| Slot::default())
        .collect();
    let ids = SendIds {
        drain: Vec::new(),
        rx: vec![NO_ID; usize::from(ring.buffer_count())],
        tx: vec![NO_ID; usize::from(ring.tx_count())],
        large: vec![NO_ID; usize::from(ring.large_tx_count())],
    };
    let mut s = Sockets {
        ring,
        slots,
        rearm: Vec::new(),
        shared: None,
        stamps: (!estimated).then_some(if bind.stamp_command {
            StampSource::Command
        } else {
            StampSource::ErrorQueue
        }),
        restamp: Vec::new(),
        ids,
    };
    s.ring.expect_stamps(s.stamps == Some(StampSource::Command));
    let mut counters = BackendCounters::default();
    s.ring.arm_waker(WAKE << KIND_SHIFT)?;
    if bind.shared_echo {
        let slot = relay.config().max_channels;
        let socket = relay_io::bind_udp(bind.ip, 0, bind.rcvbuf)?;
        if bind.timestamps {
            relay_io::enable_rx_timestamps(&socket)?;
        }
        relay_io::enable_udp_gro(&socket)?;
        s.ring.register_socket(slot, socket.as_raw_fd())?;
        s.ring.arm_recv_large(slot, ECHO_RECV << KIND_SHIFT)?;
        if let Some(source) = s.stamps {
            relay_io::enable_tx_timestamps(&socket)?;
            arm_stamps(&mut s.ring, source, slot, 0)?;
        }
        tracing::info!(shard = relay.config().shard, local = %socket.local_addr()?, "shared echo leg");
        s.shared = Some(SharedLeg {
            socket,
            slot,
            armed: true,
            draining: false,
            batch: None,
        });
    }
    let mut shutdown = None;
    let mut send_log = SendErrorLog::default();

    while shutdown.is_none() {
        let now = clock.now();
        let next = relay
            .poll_timeout()
            .map_or(publisher.deadline(), |t| t.min(publisher.deadline()));
        let wait = Duration::from_nanos(next.nanos_since(now).max(1));
        if estimated && relay.unsubmitted() > 0 {
            // The last batch's sends leave during this enter, one after another: each one's T0
            // is estimated between the clock reads around it, by its place in the batch.
            let start = clock.now();
            s.ring.submit()?;
            relay.submitted_between(start, clock.now());
            counters.enters += 1;
        }
        s.ring.submit_and_wait(Some(wait))?;
        counters.enters += 1;

        let now = clock.resample(&mut relay, &mut counters);
        // The stamps of the sends that enter submitted are on their sockets' error queues now.
        let mut drain = std::mem::take(&mut s.ids.drain);
        for &slot in &drain {
            match s.shared.as_mut() {
                Some(sh) if sh.slot == slot => sh.draining = false,
                _ => {
                    if let Some(st) = s.slots.get_mut(slot as usize) {
                        st.draining = false;
                    }
                }
            }
            drain_error_queue(&s, &mut relay, &mut counters, &clock, slot);
        }
        drain.clear();
        s.ids.drain = drain;
        let completions = s.ring.drain_completions();
        counters.batch(completions.len());
        for c in &completions {
            match c.user_data >> KIND_SHIFT {
                kind @ (RECV | ECHO_RECV) => {
                    let mut io = Io {
                        s: &mut s,
                        relay: &mut relay,
                        counters: &mut counters,
                        clock: &clock,
                        estimated,
                    };
                    if kind == RECV {
                        on_recv(&mut io, now, c)?;
                    } else {
                        on_echo_recv(&mut io, now, c)?;
                    }
                }
                SEND_TX | LARGE_TX => {
                    let i = (c.user_data & 0xffff) as u16;
                    let tx = c.user_data >> KIND_SHIFT == SEND_TX;
                    let id = if tx {
                        s.ring.tx_release(i);
                        SendIds::take(&mut s.ids.tx, i)
                    } else {
                        s.ring.large_tx_release(i);
                        SendIds::take(&mut s.ids.large, i)
                    };
                    if c.result < 0 {
                        if let Some(id) = id {
                            let _ = relay.send_failed(id);
                        }
                        let (slot, d) = if tx {
                            (
                                ((c.user_data >> 32) & 0xff_ffff) as u32,
                                Direction::ToAsterisk,
                            )
                        } else {
                            (relay.config().max_channels, Direction::ToEcho)
                        };
                        send_log.note(&mut counters, now, -c.result, slot, d);
                    }
                }
                SEND => {
                    let bid = (c.user_data & 0xffff) as u16;
                    s.ring.recycle(bid);
                    let id = SendIds::take(&mut s.ids.rx, bid);
                    if c.result < 0 {
                        if let Some(id) = id {
                            let _ = relay.send_failed(id);
                        }
                        let slot = ((c.user_data >> 32) & 0xff_ffff) as u32;
                        let d = Direction::ALL[((c.user_data >> 16) & 1) as usize];
                        send_log.note(&mut counters, now, -c.result, slot, d);
                    }
                }
                STAMPS => on_stamps(&mut s, &mut relay, &mut counters, &clock, c),
                WAKE => {
                    // Commands push receives and cancels, which may submit the queued sends
                    // implicitly: they leave now, between clock reads.
                    if estimated && relay.unsubmitted() > 0 {
                        let start = clock.now();
                        s.ring.submit()?;
                        relay.submitted_between(start, clock.now());
                        counters.enters += 1;
                    }
                    // Stamps read while handling commands precede this sample.
                    clock.resample(&mut relay, &mut counters);
                    while let Ok(msg) = rx.try_recv() {
                        handle_msg(
                            msg,
                            &mut relay,
                            &mut s,
                            &mut counters,
                            bind,
                            &clock,
                            &mut shutdown,
                        );
                    }
                    s.ring.arm_waker(WAKE << KIND_SHIFT)?;
                }
                _ => {}
            }
        }
        if let Some(sh) = s.shared.as_mut() {
            if sh.batch.is_some() {
                make_room(&mut s.ring, &mut relay, estimated, &clock, &mut counters)?;
            }
            sh.flush(&mut s.ring, &mut relay, &mut counters, &mut s.ids);
        }
        s.ring.give_back(completions);
        s.ring.sync_buffers();
        // Every push below may find the queue full and submit the sends in it: make room first,
        // so that they leave between clock reads (their T0).
        if s.shared.as_ref().is_some_and(|sh| !sh.armed) {
            make_room(&mut s.ring, &mut relay, estimated, &clock, &mut counters)?;
        }
        if let Some(sh) = s.shared.as_mut().filter(|sh| !sh.armed) {
            s.ring.arm_recv_large(sh.slot, ECHO_RECV << KIND_SHIFT)?;
            sh.armed = true;
        }

        for slot in std::mem::take(&mut s.rearm) {
            let Some(st) = s.slots.get_mut(slot as usize) else {
                continue;
            };
            if st.socket.is_some() && !st.armed {
                make_room(&mut s.ring, &mut relay, estimated, &clock, &mut counters)?;
                s.ring.arm_recv(slot, recv_data(slot, st.gen))?;
                st.armed = true;
            }
        }
        for slot in std::mem::take(&mut s.restamp) {
            let (source, shared_slot) = (s.stamps, s.shared.as_ref().map(|sh| sh.slot));
            let gen = match s.slots.get(slot as usize) {
                Some(st) if st.socket.is_some() => st.gen,
                _ if shared_slot == Some(slot) => 0,
                _ => continue,
            };
            if let Some(source) = source {
                arm_stamps(&mut s.ring, source, slot, gen)?;
                counters.stamp_rearms += 1;
            }
        }

        if relay.poll_timeout().is_some_and(|t| t <= now) {
            relay.handle_timeout(now);
            shard::close_expired(&mut relay, &mut s, &closed);
        }
        publisher.maybe_publish(now, &relay, &counters);
    }

    let now = clock.now();
    publisher.publish(now, &relay, &counters);
    let stats = relay.global_stats();
    if let Some(reply) = shutdown {
        let _ = reply.send(shard::shard_stats(&relay));
    }
    Ok(stats)
}

type ShutdownReply = Option<tokio::sync::oneshot::Sender<shard::ShardStats>>;

fn handle_msg(
    msg: ShardRequest,
    relay: &mut Relay,
    s: &mut Sockets,
    counters: &mut BackendCounters,
    bind: BindConfig,
    clock: &ArrivalClock,
    shutdown: &mut ShutdownReply,
) {
    let now = clock.now();
    match msg {
        ShardRequest::Command { command, reply } => {
            // A channel about to close takes the stamps already queued for its last sends.
            if let relay_proto::Command::Remove(r) = &command {
                if let Some(id) = relay.socket_of(&r.channel) {
                    drain_error_queue(s, relay, counters, clock, id.0);
                }
            }
            let _ = reply.send(execute(relay, s, bind, now, command));
        }
        ShardRequest::Snapshot { reply } => {
            let _ = reply.send(shard::shard_doc(relay, counters, now));
        }
        ShardRequest::Shutdown { reply } => *shutdown = Some(reply),
    }
}

/// The loop's state a receive completion touches.
struct Io<'a> {
    /// The ring and its slots.
    s: &'a mut Sockets,
    /// The core.
    relay: &'a mut Relay,
    /// Backend counters.
    counters: &'a mut BackendCounters,
    /// The clock that converts kernel stamps.
    clock: &'a ArrivalClock,
    /// Estimated send times (`--timestamps user`).
    estimated: bool,
}

fn on_recv(io: &mut Io<'_>, now: MonoTime, c: &Completion) -> std::io::Result<()> {
    let slot = (c.user_data & 0xffff_ffff) as u32;
    let gen = ((c.user_data >> 32) & 0xff_ffff) as u32;
    let current =
        io.s.slots
            .get(slot as usize)
            .is_some_and(|st| st.socket.is_some() && st.gen & 0xff_ffff == gen);
    if c.result < 0 {
        match -c.result {
            libc::ENOBUFS => io.counters.rearm_nobufs += 1,
            libc::ECANCELED => {}
            _ => {
                io.counters.recv_errors += 1;
                io.counters.rearm_other += 1;
            }
        }
    } else if let Some(bid) = c.buffer() {
        let len = usize::try_from(c.result).unwrap_or(0);
        forward(io, now, slot, bid, len, current)?;
    }
    if !c.more() && current {
        if let Some(st) = io.s.slots.get_mut(slot as usize) {
            st.armed = false;
        }
        if c.result >= 0 {
            io.counters.rearm_other += 1; // ended without an error: CQ overflow
        }
        io.s.rearm.push(slot);
    }
    Ok(())
}

fn forward(
    io: &mut Io<'_>,
    now: MonoTime,
    slot: u32,
    bid: u16,
    len: usize,
    current: bool,
) -> std::io::Result<()> {
    let Io {
        s,
        relay,
        counters,
        clock,
        estimated,
    } = io;
    make_room(&mut s.ring, relay, *estimated, clock, counters)?;
    let received = match s.ring.received(bid, len) {
        Some(_) if !current => {
            // A previous channel's datagram, in flight when it closed.
            relay.count_drop(relay_proto::DropReason::NoChannel);
            None
        }
        Some(r) if r.truncated || r.payload.len() > MAX_PAYLOAD => {
            counters.oversize += 1;
            None
        }
        Some(r) => match r.from {
            Some(from) => Some((from, clock.arrival(r.control, now, counters))),
            None => {
                counters.recv_errors += 1;
                None
            }
        },
        None => {
            counters.recv_errors += 1;
            None
        }
    };
    // The core may write into the datagram (a probe's return), which then leaves as it is.
    let verdict = received.and_then(|(from, arrival)| {
        let payload = s.ring.received_payload_mut(bid, len)?;
        let n = payload.len();
        Some((
            relay.handle_received(arrival, now, SocketId(slot), from, payload),
            n,
        ))
    });
    match verdict {
        Some((
            Verdict::Forward {
                to,
                direction: Direction::ToEcho,
            },
            n,
        )) if s.shared.is_some() => {
            gather(s, relay, counters, slot, bid, len, n, to);
            s.ring.recycle(bid);
        }
        Some((Verdict::Forward { to, direction }, n)) => {
            let stamp_id = relay.send_id();
            let opts = SendOpts {
                segment: None,
                stamp_id,
            };
            if s.ring
                .send_with(slot, bid, n, to, send_data(slot, bid, direction), opts)
                .is_ok()
            {
                SendIds::set(&mut s.ids.rx, bid, stamp_id);
                if stamp_id.is_some() {
                    mark_drain(&mut s.slots, &mut s.ids.drain, slot);
                }
            } else {
                counters.send_errors += 1;
                s.ring.recycle(bid);
                if let Some(id) = stamp_id {
                    let _ = relay.send_failed(id);
                }
            }
        }
        _ => s.ring.recycle(bid),
    }
    Ok(())
}

/// With estimated send times, before a send is queued: when the submission queue is full,
/// queueing would submit the sends it holds without a clock read around it, so they are
/// submitted here, between two, and leave now.
fn make_room(
    ring: &mut Ring,
    relay: &mut Relay,
    estimated: bool,
    clock: &ArrivalClock,
    counters: &mut BackendCounters,
) -> std::io::Result<()> {
    if estimated && ring.submission_full() {
        let start = clock.now();
        ring.submit()?;
        relay.submitted_between(start, clock.now());
        counters.enters += 1;
    }
    Ok(())
}

/// Shared echo leg, on the way out: copies the datagram in `bid` (payload `n` bytes) into the
/// batch for `to` and writes the channel's tag over its SSRC there; starts a new batch when the
/// size or the address differs, or the batch is full. False when no large buffer is free (the
/// datagram is then counted as a refused send).
#[allow(clippy::too_many_arguments)] // the loop's state a datagram touches, passed apart for the borrow checker
fn gather(
    s: &mut Sockets,
    relay: &mut Relay,
    counters: &mut BackendCounters,
    slot: u32,
    bid: u16,
    len: usize,
    n: usize,
    to: std::net::SocketAddr,
) -> bool {
    let Some(sh) = s.shared.as_mut() else {
        return false;
    };
    if let Some(b) = sh.batch {
        let fits =
            b.to == to && b.size == n && b.count < MAX_SEGMENTS && b.used + n <= MAX_GSO_BYTES;
        if !fits {
            sh.flush(&mut s.ring, relay, counters, &mut s.ids);
        }
    }
    let b = match sh.batch {
        Some(b) => b,
        None => {
            let Some(buffer) = s.ring.large_tx_acquire() else {
                counters.send_errors += 1;
                cancel_last(relay);
                return false;
            };
            Batch {
                buffer,
                to,
                size: n,
                count: 0,
                used: 0,
            }
        }
    };
    let Some(copied) = s.ring.copy_to_large_tx(bid, len, b.buffer, b.used) else {
        if b.count == 0 {
            s.ring.large_tx_release(b.buffer);
        }
        counters.send_errors += 1;
        cancel_last(relay);
        return false;
    };
    if let Some(buf) = s.ring.large_tx_buffer(b.buffer) {
        relay.tag_for_echo(SocketId(slot), &mut buf[b.used..b.used + copied]);
    }
    relay.gathered_last(b.buffer);
    sh.batch = Some(Batch {
        count: b.count + 1,
        used: b.used + copied,
        ..b
    });
    true
}

/// Shared echo leg, on the way back: a receive on the shared socket holds one datagram or, with
/// GRO, several of one size; each is copied into a small transmit buffer, its tag replaced by
/// Asterisk's SSRC, handed to the core as its channel's return (arrival: the receive's kernel
/// stamp), and sent from that channel's socket.
fn on_echo_recv(io: &mut Io<'_>, now: MonoTime, c: &Completion) -> std::io::Result<()> {
    let Io {
        s,
        relay,
        counters,
        clock,
        estimated,
    } = io;
    if !c.more() {
        if let Some(sh) = s.shared.as_mut() {
            sh.armed = false;
        }
        if c.result == -libc::ENOBUFS {
            counters.rearm_nobufs += 1;
        } else {
            counters.rearm_other += 1;
        }
    }
    if c.result < 0 {
        if c.result != -libc::ENOBUFS && c.result != -libc::ECANCELED {
            counters.recv_errors += 1;
        }
        return Ok(());
    }
    let Some(bid) = c.buffer() else {
        return Ok(());
    };
    let len = usize::try_from(c.result).unwrap_or(0);
    let Some((from, arrival, n, segment, truncated)) = s.ring.received_large(bid, len).map(|r| {
        let arrival = clock.arrival(r.control, now, counters);
        (r.from, arrival, r.payload.len(), r.segment, r.truncated)
    }) else {
        counters.recv_errors += 1;
        s.ring.recycle_large(bid);
        return Ok(());
    };
    let Some(from) = from.filter(|_| !truncated) else {
        counters.oversize += u64::from(truncated);
        s.ring.recycle_large(bid);
        return Ok(());
    };
    let seg = segment.map_or(n, usize::from).max(1);
    let mut off = 0;
    while off < n {
        let m = seg.min(n - off);
        let at = off;
        off += m;
        make_room(&mut s.ring, relay, *estimated, clock, counters)?;
        let Some(i) = s.ring.tx_copy_from_large(bid, len, at, m) else {
            counters.oversize += 1; // longer than a small buffer, or none free
            continue;
        };
        let Some(buf) = s.ring.tx_buffer(i).and_then(|b| b.get_mut(..m)) else {
            s.ring.tx_release(i);
            continue;
        };
        let Some(socket) = relay.untag_from_echo(buf) else {
            s.ring.tx_release(i);
            continue;
        };
        let open = s
            .slots
            .get(socket.0 as usize)
            .is_some_and(|st| st.socket.is_some());
        if !open {
            relay.count_drop(relay_proto::DropReason::NoChannel);
            s.ring.tx_release(i);
            continue;
        }
        match relay.handle_received(arrival, now, socket, from, buf) {
            Verdict::Forward { to, .. } => {
                let ud = (SEND_TX << KIND_SHIFT)
                    | (u64::from(socket.0 & 0xff_ffff) << 32)
                    | u64::from(i);
                let stamp_id = relay.send_id();
                let opts = SendOpts {
                    segment: None,
                    stamp_id,
                };
                if s.ring.send_tx_with(socket.0, i, m, to, ud, opts).is_ok() {
                    SendIds::set(&mut s.ids.tx, i, stamp_id);
                    if stamp_id.is_some() {
                        mark_drain(&mut s.slots, &mut s.ids.drain, socket.0);
                    }
                } else {
                    counters.send_errors += 1;
                    s.ring.tx_release(i);
                    if let Some(id) = stamp_id {
                        let _ = relay.send_failed(id);
                    }
                }
            }
            Verdict::Drop(_) => s.ring.tx_release(i),
        }
    }
    s.ring.recycle_large(bid);
    Ok(())
}

/// A datagram just forwarded could not be gathered into a send: its stamp record goes back.
fn cancel_last(relay: &mut Relay) {
    if let Some(id) = relay.send_id() {
        let _ = relay.send_failed(id);
    }
}

/// Arms the collection of `slot`'s transmit stamps: the ring's command (the error queue needs
/// nothing armed).
fn arm_stamps(ring: &mut Ring, source: StampSource, slot: u32, gen: u32) -> std::io::Result<()> {
    match source {
        StampSource::Command => ring.arm_tx_stamps(slot, stamps_data(STAMPS, slot, gen)),
        // Read after the enter that submits the socket's sends (see SendIds::drain).
        StampSource::ErrorQueue => Ok(()),
    }
}

/// Slot `slot` sent a stamped datagram: its error queue is read after the next enter.
fn mark_drain(slots: &mut [Slot], drain: &mut Vec<u32>, slot: u32) {
    if let Some(st) = slots.get_mut(slot as usize) {
        if !st.draining {
            st.draining = true;
            drain.push(slot);
        }
    }
}

/// A completion of a socket's transmit-stamp command (`--tx-stamps command`): each carries a
/// stamp. Where the kernel refuses the command (`EINVAL`, `EOPNOTSUPP`: before Linux 6.15) every
/// socket switches to the error queue.
fn on_stamps(
    s: &mut Sockets,
    relay: &mut Relay,
    counters: &mut BackendCounters,
    clock: &ArrivalClock,
    c: &Completion,
) {
    let slot = (c.user_data & 0xffff_ffff) as u32;
    let gen = ((c.user_data >> 32) & 0xff_ffff) as u32;
    let shared_slot = s.shared.as_ref().map(|sh| sh.slot);
    let current = shared_slot == Some(slot)
        || s.slots
            .get(slot as usize)
            .is_some_and(|st| st.socket.is_some() && st.gen & 0xff_ffff == gen);
    match c.tx_stamp() {
        Err(relay_io::TxStampError::Ended(e))
            if (e == -libc::EINVAL || e == -libc::EOPNOTSUPP)
                && s.stamps == Some(StampSource::Command) =>
        {
            tracing::warn!(
                "this kernel has no io_uring transmit-stamp command (Linux 6.15+): stamps \
                 are read from each socket's error queue"
            );
            s.stamps = Some(StampSource::ErrorQueue);
            s.ring.expect_stamps(false);
            rearm_all(s);
            return;
        }
        Err(relay_io::TxStampError::Ended(_)) => {}
        r => take_stamp(relay, counters, clock, r),
    }
    if !c.more() && current && c.result != -libc::ECANCELED {
        s.restamp.push(slot);
    }
}

/// Re-arms the stamp collection of every open socket (after a switch of source).
fn rearm_all(s: &mut Sockets) {
    for (i, st) in s.slots.iter().enumerate() {
        if st.socket.is_some() && st.stamps {
            s.restamp.push(u32::try_from(i).unwrap_or(u32::MAX));
        }
    }
    if let Some(sh) = &s.shared {
        s.restamp.push(sh.slot);
    }
}

/// Reads every transmit stamp queued on the error queue of the socket in `slot` (a channel's, or
/// the shared echo leg's) and hands each to the core.
fn drain_error_queue(
    s: &Sockets,
    relay: &mut Relay,
    counters: &mut BackendCounters,
    clock: &ArrivalClock,
    slot: u32,
) {
    if s.stamps != Some(StampSource::ErrorQueue) {
        return;
    }
    let socket = match &s.shared {
        Some(sh) if sh.slot == slot => Some(&sh.socket),
        _ => s.slots.get(slot as usize).and_then(|st| st.socket.as_ref()),
    };
    let Some(socket) = socket else { return };
    loop {
        let read = relay_io::recv_tx_stamps(socket, |r| take_stamp(relay, counters, clock, r));
        // Fewer than a full batch: the queue was empty when the call returned.
        if !matches!(read, Ok(relay_io::socket::STAMP_BATCH)) {
            return;
        }
    }
}
