//! The rtp caller's media: every call plays 20 ms RTP whose payload starts with a probe header
//! ([`relay_proto::probe`]) into its externalMedia channel, and reads what Asterisk sends back,
//! keeping the kernel's times of each probe at both ends.
//!
//! Why this shape:
//! - One OS thread, the timing source (an [`appkit::pacer`] named `probe-timing`), sends the next
//!   probe of every call on absolute 20 ms deadlines (a late wake-up does not move the next
//!   deadline), so each call sends exactly `hold / 20 ms` probes at a steady rate, as a phone
//!   would.
//! - Each call has a thread of its own (`probe-rx-PORT`) blocking on its socket: it reads the
//!   returns, with their kernel receive stamps, and the kernel transmit stamps of its sends from
//!   the socket's error queue. A probe's send time is its transmit stamp, which is known only
//!   after the send: it cannot be in the packet, so it is kept here, by probe sequence (the stamp's
//!   id). The header's own send time (a clock read just before the send) only serves the relay's
//!   approximate view.
//! - Every time kept is a kernel stamp of this host's `CLOCK_REALTIME`, the clock the relay
//!   writes its times in, so the split into legs is a difference of kernel stamps, exact on one
//!   host ([`super::through_asterisk`]).
//!
//! Nothing here allocates per packet: each call's table of probes is sized for its hold when the
//! call starts.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use appkit::pacer::{FirstTick, Paced, Pacer, Schedule};
use relay_proto::probe::{self, Probe};
use relay_proto::rng::SplitMix64;
use relay_proto::rtp::{parse_rtp, RtpHeader};

/// One frame of audio.
pub const FRAME: Duration = Duration::from_millis(20);
/// The timing source's schedule: one probe a [`FRAME`]; a call joining an idle source sends its
/// first probe at once; after a stall (more than [`appkit::pacer::MAX_BEHIND`] ticks missed) the
/// last three missed ticks are still sent, at once, and the rest skipped.
const SCHEDULE: Schedule = Schedule {
    period: FRAME,
    first_tick: FirstTick::Immediate,
    stall_catch_up: 3,
};
/// RTP header (12) and 20 ms of ulaw (160): what a phone sends.
const PACKET_LEN: usize = 172;
/// A receiving thread's read timeout: how soon it notices the end of the call.
const POLL: Duration = Duration::from_millis(25);
/// Stack of a receiving thread.
const RX_STACK: usize = 256 * 1024;

/// What is known of one probe. Times are kernel stamps, ns of `CLOCK_REALTIME`; 0: not known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeTimes {
    /// loadgen's transmit stamp of its send.
    pub sent: u64,
    /// loadgen's receive stamp of its return (the first copy).
    pub back: u64,
    /// The relay's receive stamp of it, from Asterisk (written into the header by the relay).
    pub relay_arrival: u64,
    /// The relay's receive stamp of its echo.
    pub relay_returned: u64,
    /// It came back (with or without a receive stamp).
    pub returned: bool,
}

/// A call's media once it ended.
#[derive(Debug, Default)]
pub struct CallMedia {
    /// Probe numbers used (0..sent), each handed to the kernel; `send_errors` of them refused.
    pub sent: u32,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// Each probe's times, by probe sequence (`sent` of them).
    pub probes: Vec<ProbeTimes>,
    /// Probes back (each counted once).
    pub returned: u64,
    /// Further copies of a probe already back.
    pub duplicates: u64,
    /// Datagrams from anywhere but the externalMedia channel's address (strict RTP).
    pub strict_drops: u64,
    /// Datagrams that are no RTP, or carry no valid probe of this call.
    pub malformed: u64,
    /// Returns read without a kernel receive stamp: not timed.
    pub no_rx_stamp: u64,
}

/// What the sender, the receiver and the call share.
#[derive(Debug, Default)]
struct Link {
    /// Stop now (Ctrl-C, or the call ended early): no more sends, no drain.
    abort: AtomicBool,
    /// The sender is done (all probes sent, or aborted); `sent` is final.
    sending_done: AtomicBool,
    /// Probe numbers used (sent, or refused by the kernel).
    sent: AtomicU32,
    /// Sends the kernel refused.
    send_errors: AtomicU64,
}

/// A call's media while it runs.
#[derive(Debug)]
pub struct Running {
    link: Arc<Link>,
    done: tokio::sync::oneshot::Receiver<CallMedia>,
}

