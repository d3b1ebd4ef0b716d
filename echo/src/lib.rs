//! `echo`: an RTP reflector on one UDP port that returns every datagram to its source.
//!
//! It must never be what limits a benchmark, so it runs on the relay's io_uring code: one
//! multishot `RecvMsg` on a provided-buffer ring, and each datagram sent back by `SendMsg`
//! straight from the buffer it arrived in. With no fault configured it keeps no state at all.
//! With faults ([`faults`]), held packets keep their buffer until they leave; duplicates are
//! copied into a transmit buffer.
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
//! Counts are published to atomics once per batch for `/metrics`, and printed as a JSON line on
//! standard output when the echo exits (SIGTERM, SIGINT, or `--duration`).
#![forbid(unsafe_code)]

pub mod faults;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use relay_io::ring::{Completion, Ring};
use serde::Serialize;

use crate::faults::{Action, EchoCounts, FaultConfig, Faults};

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
}

/// Receive buffers with `--gro`: each holds a coalesced batch of up to 64 KiB.
const GRO_BUFFERS: u16 = 512;

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
}

impl SharedCounts {
    fn store(&self, c: &EchoCounts, held: usize) {
        self.received.store(c.received, Ordering::Relaxed);
        self.sent.store(c.sent, Ordering::Relaxed);
        self.dropped.store(c.dropped, Ordering::Relaxed);
        self.duplicated.store(c.duplicated, Ordering::Relaxed);
        self.reordered.store(c.reordered, Ordering::Relaxed);
        self.delayed.store(c.delayed, Ordering::Relaxed);
        self.no_buffer.store(c.no_buffer, Ordering::Relaxed);
        self.held.store(held as u64, Ordering::Relaxed);
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
    /// How long each reflected datagram stayed in the echo: its kernel arrival to the submission
    /// of its reflection (`--delay`, `--jitter` and `--pace` included). The reference a relay's
    /// round trip is compared with.
    pub hold: relay_proto::LatencySummary,
    /// Where arrival times came from: `kernel` (receive stamps) or `user` (the kernel refused).
    pub timestamps: &'static str,
    /// Steps of the wall clock seen (their batches' arrivals were taken at handling time).
    pub clock_steps: u64,
    /// Whether it received with UDP GRO.
    pub gro: bool,
    /// Receives that held more than one datagram (UDP GRO coalesced them).
    pub coalesced: u64,
    /// Sends that carried more than one datagram (UDP GSO), with `--gro`.
    pub gso_sends: u64,
}

/// The echo's clock: arrivals from the kernel's receive stamps, and the hold of every datagram
/// it reflects, measured from that arrival to the submission of the reflection.
#[derive(Debug)]
struct Timing {
    /// The monotonic clock (nanoseconds since the echo started).
    clock: relay_io::Clock,
    /// Kernel stamps → monotonic, re-sampled each batch.
    wall: relay_io::WallToMono,
    /// Whether the socket gives stamps.
    kernel: bool,
    /// Arrivals of the reflections queued since the last submission, with how many datagrams
    /// arrived then (a coalesced batch is one entry).
    queued: Vec<(u64, u64)>,
    /// Receives that held more than one datagram.
    coalesced: u64,
    /// Holds.
    hold: relay_proto::stats::LatencyHistogram<u64>,
}

impl Timing {
    /// The arrival of a datagram with control messages `control`, handled at `now`.
    fn arrival(&self, control: &[u8], now: u64) -> u64 {
        if !self.kernel {
            return now;
        }
        relay_io::rx_timestamp(control)
            .ok()
            .flatten()
            .and_then(|t| self.wall.to_mono(t))
            .unwrap_or(now)
    }

