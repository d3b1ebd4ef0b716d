//! An externalMedia channel's RTP as Asterisk 22 sends it (172-byte packets, payload type 0 for
//! ulaw or 8 for alaw, 50 a second, random SSRC and first sequence number, first timestamp 160),
//! and what the simulator measures of what comes back: round trip, loss, duplicates, strict-RTP
//! drops, and returns whose payload is not what was sent (`payload_changed`: every packet carries
//! the same fixed pseudo-random 160 bytes, [`PAYLOAD`], not ulaw's all-`0xff` silence, so a
//! rewrite anywhere on the way shows). This is the media of a channel bridged with one of the
//! simulator's own callers; one bridged with a Local channel half forwards instead
//! ([`super::bridge`]).
//!
//! How the media is sent and read is modelled on what a real Asterisk 22 was seen doing (these
//! are observations of Asterisk 22.10.1 under load, not read from its source):
//! - it sends every channel's frames in bursts: one timing source sends every channel's 20 ms
//!   frame back to back; at 50 calls, 65 % of its packets reached the relay in bursts of 10 or
//!   more, with gaps under 100 µs;
//! - it reads each channel's RTP in a thread of its own (one bridge-channel thread per channel),
//!   not pinned to any core.
//!
//! So here one OS thread, the [`TimingSource`] (an [`appkit::pacer`] named `rtp-timing`, not
//! pinned), wakes on absolute 20 ms deadlines (it never drifts: a late wake-up does not move the
//! next deadline) and sends the next frame of every active channel, back to back, each from the
//! channel's own socket (the `UNICASTRTP_LOCAL_ADDRESS:PORT` the relay answers to). Channels join
//! the burst at the tick after their media starts and leave it at the tick after it is stopped;
//! in the steady state it allocates nothing. Each channel's returns are read by a std thread of its own (`rtp-rx-PORT`,
//! not pinned), blocking in `recv` with a 25 ms read timeout so that it notices the end of the
//! call; it owns every figure of its channel and hands them over when it ends.
//!
//! The round trip "at Asterisk" is timed by the kernel at both ends, so that neither this
//! process's wake-ups nor the burst's own length (a channel late in the burst leaves later) are
//! taken for the relay's cost: T0 is the kernel's transmit stamp of each send (`SO_TIMESTAMPING`,
//! software, carrying the packet's number as its id, read from the socket's error queue by the
//! channel's thread), T1 the kernel's receive stamp of the return (`SO_TIMESTAMPNS`), both
//! converted to one monotonic clock with [`relay_io::WallToMono`]. A return read before its stamp
//! is measured once the stamp is read; a return whose stamp never comes (or cannot be converted,
//! or gives a round trip of zero or less) is not measured but counted as `unstamped`.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appkit::pacer::{FirstTick, Paced, Pacer, Schedule};
use relay_proto::rng::SplitMix64;
use relay_proto::rtp::{parse_rtp, RtpHeader, Ssrc, RTP_HEADER_LEN};
use relay_proto::stats::LatencyHistogram;
use tokio::sync::oneshot;

/// RTP packet size Asterisk sends for 20 ms of ulaw.
pub const PACKET_LEN: usize = 172;
/// Packets per second.
pub(super) const PACKETS_PER_SECOND: u32 = 50;
/// How long a hung-up call waits for its last packets to come back.
pub(super) const DRAIN: Duration = Duration::from_millis(100);
/// The timing source's schedule: 20 ms (1 s / [`PACKETS_PER_SECOND`]); a channel joining an idle
/// source is first sent at the next deadline; after a stall (more than
/// [`appkit::pacer::MAX_BEHIND`] ticks missed, late bursts being sent at once so that the rate
/// stays 50 a second) every missed tick is skipped.
const SCHEDULE: Schedule = Schedule {
    period: Duration::from_nanos(1_000_000_000 / PACKETS_PER_SECOND as u64),
    first_tick: FirstTick::NextDeadline,
    stall_catch_up: 0,
};
/// A receiving thread's read timeout: how soon it notices that its channel stopped sending
/// (longer than the 20 ms between returns, so that it does not fire while they flow).
pub(super) const POLL: Duration = Duration::from_millis(25);
/// Packets whose send and return are matched (1,024 covers 20 s of 50/s).
const SLOTS: usize = 1024;
/// Stack of a receiving thread (it keeps its buffers on it).
const RX_STACK: usize = 256 * 1024;
/// What every caller plays: a fixed pseudo-random 160-byte payload (not the all-`0xff`
/// silence of ulaw, so that anything rewriting a payload is seen), the same for every packet.
pub(super) const PAYLOAD: [u8; PACKET_LEN - RTP_HEADER_LEN] = payload();

