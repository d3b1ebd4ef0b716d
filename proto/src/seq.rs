//! Sequence-number tracking per RFC 3550 appendix A.1, made exact for duplicates and reordering.
//!
//! A.1 gives extended sequence numbers across the 65535→0 wrap, probation for a new source
//! (`MIN_SEQUENTIAL` packets in sequence before it counts), the `MAX_DROPOUT`/`MAX_MISORDER`
//! windows, and re-synchronisation after a large jump. Its `received` counter, though, counts
//! duplicates, so its "cumulative lost" can hide losses behind duplicates and go negative. This
//! tracker adds a 128-packet bitmap behind the highest sequence seen: a packet at or behind the
//! highest one is a duplicate when its bit is set and a reordered arrival (filling an earlier
//! gap) when it is not. `received` counts each sequence number once, so
//! `lost = expected − received` is exact across wrap and never counts a reordered packet twice.
//!
//! One deliberate difference from A.1: a pending `bad_seq` is forgotten when an in-order packet
//! arrives, so a restart needs two *consecutive* arrivals in sequence after the jump, not two
//! that happen to be sequential with other traffic between them.
//!
//! Identities that follow, and that the tests check:
//! - `lost() == gaps() − reordered()` (each reordered packet fills exactly one counted gap);
//! - `received() + lost() == expected()`.

/// Sequence numbers are 16 bits (RFC 3550 §5.1).
pub const RTP_SEQ_MOD: u32 = 0x1_0000;
/// A forward jump of fewer than this many is a gap, not a restart (RFC 3550 A.1).
pub const MAX_DROPOUT: u16 = 3000;
/// A packet up to this many behind the highest is reordered or duplicate (RFC 3550 A.1).
pub const MAX_MISORDER: u16 = 100;
/// Packets in sequence before a new source is valid (RFC 3550 A.1).
pub const MIN_SEQUENTIAL: u8 = 2;

/// Offset of extended sequence numbers in an anchored segment, so "one before the first" exists.
const ANCHOR_EXT: u64 = 1 << 16;

/// Bits of history kept behind the highest sequence number; must exceed `MAX_MISORDER`.
const WINDOW_BITS: u32 = u128::BITS;
const _: () = assert!(WINDOW_BITS > MAX_MISORDER as u32);

/// How one packet's sequence number was classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum SeqEvent {
    /// The source is on probation; the packet is not counted.
    Probation,
    /// The packet advanced the highest sequence number, skipping `gap` numbers (0 when in order).
    InOrder {
        /// Sequence numbers jumped over; each counts as lost until it arrives.
        gap: u16,
    },
    /// The packet is behind the highest and had not been seen: it fills an earlier gap.
    Reordered,
    /// The packet had already been received.
    Duplicate,
    /// The packet is behind the first counted packet of the stream; not counted.
    Stale,
    /// A jump too large to be a gap; ignored unless the next packet follows it (A.1 `bad_seq`).
    BadJump,
    /// Two sequential packets after a large jump: the sender restarted; counting restarts here.
    Restart,
}

impl SeqEvent {
    /// Whether this packet is a new, counted arrival (in order, reordered, or a restart).
    #[must_use]
    pub const fn is_new(self) -> bool {
        matches!(self, Self::InOrder { .. } | Self::Reordered | Self::Restart)
    }
}

/// Per-source sequence state and counters. 64 bytes of counters plus a 16-byte bitmap.
#[derive(Clone, Debug)]
pub struct SequenceTracker {
    /// Packets in sequence needed before a new source counts (≥ 1).
    min_sequential: u8,
    /// Packets still needed to leave probation; 0 once valid.
    probation: u8,
    /// Whether any packet has been seen since the last reset.
    started: bool,
    /// Highest sequence number seen (A.1 `max_seq`).
    max_seq: u16,
    /// Extended highest sequence number of the current segment (wraps counted).
    ext_max: u64,
    /// Extended sequence number of the first counted packet of the current segment.
    ext_base: u64,
    /// The sequence number that would confirm a restart (A.1 `bad_seq`); > 0xffff when none.
    bad_seq: u32,
    /// Bit i set: extended sequence `ext_max − i` was received (i < 128).
    window: u128,
    /// Packets counted as received, each sequence number once, across segments.
    received: u64,
    /// `expected` of segments ended by a restart or source change.
    expected_retired: u64,
    /// Sequence numbers skipped when the highest advanced.
    gaps: u64,
    /// Packets that filled an earlier gap.
    reordered: u64,
    /// Packets received more than once.
    duplicates: u64,
    /// Restarts detected (two sequential packets after a large jump).
    restarts: u64,
}