    /// Every queued reflection is submitted now.
    fn submitted(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let now = self.clock.now_ns();
        for (a, n) in self.queued.drain(..) {
            self.hold.record_n(now.saturating_sub(a), n);
        }
    }
}

const RECV: u64 = 1 << 56;
const SEND: u64 = 2 << 56;
const SEND_TX: u64 = 3 << 56;
const WAKE: u64 = 4 << 56;
/// A receive into the large (GRO) buffers, with faults.
const RECV_LARGE: u64 = 5 << 56;
/// A GSO send of regathered datagrams from a large transmit buffer, with faults.
const SEND_LARGE: u64 = 6 << 56;
/// Large transmit buffers with `--gro` and faults, for regathered GSO sends (4 MiB).
const GSO_TX: u16 = 64;
/// Most datagrams in one GSO send.
const MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send.
const MAX_GSO_BYTES: usize = 65_000;

/// With `--gro` and faults: datagrams leaving in this iteration, gathered into one GSO send.
#[derive(Debug, Default)]
struct Regather {
    /// Whether datagrams are regathered (`--gro` with faults).
    on: bool,
    /// The send being gathered: (large transmit buffer, destination, datagram size, count, bytes).
    batch: Option<(u16, SocketAddr, usize, usize, usize)>,
    /// Sends that carried more than one datagram.
    gso_sends: u64,
}

impl Regather {
    /// Queues the gathered send, if any.
    fn flush(&mut self, ring: &mut Ring) {
        let Some((buffer, to, size, count, used)) = self.batch.take() else {
            return;
        };
        let segment = (count > 1).then(|| u16::try_from(size).unwrap_or(u16::MAX));
        if ring
            .send_large_tx(
                0,
                buffer,
                used,
                to,
                SEND_LARGE | u64::from(buffer),
                relay_io::SendOpts {
                    segment,
                    stamp_id: None,
                },
            )
            .is_ok()
        {
            self.gso_sends += u64::from(count > 1);
        } else {
            ring.large_tx_release(buffer);
        }
    }

    /// Appends `copies` copies of the `n`-byte datagram in small transmit buffer `tx` for `to`,
    /// starting a new send when they do not fit the current one. False (nothing appended) when
    /// no large transmit buffer is free.
    fn append(&mut self, ring: &mut Ring, tx: u16, n: usize, to: SocketAddr, copies: u8) -> bool {
        let k = usize::from(copies);
        if let Some((_, t, size, count, used)) = self.batch {
            if t != to || size != n || count + k > MAX_SEGMENTS || used + k * n > MAX_GSO_BYTES {
                self.flush(ring);
            }
        }
        let (buffer, to, size, mut count, mut used) = match self.batch {
            Some(b) => b,
            None => match ring.large_tx_acquire() {
                Some(buffer) => (buffer, to, n, 0, 0),
                None => return false,
            },
        };
        for _ in 0..k {
            if ring.copy_tx_to_large_tx(tx, n, buffer, used).is_none() {
                break;
            }
            count += 1;
            used += n;
        }
        if count == 0 {
            ring.large_tx_release(buffer);
            return false;
        }
        self.batch = Some((buffer, to, size, count, used));
        true
    }
}
const KIND: u64 = 0xff << 56;

/// Transmit buffers with `--gro` and faults: every held segment lives in one (16 MiB).
const FAULT_TX: u16 = 8192;

/// Where a datagram the echo holds lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Buf {
    /// In the receive buffer it arrived in.
    Rx(u16),
    /// In a transmit buffer (a segment cut out of a coalesced receive).
    Tx(u16),
}

impl Buf {
    /// Gives the buffer back (a datagram dropped, or a send refused).
    fn release(self, ring: &mut Ring) {
        match self {
            Self::Rx(bid) => ring.recycle(bid),
            Self::Tx(i) => ring.tx_release(i),
        }
    }
}

/// A datagram the echo holds: its buffer, sizes and source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Item {
    /// Its buffer.
    buf: Buf,
    /// The completion's length (header, address and payload; the payload's, in a transmit
    /// buffer).
    total: usize,
    /// The payload's length.
    len: usize,
    /// Where it came from, and goes back to.
    from: SocketAddr,
    /// Its arrival (the kernel's stamp), nanoseconds on the echo's clock.
    arrival: u64,
}

