//! Media through bridges: what an externalMedia channel does when it shares a two-party bridge
//! with a half of a Local channel pair instead of one of the simulator's own callers. It does
//! not play a tone then: it forwards, as a real Asterisk's bridge does.
//!
//! What it reads from its `external_host` (strict RTP: datagrams from anywhere else are dropped
//! and counted, as for the simulator's callers; datagrams that are not RTP are counted as
//! malformed) travels: its bridge → the bridge's other member → if that is a Local half, across
//! to its peer half → that half's bridge → the other member, and so on until an externalMedia
//! channel, which sends the frame to its own `external_host` from its own socket. Each hop
//! through a bridge is a *traversal*; a Local pair's call crosses two each way (loadgen's bridge
//! and control's). A frame with no complete path (a half not bridged yet, a bridge with one
//! member, or more than two, or a channel hung up since) is dropped and counted as `unrouted`,
//! as is the rare frame whose last send fails. So a caller that starts playing as soon as its own
//! half is bridged loses its first frames while control has not bridged the other half yet, as
//! it would on Asterisk, where a channel in Stasis but in no bridge discards what it reads.
//!
//! Byte-transparent: the payload passes unchanged. Every leg writes its own RTP header, as
//! Asterisk's RTP stack does for each channel: the sending externalMedia channel's own random
//! SSRC, its own sequence numbers (random first, +1 for each frame it sends), timestamps from
//! 160, +160 a frame, the payload type of its format (0 ulaw, 8 alaw), the marker on its first
//! frame. That is modelled, not verified against Asterisk's source. What was observed on a real
//! Asterisk 22.10.1 is the byte-transparency itself: through a Local channel pair with `/n` and
//! two two-party mixing bridges (Asterisk picks `simple_bridge`), every leg ulaw, 4,990 of 4,990
//! probes came back byte-identical. Formats are not converted here: a leg in alaw facing one in
//! ulaw would be transcoded by Asterisk, and is forwarded unchanged by the simulator.
//!
//! Each traversal adds `--bridge-delay` plus a uniform draw in `[0, --bridge-jitter)`, and drops
//! the frame with probability `--bridge-loss`, both drawn from a generator seeded from `--seed`
//! (one per forwarding channel). A frame dropped at a traversal is counted there (`dropped`),
//! even when the path beyond it is incomplete. Frames are never reordered within one path: a
//! bridge channel is one thread in Asterisk, so each traversal's due time is at least that of
//! the path's previous frame there. The route (how many traversals, which channel sends) is read
//! when a frame arrives; the sending channel is checked again when the frame leaves.
//!
//! Threads: each forwarding channel has a std thread of its own (`rtp-fwd-PORT`, not pinned)
//! that blocks in `recv` with the same read timeout as the callers' receiving threads and ends
//! once its channel is hung up, after reading (and counting as unrouted) whatever had reached
//! its socket by then. With no delay and no jitter it sends each frame itself, at once.
//! Otherwise it hands the frame to the one delay-line thread (`bridge-delay`), which keeps a
//! timer heap and sleeps until the next frame is due. A thread's route is an `Arc` in a slot of
//! its own, replaced by the world whenever a bridge's membership changes, so no packet takes the
//! world's lock.
//!
//! Counted, keyed by where a frame entered: from an externalMedia channel of control's
//! application (`--app`: the relay's side, heading for the caller) `toward_caller`, from one of
//! any other application (the caller's side, heading for the relay) `toward_relay`. Every frame
//! a forwarding thread reads from its `external_host` ends in exactly one of `forwarded`,
//! `dropped` and `unrouted` of its side (a frame still in the delay line when the simulator
//! stops counts as `unrouted`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use relay_proto::rng::SplitMix64;
use relay_proto::rtp::{parse_rtp, RtpHeader, Ssrc, RTP_HEADER_LEN};
use serde::Serialize;
use tokio::sync::oneshot;

use super::media::POLL;
use super::SimConfig;

/// At most this many traversals on one path (a longer chain of Local pairs is taken for a loop
/// and counted as unrouted).
pub(super) const MAX_HOPS: usize = 8;
/// The largest datagram a forwarding channel reads.
const MAX_DATAGRAM: usize = 2048;
/// Stack of a forwarding thread (it keeps its buffers on it).
const FWD_STACK: usize = 256 * 1024;