impl SequenceTracker {
    /// A tracker whose sources are valid after `min_sequential` packets in sequence (0 means 1).
    #[must_use]
    pub const fn new(min_sequential: u8) -> Self {
        Self {
            min_sequential: if min_sequential == 0 {
                1
            } else {
                min_sequential
            },
            probation: 0,
            started: false,
            max_seq: 0,
            ext_max: 0,
            ext_base: 0,
            bad_seq: RTP_SEQ_MOD + 1,
            window: 0,
            received: 0,
            expected_retired: 0,
            gaps: 0,
            reordered: 0,
            duplicates: 0,
            restarts: 0,
        }
    }

    /// Classifies the next arrival and updates the counters.
    pub fn update(&mut self, seq: u16) -> SeqEvent {
        if !self.started {
            // A.1: a new source starts on probation with max_seq = seq - 1.
            self.started = true;
            self.probation = self.min_sequential;
            self.max_seq = seq.wrapping_sub(1);
        }
        if self.probation > 0 {
            if seq == self.max_seq.wrapping_add(1) {
                self.probation -= 1;
                self.max_seq = seq;
                if self.probation == 0 {
                    self.begin_segment(seq);
                    return SeqEvent::InOrder { gap: 0 };
                }
            } else {
                // Out of sequence: start counting again from this packet. (With
                // `min_sequential == 1` the first packet is always in sequence, so this branch
                // only runs with a probation of at least 2 and leaves at least 1.)
                self.probation = self.min_sequential - 1;
                self.max_seq = seq;
            }
            return SeqEvent::Probation;
        }

        let udelta = seq.wrapping_sub(self.max_seq);
        if udelta == 0 {
            self.duplicates += 1;
            SeqEvent::Duplicate
        } else if udelta < MAX_DROPOUT {
            // In order, with a permissible gap; a smaller number means the 16 bits wrapped.
            self.max_seq = seq;
            self.ext_max += u64::from(udelta);
            self.window = if u32::from(udelta) >= WINDOW_BITS {
                1
            } else {
                (self.window << udelta) | 1
            };
            self.received += 1;
            let gap = udelta - 1;
            self.gaps += u64::from(gap);
            self.bad_seq = RTP_SEQ_MOD + 1;
            SeqEvent::InOrder { gap }
        } else if u32::from(udelta) <= RTP_SEQ_MOD - u32::from(MAX_MISORDER) {
            // A very large jump: a restart if the next packet follows this one.
            if u32::from(seq) == self.bad_seq {
                self.expected_retired += self.segment_expected();
                self.restarts += 1;
                self.begin_segment(seq);
                SeqEvent::Restart
            } else {
                self.bad_seq = (u32::from(seq) + 1) & (RTP_SEQ_MOD - 1);
                SeqEvent::BadJump
            }
        } else {
            // Behind the highest by 1..MAX_MISORDER: duplicate or reordered.
            let behind = u16::MAX - udelta + 1;
            match self.ext_max.checked_sub(u64::from(behind)) {
                Some(ext) if ext >= self.ext_base => {
                    let bit = 1u128 << behind;
                    if self.window & bit != 0 {
                        self.duplicates += 1;
                        SeqEvent::Duplicate
                    } else {
                        self.window |= bit;
                        self.received += 1;
                        self.reordered += 1;
                        SeqEvent::Reordered
                    }
                }
                _ => SeqEvent::Stale,
            }
        }
    }

    /// Ends the current source (its SSRC changed): its counts are kept, and the next packet
    /// starts a new source on probation.
    pub fn retire_source(&mut self) {
        self.expected_retired += self.segment_expected();
        self.started = false;
        self.probation = 0;
        self.ext_max = 0;
        self.ext_base = 0;
        self.window = 0;
        self.bad_seq = RTP_SEQ_MOD + 1;
    }

    fn begin_segment(&mut self, seq: u16) {
        self.max_seq = seq;
        self.ext_max = u64::from(seq);
        self.ext_base = u64::from(seq);
        self.window = 1;
        self.bad_seq = RTP_SEQ_MOD + 1;
        self.received += 1;
    }

    fn segment_expected(&self) -> u64 {
        if self.started && self.probation == 0 {
            (self.ext_max + 1).saturating_sub(self.ext_base)
        } else {
            0
        }
    }

