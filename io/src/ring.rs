//! The io_uring instance, its provided-buffer groups, the per-buffer send headers and the eventfd
//! that wakes the ring: what the relay, the echo, loadgen and the floor forwarder all drive.
//!
//! Everything here is exposed through safe methods whose invariants the module keeps, most of
//! them by the type system:
//! - a ring has one or two buffer groups ([`Group::Small`], and [`Group::Large`] after
//!   [`RingBuilder::large`]), each one `BufGroup`: receive buffers the kernel picks from (its
//!   provided-buffer ring), transmit buffers the caller fills, and one send header per buffer;
//!   all of it in allocations owned by the ring for as long as it exists;
//! - a buffer outside the kernel's hands is owned by exactly one move-only token ([`RxBuf`] for
//!   a receive buffer, [`TxBuf`] for a transmit buffer; neither is `Clone` nor `Copy`). Only
//!   this module mints them: from a receive's completion, from [`Ring::tx_acquire`], or from the
//!   completion of the send that consumed one. [`Ring::send`] takes the token, so a buffer is
//!   never in two sends and nobody writes to it while the kernel reads it; [`Ring::recycle`]
//!   takes it back, so an in-flight buffer cannot be recycled. Each token names its ring, and a
//!   ring refuses another's;
//! - completions say what their submission was with one typed encoding, [`UserData`]; the top bit
//!   of io_uring's user_data is the ring's own and marks its sends, so no caller's value can make
//!   the ring mint a token;
//! - the receive `msghdr` and the eventfd's read buffer are boxed and live as long as the ring;
//! - sockets are used through the fixed-file table, whose slots the caller registers and clears.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

pub use crate::socket::SendOpts;

/// Bytes reserved for the source address in each received buffer (a `sockaddr_in6`).
const NAME_LEN: usize = size_of::<libc::sockaddr_in6>();
/// Bytes reserved for control messages (the kernel's receive timestamp) in each buffer.
const CONTROL_LEN: usize = crate::cmsg::CONTROL_LEN;
/// Where the payload starts in a receive buffer: after the `io_uring_recvmsg_out` header, the
/// address and the control messages.
const PAYLOAD_OFFSET: usize = 16 + NAME_LEN + CONTROL_LEN;
/// Size of one receive buffer by default: the `io_uring_recvmsg_out` header, the address, the
/// control messages, the payload ([`RingBuilder::buffer_size`] takes others, up to
/// [`MAX_BUFFER_SIZE`], for UDP GRO's coalesced datagrams).
pub const BUFFER_SIZE: usize = 2048;
/// Largest buffer [`RingBuilder::buffer_size`] takes: room for a 64 KiB coalesced datagram.
pub const MAX_BUFFER_SIZE: usize = (64 << 10) + PAYLOAD_OFFSET;
/// Most fixed-file slots a ring takes: a slot must fit the 24 bits [`UserData`] keeps of it.
pub const MAX_FILES: u32 = 1 << 24;

// Kernel ABI sizes and constants, checked to fit the narrower types the kernel wants.
#[allow(clippy::cast_possible_truncation)] // checked by the assertions below
const NAME_LEN_SOCKLEN: libc::socklen_t = NAME_LEN as libc::socklen_t;
#[allow(clippy::cast_possible_truncation)] // checked by the assertions below
const SIN_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // AF_* are small positive
const FAMILY_INET: libc::sa_family_t = libc::AF_INET as libc::sa_family_t;
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // AF_* are small positive
const FAMILY_INET6: libc::sa_family_t = libc::AF_INET6 as libc::sa_family_t;
const _: () = assert!(
    NAME_LEN < 256
        && MAX_BUFFER_SIZE < 1 << 20
        && libc::AF_INET6 < 256
        && PAYLOAD_OFFSET < BUFFER_SIZE
);
/// Largest datagram payload a buffer of the default size holds (larger ones are truncated and
/// dropped); [`Ring::capacity`] for a ring's own.
pub const MAX_PAYLOAD: usize = BUFFER_SIZE - PAYLOAD_OFFSET;

/// Tells rings apart, so that a token is only ever used with the ring that minted it.
static NEXT_RING_ID: AtomicU32 = AtomicU32::new(1);

/// Why io_uring could not be set up, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The kernel has no io_uring, or it is compiled out.
    #[error("io_uring is not available in this kernel (ENOSYS); run with --backend tokio")]
    NotSupported,
    /// A seccomp filter (for example a container's default profile) or
    /// `kernel.io_uring_disabled` refuses it.
    #[error(
        "io_uring is not permitted (EPERM): a seccomp profile or the sysctl kernel.io_uring_disabled \
         forbids it; allow io_uring_setup/enter/register or run with --backend tokio"
    )]
    NotPermitted,
    /// Another setup step failed.
    #[error("io_uring setup failed at {step}: {source}; run with --backend tokio")]
    Other {
        /// What was being set up.
        step: &'static str,
        /// The error.
        source: io::Error,
    },
}

fn classify(step: &'static str, e: io::Error) -> SetupError {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => SetupError::NotSupported,
        Some(libc::EPERM) => SetupError::NotPermitted,
        _ => SetupError::Other { step, source: e },
    }
}

/// An eventfd another thread writes to wake the ring.
#[derive(Debug)]
pub struct EventFd {
    /// The descriptor.
    fd: OwnedFd,
}

impl EventFd {
    /// A non-blocking, close-on-exec eventfd.
    ///
    /// # Errors
    /// The system call failed.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a fresh descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `fd` is a valid descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Wakes the ring. Never blocks; a counter already at its maximum is still a wake-up.
    pub fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live stack buffer to a descriptor we own.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One of a ring's buffer groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    /// The group every ring has, of the ring's buffer size.
    Small,
    /// The group [`RingBuilder::large`] adds, of [`MAX_BUFFER_SIZE`]: room for a GRO-coalesced
    /// receive, or a GSO send of up to 64 KiB.
    Large,
}

impl Group {
    /// Its io_uring buffer group id, and its place in [`Ring`]'s groups.
    const fn index(self) -> usize {
        match self {
            Self::Small => 0,
            Self::Large => 1,
        }
    }
}

/// The ring's own bit of io_uring's user_data: set on its sends, whose buffer it gives back with
/// the completion. [`UserData`] never sets it.
const SEND_BIT: u64 = 1 << 63;
/// In a send's user_data: the buffer is a transmit buffer (else a receive buffer).
const SEND_TX_BIT: u64 = 1 << 62;
/// In a send's user_data: the buffer is of the large group.
const SEND_LARGE_BIT: u64 = 1 << 61;
/// The bits of [`UserData::slot`] that are kept.
const SLOT_MASK: u32 = MAX_FILES - 1;

/// What a submission is, as its caller describes it: the one encoding of io_uring's user_data
/// that every user of the ring shares. Its completion carries it back
/// ([`Completion::user_data`]).
///
/// It takes the low 63 bits: `kind` in 7, `slot` in 24, `tag` in 32 (the top bit is the ring's
/// own, see the module header).
///
/// ```
/// use relay_io::ring::UserData;
/// let ud = UserData::new(3, 41, 0xdead_beef);
/// assert_eq!(UserData::decode(ud.encode()), Some(ud));
/// assert_eq!(UserData::decode(u64::MAX), None, "the ring's bit: not a caller's value");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UserData {
    /// The caller's kind of operation, below 128 (higher bits are dropped); 0 is what a
    /// completion carries when it could not be decoded, so callers start theirs at 1.
    pub kind: u8,
    /// A slot: a fixed-file slot, below [`MAX_FILES`] (higher bits are dropped).
    pub slot: u32,
    /// Whatever else the caller needs back: a generation, a stamp id.
    pub tag: u32,
}

impl UserData {
    /// Kind `kind` on slot `slot` with `tag`, each cut to the bits kept (see [`UserData`]).
    #[must_use]
    pub const fn new(kind: u8, slot: u32, tag: u32) -> Self {
        Self {
            kind: kind & 0x7f,
            slot: slot & SLOT_MASK,
            tag,
        }
    }

    /// Kind `kind` alone (slot and tag 0): a waker read, a cancel.
    #[must_use]
    pub const fn of(kind: u8) -> Self {
        Self::new(kind, 0, 0)
    }

    /// The user_data io_uring carries.
    #[must_use]
    pub fn encode(self) -> u64 {
        (u64::from(self.kind & 0x7f) << 56)
            | (u64::from(self.slot & SLOT_MASK) << 32)
            | u64::from(self.tag)
    }

    /// The value [`UserData::encode`] made; `None` for one it cannot have made (the ring's bit
    /// set). Never panics.
    #[must_use]
    pub fn decode(v: u64) -> Option<Self> {
        if v & SEND_BIT != 0 {
            return None;
        }
        let [k, s2, s1, s0, t3, t2, t1, t0] = v.to_be_bytes();
        Some(Self {
            kind: k & 0x7f,
            slot: u32::from_be_bytes([0, s2, s1, s0]),
            tag: u32::from_be_bytes([t3, t2, t1, t0]),
        })
    }
}

/// A receive buffer holding a datagram, taken from its receive's completion
/// ([`Completion::take_rx`]), or given back by the completion of the send it was handed to.
///
/// Not `Clone` nor `Copy`: whoever holds it is the buffer's one owner. It leaves by
/// [`Ring::recycle`] (back to the kernel) or by [`Ring::send`] (the send's completion brings it
/// back); one that is dropped instead is lost to its group.
#[must_use = "a dropped buffer token is lost to its group: recycle it or send it"]
#[derive(Debug, PartialEq, Eq)]
pub struct RxBuf {
    /// The ring that minted it.
    ring: u32,
    /// Its group.
    group: Group,
    /// Its index in the group's receive buffers.
    id: u16,
    /// Bytes its receive's completion reported (header, address, control and payload).
    len: u32,
}

impl RxBuf {
    /// Its group.
    #[must_use]
    pub const fn group(&self) -> Group {
        self.group
    }

    /// Its index among its group's receive buffers (below [`Capacity::rx`]), for tables kept
    /// per buffer.
    #[must_use]
    pub const fn id(&self) -> u16 {
        self.id
    }
}

