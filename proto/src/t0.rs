//! The T0 table: when each packet left for the echo, so its echo's round trip can be measured.
//!
//! One per channel, a ring of `2^k` slots indexed by the low bits of the sequence number, each
//! holding (SSRC, sequence, T0, T1, state). Every operation touches exactly one slot: O(1), no
//! scan, no allocation after creation. The default 1024 slots cover 20.48 s of a 50 packet/s
//! stream, at 24 bytes a slot (24 KiB a channel).
//!
//! T0 is the kernel's transmit stamp of the packet, which comes back from the kernel after the
//! send, and may come after the packet's echo (the two reach the relay by separate paths). So an
//! entry is inserted *sent* when the packet is forwarded, becomes *pending* when its stamp
//! arrives ([`T0Table::stamp`]), and an echo that finds it still *sent* keeps its T1 until the
//! stamp comes (*returned*). Either order gives the same round trip, T1 − T0, measured once.
//!
//! Every entry ends exactly one way, which makes the counts exact:
//! - *answered*: its echo arrived (matching SSRC and sequence) before the echo timeout and both
//!   stamps make a positive round trip, measured once. A second echo of it is a *duplicate*.
//! - *unmeasured*: its echo came back, but its round trip cannot be timed: its transmit stamp
//!   never came ([`T0Table::unstamped`]), or T1 is not after T0. Not lost, not measured.
//! - *timed out*: the sweep found it unanswered after the echo timeout, or a newer packet needed
//!   its slot, or the channel closed. An echo arriving after that is *late* and not measured.
//!
//! Expiry is amortised: a cursor follows the insertion point around the ring, and
//! [`T0Table::sweep`] (called from the relay's timer) advances it over entries older than the
//! timeout, stopping at the first that is still young, so each slot is visited about once a lap.

use crate::rtp::Ssrc;
use crate::time::MonoTime;

/// What an entry is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    /// Never used.
    Empty,
    /// Forwarded toward the echo; neither its transmit stamp nor its echo yet (`t0` holds its
    /// arrival, for the timeout).
    Sent,
    /// Its transmit stamp is `t0`; no echo yet.
    Pending,
    /// Its echo arrived at `t1` before its transmit stamp.
    Returned,
    /// Its transmit stamp will never come (`t0` holds its arrival); no echo yet.
    Unstamped,
    /// Its echo arrived and was measured.
    Answered,
    /// Its echo arrived but could not be timed.
    Unmeasured,
    /// No echo within the timeout.
    TimedOut,
}

/// One packet sent to the echo. 24 bytes.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// When the packet left for the echo (its transmit stamp), in nanoseconds of the monotonic
    /// clock; before the stamp came, when it arrived from Asterisk.
    t0: u64,
    /// When its echo arrived, while it waits for its stamp ([`State::Returned`]).
    t1: u64,
    /// The packet's source.
    ssrc: u32,
    /// The packet's sequence number.
    seq: u16,
    /// What the entry is waiting for.
    state: State,
}

const EMPTY: Slot = Slot {
    t0: 0,
    t1: 0,
    ssrc: 0,
    seq: 0,
    state: State::Empty,
};

/// The outcome of recording a packet sent to the echo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Insert {
    /// Recorded.
    Recorded,
    /// Recorded in a slot whose previous entry was still unanswered: that one timed out.
    Overwrote,
    /// Recorded in a slot whose previous entry had its echo back but was still waiting for its
    /// transmit stamp: that echo is unmeasured, for want of the stamp.
    OverwroteReturned,
    /// The same packet is already waiting for its echo; its first entry is kept.
    AlreadyPending,
}

/// The outcome of an echo's arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Lookup {
    /// The first echo of a packet: its round trip in nanoseconds (positive).
    Matched {
        /// T1 − T0.
        rtt_ns: u64,
    },
    /// The first echo of a packet whose transmit stamp has not come yet: its T1 is kept and the
    /// round trip is settled by [`T0Table::stamp`] (or [`T0Table::unstamped`]).
    AwaitingStamp,
    /// The first echo of a packet whose T0 is not before T1: not measured.
    NotPositive,
    /// The first echo of a packet whose transmit stamp never came: not measured.
    Unstamped,
    /// A further echo of a packet already answered.
    Duplicate,
    /// The echo of a packet that had already timed out.
    Late,
    /// No record of this packet (never sent, or its slot has since been reused).
    Unknown,
}

