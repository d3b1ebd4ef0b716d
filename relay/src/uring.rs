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
//! The ring is sized here ([`start`]): one fixed-file slot per channel of the shard (plus the
//! shared echo socket's), `--buffers` receive buffers, and with the shared echo leg its transmit
//! buffers and a group of large buffers for coalesced batches.
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
//! is taken to leave a quarter into its share (`Relay::submitted_between`). The loop never asks
//! which mode runs: it times a submission whenever the core holds sends waiting for one
//! (`Relay::unsubmitted`), and a send carries a stamp id whenever the core gives one.
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
use crate::config::RingConfig;
use crate::counters::{BackendCounters, SendErrorLog};
use crate::shard::{self, ReadyTx, Shard, ShardRequest};
use crate::sockets::{execute, BindConfig, SocketTable, MAX_GSO_BYTES, MAX_SEGMENTS};
use relay_io::ring::{Arm, Completion, Group, Ring, RxBuf, TxBuf, UserData, MAX_PAYLOAD};
use relay_proto::MonoTime;

// The kinds of the ring's user data ([`UserData::kind`]).
/// A channel socket's receive (slot, and the slot's generation as the tag).
const RECV: u8 = 1;
/// A forward from the receive buffer it arrived in (slot, and the direction as the tag).
const SEND: u8 = 2;
const WAKE: u8 = 3;
const CANCEL: u8 = 4;
/// A receive on the shared echo socket (large buffers).
const ECHO_RECV: u8 = 5;
/// A send from a small transmit buffer (a return cut out of a coalesced batch; the channel's
/// slot).
const SEND_TX: u8 = 6;
/// A GSO send of a batch toward the echo from a large transmit buffer.
const LARGE_TX: u8 = 7;
/// The transmit-stamp command of a socket (slot and generation, as a receive's).
const STAMPS: u8 = 8;
/// No stamp id: a send the core gave none (estimated send times, or a failed one).
const NO_ID: u32 = u32::MAX;

/// Small transmit buffers of a shard with a shared echo leg: the returns of a batch, each copied
/// out of its coalesced receive to leave from its channel's socket.
const SHARED_TX: u16 = 8192;
/// Large (64 KiB) receive and transmit buffers of a shard with a shared echo leg.
const SHARED_LARGE: u16 = 256;

/// A channel socket's receive.
const fn recv_data(slot: u32, gen: u32) -> UserData {
    UserData::new(RECV, slot, gen)
}

/// A channel socket's receive, armed into the small buffers.
const fn recv_arm(slot: u32) -> Arm {
    Arm::Recv {
        slot,
        group: Group::Small,
    }
}

/// The shared echo socket's receive, armed into the large buffers.
const fn echo_arm(slot: u32) -> Arm {
    Arm::Recv {
        slot,
        group: Group::Large,
    }
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
#[derive(Debug)]
struct Batch {
    /// Large transmit buffer.
    buffer: TxBuf,
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
        // Queued either way: a refused send's datagrams must not wait for a later batch that
        // reuses the buffer. With kernel send times, the id its one stamp comes back with.
        let buffer = b.buffer.id();
        let stamp_id = relay.batch_queued(buffer);
        let opts = SendOpts { segment, stamp_id };
        let ud = UserData::of(LARGE_TX);
        if let Err(refused) = ring.send(self.slot, b.buffer, b.used, b.to, ud, opts) {
            counters.send_errors += b.count as u64;
            ring.recycle(refused.buf);
            if let Some(id) = stamp_id {
                let _ = relay.send_failed(id);
            }
        } else {
            SendIds::set(&mut ids.large, buffer, stamp_id);
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
            .arm(recv_arm(id.0), recv_data(id.0, slot.gen))
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
                .cancel(recv_data(id.0, slot.gen), UserData::of(CANCEL));
        }
        if slot.stamps {
            let _ = self
                .ring
                .cancel(UserData::new(STAMPS, id.0, slot.gen), UserData::of(CANCEL));
        }
        let _ = self.ring.unregister_socket(id.0);
        slot.socket = None;
        slot.armed = false;
        slot.stamps = false;
        slot.gen = slot.gen.wrapping_add(1);
    }
}