/// A transmit buffer, from [`Ring::tx_acquire`] or given back by the completion of the send it
/// was handed to. Not `Clone` nor `Copy`, as [`RxBuf`]; it leaves by [`Ring::send`] or
/// [`Ring::recycle`].
#[must_use = "a dropped buffer token is lost to its group: recycle it or send it"]
#[derive(Debug, PartialEq, Eq)]
pub struct TxBuf {
    /// The ring that minted it.
    ring: u32,
    /// Its group.
    group: Group,
    /// Its index in the group's transmit buffers.
    id: u16,
}

impl TxBuf {
    /// Its group.
    #[must_use]
    pub const fn group(&self) -> Group {
        self.group
    }

    /// Its index among its group's transmit buffers (below [`Capacity::tx`]), for tables kept
    /// per buffer.
    #[must_use]
    pub const fn id(&self) -> u16 {
        self.id
    }
}

/// A buffer token of either kind: what [`Ring::send`] and [`Ring::recycle`] take.
#[must_use = "a dropped buffer token is lost to its group: recycle it or send it"]
#[derive(Debug, PartialEq, Eq)]
pub enum Buf {
    /// A receive buffer.
    Rx(RxBuf),
    /// A transmit buffer.
    Tx(TxBuf),
}

impl From<RxBuf> for Buf {
    fn from(b: RxBuf) -> Self {
        Self::Rx(b)
    }
}

impl From<TxBuf> for Buf {
    fn from(b: TxBuf) -> Self {
        Self::Tx(b)
    }
}

/// A borrowed buffer token: the source of [`Ring::copy`].
#[derive(Clone, Copy, Debug)]
pub enum BufRef<'a> {
    /// A receive buffer: its payload.
    Rx(&'a RxBuf),
    /// A transmit buffer: its bytes.
    Tx(&'a TxBuf),
}

impl<'a> From<&'a RxBuf> for BufRef<'a> {
    fn from(b: &'a RxBuf) -> Self {
        Self::Rx(b)
    }
}

impl<'a> From<&'a TxBuf> for BufRef<'a> {
    fn from(b: &'a TxBuf) -> Self {
        Self::Tx(b)
    }
}

/// A send [`Ring::send`] could not queue, and its buffer, back.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: io::Error,
    /// The buffer, to recycle or send again.
    pub buf: Buf,
}

/// The sizes of one buffer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Receive buffers.
    pub rx: u16,
    /// Transmit buffers.
    pub tx: u16,
    /// Largest payload a receive buffer holds (a transmit buffer holds this much more than
    /// the receive header: its whole size, [`Capacity::tx_size`]).
    pub max_payload: usize,
    /// Size of a transmit buffer.
    pub tx_size: usize,
}

/// UDP GSO on this ring: how many datagrams one send may carry, and how often a send showed
/// that fewer must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    /// Most datagrams one GSO send may carry: probed once per process
    /// ([`crate::socket::max_gso_segments`]), and 1 after a GSO send failed with `EIO` (a device
    /// without segmentation offload).
    pub max_segments: usize,
    /// How many GSO sends failed with `EIO` and lowered [`Gso::max_segments`].
    pub fallbacks: u64,
}

/// A multishot request (or the waker's read) [`Ring::arm`] submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    /// A multishot receive on fixed-file `slot` into `group`'s receive buffers: each completion
    /// carries one datagram (or, with UDP GRO, several coalesced) in an [`RxBuf`].
    Recv {
        /// The socket's fixed-file slot.
        slot: u32,
        /// The group whose buffers it fills.
        group: Group,
    },
    /// The transmit-stamp command on fixed-file `slot` (`SOCKET_URING_OP_TX_TIMESTAMP`, Linux
    /// 6.15+): completes once per stamp the socket's sends earn ([`Completion::tx_stamp`]). The
    /// socket needs [`crate::enable_tx_timestamps`]. A kernel without the command ends it at
    /// once with `-EINVAL` or `-EOPNOTSUPP`; the stamps then stay on the socket's error queue
    /// ([`crate::recv_tx_stamps`]; [`Arm::ErrorPoll`] to be woken).
    TxStamps {
        /// The socket's fixed-file slot.
        slot: u32,
    },
    /// A multishot poll for error readiness (`POLLERR`: something on the error queue, such as a
    /// transmit stamp) on fixed-file `slot`.
    ErrorPoll {
        /// The socket's fixed-file slot.
        slot: u32,
    },
    /// A read of the waker eventfd ([`Ring::waker`]): completes when another thread notifies.
    Waker,
}

/// The headers of one send; one per buffer, used while that buffer is being sent.
#[repr(C)]
struct SendSlot {
    /// The message header handed to the kernel.
    msg: libc::msghdr,
    /// The one I/O vector: the payload inside the buffer.
    iov: libc::iovec,
    /// The destination.
    addr: libc::sockaddr_in6,
    /// The send's control messages: a `UDP_SEGMENT` size for a GSO send, an `SCM_TS_OPT_ID`
    /// for a stamped one (u64s: cmsg alignment).
    control: [u64; crate::cmsg::SEND_CMSG_SPACE / 8],
    /// The caller's [`UserData`], encoded, which the completion carries back.
    user: u64,
    /// For a receive buffer: its receive's completion length, which the token it gets back
    /// carries again.
    rx_len: u32,
    /// Whether the send asked for UDP GSO (an `EIO` then lowers [`Gso::max_segments`]).
    segmented: bool,
}

/// One completion, copied out of the completion queue.
#[derive(Debug)]
pub struct Completion {
    /// What the submission was (kind 0 where it could not be decoded).
    pub user_data: UserData,
    /// The result: bytes, or a negative errno.
    pub result: i32,
    /// Completion flags.
    pub flags: u32,
    /// The second half of a 32-byte completion (a transmit stamp's time; zero for others).
    pub big: [u64; 2],
    /// The buffer it hands over: a receive's, or the one a send sent from.
    buf: Option<Buf>,
}

impl Completion {
    /// Whether a multishot request stays armed after this completion.
    #[must_use]
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The transmit stamp a completion of [`Arm::TxStamps`] carries.
    ///
    /// # Errors
    /// The request ended, or the completion holds no software send stamp (see
    /// [`crate::txstamp::from_completion`]).
    pub fn tx_stamp(&self) -> Result<crate::txstamp::TxStamp, crate::txstamp::TxStampError> {
        crate::txstamp::from_completion(self.result, self.flags, self.big)
    }

    /// The receive buffer it hands over (a receive's datagram, or the buffer a send sent from),
    /// once. One not taken goes back to its group when the completions are given back
    /// ([`Ring::give_back`]).
    pub fn take_rx(&mut self) -> Option<RxBuf> {
        match self.buf.take() {
            Some(Buf::Rx(b)) => Some(b),
            other => {
                self.buf = other;
                None
            }
        }
    }

    /// The buffer it hands over, of either kind, once (see [`Completion::take_rx`]).
    pub fn take_buf(&mut self) -> Option<Buf> {
        self.buf.take()
    }

    /// The transmit buffer a send sent from, once (see [`Completion::take_rx`]).
    pub fn take_tx(&mut self) -> Option<TxBuf> {
        match self.buf.take() {
            Some(Buf::Tx(b)) => Some(b),
            other => {
                self.buf = other;
                None
            }
        }
    }
}

/// A datagram received into a provided buffer.
#[derive(Debug)]
pub struct Received<'a> {
    /// Its source, when the address family is IPv4 or IPv6.
    pub from: Option<SocketAddr>,
    /// Its payload.
    pub payload: &'a [u8],
    /// Whether the payload was longer than the buffer and cut.
    pub truncated: bool,
    /// With UDP GRO: the datagrams coalesced into this payload are this size each (the last may
    /// be shorter); `None` for a single datagram.
    pub segment: Option<u16>,
    /// The control messages the kernel attached (the receive timestamp, where the socket asked
    /// for it: see [`crate::cmsg::rx_timestamp`]).
    pub control: &'a [u8],
}

/// [`Received`] with its payload writable ([`Ring::received_mut`]): for a datagram changed in
/// place before it is sent on from the same buffer.
#[derive(Debug)]
pub struct ReceivedMut<'a> {
    /// Its source, when the address family is IPv4 or IPv6.
    pub from: Option<SocketAddr>,
    /// Its payload, writable.
    pub payload: &'a mut [u8],
    /// Whether the payload was longer than the buffer and cut.
    pub truncated: bool,
    /// With UDP GRO: the coalesced datagrams' size (see [`Received::segment`]).
    pub segment: Option<u16>,
    /// The control messages the kernel attached.
    pub control: &'a [u8],
}

/// One buffer group: its provided-buffer ring (the receive buffers the kernel picks from), its
/// receive and transmit buffers, and one send header per buffer. A ring holds one or two, each
/// addressed by a [`Group`].
struct BufGroup {
    /// Page-aligned buffer-ring entries (mmap), `entries` × 16 bytes.
    ring_mem: NonNull<BufRingEntry>,
    /// Length of the mapping.
    ring_len: usize,
    /// Number of receive buffers (= entries, a power of two).
    entries: u16,
    /// The kernel's buffer id of receive buffer 0: the groups' ids do not overlap, so a
    /// completion's buffer id alone says which group it is in.
    bid_base: u16,
    /// Our copy of the buffer ring's tail.
    tail: u16,
    /// Size of each receive and transmit buffer.
    size: usize,
    /// The receive buffers, `entries` × `size` bytes.
    rx: Box<[u8]>,
    /// The transmit buffers, `tx_count` × `size` bytes.
    tx: Box<[u8]>,
    /// Free transmit buffers.
    free: Vec<u16>,
    /// Send headers: one per receive buffer, then one per transmit buffer.
    sends: Box<[SendSlot]>,
}

impl std::fmt::Debug for BufGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufGroup")
            .field("entries", &self.entries)
            .field("size", &self.size)
            .field("free_tx", &self.free.len())
            .finish_non_exhaustive()
    }
}