/// [`PAYLOAD`]: the top bytes of a 64-bit LCG (Knuth's MMIX constants) from a fixed seed.
const fn payload() -> [u8; PACKET_LEN - RTP_HEADER_LEN] {
    let mut out = [0u8; PACKET_LEN - RTP_HEADER_LEN];
    let mut s: u64 = 0x5349_4d2d_4153_5445; // "SIM-ASTE"
    let mut i = 0;
    while i < out.len() {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        #[allow(clippy::cast_possible_truncation)] // the top byte
        {
            out[i] = (s >> 56) as u8;
        }
        i += 1;
    }
    out
}

/// One externalMedia channel's RTP figures.
#[derive(Debug)]
pub(super) struct RtpFigures {
    pub(super) sent: u64,
    pub(super) received: u64,
    pub(super) duplicates: u64,
    pub(super) strict_drops: u64,
    pub(super) malformed: u64,
    /// Returns not measured: their transmit stamp never came or could not be converted, or the
    /// round trip came out zero or negative.
    pub(super) unstamped: u64,
    /// Returns of this stream whose payload is not [`PAYLOAD`], byte for byte.
    pub(super) payload_changed: u64,
    pub(super) rtt: LatencyHistogram<u64>,
    /// When the first and the last return came back (user-space time of their handling).
    pub(super) returns_span: Option<(Instant, Instant)>,
    /// The longest time between two returns: for a call, also across its externalMedia
    /// channels (the gap while control moves it to another relay).
    pub(super) max_gap: Duration,
}

impl Default for RtpFigures {
    fn default() -> Self {
        Self {
            sent: 0,
            received: 0,
            duplicates: 0,
            strict_drops: 0,
            malformed: 0,
            unstamped: 0,
            payload_changed: 0,
            rtt: LatencyHistogram::new(3),
            returns_span: None,
            max_gap: Duration::ZERO,
        }
    }
}

impl RtpFigures {
    pub(super) fn merge(&mut self, o: &Self) {
        self.sent += o.sent;
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.strict_drops += o.strict_drops;
        self.malformed += o.malformed;
        self.unstamped += o.unstamped;
        self.payload_changed += o.payload_changed;
        self.rtt.merge(&o.rtt);
        // Two streams of one call: the silence between one's last return and the other's first
        // (none when they overlap).
        self.max_gap = self.max_gap.max(o.max_gap);
        self.returns_span = match (self.returns_span, o.returns_span) {
            (Some((a0, a1)), Some((b0, b1))) => {
                let between = if a1 < b0 {
                    b0 - a1
                } else if b1 < a0 {
                    a0 - b1
                } else {
                    Duration::ZERO
                };
                self.max_gap = self.max_gap.max(between);
                Some((a0.min(b0), a1.max(b1)))
            }
            (a, b) => a.or(b),
        };
    }

    /// A return came back now.
    fn returned(&mut self) {
        let now = Instant::now();
        self.returns_span = Some(match self.returns_span {
            Some((first, last)) => {
                self.max_gap = self.max_gap.max(now - last);
                (first, now)
            }
            None => (now, now),
        });
    }
}

/// What a channel's sender (the timing source), its receiving thread and the world share.
#[derive(Debug, Default)]
struct Link {
    /// Asked to stop (the world sets it).
    stop: AtomicBool,
    /// The timing source has sent its last packet (or never will send one).
    sending_done: AtomicBool,
    /// Packets sent (the timing source counts them; final once `sending_done`).
    sent: AtomicU64,
}

/// A channel whose media runs: what the world keeps of it.
#[derive(Debug)]
pub(super) struct Running {
    /// Shared with the timing source and the receiving thread.
    link: Arc<Link>,
    /// The receiving thread's figures, sent as it ends.
    figures: oneshot::Receiver<RtpFigures>,
}

impl Running {
    /// Stops sending (at the timing source's next tick), lets the last packets come back
    /// ([`DRAIN`] at most) and returns the channel's figures.
    pub(super) async fn stop(self) -> RtpFigures {
        self.link.stop.store(true, Ordering::Release);
        self.figures.await.unwrap_or_default()
    }
}

/// The one thread that sends every channel's frames, and the way channels join it.
#[derive(Debug)]
pub(super) struct TimingSource {
    /// The `rtp-timing` thread; new channels are taken in at its next tick.
    pacer: Pacer<Outgoing>,
}

