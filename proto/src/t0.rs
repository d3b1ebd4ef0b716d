//! The T0 table: when each packet left for the echo, so its echo's round trip can be measured.
//!
//! One per channel, a ring of `2^k` slots indexed by the low bits of the sequence number, each
//! holding (SSRC, sequence, T0, state). Insert and lookup touch exactly one slot: O(1), no scan, no
//! allocation after creation. The default 1024 slots cover 20.48 s of a 50 packet/s stream, at
//! 16 bytes a slot (16 KiB a channel).
//!
//! Every entry ends exactly one way, which makes the counts exact:
//! - *answered*: its echo arrived (matching SSRC and sequence) before the echo timeout; the round
//!   trip is measured once. A second echo of it is a *duplicate*, not measured again.
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
    /// Sent to the echo; no echo yet.
    Pending,
    /// Its echo arrived and was measured.
    Answered,
    /// No echo within the timeout.
    TimedOut,
}

/// One packet sent to the echo. 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// When the packet left for the echo, in nanoseconds of the monotonic clock.
    t0: u64,
    /// The packet's source.
    ssrc: u32,
    /// The packet's sequence number.
    seq: u16,
    /// What the entry is waiting for.
    state: State,
}

const EMPTY: Slot = Slot {
    t0: 0,
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
    /// The same packet is already waiting for its echo; its first T0 is kept.
    AlreadyPending,
}

