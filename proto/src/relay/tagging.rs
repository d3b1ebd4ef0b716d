//! The shared echo leg ([`crate::tag`]) applied to channels: the relay's half of tagging.
//!
//! With one socket toward the echo, a return no longer says by its source which channel it
//! belongs to, so each packet toward the echo carries its channel's tag in place of its SSRC, and
//! its return gets Asterisk's SSRC back before it is routed. [`crate::tag`] does the bytes; this
//! module keeps, per channel, the SSRCs to restore, and finds a return's channel by its tag. The
//! backend calls it around [`Relay::handle_received`], which routes and measures the untagged
//! packet as it would on a leg of its own.

use super::{Relay, SocketId};
use crate::stats::DropReason;

impl Relay {
    /// Shared echo leg, on the way out: replaces the SSRC of `packet`, a datagram of channel
    /// `socket` just forwarded toward the echo, with the channel's tag, remembering Asterisk's
    /// SSRC to restore. False (the packet untouched) when the channel is gone or the packet has no
    /// SSRC field (the core forwards only what it parsed, so this does not happen for its own
    /// verdicts).
    pub fn tag_for_echo(&mut self, socket: SocketId, packet: &mut [u8]) -> bool {
        let Some(ch) = self
            .channels
            .get_mut(socket.index())
            .and_then(Option::as_mut)
        else {
            return false;
        };
        let Ok(kind) = crate::tag::kind(packet) else {
            return false;
        };
        let Some(ssrc) = crate::tag::read(packet, kind) else {
            return false;
        };
        ch.tagged[usize::from(kind == crate::tag::Kind::Rtcp)] = Some(ssrc);
        crate::tag::write(packet, kind, ch.tag)
    }

    /// Shared echo leg, on the way back: finds the channel `packet`'s tag names, puts Asterisk's
    /// SSRC back in its place, and returns the channel's socket slot, through which the caller
    /// then hands the packet to [`Relay::handle_received`] as that channel's return. `None`, the
    /// packet dropped and counted (`unknown_tag`, or why it has no SSRC), when the tag names no
    /// open channel: one closed since (its slot has moved on a generation), or a forgery.
    pub fn untag_from_echo(&mut self, packet: &mut [u8]) -> Option<SocketId> {
        let kind = match crate::tag::kind(packet) {
            Ok(k) => k,
            Err(reason) => {
                self.drops.add(reason);
                return None;
            }
        };
        let tag = crate::tag::read(packet, kind)?;
        let slot = crate::tag::slot(tag);
        let restored = self
            .channels
            .get(slot as usize)
            .and_then(Option::as_ref)
            .filter(|ch| ch.tag == tag)
            .and_then(|ch| ch.tagged[usize::from(kind == crate::tag::Kind::Rtcp)]);
        match restored {
            Some(ssrc) if crate::tag::write(packet, kind, ssrc) => Some(SocketId(slot)),
            _ => {
                self.drops.add(DropReason::UnknownTag);
                None
            }
        }
    }
}