impl TimingSource {
    /// Starts the timing thread; it idles (blocked, no ticks) while no channel is active, and
    /// ends once this handle is dropped.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            pacer: Pacer::spawn("rtp-timing", SCHEDULE)?,
        })
    }

    /// Starts a channel's media: its frames join the burst at the next tick, sent from `sock` to
    /// `to`, and a thread of its own reads what comes back. `seed` picks the SSRC and the first
    /// sequence number.
    ///
    /// # Errors
    /// The socket's read timeout cannot be set, or the receiving thread cannot be spawned.
    pub(super) fn start(
        &self,
        sock: UdpSocket,
        to: SocketAddr,
        (seed, payload_type): (u64, u8),
    ) -> io::Result<Running> {
        let mut rng = SplitMix64::new(seed);
        let ssrc = Ssrc(rng.next_u32());
        #[allow(clippy::cast_possible_truncation)] // 16 random bits
        let first_seq = rng.next_u32() as u16;
        // Both stamps before the first send (the receiving thread may start after it). Said
        // once per run if the kernel refuses them.
        static WARNED: AtomicBool = AtomicBool::new(false);
        let rx_stamps = relay_io::enable_rx_timestamps(&sock)
            .map_err(|e| {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!("no kernel receive stamps, T1 is read after the receive: {e}");
                }
            })
            .is_ok();
        if let Err(e) = relay_io::enable_tx_timestamps(&sock) {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "no kernel transmit stamps, every return will be counted unstamped: {e}"
                );
            }
        }
        sock.set_read_timeout(Some(POLL))?;
        let port = sock.local_addr().map_or(0, |a| a.port());
        let sock = Arc::new(sock);
        let link = Arc::new(Link::default());
        let (tx, figures) = oneshot::channel();
        let receiver = Receiver {
            sock: Arc::clone(&sock),
            to,
            ssrc,
            first_seq,
            rx_stamps,
            link: Arc::clone(&link),
        };
        std::thread::Builder::new()
            .name(format!("rtp-rx-{port}"))
            .stack_size(RX_STACK)
            .spawn(move || {
                let _ = tx.send(receiver.run());
            })?;
        let mut packet = [0u8; PACKET_LEN];
        packet[RTP_HEADER_LEN..].copy_from_slice(&PAYLOAD);
        let out = Outgoing {
            sock,
            to,
            packet,
            ssrc,
            first_seq,
            payload_type,
            n: 0,
            send_errors: 0,
            link: Arc::clone(&link),
        };
        // If the timing thread is gone, `out` is dropped, which tells the receiver that nothing
        // will be sent.
        self.pacer.join(out);
        Ok(Running { link, figures })
    }
}

/// A channel's stream as the timing source sends it.
#[derive(Debug)]
struct Outgoing {
    /// The channel's socket (shared with its receiving thread).
    sock: Arc<UdpSocket>,
    /// `external_host`.
    to: SocketAddr,
    /// The packet, its header rewritten in place: header, then [`PAYLOAD`].
    packet: [u8; PACKET_LEN],
    ssrc: Ssrc,
    first_seq: u16,
    payload_type: u8,
    /// Packets made so far; the next one's number (and its transmit stamp's id).
    n: u32,
    /// Sends that failed.
    send_errors: u64,
    /// Shared with the receiving thread and the world.
    link: Arc<Link>,
}

impl Outgoing {
    /// Makes and sends the next packet.
    fn send_next(&mut self) {
        let n = self.n;
        #[allow(clippy::cast_possible_truncation)] // sequence numbers wrap
        let sequence = self.first_seq.wrapping_add(n as u16);
        let header = RtpHeader {
            marker: n == 0,
            payload_type: self.payload_type,
            sequence,
            timestamp: 160u32.wrapping_add(n.wrapping_mul(160)),
            ssrc: self.ssrc,
        };
        let _ = header.write(&mut self.packet);
        let opts = relay_io::SendOpts {
            segment: None,
            stamp_id: Some(n),
        };
        match relay_io::send_msg(&*self.sock, &self.packet, self.to, opts) {
            Ok(_) => {
                self.link.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if self.send_errors == 0 {
                    tracing::warn!(to = %self.to, "RTP send failed: {e}");
                }
                self.send_errors += 1;
            }
        }
        self.n = n.wrapping_add(1);
    }
}

impl Paced for Outgoing {
    /// Sends the next frame, unless the channel was stopped: then it leaves the burst.
    fn tick(&mut self, _due: Instant) -> bool {
        if self.link.stop.load(Ordering::Acquire) {
            return false;
        }
        self.send_next();
        true
    }
}

