//! Reflections in flight: what each send's kernel transmit stamp settles when it comes back.
//!
//! Every reflection the echo sends carries a stamp id (`SCM_TS_OPT_ID`), and the kernel hands the
//! send's transmit stamp back later with that id. The id is a place in a fixed ring of
//! [`CAPACITY`] places, indexed by its low bits (the high bits tell one lap of the ring from the
//! next), so a stamp finds what it settles in O(1), a stamp for a place since reused (or an id
//! never handed out) is recognised as stale, and nothing is allocated after creation.
//!
//! A place holds a *run*: datagrams of one send that arrived together (their kernel receive
//! stamp), and how many. A plain send is one run of one datagram; a GSO send reflecting a
//! coalesced receive is one run of all its datagrams; a GSO send of regathered datagrams is a
//! chain of runs (the send carries the first one's id, and its one stamp settles the chain).
//!
//! Every run ends exactly one way: *settled* by its stamp (the hold is recorded when positive,
//! counted missing when not), *missing* (its send failed, its stamp did not come within the
//! sweep's deadline, its place was needed a lap later, or the echo stopped first), or
//! *cancelled* (the send was never queued: nothing counted).

/// Places in the ring: a stamp comes back microseconds after its send, and a batch of the loop
/// queues at most a few thousand sends, so 16,384 places are never reused while still waiting in
/// practice (if one is, its run is counted missing).
pub(crate) const CAPACITY: usize = CAPACITY_IDS as usize;
/// [`CAPACITY`], as ids count.
const CAPACITY_IDS: u32 = 1 << 14;

/// No next place in a chain.
const NONE: u32 = u32::MAX;

/// Datagrams of one send that arrived together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    /// Their arrival on the echo's clock (the kernel's receive stamp); `None` when the receive
    /// stamp could not be converted (a step of the wall clock), so no hold can be taken.
    pub(crate) arrival: Option<u64>,
    /// How many datagrams.
    pub(crate) count: u64,
}

/// One place of the ring.
#[derive(Clone, Copy, Debug)]
struct Place {
    /// The id of the send this place holds now.
    id: u32,
    /// Whether it still waits for its stamp.
    waiting: bool,
    /// The next run of the same send, or [`NONE`].
    next: u32,
    /// When it was queued (echo clock), for the sweep.
    queued: u64,
    /// What it settles.
    run: Run,
}

/// The ring of reflections waiting for their transmit stamps.
#[derive(Debug)]
pub(crate) struct Flights {
    /// [`CAPACITY`] places.
    places: Box<[Place]>,
    /// The id the next run takes (wrapping, never [`NONE`]).
    next: u32,
    /// The oldest id the sweep has not passed.
    cursor: u32,
    /// Runs waiting.
    waiting: usize,
}

impl Flights {
    /// An empty ring.
    pub(crate) fn new() -> Self {
        let empty = Place {
            id: 0,
            waiting: false,
            next: NONE,
            queued: 0,
            run: Run {
                arrival: None,
                count: 0,
            },
        };
        Self {
            places: vec![empty; CAPACITY].into_boxed_slice(),
            next: 0,
            cursor: 0,
            waiting: 0,
        }
    }

    fn index(id: u32) -> usize {
        id as usize & (CAPACITY - 1)
    }

    /// Takes a place for `run`, about to be queued at `queued`; returns its id. If the place still
    /// waits from a lap ago, that run is given up on first, through `missing`.
    pub(crate) fn push(&mut self, run: Run, queued: u64, mut missing: impl FnMut(Run)) -> u32 {
        if self.next == NONE {
            self.next = 0;
        }
        let id = self.next;
        self.next = id.wrapping_add(1);
        let i = Self::index(id);
        if let Some(p) = self.places.get_mut(i) {
            if p.waiting {
                p.waiting = false;
                self.waiting -= 1;
                missing(p.run);
            }
            *p = Place {
                id,
                waiting: true,
                next: NONE,
                queued,
                run,
            };
            self.waiting += 1;
        }
        // The sweep never looks further back than one lap.
        if self.next.wrapping_sub(self.cursor) > CAPACITY_IDS {
            self.cursor = self.next.wrapping_sub(CAPACITY_IDS);
        }
        id
    }

    fn waiting_mut(&mut self, id: u32) -> Option<&mut Place> {
        self.places
            .get_mut(Self::index(id))
            .filter(|p| p.id == id && p.waiting)
    }

    /// Chains run `id` after run `prev` (both waiting): they leave in one send.
    pub(crate) fn chain(&mut self, prev: u32, id: u32) {
        if let Some(p) = self.waiting_mut(prev) {
            p.next = id;
        }
    }

    /// Adds `count` datagrams to waiting run `id` (more of the same arrival in the same send).
    /// False when `id` no longer waits.
    pub(crate) fn grow(&mut self, id: u32, count: u64) -> bool {
        match self.waiting_mut(id) {
            Some(p) => {
                p.run.count += count;
                true
            }
            None => false,
        }
    }

    /// The send that carried `id` is done with: hands each run it settles (one, or a chain) to
    /// `f`. False when no run waits for that id (settled or given up on already, or never handed
    /// out): a stale stamp.
    pub(crate) fn settle(&mut self, id: u32, mut f: impl FnMut(Run)) -> bool {
        let mut at = id;
        let mut any = false;
        // A chain is never longer than the ring.
        for _ in 0..CAPACITY {
            let Some(p) = self.waiting_mut(at) else {
                break;
            };
            p.waiting = false;
            let (run, next) = (p.run, p.next);
            self.waiting -= 1;
            any = true;
            f(run);
            if next == NONE {
                break;
            }
            at = next;
        }
        any
    }