impl Running {
    /// Waits for the call's media to end: every probe sent, then returns read until all are
    /// back or `drain` has passed since the last send.
    pub async fn finish(self) -> CallMedia {
        self.done.await.unwrap_or_default()
    }

    /// A handle that stops the media at once (no further sends, no drain); [`Running::finish`]
    /// then returns what was measured.
    #[must_use]
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(Arc::clone(&self.link))
    }
}

/// Stops a call's media at once.
#[derive(Debug)]
pub struct AbortHandle(Arc<Link>);

impl AbortHandle {
    /// No further sends, no drain.
    pub fn abort(&self) {
        self.0.abort.store(true, Ordering::Release);
    }
}

/// The thread that sends every call's probes.
#[derive(Debug)]
pub struct TimingSource {
    /// The `probe-timing` thread; new calls are taken in at its next tick.
    pacer: Pacer<Outgoing>,
}

impl TimingSource {
    /// Starts the timing thread; it idles while no call plays and ends with this handle.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            pacer: Pacer::spawn("probe-timing", SCHEDULE)?,
        })
    }

    /// Starts call `call`'s media: `probes` probes, one a frame, sent from `sock` to `to` (the
    /// externalMedia channel's `UNICASTRTP_LOCAL_ADDRESS:PORT`), and a thread reading the
    /// returns, which must come from `to`; after the last send it waits `drain` at most for the
    /// rest. `seed` picks the SSRC and first sequence number.
    ///
    /// # Errors
    /// The socket's options cannot be set, or the thread cannot be spawned.
    pub fn start(
        &self,
        sock: UdpSocket,
        to: SocketAddr,
        call: u32,
        probes: u32,
        drain: Duration,
        seed: u64,
    ) -> io::Result<Running> {
        relay_io::enable_rx_timestamps(&sock)?;
        relay_io::enable_tx_timestamps(&sock)?;
        sock.set_read_timeout(Some(POLL))?;
        let port = sock.local_addr().map_or(0, |a| a.port());
        let sock = Arc::new(sock);
        let link = Arc::new(Link::default());
        let (tx, done) = tokio::sync::oneshot::channel();
        let rx = Receiver {
            sock: Arc::clone(&sock),
            to,
            call,
            drain,
            link: Arc::clone(&link),
            media: CallMedia {
                probes: vec![ProbeTimes::default(); probes as usize],
                ..CallMedia::default()
            },
        };
        std::thread::Builder::new()
            .name(format!("probe-rx-{port}"))
            .stack_size(RX_STACK)
            .spawn(move || {
                let _ = tx.send(rx.run());
            })?;
        let mut rng = SplitMix64::new(seed);
        let out = Outgoing {
            sock,
            to,
            packet: [0xff; PACKET_LEN],
            ssrc: rng.next_u32(),
            #[allow(clippy::cast_possible_truncation)] // 16 random bits
            first_seq: rng.next_u32() as u16,
            call,
            total: probes,
            n: 0,
            link: Arc::clone(&link),
        };
        // If the timing thread is gone, `out` is dropped, which ends the receiver's wait.
        self.pacer.join(out);
        Ok(Running { link, done })
    }
}

/// A call's stream as the timing source sends it.
#[derive(Debug)]
struct Outgoing {
    sock: Arc<UdpSocket>,
    to: SocketAddr,
    /// Rewritten in place: RTP header, probe header, then ulaw silence (`0xff`).
    packet: [u8; PACKET_LEN],
    ssrc: u32,
    first_seq: u16,
    call: u32,
    /// Probes to send.
    total: u32,
    /// The next probe's sequence.
    n: u32,
    link: Arc<Link>,
}

impl Paced for Outgoing {
    /// Sends the next probe; false once the call has sent all of them (or was aborted).
    fn tick(&mut self, _due: Instant) -> bool {
        if self.n >= self.total || self.link.abort.load(Ordering::Acquire) {
            return false;
        }
        let n = self.n;
        #[allow(clippy::cast_possible_truncation)] // sequence numbers wrap
        let header = RtpHeader {
            marker: n == 0,
            payload_type: 0,
            sequence: self.first_seq.wrapping_add(n as u16),
            timestamp: 160u32.wrapping_add(n.wrapping_mul(160)),
            ssrc: relay_proto::Ssrc(self.ssrc),
        };
        let _ = header.write(&mut self.packet);
        let sent_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let probe = Probe {
            call: self.call,
            seq: n,
            sent_ns,
        };
        if let Some(payload) = self.packet.get_mut(12..) {
            let _ = probe::write(payload, probe);
        }
        let opts = relay_io::SendOpts {
            segment: None,
            stamp_id: Some(n),
        };
        match relay_io::send_msg(&*self.sock, &self.packet, self.to, opts) {
            Ok(_) => {
                self.link.sent.store(n + 1, Ordering::Release);
            }
            Err(e) => {
                // The probe keeps its number: a refused send is counted apart from losses.
                tracing::debug!(to = %self.to, "probe send failed: {e}");
                self.link.send_errors.fetch_add(1, Ordering::Relaxed);
                self.link.sent.store(n + 1, Ordering::Release);
            }
        }
        self.n = n + 1;
        true
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.link.sending_done.store(true, Ordering::Release);
    }
}