/// Where a frame entered, which says where it is heading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// From an externalMedia channel of another application than control's: toward the relay.
    TowardRelay,
    /// From an externalMedia channel of control's application: toward the caller.
    TowardCaller,
}

/// One side's counts.
#[derive(Debug, Default)]
struct SideCounts {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    unrouted: AtomicU64,
}

/// Every count of the bridges, shared by the forwarding threads and the delay line.
#[derive(Debug, Default)]
struct Counts {
    toward_relay: SideCounts,
    toward_caller: SideCounts,
    traversals: AtomicU64,
    strict_drops: AtomicU64,
    malformed: AtomicU64,
}

impl Counts {
    fn side(&self, s: Side) -> &SideCounts {
        match s {
            Side::TowardRelay => &self.toward_relay,
            Side::TowardCaller => &self.toward_caller,
        }
    }
}

/// One side's counts in the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SideReport {
    /// Frames that left through the externalMedia channel at the end of their path.
    pub forwarded: u64,
    /// Frames dropped by `--bridge-loss` at a traversal.
    pub dropped: u64,
    /// Frames with no complete path (or whose last send failed).
    pub unrouted: u64,
}

/// The bridges in the simulator's report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BridgeReport {
    /// Local channel pairs originated into the `stasis` context.
    pub local_pairs: u64,
    /// Frames from an externalMedia channel of any application but control's: the caller's
    /// side, heading for the relay.
    pub toward_relay: SideReport,
    /// Frames from an externalMedia channel of control's application: the relay's side,
    /// heading for the caller.
    pub toward_caller: SideReport,
    /// Bridge traversals made (a frame crossing a bridge and not dropped there), both sides.
    pub traversals: u64,
    /// Datagrams to forwarding channels from anywhere but their `external_host` (strict RTP).
    pub strict_rtp_drops: u64,
    /// Datagrams from a forwarding channel's `external_host` that were not RTP.
    pub malformed: u64,
    /// `--bridge-delay`, per traversal.
    pub delay_ns: u64,
    /// `--bridge-jitter`: each traversal adds a uniform draw in `[0, jitter)` to the delay.
    pub jitter_ns: u64,
    /// `--bridge-loss`: the probability that a traversal drops a frame.
    pub loss: f64,
}

/// The bridges' settings, counts and delay line.
#[derive(Debug)]
pub(super) struct Bridges {
    delay: Duration,
    jitter_ns: u64,
    loss: f64,
    counts: Arc<Counts>,
    /// Local pairs originated.
    pub(super) local_pairs: AtomicU64,
    /// The delay line's intake, when frames are delayed at all.
    line: Option<Mutex<mpsc::Sender<Delayed>>>,
    /// Forwarding threads end once this is gone (the simulator dropped).
    alive: Arc<()>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Bridges {
    /// The settings of `cfg`; starts the delay-line thread if frames are delayed.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub(super) fn new(cfg: &SimConfig) -> io::Result<Self> {
        let counts = Arc::new(Counts::default());
        let line = if cfg.bridge_delay.is_zero() && cfg.bridge_jitter.is_zero() {
            None
        } else {
            let (tx, rx) = mpsc::channel();
            let c = Arc::clone(&counts);
            std::thread::Builder::new()
                .name("bridge-delay".into())
                .spawn(move || delay_line(&rx, &c))?;
            Some(Mutex::new(tx))
        };
        Ok(Self {
            delay: cfg.bridge_delay,
            jitter_ns: nanos(cfg.bridge_jitter),
            loss: if cfg.bridge_loss.is_finite() {
                cfg.bridge_loss.clamp(0.0, 1.0)
            } else {
                0.0
            },
            counts,
            local_pairs: AtomicU64::new(0),
            line,
            alive: Arc::new(()),
        })
    }

