//! Reading the control messages (cmsgs) the kernel attaches to a received datagram: its
//! software receive timestamp (`SO_TIMESTAMPNS`, or `SO_TIMESTAMPING`'s software slot), which is
//! when the packet reached the socket, before any wake-up of ours, and the segment size of a
//! datagram UDP GRO coalesced ([`gro_segment`]); and writing the one a send carries, UDP GSO's
//! segment size ([`segment_cmsg`]). A pure, bounds-checked parser
//! of the bytes the kernel wrote (Linux's `struct cmsghdr` layout), so it can be tested on
//! crafted input: truncated headers, lengths past the end, other messages first.
//!
//! Layout (Linux, `man 3 cmsg`): each message is a header `{ cmsg_len: usize, cmsg_level: i32,
//! cmsg_type: i32 }` followed by its data; `cmsg_len` counts the header and the data; the next
//! message starts at `cmsg_len` rounded up to the alignment of `usize`.

/// Control-message room a receive needs for a timestamp (32 bytes) and a GRO segment size (24).
pub const CONTROL_LEN: usize = 64;

/// `SOL_UDP` (`IPPROTO_UDP`).
pub const SOL_UDP: i32 = 17;
/// `UDP_SEGMENT` (`linux/udp.h`; not in the libc crate for glibc targets): on a send, a `u16`
/// control message giving the size of the segments the kernel cuts the payload into (UDP GSO).
pub const UDP_SEGMENT: i32 = 103;
/// `UDP_GRO`: the socket option that lets the kernel coalesce received datagrams of one flow and
/// size; each coalesced receive carries an `int` control message with the segment size.
pub const UDP_GRO: i32 = 104;
/// Room of a `UDP_SEGMENT` control message: `CMSG_SPACE(sizeof(u16))`.
pub const SEGMENT_CMSG_SPACE: usize = HEADER + ALIGN;
/// Room of an `SCM_TS_OPT_ID` control message: `CMSG_SPACE(sizeof(u32))`.
pub const STAMP_ID_CMSG_SPACE: usize = HEADER + ALIGN;
/// Room of the control messages a send may carry: a segment size and a stamp id.
pub const SEND_CMSG_SPACE: usize = SEGMENT_CMSG_SPACE + STAMP_ID_CMSG_SPACE;

/// `SOL_SOCKET`.
const SOL_SOCKET: i32 = libc::SOL_SOCKET;
/// `SCM_TIMESTAMPNS` (= `SO_TIMESTAMPNS`): one `struct timespec`.
const SCM_TIMESTAMPNS: i32 = libc::SO_TIMESTAMPNS;
/// `SCM_TIMESTAMPING` (= `SO_TIMESTAMPING`): three `struct timespec`, software first.
const SCM_TIMESTAMPING: i32 = libc::SO_TIMESTAMPING;
/// Size of `struct cmsghdr` on this platform.
const HEADER: usize = size_of::<libc::cmsghdr>();
/// Alignment of control messages.
const ALIGN: usize = size_of::<usize>();
/// Size of a `struct timespec` (two 64-bit fields on the 64-bit Linux this project targets).
const TIMESPEC: usize = 16;

/// A wall-clock (`CLOCK_REALTIME`) instant, nanoseconds since the Unix epoch, as the kernel
/// stamps received packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WallTime(pub u64);

/// Why control data could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CmsgError {
    /// A header or its data runs past the end of what the kernel wrote.
    #[error("a control message runs past the end of the control data")]
    Truncated,
    /// A timestamp message whose data is not a timespec (negative or out-of-range fields).
    #[error("a timestamp control message holds no valid timespec")]
    BadTimestamp,
    /// A GRO message whose segment size is not in 1..=65535.
    #[error("a UDP_GRO control message holds no valid segment size")]
    BadSegment,
}