    /// Starts a new source whose first sequence number is known to be `first`, with no
    /// probation: for a stream the relay sent itself (the echo's return of what it forwarded),
    /// so packets lost before the first that arrives count too. The previous source's counts are
    /// kept.
    pub fn anchor(&mut self, first: u16) {
        self.retire_source();
        self.started = true;
        self.probation = 0;
        self.max_seq = first.wrapping_sub(1);
        self.ext_base = ANCHOR_EXT + u64::from(first);
        self.ext_max = self.ext_base - 1;
        self.window = 0;
    }

    /// How many sequence numbers the current segment spans, from its first counted one to the
    /// highest received; `None` before the source is valid.
    #[must_use]
    pub fn extent(&self) -> Option<u64> {
        self.is_valid()
            .then(|| (self.ext_max + 1).saturating_sub(self.ext_base))
    }

    /// Counts `n` more packets as expected and never received: those the caller knows were sent
    /// after the highest one received (the end of a stream, when its channel closes).
    pub fn expect_more(&mut self, n: u64) {
        self.expected_retired += n;
    }

    /// Whether the current source has passed probation.
    #[must_use]
    pub const fn is_valid(&self) -> bool {
        self.started && self.probation == 0
    }

    /// Extended highest sequence number of the current segment (wrap counted in the high bits).
    #[must_use]
    pub const fn extended_max(&self) -> u64 {
        self.ext_max
    }

    /// Packets expected: from the first counted packet to the highest, over every segment.
    #[must_use]
    pub fn expected(&self) -> u64 {
        self.expected_retired + self.segment_expected()
    }

    /// Distinct packets received and counted.
    #[must_use]
    pub const fn received(&self) -> u64 {
        self.received
    }

    /// Packets expected and not received: exact, never negative.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.expected() - self.received
    }

    /// Sequence numbers skipped when the highest advanced (losses before any reordering fills).
    #[must_use]
    pub const fn gaps(&self) -> u64 {
        self.gaps
    }

    /// Packets that arrived after a higher sequence number and filled a gap.
    #[must_use]
    pub const fn reordered(&self) -> u64 {
        self.reordered
    }

    /// Packets received more than once.
    #[must_use]
    pub const fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Restarts detected.
    #[must_use]
    pub const fn restarts(&self) -> u64 {
        self.restarts
    }
}

impl Default for SequenceTracker {
    fn default() -> Self {
        Self::new(MIN_SEQUENTIAL)
    }
}

/// RFC 3550 A.1's sequence tracking at its edges: probation, reset by a gap (a `min_sequential` of
/// 1 counts the first packet); loss exact across the wrap, a packet reordered across it counted
/// once; duplicates not received twice; packets before the base stale; a large jump ignored once,
/// then a restart; `MAX_DROPOUT` and `MAX_MISORDER` at their limits; a jump wider than the window
/// clears it; an anchored stream counts losses at its head and tail; a retired source keeps its
/// counts.
#[cfg(test)]
mod tests {
    use super::*;

    fn feed(t: &mut SequenceTracker, seqs: &[u16]) -> Vec<SeqEvent> {
        seqs.iter().map(|&s| t.update(s)).collect()
    }

    #[test]
    fn probation_then_in_order() {
        let mut t = SequenceTracker::new(2);
        let ev = feed(&mut t, &[10, 11, 12]);
        assert_eq!(
            ev,
            [
                SeqEvent::Probation,
                SeqEvent::InOrder { gap: 0 },
                SeqEvent::InOrder { gap: 0 }
            ]
        );
        assert_eq!((t.expected(), t.received(), t.lost()), (2, 2, 0));
    }

    #[test]
    fn probation_resets_on_a_gap() {
        let mut t = SequenceTracker::new(2);
        let ev = feed(&mut t, &[10, 12, 13]);
        assert_eq!(ev[..2], [SeqEvent::Probation, SeqEvent::Probation]);
        assert_eq!(ev[2], SeqEvent::InOrder { gap: 0 });
        assert_eq!(t.expected(), 1);
    }

    #[test]
    fn min_sequential_one_counts_the_first_packet() {
        let mut t = SequenceTracker::new(1);
        assert_eq!(t.update(5), SeqEvent::InOrder { gap: 0 });
        assert_eq!((t.expected(), t.received()), (1, 1));
    }

    #[test]
    fn loss_is_exact_across_the_wrap() {
        let mut t = SequenceTracker::new(1);
        let ev = feed(&mut t, &[65533, 65534, 1, 2]); // 65535 and 0 lost
        assert_eq!(ev[2], SeqEvent::InOrder { gap: 2 });
        assert_eq!(t.extended_max(), 65536 + 2);
        assert_eq!((t.expected(), t.received(), t.lost()), (6, 4, 2));
    }

