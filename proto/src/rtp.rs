//! RTP and RTCP parsing into borrowed, typed views (RFC 3550 §5.1 and §6.4).
//!
//! Every byte the relay measures comes from a peer, so parsing is total: any input gives either a
//! view that borrows the datagram (nothing is copied; the backend forwards the very buffer it
//! received) or a small `Copy` error saying what was wrong. All reads go through `Reader`, a
//! bounds-checked cursor in the manner of rustls' `codec::Reader`, so there is no indexing that can
//! panic. RTCP (packet types 200–204, RFC 5761 §4) is recognised so it can be forwarded without
//! being measured.

use core::fmt;

/// RTP version this parser accepts (RFC 3550 §5.1: V=2).
pub const RTP_VERSION: u8 = 0x2;
/// Length of the fixed RTP header (RFC 3550 §5.1).
pub const RTP_HEADER_LEN: usize = 0x0c;
/// First RTCP packet type: SR (RFC 3550 §6.4.1).
pub const RTCP_SR: u8 = 0xc8;
/// Last RTCP packet type this relay recognises: APP (RFC 3550 §6.7).
pub const RTCP_APP: u8 = 0xcc;

/// A synchronisation source identifier (RFC 3550 §5.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ssrc(pub u32);

impl fmt::Display for Ssrc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

/// Why a datagram is not a well-formed RTP or RTCP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RtpError {
    /// Shorter than the fixed header (12 bytes for RTP, 4 for RTCP).
    #[error("packet shorter than the fixed header")]
    TooShort,
    /// The version field is not 2.
    #[error("RTP version is not 2")]
    BadVersion,
    /// The CSRC count names more identifiers than the packet holds.
    #[error("CSRC list runs past the end of the packet")]
    CsrcOverrun,
    /// The header extension's length runs past the end of the packet.
    #[error("header extension runs past the end of the packet")]
    ExtensionOverrun,
    /// The padding bit is set but the padding count is zero or longer than the payload.
    #[error("padding count is zero or exceeds the payload")]
    BadPadding,
    /// The RTCP length field runs past the end of the datagram.
    #[error("RTCP length runs past the end of the packet")]
    RtcpLength,
}

/// A bounds-checked cursor over a byte slice; every read returns `None` instead of panicking.
#[derive(Debug)]
struct Reader<'a> {
    /// Bytes not yet consumed.
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// A header extension (RFC 3550 §5.3.1): the profile-defined word and the extension data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extension<'a> {
    /// The 16-bit "defined by profile" field (0xBEDE for RFC 8285 one-byte headers).
    pub profile: u16,
    /// The extension data, a whole number of 32-bit words.
    pub data: &'a [u8],
}

/// A parsed RTP packet borrowing its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The marker bit.
    pub marker: bool,
    /// The payload type, 0–127 (0 for ulaw).
    pub payload_type: u8,
    /// The 16-bit sequence number.
    pub sequence: u16,
    /// The RTP timestamp, in ticks of the format's clock.
    pub timestamp: u32,
    /// The synchronisation source.
    pub ssrc: Ssrc,
    /// The CSRC list, four bytes per contributing source.
    csrc: &'a [u8],
    /// The header extension, when the X bit is set.
    pub extension: Option<Extension<'a>>,
    /// The payload, without padding.
    pub payload: &'a [u8],
    /// Padding bytes after the payload (including the count byte); zero without the P bit.
    pub padding: u8,
}

impl RtpPacket<'_> {
    /// The contributing sources, in order.
    pub fn csrcs(&self) -> impl Iterator<Item = Ssrc> + '_ {
        self.csrc
            .chunks_exact(4)
            .filter_map(|c| c.try_into().ok().map(|b| Ssrc(u32::from_be_bytes(b))))
    }

    /// The number of contributing sources.
    #[must_use]
    pub fn csrc_count(&self) -> usize {
        self.csrc.len() / 4
    }
}

/// A recognised RTCP packet (only its first header, when compound), borrowing its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtcpPacket<'a> {
    /// The packet type, 200 (SR) to 204 (APP).
    pub packet_type: u8,
    /// The 5-bit count field (reception reports, sources, or APP subtype).
    pub count: u8,
    /// The whole datagram, which may be a compound packet.
    pub bytes: &'a [u8],
}