/// A call's receiving side, run by its own thread.
#[derive(Debug)]
struct Receiver {
    sock: Arc<UdpSocket>,
    /// Returns must come from here.
    to: SocketAddr,
    call: u32,
    drain: Duration,
    link: Arc<Link>,
    media: CallMedia,
}

impl Receiver {
    fn run(mut self) -> CallMedia {
        let mut control = [0u8; relay_io::socket::CONTROL_LEN];
        let mut buf = [0u8; 2048];
        let mut drain_end: Option<Instant> = None;
        loop {
            let got = relay_io::recv_msg(&*self.sock, &mut buf, &mut control);
            self.read_stamps();
            match got {
                Ok(meta) => self.datagram(&meta, &buf, &control),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    tracing::debug!("probe receive failed: {e}");
                    std::thread::sleep(POLL);
                }
            }
            if self.link.abort.load(Ordering::Acquire) {
                // What already reached the socket is back: read it, then stop.
                if self.sock.set_nonblocking(true).is_ok() {
                    while let Ok(meta) = relay_io::recv_msg(&*self.sock, &mut buf, &mut control) {
                        self.datagram(&meta, &buf, &control);
                    }
                }
                break;
            }
            if self.link.sending_done.load(Ordering::Acquire) {
                let sent = u64::from(self.link.sent.load(Ordering::Acquire))
                    - self.link.send_errors.load(Ordering::Acquire);
                if self.media.returned >= sent {
                    break;
                }
                let end = *drain_end.get_or_insert_with(|| Instant::now() + self.drain);
                if Instant::now() >= end {
                    break;
                }
            }
        }
        self.read_stamps();
        self.media.sent = self.link.sent.load(Ordering::Acquire);
        self.media.send_errors = self.link.send_errors.load(Ordering::Acquire);
        self.media.probes.truncate(self.media.sent as usize);
        self.media
    }

    /// A datagram read into `buf`, with its control data.
    fn datagram(&mut self, meta: &relay_io::socket::RecvMeta, buf: &[u8], control: &[u8]) {
        let at = control
            .get(..meta.control_len)
            .and_then(|c| relay_io::rx_timestamp(c).ok().flatten())
            .map_or(0, |t| t.0);
        if meta.from == Some(self.to) {
            self.back(buf.get(..meta.len).unwrap_or_default(), at);
        } else {
            self.media.strict_drops += 1;
        }
    }

    /// A datagram from the externalMedia channel, received at `at` (0: no kernel stamp).
    fn back(&mut self, bytes: &[u8], at: u64) {
        let Some(p) = parse_rtp(bytes)
            .ok()
            .and_then(|p| probe::parse(p.payload).ok().map(|h| (h, p.payload)))
            .filter(|(h, _)| h.call == self.call)
        else {
            self.media.malformed += 1;
            return;
        };
        let (header, payload) = p;
        let Some(slot) = self.media.probes.get_mut(header.seq as usize) else {
            self.media.malformed += 1;
            return;
        };
        if slot.returned {
            self.media.duplicates += 1;
            return;
        }
        self.media.returned += 1;
        slot.returned = true;
        if at == 0 {
            self.media.no_rx_stamp += 1;
        }
        slot.back = at;
        if let Some(t) = probe::relay_times(payload) {
            slot.relay_arrival = t.arrival_ns;
            slot.relay_returned = t.returned_ns;
        }
    }

    /// Reads every transmit stamp queued on the socket, without blocking.
    fn read_stamps(&mut self) {
        loop {
            match relay_io::recv_tx_stamp(&*self.sock) {
                Ok(s) => {
                    if let Some(p) = self.media.probes.get_mut(s.id as usize) {
                        p.sent = s.at.0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {}
                Err(_) => return,
            }
        }
    }
}