/// The outcome of a transmit stamp's arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Stamp {
    /// The packet now waits for its echo with this T0.
    Waiting,
    /// Its echo had come already: the round trip, in nanoseconds (positive).
    Matched {
        /// T1 − T0.
        rtt_ns: u64,
    },
    /// Its echo had come already, at or before this T0: not measured.
    NotPositive,
    /// The entry is no longer this packet's, or no longer waits for a stamp.
    Gone,
}

/// The outcome of giving up on a packet's transmit stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Unstamped {
    /// Its echo had come already: an echo that cannot be measured.
    Returned,
    /// It still waits for its echo, which will not be measured.
    Waiting,
    /// The entry is no longer this packet's, or had its stamp.
    Gone,
}

/// The per-channel ring of T0 entries.
#[derive(Clone, Debug)]
pub struct T0Table {
    /// `2^k` slots, indexed by `sequence & mask`.
    slots: Box<[Slot]>,
    /// `slots.len() − 1`.
    mask: usize,
    /// Slot of the newest insert; the sweep never passes it.
    head: usize,
    /// Next slot the sweep examines.
    cursor: usize,
}

impl T0Table {
    /// A table of `slots` entries, rounded up to a power of two in 1..=65536.
    #[must_use]
    pub fn new(slots: usize) -> Self {
        let len = slots.clamp(1, 1 << 16).next_power_of_two();
        Self {
            slots: vec![EMPTY; len].into_boxed_slice(),
            mask: len - 1,
            head: 0,
            cursor: 0,
        }
    }

    /// Number of slots.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The slot of packet (`ssrc`, `seq`), if it holds that packet.
    fn find(&mut self, ssrc: Ssrc, seq: u16) -> Option<&mut Slot> {
        let i = usize::from(seq) & self.mask;
        self.slots
            .get_mut(i)
            .filter(|s| s.ssrc == ssrc.0 && s.seq == seq && s.state != State::Empty)
    }

    /// Records that packet (`ssrc`, `seq`), which arrived from Asterisk at `arrival`, was
    /// forwarded to the echo; its T0 comes with [`T0Table::stamp`].
    pub fn insert(&mut self, arrival: MonoTime, ssrc: Ssrc, seq: u16) -> Insert {
        let i = usize::from(seq) & self.mask;
        let Some(slot) = self.slots.get_mut(i) else {
            return Insert::Recorded; // unreachable: i ≤ mask < len
        };
        let waiting = matches!(
            slot.state,
            State::Sent | State::Pending | State::Returned | State::Unstamped
        );
        if waiting && slot.ssrc == ssrc.0 && slot.seq == seq {
            return Insert::AlreadyPending;
        }
        // A returned entry still waiting for its stamp came back: not a timeout, but never to
        // be measured now.
        let outcome = match slot.state {
            State::Sent | State::Pending | State::Unstamped => Insert::Overwrote,
            State::Returned => Insert::OverwroteReturned,
            _ => Insert::Recorded,
        };
        *slot = Slot {
            t0: arrival.as_nanos(),
            t1: 0,
            ssrc: ssrc.0,
            seq,
            state: State::Sent,
        };
        self.head = i;
        outcome
    }

    /// Packet (`ssrc`, `seq`) left for the echo at `t0` (its transmit stamp, or with estimated
    /// times the moment its send was taken to leave).
    pub fn stamp(&mut self, ssrc: Ssrc, seq: u16, t0: MonoTime) -> Stamp {
        let Some(slot) = self.find(ssrc, seq) else {
            return Stamp::Gone;
        };
        match slot.state {
            State::Sent => {
                slot.t0 = t0.as_nanos();
                slot.state = State::Pending;
                Stamp::Waiting
            }
            State::Returned => {
                slot.t0 = t0.as_nanos();
                if slot.t1 > slot.t0 {
                    slot.state = State::Answered;
                    Stamp::Matched {
                        rtt_ns: slot.t1 - slot.t0,
                    }
                } else {
                    slot.state = State::Unmeasured;
                    Stamp::NotPositive
                }
            }
            _ => Stamp::Gone,
        }
    }

