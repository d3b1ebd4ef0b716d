//! A virtual-clock harness: synthetic Asterisk streams and a fault-injecting echo, exchanging
//! datagrams with a [`Relay`] through an event queue, in the manner of quinn-proto's `Pair`.
//!
//! Nothing here sleeps or reads a clock: time jumps from one scheduled delivery to the next, so a
//! 30-second call runs in milliseconds and every round trip is known to the nanosecond.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use relay_proto::control::AddChannel;
use relay_proto::rtp::{parse_rtp, RtpHeader};
use relay_proto::{
    ChannelId, Command, CommandOutcome, Direction, MonoTime, Relay, RelayConfig, Response,
    SocketId, Ssrc, Verdict,
};

/// The core's seedable generator, under the name the tests use.
pub use relay_proto::rng::SplitMix64 as Rng;

pub const MS: u64 = 1_000_000;
pub const PTIME_NS: u64 = 20 * MS;

/// The echo's fault model: applied to each packet it receives, except the first `clean_head`
/// of each stream and, with `clean_tail`, its last.
#[derive(Clone, Debug)]
pub struct EchoFaults {
    /// Fixed one-way delay added by the echo.
    pub delay: Duration,
    /// Extra delay, uniform in `0..jitter`.
    pub jitter: Duration,
    /// Probability a packet is dropped.
    pub loss: f64,
    /// Probability a packet is sent back twice.
    pub duplicate: f64,
    /// Probability a packet is held back one packet time (arrives after its successor).
    pub reorder: f64,
    /// Packets at the head of each stream left alone.
    pub clean_head: u64,
    /// Leave the last packet of each stream alone.
    pub clean_tail: bool,
}

impl Default for EchoFaults {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            clean_head: 0,
            clean_tail: true,
        }
    }
}

/// What the echo did, counted by the echo itself in the order it emitted packets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchoCounts {
    pub received: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// Packets emitted after a packet of higher sequence (and not duplicates).
    pub reordered: u64,
    pub emitted: u64,
}

/// One synthetic Asterisk stream (an externalMedia channel sending ulaw).
#[derive(Clone, Debug)]
pub struct Call {
    pub channel: ChannelId,
    pub socket: SocketId,
    pub asterisk: SocketAddr,
    pub ssrc: Ssrc,
    pub first_seq: u16,
    pub packets: u64,
    /// Echo-side bookkeeping: highest extended sequence emitted, and what was emitted.
    max_emitted: Option<u64>,
    emitted: HashSet<u64>,
    pub echo: EchoCounts,
    /// What Asterisk got back.
    pub returned: u64,
    /// Exact round trips the echo imposed on first copies that came back, for comparison.
    pub imposed_rtt_ns: Vec<u64>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Delivery {
    /// Asterisk sends packet `k` of call `call`.
    AsteriskSend { call: usize, k: u64 },
    /// The echo emits packet `k` of `call` back to the relay (sent at `t0`).
    EchoEmit { call: usize, k: u64, t0: u64 },
}

/// The relay and its peers on one virtual clock.
pub struct Sim {
    pub relay: Relay,
    pub now: MonoTime,
    pub calls: Vec<Call>,
    pub faults: EchoFaults,
    pub echo_addr: SocketAddr,
    rng: Rng,
    queue: BinaryHeap<Reverse<(u64, u64, Delivery)>>,
    order: u64,
    /// Per (call, k): the echo's emit time of the first copy, for exact-RTT bookkeeping.
    first_emit: BTreeMap<(usize, u64), u64>,
    /// Packets forwarded by the relay, per direction.
    pub forwarded: [u64; 2],
    buf: Vec<u8>,
}

impl Sim {
    pub fn new(config: RelayConfig, faults: EchoFaults, seed: u64) -> Self {
        let echo_addr = config.default_echo;
        Self {
            relay: Relay::new(config).expect("valid config"),
            now: MonoTime::from_nanos(1_000 * MS),
            calls: Vec::new(),
            faults,
            echo_addr,
            rng: Rng::new(seed),
            queue: BinaryHeap::new(),
            order: 0,
            first_emit: BTreeMap::new(),
            forwarded: [0; 2],
            buf: vec![0; 172],
        }
    }