    #[test]
    fn reordered_packet_across_the_wrap_is_counted_once() {
        let mut t = SequenceTracker::new(1);
        let ev = feed(&mut t, &[65534, 0, 65535, 1]);
        assert_eq!(ev[1], SeqEvent::InOrder { gap: 1 });
        assert_eq!(ev[2], SeqEvent::Reordered);
        assert_eq!((t.expected(), t.received(), t.lost()), (4, 4, 0));
        assert_eq!((t.gaps(), t.reordered()), (1, 1));
    }

    #[test]
    fn duplicates_are_not_received_twice() {
        let mut t = SequenceTracker::new(1);
        let ev = feed(&mut t, &[1, 2, 2, 3, 1, 4]);
        assert_eq!(ev[2], SeqEvent::Duplicate);
        assert_eq!(ev[4], SeqEvent::Duplicate);
        assert_eq!(t.duplicates(), 2);
        assert_eq!((t.expected(), t.received(), t.lost()), (4, 4, 0));
    }

    #[test]
    fn packets_before_the_base_are_stale() {
        let mut t = SequenceTracker::new(2);
        let ev = feed(&mut t, &[100, 101, 102, 100]);
        assert_eq!(ev[3], SeqEvent::Stale);
        assert_eq!(t.expected(), 2);
    }

    #[test]
    fn large_jump_is_ignored_once_then_restarts() {
        let mut t = SequenceTracker::new(1);
        let _ = feed(&mut t, &[1, 2, 3]);
        assert_eq!(t.update(40_000), SeqEvent::BadJump);
        assert_eq!(
            t.update(4),
            SeqEvent::InOrder { gap: 0 },
            "stray jump ignored"
        );
        assert_eq!(t.update(40_000), SeqEvent::BadJump);
        assert_eq!(t.update(40_001), SeqEvent::Restart);
        assert_eq!(t.update(40_002), SeqEvent::InOrder { gap: 0 });
        assert_eq!(t.restarts(), 1);
        // Old segment 1..=4, new segment 40001..=40002.
        assert_eq!((t.expected(), t.received(), t.lost()), (6, 6, 0));
    }

    #[test]
    fn gap_at_max_dropout_is_a_jump_and_just_under_is_loss() {
        let mut t = SequenceTracker::new(1);
        let _ = t.update(0);
        assert_eq!(
            t.update(MAX_DROPOUT - 1),
            SeqEvent::InOrder {
                gap: MAX_DROPOUT - 2
            }
        );
        assert_eq!(t.update(2 * MAX_DROPOUT - 1), SeqEvent::BadJump);
    }

    #[test]
    fn misorder_limit() {
        let mut t = SequenceTracker::new(1);
        let _ = t.update(1000);
        let _ = t.update(1200);
        assert_eq!(t.update(1200 - MAX_MISORDER + 1), SeqEvent::Reordered);
        assert_eq!(t.update(1200 - MAX_MISORDER), SeqEvent::BadJump);
    }

    #[test]
    fn a_jump_wider_than_the_window_clears_it() {
        let mut t = SequenceTracker::new(1);
        let _ = feed(&mut t, &[1, 2, 3, 1000]);
        assert_eq!(t.update(999), SeqEvent::Reordered);
        assert_eq!(t.update(999), SeqEvent::Duplicate);
        assert_eq!(t.lost(), 995);
    }

    #[test]
    fn an_anchored_stream_counts_losses_at_its_head_and_tail() {
        let mut t = SequenceTracker::new(2);
        t.anchor(65_534);
        assert_eq!(t.extent(), Some(0));
        // 65534 and 65535 lost at the head, 3 lost in the middle; no probation.
        assert_eq!(t.update(0), SeqEvent::InOrder { gap: 2 });
        let _ = feed(&mut t, &[1, 2, 6, 3]);
        assert_eq!(t.extent(), Some(9), "65534 ..= 6 across the wrap");
        assert_eq!(
            (t.expected(), t.received(), t.lost(), t.reordered()),
            (9, 5, 4, 1)
        );
        assert_eq!(
            t.update(65_535),
            SeqEvent::Reordered,
            "a late head packet fills its gap"
        );
        // The sender went on to 9: 7, 8, 9 never came back.
        t.expect_more(3);
        assert_eq!((t.expected(), t.lost()), (12, 6));
    }

    #[test]
    fn retiring_a_source_keeps_its_counts() {
        let mut t = SequenceTracker::new(1);
        let _ = feed(&mut t, &[1, 2, 4]);
        t.retire_source();
        let _ = feed(&mut t, &[500, 501]);
        assert_eq!((t.expected(), t.received(), t.lost()), (6, 5, 1));
    }
}
