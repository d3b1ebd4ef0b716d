//! Kernel transmit timestamps: when a datagram we sent left, as the kernel saw it.
//!
//! A time the relay reports must be one the kernel took, or scheduling bends it: a clock read
//! around a send lands after the packet left whenever the thread is preempted in between. So
//! every send is stamped by the kernel (`SO_TIMESTAMPING` with `SOF_TIMESTAMPING_TX_SOFTWARE`,
//! taken as the packet is handed to the device: on loopback, the moment `tcpdump` sees it) and
//! the stamp comes back later, keyed by an id the send chose (`SCM_TS_OPT_ID`, Linux 6.13+), so
//! a stamp finds its packet in O(1) with nothing allocated. With `SOF_TIMESTAMPING_OPT_TSONLY`
//! the stamp carries no copy of the packet.
//!
//! Stamps come back two ways, both parsed here by pure, bounds-checked functions that can be
//! tested on crafted input:
//! - io_uring's socket command `SOCKET_URING_OP_TX_TIMESTAMP` (Linux 6.15+): a multishot request
//!   whose 32-byte completions carry the id in `res`, the stamp's type in the flags and the time
//!   in the completion's second half ([`from_completion`]);
//! - the socket's error queue, read with `recvmsg(MSG_ERRQUEUE)` (any kernel with `OPT_ID`):
//!   an `SCM_TIMESTAMPING` control message with the time and an `IP_RECVERR`/`IPV6_RECVERR`
//!   message whose `sock_extended_err` carries the id ([`from_errqueue`]).

use crate::cmsg::{self, CmsgError, WallTime};

/// `SCM_TS_OPT_ID` (`asm-generic/socket.h`, Linux 6.13): a `u32` control message on a send that
/// sets the id its transmit stamp carries.
pub const SCM_TS_OPT_ID: i32 = 81;
/// `SOCKET_URING_OP_TX_TIMESTAMP` (`linux/io_uring.h`, Linux 6.15): the socket command whose
/// multishot completions carry transmit stamps.
pub const SOCKET_URING_OP_TX_TIMESTAMP: u32 = 4;
/// `IORING_CQE_F_TSTAMP_HW`: the stamp is the hardware's (`IORING_CQE_BUFFER_SHIFT` = 16).
const CQE_F_TSTAMP_HW: u32 = 1 << 16;
/// `IORING_TIMESTAMP_TYPE_SHIFT`: where the stamp's type (`SCM_TSTAMP_*`) starts in the flags.
const TIMESTAMP_TYPE_SHIFT: u32 = 17;
/// `IORING_CQE_F_MORE`: the multishot request stays armed.
const CQE_F_MORE: u32 = 1 << 1;
/// `SCM_TSTAMP_SND`: the stamp taken as the packet went to the device.
const SCM_TSTAMP_SND: u32 = 0;
/// `SO_EE_ORIGIN_TIMESTAMPING`: an error-queue entry that is a timestamp, not an error.
const SO_EE_ORIGIN_TIMESTAMPING: u8 = 4;
/// `IP_RECVERR` at level `SOL_IP`: an IPv4 socket's error-queue entry.
const IP_RECVERR: (i32, i32) = (libc::SOL_IP, libc::IP_RECVERR);
/// `IPV6_RECVERR` at level `SOL_IPV6`: an IPv6 socket's error-queue entry.
const IPV6_RECVERR: (i32, i32) = (libc::SOL_IPV6, libc::IPV6_RECVERR);
/// Size of `struct sock_extended_err`.
const EXTENDED_ERR_LEN: usize = 16;

/// Socket option value for transmit stamps: software stamps when the packet leaves
/// (`TX_SOFTWARE`), reported (`SOFTWARE`), keyed by id (`OPT_ID`), without the packet
/// (`OPT_TSONLY`), and no software receive stamp in `SCM_TIMESTAMPING` (`OPT_RX_FILTER`, Linux
/// 6.12: the receive side keeps its own `SO_TIMESTAMPNS`).
pub const TX_STAMP_FLAGS: u32 = libc::SOF_TIMESTAMPING_TX_SOFTWARE
    | libc::SOF_TIMESTAMPING_SOFTWARE
    | libc::SOF_TIMESTAMPING_OPT_ID
    | libc::SOF_TIMESTAMPING_OPT_TSONLY
    | OPT_RX_FILTER;