/// What a datagram turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Media: measured and forwarded.
    Rtp(RtpPacket<'a>),
    /// Control: forwarded, not measured.
    Rtcp(RtcpPacket<'a>),
}

/// Parses a datagram as RTP or RTCP. Never panics; never copies.
///
/// # Errors
/// An [`RtpError`] naming the first check the datagram fails.
pub fn parse(bytes: &[u8]) -> Result<Packet<'_>, RtpError> {
    let (b0, b1, mut r) = first_two(bytes)?;
    if (RTCP_SR..=RTCP_APP).contains(&b1) {
        let words = r.u16().ok_or(RtpError::TooShort)?;
        let len = (usize::from(words) + 1) * 4;
        if len > bytes.len() {
            return Err(RtpError::RtcpLength);
        }
        return Ok(Packet::Rtcp(RtcpPacket {
            packet_type: b1,
            count: b0 & 0x1f,
            bytes,
        }));
    }
    parse_rtp_after(b0, b1, r).map(Packet::Rtp)
}

/// Parses a datagram that must be RTP (not RTCP).
///
/// # Errors
/// An [`RtpError`] naming the first check the datagram fails.
pub fn parse_rtp(bytes: &[u8]) -> Result<RtpPacket<'_>, RtpError> {
    let (b0, b1, r) = first_two(bytes)?;
    parse_rtp_after(b0, b1, r)
}

/// The first two bytes, common to RTP and RTCP, with the version checked.
fn first_two(bytes: &[u8]) -> Result<(u8, u8, Reader<'_>), RtpError> {
    let mut r = Reader::new(bytes);
    let b0 = r.u8().ok_or(RtpError::TooShort)?;
    let b1 = r.u8().ok_or(RtpError::TooShort)?;
    if b0 >> 6 != RTP_VERSION {
        return Err(RtpError::BadVersion);
    }
    Ok((b0, b1, r))
}

fn parse_rtp_after(b0: u8, b1: u8, mut r: Reader<'_>) -> Result<RtpPacket<'_>, RtpError> {
    let sequence = r.u16().ok_or(RtpError::TooShort)?;
    let timestamp = r.u32().ok_or(RtpError::TooShort)?;
    let ssrc = Ssrc(r.u32().ok_or(RtpError::TooShort)?);
    let csrc = r
        .take(usize::from(b0 & 0x0f) * 4)
        .ok_or(RtpError::CsrcOverrun)?;
    let extension = if b0 & 0x10 != 0 {
        let profile = r.u16().ok_or(RtpError::ExtensionOverrun)?;
        let words = r.u16().ok_or(RtpError::ExtensionOverrun)?;
        let data = r
            .take(usize::from(words) * 4)
            .ok_or(RtpError::ExtensionOverrun)?;
        Some(Extension { profile, data })
    } else {
        None
    };
    let body = r.rest();
    let (payload, padding) = if b0 & 0x20 != 0 {
        let count = *body.last().ok_or(RtpError::BadPadding)?;
        let keep = body
            .len()
            .checked_sub(usize::from(count))
            .filter(|_| count != 0)
            .ok_or(RtpError::BadPadding)?;
        (body.get(..keep).ok_or(RtpError::BadPadding)?, count)
    } else {
        (body, 0)
    };
    Ok(RtpPacket {
        marker: b1 & 0x80 != 0,
        payload_type: b1 & 0x7f,
        sequence,
        timestamp,
        ssrc,
        csrc,
        extension,
        payload,
        padding,
    })
}

/// The fixed header of an RTP packet to send: what loadgen, the benches and the tests write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RtpHeader {
    /// The marker bit.
    pub marker: bool,
    /// The payload type, 0–127; higher bits are masked off.
    pub payload_type: u8,
    /// The sequence number.
    pub sequence: u16,
    /// The RTP timestamp.
    pub timestamp: u32,
    /// The synchronisation source.
    pub ssrc: Ssrc,
}

impl RtpHeader {
    /// Writes the 12-byte header (no CSRC, no extension, no padding) at the start of `buf`.
    /// Returns `None`, writing nothing, when `buf` is shorter than 12 bytes.
    pub fn write(&self, buf: &mut [u8]) -> Option<usize> {
        let out = buf.get_mut(..RTP_HEADER_LEN)?;
        out[0] = RTP_VERSION << 6;
        out[1] = (u8::from(self.marker) << 7) | (self.payload_type & 0x7f);
        out[2..4].copy_from_slice(&self.sequence.to_be_bytes());
        out[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        out[8..12].copy_from_slice(&self.ssrc.0.to_be_bytes());
        Some(RTP_HEADER_LEN)
    }
}

/// The parser: a plain ulaw packet; CSRCs, a header extension and padding; every length checked
/// (short headers, CSRC and extension overruns, bad padding); versions other than 2 refused; RTCP
/// told apart by its packet type (201 is, 199 and 205 are RTP), its length checked.
#[cfg(test)]
mod tests {
    use super::*;