    /// The counts as the report shows them.
    pub(super) fn report(&self) -> BridgeReport {
        let c = &self.counts;
        let side = |s: &SideCounts| SideReport {
            forwarded: s.forwarded.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            unrouted: s.unrouted.load(Ordering::Relaxed),
        };
        BridgeReport {
            local_pairs: self.local_pairs.load(Ordering::Relaxed),
            toward_relay: side(&c.toward_relay),
            toward_caller: side(&c.toward_caller),
            traversals: c.traversals.load(Ordering::Relaxed),
            strict_rtp_drops: c.strict_drops.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            delay_ns: nanos(self.delay),
            jitter_ns: self.jitter_ns,
            loss: self.loss,
        }
    }
}

/// What one forwarding channel's frames go through: `traversals` bridges, then out through
/// `egress` (`None`: the path breaks after the last traversal, the frame is unrouted).
#[derive(Debug, Default)]
pub(super) struct Route {
    /// Bridges crossed.
    pub(super) traversals: usize,
    /// The externalMedia channel that sends the frame on.
    pub(super) egress: Option<Arc<Egress>>,
}

/// A forwarding channel's route, replaced whenever a bridge's membership changes.
type RouteSlot = Mutex<Arc<Route>>;

/// The header state of a sending channel.
#[derive(Debug)]
struct Header {
    ssrc: Ssrc,
    sequence: u16,
    timestamp: u32,
    first: bool,
    payload_type: u8,
    send_errors: u64,
}

/// The sending side of a forwarding externalMedia channel: its socket, its `external_host` and
/// its own RTP header.
#[derive(Debug)]
pub(super) struct Egress {
    sock: Arc<UdpSocket>,
    to: SocketAddr,
    /// Cleared when the channel is hung up: nothing leaves through it any more.
    open: AtomicBool,
    header: Mutex<Header>,
}

impl Egress {
    /// Sends `payload` under this channel's next header; false when the channel is closed or
    /// the send failed.
    fn send(&self, payload: &[u8]) -> bool {
        if !self.open.load(Ordering::Acquire) {
            return false;
        }
        let mut h = self
            .header
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut packet = [0u8; MAX_DATAGRAM];
        let len = RTP_HEADER_LEN + payload.len();
        let Some(body) = packet.get_mut(RTP_HEADER_LEN..len) else {
            return false;
        };
        body.copy_from_slice(payload);
        let _ = RtpHeader {
            marker: h.first,
            payload_type: h.payload_type,
            sequence: h.sequence,
            timestamp: h.timestamp,
            ssrc: h.ssrc,
        }
        .write(&mut packet);
        h.first = false;
        h.sequence = h.sequence.wrapping_add(1);
        h.timestamp = h.timestamp.wrapping_add(160);
        match self.sock.send_to(&packet[..len], self.to) {
            Ok(_) => true,
            Err(e) => {
                if h.send_errors == 0 {
                    tracing::warn!(to = %self.to, "forwarded RTP send failed: {e}");
                }
                h.send_errors += 1;
                false
            }
        }
    }
}

/// A forwarding channel as the world keeps it.
#[derive(Debug)]
pub(super) struct Forwarding {
    route: Arc<RouteSlot>,
    /// Its sending side, the end of other channels' routes.
    pub(super) egress: Arc<Egress>,
    stop: Arc<AtomicBool>,
    /// Fires when its thread has ended.
    done: Option<oneshot::Receiver<()>>,
}