impl BufGroup {
    /// Maps and fills a group of `entries` (a power of two) receive buffers and `tx_count`
    /// transmit buffers of `size` bytes, the first receive buffer's kernel id `bid_base`. Not
    /// registered yet.
    fn new(entries: u16, bid_base: u16, tx_count: u16, size: usize) -> Result<Self, SetupError> {
        let (ring_mem, ring_len) = map_buf_ring(entries)?;
        let slots = usize::from(entries) + usize::from(tx_count);
        Ok(Self {
            ring_mem,
            ring_len,
            entries,
            bid_base,
            tail: 0,
            size,
            rx: vec![0u8; usize::from(entries) * size].into_boxed_slice(),
            tx: vec![0u8; usize::from(tx_count) * size].into_boxed_slice(),
            free: (0..tx_count).rev().collect(),
            sends: (0..slots)
                // SAFETY: all fields of SendSlot are plain old data; all-zero is valid for each.
                .map(|_| unsafe { std::mem::zeroed::<SendSlot>() })
                .collect(),
        })
    }

    fn tx_count(&self) -> u16 {
        u16::try_from(self.sends.len() - usize::from(self.entries)).unwrap_or(u16::MAX)
    }

    fn capacity(&self) -> Capacity {
        Capacity {
            rx: self.entries,
            tx: self.tx_count(),
            max_payload: self.size - PAYLOAD_OFFSET,
            tx_size: self.size,
        }
    }

    /// Puts receive buffer `id` in the buffer ring (visible after [`BufGroup::publish`]).
    fn push_rx(&mut self, id: u16) {
        if id >= self.entries {
            return;
        }
        let idx = usize::from(self.tail & (self.entries - 1));
        let addr = self.rx[usize::from(id) * self.size..].as_ptr() as u64;
        // SAFETY: idx < entries, so the entry lies inside the mapping, which we own; the kernel
        // reads entries only up to the tail we publish in `publish`, after this write.
        let entry = unsafe { &mut *self.ring_mem.as_ptr().add(idx) };
        entry.set_addr(addr);
        entry.set_len(u32::try_from(self.size).unwrap_or(u32::MAX));
        entry.set_bid(self.bid_base + id);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the buffers pushed since the last call: one release store.
    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's `resv`, inside the mapping; the
        // kernel reads it atomically, so we store it atomically with release ordering.
        unsafe {
            let tail = BufRingEntry::tail(self.ring_mem.as_ptr()).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The bytes receive buffer `id` holds, its completion having reported `len`.
    fn rx_bytes(&self, id: u16, len: u32) -> Option<&[u8]> {
        let start = usize::from(id).checked_mul(self.size)?;
        let len = usize::try_from(len).ok()?.min(self.size);
        self.rx.get(start..start + len)
    }

    /// [`BufGroup::rx_bytes`], writable.
    fn rx_bytes_mut(&mut self, id: u16, len: u32) -> Option<&mut [u8]> {
        let start = usize::from(id).checked_mul(self.size)?;
        let len = usize::try_from(len).ok()?.min(self.size);
        self.rx.get_mut(start..start + len)
    }

    /// Where receive buffer `id`'s payload bytes `range` lie in `rx` (within its payload, whose
    /// completion length was `len`).
    fn rx_payload_range(
        &self,
        id: u16,
        len: u32,
        recv_msg: &libc::msghdr,
        range: &Range<usize>,
    ) -> Option<Range<usize>> {
        let h = parse_header(self.rx_bytes(id, len)?, recv_msg)?;
        (range.start <= range.end && range.end <= h.payload).then_some(())?;
        let base = usize::from(id) * self.size + PAYLOAD_OFFSET;
        Some(base + range.start..base + range.end)
    }

    /// Where transmit buffer `id`'s bytes `range` lie in `tx`.
    fn tx_range(&self, id: u16, range: &Range<usize>) -> Option<Range<usize>> {
        (id < self.tx_count() && range.start <= range.end && range.end <= self.size)
            .then_some(())?;
        let base = usize::from(id) * self.size;
        Some(base + range.start..base + range.end)
    }

    /// Fills the send header of `buf` for its first `len` payload bytes (a receive buffer's
    /// payload, a transmit buffer's bytes) and builds its SendMsg, whose user_data names the
    /// buffer. `None` when `buf` is not one of this group's.
    #[allow(clippy::too_many_arguments)] // one send's facts
    fn send_entry(
        &mut self,
        buf: &Buf,
        large: bool,
        len: usize,
        to: SocketAddr,
        slot: u32,
        user: UserData,
        opts: SendOpts,
    ) -> Option<squeue::Entry> {
        let (index, bytes, marker, rx_len) = match buf {
            Buf::Rx(b) => {
                let start = usize::from(b.id).checked_mul(self.size)? + PAYLOAD_OFFSET;
                let n = len.min(self.size - PAYLOAD_OFFSET);
                (b.id < self.entries).then_some(())?;
                let bytes = self.rx.get_mut(start..start + n)?;
                (usize::from(b.id), bytes, u64::from(b.id), b.len)
            }
            Buf::Tx(t) => {
                let r = self.tx_range(t.id, &(0..len.min(self.size)))?;
                let bytes = self.tx.get_mut(r)?;
                let index = usize::from(self.entries) + usize::from(t.id);
                (index, bytes, SEND_TX_BIT | u64::from(t.id), 0)
            }
        };
        let s = self.sends.get_mut(index)?;
        s.user = user.encode();
        s.rx_len = rx_len;
        s.segmented = opts.segment.is_some();
        let ud = SEND_BIT | if large { SEND_LARGE_BIT } else { 0 } | marker;
        Some(prepare_send(s, bytes, to, slot, ud, opts))
    }
}

/// The io_uring, its buffer groups and everything the kernel may read or write through it.
pub struct Ring {
    /// The ring, with 32-byte completions (transmit stamps carry their time in the second half).
    ring: IoUring<squeue::Entry, cqueue::Entry32>,
    /// Tells this ring's tokens from another's.
    id: u32,
    /// The buffer groups, by [`Group::index`]: the small one always, the large one after
    /// [`RingBuilder::large`].
    groups: [Option<BufGroup>; 2],
    /// The header multishot receives describe their layout with.
    recv_msg: Box<libc::msghdr>,
    /// Wakes the ring from other threads.
    waker: std::sync::Arc<EventFd>,
    /// The eventfd read's 8-byte target.
    wake_buf: Box<u64>,
    /// Completions copied out, reused.
    scratch: Vec<Completion>,
    /// Sends pushed since the last wait: they complete during the next submit (UDP sends are
    /// issued inline), so the wait asks for that many completions more than it needs to wake.
    unwaited_sends: usize,
    /// Receive completions a wait gathers before it returns early (1: return on the first).
    batch: usize,
    /// With `batch` > 1: how long a wait may hold for the batch before returning on whatever
    /// has arrived (IORING_ENTER min_wait, Linux 6.12+); 0 disables batching.
    batch_wait_usec: u32,
    /// Whether the kernel supports min_wait.
    min_timeout: bool,
    /// Whether a send with a stamp id completes twice (its stamp arrives as a completion of
    /// [`Arm::TxStamps`]), so the next wait counts it in.
    stamp_completions: bool,
    /// UDP GSO's limit on this ring.
    gso: Gso,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("id", &self.id)
            .field("groups", &self.groups)
            .field("gso", &self.gso)
            .finish_non_exhaustive()
    }
}

/// How a ring is made: [`Ring::builder`], then the sizes, then [`RingBuilder::build`].
#[derive(Clone, Copy, Debug)]
#[must_use = "a builder makes nothing until build"]
pub struct RingBuilder {
    sq_entries: u32,
    buffers: u16,
    files: u32,
    tx: u16,
    buffer_size: usize,
    large: Option<(u16, u16)>,
    batching: Option<(usize, Duration)>,
}

impl RingBuilder {
    /// The small group's receive buffers (rounded up to a power of two, at most 32768;
    /// default 1).
    pub const fn buffers(mut self, n: u16) -> Self {
        self.buffers = n;
        self
    }

    /// Fixed-file slots, one per socket (at most [`MAX_FILES`]; default 1).
    pub const fn files(mut self, n: u32) -> Self {
        self.files = n;
        self
    }

    /// The small group's transmit buffers (default 0).
    pub const fn tx(mut self, n: u16) -> Self {
        self.tx = n;
        self
    }

    /// The small group's buffer size in bytes (clamped to [`BUFFER_SIZE`]..=[`MAX_BUFFER_SIZE`];
    /// default [`BUFFER_SIZE`]): a socket with UDP GRO needs room for a whole coalesced
    /// datagram, and a GSO send for all its segments.
    pub const fn buffer_size(mut self, bytes: usize) -> Self {
        self.buffer_size = bytes;
        self
    }

    /// Adds the large group: `count` receive buffers (rounded up to a power of two) and `tx`
    /// transmit buffers, each of [`MAX_BUFFER_SIZE`] (room for a GRO-coalesced receive, or a
    /// GSO send of up to 64 KiB), for the sockets armed with [`Arm::Recv`] into
    /// [`Group::Large`].
    pub const fn large(mut self, count: u16, tx: u16) -> Self {
        self.large = Some((count, tx));
        self
    }

    /// Makes each wait gather up to `batch` completions: the kernel waits for `batch` until
    /// `wait` has passed, then returns as soon as one is there (IORING_ENTER min_wait, Linux
    /// 6.12+; ignored where unsupported, see [`Ring::batching_supported`]). Fewer wake-ups per
    /// packet at high rates, at most `wait` of added latency. `batch` 1 or `wait` 0: return on
    /// the first completion (the default).
    pub const fn batching(mut self, batch: usize, wait: Duration) -> Self {
        self.batching = Some((batch, wait));
        self
    }

