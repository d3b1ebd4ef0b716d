//! `echo`: an RTP reflector on one UDP port that returns every datagram to its source.
//!
//! It must never be what limits a benchmark, so it runs on the relay's io_uring code: one
//! multishot `RecvMsg` on a provided-buffer ring, and each datagram sent back by `SendMsg`
//! straight from the buffer it arrived in. With no fault configured it keeps no state but the
//! transmit stamps it waits for. With faults ([`faults`]), held packets keep their
//! buffer until they leave; duplicates are copied into a transmit buffer.
//!
//! With `--gro` the socket has UDP GRO: the segments of a sender's GSO send arrive as one
//! receive in a 64 KiB buffer. Without faults they go back as one GSO send of the same segment
//! size, so a batch costs the echo one receive and one send however many datagrams it holds.
//! With faults each segment is a datagram of its own to the fault model: it is copied into a
//! 2 KiB transmit buffer (the coalesced buffer goes back to the kernel at once) and dropped,
//! held or duplicated like any other, with the same counts. The datagrams that leave in one
//! iteration of the loop (sent at once, or due together) are gathered again, in the order they
//! leave, into GSO sends (equal size, one destination, up to 64), so a batch that meets no fault
//! goes back as one send still.
//!
//! **Times are the kernel's.** A datagram's arrival is its kernel receive stamp
//! (`SO_TIMESTAMPNS`); delay, jitter and pacing count from it. Its hold ends at the kernel's
//! transmit stamp of the send that reflected it (`SO_TIMESTAMPING`, software stamp taken as the
//! packet is handed to the device; on loopback, the moment `tcpdump` sees it). Every reflection
//! send (plain, GSO, regathered GSO, duplicate) carries a stamp id, and its stamp comes back on
//! the socket's error queue, read after every submission and when it polls ready (`--tx-stamps
//! command` reads them through io_uring's transmit-timestamp command instead, which Linux 6.18
//! was seen to corrupt provided-buffer receives with, see [`TxStamps`]). Both kinds of stamp are
//! `CLOCK_REALTIME`, converted to the echo's monotonic clock ([`relay_io::WallToMono`]); the
//! reflections waiting for their stamp are kept in a fixed ring indexed by the id (`stamps`:
//! O(1), nothing allocated per packet, a stale or unknown id counted and ignored). A hold that
//! cannot be taken from two kernel stamps (the stamp never came, the send failed, a clock step,
//! or a hold that would be zero or negative) is counted in `timestamps_missing`, never recorded.
//! Where the kernel refuses stamps altogether the echo says `timestamps: user` and times holds
//! from handling to submission instead.
//!
//! Counts are published to atomics once per batch for `/metrics`, and printed as a JSON line on
//! standard output when the echo exits (SIGTERM, SIGINT, or `--duration`).
#![forbid(unsafe_code)]

pub mod faults;
mod stamps;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_io::ring::{Arm, Buf, Completion, Group, Ring, SetupError, TxBuf, UserData};
use relay_io::{SendOpts, TxStamp, TxStampError};
use serde::Serialize;

use crate::faults::{Action, EchoCounts, FaultConfig, Faults};
use crate::stamps::{Flights, Run};

/// Echo settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Metrics endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// Core to pin the I/O thread to.
    pub core: Option<usize>,
    /// Faults.
    pub faults: FaultConfig,
    /// Receive buffers in the ring.
    pub buffers: u16,
    /// SO_RCVBUF of the socket.
    pub rcvbuf: usize,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Receive with UDP GRO and reflect coalesced batches with UDP GSO (clean only).
    pub gro: bool,
    /// How transmit stamps are collected.
    pub tx_stamps: TxStamps,
}

/// How the echo collects the transmit stamps of its reflections (as the relay's `--tx-stamps`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TxStamps {
    /// Error readiness (a multishot `POLLERR` poll), then `recvmsg(MSG_ERRQUEUE)` after every
    /// submission: the default.
    #[default]
    ErrorQueue,
    /// io_uring's `SOCKET_URING_OP_TX_TIMESTAMP` command (Linux 6.15+; the error queue where the
    /// kernel refuses it, and always with `--gro`). Armed beside provided-buffer receives it was
    /// seen on Linux 6.18 to hand a receive a buffer still in use (with GRO batches, or when the
    /// buffers ran short): a reflection then carries another datagram's bytes and the stamps
    /// the wrong ids. For experiments only.
    Command,
}

/// Receive buffers with `--gro`: each holds a coalesced batch of up to 64 KiB.
const GRO_BUFFERS: u16 = 512;

/// Where the transmit stamps of the reflections come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TxStampSource {
    /// io_uring's `SOCKET_URING_OP_TX_TIMESTAMP` command (Linux 6.15+).
    Ring,
    /// The socket's error queue, read after each submission and when it polls ready.
    ErrorQueue,
    /// None: the kernel refused transmit (or receive) stamps; holds are user time.
    None,
}

/// Counters shared with the metrics endpoint.
#[derive(Debug, Default)]
pub struct SharedCounts {
    /// See [`EchoCounts`].
    pub received: AtomicU64,
    /// See [`EchoCounts`].
    pub sent: AtomicU64,
    /// See [`EchoCounts`].
    pub dropped: AtomicU64,
    /// See [`EchoCounts`].
    pub duplicated: AtomicU64,
    /// See [`EchoCounts`].
    pub reordered: AtomicU64,
    /// See [`EchoCounts`].
    pub delayed: AtomicU64,
    /// See [`EchoCounts`].
    pub no_buffer: AtomicU64,
    /// Packets held right now.
    pub held: AtomicU64,
    /// See [`Summary::timestamps_missing`].
    pub timestamps_missing: AtomicU64,
    /// See [`Summary::timestamps_stale`].
    pub timestamps_stale: AtomicU64,
}