/// Walks `control`'s messages, giving each `(level, type, data)` to `f` until it answers.
pub(crate) fn find<T>(
    control: &[u8],
    mut f: impl FnMut(i32, i32, &[u8]) -> Result<Option<T>, CmsgError>,
) -> Result<Option<T>, CmsgError> {
    let mut rest = control;
    while !rest.is_empty() {
        if rest.len() < HEADER {
            return Err(CmsgError::Truncated);
        }
        let len = read_usize(rest, 0).ok_or(CmsgError::Truncated)?;
        let level = read_i32(rest, ALIGN).ok_or(CmsgError::Truncated)?;
        let kind = read_i32(rest, ALIGN + 4).ok_or(CmsgError::Truncated)?;
        if len < HEADER || len > rest.len() {
            return Err(CmsgError::Truncated);
        }
        let data = rest.get(HEADER..len).ok_or(CmsgError::Truncated)?;
        if let Some(t) = f(level, kind, data)? {
            return Ok(Some(t));
        }
        let next = len.div_ceil(ALIGN) * ALIGN;
        rest = rest.get(next..).unwrap_or_default();
    }
    Ok(None)
}

/// The software receive timestamp among `control`'s messages, if there is one.
///
/// # Errors
/// The messages are malformed (see [`CmsgError`]); a caller treats that like a missing timestamp.
pub fn rx_timestamp(control: &[u8]) -> Result<Option<WallTime>, CmsgError> {
    find(control, |level, kind, data| {
        if level == SOL_SOCKET && (kind == SCM_TIMESTAMPNS || kind == SCM_TIMESTAMPING) {
            // SCM_TIMESTAMPING's first timespec is the software stamp; zero means "none".
            let t = timespec(data)?;
            if t != WallTime(0) {
                return Ok(Some(t));
            }
        }
        Ok(None)
    })
}

/// The segment size of a datagram UDP GRO coalesced (the payload is then segments of this size,
/// the last possibly shorter), if `control` says it was coalesced.
///
/// # Errors
/// The messages are malformed, or the GRO message holds no positive size below 65536.
pub fn gro_segment(control: &[u8]) -> Result<Option<u16>, CmsgError> {
    find(control, |level, kind, data| {
        if level != SOL_UDP || kind != UDP_GRO {
            return Ok(None);
        }
        let n = read_i32(data, 0).ok_or(CmsgError::Truncated)?;
        u16::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .map(Some)
            .ok_or(CmsgError::BadSegment)
    })
}

/// Writes a `UDP_SEGMENT` control message for segments of `size` bytes into `out`, as the kernel
/// reads it on a send; returns its length (the `msg_controllen` to pass).
pub fn segment_cmsg(size: u16, out: &mut [u8; SEGMENT_CMSG_SPACE]) -> usize {
    out.fill(0);
    let len = HEADER + 2;
    out[..ALIGN].copy_from_slice(&len.to_ne_bytes());
    out[ALIGN..ALIGN + 4].copy_from_slice(&SOL_UDP.to_ne_bytes());
    out[ALIGN + 4..ALIGN + 8].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
    out[HEADER..HEADER + 2].copy_from_slice(&size.to_ne_bytes());
    SEGMENT_CMSG_SPACE
}

/// Writes the control messages of a send into `out`: UDP GSO's segment size when `segment` is
/// given, and the id its transmit stamp carries (`SCM_TS_OPT_ID`) when `stamp_id` is. Returns
/// their length (the `msg_controllen` to pass; 0 for none).
pub fn send_cmsgs(
    segment: Option<u16>,
    stamp_id: Option<u32>,
    out: &mut [u8; SEND_CMSG_SPACE],
) -> usize {
    out.fill(0);
    let mut at = 0;
    let mut put = |level: i32, kind: i32, data: &[u8]| {
        let len = HEADER + data.len();
        out[at..at + ALIGN].copy_from_slice(&len.to_ne_bytes());
        out[at + ALIGN..at + ALIGN + 4].copy_from_slice(&level.to_ne_bytes());
        out[at + ALIGN + 4..at + ALIGN + 8].copy_from_slice(&kind.to_ne_bytes());
        out[at + HEADER..at + len].copy_from_slice(data);
        at += HEADER + ALIGN;
    };
    if let Some(size) = segment {
        put(SOL_UDP, UDP_SEGMENT, &size.to_ne_bytes());
    }
    if let Some(id) = stamp_id {
        put(SOL_SOCKET, crate::txstamp::SCM_TS_OPT_ID, &id.to_ne_bytes());
    }
    at
}