    /// Creates the ring on the calling thread, which must be the only one to use it.
    ///
    /// # Errors
    /// What failed, in words that name the cause and the way out: the kernel refused the ring or
    /// a buffer group, the two groups together would have more than 65536 receive buffers, or
    /// more than [`MAX_FILES`] files were asked for.
    pub fn build(self) -> Result<Ring, SetupError> {
        let mut ring = Ring::with_buffer_size(
            self.sq_entries,
            self.buffers,
            self.files,
            self.tx,
            self.buffer_size,
        )?;
        if let Some((count, tx)) = self.large {
            ring.add_large(count, tx)?;
        }
        if let Some((batch, wait)) = self.batching {
            ring.set_batching(batch, wait);
        }
        Ok(ring)
    }
}

impl Ring {
    /// A ring with `sq_entries` submissions (4× completions), sized by the builder's methods.
    pub const fn builder(sq_entries: u32) -> RingBuilder {
        RingBuilder {
            sq_entries,
            buffers: 1,
            files: 1,
            tx: 0,
            buffer_size: BUFFER_SIZE,
            large: None,
            batching: None,
        }
    }

    /// Creates the ring on the calling thread (which must be the only one to use it), with
    /// `sq_entries` submissions, 4× completions, a fixed-file table of `files` slots (at most
    /// [`MAX_FILES`]), and the small group: `buffers` receive buffers (rounded up to a power of
    /// two, at most 32768) and `tx_count` transmit buffers of [`BUFFER_SIZE`].
    ///
    /// # Errors
    /// What failed, in words that name the cause and the way out.
    #[cfg(test)]
    fn with_tx(
        sq_entries: u32,
        buffers: u16,
        files: u32,
        tx_count: u16,
    ) -> Result<Self, SetupError> {
        Self::with_buffer_size(sq_entries, buffers, files, tx_count, BUFFER_SIZE)
    }

    /// The ring [`RingBuilder::build`] makes, without its large group and batching: receive and
    /// transmit buffers of `buffer_size` bytes (clamped to [`BUFFER_SIZE`]..=[`MAX_BUFFER_SIZE`]).
    ///
    /// # Errors
    /// What failed, in words that name the cause and the way out.
    fn with_buffer_size(
        sq_entries: u32,
        buffers: u16,
        files: u32,
        tx_count: u16,
        buffer_size: usize,
    ) -> Result<Self, SetupError> {
        let invalid = |step, what: &str| SetupError::Other {
            step,
            source: io::Error::new(io::ErrorKind::InvalidInput, what),
        };
        if files > MAX_FILES {
            return Err(invalid(
                "register_files_sparse",
                "more than 2^24 fixed files",
            ));
        }
        let entries = buffers
            .max(1)
            .checked_next_power_of_two()
            .filter(|&n| n <= 1 << 15)
            .ok_or_else(|| invalid("register_buf_ring", "more than 32768 receive buffers"))?;
        let buffer_size = buffer_size
            .clamp(BUFFER_SIZE, MAX_BUFFER_SIZE)
            .next_multiple_of(64);
        let ring = IoUring::<squeue::Entry, cqueue::Entry32>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_cqsize(sq_entries * 4)
            .build(sq_entries)
            .map_err(|e| classify("io_uring_setup", e))?;
        ring.submitter()
            .register_files_sparse(files)
            .map_err(|e| classify("register_files_sparse", e))?;
        let waker = EventFd::new().map_err(|e| classify("eventfd", e))?;
        // SAFETY: msghdr is plain old data; all-zero is a valid (empty) header.
        let mut recv_msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_msg.msg_namelen = NAME_LEN_SOCKLEN;
        recv_msg.msg_controllen = CONTROL_LEN;
        let mut this = Self {
            ring,
            id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed),
            groups: [None, None],
            recv_msg,
            waker: std::sync::Arc::new(waker),
            wake_buf: Box::new(0),
            scratch: Vec::with_capacity(sq_entries as usize * 4),
            unwaited_sends: 0,
            batch: 1,
            batch_wait_usec: 0,
            min_timeout: false,
            stamp_completions: false,
            gso: Gso {
                max_segments: crate::socket::max_gso_segments(),
                fallbacks: 0,
            },
        };
        this.min_timeout = this.ring.params().is_feature_min_timeout();
        this.register_group(
            Group::Small,
            BufGroup::new(entries, 0, tx_count, buffer_size)?,
        )?;
        Ok(this)
    }

    /// Adds the large group: `count` receive buffers (rounded up to a power of two) and
    /// `tx_count` transmit buffers, each of [`MAX_BUFFER_SIZE`] (room for a GRO-coalesced
    /// receive, or a GSO send of up to 64 KiB), for the sockets armed with
    /// [`Arm::Recv`] into [`Group::Large`].
    ///
    /// # Errors
    /// The large group exists already, the two groups together would have more than 65536
    /// receive buffers, or the kernel refused it.
    fn add_large(&mut self, count: u16, tx_count: u16) -> Result<(), SetupError> {
        let other = |what: &str| SetupError::Other {
            step: "add_large",
            source: io::Error::other(what),
        };
        if self.groups[Group::Large.index()].is_some() {
            return Err(other("the large group exists already"));
        }
        let base = self.groups[Group::Small.index()]
            .as_ref()
            .map_or(0, |g| g.entries);
        let entries = count
            .max(1)
            .checked_next_power_of_two()
            .filter(|&n| u32::from(base) + u32::from(n) <= 1 << 16)
            .ok_or_else(|| other("more than 65536 receive buffers in all"))?;
        let group = BufGroup::new(entries, base, tx_count, MAX_BUFFER_SIZE)?;
        self.register_group(Group::Large, group)
    }

