//! Sends in flight: what each forwarded datagram's kernel transmit stamp settles when it comes.
//!
//! The kernel stamps a send after it leaves and hands the stamp back later, with the id the send
//! carried (`SCM_TS_OPT_ID`). Each forwarded datagram takes a record here, and its id is the
//! record's place: a ring of `2^k` records indexed by the id's low bits, the high bits telling
//! one lap of the ring from the next, so a stamp finds its record in O(1), a stamp for a record
//! since reused is recognised, and nothing is allocated after creation.
//!
//! A record holds what the stamp settles: the datagram's channel (slot and the channel's tag, so
//! a stamp for a channel closed since is not charged to the next one in its slot), its arrival
//! (the forward time is stamp − arrival), its direction and, toward the echo, the (SSRC,
//! sequence) of its T0 entry. The datagrams of one GSO send (the shared echo leg) share one
//! stamp: their records are chained, and the send carries the first one's id.
//!
//! A record whose stamp has not come after the echo timeout, or whose place is needed by a new
//! send a lap later, is given up on: its stamp is *missing*, counted, and nothing is recorded for
//! it. Records are handed out in order, so a cursor sweeps them oldest first and stops at the
//! first that is still young, visiting each about once a lap.

use crate::rtp::Ssrc;
use crate::stats::Direction;
use crate::time::MonoTime;

/// Records in the ring: at 100,000 sends a second (1,000 channels both ways), 0.65 s of sends,
/// far more than the microseconds a stamp takes to come back.
pub const CAPACITY: usize = 1 << 16;
/// [`CAPACITY`] as an id distance.
const LAP: u32 = 1 << 16;
const _: () = assert!(LAP as usize == CAPACITY);

/// No next record in a chain.
const NONE: u32 = u32::MAX;

/// What a forwarded datagram's stamp settles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its channel's socket slot.
    pub socket: u32,
    /// Its channel's tag when it was sent (slot and generation).
    pub tag: u32,
    /// When it arrived (the kernel's receive stamp).
    pub arrival: MonoTime,
    /// Which way it went.
    pub direction: Direction,
    /// Toward the echo, an RTP packet: its T0 entry.
    pub t0: Option<(Ssrc, u16)>,
}

/// One place in the ring.
#[derive(Clone, Copy, Debug)]
struct Place {
    /// The id of the send this place holds now.
    id: u32,
    /// Whether it still waits for its stamp.
    waiting: bool,
    /// The next datagram of the same GSO send, or [`NONE`].
    next: u32,
    /// What it settles.
    record: Record,
}

/// The ring of sends in flight.
#[derive(Clone, Debug)]
pub struct Sends {
    /// `CAPACITY` places.
    places: Box<[Place]>,
    /// The id the next send takes (wrapping).
    next: u32,
    /// The oldest id the sweep has not passed.
    cursor: u32,
}

/// How a send's record ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Its stamp came.
    Stamped,
    /// Given up on: its stamp never came.
    Missing,
}

impl Sends {
    /// An empty ring.
    #[must_use]
    pub fn new() -> Self {
        let empty = Place {
            id: 0,
            waiting: false,
            next: NONE,
            record: Record {
                socket: 0,
                tag: 0,
                arrival: MonoTime::ZERO,
                direction: Direction::ToEcho,
                t0: None,
            },
        };
        Self {
            places: vec![empty; CAPACITY].into_boxed_slice(),
            next: 0,
            cursor: 0,
        }
    }

    fn index(id: u32) -> usize {
        id as usize & (CAPACITY - 1)
    }

    /// Takes a record for a datagram about to be sent; returns its id. If its place still waits
    /// from a lap ago, that send is given up on first, through `missing`.
    pub fn push(&mut self, record: Record, missing: impl FnMut(Record)) -> u32 {
        let id = self.next;
        if id == NONE {
            // NONE marks the end of a chain: never an id.
            self.next = 0;
            return self.push(record, missing);
        }
        self.next = id.wrapping_add(1);
        let i = Self::index(id);
        if self.places.get(i).is_some_and(|p| p.waiting) {
            self.give_up(i, missing);
        }
        if let Some(p) = self.places.get_mut(i) {
            *p = Place {
                id,
                waiting: true,
                next: NONE,
                record,
            };
        }
        // The sweep never looks further back than one lap.
        if self.next.wrapping_sub(self.cursor) > LAP {
            self.cursor = self.next.wrapping_sub(LAP);
        }
        id
    }

    /// Chains record `id` after record `prev` (both waiting): they go in one send whose stamp,
    /// reported for the chain's first id, settles both.
    pub fn chain(&mut self, prev: u32, id: u32) {
        if let Some(p) = self.waiting_mut(prev) {
            p.next = id;
        }
    }

    fn waiting_mut(&mut self, id: u32) -> Option<&mut Place> {
        self.places
            .get_mut(Self::index(id))
            .filter(|p| p.id == id && p.waiting)
    }

    /// The stamp for send `id` came: hands each record it settles (one, or a GSO send's chain)
    /// to `f`. False when no record waits for it (given up on already, or an id never handed
    /// out).
    pub fn settle(&mut self, id: u32, mut f: impl FnMut(Record)) -> bool {
        let mut at = id;
        let mut any = false;
        // A chain is never longer than the ring.
        for _ in 0..CAPACITY {
            let Some(p) = self.waiting_mut(at) else {
                break;
            };
            p.waiting = false;
            any = true;
            f(p.record);
            at = p.next;
            if at == NONE {
                break;
            }
        }
        any
    }

    /// Send `id` failed: its records wait no more and nothing is counted (it never left).
    pub fn cancel(&mut self, id: u32) -> bool {
        self.settle(id, |_| {})
    }