impl SharedCounts {
    fn store(&self, c: &EchoCounts, held: usize, stamps: StampCounts) {
        self.received.store(c.received, Ordering::Relaxed);
        self.sent.store(c.sent, Ordering::Relaxed);
        self.dropped.store(c.dropped, Ordering::Relaxed);
        self.duplicated.store(c.duplicated, Ordering::Relaxed);
        self.reordered.store(c.reordered, Ordering::Relaxed);
        self.delayed.store(c.delayed, Ordering::Relaxed);
        self.no_buffer.store(c.no_buffer, Ordering::Relaxed);
        self.held.store(held as u64, Ordering::Relaxed);
        self.timestamps_missing
            .store(stamps.missing, Ordering::Relaxed);
        self.timestamps_stale.store(stamps.stale, Ordering::Relaxed);
    }

    /// Prometheus text.
    #[must_use]
    pub fn render(&self) -> String {
        use appkit::prom::{counter_metric, encode, gauge_metric, named_family};
        use prometheus::proto::MetricType::{COUNTER, GAUGE};
        let counter = |name: &str, help: &str, v: &AtomicU64| {
            named_family(
                name,
                help,
                COUNTER,
                vec![counter_metric(vec![], v.load(Ordering::Relaxed))],
            )
        };
        encode(&[
            counter(
                "rtpecho_received_total",
                "Datagrams received.",
                &self.received,
            ),
            counter(
                "rtpecho_sent_total",
                "Datagrams sent, duplicates included.",
                &self.sent,
            ),
            counter(
                "rtpecho_dropped_total",
                "Datagrams dropped by --loss.",
                &self.dropped,
            ),
            counter(
                "rtpecho_duplicated_total",
                "Extra copies sent by --duplicate.",
                &self.duplicated,
            ),
            counter(
                "rtpecho_reordered_total",
                "Packets sent after a later packet of their stream.",
                &self.reordered,
            ),
            counter(
                "rtpecho_delayed_total",
                "Packets held before leaving.",
                &self.delayed,
            ),
            counter(
                "rtpecho_no_buffer_total",
                "Datagrams lost for want of a transmit buffer (--gro with faults); 0 for exact fault counts.",
                &self.no_buffer,
            ),
            counter(
                "rtpecho_timestamps_missing_total",
                "Reflected datagrams whose hold was not recorded: the kernel's transmit stamp of their send never came (or the send failed), a clock step, or a hold that was not positive.",
                &self.timestamps_missing,
            ),
            counter(
                "rtpecho_timestamps_stale_total",
                "Transmit stamps that settled nothing: an id no send waits for, or an entry that is not a usable stamp.",
                &self.timestamps_stale,
            ),
            named_family(
                "rtpecho_held",
                "Packets held right now.",
                GAUGE,
                vec![gauge_metric(
                    vec![],
                    self.held.load(Ordering::Relaxed) as f64,
                )],
            ),
        ])
    }
}

/// The final report.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Address listened on.
    pub listen: SocketAddr,
    /// Counts.
    #[serde(flatten)]
    pub counts: EchoCounts,
    /// Datagrams received per second of run time.
    pub packets_per_second: f64,
    /// CPU seconds used by the I/O thread per datagram received, in nanoseconds.
    pub cpu_ns_per_packet: Option<f64>,
    /// How long each reflected datagram (duplicates included) stayed in the echo: its kernel
    /// receive stamp to the kernel transmit stamp of the send that reflected it (`--delay`,
    /// `--jitter` and `--pace` included). The reference a relay's round trip is compared with.
    /// With `timestamps: user`, its handling to the submission of that send.
    pub hold: relay_proto::LatencySummary,
    /// Where times came from: `kernel` (receive and transmit stamps) or `user` (the kernel
    /// refused them: clock reads at handling and submission).
    pub timestamps: &'static str,
    /// Where transmit stamps came from: `ring` (io_uring's command), `error_queue`, or `none`.
    pub tx_timestamps: TxStampSource,
    /// Reflected datagrams whose hold was not recorded: the transmit stamp of their send never
    /// came (or the send failed, or the echo stopped first), the wall clock stepped, or the hold
    /// would have been zero or negative. `hold.count + timestamps_missing = sent`.
    pub timestamps_missing: u64,
    /// Transmit stamps that settled nothing: an id no send waits for (given up on already), or
    /// an error-queue entry that is not a usable stamp.
    pub timestamps_stale: u64,
    /// Steps of the wall clock seen (their batches' arrivals were taken at handling time).
    pub clock_steps: u64,
    /// Whether it received with UDP GRO.
    pub gro: bool,
    /// Receives that held more than one datagram (UDP GRO coalesced them).
    pub coalesced: u64,
    /// Sends that carried more than one datagram (UDP GSO), with `--gro`.
    pub gso_sends: u64,
}

/// How long a reflection waits for its transmit stamp before it is given up on (a stamp takes
/// microseconds).
const STAMP_TIMEOUT_NS: u64 = 1_000_000_000;
/// How long the echo waits for the last stamps when it stops.
const FINAL_STAMPS: Duration = Duration::from_millis(200);
/// Most error-queue entries read in one pass (the buffer is allocated once, this big).
const ERRQUEUE_BATCH: usize = 4096;

/// The timestamp counters.
#[derive(Clone, Copy, Debug, Default)]
struct StampCounts {
    /// See [`Summary::timestamps_missing`].
    missing: u64,
    /// See [`Summary::timestamps_stale`].
    stale: u64,
}

/// The echo's clock: arrivals from the kernel's receive stamps, and the hold of every datagram
/// it reflects, from that arrival to the kernel's transmit stamp of its reflection.
#[derive(Debug)]
struct Timing {
    /// The monotonic clock (nanoseconds since the echo started).
    clock: relay_io::Clock,
    /// Kernel stamps → monotonic, re-sampled each batch after its completions are drained.
    wall: relay_io::WallToMono,
    /// Whether times are kernel stamps (receive and transmit); false: clock reads.
    kernel: bool,
    /// Where transmit stamps come from.
    source: TxStampSource,
    /// The loop's time (the last sample), for the sweep.
    now: u64,
    /// Reflections waiting for their transmit stamp (with user time: for their submission).
    flights: Flights,
    /// Stamps read from the error queue, settled after the sample that follows them.
    errq: Vec<TxStamp>,
    /// Whether the ring's command has given a stamp since it was last armed.
    ring_stamped: bool,
    /// Receives that held more than one datagram.
    coalesced: u64,
    /// Holds.
    hold: relay_proto::stats::LatencyHistogram<u64>,
    /// Timestamp counters.
    counts: StampCounts,
}