    /// Registers `group`'s buffer ring as `g`, fills it and keeps it.
    fn register_group(&mut self, g: Group, mut group: BufGroup) -> Result<(), SetupError> {
        let bgid = u16::try_from(g.index()).unwrap_or(u16::MAX);
        // SAFETY: the mapping is page-aligned, zeroed, `entries` long, and lives in `self.groups`
        // from here on; `Drop` unregisters the group before unmapping it.
        let registered = unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                group.ring_mem.as_ptr() as u64,
                group.entries,
                bgid,
                0,
            )
        };
        if let Err(e) = registered {
            // SAFETY: the mapping was made with this length and is not registered.
            unsafe { libc::munmap(group.ring_mem.as_ptr().cast(), group.ring_len) };
            return Err(classify("register_buf_ring", e));
        }
        for id in 0..group.entries {
            group.push_rx(id);
        }
        group.publish();
        self.groups[g.index()] = Some(group);
        Ok(())
    }

    /// A handle other threads use to wake the ring.
    #[must_use]
    pub fn waker(&self) -> std::sync::Arc<EventFd> {
        std::sync::Arc::clone(&self.waker)
    }

    /// The sizes of group `g`; `None` for the large group before [`RingBuilder::large`].
    #[must_use]
    pub fn capacity(&self, g: Group) -> Option<Capacity> {
        self.groups[g.index()].as_ref().map(BufGroup::capacity)
    }

    /// UDP GSO's limit on this ring, and how often an `EIO` lowered it.
    #[must_use]
    pub const fn gso(&self) -> Gso {
        self.gso
    }

    /// Puts socket `fd` in fixed-file slot `slot` (the ring keeps its own reference).
    ///
    /// # Errors
    /// The registration failed.
    pub fn register_socket(&mut self, slot: u32, fd: RawFd) -> io::Result<()> {
        self.ring
            .submitter()
            .register_files_update(slot, &[fd])
            .map(drop)
    }

    /// Clears fixed-file slot `slot`.
    ///
    /// # Errors
    /// The registration failed.
    pub fn unregister_socket(&mut self, slot: u32) -> io::Result<()> {
        self.ring
            .submitter()
            .register_files_update(slot, &[-1])
            .map(drop)
    }

    /// Pushes an entry that is not a send (those are [`Ring::send`]'s), submitting what the
    /// queue holds first when it is full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry built in this module points only at memory owned by `self` that
        // lives as long as the ring: the boxed receive `msghdr` and eventfd buffer, the
        // groups' buffer rings; none points into a buffer (see `Ring::send` for sends).
        let pushed = unsafe { self.ring.submission().push(entry) };
        if pushed.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(entry) }
                .map_err(|_| io::Error::other("submission queue full after submit"))?;
        }
        Ok(())
    }

    /// Whether the submission queue is full, so that the next push submits what it holds first.
    pub fn submission_full(&mut self) -> bool {
        self.ring.submission().is_full()
    }

    /// Submits what `arm` says, whose completions carry `user_data`.
    ///
    /// # Errors
    /// [`Arm::Recv`] into a group the ring does not have, or the submission queue could not
    /// take it.
    pub fn arm(&mut self, arm: Arm, user_data: UserData) -> io::Result<()> {
        let e = match arm {
            Arm::Recv { slot, group } => {
                if self.groups[group.index()].is_none() {
                    return Err(io::Error::other("no large buffer group"));
                }
                let bgid = u16::try_from(group.index()).unwrap_or(u16::MAX);
                opcode::RecvMsgMulti::new(Fixed(slot), &*self.recv_msg, bgid).build()
            }
            Arm::TxStamps { slot } => {
                opcode::UringCmd16::new(Fixed(slot), crate::txstamp::SOCKET_URING_OP_TX_TIMESTAMP)
                    .build()
            }
            #[allow(clippy::cast_sign_loss)] // POLLERR is a small positive flag
            Arm::ErrorPoll { slot } => opcode::PollAdd::new(Fixed(slot), libc::POLLERR as u32)
                .multi(true)
                .build(),
            Arm::Waker => opcode::Read::new(
                io_uring::types::Fd(self.waker.raw()),
                std::ptr::from_mut::<u64>(&mut self.wake_buf).cast(),
                8,
            )
            .build(),
        };
        self.push(&e.user_data(user_data.encode()))
    }

    /// Cancels the request submitted with `target`; the cancel's own completion carries
    /// `user_data`.
    ///
    /// # Errors
    /// The submission queue could not take it.
    pub fn cancel(&mut self, target: UserData, user_data: UserData) -> io::Result<()> {
        let e = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(user_data.encode());
        self.push(&e)
    }

    /// The datagram in `buf`; `None` when the kernel's header does not parse, or `buf` is
    /// another ring's.
    #[must_use]
    pub fn received(&self, buf: &RxBuf) -> Option<Received<'_>> {
        let g = self.group_of(buf.ring, buf.group)?;
        let bytes = g.rx_bytes(buf.id, buf.len)?;
        let h = parse_header(bytes, &self.recv_msg)?;
        Some(Received {
            from: h.from,
            payload: bytes.get(PAYLOAD_OFFSET..PAYLOAD_OFFSET + h.payload)?,
            truncated: h.truncated,
            segment: h.segment,
            control: bytes.get(16 + NAME_LEN..16 + NAME_LEN + h.control)?,
        })
    }

    /// The datagram in `buf` with its payload writable, from one parse of the kernel's header:
    /// for a datagram changed in place before it is sent on from the same buffer.
    #[must_use]
    pub fn received_mut(&mut self, buf: &mut RxBuf) -> Option<ReceivedMut<'_>> {
        let recv_msg = &*self.recv_msg;
        let g = self.groups[buf.group.index()]
            .as_mut()
            .filter(|_| buf.ring == self.id)?;
        let bytes = g.rx_bytes_mut(buf.id, buf.len)?;
        let h = parse_header(bytes, recv_msg)?;
        let (head, payload) = bytes.split_at_mut(PAYLOAD_OFFSET);
        Some(ReceivedMut {
            from: h.from,
            payload: payload.get_mut(..h.payload)?,
            truncated: h.truncated,
            segment: h.segment,
            control: head.get(16 + NAME_LEN..16 + NAME_LEN + h.control)?,
        })
    }

    /// Gives `buf` back: a receive buffer to the kernel (visible after [`Ring::sync_buffers`]), a
    /// transmit buffer to its group's free list. Another ring's buffer is dropped.
    ///
    /// A buffer in flight cannot be recycled: the send took its token.
    ///
    /// ```compile_fail
    /// use relay_io::ring::{Group, Ring, UserData};
    /// fn in_flight(ring: &mut Ring, to: std::net::SocketAddr) {
    ///     let buf = ring.tx_acquire(Group::Small).unwrap();
    ///     let _ = ring.send(0, buf, 20, to, UserData::of(1), Default::default());
    ///     ring.recycle(buf); // moved into the send
    /// }
    /// ```
    pub fn recycle(&mut self, buf: impl Into<Buf>) {
        let this = self.id;
        match buf.into() {
            Buf::Rx(b) => {
                if let Some(g) = self.groups[b.group.index()]
                    .as_mut()
                    .filter(|_| b.ring == this)
                {
                    g.push_rx(b.id);
                }
            }
            Buf::Tx(t) => {
                if let Some(g) = self.groups[t.group.index()]
                    .as_mut()
                    .filter(|_| t.ring == this)
                {
                    if t.id < g.tx_count() {
                        g.free.push(t.id);
                    }
                }
            }
        }
    }

    /// A free transmit buffer of group `g`, if any: fill it ([`Ring::tx_buffer`], [`Ring::copy`])
    /// and send it ([`Ring::send`]), or recycle it.
    pub fn tx_acquire(&mut self, g: Group) -> Option<TxBuf> {
        let id = self.groups[g.index()].as_mut()?.free.pop()?;
        Some(TxBuf {
            ring: self.id,
            group: g,
            id,
        })
    }

    /// The bytes of transmit buffer `buf`, its whole size; `None` for another ring's.
    pub fn tx_buffer(&mut self, buf: &mut TxBuf) -> Option<&mut [u8]> {
        let this = self.id;
        let g = self.groups[buf.group.index()]
            .as_mut()
            .filter(|_| buf.ring == this)?;
        let r = g.tx_range(buf.id, &(0..g.size))?;
        g.tx.get_mut(r)
    }

    /// Copies bytes `range` of `from` (of a receive buffer's payload, or of a transmit buffer)
    /// into transmit buffer `to` at byte `at`, of either group; returns the bytes copied. `None`
    /// (nothing copied) when the range lies past the source's end or the copy past `to`'s, or a
    /// buffer is another ring's. For a segment cut out of a coalesced receive, a datagram
    /// gathered into a GSO send, a second copy of a datagram.
    pub fn copy<'a>(
        &mut self,
        from: impl Into<BufRef<'a>>,
        range: Range<usize>,
        to: &mut TxBuf,
        at: usize,
    ) -> Option<usize> {
        let n = range.end.checked_sub(range.start)?;
        let (src_group, src_rx, src) = match from.into() {
            BufRef::Rx(b) => {
                let g = self.group_of(b.ring, b.group)?;
                (
                    b.group,
                    true,
                    g.rx_payload_range(b.id, b.len, &self.recv_msg, &range)?,
                )
            }
            BufRef::Tx(t) => {
                let g = self.group_of(t.ring, t.group)?;
                (t.group, false, g.tx_range(t.id, &range)?)
            }
        };
        let dst = self
            .group_of(to.ring, to.group)?
            .tx_range(to.id, &(at..at.checked_add(n)?))?;
        let [small, large] = &mut self.groups;
        let (src_g, dst_g) = match (src_group, to.group) {
            (Group::Small, Group::Large) => (small.as_mut()?, large.as_mut()),
            (Group::Large, Group::Small) => (large.as_mut()?, small.as_mut()),
            (g, _) => {
                let g = match g {
                    Group::Small => small,
                    Group::Large => large,
                }
                .as_mut()?;
                if src_rx {
                    g.tx.get_mut(dst)?.copy_from_slice(g.rx.get(src)?);
                } else {
                    // Two tokens are two buffers: the ranges do not overlap.
                    g.tx.get(src.clone())?;
                    g.tx.get(dst.clone())?;
                    g.tx.copy_within(src, dst.start);
                }
                return Some(n);
            }
        };
        let bytes = if src_rx {
            src_g.rx.get(src)?
        } else {
            src_g.tx.get(src)?
        };
        dst_g?.tx.get_mut(dst)?.copy_from_slice(bytes);
        Some(n)
    }

    /// Sends the first `len` bytes of `buf` (a receive buffer's payload, or a transmit
    /// buffer's bytes) from fixed-file `slot` to `to`, with what `opts` asks: UDP GSO segments
    /// (the kernel cuts the payload into datagrams of `segment` bytes, the last maybe shorter;
    /// at most [`Gso::max_segments`] of them), and the id its kernel transmit stamp comes back
    /// with ([`Arm::TxStamps`]). The send takes the buffer; its completion gives it back
    /// ([`Completion::take_rx`], [`Completion::take_tx`]).
    ///
    /// A buffer cannot be sent twice, nor recycled while in flight: the token is moved.
    ///
    /// ```compile_fail
    /// use relay_io::ring::{Group, Ring, UserData};
    /// fn twice(ring: &mut Ring, to: std::net::SocketAddr) {
    ///     let buf = ring.tx_acquire(Group::Small).unwrap();
    ///     let _ = ring.send(0, buf, 20, to, UserData::of(1), Default::default());
    ///     let _ = ring.send(0, buf, 20, to, UserData::of(1), Default::default()); // moved
    /// }
    /// ```
    ///
    /// ```no_run
    /// use relay_io::ring::{Group, Ring, UserData};
    /// fn once(ring: &mut Ring, to: std::net::SocketAddr) {
    ///     let buf = ring.tx_acquire(Group::Small).unwrap();
    ///     if let Err(refused) = ring.send(0, buf, 20, to, UserData::of(1), Default::default()) {
    ///         ring.recycle(refused.buf);
    ///     }
    /// }
    /// ```
    ///
    /// # Errors
    /// The submission queue could not take it, or the buffer is another ring's; the buffer
    /// comes back in the error.
    pub fn send(
        &mut self,
        slot: u32,
        buf: impl Into<Buf>,
        len: usize,
        to: SocketAddr,
        user_data: UserData,
        opts: SendOpts,
    ) -> Result<(), Refused> {
        let buf = buf.into();
        let (ring, group) = match &buf {
            Buf::Rx(b) => (b.ring, b.group),
            Buf::Tx(t) => (t.ring, t.group),
        };
        let refuse = |error, buf| Err(Refused { error, buf });
        if ring != self.id {
            return refuse(io::Error::other("a buffer of another ring"), buf);
        }
        if self.ring.submission().is_full() {
            if let Err(e) = self.ring.submit() {
                return refuse(e, buf);
            }
        }
        let Some(entry) = self.groups[group.index()].as_mut().and_then(|g| {
            g.send_entry(&buf, group == Group::Large, len, to, slot, user_data, opts)
        }) else {
            return refuse(io::Error::other("buffer out of range"), buf);
        };
        // SAFETY: the entry points at the send header and the bytes of `buf`'s buffer, in the
        // group's boxed arrays, which live as long as the ring. They stay put and untouched until
        // the send completes because the type system says so, not a convention: the buffer's
        // one token (`RxBuf`/`TxBuf`, neither Clone nor Copy, minted only in this module) is
        // moved into this call and dropped below; the ring mints it again only from this send's
        // completion (its user_data carries the ring's send bit, which no `UserData` can set).
        // Until then no second send can use the buffer or its header, nothing can recycle it,
        // and no `&mut` to its bytes can be had (`tx_buffer`, `received_mut`, `copy` need the
        // token). A token from another ring was refused above.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return refuse(io::Error::other("submission queue full after submit"), buf);
        }
        // The send completes during the next submit, which the next wait accounts for, and so
        // does its transmit stamp when it asks for one that comes as a completion.
        self.unwaited_sends += 1 + usize::from(self.stamp_completions && opts.stamp_id.is_some());
        drop(buf);
        Ok(())
    }

    /// Publishes recycled receive buffers to the kernel: one release store per group per batch.
    pub fn sync_buffers(&mut self) {
        for g in self.groups.iter().flatten() {
            g.publish();
        }
    }

    /// Says whether the stamps of sends with a stamp id come back as completions of
    /// [`Arm::TxStamps`] (on loopback, during the very submit that issues the send): a wait
    /// then counts them in, so they do not end it on their own, as the sends themselves do not.
    pub fn expect_stamps(&mut self, on: bool) {
        self.stamp_completions = on;
    }

    /// Makes each wait gather up to `batch` completions: the kernel waits for `batch` until `wait`
    /// has passed, then returns as soon as one is there (IORING_ENTER min_wait, Linux 6.12+;
    /// ignored where unsupported). Fewer wake-ups per packet at high rates, at most `wait` of
    /// added latency. `batch` 1 or `wait` 0: return on the first completion.
    fn set_batching(&mut self, batch: usize, wait: Duration) {
        self.batch = batch.clamp(1, 256);
        self.batch_wait_usec = u32::try_from(wait.as_micros()).unwrap_or(u32::MAX);
    }

    /// Whether [`RingBuilder::batching`] takes effect on this kernel.
    #[must_use]
    pub const fn batching_supported(&self) -> bool {
        self.min_timeout
    }

    /// Submits everything queued and waits for a completion (or a batch, see
    /// [`RingBuilder::batching`]) or `timeout`. Sends submitted now complete during the submit;
    /// the wait counts them in, so they do not end it on their own (which would cost a second
    /// `io_uring_enter` for every packet forwarded).
    ///
    /// # Errors
    /// `io_uring_enter` failed with something other than a timeout or an interruption.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        let batching = self.min_timeout && self.batch > 1 && self.batch_wait_usec > 0;
        let want = self.unwaited_sends.min(1024) + if batching { self.batch } else { 1 };
        self.unwaited_sends = 0;
        let r = match timeout {
            Some(t) => {
                let ts = Timespec::from(t);
                let args = SubmitArgs::new().timespec(&ts);
                let args = if batching {
                    args.min_wait_usec(self.batch_wait_usec)
                } else {
                    args
                };
                self.ring.submitter().submit_with_args(want, &args)
            }
            None => self.ring.submitter().submit_and_wait(want),
        };
        match r {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// Submits everything queued without waiting.
    ///
    /// # Errors
    /// `io_uring_enter` failed.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.ring.submit()
    }

    /// Copies every available completion out of the queue, each with the buffer it hands over
    /// (a receive's, or the one a send sent from). A send that asked for GSO and failed with
    /// `EIO` lowers [`Gso::max_segments`] to 1; its completion still says it failed, so the
    /// caller accounts for its datagrams as for any failed send.
    pub fn drain_completions(&mut self) -> Vec<Completion> {
        let mut out = std::mem::take(&mut self.scratch);
        self.reclaim(&mut out);
        out.clear();
        let (id, groups, gso) = (self.id, &mut self.groups, &mut self.gso);
        for c in self.ring.completion() {
            let (user_data, result, flags) = (c.user_data(), c.result(), c.flags());
            let (user, buf) = if user_data & SEND_BIT == 0 {
                // A receive's buffer is the kernel's to report: the flags, never the user_data.
                let buf = cqueue::buffer_select(flags)
                    .and_then(|bid| received_buf(id, groups, bid, result));
                (UserData::decode(user_data), buf)
            } else {
                sent_buf(id, groups, user_data, result, gso)
            };
            out.push(Completion {
                user_data: user.unwrap_or_default(),
                result,
                flags,
                big: *c.big_cqe(),
                buf,
            });
        }
        out
    }

    /// Returns the vector from [`Ring::drain_completions`] for reuse; a buffer no completion
    /// gave up goes back to its group.
    pub fn give_back(&mut self, mut v: Vec<Completion>) {
        self.reclaim(&mut v);
        self.scratch = v;
    }

    /// Recycles the buffers still in `v`'s completions.
    fn reclaim(&mut self, v: &mut [Completion]) {
        for c in v {
            if let Some(b) = c.buf.take() {
                self.recycle(b);
            }
        }
    }

    /// Group `g`, if `ring` is this ring's id and the group exists.
    fn group_of(&self, ring: u32, g: Group) -> Option<&BufGroup> {
        self.groups[g.index()].as_ref().filter(|_| ring == self.id)
    }
}