    /// Opens a channel for a call of `packets` packets starting at `first_seq`, offset by
    /// `offset_ns` within the 20 ms period, with Asterisk's address given (or latched).
    pub fn add_call(
        &mut self,
        packets: u64,
        first_seq: u16,
        offset_ns: u64,
        give_asterisk: bool,
    ) -> usize {
        let i = self.calls.len();
        let channel = ChannelId::try_from(format!("call-{i}")).unwrap();
        let asterisk = SocketAddr::from(([127, 0, 0, 2], 10_000 + u16::try_from(i).unwrap()));
        let socket = open(
            &mut self.relay,
            self.now,
            AddChannel {
                channel: channel.clone(),
                port: 20_000 + u16::try_from(i).unwrap(),
                asterisk: give_asterisk.then_some(asterisk),
                echo: None,
                format: relay_proto::Format::Ulaw,
            },
        );
        let ssrc = Ssrc(u32::try_from(self.rng.next_u64() >> 32).unwrap());
        self.calls.push(Call {
            channel,
            socket,
            asterisk,
            ssrc,
            first_seq,
            packets,
            max_emitted: None,
            emitted: HashSet::new(),
            echo: EchoCounts::default(),
            returned: 0,
            imposed_rtt_ns: Vec::new(),
        });
        let start = self.now.as_nanos() + offset_ns;
        for k in 0..packets {
            self.schedule(start + k * PTIME_NS, Delivery::AsteriskSend { call: i, k });
        }
        i
    }

    fn schedule(&mut self, at: u64, d: Delivery) {
        self.order += 1;
        self.queue.push(Reverse((at, self.order, d)));
    }

    /// Runs until the queue is empty, running the relay's timer as it falls due.
    pub fn run(&mut self) {
        while let Some(Reverse((at, _, d))) = self.queue.pop() {
            self.advance_to(MonoTime::from_nanos(at));
            match d {
                Delivery::AsteriskSend { call, k } => self.asterisk_send(call, k),
                Delivery::EchoEmit { call, k, t0 } => self.echo_emit(call, k, t0),
            }
        }
    }

    /// Moves the clock to `t`, running every timer due on the way.
    pub fn advance_to(&mut self, t: MonoTime) {
        while let Some(due) = self.relay.poll_timeout() {
            if due > t {
                break;
            }
            self.now = self.now.max(due);
            self.relay.handle_timeout(self.now);
        }
        self.now = self.now.max(t);
    }

    fn packet(&mut self, call: usize, k: u64) -> Vec<u8> {
        let c = &self.calls[call];
        let h = RtpHeader {
            marker: k == 0,
            payload_type: 0,
            sequence: c.first_seq.wrapping_add(u16::try_from(k & 0xffff).unwrap()),
            timestamp: u32::try_from((160 * (k + 1)) & 0xffff_ffff).unwrap(),
            ssrc: c.ssrc,
        };
        let mut b = self.buf.clone();
        h.write(&mut b).unwrap();
        for (j, byte) in b[12..].iter_mut().enumerate() {
            *byte = (k as u8).wrapping_add(j as u8); // a recognisable pattern; truncation intended
        }
        b
    }

    fn asterisk_send(&mut self, call: usize, k: u64) {
        let bytes = self.packet(call, k);
        let (socket, from) = (self.calls[call].socket, self.calls[call].asterisk);
        match self.relay.handle_datagram(self.now, socket, from, &bytes) {
            Verdict::Forward { to, direction } => {
                assert_eq!(direction, Direction::ToEcho);
                assert_eq!(to, self.echo_addr);
                self.forwarded[0] += 1;
                self.echo_receive(call, k, &bytes);
            }
            Verdict::Drop(r) => panic!("Asterisk's packet dropped: {r:?}"),
        }
    }