/// `SOF_TIMESTAMPING_OPT_RX_FILTER` (Linux 6.12; not in every libc crate).
const OPT_RX_FILTER: u32 = 1 << 17;

/// A transmit stamp: the id the send carried and when the packet left (`CLOCK_REALTIME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxStamp {
    /// The id the send chose with `SCM_TS_OPT_ID`.
    pub id: u32,
    /// When the kernel handed the packet to the device.
    pub at: WallTime,
}

/// Why a completion or an error-queue entry is not a usable transmit stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxStampError {
    /// The multishot request ended (no `IORING_CQE_F_MORE`): with this result, a negative errno
    /// or 0. `-EINVAL`/`-EOPNOTSUPP` on its first completion: the kernel lacks the command.
    #[error("the transmit-timestamp request ended ({0})")]
    Ended(i32),
    /// A stamp of another type than the send stamp (scheduler or acknowledgement stamps, which
    /// this socket never asks for).
    #[error("a transmit stamp of type {0}, not the send stamp")]
    OtherType(u32),
    /// A hardware stamp: another clock than the receive stamps'.
    #[error("a hardware transmit stamp")]
    Hardware,
    /// An error-queue entry that is not a timestamp (an ICMP error, say).
    #[error("an error-queue entry that is not a timestamp")]
    Foreign,
    /// The entry has no id message or no time message.
    #[error("an error-queue entry without its id or its time")]
    Incomplete,
    /// The time is not a valid timespec.
    #[error("a transmit stamp holds no valid time")]
    BadTime,
    /// The control data is malformed.
    #[error("malformed control data: {0}")]
    Control(#[from] CmsgError),
}

/// Reads an io_uring `SOCKET_URING_OP_TX_TIMESTAMP` completion: `result` and `flags` as the
/// kernel wrote them, `big` the second half of the 32-byte completion (`tv_sec`, `tv_nsec`).
///
/// # Errors
/// The request ended ([`TxStampError::Ended`]), or the completion is not a software send stamp
/// with a valid time.
pub fn from_completion(result: i32, flags: u32, big: [u64; 2]) -> Result<TxStamp, TxStampError> {
    if flags & CQE_F_MORE == 0 {
        return Err(TxStampError::Ended(result));
    }
    let kind = flags >> TIMESTAMP_TYPE_SHIFT;
    if kind != SCM_TSTAMP_SND {
        return Err(TxStampError::OtherType(kind));
    }
    if flags & CQE_F_TSTAMP_HW != 0 {
        return Err(TxStampError::Hardware);
    }
    let [secs, nanos] = big;
    let at = wall(secs, nanos).ok_or(TxStampError::BadTime)?;
    Ok(TxStamp {
        // The kernel puts the u32 key in the signed result field: reinterpret, do not convert.
        id: u32::from_ne_bytes(result.to_ne_bytes()),
        at,
    })
}

/// Reads the control messages of one `recvmsg(MSG_ERRQUEUE)` on a socket with transmit stamps.
///
/// # Errors
/// The messages are malformed, not a timestamp, not the send stamp, or lack the id or the time.
pub fn from_errqueue(control: &[u8]) -> Result<TxStamp, TxStampError> {
    let mut at = None;
    let mut id = None;
    let mut foreign = false;
    let mut other = None;
    cmsg::find(control, |level, kind, data| {
        if level == libc::SOL_SOCKET && kind == libc::SO_TIMESTAMPING {
            // Three timespecs: software, (deprecated), hardware. Only the software one is asked.
            let t = cmsg::timespec(data).map_err(|_| CmsgError::BadTimestamp)?;
            at = Some(t);
        } else if (level, kind) == IP_RECVERR || (level, kind) == IPV6_RECVERR {
            let err = data.get(..EXTENDED_ERR_LEN).ok_or(CmsgError::Truncated)?;
            let word =
                |at: usize| u32::from_ne_bytes([err[at], err[at + 1], err[at + 2], err[at + 3]]);
            let (errno, origin, info, key) = (word(0), err[4], word(8), word(12));
            if origin != SO_EE_ORIGIN_TIMESTAMPING || errno != libc::ENOMSG as u32 {
                foreign = true;
            } else if info != SCM_TSTAMP_SND {
                other = Some(info);
            } else {
                id = Some(key);
            }
        }
        Ok::<Option<()>, CmsgError>(None)
    })
    .map_err(|e| match e {
        CmsgError::BadTimestamp => TxStampError::BadTime,
        e => TxStampError::Control(e),
    })?;
    if foreign {
        return Err(TxStampError::Foreign);
    }
    if let Some(kind) = other {
        return Err(TxStampError::OtherType(kind));
    }
    match (id, at) {
        (Some(id), Some(at)) if at != WallTime(0) => Ok(TxStamp { id, at }),
        (Some(_), Some(_)) => Err(TxStampError::BadTime),
        _ => Err(TxStampError::Incomplete),
    }
}