/// The token for the receive buffer whose kernel id is `bid` (a receive's completion with
/// `result` bytes), in whichever group holds that id.
fn received_buf(ring: u32, groups: &[Option<BufGroup>; 2], bid: u16, result: i32) -> Option<Buf> {
    let len = u32::try_from(result).ok()?;
    [Group::Small, Group::Large].into_iter().find_map(|group| {
        let g = groups[group.index()].as_ref()?;
        let id = bid.checked_sub(g.bid_base).filter(|&id| id < g.entries)?;
        Some(Buf::Rx(RxBuf {
            ring,
            group,
            id,
            len,
        }))
    })
}

/// A send's completion: the caller's user data kept in the send header, and the buffer's token
/// again. An `EIO` on a GSO send lowers the ring's segment limit.
fn sent_buf(
    ring: u32,
    groups: &[Option<BufGroup>; 2],
    user_data: u64,
    result: i32,
    gso: &mut Gso,
) -> (Option<UserData>, Option<Buf>) {
    let group = if user_data & SEND_LARGE_BIT == 0 {
        Group::Small
    } else {
        Group::Large
    };
    let Some(g) = groups[group.index()].as_ref() else {
        return (None, None);
    };
    let id = u16::try_from(user_data & 0xffff).unwrap_or(u16::MAX);
    let tx = user_data & SEND_TX_BIT != 0;
    let index = if tx {
        usize::from(g.entries) + usize::from(id)
    } else {
        usize::from(id)
    };
    let Some(s) = g.sends.get(index) else {
        return (None, None);
    };
    if result == -libc::EIO && s.segmented && gso.max_segments > 1 {
        gso.max_segments = 1;
        gso.fallbacks += 1;
    }
    let buf = if tx {
        Buf::Tx(TxBuf { ring, group, id })
    } else {
        Buf::Rx(RxBuf {
            ring,
            group,
            id,
            len: s.rx_len,
        })
    };
    (UserData::decode(s.user), Some(buf))
}

impl Drop for Ring {
    fn drop(&mut self) {
        for (bgid, g) in (0u16..).zip(self.groups.iter_mut()) {
            if let Some(g) = g.take() {
                let _ = self.ring.submitter().unregister_buf_ring(bgid);
                // SAFETY: made in `BufGroup::new` with this length, no longer registered.
                unsafe {
                    libc::munmap(g.ring_mem.as_ptr().cast(), g.ring_len);
                }
            }
        }
    }
}

/// Maps the memory of a buffer ring of `entries` entries (page-aligned, zeroed); returns it and
/// its length, for `munmap` once the ring is unregistered.
fn map_buf_ring(entries: u16) -> Result<(NonNull<BufRingEntry>, usize), SetupError> {
    let ring_len = usize::from(entries) * size_of::<BufRingEntry>();
    // SAFETY: an anonymous private mapping with no address hint; the result is checked.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ring_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(classify("mmap", io::Error::last_os_error()));
    }
    let ring_mem = NonNull::new(mem.cast::<BufRingEntry>()).ok_or_else(|| SetupError::Other {
        step: "mmap",
        source: io::Error::other("null mapping"),
    })?;
    Ok((ring_mem, ring_len))
}

/// What the kernel's `io_uring_recvmsg_out` header of a received buffer says.
struct Header {
    /// The source address.
    from: Option<SocketAddr>,
    /// Payload bytes (after [`PAYLOAD_OFFSET`]).
    payload: usize,
    /// Control bytes (after the header and the name field), at most [`CONTROL_LEN`].
    control: usize,
    /// The payload was cut.
    truncated: bool,
    /// The GRO segment size in the control messages.
    segment: Option<u16>,
}

/// Reads a multishot receive's buffer: header, name field, control field, payload. The layout
/// is fixed, so the parser's views (which borrow it, not the buffer) come down to lengths.
fn parse_header(buf: &[u8], recv_msg: &libc::msghdr) -> Option<Header> {
    let out = RecvMsgOut::parse(buf, recv_msg).ok()?;
    let (from, payload, control, truncated) = (
        sockaddr_from_bytes(out.name_data()),
        out.payload_data().len(),
        out.control_data().len().min(CONTROL_LEN),
        out.is_payload_truncated(),
    );
    let control_bytes = buf.get(16 + NAME_LEN..16 + NAME_LEN + control)?;
    buf.get(PAYLOAD_OFFSET..PAYLOAD_OFFSET + payload)?;
    Some(Header {
        from,
        payload,
        control,
        truncated,
        segment: crate::cmsg::gro_segment(control_bytes).ok().flatten(),
    })
}
/// Fills a send slot for `payload` to `to` (with the control messages `opts` asks for) and builds
/// its SendMsg. The slot and the payload must stay put until the send completes
/// (both live in the ring's boxed arrays).
fn prepare_send(
    s: &mut SendSlot,
    payload: &mut [u8],
    to: SocketAddr,
    slot: u32,
    user_data: u64,
    opts: SendOpts,
) -> squeue::Entry {
    let namelen = write_sockaddr(to, &mut s.addr);
    s.iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    s.msg.msg_name = std::ptr::from_mut(&mut s.addr).cast();
    s.msg.msg_namelen = namelen;
    s.msg.msg_iov = &mut s.iov;
    s.msg.msg_iovlen = 1;
    let mut c = [0u8; crate::cmsg::SEND_CMSG_SPACE];
    let n = crate::cmsg::send_cmsgs(opts.segment, opts.stamp_id, &mut c);
    if n > 0 {
        for (w, b) in s.control.iter_mut().zip(c.chunks_exact(8)) {
            *w = u64::from_ne_bytes(b.try_into().unwrap_or_default());
        }
        s.msg.msg_control = s.control.as_mut_ptr().cast();
        s.msg.msg_controllen = n;
    } else {
        s.msg.msg_control = std::ptr::null_mut();
        s.msg.msg_controllen = 0;
    }
    s.msg.msg_flags = 0;
    opcode::SendMsg::new(Fixed(slot), &s.msg)
        .flags(libc::MSG_NOSIGNAL as u32)
        .build()
        .user_data(user_data)
}

/// Reads a `sockaddr_in` or `sockaddr_in6` from the bytes the kernel wrote.
pub(crate) fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(ip.into(), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip.into(),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// Writes `a` into `out` as the kernel expects; returns the length to pass.
fn write_sockaddr(a: SocketAddr, out: &mut libc::sockaddr_in6) -> libc::socklen_t {
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: FAMILY_INET,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in (16 bytes) fits inside sockaddr_in6 (28 bytes); both are plain
            // old data and the kernel reads only `namelen` bytes of it.
            unsafe {
                std::ptr::from_mut(out)
                    .cast::<libc::sockaddr_in>()
                    .write(sin);
            };
            SIN_LEN
        }
        SocketAddr::V6(v6) => {
            *out = libc::sockaddr_in6 {
                sin6_family: FAMILY_INET6,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            NAME_LEN_SOCKLEN
        }
    }
}