    /// Gives up on place `i` (and nothing else: each record of a chain is given up on its own).
    fn give_up(&mut self, i: usize, mut missing: impl FnMut(Record)) {
        if let Some(p) = self.places.get_mut(i) {
            if p.waiting {
                p.waiting = false;
                missing(p.record);
            }
        }
    }

    /// Gives up on every record that arrived at or before `deadline` and still waits, oldest
    /// first, stopping at the first younger one that waits. Hands each to `missing`.
    pub fn sweep(&mut self, deadline: MonoTime, mut missing: impl FnMut(Record)) {
        while self.cursor != self.next {
            let i = Self::index(self.cursor);
            let Some(p) = self.places.get(i) else { break };
            if p.id == self.cursor && p.waiting {
                if p.record.arrival > deadline {
                    break;
                }
                self.give_up(i, &mut missing);
            }
            self.cursor = self.cursor.wrapping_add(1);
        }
    }

    /// Records still waiting for their stamp (a scan: for tests and statistics).
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.places.iter().filter(|p| p.waiting).count()
    }
}

impl Default for Sends {
    fn default() -> Self {
        Self::new()
    }
}

/// The table of sends awaiting their transmit stamps: a stamp settles its record once; ids out of
/// range or never handed out settle nothing; a GSO chain is settled by its first id, a send
/// interleaved with it is not; the sweep gives up on old records only, idempotently, and a stamp
/// after that settles nothing; a place reused a lap later gives up on its old send, whose id is
/// then stale, and the sweep reaches back one lap at most; a place is 48 bytes; a cancelled send
/// counts nothing.
#[cfg(test)]
mod tests {
    use super::*;

    fn rec(socket: u32, at: u64) -> Record {
        Record {
            socket,
            tag: socket,
            arrival: MonoTime::from_nanos(at),
            direction: Direction::ToEcho,
            t0: Some((Ssrc(1), u16::try_from(at % 65_536).unwrap())),
        }
    }

    #[test]
    fn a_stamp_settles_its_record_once() {
        let mut s = Sends::new();
        let a = s.push(rec(1, 10), |_| panic!("nothing missing"));
        let b = s.push(rec(2, 20), |_| panic!("nothing missing"));
        let mut got = Vec::new();
        assert!(s.settle(b, |r| got.push(r)));
        assert!(!s.settle(b, |r| got.push(r)), "once");
        assert!(s.settle(a, |r| got.push(r)));
        assert_eq!(got, [rec(2, 20), rec(1, 10)]);
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn ids_out_of_range_or_never_handed_out_settle_nothing() {
        let mut s = Sends::new();
        let a = s.push(rec(1, 10), |_| {});
        for id in [a + 1, a + LAP, u32::MAX, 12_345] {
            assert!(!s.settle(id, |_| panic!("{id}")), "{id}");
        }
        assert_eq!(s.waiting(), 1);
    }

    #[test]
    fn a_chain_is_settled_by_its_first_id() {
        let mut s = Sends::new();
        let a = s.push(rec(1, 1), |_| {});
        let other = s.push(rec(9, 2), |_| {});
        let b = s.push(rec(2, 3), |_| {});
        let c = s.push(rec(3, 4), |_| {});
        s.chain(a, b);
        s.chain(b, c);
        let mut got = Vec::new();
        assert!(s.settle(a, |r| got.push(r.socket)));
        assert_eq!(got, [1, 2, 3]);
        assert_eq!(s.waiting(), 1, "the interleaved send is not part of it");
        assert!(s.settle(other, |_| {}));
    }

    #[test]
    fn the_sweep_gives_up_on_old_records_only() {
        let mut s = Sends::new();
        let ids: Vec<u32> = (0..5)
            .map(|k| s.push(rec(k, u64::from(k) * 10), |_| {}))
            .collect();
        assert!(s.settle(ids[1], |_| {}));
        let mut missing = Vec::new();
        s.sweep(MonoTime::from_nanos(25), |r| missing.push(r.socket));
        assert_eq!(missing, [0, 2], "settled 1 skipped, 3 and 4 too young");
        s.sweep(MonoTime::from_nanos(25), |_| panic!("idempotent"));
        assert!(
            !s.settle(ids[0], |_| {}),
            "a stamp after giving up settles nothing"
        );
        assert!(s.settle(ids[3], |_| {}));
        s.sweep(MonoTime::from_nanos(1_000), |r| missing.push(r.socket));
        assert_eq!(missing, [0, 2, 4]);
    }

    #[test]
    fn a_place_needed_a_lap_later_is_given_up_on_and_its_old_id_is_stale() {
        let mut s = Sends::new();
        let first = s.push(rec(7, 0), |_| {});
        let mut missing = Vec::new();
        for k in 1..=CAPACITY as u64 {
            let _ = s.push(rec(1, k), |r| missing.push(r.socket));
        }
        assert_eq!(missing, [7]);
        assert!(!s.settle(first, |_| {}), "its place holds a newer send");
        // The sweep starts no further back than one lap.
        let mut swept = 0;
        s.sweep(MonoTime::from_nanos(u64::MAX), |_| swept += 1);
        assert_eq!(swept, CAPACITY);
    }

    #[test]
    fn a_place_is_forty_eight_bytes() {
        assert_eq!(
            size_of::<Place>(),
            48,
            "3 MiB a shard, as docs/measurement.md says"
        );
    }

    #[test]
    fn a_cancelled_send_counts_nothing() {
        let mut s = Sends::new();
        let a = s.push(rec(1, 0), |_| {});
        assert!(s.cancel(a));
        s.sweep(MonoTime::from_nanos(u64::MAX), |_| panic!("cancelled"));
    }
}
