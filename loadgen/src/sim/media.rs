//! An externalMedia channel's RTP as Asterisk 22 sends it (172-byte packets, payload type 0 for
//! ulaw or 8 for alaw, 50 a second, random SSRC and first sequence number, first timestamp 160), and what the
//! simulator measures of what comes back: round trip, loss, duplicates, strict-RTP drops.
//!
//! The round trip "at Asterisk" is timed like the relay's: T0 is the clock read just before the
//! send, T1 the kernel's receive stamp of the return (`SO_TIMESTAMPNS`), converted to the same
//! monotonic clock, so the relay's cost is not inflated by this task's own wake-ups.

use std::net::SocketAddr;
use std::time::Duration;

use relay_proto::rng::SplitMix64;
use relay_proto::rtp::{parse_rtp, RtpHeader, Ssrc};
use relay_proto::stats::LatencyHistogram;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

/// RTP packet size Asterisk sends for 20 ms of ulaw.
pub const PACKET_LEN: usize = 172;
/// Packets per second.
pub(super) const PACKETS_PER_SECOND: u32 = 50;
/// How long a hung-up call waits for its last packets to come back.
pub(super) const DRAIN: Duration = Duration::from_millis(100);

/// One externalMedia channel's RTP figures.
#[derive(Debug)]
pub(super) struct RtpFigures {
    pub(super) sent: u64,
    pub(super) received: u64,
    pub(super) duplicates: u64,
    pub(super) strict_drops: u64,
    pub(super) malformed: u64,
    pub(super) rtt: LatencyHistogram<u64>,
}

impl Default for RtpFigures {
    fn default() -> Self {
        Self {
            sent: 0,
            received: 0,
            duplicates: 0,
            strict_drops: 0,
            malformed: 0,
            rtt: LatencyHistogram::new(3),
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
        self.rtt.merge(&o.rtt);
    }
}

/// Sends 50 packets a second from `sock` to `to` until stopped, then waits up to [`DRAIN`] for
/// the last ones; measures what comes back.
pub(super) async fn rtp_stream(
    sock: UdpSocket,
    to: SocketAddr,
    (seed, payload_type): (u64, u8),
    mut stop: oneshot::Receiver<()>,
) -> RtpFigures {
    let mut rng = SplitMix64::new(seed);
    let ssrc = Ssrc(rng.next_u32());
    #[allow(clippy::cast_possible_truncation)] // 16 random bits
    let first_seq = rng.next_u32() as u16;
    let mut f = RtpFigures::default();
    let clock = relay_io::Clock::new();
    let mut wall = relay_io::WallToMono::new();
    let kernel_time = relay_io::enable_rx_timestamps(&sock).is_ok();
    let mut control = [0u8; relay_io::socket::CONTROL_LEN];
    // Send time of each sequence number in flight (1,024 covers 20 s of 50/s).
    let mut t0: Vec<Option<(u16, u64)>> = vec![None; 1024];
    let mut packet = [0u8; PACKET_LEN];
    let mut buf = [0u8; 2048];
    let mut tick = tokio::time::interval(Duration::from_secs(1) / PACKETS_PER_SECOND);
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut n: u32 = 0;
    loop {
        let drain_end =
            stopping.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = tick.tick(), if stopping.is_none() => {
                #[allow(clippy::cast_possible_truncation)] // sequence numbers wrap
                let seq = first_seq.wrapping_add(n as u16);
                let header = RtpHeader {
                    marker: n == 0,
                    payload_type,
                    sequence: seq,
                    timestamp: 160u32.wrapping_add(n.wrapping_mul(160)),
                    ssrc,
                };
                let _ = header.write(&mut packet);
                packet[12..].fill(0xff);
                let sent_at = clock.now_ns();
                if sock.send_to(&packet, to).await.is_ok() {
                    f.sent += 1;
                    t0[usize::from(seq) % 1024] = Some((seq, sent_at));
                }
                n = n.wrapping_add(1);
            }
            r = sock.async_io(tokio::io::Interest::READABLE, || {
                relay_io::recv_msg(&sock, &mut buf, &mut control)
            }) => {
                let Ok(meta) = r else { continue };
                let sample = clock.sample();
                wall.resample(sample);
                let stamp = control.get(..meta.control_len).and_then(|c| relay_io::rx_timestamp(c).ok().flatten());
                let arrival = stamp
                    .filter(|_| kernel_time)
                    .and_then(|t| wall.to_mono(t))
                    .unwrap_or(sample.mono_after);
                let (len, from) = (meta.len, meta.from);
                if from != Some(to) {
                    f.strict_drops += 1;
                    continue;
                }
                match buf.get(..len).map(parse_rtp) {
                    Some(Ok(p)) if p.ssrc == ssrc => {
                        let slot = &mut t0[usize::from(p.sequence) % 1024];
                        match *slot {
                            Some((s, at)) if s == p.sequence => {
                                f.rtt.record(arrival.saturating_sub(at));
                                f.received += 1;
                                *slot = None;
                            }
                            _ => f.duplicates += 1,
                        }
                    }
                    _ => f.malformed += 1,
                }
                if stopping.is_some() && f.received + f.duplicates >= f.sent {
                    break;
                }
            }
            _ = &mut stop, if stopping.is_none() => {
                if f.received >= f.sent {
                    break;
                }
                stopping = Some(tokio::time::Instant::now() + DRAIN);
            }
            () = tokio::time::sleep_until(drain_end), if stopping.is_some() => break,
        }
    }
    f
}