/// The outcome of an echo's arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Lookup {
    /// The first echo of a packet: its round trip in nanoseconds.
    Matched {
        /// T1 − T0.
        rtt_ns: u64,
    },
    /// A further echo of a packet already answered.
    Duplicate,
    /// The echo of a packet that had already timed out.
    Late,
    /// No record of this packet (never sent, or its slot has since been reused).
    Unknown,
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

    /// Records that packet (`ssrc`, `seq`) left for the echo at `now`.
    pub fn insert(&mut self, now: MonoTime, ssrc: Ssrc, seq: u16) -> Insert {
        let i = usize::from(seq) & self.mask;
        let Some(slot) = self.slots.get_mut(i) else {
            return Insert::Recorded; // unreachable: i ≤ mask < len
        };
        let outcome = match slot.state {
            State::Pending if slot.ssrc == ssrc.0 && slot.seq == seq => {
                return Insert::AlreadyPending
            }
            State::Pending => Insert::Overwrote,
            State::Empty | State::Answered | State::TimedOut => Insert::Recorded,
        };
        *slot = Slot {
            t0: now.as_nanos(),
            ssrc: ssrc.0,
            seq,
            state: State::Pending,
        };
        self.head = i;
        outcome
    }

    /// Moves the T0 of packet (`ssrc`, `seq`), still pending, to `t0`: the moment its send was
    /// actually submitted, known only after [`T0Table::insert`] (the backend submits a batch's
    /// sends together). False when the entry is no longer this packet's or no longer pending.
    pub fn restamp(&mut self, ssrc: Ssrc, seq: u16, t0: MonoTime) -> bool {
        let i = usize::from(seq) & self.mask;
        match self.slots.get_mut(i) {
            Some(slot)
                if slot.ssrc == ssrc.0 && slot.seq == seq && slot.state == State::Pending =>
            {
                slot.t0 = t0.as_nanos();
                true
            }
            _ => false,
        }
    }

    /// Matches an echo of packet (`ssrc`, `seq`) arriving at `now`.
    pub fn lookup(&mut self, now: MonoTime, ssrc: Ssrc, seq: u16) -> Lookup {
        let i = usize::from(seq) & self.mask;
        let Some(slot) = self.slots.get_mut(i) else {
            return Lookup::Unknown;
        };
        if slot.ssrc != ssrc.0 || slot.seq != seq {
            return Lookup::Unknown;
        }
        match slot.state {
            State::Pending => {
                slot.state = State::Answered;
                Lookup::Matched {
                    rtt_ns: now.as_nanos().saturating_sub(slot.t0),
                }
            }
            State::Answered => Lookup::Duplicate,
            State::TimedOut => Lookup::Late,
            State::Empty => Lookup::Unknown,
        }
    }

    /// Times out entries sent at or before `deadline` (now − echo timeout) and still unanswered,
    /// walking from the oldest toward the newest and stopping at the first one still waiting
    /// within the timeout. Returns how many timed out.
    pub fn sweep(&mut self, deadline: MonoTime) -> u64 {
        let mut expired = 0;
        for _ in 0..self.slots.len() {
            let Some(slot) = self.slots.get_mut(self.cursor) else {
                break;
            };
            if slot.state == State::Pending {
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

    /// Times out every entry still waiting (the channel is closing). Returns how many.
    pub fn expire_all(&mut self) -> u64 {
        let mut expired = 0;
        for slot in &mut self.slots {
            if slot.state == State::Pending {
                slot.state = State::TimedOut;
                expired += 1;
            }
        }
        expired
    }

    /// Entries waiting for their echo (a scan: for statistics, not the packet path).
    #[must_use]
    pub fn pending(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.state == State::Pending)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Ssrc = Ssrc(0x1234);

    fn t(ns: u64) -> MonoTime {
        MonoTime::from_nanos(ns)
    }

    #[test]
    fn slot_is_sixteen_bytes() {
        assert_eq!(size_of::<Slot>(), 16);
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
        assert_eq!(tab.insert(t(100), S, 7), Insert::Recorded);
        assert_eq!(tab.lookup(t(350), S, 7), Lookup::Matched { rtt_ns: 250 });
        assert_eq!(tab.lookup(t(400), S, 7), Lookup::Duplicate);
    }

    #[test]
    fn echo_must_match_ssrc_and_sequence() {
        let mut tab = T0Table::new(16);
        let _ = tab.insert(t(0), S, 7);
        assert_eq!(tab.lookup(t(1), Ssrc(9), 7), Lookup::Unknown);
        assert_eq!(
            tab.lookup(t(1), S, 7 + 16),
            Lookup::Unknown,
            "same slot, other seq"
        );
        assert_eq!(tab.lookup(t(1), S, 8), Lookup::Unknown);
        assert_eq!(tab.lookup(t(2), S, 7), Lookup::Matched { rtt_ns: 2 });
    }

    #[test]
    fn resend_keeps_the_first_t0() {
        let mut tab = T0Table::new(16);
        let _ = tab.insert(t(10), S, 3);
        assert_eq!(tab.insert(t(20), S, 3), Insert::AlreadyPending);
        assert_eq!(tab.lookup(t(30), S, 3), Lookup::Matched { rtt_ns: 20 });
    }

    #[test]
    fn overwriting_an_unanswered_entry_is_a_timeout() {
        let mut tab = T0Table::new(4);
        let _ = tab.insert(t(0), S, 1);
        assert_eq!(tab.insert(t(1), S, 5), Insert::Overwrote);
        let _ = tab.lookup(t(2), S, 5);
        assert_eq!(
            tab.insert(t(3), S, 9),
            Insert::Recorded,
            "answered entry: no timeout"
        );
        assert_eq!(tab.lookup(t(4), S, 1), Lookup::Unknown);
    }

    #[test]
    fn sweep_times_out_old_entries_and_stops_at_young_ones() {
        let mut tab = T0Table::new(8);
        for seq in 0..6u16 {
            let _ = tab.insert(t(u64::from(seq) * 10), S, seq);
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
    fn sweep_follows_the_ring_around() {
        let mut tab = T0Table::new(4);
        let mut timed_out = 0;
        for seq in 0..100u16 {
            let now = u64::from(seq) * 10;
            let _ = tab.insert(t(now), S, seq);
            timed_out += tab.sweep(t(now.saturating_sub(15)));
        }
        // Every entry but the two newest (within 15 of the last) timed out through the sweep.
        assert_eq!(timed_out, 98);
        assert_eq!(tab.expire_all(), 2);
    }
}