impl Forwarding {
    /// Starts forwarding what `sock` receives from `external_host`; its own header from `seed`,
    /// `payload_type` for what it sends; its frames counted on `side`. No route until
    /// [`Self::set_route`].
    ///
    /// # Errors
    /// The socket's read timeout cannot be set, or the thread cannot be spawned.
    pub(super) fn start(
        bridges: &Bridges,
        sock: UdpSocket,
        external_host: SocketAddr,
        side: Side,
        (seed, payload_type): (u64, u8),
    ) -> io::Result<Self> {
        sock.set_read_timeout(Some(POLL))?;
        let port = sock.local_addr().map_or(0, |a| a.port());
        let sock = Arc::new(sock);
        let mut rng = SplitMix64::new(seed);
        let ssrc = Ssrc(rng.next_u32());
        #[allow(clippy::cast_possible_truncation)] // 16 random bits
        let sequence = rng.next_u32() as u16;
        let egress = Arc::new(Egress {
            sock: Arc::clone(&sock),
            to: external_host,
            open: AtomicBool::new(true),
            header: Mutex::new(Header {
                ssrc,
                sequence,
                timestamp: 160,
                first: true,
                payload_type,
                send_errors: 0,
            }),
        });
        let route: Arc<RouteSlot> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = oneshot::channel();
        let mut fwd = Forwarder {
            sock,
            from: external_host,
            side,
            route: Arc::clone(&route),
            stop: Arc::clone(&stop),
            alive: Arc::downgrade(&bridges.alive),
            counts: Arc::clone(&bridges.counts),
            line: bridges.line.as_ref().map(|l| {
                l.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            }),
            delay: bridges.delay,
            jitter_ns: bridges.jitter_ns,
            loss: bridges.loss,
            rng,
            last_due: [None; MAX_HOPS],
        };
        std::thread::Builder::new()
            .name(format!("rtp-fwd-{port}"))
            .stack_size(FWD_STACK)
            .spawn(move || {
                fwd.run();
                let _ = tx.send(());
            })?;
        Ok(Self {
            route,
            egress,
            stop,
            done: Some(done),
        })
    }

    /// Replaces its route.
    pub(super) fn set_route(&self, r: Route) {
        *self
            .route
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(r);
    }

    /// Closes it (nothing is sent through it any more, what its thread still reads is
    /// unrouted) and asks its thread to end; what fires once it has (the first call only).
    pub(super) fn close(&mut self) -> Option<oneshot::Receiver<()>> {
        self.egress.open.store(false, Ordering::Release);
        self.set_route(Route::default());
        self.stop.store(true, Ordering::Release);
        self.done.take()
    }
}

/// A forwarding channel's receiving thread.
#[derive(Debug)]
struct Forwarder {
    sock: Arc<UdpSocket>,
    /// `external_host`: frames must come from here (strict RTP).
    from: SocketAddr,
    side: Side,
    route: Arc<RouteSlot>,
    stop: Arc<AtomicBool>,
    alive: Weak<()>,
    counts: Arc<Counts>,
    /// The delay line (`None`: no delay, send at once).
    line: Option<mpsc::Sender<Delayed>>,
    delay: Duration,
    jitter_ns: u64,
    loss: f64,
    rng: SplitMix64,
    /// When this path's previous frame is due out of each traversal (frames never overtake).
    last_due: [Option<Instant>; MAX_HOPS],
}