impl Drop for Outgoing {
    /// No more packets (the channel left the burst, or the timing thread is gone): the
    /// receiving thread may take `sent` as final.
    fn drop(&mut self) {
        self.link.sending_done.store(true, Ordering::Release);
    }
}

/// A channel's receiving side, run by its own thread.
#[derive(Debug)]
struct Receiver {
    sock: Arc<UdpSocket>,
    /// Returns must come from here (strict RTP).
    to: SocketAddr,
    ssrc: Ssrc,
    first_seq: u16,
    /// Kernel receive stamps are on.
    rx_stamps: bool,
    link: Arc<Link>,
}

impl Receiver {
    /// Reads returns and transmit stamps until the channel has stopped sending and its last
    /// packets are back (or [`DRAIN`] has passed); its figures.
    fn run(self) -> RtpFigures {
        let clock = relay_io::Clock::new();
        let mut wall = relay_io::WallToMono::new();
        let mut returns = Returns::new();
        let mut control = [0u8; relay_io::socket::CONTROL_LEN];
        let mut buf = [0u8; 2048];
        let mut sent = 0;
        let mut drain_end: Option<Instant> = None;
        loop {
            let got = relay_io::recv_msg(&*self.sock, &mut buf, &mut control);
            let sample = clock.sample();
            wall.resample(sample);
            // Stamps first: a return's stamp is normally queued before the return arrives.
            self.read_stamps(&wall, &mut returns);
            match got {
                Ok(meta) => {
                    let t1 = control
                        .get(..meta.control_len)
                        .and_then(|c| relay_io::rx_timestamp(c).ok().flatten())
                        .filter(|_| self.rx_stamps)
                        .and_then(|t| wall.to_mono(t))
                        .unwrap_or(sample.mono_after);
                    if meta.from == Some(self.to) {
                        match buf.get(..meta.len).map(parse_rtp) {
                            Some(Ok(p)) if p.ssrc == self.ssrc => {
                                if p.payload != PAYLOAD {
                                    returns.figures.payload_changed += 1;
                                }
                                returns.back(p.sequence, t1);
                            }
                            _ => returns.figures.malformed += 1,
                        }
                    } else {
                        returns.figures.strict_drops += 1;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    tracing::debug!("RTP receive failed: {e}");
                    // Not a busy loop on a broken socket.
                    std::thread::sleep(POLL);
                }
            }
            let f = &returns.figures;
            match drain_end {
                None if self.link.sending_done.load(Ordering::Acquire) => {
                    sent = self.link.sent.load(Ordering::Relaxed);
                    if f.received >= sent {
                        break;
                    }
                    drain_end = Some(Instant::now() + DRAIN);
                }
                Some(end) if f.received + f.duplicates >= sent || Instant::now() >= end => break,
                _ => {}
            }
        }
        // Stamps still queued may complete returns read just now.
        let sample = clock.sample();
        wall.resample(sample);
        self.read_stamps(&wall, &mut returns);
        returns.finish(sent)
    }

    /// Reads every transmit stamp queued on the socket, without blocking.
    fn read_stamps(&self, wall: &relay_io::WallToMono, returns: &mut Returns) {
        loop {
            match relay_io::recv_tx_stamp(&*self.sock) {
                Ok(s) => {
                    #[allow(clippy::cast_possible_truncation)] // the id is the packet's number
                    let sequence = self.first_seq.wrapping_add(s.id as u16);
                    returns.stamp(sequence, wall.to_mono(s.at));
                }
                // An entry that is no stamp, consumed: read on.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {}
                Err(_) => return,
            }
        }
    }
}

/// What is known of a sequence number's packet (one slot per sequence number modulo
/// [`SLOTS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Empty,
    /// Its transmit stamp was read (T0; `None` when it could not be converted).
    Sent {
        seq: u16,
        t0: Option<u64>,
    },
    /// It came back before its stamp was read (T1).
    Back {
        seq: u16,
        t1: u64,
    },
    /// Came back and was counted.
    Done {
        seq: u16,
    },
}

/// Matches transmit stamps and returns, in whichever order they are read.
#[derive(Debug)]
struct Returns {
    slots: Box<[Slot]>,
    figures: RtpFigures,
}