    /// The echo decides the fate of packet `k`.
    fn echo_receive(&mut self, call: usize, k: u64, bytes: &[u8]) {
        let t0 = self.now.as_nanos();
        let f = self.faults.clone();
        let c = &mut self.calls[call];
        c.echo.received += 1;
        let exempt = k < f.clean_head || (f.clean_tail && k + 1 == c.packets);
        if !exempt && self.rng.chance(f.loss) {
            self.calls[call].echo.dropped += 1;
            return;
        }
        let jitter = if f.jitter.is_zero() {
            0
        } else {
            self.rng.below(u64::try_from(f.jitter.as_nanos()).unwrap())
        };
        let mut delay = u64::try_from(f.delay.as_nanos()).unwrap() + jitter;
        if !exempt && k + 2 < self.calls[call].packets && self.rng.chance(f.reorder) {
            delay += PTIME_NS + MS; // overtaken by the next packet
        }
        let copies = if !exempt && self.rng.chance(f.duplicate) {
            2
        } else {
            1
        };
        let _ = bytes;
        for copy in 0..copies {
            self.schedule(t0 + delay + copy, Delivery::EchoEmit { call, k, t0 });
        }
    }

    fn echo_emit(&mut self, call: usize, k: u64, t0: u64) {
        let bytes = self.packet(call, k);
        let c = &mut self.calls[call];
        // The echo's own accounting, in emission order.
        if c.emitted.insert(k) {
            c.echo.emitted += 1;
            if c.max_emitted.is_some_and(|m| k < m) {
                c.echo.reordered += 1;
            }
            c.max_emitted = Some(c.max_emitted.map_or(k, |m| m.max(k)));
            c.imposed_rtt_ns.push(self.now.as_nanos() - t0);
            self.first_emit.insert((call, k), self.now.as_nanos());
        } else {
            c.echo.duplicated += 1;
        }
        let (socket, asterisk) = (c.socket, c.asterisk);
        match self
            .relay
            .handle_datagram(self.now, socket, self.echo_addr, &bytes)
        {
            Verdict::Forward { to, direction } => {
                assert_eq!(direction, Direction::ToAsterisk);
                assert_eq!(to, asterisk, "echo must go back to Asterisk's address");
                self.forwarded[1] += 1;
                self.calls[call].returned += 1;
            }
            Verdict::Drop(r) => panic!("echo dropped: {r:?}"),
        }
    }

    /// Sends arbitrary bytes to a channel's socket from `from`.
    pub fn inject(&mut self, call: usize, from: SocketAddr, bytes: &[u8]) -> Verdict {
        let socket = self.calls[call].socket;
        self.relay.handle_datagram(self.now, socket, from, bytes)
    }

    /// Removes a call's channel and returns its final statistics.
    pub fn remove(&mut self, call: usize) -> relay_proto::ChannelStats {
        let channel = self.calls[call].channel.clone();
        match self.relay.handle_command(
            self.now,
            Command::Remove(relay_proto::control::RemoveChannel { channel }),
        ) {
            CommandOutcome::Close {
                reply: Ok(Response::Removed { stats, .. }),
                ..
            } => *stats,
            other => panic!("remove failed: {other:?}"),
        }
    }
}

/// Opens a channel through the two-step add, as a backend would (the bind always succeeds).
pub fn open(relay: &mut Relay, now: MonoTime, add: AddChannel) -> SocketId {
    let port = add.port;
    match relay.handle_command(now, Command::Add(add)) {
        CommandOutcome::Open(pending) => {
            let socket = pending.socket();
            match relay.complete_open(now, pending, Ok(port)) {
                Ok(Response::Added { socket: s, .. }) => assert_eq!(s, socket.0),
                other => panic!("add failed: {other:?}"),
            }
            socket
        }
        other => panic!("add refused: {other:?}"),
    }
}

/// A well-formed ulaw RTP packet.
pub fn rtp(seq: u16, ts: u32, ssrc: u32) -> Vec<u8> {
    let mut b = vec![0xffu8; 172];
    RtpHeader {
        marker: false,
        payload_type: 0,
        sequence: seq,
        timestamp: ts,
        ssrc: Ssrc(ssrc),
    }
    .write(&mut b)
    .unwrap();
    assert!(parse_rtp(&b).is_ok());
    b
}