impl Forwarder {
    fn run(&mut self) {
        let mut buf = [0u8; MAX_DATAGRAM];
        while !self.stop.load(Ordering::Acquire) && self.alive.strong_count() > 0 {
            match self.sock.recv_from(&mut buf) {
                Ok((len, from)) => {
                    let now = Instant::now();
                    if let Some(data) = buf.get(..len) {
                        self.frame(data, from, now);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    tracing::debug!("forwarding channel's receive failed: {e}");
                    // Not a busy loop on a broken socket.
                    std::thread::sleep(POLL);
                }
            }
        }
        // Hung up: what reached the socket before is read and counted too (its route is gone,
        // so as unrouted), so that every frame that reached the channel is in the counts.
        if self.stop.load(Ordering::Acquire) && self.sock.set_nonblocking(true).is_ok() {
            while let Ok((len, from)) = self.sock.recv_from(&mut buf) {
                if let Some(data) = buf.get(..len) {
                    self.frame(data, from, Instant::now());
                }
            }
        }
    }

    /// One datagram read at `now` from `from`.
    fn frame(&mut self, data: &[u8], from: SocketAddr, now: Instant) {
        if from != self.from {
            self.counts.strict_drops.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(p) = parse_rtp(data) else {
            self.counts.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let route = Arc::clone(
            &self
                .route
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let counts = Arc::clone(&self.counts);
        let side = counts.side(self.side);
        let mut due = now;
        for last in self.last_due.iter_mut().take(route.traversals) {
            let jitter = Duration::from_nanos(self.rng.below(self.jitter_ns));
            due = (due + self.delay + jitter).max(last.unwrap_or(now));
            *last = Some(due);
            if self.rng.chance(self.loss) {
                side.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            counts.traversals.fetch_add(1, Ordering::Relaxed);
        }
        let Some(egress) = route.egress.as_ref() else {
            side.unrouted.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let sent = match &self.line {
            None => egress.send(p.payload),
            Some(line) => {
                let d = Delayed {
                    due,
                    order: 0,
                    egress: Arc::clone(egress),
                    payload: p.payload.to_vec(),
                    side: self.side,
                };
                // Counted by the delay line from here on.
                if line.send(d).is_ok() {
                    return;
                }
                false
            }
        };
        let n = if sent {
            &side.forwarded
        } else {
            &side.unrouted
        };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// A frame waiting in the delay line.
#[derive(Debug)]
struct Delayed {
    due: Instant,
    /// Arrival order at the delay line (ties leave in it).
    order: u64,
    egress: Arc<Egress>,
    payload: Vec<u8>,
    side: Side,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.order) == (o.due, o.order)
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Delayed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.order).cmp(&(o.due, o.order))
    }
}

/// The delay line's thread: takes frames in, sleeps until the next is due, sends each at its
/// due time (in due order, ties in arrival order). Ends when every sender is gone; what is
/// still waiting then is counted as unrouted.
fn delay_line(rx: &mpsc::Receiver<Delayed>, counts: &Counts) {
    let mut heap: BinaryHeap<Reverse<Delayed>> = BinaryHeap::new();
    let mut order = 0u64;
    loop {
        let got = match heap.peek() {
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(Reverse(d)) => match d.due.checked_duration_since(Instant::now()) {
                Some(wait) if !wait.is_zero() => rx.recv_timeout(wait),
                _ => Err(mpsc::RecvTimeoutError::Timeout),
            },
        };
        match got {
            Ok(mut d) => {
                d.order = order;
                order += 1;
                heap.push(Reverse(d));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                for Reverse(d) in heap.drain() {
                    counts.side(d.side).unrouted.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(d)| d.due <= now) {
            let Some(Reverse(d)) = heap.pop() else { break };
            let side = counts.side(d.side);
            let n = if d.egress.send(&d.payload) {
                &side.forwarded
            } else {
                &side.unrouted
            };
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_line_keeps_due_order_and_ties_in_arrival_order() {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let egress = Arc::new(Egress {
            sock,
            to: sink.local_addr().unwrap(),
            open: AtomicBool::new(true),
            header: Mutex::new(Header {
                ssrc: Ssrc(7),
                sequence: 65_535,
                timestamp: 160,
                first: true,
                payload_type: 0,
                send_errors: 0,
            }),
        });
        let counts = Arc::new(Counts::default());
        let (tx, rx) = mpsc::channel();
        let c = Arc::clone(&counts);
        let t = std::thread::spawn(move || delay_line(&rx, &c));
        let base = Instant::now() + Duration::from_millis(30);
        // Due times 2, 1, 1, 3 (ms after base): out as b, c, a, d.
        for (name, ms) in [(b'a', 2), (b'b', 1), (b'c', 1), (b'd', 3)] {
            tx.send(Delayed {
                due: base + Duration::from_millis(ms),
                order: 0,
                egress: Arc::clone(&egress),
                payload: vec![name; 4],
                side: Side::TowardRelay,
            })
            .unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            let n = sink.recv(&mut buf).unwrap();
            let p = parse_rtp(&buf[..n]).unwrap();
            got.push((p.payload[0], p.sequence, p.timestamp, p.marker));
        }
        assert!(Instant::now() >= base + Duration::from_millis(3));
        assert_eq!(
            got,
            [
                (b'b', 65_535, 160, true),
                (b'c', 0, 320, false),
                (b'a', 1, 480, false),
                (b'd', 2, 640, false)
            ]
        );
        // A closed channel sends nothing: unrouted.
        egress.open.store(false, Ordering::Release);
        tx.send(Delayed {
            due: Instant::now(),
            order: 0,
            egress,
            payload: vec![0; 4],
            side: Side::TowardCaller,
        })
        .unwrap();
        drop(tx);
        t.join().unwrap();
        assert_eq!(counts.toward_relay.forwarded.load(Ordering::Relaxed), 4);
        assert_eq!(counts.toward_caller.unrouted.load(Ordering::Relaxed), 1);
    }
}