impl Timing {
    /// The arrival of a datagram with control messages `control`, handled at `now`: a time for
    /// the fault model, and whether it is a kernel stamp a hold can start from (always, with
    /// user time).
    fn arrival(&self, control: &[u8], now: u64) -> (u64, bool) {
        if !self.kernel {
            return (now, true);
        }
        relay_io::rx_timestamp(control)
            .ok()
            .flatten()
            .and_then(|t| self.wall.to_mono(t))
            .map_or((now, false), |t| (t, true))
    }

    /// `count` datagrams that arrived at `arrival` (`timed`: a time a hold can start from) are
    /// about to leave in one send: the id that send carries. If the send is not queued after
    /// all, [`Flights::cancel`] it.
    fn depart(&mut self, arrival: u64, timed: bool, count: u64) -> u32 {
        let missing = &mut self.counts.missing;
        self.flights.push(
            Run {
                arrival: timed.then_some(arrival),
                count,
            },
            self.now,
            |r| *missing += r.count,
        )
    }

    /// What a send carrying stamp id `id` (and `segment`) asks of the kernel.
    fn opts(&self, id: u32, segment: Option<u16>) -> SendOpts {
        SendOpts {
            segment,
            stamp_id: self.kernel.then_some(id),
        }
    }

    /// A transmit stamp came back.
    fn stamped(&mut self, s: TxStamp) {
        let left = self.wall.to_mono(s.at);
        let (hold, missing) = (&mut self.hold, &mut self.counts.missing);
        let found = self
            .flights
            .settle(s.id, |run| record(hold, missing, run, left));
        if !found {
            self.counts.stale += 1;
        }
    }

    /// The send that carried `id` failed: its stamp will never come.
    fn failed(&mut self, id: u32) {
        if self.kernel {
            let missing = &mut self.counts.missing;
            let _ = self.flights.settle(id, |run| *missing += run.count);
        }
    }

    /// With user time: every reflection queued is submitted now.
    fn submitted(&mut self) {
        if self.kernel || self.flights.waiting() == 0 {
            return;
        }
        let now = self.clock.now_ns();
        let (hold, missing) = (&mut self.hold, &mut self.counts.missing);
        self.flights
            .sweep(u64::MAX, |run| record(hold, missing, run, Some(now)));
    }

    /// Gives up on reflections whose stamp is overdue (all of them with `everything`).
    fn sweep(&mut self, everything: bool) {
        let deadline = if everything {
            u64::MAX
        } else {
            self.now.saturating_sub(STAMP_TIMEOUT_NS)
        };
        let missing = &mut self.counts.missing;
        self.flights.sweep(deadline, |run| *missing += run.count);
    }

    /// Reads the stamps waiting on `socket`'s error queue (settled by [`Timing::settle_errq`]
    /// after the next sample).
    fn read_errq(&mut self, socket: &UdpSocket) {
        while self.errq.len() + relay_io::socket::STAMP_BATCH <= ERRQUEUE_BATCH {
            let (errq, stale) = (&mut self.errq, &mut self.counts.stale);
            let read = relay_io::recv_tx_stamps(socket, |r| match r {
                Ok(s) => errq.push(s),
                Err(_) => *stale += 1,
            });
            // Fewer than a full batch: the queue was empty when the call returned.
            if !matches!(read, Ok(relay_io::socket::STAMP_BATCH)) {
                break;
            }
        }
    }

    /// Settles the stamps [`Timing::read_errq`] read.
    fn settle_errq(&mut self) {
        let mut errq = std::mem::take(&mut self.errq);
        for s in errq.drain(..) {
            self.stamped(s);
        }
        self.errq = errq;
    }

    /// Takes the clock sample the batch's stamps are converted with (after they were drained,
    /// so that every stamp is older than it).
    fn resample(&mut self) -> u64 {
        let sample = self.clock.sample();
        self.wall.resample(sample);
        self.now = sample.mono_after;
        self.now
    }
}

/// Records `run`'s hold, which left at `left`, or counts it missing.
fn record(
    hold: &mut relay_proto::stats::LatencyHistogram<u64>,
    missing: &mut u64,
    run: Run,
    left: Option<u64>,
) {
    match (run.arrival, left) {
        (Some(a), Some(l)) if l > a => hold.record_n(l - a, run.count),
        _ => *missing += run.count,
    }
}

// The kinds of the ring's user data ([`UserData::kind`]).
const RECV: u8 = 1;
/// A reflection from the receive buffer it arrived in (the stamp id as the tag).
const SEND: u8 = 2;
/// A send from a small transmit buffer (the stamp id as the tag).
const SEND_TX: u8 = 3;
const WAKE: u8 = 4;
/// A receive into the large (GRO) buffers, with faults.
const RECV_LARGE: u8 = 5;
/// A GSO send of regathered datagrams from a large transmit buffer, with faults.
const SEND_LARGE: u8 = 6;
/// io_uring's transmit-stamp command.
const TX_STAMPS: u8 = 7;
/// The error-readiness poll (transmit stamps from the error queue).
const ERR_POLL: u8 = 8;

/// A send's user data: its kind and the stamp id it carries (its buffer comes back with its
/// completion).
const fn send_data(kind: u8, id: u32) -> UserData {
    UserData::new(kind, 0, id)
}

/// The stamp id in a send's user data.
const fn send_id(user_data: UserData) -> u32 {
    user_data.tag
}

/// Why the echo could not start, or stopped. Each message carries its cause.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listen socket could not be bound.
    #[error("--listen {addr}: {error}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The error.
        error: io::Error,
    },
    /// The kernel refused UDP GRO on the socket.
    #[error("--gro: UDP_GRO: {0}")]
    Gro(io::Error),
    /// io_uring could not be set up.
    #[error("io_uring: {0}")]
    Ring(SetupError),
    /// The socket or the ring failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<SetupError> for RunError {
    fn from(e: SetupError) -> Self {
        Self::Ring(e)
    }
}