    /// The transmit stamp of packet (`ssrc`, `seq`) will never come.
    pub fn unstamped(&mut self, ssrc: Ssrc, seq: u16) -> Unstamped {
        let Some(slot) = self.find(ssrc, seq) else {
            return Unstamped::Gone;
        };
        match slot.state {
            State::Sent => {
                slot.state = State::Unstamped;
                Unstamped::Waiting
            }
            State::Returned => {
                slot.state = State::Unmeasured;
                Unstamped::Returned
            }
            _ => Unstamped::Gone,
        }
    }

    /// Matches an echo of packet (`ssrc`, `seq`) arriving at `now` (its T1).
    pub fn lookup(&mut self, now: MonoTime, ssrc: Ssrc, seq: u16) -> Lookup {
        let Some(slot) = self.find(ssrc, seq) else {
            return Lookup::Unknown;
        };
        match slot.state {
            State::Pending if now.as_nanos() > slot.t0 => {
                slot.state = State::Answered;
                Lookup::Matched {
                    rtt_ns: now.as_nanos() - slot.t0,
                }
            }
            State::Pending => {
                slot.state = State::Unmeasured;
                Lookup::NotPositive
            }
            State::Sent => {
                slot.t1 = now.as_nanos();
                slot.state = State::Returned;
                Lookup::AwaitingStamp
            }
            State::Unstamped => {
                slot.state = State::Unmeasured;
                Lookup::Unstamped
            }
            State::Answered | State::Unmeasured | State::Returned => Lookup::Duplicate,
            State::TimedOut => Lookup::Late,
            State::Empty => Lookup::Unknown,
        }
    }

    /// Times out entries sent at or before `deadline` (now − echo timeout) and still unanswered,
    /// walking from the oldest toward the newest and stopping at the first one still waiting
    /// within the timeout. Returns how many timed out. An entry whose echo came back while it
    /// waits for its stamp is not timed out: [`T0Table::unstamped`] settles it.
    pub fn sweep(&mut self, deadline: MonoTime) -> u64 {
        let mut expired = 0;
        for _ in 0..self.slots.len() {
            let Some(slot) = self.slots.get_mut(self.cursor) else {
                break;
            };
            if matches!(slot.state, State::Sent | State::Pending | State::Unstamped) {
                if slot.t0 > deadline.as_nanos() {
                    break;
                }
                slot.state = State::TimedOut;
                expired += 1;
            }
            if self.cursor == self.head {
                break;
            }
            self.cursor = (self.cursor + 1) & self.mask;
        }
        expired
    }

    /// The channel is closing: every entry still waiting for its echo times out, and every echo
    /// still waiting for its stamp is unmeasured. Returns (timed out, unmeasured).
    pub fn expire_all(&mut self) -> (u64, u64) {
        let (mut expired, mut unmeasured) = (0, 0);
        for slot in &mut self.slots {
            match slot.state {
                State::Sent | State::Pending | State::Unstamped => {
                    slot.state = State::TimedOut;
                    expired += 1;
                }
                State::Returned => {
                    slot.state = State::Unmeasured;
                    unmeasured += 1;
                }
                _ => {}
            }
        }
        (expired, unmeasured)
    }

    /// Entries waiting for their echo (a scan: for statistics, not the packet path).
    #[must_use]
    pub fn pending(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| matches!(s.state, State::Sent | State::Pending | State::Unstamped))
            .count() as u64
    }
}

/// The T0 table: a slot is 24 bytes, the capacity a power of two (at most 65,536); an echo is
/// measured once, and its transmit stamp may come before it or after it (the same round trip); a
/// round trip that is not positive is not measured; a stamp that never comes leaves the echo
/// unmeasured; an echo must match SSRC and sequence; a resend keeps the first T0; overwriting an
/// unanswered entry is a timeout, overwriting a returned echo says so; the sweep times out old
/// entries and stops at young ones, leaves a returned echo to its stamp and follows the ring
/// around.
#[cfg(test)]
mod tests {
    use super::*;