    fn header(seq: u16) -> [u8; 12] {
        let mut b = [0u8; 12];
        RtpHeader {
            marker: true,
            payload_type: 0,
            sequence: seq,
            timestamp: 0x0102_0304,
            ssrc: Ssrc(0xdead_beef),
        }
        .write(&mut b)
        .unwrap();
        b
    }

    #[test]
    fn parses_a_plain_ulaw_packet() {
        let mut d = header(0xfffe).to_vec();
        d.extend_from_slice(&[0xff; 160]);
        let Ok(Packet::Rtp(p)) = parse(&d) else {
            panic!("not RTP")
        };
        assert!(p.marker);
        assert_eq!(p.payload_type, 0);
        assert_eq!(p.sequence, 0xfffe);
        assert_eq!(p.timestamp, 0x0102_0304);
        assert_eq!(p.ssrc, Ssrc(0xdead_beef));
        assert_eq!(p.payload.len(), 160);
        assert_eq!(p.padding, 0);
        assert!(p.extension.is_none());
        assert_eq!(p.csrc_count(), 0);
    }

    #[test]
    fn parses_csrc_extension_and_padding() {
        let mut d = header(7).to_vec();
        d[0] |= 0x20 | 0x10 | 2; // P, X, CC=2
        d.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]); // CSRCs
        d.extend_from_slice(&[0xbe, 0xde, 0, 1, 9, 9, 9, 9]); // one-word extension
        d.extend_from_slice(&[1, 2, 3]); // payload
        d.extend_from_slice(&[0, 0, 3]); // three bytes of padding
        let p = parse_rtp(&d).unwrap();
        assert_eq!(p.csrcs().collect::<Vec<_>>(), vec![Ssrc(1), Ssrc(2)]);
        assert_eq!(
            p.extension,
            Some(Extension {
                profile: 0xbede,
                data: &[9, 9, 9, 9]
            })
        );
        assert_eq!(p.payload, &[1, 2, 3]);
        assert_eq!(p.padding, 3);
    }

    #[test]
    fn every_length_is_checked() {
        let h = header(1);
        for n in 0..12 {
            assert_eq!(parse_rtp(&h[..n]), Err(RtpError::TooShort), "len {n}");
        }
        let mut d = h.to_vec();
        d[0] |= 3;
        d.extend_from_slice(&[0; 8]);
        assert_eq!(parse(&d), Err(RtpError::CsrcOverrun));
        let mut d = h.to_vec();
        d[0] |= 0x10;
        d.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 0]);
        assert_eq!(parse(&d), Err(RtpError::ExtensionOverrun));
        let mut d = h.to_vec();
        d[0] |= 0x10;
        d.extend_from_slice(&[0, 0]);
        assert_eq!(parse(&d), Err(RtpError::ExtensionOverrun));
        let mut d = h.to_vec();
        d[0] |= 0x20;
        assert_eq!(parse(&d), Err(RtpError::BadPadding), "P bit, no body");
        d.extend_from_slice(&[0, 0]);
        assert_eq!(parse(&d), Err(RtpError::BadPadding), "zero padding count");
        d.push(4);
        assert_eq!(parse(&d), Err(RtpError::BadPadding), "padding past payload");
    }

    #[test]
    fn other_versions_are_refused() {
        let mut d = header(1);
        for v in [0u8, 1, 3] {
            d[0] = (d[0] & 0x3f) | (v << 6);
            assert_eq!(parse(&d), Err(RtpError::BadVersion));
        }
    }

    #[test]
    fn rtcp_is_recognised_by_packet_type() {
        // An RR with no report blocks: V=2, RC=0, PT=201, length=1 (two words).
        let rr = [0x80, 201, 0, 1, 0, 0, 0, 42];
        let Ok(Packet::Rtcp(p)) = parse(&rr) else {
            panic!("not RTCP")
        };
        assert_eq!(p.packet_type, 201);
        assert_eq!(p.count, 0);
        assert_eq!(parse(&rr[..6]), Err(RtpError::RtcpLength));
        assert_eq!(parse(&rr[..3]), Err(RtpError::TooShort));
        // PT 199 and 205 are not RTCP: they parse as RTP (marker set, PT 71 and 77).
        for pt in [199u8, 205] {
            let mut d = header(1);
            d[1] = pt;
            assert!(matches!(parse(&d), Ok(Packet::Rtp(_))), "pt {pt}");
        }
    }
}