/// Large transmit buffers with `--gro` and faults, for regathered GSO sends (4 MiB).
const GSO_TX: u16 = 64;
/// Most datagrams in one GSO send.
const MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send.
const MAX_GSO_BYTES: usize = 65_000;

/// The GSO send being gathered.
#[derive(Debug)]
struct Batch {
    /// Its large transmit buffer.
    buffer: TxBuf,
    /// Its destination.
    to: SocketAddr,
    /// Its datagrams' size.
    size: usize,
    /// Datagrams in it.
    count: usize,
    /// Bytes in it.
    used: usize,
    /// The stamp id of its first run: the id the send carries.
    first: u32,
    /// Its last run, and that run's arrival (a datagram of the same arrival joins it).
    last: (u32, Option<u64>),
}

/// With `--gro` and faults: datagrams leaving in this iteration, gathered into one GSO send.
#[derive(Debug, Default)]
struct Regather {
    /// Whether datagrams are regathered (`--gro` with faults).
    on: bool,
    /// The send being gathered.
    batch: Option<Batch>,
    /// Sends that carried more than one datagram.
    gso_sends: u64,
}

impl Regather {
    /// Queues the gathered send, if any.
    fn flush(&mut self, ring: &mut Ring, timing: &mut Timing) {
        let Some(b) = self.batch.take() else {
            return;
        };
        let segment = (b.count > 1).then(|| u16::try_from(b.size).unwrap_or(u16::MAX));
        let ud = send_data(SEND_LARGE, b.first);
        match ring.send(0, b.buffer, b.used, b.to, ud, timing.opts(b.first, segment)) {
            Ok(()) => self.gso_sends += u64::from(b.count > 1),
            Err(refused) => {
                timing.flights.cancel(b.first);
                ring.recycle(refused.buf);
            }
        }
    }

    /// Appends `copies` copies of the `n`-byte datagram in small transmit buffer `tx` for `to`,
    /// which arrived at `arrival` (`timed`: a kernel stamp), starting a new send when they do
    /// not fit the current one (at most [`MAX_SEGMENTS`] datagrams, fewer where the ring's GSO
    /// limit is lower). False (nothing appended) when no large transmit buffer is free.
    #[allow(clippy::too_many_arguments)] // one datagram's facts
    fn append(
        &mut self,
        ring: &mut Ring,
        timing: &mut Timing,
        tx: &TxBuf,
        n: usize,
        to: SocketAddr,
        copies: u8,
        (arrival, timed): (u64, bool),
    ) -> bool {
        let k = usize::from(copies);
        let max_segments = MAX_SEGMENTS.min(ring.gso().max_segments);
        if let Some(b) = &self.batch {
            if b.to != to
                || b.size != n
                || b.count + k > max_segments
                || b.used + k * n > MAX_GSO_BYTES
            {
                self.flush(ring, timing);
            }
        }
        let (mut b, fresh) = match self.batch.take() {
            Some(b) => (b, false),
            None => match ring.tx_acquire(Group::Large) {
                Some(buffer) => (
                    Batch {
                        buffer,
                        to,
                        size: n,
                        count: 0,
                        used: 0,
                        first: 0,
                        last: (0, None),
                    },
                    true,
                ),
                None => return false,
            },
        };
        let mut copied = 0u64;
        for _ in 0..k {
            if ring.copy(tx, 0..n, &mut b.buffer, b.used).is_none() {
                break;
            }
            copied += 1;
            b.count += 1;
            b.used += n;
        }
        if copied == 0 {
            if fresh {
                ring.recycle(b.buffer);
            } else {
                self.batch = Some(b);
            }
            return false;
        }
        let stamp = timed.then_some(arrival);
        if fresh {
            let id = timing.depart(arrival, timed, copied);
            b.first = id;
            b.last = (id, stamp);
        } else if !(b.last.1 == stamp && timing.flights.grow(b.last.0, copied)) {
            let id = timing.depart(arrival, timed, copied);
            timing.flights.chain(b.last.0, id);
            b.last = (id, stamp);
        }
        self.batch = Some(b);
        true
    }
}

/// Transmit buffers with `--gro` and faults: every held segment lives in one (16 MiB).
const FAULT_TX: u16 = 8192;

/// A datagram the echo holds: its buffer, size and source.
#[derive(Debug, PartialEq, Eq)]
struct Item {
    /// Its buffer: the receive buffer it arrived in, or a transmit buffer (a segment cut out of
    /// a coalesced receive). The item owns it: it leaves by a send or goes back to the ring.
    buf: Buf,
    /// The payload's length.
    len: usize,
    /// Where it came from, and goes back to.
    from: SocketAddr,
    /// Its arrival (the kernel's stamp), nanoseconds on the echo's clock.
    arrival: u64,
    /// Whether `arrival` is a time its hold can start from (false: no usable kernel stamp).
    timed: bool,
}