/// A `(tv_sec, tv_nsec)` pair as the kernel wrote it (two `u64` words holding `i64`s), if valid
/// and not zero.
fn wall(secs: u64, nanos: u64) -> Option<WallTime> {
    if nanos >= 1_000_000_000 || i64::try_from(secs).is_err() {
        return None;
    }
    secs.checked_mul(1_000_000_000)?
        .checked_add(nanos)
        .filter(|&t| t != 0)
        .map(WallTime)
}

/// The error-queue messages the kernel writes for transmit stamp `id` at `at` on an IPv4 socket
/// (for tests of this and other crates: the `test-util` feature).
#[cfg(any(test, feature = "test-util"))]
#[must_use]
pub fn encode_errqueue(id: u32, at: WallTime) -> Vec<u8> {
    let mut stamps = cmsg::timespec_bytes(at).to_vec();
    stamps.extend_from_slice(&[0u8; 32]);
    cmsg::encode(&[
        (libc::SOL_SOCKET, libc::SO_TIMESTAMPING, &stamps),
        (
            IP_RECVERR.0,
            IP_RECVERR.1,
            &extended_err(id, SCM_TSTAMP_SND),
        ),
    ])
}

/// A `sock_extended_err` for a timestamp of `kind` with key `id`, followed by the offender's
/// (empty) `sockaddr_in` as the kernel appends it.
#[cfg(any(test, feature = "test-util"))]
fn extended_err(id: u32, kind: u32) -> [u8; EXTENDED_ERR_LEN + 16] {
    let mut e = [0u8; EXTENDED_ERR_LEN + 16];
    #[allow(clippy::cast_sign_loss)] // ENOMSG is a small positive errno
    e[..4].copy_from_slice(&(libc::ENOMSG as u32).to_ne_bytes());
    e[4] = SO_EE_ORIGIN_TIMESTAMPING;
    e[8..12].copy_from_slice(&kind.to_ne_bytes());
    e[12..16].copy_from_slice(&id.to_ne_bytes());
    e
}

/// Transmit stamps from both sources. An io_uring completion gives its id (one with the top bit set
/// too) and time; without the more flag it is the end of the request; other stamp types, hardware
/// stamps and bad times are refused. An error-queue entry (IPv4 or IPv6, its two messages in either
/// order) gives its id and time; a foreign ICMP entry, a scheduler stamp, a missing part, a zero
/// software slot, every truncation and a short sock_extended_err are errors, and arbitrary bytes
/// never panic.
#[cfg(test)]
mod tests {
    use super::*;

    const T: WallTime = WallTime(1_764_600_000_123_456_789);
    const SECS: u64 = 1_764_600_000;
    const NANOS: u64 = 123_456_789;

    #[test]
    fn a_completion_gives_its_id_and_time() {
        let s = from_completion(7, CQE_F_MORE, [SECS, NANOS]).unwrap();
        assert_eq!(s, TxStamp { id: 7, at: T });
        // An id with the top bit set arrives as a negative result and is read back intact.
        let big_id = from_completion(-2, CQE_F_MORE, [SECS, NANOS]).unwrap();
        assert_eq!(big_id.id, 0xffff_fffe);
    }

    #[test]
    fn a_completion_without_more_is_the_end_of_the_request() {
        assert_eq!(
            from_completion(-libc::EINVAL, 0, [0, 0]),
            Err(TxStampError::Ended(-libc::EINVAL))
        );
        assert_eq!(
            from_completion(0, 0, [SECS, NANOS]),
            Err(TxStampError::Ended(0))
        );
    }