pub(crate) fn timespec(data: &[u8]) -> Result<WallTime, CmsgError> {
    if data.len() < TIMESPEC {
        return Err(CmsgError::Truncated);
    }
    let secs = read_i64(data, 0).ok_or(CmsgError::Truncated)?;
    let nanos = read_i64(data, 8).ok_or(CmsgError::Truncated)?;
    let secs = u64::try_from(secs).map_err(|_| CmsgError::BadTimestamp)?;
    let nanos = u64::try_from(nanos)
        .ok()
        .filter(|&n| n < 1_000_000_000)
        .ok_or(CmsgError::BadTimestamp)?;
    secs.checked_mul(1_000_000_000)
        .and_then(|s| s.checked_add(nanos))
        .map(WallTime)
        .ok_or(CmsgError::BadTimestamp)
}

fn read_usize(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from_ne_bytes(
        b.get(at..at + ALIGN)?.try_into().ok()?,
    ))
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_i64(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Builds control data as the kernel lays it out (for tests of this and other crates: the
/// `test-util` feature).
#[cfg(any(test, feature = "test-util"))]
#[must_use]
pub fn encode(messages: &[(i32, i32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(level, kind, data) in messages {
        let len = HEADER + data.len();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&level.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.resize(out.len() + (HEADER - ALIGN - 8), 0);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
    }
    out
}

/// A timestamp message's data for `t` (one timespec; a test helper, see [`encode`]).
#[cfg(any(test, feature = "test-util"))]
#[must_use]
pub fn timespec_bytes(t: WallTime) -> [u8; TIMESPEC] {
    let mut b = [0u8; TIMESPEC];
    #[allow(clippy::cast_possible_wrap)] // seconds since 1970 fit an i64 for 292 billion years
    let secs = (t.0 / 1_000_000_000) as i64;
    #[allow(clippy::cast_possible_wrap)] // below 10^9
    let nanos = (t.0 % 1_000_000_000) as i64;
    b[..8].copy_from_slice(&secs.to_ne_bytes());
    b[8..].copy_from_slice(&nanos.to_ne_bytes());
    b
}

/// Receive control data as the kernel lays it out: a stamp from SO_TIMESTAMPNS or from
/// SO_TIMESTAMPING's software slot, found after other messages (UDP_GRO, IP_TOS); no stamp, or a
/// zero one, is none; every truncation and a lying length are errors, nanoseconds out of range too,
/// and arbitrary bytes never panic; UDP_GRO's segment size beside a stamp, bad sizes refused; and
/// the send messages (UDP_SEGMENT, the stamp id) laid out as the kernel reads them.
#[cfg(test)]
mod tests {
    use super::*;

    const T: WallTime = WallTime(1_764_600_000_123_456_789);

    #[test]
    fn a_timestampns_message_gives_the_time() {
        let c = encode(&[(SOL_SOCKET, SCM_TIMESTAMPNS, &timespec_bytes(T))]);
        assert_eq!(rx_timestamp(&c), Ok(Some(T)));
    }

    #[test]
    fn timestamping_gives_its_software_slot() {
        let mut three = timespec_bytes(T).to_vec();
        three.extend_from_slice(&[0u8; 32]); // the deprecated and hardware slots, empty
        let c = encode(&[(SOL_SOCKET, SCM_TIMESTAMPING, &three)]);
        assert_eq!(rx_timestamp(&c), Ok(Some(T)));
    }

    #[test]
    fn other_messages_first_are_skipped() {
        // UDP_GRO's segment size (level SOL_UDP, one int), then an IP_TOS byte, then the time.
        let c = encode(&[
            (libc::SOL_UDP, libc::UDP_GRO, &1400i32.to_ne_bytes()),
            (libc::IPPROTO_IP, libc::IP_TOS, &[0x2e]),
            (SOL_SOCKET, SCM_TIMESTAMPNS, &timespec_bytes(T)),
        ]);
        assert_eq!(rx_timestamp(&c), Ok(Some(T)));
    }

    #[test]
    fn no_timestamp_is_none() {
        assert_eq!(rx_timestamp(&[]), Ok(None));
        let c = encode(&[(libc::SOL_UDP, libc::UDP_GRO, &1400i32.to_ne_bytes())]);
        assert_eq!(rx_timestamp(&c), Ok(None));
        let zero = encode(&[(SOL_SOCKET, SCM_TIMESTAMPNS, &[0u8; 16])]);
        assert_eq!(rx_timestamp(&zero), Ok(None), "a zero stamp is no stamp");
    }

    #[test]
    fn truncated_or_lying_messages_are_errors_not_panics() {
        let good = encode(&[(SOL_SOCKET, SCM_TIMESTAMPNS, &timespec_bytes(T))]);
        for cut in 1..good.len() {
            let r = rx_timestamp(&good[..cut]);
            assert_eq!(r, Err(CmsgError::Truncated), "cut at {cut}");
        }
        // A length that claims more than there is, and one shorter than a header.
        let mut long = good.clone();
        long[..8].copy_from_slice(&(good.len() + 8).to_ne_bytes());
        assert_eq!(rx_timestamp(&long), Err(CmsgError::Truncated));
        let mut short = good.clone();
        short[..8].copy_from_slice(&4usize.to_ne_bytes());
        assert_eq!(rx_timestamp(&short), Err(CmsgError::Truncated));
        // A timespec with nanoseconds out of range.
        let mut bad = timespec_bytes(T);
        bad[8..].copy_from_slice(&2_000_000_000i64.to_ne_bytes());
        let c = encode(&[(SOL_SOCKET, SCM_TIMESTAMPNS, &bad)]);
        assert_eq!(rx_timestamp(&c), Err(CmsgError::BadTimestamp));
        // Arbitrary bytes never panic.
        let mut x = 0x1234_5678_u64;
        for n in 0..2_000 {
            let bytes: Vec<u8> = (0..n % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            let _ = rx_timestamp(&bytes);
        }
    }

    #[test]
    fn a_gro_message_gives_the_segment_size_after_a_timestamp() {
        let c = encode(&[
            (SOL_SOCKET, SCM_TIMESTAMPNS, &timespec_bytes(T)),
            (SOL_UDP, UDP_GRO, &172i32.to_ne_bytes()),
        ]);
        assert_eq!(gro_segment(&c), Ok(Some(172)));
        assert_eq!(
            rx_timestamp(&c),
            Ok(Some(T)),
            "the timestamp is still found"
        );
        assert_eq!(c.len(), 32 + 24, "both fit CONTROL_LEN");
        assert_eq!(
            gro_segment(&encode(&[(
                SOL_SOCKET,
                SCM_TIMESTAMPNS,
                &timespec_bytes(T)
            )])),
            Ok(None)
        );
        for bad in [0i32, -1, 70_000] {
            let c = encode(&[(SOL_UDP, UDP_GRO, &bad.to_ne_bytes())]);
            assert_eq!(gro_segment(&c), Err(CmsgError::BadSegment), "{bad}");
        }
        let short = encode(&[(SOL_UDP, UDP_GRO, &[1, 0][..])]);
        assert_eq!(gro_segment(&short), Err(CmsgError::Truncated));
    }

    #[test]
    fn send_messages_are_laid_out_as_the_kernel_reads_them() {
        let mut out = [0xffu8; SEND_CMSG_SPACE];
        assert_eq!(send_cmsgs(None, None, &mut out), 0);
        assert_eq!(send_cmsgs(Some(1_200), None, &mut out), 24);
        let want = encode(&[(SOL_UDP, UDP_SEGMENT, &1_200u16.to_ne_bytes())]);
        assert_eq!(&out[..24], &want[..]);
        assert_eq!(send_cmsgs(None, Some(0xdead_beef), &mut out), 24);
        let id = 0xdead_beef_u32.to_ne_bytes();
        let want = encode(&[(SOL_SOCKET, crate::txstamp::SCM_TS_OPT_ID, &id)]);
        assert_eq!(&out[..24], &want[..]);
        assert_eq!(send_cmsgs(Some(172), Some(5), &mut out), 48);
        let want = encode(&[
            (SOL_UDP, UDP_SEGMENT, &172u16.to_ne_bytes()),
            (
                SOL_SOCKET,
                crate::txstamp::SCM_TS_OPT_ID,
                &5u32.to_ne_bytes(),
            ),
        ]);
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn a_segment_message_is_laid_out_as_the_kernel_reads_it() {
        let mut out = [0xffu8; SEGMENT_CMSG_SPACE];
        assert_eq!(segment_cmsg(1_200, &mut out), 24);
        let want = encode(&[(SOL_UDP, UDP_SEGMENT, &1_200u16.to_ne_bytes())]);
        assert_eq!(&out[..], &want[..]);
    }
}