/// Sets up transmit stamps on `socket` (fixed-file slot 0 of `ring`, nothing else armed yet)
/// and says where they will come from: the error queue, or with `--tx-stamps command` io_uring's
/// command where the kernel takes it (it refuses it at once, at submission, where it does not;
/// the error queue then); none where the kernel refuses stamps with ids.
///
/// With `gro` never the command: armed beside a multishot receive of GRO-coalesced batches into
/// 64 KiB buffers, Linux 6.18 was seen handing the receive a buffer still waiting to be
/// reflected (two batches in one buffer: the first one's datagrams overwritten before they
/// left), and the stamps then carried the ids of the sends that reused it.
fn tx_stamp_source(
    ring: &mut Ring,
    socket: &UdpSocket,
    listen: IpAddr,
    mode: TxStamps,
    gro: bool,
) -> io::Result<TxStampSource> {
    if let Err(e) =
        relay_io::enable_tx_timestamps(socket).and_then(|()| relay_io::probe_tx_stamps(listen))
    {
        tracing::warn!(
            "no kernel transmit stamps with ids ({e}): holds are user time (handling to submission)"
        );
        return Ok(TxStampSource::None);
    }
    if mode == TxStamps::Command && gro {
        tracing::warn!(
            "--tx-stamps command is not used with --gro: stamps come from the error queue"
        );
    }
    if mode == TxStamps::Command && !gro {
        ring.arm(Arm::TxStamps { slot: 0 }, UserData::of(TX_STAMPS))?;
        ring.submit()?;
        let cs = ring.drain_completions();
        let refused = cs
            .iter()
            .find(|c| c.user_data.kind == TX_STAMPS && !c.more())
            .map(|c| c.result);
        ring.give_back(cs);
        match refused {
            None => {
                // Each stamped send completes twice: the wait counts its stamp in.
                ring.expect_stamps(true);
                return Ok(TxStampSource::Ring);
            }
            Some(r) => tracing::info!(
                "io_uring refused the transmit-stamp command ({}): stamps come from the error queue",
                io::Error::from_raw_os_error(-r)
            ),
        }
    }
    ring.arm(Arm::ErrorPoll { slot: 0 }, UserData::of(ERR_POLL))?;
    Ok(TxStampSource::ErrorQueue)
}

/// Runs the echo until `stop` is set or `--duration` passes; returns the summary.
///
/// # Errors
/// Socket or io_uring set-up failed, or the ring failed.
#[allow(clippy::too_many_lines)] // one loop, read top to bottom
pub fn run(
    config: &Config,
    stop: &AtomicBool,
    shared: &SharedCounts,
    ready: impl FnOnce(SocketAddr, Arc<relay_io::ring::EventFd>),
) -> Result<Summary, RunError> {
    if let Some(id) = config.core {
        if !relay_io::pin_current_thread(id) {
            tracing::warn!(core = id, "cannot pin the echo to this core");
        }
    }
    let socket = relay_io::bind_udp(config.listen.ip(), config.listen.port(), config.rcvbuf)
        .map_err(|error| RunError::Listen {
            addr: config.listen,
            error,
        })?;
    let listen = socket.local_addr()?;
    let clean = config.faults.is_clean();
    let gro = config.gro;
    // Coalesced receives kept whole (clean), or cut into transmit buffers (faults).
    let gro_clean = gro && clean;
    let gro_faults = gro && !clean;
    if gro {
        relay_io::enable_udp_gro(&socket).map_err(RunError::Gro)?;
    }
    let mut ring = if gro_clean {
        Ring::builder(4096)
            .buffers(config.buffers.min(GRO_BUFFERS))
            .buffer_size(relay_io::ring::MAX_BUFFER_SIZE)
    } else if gro_faults {
        Ring::builder(4096)
            .buffers(16)
            .tx(FAULT_TX)
            .large(GRO_BUFFERS.min(config.buffers), GSO_TX)
    } else {
        Ring::builder(4096).buffers(config.buffers).tx(1024)
    }
    .build()?;
    let arm = |ring: &mut Ring| {
        let (group, kind) = if gro_faults {
            (Group::Large, RECV_LARGE)
        } else {
            (Group::Small, RECV)
        };
        ring.arm(Arm::Recv { slot: 0, group }, UserData::of(kind))
    };
    ring.register_socket(0, std::os::fd::AsRawFd::as_raw_fd(&socket))?;
    let source = match relay_io::enable_rx_timestamps(&socket) {
        Ok(()) => tx_stamp_source(&mut ring, &socket, listen.ip(), config.tx_stamps, gro)?,
        Err(e) => {
            tracing::warn!("no kernel receive timestamps ({e}): times are user time");
            TxStampSource::None
        }
    };
    let kernel = source != TxStampSource::None;
    tracing::info!(
        timestamps = if kernel { "kernel" } else { "user" },
        transmit_stamps = match source {
            TxStampSource::Ring => "io_uring",
            TxStampSource::ErrorQueue => "error queue",
            TxStampSource::None => "none",
        },
        "hold: kernel receive stamp to kernel transmit stamp of the reflection"
    );
    // The clock starts before the first datagram can arrive: every arrival converts.
    let mut timing = Timing {
        clock: relay_io::Clock::new(),
        wall: relay_io::WallToMono::new(),
        kernel,
        source,
        now: 0,
        flights: Flights::new(),
        errq: Vec::with_capacity(if source == TxStampSource::ErrorQueue {
            ERRQUEUE_BATCH
        } else {
            0
        }),
        ring_stamped: false,
        coalesced: 0,
        hold: relay_proto::stats::LatencyHistogram::new(3),
        counts: StampCounts::default(),
    };
    arm(&mut ring)?;
    ring.arm(Arm::Waker, UserData::of(WAKE))?;
    ready(listen, ring.waker());

    let mut faults: Faults<Item> = Faults::new(config.faults.clone());
    let mut clean_counts = EchoCounts::default();
    // Segments lost for want of a transmit buffer (with faults and --gro).
    let mut no_buffer = 0u64;
    let mut regather = Regather {
        on: gro_faults,
        ..Regather::default()
    };
    let start = Instant::now();
    let cpu_start = relay_io::thread_cpu_ns();
    let deadline = config.duration.map(|d| start + d);
    let mut rearm = false;
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        let now_ns = timing.clock.now_ns();
        let mut wait = Duration::from_millis(100);
        if let Some(due) = faults.next_due() {
            wait = wait.min(Duration::from_nanos(due.saturating_sub(now_ns).max(1)));
        }
        if let Some(d) = deadline {
            wait = wait.min(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1)),
            );
        }
        // This enter submits the reflections queued by the last batch.
        timing.submitted();
        ring.submit_and_wait(Some(wait))?;
        let mut completions = ring.drain_completions();
        if timing.source == TxStampSource::ErrorQueue {
            timing.read_errq(&socket);
        }
        // After the drain: every stamp in it is older than the sample.
        let now_ns = timing.resample();
        let mut rearm_stamps = false;
        for c in &mut completions {
            match c.user_data.kind {
                RECV => {
                    let mut io = Io {
                        ring: &mut ring,
                        faults: &mut faults,
                        timing: &mut timing,
                        regather: &mut regather,
                    };
                    on_recv(&mut io, &mut clean_counts, clean, now_ns, c);
                    if !c.more() {
                        rearm = true;
                    }
                }
                RECV_LARGE => {
                    let mut io = Io {
                        ring: &mut ring,
                        faults: &mut faults,
                        timing: &mut timing,
                        regather: &mut regather,
                    };
                    no_buffer += on_recv_segments(&mut io, now_ns, c);
                    if !c.more() {
                        rearm = true;
                    }
                }
                SEND | SEND_TX | SEND_LARGE => {
                    if c.result < 0 {
                        timing.failed(send_id(c.user_data));
                    }
                    if let Some(buf) = c.take_buf() {
                        ring.recycle(buf);
                    }
                }
                TX_STAMPS => rearm_stamps |= on_tx_stamp(&mut timing, c),
                // The error queue is read after every drain: the poll only wakes the loop.
                ERR_POLL if !c.more() => {
                    ring.arm(Arm::ErrorPoll { slot: 0 }, UserData::of(ERR_POLL))?;
                }
                WAKE => ring.arm(Arm::Waker, UserData::of(WAKE))?,
                _ => {}
            }
        }
        ring.give_back(completions);
        timing.settle_errq();
        if rearm_stamps {
            match timing.source {
                TxStampSource::Ring => {
                    ring.arm(Arm::TxStamps { slot: 0 }, UserData::of(TX_STAMPS))?;
                }
                // The stamps wait on the error queue: the poll completes at once if any do,
                // and the next batch reads them before its sample.
                _ => {
                    ring.expect_stamps(false);
                    ring.arm(Arm::ErrorPoll { slot: 0 }, UserData::of(ERR_POLL))?;
                }
            }
        }
        while let Some((item, copies)) = faults.pop_due(now_ns) {
            let mut io = Io {
                ring: &mut ring,
                faults: &mut faults,
                timing: &mut timing,
                regather: &mut regather,
            };
            send(&mut io, item, copies);
        }
        regather.flush(&mut ring, &mut timing);
        ring.sync_buffers();
        if rearm {
            arm(&mut ring)?;
            rearm = false;
        }
        timing.sweep(false);
        let counts = counts(clean, clean_counts, &faults, no_buffer);
        shared.store(&counts, faults.held(), timing.counts);
    }
    // What the last batch queued leaves now (it is counted sent), and its stamps are awaited.
    timing.submitted();
    ring.submit()?;
    final_stamps(&mut ring, &socket, &mut timing)?;
    timing.sweep(true);
    let counts = counts(clean, clean_counts, &faults, no_buffer);
    shared.store(&counts, faults.held(), timing.counts);
    let secs = start.elapsed().as_secs_f64();
    let cpu = relay_io::thread_cpu_ns()
        .zip(cpu_start)
        .map(|(b, a)| b.saturating_sub(a) as f64 / 1e9);
    Ok(Summary {
        listen,
        counts,
        packets_per_second: counts.received as f64 / secs.max(1e-9),
        cpu_ns_per_packet: cpu
            .filter(|_| counts.received > 0)
            .map(|c| c * 1e9 / counts.received as f64),
        hold: timing.hold.summary(),
        timestamps: if timing.kernel { "kernel" } else { "user" },
        tx_timestamps: timing.source,
        timestamps_missing: timing.counts.missing,
        timestamps_stale: timing.counts.stale,
        clock_steps: timing.wall.steps(),
        gro,
        coalesced: timing.coalesced,
        gso_sends: regather.gso_sends,
    })
}