    /// The send carrying `id` was never queued: its runs wait no more and nothing is counted.
    pub(crate) fn cancel(&mut self, id: u32) {
        let _ = self.settle(id, |_| {});
    }

    /// Gives up on every run queued at or before `deadline` that still waits, oldest first,
    /// stopping at the first younger one that waits. Hands each to `missing`.
    pub(crate) fn sweep(&mut self, deadline: u64, mut missing: impl FnMut(Run)) {
        while self.cursor != self.next {
            let i = Self::index(self.cursor);
            let Some(p) = self.places.get_mut(i) else {
                break;
            };
            if p.id == self.cursor && p.waiting {
                if p.queued > deadline {
                    break;
                }
                p.waiting = false;
                self.waiting -= 1;
                missing(p.run);
            }
            self.cursor = self.cursor.wrapping_add(1);
        }
    }

    /// Runs still waiting for their stamp.
    pub(crate) const fn waiting(&self) -> usize {
        self.waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(at: u64, count: u64) -> Run {
        Run {
            arrival: Some(at),
            count,
        }
    }

    fn none(_: Run) {
        panic!("nothing missing");
    }

    #[test]
    fn a_stamp_settles_its_run_once_and_a_repeat_is_stale() {
        let mut f = Flights::new();
        let a = f.push(run(10, 1), 0, none);
        let b = f.push(run(20, 64), 0, none);
        assert_eq!(f.waiting(), 2);
        let mut got = Vec::new();
        assert!(f.settle(b, |r| got.push(r)));
        assert!(!f.settle(b, |r| got.push(r)), "once");
        assert!(f.settle(a, |r| got.push(r)));
        assert_eq!(got, [run(20, 64), run(10, 1)]);
        assert_eq!(f.waiting(), 0);
    }

    #[test]
    fn unknown_ids_settle_nothing() {
        let mut f = Flights::new();
        let a = f.push(run(1, 1), 0, none);
        for id in [a + 1, a + CAPACITY_IDS, u32::MAX, 12_345] {
            assert!(!f.settle(id, |_| panic!("{id}")), "{id}");
        }
        assert_eq!(f.waiting(), 1);
    }

    #[test]
    fn a_chain_is_settled_by_its_first_id_and_runs_grow() {
        let mut f = Flights::new();
        let a = f.push(run(1, 1), 0, none);
        let other = f.push(run(9, 1), 0, none);
        let b = f.push(run(2, 1), 0, none);
        f.chain(a, b);
        assert!(f.grow(b, 2));
        let c = f.push(run(3, 1), 0, none);
        f.chain(b, c);
        let mut got = Vec::new();
        assert!(f.settle(a, |r| got.push(r)));
        assert_eq!(got, [run(1, 1), run(2, 3), run(3, 1)]);
        assert!(!f.grow(b, 1), "settled runs do not grow");
        assert_eq!(f.waiting(), 1, "the interleaved send is not part of it");
        assert!(f.settle(other, |_| {}));
    }

    #[test]
    fn the_sweep_gives_up_on_old_runs_only() {
        let mut f = Flights::new();
        let ids: Vec<u32> = (0..5u64).map(|k| f.push(run(k, 1), k * 10, none)).collect();
        assert!(f.settle(ids[1], |_| {}));
        let mut missing = Vec::new();
        f.sweep(25, |r| missing.push(r.arrival));
        assert_eq!(missing, [Some(0), Some(2)], "1 settled, 3 and 4 too young");
        f.sweep(25, none);
        assert!(
            !f.settle(ids[0], |_| {}),
            "a stamp after giving up is stale"
        );
        assert!(f.settle(ids[3], |_| {}));
        f.sweep(u64::MAX, |r| missing.push(r.arrival));
        assert_eq!(missing, [Some(0), Some(2), Some(4)]);
        assert_eq!(f.waiting(), 0);
    }

    #[test]
    fn a_place_needed_a_lap_later_is_given_up_on_and_its_old_id_is_stale() {
        let mut f = Flights::new();
        let first = f.push(run(7, 3), 0, none);
        let mut missing = Vec::new();
        for k in 1..=CAPACITY as u64 {
            let id = f.push(run(k, 1), k, |r| missing.push(r));
            if k < CAPACITY as u64 {
                assert!(f.settle(id, |_| {}));
            }
        }
        assert_eq!(missing, [run(7, 3)]);
        assert!(!f.settle(first, |_| {}), "its place holds a newer send");
        assert_eq!(f.waiting(), 1);
        let mut swept = 0;
        f.sweep(u64::MAX, |_| swept += 1);
        assert_eq!(swept, 1);
    }

    #[test]
    fn a_cancelled_send_counts_nothing_and_ids_skip_none() {
        let mut f = Flights::new();
        let a = f.push(run(1, 1), 0, none);
        f.cancel(a);
        f.sweep(u64::MAX, none);
        assert_eq!(f.waiting(), 0);
        f.next = NONE;
        assert_eq!(f.push(run(1, 1), 0, none), 0, "NONE is never an id");
    }
}