    const S: Ssrc = Ssrc(0x1234);

    fn t(ns: u64) -> MonoTime {
        MonoTime::from_nanos(ns)
    }

    /// Inserts and stamps at once, as with a packet whose stamp came before anything else.
    fn sent(tab: &mut T0Table, at: u64, seq: u16) -> Insert {
        let r = tab.insert(t(at), S, seq);
        assert_eq!(tab.stamp(S, seq, t(at)), Stamp::Waiting);
        r
    }

    #[test]
    fn slot_is_twenty_four_bytes() {
        assert_eq!(size_of::<Slot>(), 24);
    }

    #[test]
    fn capacity_rounds_to_a_power_of_two() {
        assert_eq!(T0Table::new(1000).capacity(), 1024);
        assert_eq!(T0Table::new(0).capacity(), 1);
        assert_eq!(T0Table::new(1 << 20).capacity(), 1 << 16);
    }

    #[test]
    fn echo_is_measured_once() {
        let mut tab = T0Table::new(16);
        assert_eq!(sent(&mut tab, 100, 7), Insert::Recorded);
        assert_eq!(tab.lookup(t(350), S, 7), Lookup::Matched { rtt_ns: 250 });
        assert_eq!(tab.lookup(t(400), S, 7), Lookup::Duplicate);
    }

    #[test]
    fn a_stamp_after_the_echo_gives_the_same_round_trip() {
        let mut tab = T0Table::new(16);
        assert_eq!(tab.insert(t(90), S, 7), Insert::Recorded);
        assert_eq!(tab.lookup(t(350), S, 7), Lookup::AwaitingStamp);
        assert_eq!(tab.lookup(t(360), S, 7), Lookup::Duplicate);
        assert_eq!(tab.stamp(S, 7, t(100)), Stamp::Matched { rtt_ns: 250 });
        assert_eq!(tab.stamp(S, 7, t(100)), Stamp::Gone, "settled once");
        assert_eq!(tab.lookup(t(400), S, 7), Lookup::Duplicate);
    }

    #[test]
    fn a_round_trip_that_is_not_positive_is_not_measured() {
        let mut tab = T0Table::new(16);
        // Echo first, then a stamp at or after it.
        let _ = tab.insert(t(0), S, 1);
        assert_eq!(tab.lookup(t(100), S, 1), Lookup::AwaitingStamp);
        assert_eq!(tab.stamp(S, 1, t(100)), Stamp::NotPositive);
        assert_eq!(tab.lookup(t(200), S, 1), Lookup::Duplicate);
        // Stamp first, then an echo at or before it.
        let _ = tab.insert(t(0), S, 2);
        assert_eq!(tab.stamp(S, 2, t(300)), Stamp::Waiting);
        assert_eq!(tab.lookup(t(300), S, 2), Lookup::NotPositive);
        assert_eq!(tab.lookup(t(400), S, 2), Lookup::Duplicate);
    }

    #[test]
    fn a_stamp_that_never_comes_leaves_the_echo_unmeasured() {
        let mut tab = T0Table::new(16);
        let _ = tab.insert(t(0), S, 1);
        assert_eq!(tab.lookup(t(100), S, 1), Lookup::AwaitingStamp);
        assert_eq!(tab.unstamped(S, 1), Unstamped::Returned);
        assert_eq!(tab.stamp(S, 1, t(50)), Stamp::Gone, "too late");
        let _ = tab.insert(t(0), S, 2);
        assert_eq!(tab.unstamped(S, 2), Unstamped::Waiting);
        assert_eq!(tab.lookup(t(100), S, 2), Lookup::Unstamped);
        assert_eq!(tab.lookup(t(100), S, 2), Lookup::Duplicate);
        assert_eq!(tab.unstamped(S, 3), Unstamped::Gone);
        let _ = sent(&mut tab, 0, 4);
        assert_eq!(tab.unstamped(S, 4), Unstamped::Gone, "it had its stamp");
    }