/// A completion of the transmit-stamp command: settles its stamp. True when the command ended
/// and must be armed again; if it ended without giving a stamp since it was armed (refused), the
/// echo falls back to the error queue, where the stamps wait.
fn on_tx_stamp(timing: &mut Timing, c: &Completion) -> bool {
    match c.tx_stamp() {
        Ok(s) => {
            timing.ring_stamped = true;
            timing.stamped(s);
            false
        }
        Err(TxStampError::Ended(r)) => {
            if !timing.ring_stamped && timing.source == TxStampSource::Ring {
                tracing::warn!(
                    "the transmit-stamp command ended at once ({}): stamps come from the error \
                     queue from now on",
                    io::Error::from_raw_os_error(-r)
                );
                timing.source = TxStampSource::ErrorQueue;
                timing.errq.reserve(ERRQUEUE_BATCH);
            }
            timing.ring_stamped = false;
            true
        }
        Err(_) => {
            timing.counts.stale += 1;
            false
        }
    }
}

/// The echo is stopping: waits (at most [`FINAL_STAMPS`]) for the transmit stamps of the
/// reflections already sent. Reads the error queue too, where stamps wait whatever the source.
fn final_stamps(ring: &mut Ring, socket: &UdpSocket, timing: &mut Timing) -> io::Result<()> {
    if !timing.kernel {
        return Ok(());
    }
    let deadline = Instant::now() + FINAL_STAMPS;
    timing.errq.reserve(ERRQUEUE_BATCH);
    while timing.flights.waiting() > 0 && Instant::now() < deadline {
        ring.submit_and_wait(Some(Duration::from_millis(5)))?;
        let completions = ring.drain_completions();
        timing.read_errq(socket);
        timing.resample();
        // The buffers the sends give back go back to the ring with the completions.
        for c in &completions {
            match c.user_data.kind {
                SEND | SEND_TX | SEND_LARGE if c.result < 0 => timing.failed(send_id(c.user_data)),
                TX_STAMPS => {
                    if let Ok(s) = c.tx_stamp() {
                        timing.stamped(s);
                    }
                }
                _ => {}
            }
        }
        ring.give_back(completions);
        timing.settle_errq();
    }
    Ok(())
}

/// The counts so far: the clean path's own, or the fault model's plus the segments it never saw.
fn counts(
    clean: bool,
    clean_counts: EchoCounts,
    faults: &Faults<Item>,
    no_buffer: u64,
) -> EchoCounts {
    if clean {
        return clean_counts;
    }
    let mut c = faults.counts();
    c.received += no_buffer;
    c.no_buffer = no_buffer;
    c
}