/// Sizes and builds a shard's ring from the `--sq-entries`/`--buffers`/`--batch` settings and
/// what the shard serves (one fixed-file slot per channel, plus the shared echo socket's, with
/// its transmit buffers and the large buffer group), says the shard is ready (with the ring's
/// waker) or why it cannot start, and runs it ([`run`]).
///
/// # Errors
/// As [`run`]. A ring that cannot be built is reported on `ready`, not here.
pub fn start(config: &RingConfig, shard: Shard, ready: &ReadyTx) -> std::io::Result<GlobalStats> {
    let index = shard.relay.config().shard;
    let max_channels = shard.relay.config().max_channels;
    let shared = shard.bind.shared_echo;
    let mut builder = Ring::builder(config.sq_entries)
        .buffers(config.buffers)
        .files(max_channels + u32::from(shared))
        .batching(config.batch, config.batch_wait);
    if shared {
        builder = builder.tx(SHARED_TX).large(SHARED_LARGE, SHARED_LARGE);
    }
    match builder.build() {
        Ok(ring) => {
            if config.batch > 1 && !ring.batching_supported() && index == 0 {
                tracing::warn!(
                    "--batch needs Linux 6.12 (io_uring min_wait); waking on every completion"
                );
            }
            let _ = ready.send(Ok(Some(ring.waker())));
            run(ring, shard)
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            Ok(GlobalStats::default())
        }
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
    // Set-up only: whether the channel sockets' sends are stamped by the kernel. Per datagram the
    // loop asks the core (`Relay::unsubmitted`), never the mode.
    let tx_stamps = relay.config().send_times == SendTimes::Kernel;
    let slots = (0..relay.config().max_channels)
        .map(|_| Slot::default())
        .collect();
    let (small, large) = (ring.capacity(Group::Small), ring.capacity(Group::Large));
    let ids = SendIds {
        drain: Vec::new(),
        rx: vec![NO_ID; small.map_or(0, |c| usize::from(c.rx))],
        tx: vec![NO_ID; small.map_or(0, |c| usize::from(c.tx))],
        large: vec![NO_ID; large.map_or(0, |c| usize::from(c.tx))],
    };
    let mut s = Sockets {
        ring,
        slots,
        rearm: Vec::new(),
        shared: None,
        stamps: tx_stamps.then_some(if bind.stamp_command {
            StampSource::Command
        } else {
            StampSource::ErrorQueue
        }),
        restamp: Vec::new(),
        ids,
    };
    s.ring.expect_stamps(s.stamps == Some(StampSource::Command));
    let mut counters = BackendCounters::default();
    s.ring.arm(Arm::Waker, UserData::of(WAKE))?;
    if bind.shared_echo {
        let slot = relay.config().max_channels;
        let socket = relay_io::bind_udp(bind.ip, 0, bind.rcvbuf)?;
        if bind.timestamps {
            relay_io::enable_rx_timestamps(&socket)?;
        }
        relay_io::enable_udp_gro(&socket)?;
        s.ring.register_socket(slot, socket.as_raw_fd())?;
        s.ring.arm(echo_arm(slot), UserData::of(ECHO_RECV))?;
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
        if relay.unsubmitted() > 0 {
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
        let mut completions = s.ring.drain_completions();
        counters.batch(completions.len());
        for c in &mut completions {
            match c.user_data.kind {
                kind @ (RECV | ECHO_RECV) => {
                    let mut io = Io {
                        s: &mut s,
                        relay: &mut relay,
                        counters: &mut counters,
                        clock: &clock,
                    };
                    if kind == RECV {
                        on_recv(&mut io, now, c)?;
                    } else {
                        on_echo_recv(&mut io, now, c)?;
                    }
                }
                SEND_TX | LARGE_TX => {
                    let tx = c.user_data.kind == SEND_TX;
                    let id = c.take_tx().and_then(|buf| {
                        let i = buf.id();
                        s.ring.recycle(buf);
                        SendIds::take(if tx { &mut s.ids.tx } else { &mut s.ids.large }, i)
                    });
                    if c.result < 0 {
                        if let Some(id) = id {
                            let _ = relay.send_failed(id);
                        }
                        let (slot, d) = if tx {
                            (c.user_data.slot, Direction::ToAsterisk)
                        } else {
                            (relay.config().max_channels, Direction::ToEcho)
                        };
                        send_log.note(&mut counters, now, -c.result, slot, d);
                    }
                }
                SEND => {
                    let id = c.take_rx().and_then(|buf| {
                        let bid = buf.id();
                        s.ring.recycle(buf);
                        SendIds::take(&mut s.ids.rx, bid)
                    });
                    if c.result < 0 {
                        if let Some(id) = id {
                            let _ = relay.send_failed(id);
                        }
                        let slot = c.user_data.slot;
                        let d = Direction::ALL[(c.user_data.tag & 1) as usize];
                        send_log.note(&mut counters, now, -c.result, slot, d);
                    }
                }
                STAMPS => on_stamps(&mut s, &mut relay, &mut counters, &clock, c),
                WAKE => {
                    // Commands push receives and cancels, which may submit the queued sends
                    // implicitly: they leave now, between clock reads.
                    if relay.unsubmitted() > 0 {
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
                    s.ring.arm(Arm::Waker, UserData::of(WAKE))?;
                }
                _ => {}
            }
        }
        if let Some(sh) = s.shared.as_mut() {
            if sh.batch.is_some() {
                make_room(&mut s.ring, &mut relay, &clock, &mut counters)?;
            }
            sh.flush(&mut s.ring, &mut relay, &mut counters, &mut s.ids);
        }
        s.ring.give_back(completions);
        s.ring.sync_buffers();
        // Every push below may find the queue full and submit the sends in it: make room first,
        // so that they leave between clock reads (their T0).
        if s.shared.as_ref().is_some_and(|sh| !sh.armed) {
            make_room(&mut s.ring, &mut relay, &clock, &mut counters)?;
        }
        if let Some(sh) = s.shared.as_mut().filter(|sh| !sh.armed) {
            s.ring.arm(echo_arm(sh.slot), UserData::of(ECHO_RECV))?;
            sh.armed = true;
        }

        for slot in std::mem::take(&mut s.rearm) {
            let Some(st) = s.slots.get_mut(slot as usize) else {
                continue;
            };
            if st.socket.is_some() && !st.armed {
                make_room(&mut s.ring, &mut relay, &clock, &mut counters)?;
                s.ring.arm(recv_arm(slot), recv_data(slot, st.gen))?;
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
}

fn on_recv(io: &mut Io<'_>, now: MonoTime, c: &mut Completion) -> std::io::Result<()> {
    let (slot, gen) = (c.user_data.slot, c.user_data.tag);
    let current =
        io.s.slots
            .get(slot as usize)
            .is_some_and(|st| st.socket.is_some() && st.gen == gen);
    if c.result < 0 {
        match -c.result {
            libc::ENOBUFS => io.counters.rearm_nobufs += 1,
            libc::ECANCELED => {}
            _ => {
                io.counters.recv_errors += 1;
                io.counters.rearm_other += 1;
            }
        }
    } else if let Some(buf) = c.take_rx() {
        forward(io, now, slot, buf, current)?;
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
    mut buf: RxBuf,
    current: bool,
) -> std::io::Result<()> {
    let Io {
        s,
        relay,
        counters,
        clock,
    } = io;
    make_room(&mut s.ring, relay, clock, counters)?;
    // The core may write into the datagram (a probe's return), which then leaves as it is. One
    // parse of the kernel's header gives the source, the stamp and the writable payload.
    let verdict = match s.ring.received_mut(&mut buf) {
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
            Some(from) => {
                let arrival = clock.arrival(r.control, now, counters);
                let n = r.payload.len();
                Some((
                    relay.handle_received(arrival, now, SocketId(slot), from, r.payload),
                    n,
                ))
            }
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
    match verdict {
        Some((
            Verdict::Forward {
                to,
                direction: Direction::ToEcho,
            },
            n,
        )) if s.shared.is_some() => {
            gather(s, relay, counters, slot, &buf, n, to);
            s.ring.recycle(buf);
        }
        Some((Verdict::Forward { to, direction }, n)) => {
            let stamp_id = relay.send_id();
            let opts = SendOpts {
                segment: None,
                stamp_id,
            };
            let bid = buf.id();
            let ud = UserData::new(SEND, slot, u32::try_from(direction.index()).unwrap_or(0));
            match s.ring.send(slot, buf, n, to, ud, opts) {
                Ok(()) => {
                    SendIds::set(&mut s.ids.rx, bid, stamp_id);
                    if stamp_id.is_some() {
                        mark_drain(&mut s.slots, &mut s.ids.drain, slot);
                    }
                }
                Err(refused) => {
                    counters.send_errors += 1;
                    s.ring.recycle(refused.buf);
                    if let Some(id) = stamp_id {
                        let _ = relay.send_failed(id);
                    }
                }
            }
        }
        _ => s.ring.recycle(buf),
    }
    Ok(())
}

/// Before a send is queued: when the submission queue is full and it holds sends the core times
/// by their submission (estimated send times: `Relay::unsubmitted`), queueing would submit them
/// without a clock read around it, so they are submitted here, between two, and leave now.
fn make_room(
    ring: &mut Ring,
    relay: &mut Relay,
    clock: &ArrivalClock,
    counters: &mut BackendCounters,
) -> std::io::Result<()> {
    if relay.unsubmitted() > 0 && ring.submission_full() {
        let start = clock.now();
        ring.submit()?;
        relay.submitted_between(start, clock.now());
        counters.enters += 1;
    }
    Ok(())
}

/// Shared echo leg, on the way out: copies the datagram in `buf` (payload `n` bytes) into the
/// batch for `to` and writes the channel's tag over its SSRC there; starts a new batch when the
/// size or the address differs, or the batch is full (at most [`MAX_SEGMENTS`] datagrams, fewer
/// where the ring's GSO limit is lower). False when no large buffer is free (the datagram is
/// then counted as a refused send).
fn gather(
    s: &mut Sockets,
    relay: &mut Relay,
    counters: &mut BackendCounters,
    slot: u32,
    buf: &RxBuf,
    n: usize,
    to: std::net::SocketAddr,
) -> bool {
    let Some(sh) = s.shared.as_mut() else {
        return false;
    };
    let max_segments = MAX_SEGMENTS.min(s.ring.gso().max_segments);
    if let Some(b) = &sh.batch {
        let fits =
            b.to == to && b.size == n && b.count < max_segments && b.used + n <= MAX_GSO_BYTES;
        if !fits {
            sh.flush(&mut s.ring, relay, counters, &mut s.ids);
        }
    }
    let mut b = match sh.batch.take() {
        Some(b) => b,
        None => {
            let Some(buffer) = s.ring.tx_acquire(Group::Large) else {
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
    let Some(copied) = s.ring.copy(buf, 0..n, &mut b.buffer, b.used) else {
        if b.count == 0 {
            s.ring.recycle(b.buffer);
        } else {
            sh.batch = Some(b);
        }
        counters.send_errors += 1;
        cancel_last(relay);
        return false;
    };
    if let Some(bytes) = s.ring.tx_buffer(&mut b.buffer) {
        relay.tag_for_echo(SocketId(slot), &mut bytes[b.used..b.used + copied]);
    }
    relay.gathered_last(b.buffer.id());
    b.count += 1;
    b.used += copied;
    sh.batch = Some(b);
    true
}

/// Shared echo leg, on the way back: a receive on the shared socket holds one datagram or, with
/// GRO, several of one size; each is copied into a small transmit buffer, its tag replaced by
/// Asterisk's SSRC, handed to the core as its channel's return (arrival: the receive's kernel
/// stamp), and sent from that channel's socket.
fn on_echo_recv(io: &mut Io<'_>, now: MonoTime, c: &mut Completion) -> std::io::Result<()> {
    let Io {
        s,
        relay,
        counters,
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
    let Some(bid) = c.take_rx() else {
        return Ok(());
    };
    let Some((from, arrival, n, segment, truncated)) = s.ring.received(&bid).map(|r| {
        let arrival = clock.arrival(r.control, now, counters);
        (r.from, arrival, r.payload.len(), r.segment, r.truncated)
    }) else {
        counters.recv_errors += 1;
        s.ring.recycle(bid);
        return Ok(());
    };
    let Some(from) = from.filter(|_| !truncated) else {
        counters.oversize += u64::from(truncated);
        s.ring.recycle(bid);
        return Ok(());
    };
    let seg = segment.map_or(n, usize::from).max(1);
    let mut off = 0;
    while off < n {
        let m = seg.min(n - off);
        let at = off;
        off += m;
        make_room(&mut s.ring, relay, clock, counters)?;
        // Longer than a small buffer, or none free.
        let Some(mut i) = s.ring.tx_acquire(Group::Small) else {
            counters.oversize += 1;
            continue;
        };
        if s.ring.copy(&bid, at..at + m, &mut i, 0).is_none() {
            counters.oversize += 1;
            s.ring.recycle(i);
            continue;
        }
        let Some(buf) = s.ring.tx_buffer(&mut i).and_then(|b| b.get_mut(..m)) else {
            s.ring.recycle(i);
            continue;
        };
        let Some(socket) = relay.untag_from_echo(buf) else {
            s.ring.recycle(i);
            continue;
        };
        let open = s
            .slots
            .get(socket.0 as usize)
            .is_some_and(|st| st.socket.is_some());
        if !open {
            relay.count_drop(relay_proto::DropReason::NoChannel);
            s.ring.recycle(i);
            continue;
        }
        match relay.handle_received(arrival, now, socket, from, buf) {
            Verdict::Forward { to, .. } => {
                let ud = UserData::new(SEND_TX, socket.0, 0);
                let stamp_id = relay.send_id();
                let opts = SendOpts {
                    segment: None,
                    stamp_id,
                };
                let id = i.id();
                match s.ring.send(socket.0, i, m, to, ud, opts) {
                    Ok(()) => {
                        SendIds::set(&mut s.ids.tx, id, stamp_id);
                        if stamp_id.is_some() {
                            mark_drain(&mut s.slots, &mut s.ids.drain, socket.0);
                        }
                    }
                    Err(refused) => {
                        counters.send_errors += 1;
                        s.ring.recycle(refused.buf);
                        if let Some(id) = stamp_id {
                            let _ = relay.send_failed(id);
                        }
                    }
                }
            }
            Verdict::Drop(_) => s.ring.recycle(i),
        }
    }
    s.ring.recycle(bid);
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
        StampSource::Command => ring.arm(Arm::TxStamps { slot }, UserData::new(STAMPS, slot, gen)),
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
    let (slot, gen) = (c.user_data.slot, c.user_data.tag);
    let shared_slot = s.shared.as_ref().map(|sh| sh.slot);
    let current = shared_slot == Some(slot)
        || s.slots
            .get(slot as usize)
            .is_some_and(|st| st.socket.is_some() && st.gen == gen);
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