/// Whether io_uring can be set up here at all (for tests and diagnostics).
///
/// # Errors
/// Why it cannot.
pub fn probe() -> Result<(), SetupError> {
    Ring::builder(8).build().map(drop)
}

/// io_uring against the kernel (a test that needs a ring skips, saying so, where there is none):
/// transmit stamps through the armed stamp command, one per send and one per GSO send, with their
/// ids (the top bit set too), in order; socket addresses through the kernel layout; `UserData`
/// round trips and never panics on unknown values; a multishot receive with the kernel's receive
/// time and a writable view of it; a 21-datagram GSO send arrives coalesced by GRO and splits
/// intact, in order; the large buffer group takes coalesced batches beside small buffers, copies
/// out of it checked against its end, every buffer back; a ring refuses another ring's buffers and
/// does not take them in; an EIO on a GSO send lowers the segment limit to 1, counted once, and a
/// send's user_data naming no buffer gives none, without a panic; setup errors name the cause and
/// `--backend tokio`.
#[cfg(test)]
mod tests {
    use super::*;

    const SEND: u8 = 1;
    const RECV: u8 = 2;
    const STAMPS: u8 = 3;

    fn skip() -> bool {
        if probe().is_err() {
            eprintln!("SKIPPED (io_uring unavailable here)");
            return true;
        }
        false
    }