    #[test]
    fn echo_must_match_ssrc_and_sequence() {
        let mut tab = T0Table::new(16);
        let _ = sent(&mut tab, 0, 7);
        assert_eq!(tab.lookup(t(1), Ssrc(9), 7), Lookup::Unknown);
        assert_eq!(
            tab.lookup(t(1), S, 7 + 16),
            Lookup::Unknown,
            "same slot, other seq"
        );
        assert_eq!(tab.lookup(t(1), S, 8), Lookup::Unknown);
        assert_eq!(tab.stamp(Ssrc(9), 7, t(1)), Stamp::Gone);
        assert_eq!(tab.lookup(t(2), S, 7), Lookup::Matched { rtt_ns: 2 });
    }

    #[test]
    fn resend_keeps_the_first_t0() {
        let mut tab = T0Table::new(16);
        let _ = sent(&mut tab, 10, 3);
        assert_eq!(tab.insert(t(20), S, 3), Insert::AlreadyPending);
        assert_eq!(tab.lookup(t(30), S, 3), Lookup::Matched { rtt_ns: 20 });
    }

    #[test]
    fn overwriting_an_unanswered_entry_is_a_timeout() {
        let mut tab = T0Table::new(4);
        let _ = sent(&mut tab, 0, 1);
        assert_eq!(sent(&mut tab, 1, 5), Insert::Overwrote);
        let _ = tab.lookup(t(2), S, 5);
        assert_eq!(
            sent(&mut tab, 3, 9),
            Insert::Recorded,
            "answered entry: no timeout"
        );
        assert_eq!(tab.lookup(t(4), S, 1), Lookup::Unknown);
    }

    #[test]
    fn sweep_times_out_old_entries_and_stops_at_young_ones() {
        let mut tab = T0Table::new(8);
        for seq in 0..6u16 {
            let _ = sent(&mut tab, u64::from(seq) * 10, seq);
        }
        let _ = tab.lookup(t(55), S, 1);
        // Entries sent at 0, 20, 30 are unanswered and at or before the deadline 30.
        assert_eq!(tab.sweep(t(30)), 3);
        assert_eq!(tab.sweep(t(30)), 0, "idempotent");
        assert_eq!(tab.lookup(t(60), S, 2), Lookup::Late);
        assert_eq!(tab.lookup(t(60), S, 4), Lookup::Matched { rtt_ns: 20 });
        assert_eq!(tab.sweep(t(1_000)), 1, "only seq 5 is left");
        assert_eq!(tab.pending(), 0);
    }

    #[test]
    fn overwriting_a_returned_echo_says_so() {
        let mut tab = T0Table::new(4);
        let _ = tab.insert(t(0), S, 1);
        assert_eq!(tab.lookup(t(5), S, 1), Lookup::AwaitingStamp);
        assert_eq!(tab.insert(t(10), S, 5), Insert::OverwroteReturned);
        assert_eq!(tab.stamp(S, 1, t(2)), Stamp::Gone);
    }

    #[test]
    fn sweep_leaves_a_returned_echo_to_its_stamp() {
        let mut tab = T0Table::new(8);
        let _ = tab.insert(t(0), S, 0);
        let _ = tab.insert(t(0), S, 1);
        assert_eq!(tab.lookup(t(5), S, 0), Lookup::AwaitingStamp);
        assert_eq!(tab.sweep(t(100)), 1, "seq 1 never came back");
        assert_eq!(tab.stamp(S, 0, t(2)), Stamp::Matched { rtt_ns: 3 });
        let _ = tab.insert(t(200), S, 2);
        assert_eq!(tab.lookup(t(205), S, 2), Lookup::AwaitingStamp);
        assert_eq!(
            tab.expire_all(),
            (0, 1),
            "closing: the returned echo is unmeasured"
        );
    }

    #[test]
    fn sweep_follows_the_ring_around() {
        let mut tab = T0Table::new(4);
        let mut timed_out = 0;
        for seq in 0..100u16 {
            let now = u64::from(seq) * 10;
            let _ = sent(&mut tab, now, seq);
            timed_out += tab.sweep(t(now.saturating_sub(15)));
        }
        // Every entry but the two newest (within 15 of the last) timed out through the sweep.
        assert_eq!(timed_out, 98);
        assert_eq!(tab.expire_all(), (2, 0));
    }
}
