//! The io_uring data plane: every channel socket of a shard in one ring, on the shard's pinned
//! thread.
//!
//! Each channel socket sits in the ring's fixed-file table (slot = the core's `SocketId`) with one
//! multishot `RecvMsg` armed on a shared provided-buffer ring. A completion hands us a buffer
//! holding the source address and the datagram; the core decides; a forwarded datagram leaves
//! from the same fixed socket by `SendMsg` straight out of the buffer it arrived in (no copy), so
//! the echo's reply reaches Asterisk from exactly the address Asterisk sent to. The buffer goes
//! back to the ring when its send completes (or at once when the datagram is dropped).
//!
//! One loop iteration is one batch: one `io_uring_enter` submits every send queued by the last
//! batch and waits for completions (or the next timer); the buffer ring's tail is published once
//! per batch.
//!
//! Time (`--timestamps kernel`, the default): each socket asks for the kernel's receive stamp,
//! which lands in the buffer's control field; a datagram's arrival is that stamp on the
//! monotonic clock (the offset re-sampled once per batch, right after the wait). A batch's sends
//! are submitted by an `io_uring_enter` of their own, with the clock read just before and just
//! after it: the kernel issues the sends one after another inside it, so the k-th of n (from 0)
//! is taken to leave a quarter into its share, before + (after − before)·(4k + 1)/4n (see
//! `Relay::submitted_between`); a GSO send of the shared echo leg is one send in that order, its
//! datagrams all leaving at its moment. That is its T0 (toward the echo) and the end
//! of its forward time. `--timestamps user` keeps the old way: one clock read after the wait
//! stands for every datagram's arrival and T0, and sends go with the next wait.
//!
//! A multishot receive ends when the buffer ring is empty (`ENOBUFS`) or the completion queue
//! overflowed; the datagram stays queued in the socket, and the receive is re-armed once buffers
//! are back, so nothing is lost. Control commands arrive on a queue; the control thread writes an
//! eventfd whose read is always armed in the ring, so a command wakes the loop at once.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

use relay_proto::{Direction, ErrorCode, ErrorReply, GlobalStats, Relay, SocketId, Verdict};

use crate::dataplane::{
    self, BackendCounters, BindConfig, Clock, CtlMsg, Shard, SocketTable, MAX_GSO_BYTES,
    MAX_SEGMENTS,
};
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
}

/// The shard's one socket toward the echo, and the GSO batch being gathered for it.
struct SharedLeg {
    /// The socket (the ring holds it in fixed-file slot `slot`).
    _socket: UdpSocket,
    /// Its fixed-file slot (after the channels').
    slot: u32,
    /// Whether its multishot receive is armed.
    armed: bool,
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
    fn flush(&mut self, ring: &mut Ring, relay: &mut Relay, counters: &mut BackendCounters) {
        let Some(b) = self.batch.take() else { return };
        let segment = (b.count > 1).then(|| u16::try_from(b.size).unwrap_or(u16::MAX));
        let ud = (LARGE_TX << KIND_SHIFT) | u64::from(b.buffer);
        if ring
            .send_large_tx(
                self.slot,
                b.buffer,
                b.used,
                b.to,
                ud,
                relay_io::SendOpts {
                    segment,
                    stamp_id: None,
                },
            )
            .is_err()
        {
            counters.send_errors += b.count as u64;
            ring.large_tx_release(b.buffer);
        }
        // Settled either way: a refused send's datagrams must not wait for a later batch that
        // reuses the buffer.
        relay.batch_queued(b.buffer);
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
        self.ring
            .register_socket(id.0, socket.as_raw_fd())
            .map_err(|e| io("register fixed file", e))?;
        self.ring
            .arm_recv(id.0, recv_data(id.0, slot.gen))
            .map_err(|e| io("arm receive", e))?;
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
        let _ = self.ring.unregister_socket(id.0);
        slot.socket = None;
        slot.armed = false;
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
    let mut clock = Clock::new();
    let kernel_time = bind.timestamps;
    let slots = (0..relay.config().max_channels)
        .map(|_| Slot::default())
        .collect();
    let mut s = Sockets {
        ring,
        slots,
        rearm: Vec::new(),
        shared: None,
    };
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
        tracing::info!(shard = relay.config().shard, local = %socket.local_addr()?, "shared echo leg");
        s.shared = Some(SharedLeg {
            _socket: socket,
            slot,
            armed: true,
            batch: None,
        });
    }
    let mut shutdown = None;
    let mut forwarded = [0u64; 2];
    let mut send_log = dataplane::SendErrorLog::default();