    #[test]
    fn transmit_stamps_come_back_through_the_ring_with_their_ids() {
        if skip() {
            return;
        }
        let ip = "127.0.0.1".parse().unwrap();
        let mut ring = Ring::with_tx(16, 4, 2, 8).unwrap();
        let (tx, rx) = (
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
        );
        crate::enable_tx_timestamps(&tx).unwrap();
        ring.register_socket(0, tx.as_raw_fd()).unwrap();
        ring.arm(Arm::TxStamps { slot: 0 }, UserData::of(STAMPS))
            .unwrap();
        let wall = || {
            u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos(),
            )
            .unwrap()
        };
        let before = wall();
        // Three plain sends and one GSO send of three datagrams, each with its own id.
        let to = rx.local_addr().unwrap();
        for (k, id) in [11u32, 0x8000_0001, 13].into_iter().enumerate() {
            let mut i = ring.tx_acquire(Group::Small).unwrap();
            ring.tx_buffer(&mut i).unwrap()[..20].fill(u8::try_from(k).unwrap());
            let opts = SendOpts {
                segment: None,
                stamp_id: Some(id),
            };
            ring.send(0, i, 20, to, UserData::of(SEND), opts).unwrap();
        }
        let i = ring.tx_acquire(Group::Small).unwrap();
        let opts = SendOpts {
            segment: Some(10),
            stamp_id: Some(14),
        };
        ring.send(0, i, 30, to, UserData::of(SEND), opts).unwrap();
        let mut stamps = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stamps.len() < 4 {
            assert!(std::time::Instant::now() < deadline, "stamps: {stamps:?}");
            ring.submit_and_wait(Some(Duration::from_millis(20)))
                .unwrap();
            let mut cs = ring.drain_completions();
            for c in &mut cs {
                match c.user_data.kind {
                    SEND => {
                        assert!(c.result > 0, "send: {}", c.result);
                        let t = c.take_tx().expect("a send gives its buffer back");
                        ring.recycle(t);
                    }
                    STAMPS => {
                        assert!(c.more(), "the command stays armed: {}", c.result);
                        stamps.push(c.tx_stamp().unwrap());
                    }
                    other => panic!("unexpected completion {other}"),
                }
            }
            ring.give_back(cs);
        }
        let after = wall();
        let ids: Vec<u32> = stamps.iter().map(|s| s.id).collect();
        assert_eq!(
            ids,
            [11, 0x8000_0001, 13, 14],
            "one stamp a send, a GSO send's once"
        );
        assert!(stamps.iter().all(|s| (before..=after).contains(&s.at.0)));
        assert!(stamps.windows(2).all(|w| w[0].at <= w[1].at));
        // All four sends arrived: six datagrams.
        rx.set_nonblocking(false).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        for want in [20, 20, 20, 10, 10, 10] {
            assert_eq!(rx.recv(&mut buf).unwrap(), want);
        }
    }

    #[test]
    fn socket_addresses_round_trip_through_the_kernel_layout() {
        for a in ["127.0.0.1:4000", "[::1]:5060", "[fe80::1%2]:9"] {
            let a: SocketAddr = a.parse().unwrap();
            // SAFETY: plain old data; all-zero is valid.
            let mut raw: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let len = write_sockaddr(a, &mut raw);
            // SAFETY: reading the bytes of a plain-old-data struct we own.
            let bytes = unsafe {
                std::slice::from_raw_parts(std::ptr::from_ref(&raw).cast::<u8>(), len as usize)
            };
            assert_eq!(sockaddr_from_bytes(bytes), Some(a));
        }
        assert_eq!(sockaddr_from_bytes(&[0; 3]), None);
    }

    #[test]
    fn user_data_round_trips_and_never_panics_on_unknown_values() {
        for ud in [
            UserData::new(1, 0, 0),
            UserData::new(127, MAX_FILES - 1, u32::MAX),
            UserData::new(8, 4095, 0x00ff_ffff),
        ] {
            let v = ud.encode();
            assert_eq!(v & SEND_BIT, 0, "never the ring's bit");
            assert_eq!(UserData::decode(v), Some(ud));
        }
        // Fields too wide are cut to the bits kept, and say so by not round-tripping.
        assert_eq!(UserData::new(0xff, u32::MAX, 1).kind, 0x7f);
        assert_eq!(UserData::new(0xff, u32::MAX, 1).slot, MAX_FILES - 1);
        for v in [
            0,
            1,
            u64::MAX,
            SEND_BIT,
            SEND_BIT - 1,
            0xdead_beef_dead_beef,
        ] {
            let _ = UserData::decode(v);
        }
        assert_eq!(UserData::decode(SEND_BIT | 7), None);
    }

    #[test]
    fn a_multishot_receive_carries_the_kernels_receive_time() {
        if skip() {
            return;
        }
        let mut ring = Ring::with_tx(8, 4, 1, 0).unwrap();
        let rx = crate::bind_udp("127.0.0.1".parse().unwrap(), 0, 65_536).unwrap();
        crate::enable_rx_timestamps(&rx).unwrap();
        ring.register_socket(0, rx.as_raw_fd()).unwrap();
        let recv = Arm::Recv {
            slot: 0,
            group: Group::Small,
        };
        ring.arm(recv, UserData::new(RECV, 0, 7)).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let wall = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        };
        let before = wall();
        tx.send_to(&[0x80; 172], rx.local_addr().unwrap()).unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            ring.submit_and_wait(Some(Duration::from_millis(50)))
                .unwrap();
            got = ring.drain_completions();
            if !got.is_empty() {
                break;
            }
        }
        let after = wall();
        let c = got
            .iter_mut()
            .find(|c| c.user_data == UserData::new(RECV, 0, 7))
            .expect("a receive completion");
        let mut b = c.take_rx().expect("a receive hands over its buffer");
        assert_eq!(c.take_rx(), None, "once");
        let r = ring.received(&b).unwrap();
        assert_eq!(r.payload, &[0x80; 172][..]);
        assert_eq!(r.from, Some(tx.local_addr().unwrap()));
        let t = crate::cmsg::rx_timestamp(r.control)
            .unwrap()
            .expect("a timestamp");
        assert!((before..=after).contains(&u128::from(t.0)));
        // The writable view parses the same header once and sees the same datagram.
        let m = ring.received_mut(&mut b).unwrap();
        assert_eq!(m.from, Some(tx.local_addr().unwrap()));
        assert_eq!(m.payload.len(), 172);
        assert!(crate::cmsg::rx_timestamp(m.control).unwrap().is_some());
        m.payload[0] = 1;
        assert_eq!(ring.received(&b).unwrap().payload[..2], [1, 0x80]);
        ring.recycle(b);
        ring.give_back(got);
    }

    #[test]
    fn a_gso_send_arrives_coalesced_by_gro_and_splits_into_its_datagrams() {
        if skip() {
            return;
        }
        let mut ring = Ring::with_buffer_size(8, 4, 2, 2, MAX_BUFFER_SIZE).unwrap();
        assert!(ring.capacity(Group::Small).unwrap().max_payload >= 64 << 10);
        assert!(ring.gso().max_segments >= 21, "loopback takes UDP_SEGMENT");
        let rx = crate::bind_udp("127.0.0.1".parse().unwrap(), 0, 1 << 20).unwrap();
        let tx = crate::bind_udp("127.0.0.1".parse().unwrap(), 0, 1 << 20).unwrap();
        crate::enable_udp_gro(&rx).unwrap();
        crate::enable_rx_timestamps(&rx).unwrap();
        ring.register_socket(0, rx.as_raw_fd()).unwrap();
        ring.register_socket(1, tx.as_raw_fd()).unwrap();
        let recv = Arm::Recv {
            slot: 0,
            group: Group::Small,
        };
        ring.arm(recv, UserData::of(RECV)).unwrap();
        // 20 datagrams of 172 bytes and a last of 100, each numbered, in one send.
        let mut i = ring.tx_acquire(Group::Small).unwrap();
        let b = ring.tx_buffer(&mut i).unwrap();
        for (k, chunk) in b[..20 * 172 + 100].chunks_mut(172).enumerate() {
            chunk.fill(u8::try_from(k).unwrap());
        }
        let gso = SendOpts {
            segment: Some(172),
            stamp_id: None,
        };
        ring.send(
            1,
            i,
            20 * 172 + 100,
            rx.local_addr().unwrap(),
            UserData::of(SEND),
            gso,
        )
        .unwrap();
        let (mut datagrams, mut sent, mut coalesced) = (Vec::new(), false, 0);
        for _ in 0..100 {
            ring.submit_and_wait(Some(Duration::from_millis(20)))
                .unwrap();
            let mut got = ring.drain_completions();
            for c in &mut got {
                if c.user_data.kind == SEND {
                    assert_eq!(c.result, 20 * 172 + 100, "the whole payload was sent");
                    sent = true;
                }
                if c.user_data.kind == RECV {
                    let bid = c.take_rx().unwrap();
                    let r = ring.received(&bid).unwrap();
                    assert!(crate::cmsg::rx_timestamp(r.control).unwrap().is_some());
                    coalesced += usize::from(r.segment == Some(172));
                    let seg = usize::from(r.segment.unwrap_or(u16::MAX));
                    datagrams.extend(
                        r.payload
                            .chunks(seg.min(r.payload.len().max(1)))
                            .map(<[u8]>::to_vec),
                    );
                    ring.recycle(bid);
                }
            }
            ring.give_back(got);
            ring.sync_buffers();
            if sent && datagrams.len() >= 21 {
                break;
            }
        }
        assert_eq!(datagrams.len(), 21, "every segment arrives");
        assert!(
            coalesced > 0,
            "loopback GRO coalesced the GSO send (Linux 5.0+)"
        );
        for (k, d) in datagrams.iter().enumerate() {
            let want = if k == 20 { 100 } else { 172 };
            assert_eq!(d.len(), want, "datagram {k}");
            assert!(
                d.iter().all(|&x| usize::from(x) == k),
                "datagram {k} intact, in order"
            );
        }
    }

    #[test]
    fn a_large_group_takes_coalesced_batches_beside_small_buffers() {
        if skip() {
            return;
        }
        const LARGE_RECV: u8 = 4;
        const SMALL_RECV: u8 = 5;
        const LARGE_SEND: u8 = 6;
        let ip = "127.0.0.1".parse().unwrap();
        let mut ring = Ring::with_tx(8, 4, 3, 4).unwrap();
        assert_eq!(ring.capacity(Group::Large), None);
        ring.add_large(4, 2).unwrap();
        assert!(ring.add_large(4, 2).is_err(), "one large group");
        let large = ring.capacity(Group::Large).unwrap();
        assert_eq!((large.rx, large.tx), (4, 2));
        let (gro, small, out) = (
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
        );
        crate::enable_udp_gro(&gro).unwrap();
        for (slot, s) in [(0, &gro), (1, &small), (2, &out)] {
            ring.register_socket(slot, s.as_raw_fd()).unwrap();
        }
        let arm = |slot, group| Arm::Recv { slot, group };
        ring.arm(arm(0, Group::Large), UserData::of(LARGE_RECV))
            .unwrap();
        ring.arm(arm(1, Group::Small), UserData::of(SMALL_RECV))
            .unwrap();
        // 8 numbered datagrams of 200 bytes, one GSO send from a large buffer.
        let mut i = ring.tx_acquire(Group::Large).unwrap();
        for (k, c) in ring.tx_buffer(&mut i).unwrap()[..1600]
            .chunks_mut(200)
            .enumerate()
        {
            c.fill(u8::try_from(k).unwrap());
        }
        let gso = SendOpts {
            segment: Some(200),
            stamp_id: None,
        };
        let to = gro.local_addr().unwrap();
        ring.send(2, i, 1600, to, UserData::of(LARGE_SEND), gso)
            .unwrap();
        let (mut seen, mut forwarded, mut got_small, mut back) = (0, false, None, 0);
        for _ in 0..100 {
            ring.submit_and_wait(Some(Duration::from_millis(20)))
                .unwrap();
            let mut cs = ring.drain_completions();
            for c in &mut cs {
                match c.user_data.kind {
                    LARGE_RECV => {
                        let bid = c.take_rx().unwrap();
                        assert_eq!(bid.group(), Group::Large);
                        let r = ring.received(&bid).unwrap();
                        let seg = usize::from(r.segment.unwrap_or(200));
                        let n = r.payload.len();
                        // Each segment of the batch, wherever it lies, is whole.
                        for (k, d) in r.payload.chunks(seg).enumerate() {
                            assert_eq!(d.len(), 200);
                            assert!(d.iter().all(|&x| usize::from(x) == seen + k));
                        }
                        // Segment 3 leaves on its own from a small buffer.
                        if !forwarded && seen <= 3 && 3 < seen + n / seg {
                            let off = (3 - seen) * seg;
                            let mut t = ring.tx_acquire(Group::Small).unwrap();
                            assert_eq!(ring.copy(&bid, off..off + 200, &mut t, 0), Some(200));
                            let to = small.local_addr().unwrap();
                            ring.send(2, t, 200, to, UserData::of(SEND), SendOpts::default())
                                .unwrap();
                            forwarded = true;
                        }
                        let mut t = ring.tx_acquire(Group::Small).unwrap();
                        assert!(
                            ring.copy(&bid, n - 10..n + 190, &mut t, 0).is_none(),
                            "past the end"
                        );
                        ring.recycle(t);
                        seen += n / seg;
                        ring.recycle(bid);
                    }
                    SMALL_RECV => {
                        let bid = c.take_rx().unwrap();
                        assert_eq!(bid.group(), Group::Small);
                        got_small = ring.received(&bid).map(|r| r.payload.to_vec());
                        ring.recycle(bid);
                    }
                    LARGE_SEND => {
                        let t = c.take_tx().unwrap();
                        assert_eq!(t.group(), Group::Large);
                        ring.recycle(t);
                        back += 1;
                    }
                    _ => {}
                }
            }
            ring.give_back(cs);
            ring.sync_buffers();
            if seen == 8 && got_small.is_some() && back == 1 {
                break;
            }
        }
        assert_eq!(seen, 8, "every datagram arrived in the large group");
        assert_eq!(
            got_small,
            Some(vec![3u8; 200]),
            "segment 3 arrived in a small buffer"
        );
        // Every buffer came back: both large transmit buffers can be had again.
        let a = ring.tx_acquire(Group::Large).expect("one");
        let b = ring.tx_acquire(Group::Large).expect("two");
        assert!(ring.tx_acquire(Group::Large).is_none());
        ring.recycle(a);
        ring.recycle(b);
    }

    #[test]
    fn a_ring_refuses_another_rings_buffers() {
        if skip() {
            return;
        }
        let mut a = Ring::with_tx(8, 1, 1, 1).unwrap();
        let mut b = Ring::with_tx(8, 1, 1, 1).unwrap();
        let mut t = a.tx_acquire(Group::Small).unwrap();
        assert!(b.tx_buffer(&mut t).is_none());
        let mut u = b.tx_acquire(Group::Small).unwrap();
        assert_eq!(b.copy(&t, 0..4, &mut u, 0), None);
        let to = "127.0.0.1:9".parse().unwrap();
        let refused = b
            .send(0, t, 4, to, UserData::of(SEND), SendOpts::default())
            .unwrap_err();
        assert!(refused.error.to_string().contains("another ring"));
        // b kept its own buffer to itself; a gets its token back whole.
        b.recycle(refused.buf);
        assert!(b.tx_acquire(Group::Small).is_none(), "b's one buffer is u");
        b.recycle(u);
        assert!(
            a.tx_acquire(Group::Small).is_none(),
            "a's one buffer is t, lost to b"
        );
    }

    #[test]
    fn an_eio_on_a_gso_send_lowers_the_segment_limit_once() {
        let mut groups = [Some(BufGroup::new(2, 0, 2, BUFFER_SIZE).unwrap()), None];
        let g = groups[0].as_mut().unwrap();
        g.sends[2].segmented = true;
        g.sends[2].user = UserData::new(SEND, 5, 9).encode();
        let mut gso = Gso {
            max_segments: 64,
            fallbacks: 0,
        };
        let ud = SEND_BIT | SEND_TX_BIT; // transmit buffer 0 of the small group: header 2
        let (user, buf) = sent_buf(1, &groups, ud, -libc::EIO, &mut gso);
        assert_eq!(user, Some(UserData::new(SEND, 5, 9)));
        assert!(matches!(buf, Some(Buf::Tx(TxBuf { id: 0, .. }))));
        assert_eq!(
            gso,
            Gso {
                max_segments: 1,
                fallbacks: 1
            }
        );
        let _ = sent_buf(1, &groups, ud, -libc::EIO, &mut gso);
        assert_eq!(gso.fallbacks, 1, "counted once: the limit is 1 already");
        // A plain send's EIO, or another error, leaves it alone.
        let mut gso = Gso {
            max_segments: 64,
            fallbacks: 0,
        };
        let _ = sent_buf(1, &groups, ud, -libc::EPERM, &mut gso);
        groups[0].as_mut().unwrap().sends[2].segmented = false;
        let _ = sent_buf(1, &groups, ud, -libc::EIO, &mut gso);
        assert_eq!(gso.max_segments, 64);
        // A user_data naming no buffer header decodes to nothing, without a panic.
        assert_eq!(
            sent_buf(1, &groups, SEND_BIT | SEND_LARGE_BIT, 0, &mut gso).1,
            None
        );
        assert_eq!(sent_buf(1, &groups, SEND_BIT | 0xffff, 0, &mut gso).1, None);
        for g in groups.into_iter().flatten() {
            // SAFETY: made by BufGroup::new with this length, never registered.
            unsafe { libc::munmap(g.ring_mem.as_ptr().cast(), g.ring_len) };
        }
    }

    #[test]
    fn setup_errors_name_the_cause_and_the_way_out() {
        let cases = [
            (libc::EPERM, "seccomp"),
            (libc::EPERM, "kernel.io_uring_disabled"),
            (libc::ENOSYS, "not available"),
            (libc::EINVAL, "io_uring_setup"),
        ];
        for (errno, words) in cases {
            let msg = classify("io_uring_setup", io::Error::from_raw_os_error(errno)).to_string();
            assert!(msg.contains(words), "{errno}: {msg}");
            assert!(msg.contains("--backend tokio"), "{errno}: {msg}");
        }
    }
}