/// What handling a datagram touches.
struct Io<'a> {
    /// The ring.
    ring: &'a mut Ring,
    /// The fault model.
    faults: &'a mut Faults<Item>,
    /// Arrivals, holds and the stamps they wait for.
    timing: &'a mut Timing,
    /// With `--gro` and faults: the GSO send being gathered.
    regather: &'a mut Regather,
}

fn on_recv(
    io: &mut Io<'_>,
    clean_counts: &mut EchoCounts,
    clean: bool,
    now_ns: u64,
    c: &mut Completion,
) {
    if c.result < 0 {
        return; // ENOBUFS and the like: re-armed after this batch
    }
    let Some(bid) = c.take_rx() else { return };
    let Some(r) = io.ring.received(&bid) else {
        io.ring.recycle(bid);
        return;
    };
    let Some(from) = r.from else {
        io.ring.recycle(bid);
        return;
    };
    let n = r.payload.len();
    let (arrival, timed) = io.timing.arrival(r.control, now_ns);
    if clean {
        // A GRO receive holds `datagrams` of `segment` bytes (the last may be shorter): one GSO
        // send reflects them all, from the buffer they arrived in, and its stamp times them all.
        let segment = r.segment.filter(|&s| usize::from(s) < n);
        let datagrams = segment.map_or(1, |s| n.div_ceil(usize::from(s))) as u64;
        clean_counts.received += datagrams;
        io.timing.coalesced += u64::from(datagrams > 1);
        let id = io.timing.depart(arrival, timed, datagrams);
        let opts = io.timing.opts(id, segment);
        match io.ring.send(0, bid, n, from, send_data(SEND, id), opts) {
            Ok(()) => {
                clean_counts.sent += datagrams;
                io.regather.gso_sends += u64::from(datagrams > 1);
            }
            Err(refused) => {
                io.timing.flights.cancel(id);
                io.ring.recycle(refused.buf);
            }
        }
        return;
    }
    let item = Item {
        buf: Buf::Rx(bid),
        len: n,
        from,
        arrival,
        timed,
    };
    // The fault model reads the payload where it lies (the ring is borrowed only to read);
    // delay, jitter and pacing count from the kernel's arrival.
    let action = io.faults.on_packet(arrival, r.payload, item);
    act(io, action);
}

/// With faults and `--gro`: a receive into a large buffer holds one datagram or several of one
/// size; each is copied into a transmit buffer and given to the fault model as a datagram of its
/// own, and the large buffer goes back at once. Returns how many found no transmit buffer.
fn on_recv_segments(io: &mut Io<'_>, now_ns: u64, c: &mut Completion) -> u64 {
    if c.result < 0 {
        return 0; // ENOBUFS and the like: re-armed after this batch
    }
    let Some(bid) = c.take_rx() else { return 0 };
    let Some((from, n, segment, (arrival, timed))) = io.ring.received(&bid).and_then(|r| {
        let arrival = io.timing.arrival(r.control, now_ns);
        r.from
            .filter(|_| !r.truncated)
            .map(|from| (from, r.payload.len(), r.segment, arrival))
    }) else {
        io.ring.recycle(bid);
        return 0;
    };
    let seg = segment.map_or(n, usize::from).clamp(1, n.max(1));
    io.timing.coalesced += u64::from(seg < n);
    let mut lost = 0;
    let mut off = 0;
    while off < n {
        let m = seg.min(n - off);
        let at = off;
        off += m;
        let Some(mut i) = io.ring.tx_acquire(Group::Small) else {
            lost += 1;
            continue;
        };
        if io.ring.copy(&bid, at..at + m, &mut i, 0).is_none() {
            io.ring.recycle(i);
            lost += 1;
            continue;
        }
        let Some(payload) = io.ring.tx_buffer(&mut i).and_then(|b| b.get(..m)) else {
            io.ring.recycle(i);
            lost += 1;
            continue;
        };
        let item = Item {
            buf: Buf::Tx(i),
            len: m,
            from,
            arrival,
            timed,
        };
        let action = io.faults.on_packet(arrival, payload, item);
        act(io, action);
    }
    io.ring.recycle(bid);
    lost
}

/// Carries out the fault model's decision on a datagram just received.
fn act(io: &mut Io<'_>, action: Action<Item>) {
    match action {
        Action::Send { item, copies } => send(io, item, copies),
        Action::Drop(item) => io.ring.recycle(item.buf),
        Action::Held => {}
    }
}