    while shutdown.is_none() {
        let now = clock.now();
        let next = relay
            .poll_timeout()
            .map_or(publisher.deadline(), |t| t.min(publisher.deadline()));
        let wait = Duration::from_nanos(next.nanos_since(now).max(1));
        if kernel_time && relay.unsubmitted() > 0 {
            // The last batch's sends leave during this enter, one after another: each one's T0
            // lies between the clock reads around it, by its place in the batch.
            let start = clock.now();
            s.ring.submit()?;
            relay.submitted_between(start, clock.now());
            counters.enters += 1;
        }
        s.ring.submit_and_wait(Some(wait))?;
        counters.enters += 1;

        let now = if kernel_time {
            clock.resample(&mut counters)
        } else {
            clock.now()
        };
        let completions = s.ring.drain_completions();
        counters.batch(completions.len());
        for c in &completions {
            match c.user_data >> KIND_SHIFT {
                kind @ (RECV | ECHO_RECV) => {
                    let mut io = Io {
                        s: &mut s,
                        relay: &mut relay,
                        counters: &mut counters,
                        forwarded: &mut forwarded,
                        clock: kernel_time.then_some(&clock),
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
                    if tx {
                        s.ring.tx_release(i);
                    } else {
                        s.ring.large_tx_release(i);
                    }
                    if c.result < 0 {
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
                    if let Ok(bid) = u16::try_from(c.user_data & 0xffff) {
                        s.ring.recycle(bid);
                    }
                    if c.result < 0 {
                        let slot = ((c.user_data >> 32) & 0xff_ffff) as u32;
                        let d = Direction::ALL[((c.user_data >> 16) & 1) as usize];
                        send_log.note(&mut counters, now, -c.result, slot, d);
                    }
                }
                WAKE => {
                    // Commands push receives and cancels, which may submit the queued sends
                    // implicitly: they leave now, between clock reads.
                    if kernel_time && relay.unsubmitted() > 0 {
                        let start = clock.now();
                        s.ring.submit()?;
                        relay.submitted_between(start, clock.now());
                        counters.enters += 1;
                    }
                    while let Ok(msg) = rx.try_recv() {
                        handle_msg(
                            msg,
                            &mut relay,
                            &mut s,
                            &counters,
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
                make_room(
                    &mut s.ring,
                    &mut relay,
                    kernel_time.then_some(&clock),
                    &mut counters,
                )?;
            }
            sh.flush(&mut s.ring, &mut relay, &mut counters);
        }
        s.ring.give_back(completions);
        s.ring.sync_buffers();
        // Every push below may find the queue full and submit the sends in it: make room first,
        // so that they leave between clock reads (their T0).
        let kernel_clock = kernel_time.then_some(&clock);
        if s.shared.as_ref().is_some_and(|sh| !sh.armed) {
            make_room(&mut s.ring, &mut relay, kernel_clock, &mut counters)?;
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
                make_room(&mut s.ring, &mut relay, kernel_clock, &mut counters)?;
                s.ring.arm_recv(slot, recv_data(slot, st.gen))?;
                st.armed = true;
            }
        }

        if forwarded != [0, 0] && !kernel_time {
            let elapsed = clock.now().nanos_since(now);
            for d in Direction::ALL {
                let n = forwarded[d.index()];
                if n > 0 {
                    relay.record_forward_n(d, elapsed, n);
                }
            }
        }
        forwarded = [0, 0];

        if relay.poll_timeout().is_some_and(|t| t <= now) {
            relay.handle_timeout(now);
            dataplane::close_expired(&mut relay, &mut s, &closed);
        }
        publisher.maybe_publish(now, &relay, &counters);
    }

    let now = clock.now();
    publisher.publish(now, &relay, &counters);
    let stats = relay.global_stats();
    if let Some(reply) = shutdown {
        let _ = reply.send(dataplane::shard_stats(&relay));
    }
    Ok(stats)
}

type ShutdownReply = Option<tokio::sync::oneshot::Sender<dataplane::ShardStats>>;

fn handle_msg(
    msg: CtlMsg,
    relay: &mut Relay,
    s: &mut Sockets,
    counters: &BackendCounters,
    bind: BindConfig,
    clock: &Clock,
    shutdown: &mut ShutdownReply,
) {
    let now = clock.now();
    match msg {
        CtlMsg::Command { command, reply } => {
            let _ = reply.send(dataplane::execute(relay, s, bind, now, command));
        }
        CtlMsg::Snapshot { reply } => {
            let _ = reply.send(dataplane::shard_doc(relay, counters, now));
        }
        CtlMsg::Shutdown { reply } => *shutdown = Some(reply),
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
    /// Datagrams forwarded this batch, per direction (user time only).
    forwarded: &'a mut [u64; 2],
    /// With kernel timestamps: the clock that converts them.
    clock: Option<&'a Clock>,
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
        forwarded,
        clock,
    } = io;
    make_room(&mut s.ring, relay, *clock, counters)?;
    let verdict = match s.ring.received(bid, len) {
        Some(_) if !current => {
            // A previous channel's datagram, in flight when it closed.
            relay.count_drop(relay_proto::DropReason::NoChannel);
            None
        }
        Some(r) if r.truncated || r.payload.len() > MAX_PAYLOAD => {
            counters.oversize += 1;
            None
        }
        Some(r) => match (r.from, clock) {
            (Some(from), Some(clock)) => {
                let arrival = clock.arrival(r.control, now, counters);
                Some((
                    relay.handle_received(arrival, now, SocketId(slot), from, r.payload),
                    r.payload.len(),
                ))
            }
            (Some(from), None) => Some((
                relay.handle_datagram(now, SocketId(slot), from, r.payload),
                r.payload.len(),
            )),
            (None, _) => {
                counters.recv_errors += 1;
                None
            }
        },
        None => {
            counters.recv_errors += 1;
            None
        }
    };
    match verdict {
        Some((
            Verdict::Forward {
                to,
                direction: Direction::ToEcho,
            },
            n,
        )) if s.shared.is_some() => {
            if gather(s, relay, counters, slot, bid, len, n, to) {
                forwarded[Direction::ToEcho.index()] += 1;
            }
            s.ring.recycle(bid);
        }
        Some((Verdict::Forward { to, direction }, n)) => {
            if s.ring
                .send(slot, bid, n, to, send_data(slot, bid, direction))
                .is_ok()
            {
                forwarded[direction.index()] += 1;
            } else {
                counters.send_errors += 1;
                s.ring.recycle(bid);
            }
        }
        _ => s.ring.recycle(bid),
    }
    Ok(())
}

/// With kernel timestamps, before a send is queued: when the submission queue is full, queueing
/// would submit the sends it holds without a clock read around it, so they are submitted here,
/// between two, and leave now.
fn make_room(
    ring: &mut Ring,
    relay: &mut Relay,
    clock: Option<&Clock>,
    counters: &mut BackendCounters,
) -> std::io::Result<()> {
    if let Some(clock) = clock {
        if ring.submission_full() {
            let start = clock.now();
            ring.submit()?;
            relay.submitted_between(start, clock.now());
            counters.enters += 1;
        }
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
            sh.flush(&mut s.ring, relay, counters);
        }
    }
    let b = match sh.batch {
        Some(b) => b,
        None => {
            let Some(buffer) = s.ring.large_tx_acquire() else {
                counters.send_errors += 1;
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
        forwarded,
        clock,
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
        let arrival = clock.map_or(now, |cl| cl.arrival(r.control, now, counters));
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
        make_room(&mut s.ring, relay, *clock, counters)?;
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
        let verdict = if clock.is_some() {
            relay.handle_received(arrival, now, socket, from, buf)
        } else {
            relay.handle_datagram(now, socket, from, buf)
        };
        match verdict {
            Verdict::Forward { to, direction } => {
                let ud = (SEND_TX << KIND_SHIFT)
                    | (u64::from(socket.0 & 0xff_ffff) << 32)
                    | u64::from(i);
                if s.ring.send_tx(socket.0, i, m, to, ud).is_ok() {
                    forwarded[direction.index()] += 1;
                } else {
                    counters.send_errors += 1;
                    s.ring.tx_release(i);
                }
            }
            Verdict::Drop(_) => s.ring.tx_release(i),
        }
    }
    s.ring.recycle_large(bid);
    Ok(())
}
