//! The echo's fault model, sans I/O: what to do with each packet, and when.
//!
//! Every decision comes from one seeded generator in arrival order, so a run with the same
//! `--seed` and the same input makes the same decisions. The echo counts what it did in the order
//! packets *leave* (a packet held back and sent after a later one of its stream counts as
//! reordered; a packet that merely waited does not), which is exactly how the relay's sequence
//! tracker sees them, so the two sets of counts can be compared for equality.
//!
//! - `loss`: drop a packet with this probability.
//! - `duplicate`: send a packet twice, back to back.
//! - `reorder`: hold a packet until the next packet of its stream leaves, then send it right
//!   after (or after `reorder_hold` if none comes).
//! - `delay` + `jitter`: hold each packet `delay` plus a uniform `[0, jitter)`.
//! - `pace`: release each stream's packets at the spacing their RTP timestamps give (from the
//!   stream's first packet), plus the delay.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use relay_proto::rng::SplitMix64;
use relay_proto::rtp::parse_rtp;
use relay_proto::time::duration_nanos;
use relay_proto::ClockRate;
use serde::Serialize;

/// Fault settings.
#[derive(Clone, Debug, Default)]
pub struct FaultConfig {
    /// Fixed delay added to every packet.
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter)`.
    pub jitter: Duration,
    /// Probability a packet is dropped.
    pub loss: f64,
    /// Probability a packet is sent twice.
    pub duplicate: f64,
    /// Probability a packet is held until the next one of its stream has left.
    pub reorder: f64,
    /// Release packets at the spacing of their RTP timestamps.
    pub pace: bool,
    /// RTP clock for pacing.
    pub clock_hz: u32,
    /// Longest a reorder-held packet waits for a successor.
    pub reorder_hold: Duration,
    /// Seed of every random decision.
    pub seed: u64,
}

impl FaultConfig {
    /// Whether no fault is configured: the echo then returns every datagram at once and keeps
    /// no state at all.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.delay.is_zero()
            && self.jitter.is_zero()
            && self.loss <= 0.0
            && self.duplicate <= 0.0
            && self.reorder <= 0.0
            && !self.pace
    }
}

/// What the echo did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EchoCounts {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams sent (duplicates included).
    pub sent: u64,
    /// Datagrams dropped by `--loss`.
    pub dropped: u64,
    /// Extra copies sent by `--duplicate`.
    pub duplicated: u64,
    /// Packets sent after a later packet of their stream (in the order they left).
    pub reordered: u64,
    /// Packets that were held before leaving (delay, jitter, pacing or reordering).
    pub delayed: u64,
    /// Datagrams that were not RTP (returned untouched, unfaulted).
    pub not_rtp: u64,
    /// Datagrams lost for want of a transmit buffer (`--gro` with faults copies each segment of
    /// a coalesced receive into one; more held at once than the pool has). Zero in any run whose
    /// fault counts are to be trusted.
    pub no_buffer: u64,
}

/// What to do with a packet now.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<T> {
    /// Send it now, `copies` times (1 or 2).
    Send {
        /// The packet.
        item: T,
        /// How many times.
        copies: u8,
    },
    /// Drop it.
    Drop(T),
    /// The model holds it; it comes back from [`Faults::pop_due`].
    Held,
}

/// Per-stream state (faulted runs only).
#[derive(Debug, Default)]
struct Stream {
    /// First packet's arrival (ns) and timestamp, for pacing.
    pace_base: Option<(u64, u32)>,
    /// The packet held for reordering, by token.
    held: Option<u64>,
    /// Last sequence number sent, and its extension.
    last_sent: Option<(u16, i64)>,
    /// Highest extended sequence number sent.
    max_sent: i64,
}

/// A held packet.
#[derive(Debug)]
struct Held<T> {
    /// The packet.
    item: T,
    /// Copies to send.
    copies: u8,
}

/// Heap entry kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// Send the packet.
    Release,
    /// A reorder hold expired: send it if it is still held.
    HoldExpired(u32),
}

/// The fault model.
#[derive(Debug)]
pub struct Faults<T> {
    /// Settings.
    cfg: FaultConfig,
    /// Every random decision.
    rng: SplitMix64,
    /// RTP clock for pacing.
    clock: ClockRate,
    /// Streams by SSRC.
    streams: HashMap<u32, Stream>,
    /// Held packets by token.
    held: HashMap<u64, Held<T>>,
    /// (due ns, order, token, kind).
    heap: BinaryHeap<Reverse<(u64, u64, u64, Due)>>,
    /// Next token / order number.
    next: u64,
    /// Counts.
    counts: EchoCounts,
}

impl<T> Faults<T> {
    /// A model with these settings.
    #[must_use]
    pub fn new(cfg: FaultConfig) -> Self {
        Self {
            rng: SplitMix64::new(cfg.seed),
            clock: ClockRate::new(cfg.clock_hz),
            cfg,
            streams: HashMap::new(),
            held: HashMap::new(),
            heap: BinaryHeap::new(),
            next: 0,
            counts: EchoCounts::default(),
        }
    }

    /// The counts so far.
    #[must_use]
    pub const fn counts(&self) -> EchoCounts {
        self.counts
    }

    /// Packets held now.
    #[must_use]
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn order(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Decides the fate of a packet that arrived at `now_ns`.
    pub fn on_packet(&mut self, now_ns: u64, bytes: &[u8], item: T) -> Action<T> {
        self.counts.received += 1;
        let Ok(p) = parse_rtp(bytes) else {
            self.counts.not_rtp += 1;
            return Action::Send { item, copies: 1 };
        };
        if self.rng.chance(self.cfg.loss) {
            self.counts.dropped += 1;
            return Action::Drop(item);
        }
        let copies = 1 + u8::from(self.rng.chance(self.cfg.duplicate));
        let jitter = self.rng.below(duration_nanos(self.cfg.jitter));
        let reorder = self.rng.chance(self.cfg.reorder);
        let mut at = now_ns + duration_nanos(self.cfg.delay) + jitter;
        let stream = self.streams.entry(p.ssrc.0).or_default();
        if self.cfg.pace {
            let (t0, ts0) = *stream.pace_base.get_or_insert((now_ns, p.timestamp));
            #[allow(clippy::cast_possible_wrap)] // signed distance between wrapped timestamps
            let ticks = i64::from(p.timestamp.wrapping_sub(ts0) as i32);
            let paced = i64::try_from(t0).unwrap_or(i64::MAX) + self.clock.ticks_to_nanos(ticks);
            let paced = u64::try_from(paced).unwrap_or(0);
            at = at.max(paced + duration_nanos(self.cfg.delay) + jitter);
        }
        // A packet held for reordering leaves right after this one.
        let release_held = stream.held.take();
        if reorder && release_held.is_none() {
            let token = self.order();
            if let Some(s) = self.streams.get_mut(&p.ssrc.0) {
                s.held = Some(token);
            }
            self.held.insert(token, Held { item, copies });
            self.counts.delayed += 1;
            let expire = now_ns + duration_nanos(self.cfg.reorder_hold);
            let order = self.order();
            self.heap
                .push(Reverse((expire, order, token, Due::HoldExpired(p.ssrc.0))));
            return Action::Held;
        }
        let action = if at <= now_ns && release_held.is_none() {
            Action::Send { item, copies }
        } else {
            let token = self.order();
            self.held.insert(token, Held { item, copies });
            self.counts.delayed += 1;
            let order = self.order();
            self.heap.push(Reverse((at, order, token, Due::Release)));
            Action::Held
        };
        if let Some(token) = release_held {
            let order = self.order();
            self.heap.push(Reverse((at, order, token, Due::Release)));
        }
        action
    }

    /// When the next held packet is due, in ns.
    #[must_use]
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((at, ..))| *at)
    }

    /// The next held packet due at `now_ns`, with its copies.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<(T, u8)> {
        loop {
            let &Reverse((at, _, token, due)) = self.heap.peek()?;
            if at > now_ns {
                return None;
            }
            self.heap.pop();
            if let Due::HoldExpired(ssrc) = due {
                match self.streams.get_mut(&ssrc) {
                    Some(s) if s.held == Some(token) => s.held = None,
                    _ => continue, // already scheduled behind its successor
                }
            }
            if let Some(h) = self.held.remove(&token) {
                return Some((h.item, h.copies));
            }
        }
    }

    /// Accounts a datagram as it leaves (`copy`: the second of a duplicate).
    pub fn on_sent(&mut self, bytes: &[u8], copy: bool) {
        self.on_sent_key(rtp_key(bytes), copy);
    }

    /// Accounts a datagram as it leaves, by its (SSRC, sequence) when it is RTP.
    pub fn on_sent_key(&mut self, key: Option<(u32, u16)>, copy: bool) {
        self.counts.sent += 1;
        if copy {
            self.counts.duplicated += 1;
            return;
        }
        let Some((ssrc, sequence)) = key else { return };
        let s = self.streams.entry(ssrc).or_default();
        let ext = match s.last_sent {
            None => i64::from(sequence),
            #[allow(clippy::cast_possible_wrap)] // signed distance between wrapped numbers
            Some((last, ext)) => ext + i64::from(sequence.wrapping_sub(last) as i16),
        };
        if s.last_sent.is_some() && ext < s.max_sent {
            self.counts.reordered += 1;
        }
        s.max_sent = if s.last_sent.is_some() {
            s.max_sent.max(ext)
        } else {
            ext
        };
        s.last_sent = Some((sequence, ext));
    }
}

/// (SSRC, sequence) of an RTP datagram.
#[must_use]
pub fn rtp_key(bytes: &[u8]) -> Option<(u32, u16)> {
    parse_rtp(bytes).ok().map(|p| (p.ssrc.0, p.sequence))
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::rtp::RtpHeader;
    use relay_proto::Ssrc;

    const MS: u64 = 1_000_000;

    fn pkt(seq: u16) -> Vec<u8> {
        let mut b = vec![0u8; 172];
        let h = RtpHeader {
            sequence: seq,
            timestamp: 160 * u32::from(seq),
            ssrc: Ssrc(5),
            ..RtpHeader::default()
        };
        h.write(&mut b).unwrap();
        b
    }

    /// Runs packets 0..n arriving every 20 ms through the model; returns the order they left.
    fn run(cfg: FaultConfig, n: u16) -> (Vec<u16>, EchoCounts) {
        let mut f = Faults::new(cfg);
        let mut out = Vec::new();
        let mut send = |f: &mut Faults<u16>, seq: u16, copies: u8| {
            for c in 0..copies {
                f.on_sent(&pkt(seq), c == 1);
                out.push(seq);
            }
        };
        for seq in 0..n {
            let now = u64::from(seq) * 20 * MS;
            while let Some((s, c)) = f.pop_due(now) {
                send(&mut f, s, c);
            }
            if let Action::Send { item, copies } = f.on_packet(now, &pkt(seq), seq) {
                send(&mut f, item, copies);
            }
        }
        while let Some((s, c)) = f.pop_due(u64::MAX) {
            send(&mut f, s, c);
        }
        (out, f.counts())
    }

    #[test]
    fn clean_config_is_clean_and_sends_everything_at_once() {
        let cfg = FaultConfig {
            clock_hz: 8000,
            ..FaultConfig::default()
        };
        assert!(cfg.is_clean());
        let (out, c) = run(cfg, 100);
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        assert_eq!(
            (c.received, c.sent, c.delayed, c.reordered),
            (100, 100, 0, 0)
        );
    }

    #[test]
    fn counts_match_what_left_and_are_reproducible() {
        let cfg = FaultConfig {
            loss: 0.05,
            duplicate: 0.05,
            reorder: 0.05,
            jitter: Duration::from_millis(30),
            delay: Duration::from_millis(5),
            clock_hz: 8000,
            reorder_hold: Duration::from_millis(100),
            seed: 9,
            ..FaultConfig::default()
        };
        let (out, c) = run(cfg.clone(), 3_000);
        assert_eq!(run(cfg, 3_000), (out.clone(), c), "same seed, same run");
        assert!(c.dropped > 0 && c.duplicated > 0 && c.reordered > 0);
        assert_eq!(c.sent, out.len() as u64);
        assert_eq!(c.received, 3_000);
        assert_eq!(c.sent, c.received - c.dropped + c.duplicated);
        // Recount from the output: reordered = left after a higher sequence, first copies only.
        let (mut seen, mut max, mut reordered, mut dups) =
            (std::collections::HashSet::new(), None, 0, 0);
        for &s in &out {
            if !seen.insert(s) {
                dups += 1;
                continue;
            }
            if max.is_some_and(|m| s < m) {
                reordered += 1;
            }
            max = Some(max.map_or(s, |m: u16| m.max(s)));
        }
        assert_eq!((reordered, dups), (c.reordered, c.duplicated));
        assert_eq!(seen.len() as u64, 3_000 - c.dropped);
    }

    #[test]
    fn pacing_follows_the_timestamps() {
        let mut f: Faults<u16> = Faults::new(FaultConfig {
            pace: true,
            clock_hz: 8000,
            ..FaultConfig::default()
        });
        // Two packets arrive together; the second is 20 ms of timestamps later.
        assert!(matches!(f.on_packet(0, &pkt(0), 0), Action::Send { .. }));
        assert_eq!(f.on_packet(0, &pkt(1), 1), Action::Held);
        assert_eq!(f.next_due(), Some(20 * MS));
        assert_eq!(f.pop_due(19 * MS), None);
        assert_eq!(f.pop_due(20 * MS), Some((1, 1)));
    }
}
