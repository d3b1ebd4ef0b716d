//! The echo-leg tag: with one shared socket toward the echo (`--echo-leg shared`), every
//! channel's packets reach the relay's socket from the same echo address, so the source no longer
//! says which channel a return belongs to, and two calls may use the same SSRC. On the echo leg
//! the relay therefore replaces each packet's SSRC with a tag it owns, the channel's slot and the
//! generation of that slot, and puts Asterisk's SSRC back before the return goes to Asterisk: a
//! return finds its channel in O(1), and a packet of a closed channel (an older generation of the
//! slot) or a forged tag finds none.
//!
//! This module is the byte-level part: where a packet's SSRC lies (RTP: bytes 8–11, RTCP: the
//! sender SSRC, bytes 4–7) and how a tag is built and split. [`crate::Relay::tag_for_echo`] and
//! [`crate::Relay::untag_from_echo`] apply it to channels.

use crate::rtp::{RTCP_APP, RTCP_SR, RTP_HEADER_LEN, RTP_VERSION};
use crate::stats::DropReason;

/// Bits of a tag that hold the slot (slots are below 2^20: `max_channels` is at most 1,048,576).
pub const SLOT_BITS: u32 = 20;
/// Generations a slot cycles through before a tag repeats (the other 12 bits).
pub const GENERATIONS: u32 = 1 << (32 - SLOT_BITS);

/// Which kind of packet, for where its SSRC lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// RTP: the SSRC at bytes 8–11.
    Rtp,
    /// RTCP: the sender's SSRC at bytes 4–7.
    Rtcp,
}

impl Kind {
    /// Byte offset of the SSRC.
    #[must_use]
    pub const fn offset(self) -> usize {
        match self {
            Self::Rtp => 8,
            Self::Rtcp => 4,
        }
    }
}

/// The kind of `packet` and so where its SSRC lies; why it has none.
///
/// # Errors
/// Shorter than the header that holds the SSRC, or not version 2.
pub fn kind(packet: &[u8]) -> Result<Kind, DropReason> {
    let (Some(&b0), Some(&pt)) = (packet.first(), packet.get(1)) else {
        return Err(DropReason::TooShort);
    };
    if b0 >> 6 != RTP_VERSION {
        return Err(DropReason::BadVersion);
    }
    let kind = if (RTCP_SR..=RTCP_APP).contains(&pt) {
        Kind::Rtcp
    } else {
        Kind::Rtp
    };
    let need = match kind {
        Kind::Rtp => RTP_HEADER_LEN,
        Kind::Rtcp => 8,
    };
    if packet.len() < need {
        return Err(DropReason::TooShort);
    }
    Ok(kind)
}

/// The SSRC field of `packet` (of kind `kind`, so long enough).
#[must_use]
pub fn read(packet: &[u8], kind: Kind) -> Option<u32> {
    let o = kind.offset();
    Some(u32::from_be_bytes(packet.get(o..o + 4)?.try_into().ok()?))
}

/// Writes `value` into the SSRC field of `packet`; false when it is too short.
pub fn write(packet: &mut [u8], kind: Kind, value: u32) -> bool {
    let o = kind.offset();
    packet
        .get_mut(o..o + 4)
        .map(|b| b.copy_from_slice(&value.to_be_bytes()))
        .is_some()
}

/// The tag of slot `slot` in generation `generation` (taken modulo [`GENERATIONS`]).
#[must_use]
pub const fn make(slot: u32, generation: u32) -> u32 {
    ((generation % GENERATIONS) << SLOT_BITS) | (slot & ((1 << SLOT_BITS) - 1))
}

/// The slot a tag names.
#[must_use]
pub const fn slot(tag: u32) -> u32 {
    tag & ((1 << SLOT_BITS) - 1)
}

/// Tags keep slot and generation apart (generations wrap); the SSRC is read and written where the
/// kind, RTP or RTCP, says; short packets and other versions are refused.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_keep_slot_and_generation_apart() {
        let t = make(1_048_575, 4_095);
        assert_eq!(slot(t), 1_048_575);
        assert_eq!(t, u32::MAX);
        assert_eq!(make(3, 0), 3);
        assert_ne!(make(3, 1), make(3, 2));
        assert_eq!(make(3, GENERATIONS + 1), make(3, 1), "generations wrap");
    }

    #[test]
    fn the_ssrc_lies_where_the_kind_says() {
        let mut rtp = [0u8; 20];
        rtp[0] = 0x80;
        rtp[8..12].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
        assert_eq!(kind(&rtp), Ok(Kind::Rtp));
        assert_eq!(read(&rtp, Kind::Rtp), Some(0xdead_beef));
        assert!(write(&mut rtp, Kind::Rtp, 7));
        assert_eq!(read(&rtp, Kind::Rtp), Some(7));
        let mut rtcp = [0x81, 201, 0, 1, 0, 0, 0, 9];
        assert_eq!(kind(&rtcp), Ok(Kind::Rtcp));
        assert_eq!(read(&rtcp, Kind::Rtcp), Some(9));
        assert!(write(&mut rtcp, Kind::Rtcp, 10));
        assert_eq!(rtcp[7], 10);
        assert_eq!(kind(&rtp[..11]), Err(DropReason::TooShort));
        assert_eq!(kind(&rtcp[..7]), Err(DropReason::TooShort));
        assert_eq!(
            kind(&[0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DropReason::BadVersion)
        );
        assert_eq!(kind(&[]), Err(DropReason::TooShort));
    }
}