    #[test]
    fn other_types_hardware_and_bad_times_are_refused() {
        let sched = CQE_F_MORE | (1 << TIMESTAMP_TYPE_SHIFT);
        assert_eq!(
            from_completion(1, sched, [SECS, NANOS]),
            Err(TxStampError::OtherType(1))
        );
        assert_eq!(
            from_completion(1, CQE_F_MORE | CQE_F_TSTAMP_HW, [SECS, NANOS]),
            Err(TxStampError::Hardware)
        );
        for big in [[SECS, 1_000_000_000], [u64::MAX, 0], [0, 0]] {
            assert_eq!(
                from_completion(1, CQE_F_MORE, big),
                Err(TxStampError::BadTime),
                "{big:?}"
            );
        }
    }

    #[test]
    fn an_errqueue_entry_gives_its_id_and_time() {
        let c = encode_errqueue(42, T);
        assert_eq!(from_errqueue(&c), Ok(TxStamp { id: 42, at: T }));
        // IPv6 sockets report through IPV6_RECVERR; the order of the messages does not matter.
        let mut stamps = cmsg::timespec_bytes(T).to_vec();
        stamps.extend_from_slice(&[0u8; 32]);
        let v6 = cmsg::encode(&[
            (
                IPV6_RECVERR.0,
                IPV6_RECVERR.1,
                &extended_err(9, SCM_TSTAMP_SND),
            ),
            (libc::SOL_SOCKET, libc::SO_TIMESTAMPING, &stamps),
        ]);
        assert_eq!(from_errqueue(&v6), Ok(TxStamp { id: 9, at: T }));
    }

    #[test]
    fn foreign_incomplete_and_truncated_entries_are_errors() {
        // An ICMP error (origin 2) is not a stamp.
        let mut icmp = extended_err(1, 0);
        icmp[..4].copy_from_slice(&111u32.to_ne_bytes());
        icmp[4] = 2;
        let c = cmsg::encode(&[(IP_RECVERR.0, IP_RECVERR.1, &icmp)]);
        assert_eq!(from_errqueue(&c), Err(TxStampError::Foreign));
        // A scheduler stamp is another type.
        let mut stamps = cmsg::timespec_bytes(T).to_vec();
        stamps.extend_from_slice(&[0u8; 32]);
        let sched = cmsg::encode(&[
            (libc::SOL_SOCKET, libc::SO_TIMESTAMPING, &stamps),
            (IP_RECVERR.0, IP_RECVERR.1, &extended_err(1, 1)),
        ]);
        assert_eq!(from_errqueue(&sched), Err(TxStampError::OtherType(1)));
        // Only one of the two messages.
        let only_time = cmsg::encode(&[(libc::SOL_SOCKET, libc::SO_TIMESTAMPING, &stamps)]);
        assert_eq!(from_errqueue(&only_time), Err(TxStampError::Incomplete));
        let only_id = cmsg::encode(&[(IP_RECVERR.0, IP_RECVERR.1, &extended_err(1, 0))]);
        assert_eq!(from_errqueue(&only_id), Err(TxStampError::Incomplete));
        assert_eq!(from_errqueue(&[]), Err(TxStampError::Incomplete));
        // A zero software slot (the stamp asked was another kind) is no time.
        let zero = cmsg::encode(&[
            (libc::SOL_SOCKET, libc::SO_TIMESTAMPING, &[0u8; 48]),
            (IP_RECVERR.0, IP_RECVERR.1, &extended_err(1, 0)),
        ]);
        assert_eq!(from_errqueue(&zero), Err(TxStampError::BadTime));
        // Every cut of a good entry is an error, never a panic or a wrong stamp.
        let good = encode_errqueue(42, T);
        for cut in 1..good.len() {
            assert!(from_errqueue(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A short sock_extended_err.
        let short = cmsg::encode(&[
            (libc::SOL_SOCKET, libc::SO_TIMESTAMPING, &stamps),
            (IP_RECVERR.0, IP_RECVERR.1, &[0u8; 8]),
        ]);
        assert_eq!(
            from_errqueue(&short),
            Err(TxStampError::Control(CmsgError::Truncated))
        );
        // Arbitrary bytes never panic.
        let mut x = 0x9e37_79b9_u64;
        for n in 0..2_000 {
            let bytes: Vec<u8> = (0..n % 131)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            let _ = from_errqueue(&bytes);
        }
    }
}