/// Runs the echo until `stop` is set or `--duration` passes; returns the summary.
///
/// # Errors
/// Socket or io_uring set-up failed, or the ring failed.
pub fn run(
    config: &Config,
    stop: &AtomicBool,
    shared: &SharedCounts,
    ready: impl FnOnce(SocketAddr, Arc<relay_io::ring::EventFd>),
) -> anyhow::Result<Summary> {
    if let Some(id) = config.core {
        if !relay_io::pin_current_thread(id) {
            tracing::warn!(core = id, "cannot pin the echo to this core");
        }
    }
    let socket = relay_io::bind_udp(config.listen.ip(), config.listen.port(), config.rcvbuf)
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", config.listen))?;
    let listen = socket.local_addr()?;
    let clean = config.faults.is_clean();
    let gro = config.gro;
    // Coalesced receives kept whole (clean), or cut into transmit buffers (faults).
    let gro_clean = gro && clean;
    let gro_faults = gro && !clean;
    if gro {
        relay_io::enable_udp_gro(&socket).context("--gro: UDP_GRO")?;
    }
    let mut ring = if gro_clean {
        Ring::with_buffer_size(
            4096,
            config.buffers.min(GRO_BUFFERS),
            1,
            0,
            relay_io::ring::MAX_BUFFER_SIZE,
        )
    } else if gro_faults {
        Ring::with_tx(4096, 16, 1, FAULT_TX).and_then(|mut r| {
            r.add_large(GRO_BUFFERS.min(config.buffers), GSO_TX)?;
            Ok(r)
        })
    } else {
        Ring::with_tx(4096, config.buffers, 1, 1024)
    }
    .context("io_uring")?;
    let arm = |ring: &mut Ring| {
        if gro_faults {
            ring.arm_recv_large(0, RECV_LARGE)
        } else {
            ring.arm_recv(0, RECV)
        }
    };
    let kernel = match relay_io::enable_rx_timestamps(&socket) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("no kernel receive timestamps ({e}): --delay counts from handling");
            false
        }
    };
    ring.register_socket(0, std::os::fd::AsRawFd::as_raw_fd(&socket))?;
    arm(&mut ring)?;
    ring.arm_waker(WAKE)?;
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
    let mut timing = Timing {
        clock: relay_io::Clock::new(),
        wall: relay_io::WallToMono::new(),
        kernel,
        queued: Vec::with_capacity(usize::from(config.buffers) + 1024),
        coalesced: 0,
        hold: relay_proto::stats::LatencyHistogram::new(3),
    };
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
        let sample = timing.clock.sample();
        timing.wall.resample(sample);
        let now_ns = sample.mono_after;
        let completions = ring.drain_completions();
        for c in &completions {
            match c.user_data & KIND {
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
                SEND => {
                    if let Ok(bid) = u16::try_from(c.user_data & 0xffff) {
                        ring.recycle(bid);
                    }
                }
                SEND_TX => {
                    if let Ok(i) = u16::try_from(c.user_data & 0xffff) {
                        ring.tx_release(i);
                    }
                }
                SEND_LARGE => {
                    if let Ok(i) = u16::try_from(c.user_data & 0xffff) {
                        ring.large_tx_release(i);
                    }
                }
                WAKE => ring.arm_waker(WAKE)?,
                _ => {}
            }
        }
        ring.give_back(completions);
        while let Some((item, copies)) = faults.pop_due(now_ns) {
            let mut io = Io {
                ring: &mut ring,
                faults: &mut faults,
                timing: &mut timing,
                regather: &mut regather,
            };
            send(&mut io, item, copies);
        }
        regather.flush(&mut ring);
        ring.sync_buffers();
        if rearm {
            arm(&mut ring)?;
            rearm = false;
        }
        let counts = counts(clean, clean_counts, &faults, no_buffer);
        shared.store(&counts, faults.held());
    }
    let counts = counts(clean, clean_counts, &faults, no_buffer);
    shared.store(&counts, faults.held());
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
        clock_steps: timing.wall.steps(),
        gro,
        coalesced: timing.coalesced,
        gso_sends: regather.gso_sends,
    })
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
    /// Arrivals and holds.
    timing: &'a mut Timing,
    /// With `--gro` and faults: the GSO send being gathered.
    regather: &'a mut Regather,
}

fn on_recv(
    io: &mut Io<'_>,
    clean_counts: &mut EchoCounts,
    clean: bool,
    now_ns: u64,
    c: &Completion,
) {
    if c.result < 0 {
        return; // ENOBUFS and the like: re-armed after this batch
    }
    let Some(bid) = c.buffer() else { return };
    let len = usize::try_from(c.result).unwrap_or(0);
    let Some(r) = io.ring.received(bid, len) else {
        io.ring.recycle(bid);
        return;
    };
    let Some(from) = r.from else {
        io.ring.recycle(bid);
        return;
    };
    let n = r.payload.len();
    let arrival = io.timing.arrival(r.control, now_ns);
    if clean {
        // A GRO receive holds `datagrams` of `segment` bytes (the last may be shorter): one GSO
        // send reflects them all, from the buffer they arrived in.
        let segment = r.segment.filter(|&s| usize::from(s) < n);
        let datagrams = segment.map_or(1, |s| n.div_ceil(usize::from(s))) as u64;
        clean_counts.received += datagrams;
        io.timing.coalesced += u64::from(datagrams > 1);
        if io
            .ring
            .send_gso(0, bid, n, segment, from, SEND | u64::from(bid))
            .is_ok()
        {
            clean_counts.sent += datagrams;
            io.regather.gso_sends += u64::from(datagrams > 1);
            io.timing.queued.push((arrival, datagrams));
        } else {
            io.ring.recycle(bid);
        }
        return;
    }
    let item = Item {
        buf: Buf::Rx(bid),
        total: len,
        len: n,
        from,
        arrival,
    };
    // The fault model reads the payload where it lies (the ring is borrowed only to read);
    // delay, jitter and pacing count from the kernel's arrival.
    let action = io.faults.on_packet(arrival, r.payload, item);
    act(io, &action);
}