/// `a` is later than `b` in sequence-number order (within half the number space).
fn later(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

impl Returns {
    fn new() -> Self {
        Self {
            slots: vec![Slot::Empty; SLOTS].into_boxed_slice(),
            figures: RtpFigures::default(),
        }
    }

    fn slot(&mut self, seq: u16) -> &mut Slot {
        let i = usize::from(seq) % SLOTS;
        &mut self.slots[i]
    }

    /// Records a round trip, or counts it as unstamped.
    fn measure(figures: &mut RtpFigures, t0: Option<u64>, t1: u64) {
        match t0 {
            Some(t0) if t1 > t0 => figures.rtt.record(t1 - t0),
            _ => figures.unstamped += 1,
        }
    }

    /// The transmit stamp of packet `seq` (T0, `None` if it could not be converted).
    fn stamp(&mut self, seq: u16, t0: Option<u64>) {
        let slot = *self.slot(seq);
        match slot {
            Slot::Back { seq: s, t1 } if s == seq => {
                Self::measure(&mut self.figures, t0, t1);
                *self.slot(seq) = Slot::Done { seq };
            }
            Slot::Sent { seq: s, .. } | Slot::Done { seq: s } if s == seq => {}
            _ => {
                if matches!(slot, Slot::Back { .. }) {
                    // An older return whose stamp never came: its slot is needed.
                    self.figures.unstamped += 1;
                }
                *self.slot(seq) = Slot::Sent { seq, t0 };
            }
        }
    }

    /// Packet `seq` came back at `t1`.
    fn back(&mut self, seq: u16, t1: u64) {
        let slot = *self.slot(seq);
        let counted = self.figures.received;
        match slot {
            Slot::Sent { seq: s, t0 } if s == seq => {
                self.figures.received += 1;
                Self::measure(&mut self.figures, t0, t1);
                *self.slot(seq) = Slot::Done { seq };
            }
            Slot::Back { seq: s, .. } | Slot::Done { seq: s } if s == seq => {
                self.figures.duplicates += 1;
            }
            Slot::Empty => {
                self.figures.received += 1;
                *self.slot(seq) = Slot::Back { seq, t1 };
            }
            Slot::Sent { seq: s, .. } | Slot::Back { seq: s, .. } | Slot::Done { seq: s } => {
                if later(seq, s) {
                    // Back before its stamp was read.
                    self.figures.received += 1;
                    if matches!(slot, Slot::Back { .. }) {
                        self.figures.unstamped += 1;
                    }
                    *self.slot(seq) = Slot::Back { seq, t1 };
                } else {
                    // A copy of a packet long answered (its slot has moved on).
                    self.figures.duplicates += 1;
                }
            }
        }
        if self.figures.received > counted {
            self.figures.returned();
        }
    }

    /// The figures, with every return still waiting for its stamp counted as unstamped.
    fn finish(mut self, sent: u64) -> RtpFigures {
        let waiting = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Back { .. }))
            .count();
        self.figures.unstamped += u64::try_from(waiting).unwrap_or(u64::MAX);
        self.figures.sent = sent;
        self.figures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_returns_match_in_either_order() {
        let mut r = Returns::new();
        // Stamp first, then the return.
        r.stamp(65_535, Some(1_000));
        r.back(65_535, 1_500);
        // Return first, then its stamp.
        r.back(0, 2_600);
        r.stamp(0, Some(2_000));
        // A copy of each.
        r.back(65_535, 1_700);
        r.back(0, 2_700);
        assert_eq!((r.figures.received, r.figures.duplicates), (2, 2));
        assert_eq!(r.figures.rtt.len(), 2);
        assert_eq!(r.figures.rtt.summary().max_ns, 600);
        assert_eq!(r.figures.unstamped, 0);
    }

    #[test]
    fn a_return_without_a_usable_stamp_is_counted_not_measured() {
        let mut r = Returns::new();
        // Its stamp never comes: counted when the slot is needed again...
        r.back(5, 100);
        r.stamp(5 + 1024, Some(200));
        r.back(5 + 1024, 300);
        // ... or at the end.
        r.back(7, 400);
        // A stamp that could not be converted, and one that gives a round trip of zero.
        r.stamp(8, None);
        r.back(8, 500);
        r.stamp(9, Some(600));
        r.back(9, 600);
        let f = r.finish(5);
        assert_eq!(f.received, 5);
        assert_eq!(f.unstamped, 4);
        assert_eq!(f.rtt.len(), 1);
        assert_eq!(f.sent, 5);
    }

    #[test]
    fn a_stale_copy_is_a_duplicate_and_never_evicts_a_newer_packet() {
        let mut r = Returns::new();
        r.stamp(3, Some(10));
        r.back(3, 20);
        r.stamp(3 + 1024, Some(30));
        // A copy of 3 arriving after 1027 was sent.
        r.back(3, 40);
        r.back(3 + 1024, 50);
        assert_eq!((r.figures.received, r.figures.duplicates), (2, 1));
        assert_eq!(r.figures.rtt.len(), 2);
    }
}