/// Sends a held or decided packet (and its copy), accounting for both as they leave: regathered
/// into the iteration's GSO send when it lies in a transmit buffer (`--gro` with faults), else
/// one `sendmsg` each. Every send carries a stamp id; its stamp times the hold of each datagram
/// in it (a duplicate's too).
fn send(io: &mut Io<'_>, item: Item, copies: u8) {
    let Io {
        ring,
        faults,
        timing,
        regather,
    } = io;
    let Item {
        buf,
        len,
        from,
        arrival,
        timed,
    } = item;
    let mut buf = match buf {
        Buf::Tx(mut i) if regather.on => {
            if regather.append(ring, timing, &i, len, from, copies.max(1), (arrival, timed)) {
                let key = ring
                    .tx_buffer(&mut i)
                    .and_then(|b| b.get(..len))
                    .and_then(faults::rtp_key);
                ring.recycle(i);
                for copy in 0..copies.max(1) {
                    faults.on_sent_key(key, copy > 0);
                }
                return;
            }
            Buf::Tx(i)
        }
        other => other,
    };
    let key = match &mut buf {
        Buf::Rx(b) => ring.received(b).and_then(|r| faults::rtp_key(r.payload)),
        Buf::Tx(i) => ring
            .tx_buffer(i)
            .and_then(|b| b.get(..len))
            .and_then(faults::rtp_key),
    };
    // The duplicate: a copy of the payload in a transmit buffer of its own.
    let copy = (copies > 1)
        .then(|| ring.tx_acquire(Group::Small))
        .flatten()
        .and_then(|mut j| {
            let copied = match &buf {
                Buf::Rx(b) => ring.copy(b, 0..len, &mut j, 0),
                Buf::Tx(i) => ring.copy(i, 0..len, &mut j, 0),
            };
            match copied {
                Some(n) => Some((j, n)),
                None => {
                    ring.recycle(j);
                    None
                }
            }
        });
    let id = timing.depart(arrival, timed, 1);
    let kind = if matches!(buf, Buf::Rx(_)) {
        SEND
    } else {
        SEND_TX
    };
    match ring.send(
        0,
        buf,
        len,
        from,
        send_data(kind, id),
        timing.opts(id, None),
    ) {
        Ok(()) => faults.on_sent_key(key, false),
        Err(refused) => {
            timing.flights.cancel(id);
            ring.recycle(refused.buf);
        }
    }
    if let Some((j, n)) = copy {
        let id = timing.depart(arrival, timed, 1);
        match ring.send(0, j, n, from, send_data(SEND_TX, id), timing.opts(id, None)) {
            Ok(()) => faults.on_sent_key(key, true),
            Err(refused) => {
                timing.flights.cancel(id);
                ring.recycle(refused.buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_show_the_counts_under_their_names() {
        let shared = SharedCounts::default();
        let counts = EchoCounts {
            received: 10,
            sent: 11,
            dropped: 1,
            duplicated: 2,
            reordered: 3,
            delayed: 4,
            not_rtp: 0,
            no_buffer: 6,
        };
        shared.store(
            &counts,
            5,
            StampCounts {
                missing: 7,
                stale: 8,
            },
        );
        let text = shared.render();
        for line in [
            "rtpecho_received_total 10",
            "rtpecho_sent_total 11",
            "rtpecho_dropped_total 1",
            "rtpecho_duplicated_total 2",
            "rtpecho_reordered_total 3",
            "rtpecho_delayed_total 4",
            "rtpecho_held 5",
            "rtpecho_no_buffer_total 6",
            "rtpecho_timestamps_missing_total 7",
            "rtpecho_timestamps_stale_total 8",
            "# TYPE rtpecho_sent_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn a_send_carries_its_stamp_id_in_its_user_data() {
        // The buffer is not in the user data any more: the send's completion hands it back
        // (relay-io's ring tests assert that).
        for (kind, id) in [(SEND, 0), (SEND_TX, u32::MAX), (SEND_LARGE, 7)] {
            let ud = UserData::decode(send_data(kind, id).encode()).unwrap();
            assert_eq!(ud.kind, kind);
            assert_eq!(send_id(ud), id);
        }
    }

    fn timing(kernel: bool) -> Timing {
        Timing {
            clock: relay_io::Clock::new(),
            wall: relay_io::WallToMono::new(),
            kernel,
            source: if kernel {
                TxStampSource::Ring
            } else {
                TxStampSource::None
            },
            now: 0,
            flights: Flights::new(),
            errq: Vec::new(),
            ring_stamped: false,
            coalesced: 0,
            hold: relay_proto::stats::LatencyHistogram::new(3),
            counts: StampCounts::default(),
        }
    }

    #[test]
    fn a_hold_runs_from_the_receive_stamp_to_the_transmit_stamp_and_is_never_made_up() {
        let mut t = timing(true);
        // The wall clock reads EPOCH + mono; the sample is 10 s into the echo's clock.
        const EPOCH: u64 = 1_764_600_000_000_000_000;
        let s = relay_io::Sample {
            mono_before: 10_000_000_000 - 20,
            wall: relay_io::WallTime(EPOCH + 10_000_000_000),
            mono_after: 10_000_000_020,
        };
        t.wall.resample(s);
        t.now = s.mono_after;
        let wall_of = |mono: u64| relay_io::WallTime(EPOCH + mono);
        // Three datagrams of one GSO send arrived 2 ms before their stamp; a plain one 1 ms.
        let arrived = s.mono_after - 2_000_000;
        let gso = t.depart(arrived, true, 3);
        let plain = t.depart(arrived + 1_000_000, true, 1);
        // A stamp that is not after the arrival, and one whose arrival had no kernel stamp.
        let early = t.depart(s.mono_after - 500, true, 1);
        let untimed = t.depart(0, false, 2);
        // A stamp for a send that failed, and one whose stamp never comes.
        let failed = t.depart(arrived, true, 1);
        let _never = t.depart(arrived, true, 4);
        t.stamped(TxStamp {
            id: gso,
            at: wall_of(s.mono_after),
        });
        t.stamped(TxStamp {
            id: plain,
            at: wall_of(s.mono_after),
        });
        t.stamped(TxStamp {
            id: early,
            at: wall_of(s.mono_after - 1_000),
        });
        t.stamped(TxStamp {
            id: untimed,
            at: wall_of(s.mono_after),
        });
        t.failed(failed);
        t.stamped(TxStamp {
            id: failed,
            at: wall_of(s.mono_after),
        });
        t.stamped(TxStamp {
            id: 999,
            at: wall_of(s.mono_after),
        });
        assert_eq!(
            t.counts.stale, 2,
            "a stamp for a failed send and an unknown id"
        );
        t.sweep(true);
        let h = t.hold.summary();
        assert_eq!(h.count, 4);
        assert!(h.min_ns.abs_diff(1_000_000) < 2_000, "{h:?}");
        assert!(h.max_ns.abs_diff(2_000_000) < 3_000, "{h:?}");
        assert_eq!(t.counts.missing, 1 + 2 + 1 + 4);
    }

    #[test]
    fn with_user_time_the_hold_ends_at_the_submission() {
        let mut t = timing(false);
        assert_eq!(t.opts(5, Some(10)).stamp_id, None, "no id on the wire");
        let now = t.clock.now_ns();
        let _ = t.depart(now.saturating_sub(1_000), true, 2);
        t.submitted();
        assert_eq!(t.hold.summary().count, 2);
        assert_eq!(t.flights.waiting(), 0);
        assert_eq!(t.counts.missing, 0);
    }
}