/// With faults and `--gro`: a receive into a large buffer holds one datagram or several of one
/// size; each is copied into a transmit buffer and given to the fault model as a datagram of its
/// own, and the large buffer goes back at once. Returns how many found no transmit buffer.
fn on_recv_segments(io: &mut Io<'_>, now_ns: u64, c: &Completion) -> u64 {
    if c.result < 0 {
        return 0; // ENOBUFS and the like: re-armed after this batch
    }
    let Some(bid) = c.buffer() else { return 0 };
    let len = usize::try_from(c.result).unwrap_or(0);
    let Some((from, n, segment, arrival)) = io.ring.received_large(bid, len).and_then(|r| {
        let arrival = io.timing.arrival(r.control, now_ns);
        r.from
            .filter(|_| !r.truncated)
            .map(|from| (from, r.payload.len(), r.segment, arrival))
    }) else {
        io.ring.recycle_large(bid);
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
        let Some(i) = io.ring.tx_copy_from_large(bid, len, at, m) else {
            lost += 1;
            continue;
        };
        let item = Item {
            buf: Buf::Tx(i),
            total: m,
            len: m,
            from,
            arrival,
        };
        let Some(payload) = io.ring.tx_buffer(i).and_then(|b| b.get(..m)) else {
            io.ring.tx_release(i);
            lost += 1;
            continue;
        };
        let action = io.faults.on_packet(arrival, payload, item);
        act(io, &action);
    }
    io.ring.recycle_large(bid);
    lost
}

/// Carries out the fault model's decision on a datagram just received.
fn act(io: &mut Io<'_>, action: &Action<Item>) {
    match *action {
        Action::Send { item, copies } => send(io, item, copies),
        Action::Drop(item) => item.buf.release(io.ring),
        Action::Held => {}
    }
}

/// Sends a held or decided packet (and its copy), accounting for both as they leave: regathered
/// into the iteration's GSO send when it lies in a transmit buffer (`--gro` with faults), else
/// one `sendmsg` each.
fn send(io: &mut Io<'_>, item: Item, copies: u8) {
    let Io {
        ring,
        faults,
        timing,
        regather,
    } = io;
    if let (true, Buf::Tx(i)) = (regather.on, item.buf) {
        if regather.append(ring, i, item.len, item.from, copies.max(1)) {
            let key = ring
                .tx_buffer(i)
                .and_then(|b| b.get(..item.len))
                .and_then(faults::rtp_key);
            ring.tx_release(i);
            for copy in 0..copies.max(1) {
                faults.on_sent_key(key, copy > 0);
            }
            timing.queued.push((item.arrival, 1));
            return;
        }
    }
    let key = match item.buf {
        Buf::Rx(bid) => ring
            .received(bid, item.total)
            .and_then(|r| faults::rtp_key(r.payload)),
        Buf::Tx(i) => ring
            .tx_buffer(i)
            .and_then(|b| b.get(..item.len))
            .and_then(faults::rtp_key),
    };
    let copy = match (copies > 1, item.buf) {
        (false, _) => None,
        (true, Buf::Rx(bid)) => ring.tx_copy_from(bid, item.total),
        (true, Buf::Tx(i)) => ring.tx_copy_tx(i, item.len).map(|j| (j, item.len)),
    };
    let sent = match item.buf {
        Buf::Rx(bid) => ring.send(0, bid, item.len, item.from, SEND | u64::from(bid)),
        Buf::Tx(i) => ring.send_tx(0, i, item.len, item.from, SEND_TX | u64::from(i)),
    };
    if sent.is_ok() {
        faults.on_sent_key(key, false);
        timing.queued.push((item.arrival, 1));
    } else {
        item.buf.release(ring);
    }
    if let Some((i, n)) = copy {
        if ring
            .send_tx(0, i, n, item.from, SEND_TX | u64::from(i))
            .is_ok()
        {
            faults.on_sent_key(key, true);
        } else {
            ring.tx_release(i);
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
        shared.store(&counts, 5);
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
            "# TYPE rtpecho_sent_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
