//! The io_uring instance, its provided-buffer ring, the per-buffer send headers and the eventfd
//! that wakes the ring: what the relay, the echo, loadgen and the floor forwarder all drive.
//!
//! Everything here is exposed through safe methods whose invariants the module keeps:
//! - receive buffers live in one contiguous allocation owned by [`Ring`] for as long as the ring
//!   exists, and each buffer is either owned by the kernel (in the buffer ring) or by exactly one
//!   of: a completion being handled, or one in-flight send; [`Ring::recycle`] gives it back;
//! - the `msghdr`/`iovec`/address of a send live in a slot indexed by the buffer id, so they stay
//!   put until the send completes, and one buffer is never in two sends;
//! - the receive `msghdr` and the eventfd's read buffer are boxed and live as long as the ring;
//! - sockets are used through the fixed-file table, whose slots the caller registers and clears.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

pub use crate::socket::SendOpts;

/// Buffer group id of the receive buffers.
const BGID: u16 = 0;
/// Buffer group id of the large receive buffers ([`Ring::add_large`]).
const BGID_LARGE: u16 = 1;
/// Bytes reserved for the source address in each received buffer (a `sockaddr_in6`).
const NAME_LEN: usize = size_of::<libc::sockaddr_in6>();
/// Bytes reserved for control messages (the kernel's receive timestamp) in each buffer.
const CONTROL_LEN: usize = crate::cmsg::CONTROL_LEN;
/// Where the payload starts in a receive buffer: after the `io_uring_recvmsg_out` header, the
/// address and the control messages.
const PAYLOAD_OFFSET: usize = 16 + NAME_LEN + CONTROL_LEN;
/// Size of one receive buffer by default: the `io_uring_recvmsg_out` header, the address, the
/// control messages, the payload ([`Ring::with_buffer_size`] takes others, up to
/// [`MAX_BUFFER_SIZE`], for UDP GRO's coalesced datagrams).
pub const BUFFER_SIZE: usize = 2048;
/// Largest buffer [`Ring::with_buffer_size`] takes: room for a 64 KiB coalesced datagram.
pub const MAX_BUFFER_SIZE: usize = (64 << 10) + PAYLOAD_OFFSET;

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
/// dropped); [`Ring::max_payload`] for a ring's own.
pub const MAX_PAYLOAD: usize = BUFFER_SIZE - PAYLOAD_OFFSET;

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

/// The headers of one send; one per receive buffer, used while that buffer is being sent.
#[repr(C)]
struct SendSlot {
    /// The message header handed to the kernel.
    msg: libc::msghdr,
    /// The one I/O vector: the payload inside the receive buffer.
    iov: libc::iovec,
    /// The destination.
    addr: libc::sockaddr_in6,
    /// The send's control messages: a `UDP_SEGMENT` size for a GSO send, an `SCM_TS_OPT_ID`
    /// for a stamped one (u64s: cmsg alignment).
    control: [u64; crate::cmsg::SEND_CMSG_SPACE / 8],
}

/// One completion, copied out of the completion queue.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// What the submission was (see the backend's encoding).
    pub user_data: u64,
    /// The result: bytes, or a negative errno.
    pub result: i32,
    /// Completion flags.
    pub flags: u32,
    /// The second half of a 32-byte completion (a transmit stamp's time; zero for others).
    pub big: [u64; 2],
}

impl Completion {
    /// The provided buffer this completion carries, if any.
    #[must_use]
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// Whether a multishot request stays armed after this completion.
    #[must_use]
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The transmit stamp a completion of [`Ring::arm_tx_stamps`] carries.
    ///
    /// # Errors
    /// The request ended, or the completion holds no software send stamp (see
    /// [`crate::txstamp::from_completion`]).
    pub fn tx_stamp(&self) -> Result<crate::txstamp::TxStamp, crate::txstamp::TxStampError> {
        crate::txstamp::from_completion(self.result, self.flags, self.big)
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

/// The io_uring, its buffer ring and everything the kernel may read or write through it.
pub struct Ring {
    /// The ring, with 32-byte completions (transmit stamps carry their time in the second half).
    ring: IoUring<squeue::Entry, cqueue::Entry32>,
    /// Page-aligned buffer-ring entries (mmap), `entries` × 16 bytes.
    ring_mem: NonNull<BufRingEntry>,
    /// Length of the mapping.
    ring_len: usize,
    /// Number of buffers (= entries).
    entries: u16,
    /// Our copy of the buffer ring's tail.
    tail: u16,
    /// Size of each receive and transmit buffer.
    buffer_size: usize,
    /// The receive buffers, `entries` × `buffer_size` bytes.
    buffers: Box<[u8]>,
    /// Send headers, one per receive buffer.
    sends: Box<[SendSlot]>,
    /// Transmit buffers of `buffer_size` for datagrams that did not arrive in a receive buffer
    /// (generated or copied).
    tx: TxPool,
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
    /// [`Ring::arm_tx_stamps`]), so the next wait counts it in.
    stamp_completions: bool,
    /// A second group of receive buffers of [`MAX_BUFFER_SIZE`], with transmit buffers of that
    /// size, for one socket with UDP GRO and GSO among sockets with small buffers.
    large: Option<Large>,
}

/// The large buffer group: its buffer ring, receive buffers and transmit buffers.
struct Large {
    /// Page-aligned buffer-ring entries (mmap).
    ring_mem: NonNull<BufRingEntry>,
    /// Length of the mapping.
    ring_len: usize,
    /// Number of receive buffers.
    entries: u16,
    /// Our copy of the buffer ring's tail.
    tail: u16,
    /// Receive buffers, `entries` × [`MAX_BUFFER_SIZE`].
    buffers: Box<[u8]>,
    /// Transmit buffers of [`MAX_BUFFER_SIZE`] (GSO sends).
    tx: TxPool,
}

/// Transmit buffers of one size, each with the send header the kernel reads while it is sent,
/// and the list of free ones. The small group and the large group each have one.
struct TxPool {
    /// `sends.len()` × `size` bytes.
    bytes: Box<[u8]>,
    /// Size of each buffer.
    size: usize,
    /// Send headers, one per buffer.
    sends: Box<[SendSlot]>,
    /// Free buffers.
    free: Vec<u16>,
}

/// `n` all-zero send headers.
fn zeroed_slots(n: u16) -> Box<[SendSlot]> {
    (0..n)
        // SAFETY: all fields of SendSlot are plain old data; all-zero is valid for each.
        .map(|_| unsafe { std::mem::zeroed::<SendSlot>() })
        .collect()
}

impl TxPool {
    fn new(count: u16, size: usize) -> Self {
        Self {
            bytes: vec![0u8; usize::from(count) * size].into_boxed_slice(),
            size,
            sends: zeroed_slots(count),
            free: (0..count).rev().collect(),
        }
    }

    fn acquire(&mut self) -> Option<u16> {
        self.free.pop()
    }

    fn release(&mut self, i: u16) {
        if usize::from(i) < self.sends.len() {
            self.free.push(i);
        }
    }

    /// Bytes `at..at + n` of buffer `i`; `None` past the buffer's end or the pool's.
    fn region(&self, i: u16, at: usize, n: usize) -> Option<&[u8]> {
        let start = usize::from(i).checked_mul(self.size)? + at;
        (at + n <= self.size).then_some(())?;
        self.bytes.get(start..start + n)
    }

    /// [`TxPool::region`], writable.
    fn region_mut(&mut self, i: u16, at: usize, n: usize) -> Option<&mut [u8]> {
        let start = usize::from(i).checked_mul(self.size)? + at;
        (at + n <= self.size).then_some(())?;
        self.bytes.get_mut(start..start + n)
    }

    /// A free buffer holding a copy of `src`, if one is free and `src` fits.
    fn acquire_with(&mut self, src: &[u8]) -> Option<u16> {
        if src.len() > self.size {
            return None;
        }
        let i = self.acquire()?;
        match self.region_mut(i, 0, src.len()) {
            Some(out) => {
                out.copy_from_slice(src);
                Some(i)
            }
            None => {
                self.release(i);
                None
            }
        }
    }

    /// The send of buffer `i`'s first `len` bytes (see [`prepare_send`]).
    fn send_entry(
        &mut self,
        i: u16,
        len: usize,
        to: SocketAddr,
        slot: u32,
        user_data: u64,
        opts: SendOpts,
    ) -> io::Result<squeue::Entry> {
        let out_of_range = || io::Error::other("transmit buffer out of range");
        let start = usize::from(i) * self.size;
        let payload = self
            .bytes
            .get_mut(start..start + len.min(self.size))
            .ok_or_else(out_of_range)?;
        let s = self
            .sends
            .get_mut(usize::from(i))
            .ok_or_else(out_of_range)?;
        Ok(prepare_send(s, payload, to, slot, user_data, opts))
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// Creates the ring on the calling thread (which must be the only one to use it), with
    /// `sq_entries` submissions, 4× completions, `buffers` receive buffers, and a fixed-file
    /// table of `files` slots.
    ///
    /// # Errors
    /// What failed, in words that name the cause and the way out.
    pub fn new(sq_entries: u32, buffers: u16, files: u32) -> Result<Self, SetupError> {
        Self::with_tx(sq_entries, buffers, files, 0)
    }

    /// Like [`Ring::new`], with `tx_count` transmit buffers as well (see [`Ring::tx_acquire`]).
    ///
    /// # Errors
    /// What failed, in words that name the cause and the way out.
    pub fn with_tx(
        sq_entries: u32,
        buffers: u16,
        files: u32,
        tx_count: u16,
    ) -> Result<Self, SetupError> {
        Self::with_buffer_size(sq_entries, buffers, files, tx_count, BUFFER_SIZE)
    }

    /// Like [`Ring::with_tx`], with receive and transmit buffers of `buffer_size` bytes (clamped
    /// to [`BUFFER_SIZE`]..=[`MAX_BUFFER_SIZE`]): a socket with UDP GRO needs room for a whole
    /// coalesced datagram, and a GSO send for all its segments.
    ///
    /// # Errors
    /// What failed, in words that name the cause and the way out.
    pub fn with_buffer_size(
        sq_entries: u32,
        buffers: u16,
        files: u32,
        tx_count: u16,
        buffer_size: usize,
    ) -> Result<Self, SetupError> {
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

        let entries = buffers.max(1);
        let (ring_mem, ring_len) = map_buf_ring(entries)?;
        let waker = EventFd::new().map_err(|e| classify("eventfd", e))?;
        // SAFETY: msghdr is plain old data; all-zero is a valid (empty) header.
        let mut recv_msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_msg.msg_namelen = NAME_LEN_SOCKLEN;
        recv_msg.msg_controllen = CONTROL_LEN;
        let sends = zeroed_slots(entries);
        let mut this = Self {
            ring,
            ring_mem,
            ring_len,
            entries,
            tail: 0,
            buffer_size,
            buffers: vec![0u8; usize::from(entries) * buffer_size].into_boxed_slice(),
            sends,
            tx: TxPool::new(tx_count, buffer_size),
            recv_msg,
            waker: std::sync::Arc::new(waker),
            wake_buf: Box::new(0),
            scratch: Vec::with_capacity(sq_entries as usize * 4),
            unwaited_sends: 0,
            batch: 1,
            batch_wait_usec: 0,
            min_timeout: false,
            stamp_completions: false,
            large: None,
        };
        this.min_timeout = this.ring.params().is_feature_min_timeout();
        // SAFETY: the mapping is page-aligned, zeroed, `entries` long, and lives in `self`;
        // `Drop` unregisters the buffer ring before unmapping it.
        unsafe {
            this.ring.submitter().register_buf_ring_with_flags(
                this.ring_mem.as_ptr() as u64,
                entries,
                BGID,
                0,
            )
        }
        .map_err(|e| classify("register_buf_ring", e))?;
        for bid in 0..entries {
            this.push_buffer(bid);
        }
        this.sync_buffers();
        Ok(this)
    }

    /// A handle other threads use to wake the ring.
    #[must_use]
    pub fn waker(&self) -> std::sync::Arc<EventFd> {
        std::sync::Arc::clone(&self.waker)
    }

    /// Number of receive buffers.
    #[must_use]
    pub const fn buffer_count(&self) -> u16 {
        self.entries
    }

    /// Largest payload a receive buffer holds (a transmit buffer holds its whole size).
    #[must_use]
    pub const fn max_payload(&self) -> usize {
        self.buffer_size - PAYLOAD_OFFSET
    }

    fn push_buffer(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.entries - 1));
        let addr = self.buffers[usize::from(bid) * self.buffer_size..].as_ptr() as u64;
        // SAFETY: idx < entries, so the entry lies inside the mapping, which we own; the kernel
        // reads entries only up to the tail we publish in `sync_buffers`, after this write.
        let entry = unsafe { &mut *self.ring_mem.as_ptr().add(idx) };
        entry.set_addr(addr);
        entry.set_len(u32::try_from(self.buffer_size).unwrap_or(u32::MAX));
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Gives buffer `bid` back to the kernel (visible after [`Ring::sync_buffers`]).
    pub fn recycle(&mut self, bid: u16) {
        if bid < self.entries {
            self.push_buffer(bid);
        }
    }

    /// Adds a second group of `count` receive buffers and `tx_count` transmit buffers, each of
    /// [`MAX_BUFFER_SIZE`] (room for a GRO-coalesced receive, or a GSO send of up to 64 KiB), for
    /// the sockets armed with [`Ring::arm_recv_large`].
    ///
    /// # Errors
    /// A second group exists already, or the kernel refused it.
    pub fn add_large(&mut self, count: u16, tx_count: u16) -> Result<(), SetupError> {
        if self.large.is_some() {
            return Err(SetupError::Other {
                step: "add_large",
                source: io::Error::other("the large group exists already"),
            });
        }
        let entries = count.max(1).next_power_of_two();
        let (ring_mem, ring_len) = map_buf_ring(entries)?;
        // SAFETY: the mapping is page-aligned, zeroed, `entries` long, and lives in `self.large`;
        // `Drop` unregisters this group before unmapping it.
        let registered = unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                ring_mem.as_ptr() as u64,
                entries,
                BGID_LARGE,
                0,
            )
        };
        if let Err(e) = registered {
            // SAFETY: the mapping was made above with this length and is not registered.
            unsafe { libc::munmap(ring_mem.as_ptr().cast(), ring_len) };
            return Err(classify("register_buf_ring", e));
        }
        self.large = Some(Large {
            ring_mem,
            ring_len,
            entries,
            tail: 0,
            buffers: vec![0u8; usize::from(entries) * MAX_BUFFER_SIZE].into_boxed_slice(),
            tx: TxPool::new(tx_count, MAX_BUFFER_SIZE),
        });
        for bid in 0..entries {
            self.recycle_large(bid);
        }
        self.sync_buffers();
        Ok(())
    }

    /// Gives large receive buffer `bid` back to the kernel (visible after
    /// [`Ring::sync_buffers`]).
    pub fn recycle_large(&mut self, bid: u16) {
        let Some(l) = self.large.as_mut() else { return };
        if bid >= l.entries {
            return;
        }
        let idx = usize::from(l.tail & (l.entries - 1));
        let addr = l.buffers[usize::from(bid) * MAX_BUFFER_SIZE..].as_ptr() as u64;
        // SAFETY: idx < entries, inside the mapping we own; the kernel reads entries only up to
        // the tail published in `sync_buffers`, after this write.
        let entry = unsafe { &mut *l.ring_mem.as_ptr().add(idx) };
        entry.set_addr(addr);
        entry.set_len(u32::try_from(MAX_BUFFER_SIZE).unwrap_or(u32::MAX));
        entry.set_bid(bid);
        l.tail = l.tail.wrapping_add(1);
    }

    /// Arms a multishot receive on fixed-file `slot` into the large buffers.
    ///
    /// # Errors
    /// No large group ([`Ring::add_large`]), or the submission queue could not take it.
    pub fn arm_recv_large(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        if self.large.is_none() {
            return Err(io::Error::other("no large buffer group"));
        }
        let e = opcode::RecvMsgMulti::new(Fixed(slot), &*self.recv_msg, BGID_LARGE)
            .build()
            .user_data(user_data);
        self.push(&e)
    }

    /// The datagram (or GRO-coalesced datagrams) in large buffer `bid`, whose completion
    /// reported `len` bytes.
    #[must_use]
    pub fn received_large(&self, bid: u16, len: usize) -> Option<Received<'_>> {
        let l = self.large.as_ref()?;
        let start = usize::from(bid).checked_mul(MAX_BUFFER_SIZE)?;
        parse_received(
            l.buffers.get(start..start + len.min(MAX_BUFFER_SIZE))?,
            &self.recv_msg,
        )
    }

    /// Copies `n` bytes at `offset` of large buffer `bid`'s payload (completion length `len`)
    /// into a free small transmit buffer; returns it. For the segments of a coalesced receive,
    /// each of which leaves on its own socket.
    pub fn tx_copy_from_large(
        &mut self,
        bid: u16,
        len: usize,
        offset: usize,
        n: usize,
    ) -> Option<u16> {
        let payload_len = self.received_large(bid, len)?.payload.len();
        if offset + n > payload_len {
            return None;
        }
        let src = usize::from(bid) * MAX_BUFFER_SIZE + PAYLOAD_OFFSET + offset;
        let segment = self.large.as_ref()?.buffers.get(src..src + n)?;
        self.tx.acquire_with(segment)
    }

    /// Copies the payload of small receive buffer `bid` (completion length `len`) into large
    /// transmit buffer `i` at byte `at`; returns the bytes copied. For packets gathered into one
    /// GSO send.
    pub fn copy_to_large_tx(&mut self, bid: u16, len: usize, i: u16, at: usize) -> Option<usize> {
        let n = self.received(bid, len)?.payload.len();
        if at + n > MAX_BUFFER_SIZE {
            return None;
        }
        let src = usize::from(bid) * self.buffer_size + PAYLOAD_OFFSET;
        let payload = self.buffers.get(src..src + n)?;
        let l = self.large.as_mut()?;
        l.tx.region_mut(i, at, n)?.copy_from_slice(payload);
        Some(n)
    }

    /// Copies the first `n` bytes of small transmit buffer `tx` into large transmit buffer `i` at
    /// byte `at`; returns the bytes copied. For datagrams regathered into one GSO send.
    pub fn copy_tx_to_large_tx(&mut self, tx: u16, n: usize, i: u16, at: usize) -> Option<usize> {
        let payload = self.tx.region(tx, 0, n)?;
        let l = self.large.as_mut()?;
        l.tx.region_mut(i, at, n)?.copy_from_slice(payload);
        Some(n)
    }

    /// A free large transmit buffer, if any.
    pub fn large_tx_acquire(&mut self) -> Option<u16> {
        self.large.as_mut()?.tx.acquire()
    }

    /// Large transmit buffer `i`, [`MAX_BUFFER_SIZE`] bytes.
    pub fn large_tx_buffer(&mut self, i: u16) -> Option<&mut [u8]> {
        self.large.as_mut()?.tx.region_mut(i, 0, MAX_BUFFER_SIZE)
    }

    /// Returns large transmit buffer `i` to the pool.
    pub fn large_tx_release(&mut self, i: u16) {
        if let Some(l) = self.large.as_mut() {
            l.tx.release(i);
        }
    }

    /// Sends the first `len` bytes of large transmit buffer `i` from fixed-file `slot` to `to`,
    /// with what `opts` asks: cut into `segment`-byte datagrams by UDP GSO, stamped with an id.
    ///
    /// # Errors
    /// The submission queue could not take it, or `i` is not a large transmit buffer.
    pub fn send_large_tx(
        &mut self,
        slot: u32,
        i: u16,
        len: usize,
        to: SocketAddr,
        user_data: u64,
        opts: SendOpts,
    ) -> io::Result<()> {
        let e = self
            .large
            .as_mut()
            .ok_or_else(|| io::Error::other("no large buffer group"))?
            .tx
            .send_entry(i, len, to, slot, user_data, opts)?;
        self.push_send(&e, opts)
    }

    /// Publishes recycled buffers to the kernel: one release store per batch.
    pub fn sync_buffers(&mut self) {
        // SAFETY: the tail field overlays the first entry's `resv`, inside the mapping; the
        // kernel reads it atomically, so we store it atomically with release ordering.
        unsafe {
            let tail = BufRingEntry::tail(self.ring_mem.as_ptr()).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
        if let Some(l) = &self.large {
            // SAFETY: as above, for the large group's own mapping.
            unsafe {
                let tail = BufRingEntry::tail(l.ring_mem.as_ptr()).cast::<AtomicU16>();
                (*tail).store(l.tail, Ordering::Release);
            }
        }
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

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry built in this module points only at memory owned by `self`
        // that outlives the operation (see the module header).
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

    /// Arms a multishot receive on fixed-file `slot`.
    ///
    /// # Errors
    /// The submission queue could not take it.
    pub fn arm_recv(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::RecvMsgMulti::new(Fixed(slot), &*self.recv_msg, BGID)
            .build()
            .user_data(user_data);
        self.push(&e)
    }

    /// Arms the transmit-stamp command on fixed-file `slot` (`SOCKET_URING_OP_TX_TIMESTAMP`,
    /// Linux 6.15+): a multishot request that completes once per stamp the socket's sends earn
    /// ([`Completion::tx_stamp`]). The socket needs [`crate::enable_tx_timestamps`]. A kernel
    /// without the command ends it at once with `-EINVAL` or `-EOPNOTSUPP`; the stamps then stay on
    /// the socket's error queue ([`crate::recv_tx_stamps`]; [`Ring::arm_error_poll`] to be woken).
    ///
    /// # Errors
    /// The submission queue could not take it.
    pub fn arm_tx_stamps(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::UringCmd16::new(Fixed(slot), crate::txstamp::SOCKET_URING_OP_TX_TIMESTAMP)
            .build()
            .user_data(user_data);
        self.push(&e)
    }

    /// Arms a multishot poll for error readiness (`POLLERR`: something on the error queue, such
    /// as a transmit stamp) on fixed-file `slot`: where the kernel lacks the transmit-stamp
    /// command, the caller reads the stamps with [`crate::recv_tx_stamp`] when this completes.
    ///
    /// # Errors
    /// The submission queue could not take it.
    pub fn arm_error_poll(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        #[allow(clippy::cast_sign_loss)] // POLLERR is a small positive flag
        let e = opcode::PollAdd::new(Fixed(slot), libc::POLLERR as u32)
            .multi(true)
            .build()
            .user_data(user_data);
        self.push(&e)
    }

    /// Arms a read of the waker eventfd.
    ///
    /// # Errors
    /// The submission queue could not take it.
    pub fn arm_waker(&mut self, user_data: u64) -> io::Result<()> {
        let e = opcode::Read::new(
            io_uring::types::Fd(self.waker.raw()),
            std::ptr::from_mut::<u64>(&mut self.wake_buf).cast(),
            8,
        )
        .build()
        .user_data(user_data);
        self.push(&e)
    }

    /// Cancels the request submitted with `target`.
    ///
    /// # Errors
    /// The submission queue could not take it.
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        self.push(&e)
    }

    /// The datagram in buffer `bid`, whose completion reported `len` bytes.
    #[must_use]
    pub fn received(&self, bid: u16, len: usize) -> Option<Received<'_>> {
        let start = usize::from(bid).checked_mul(self.buffer_size)?;
        parse_received(
            self.buffers.get(start..start + len.min(self.buffer_size))?,
            &self.recv_msg,
        )
    }

    /// The payload of the datagram in buffer `bid` (see [`Ring::received`]), writable: for a
    /// datagram changed in place before it is sent on from the same buffer ([`Ring::send_with`]).
    pub fn received_payload_mut(&mut self, bid: u16, len: usize) -> Option<&mut [u8]> {
        let n = self.received(bid, len)?.payload.len();
        let start = usize::from(bid).checked_mul(self.buffer_size)? + PAYLOAD_OFFSET;
        self.buffers.get_mut(start..start + n)
    }

    /// Sends the payload of buffer `bid` (`len` bytes at its payload offset) from fixed-file
    /// `slot` to `to`. The buffer stays in flight until the send's completion, after which the
    /// caller recycles it.
    ///
    /// # Errors
    /// The submission queue could not take it.
    pub fn send(
        &mut self,
        slot: u32,
        bid: u16,
        len: usize,
        to: SocketAddr,
        user_data: u64,
    ) -> io::Result<()> {
        self.send_with(slot, bid, len, to, user_data, SendOpts::default())
    }

    /// [`Ring::send`], with UDP GSO when `segment` is given: the kernel cuts the payload into
    /// datagrams of `segment` bytes (the last may be shorter), e.g. to reflect a coalesced
    /// receive in one send.
    ///
    /// # Errors
    /// The submission queue could not take it.
    pub fn send_gso(
        &mut self,
        slot: u32,
        bid: u16,
        len: usize,
        segment: Option<u16>,
        to: SocketAddr,
        user_data: u64,
    ) -> io::Result<()> {
        self.send_with(
            slot,
            bid,
            len,
            to,
            user_data,
            SendOpts {
                segment,
                stamp_id: None,
            },
        )
    }

    /// [`Ring::send`] with what `opts` asks: UDP GSO segments, and the id its kernel transmit
    /// stamp comes back with ([`Ring::arm_tx_stamps`]).
    ///
    /// # Errors
    /// The submission queue could not take it.
    pub fn send_with(
        &mut self,
        slot: u32,
        bid: u16,
        len: usize,
        to: SocketAddr,
        user_data: u64,
        opts: SendOpts,
    ) -> io::Result<()> {
        let offset = usize::from(bid) * self.buffer_size + PAYLOAD_OFFSET;
        let len = len.min(self.max_payload());
        let payload = self
            .buffers
            .get_mut(offset..offset + len)
            .ok_or_else(|| io::Error::other("buffer id out of range"))?;
        let s = self
            .sends
            .get_mut(usize::from(bid))
            .ok_or_else(|| io::Error::other("buffer id out of range"))?;
        let e = prepare_send(s, payload, to, slot, user_data, opts);
        self.push_send(&e, opts)
    }

    /// Pushes a send: it completes during the next submit, which the next wait accounts for,
    /// and so does its transmit stamp when it asks for one that comes as a completion.
    fn push_send(&mut self, e: &squeue::Entry, opts: SendOpts) -> io::Result<()> {
        self.push(e)?;
        self.unwaited_sends += 1 + usize::from(self.stamp_completions && opts.stamp_id.is_some());
        Ok(())
    }

    /// Says whether the stamps of sends with a stamp id come back as completions of
    /// [`Ring::arm_tx_stamps`] (on loopback, during the very submit that issues the send): a
    /// wait then counts them in, so they do not end it on their own, as the sends themselves
    /// do not.
    pub fn expect_stamps(&mut self, on: bool) {
        self.stamp_completions = on;
    }

    /// Number of small transmit buffers.
    #[must_use]
    pub fn tx_count(&self) -> u16 {
        u16::try_from(self.tx.sends.len()).unwrap_or(u16::MAX)
    }

    /// Number of large transmit buffers (0 without [`Ring::add_large`]).
    #[must_use]
    pub fn large_tx_count(&self) -> u16 {
        self.large
            .as_ref()
            .map_or(0, |l| u16::try_from(l.tx.sends.len()).unwrap_or(u16::MAX))
    }

    /// A free transmit buffer, if any; the caller fills it ([`Ring::tx_buffer`]), sends it
    /// ([`Ring::send_tx`]) and releases it when the send completes ([`Ring::tx_release`]).
    pub fn tx_acquire(&mut self) -> Option<u16> {
        self.tx.acquire()
    }

    /// Transmit buffer `i`, the ring's buffer size.
    pub fn tx_buffer(&mut self, i: u16) -> Option<&mut [u8]> {
        self.tx.region_mut(i, 0, self.buffer_size)
    }

    /// Copies the payload of receive buffer `bid` (completion length `len`) into a free transmit
    /// buffer; returns the buffer and the payload length.
    pub fn tx_copy_from(&mut self, bid: u16, len: usize) -> Option<(u16, usize)> {
        let n = self.received(bid, len)?.payload.len();
        let src = usize::from(bid) * self.buffer_size + PAYLOAD_OFFSET;
        let payload = self.buffers.get(src..src + n)?;
        Some((self.tx.acquire_with(payload)?, n))
    }

    /// Copies the first `n` bytes of transmit buffer `i` into a free transmit buffer; returns it.
    /// For a second copy of a datagram that already lives in a transmit buffer.
    pub fn tx_copy_tx(&mut self, i: u16, n: usize) -> Option<u16> {
        self.tx.region(i, 0, n)?;
        let j = self.tx.acquire()?;
        let (src, dst) = (usize::from(i) * self.tx.size, usize::from(j) * self.tx.size);
        self.tx.bytes.copy_within(src..src + n, dst);
        Some(j)
    }

    /// Returns transmit buffer `i` to the pool.
    pub fn tx_release(&mut self, i: u16) {
        self.tx.release(i);
    }

    /// Sends the first `len` bytes of transmit buffer `i` from fixed-file `slot` to `to`.
    ///
    /// # Errors
    /// The submission queue could not take it, or `i` is not a transmit buffer.
    pub fn send_tx(
        &mut self,
        slot: u32,
        i: u16,
        len: usize,
        to: SocketAddr,
        user_data: u64,
    ) -> io::Result<()> {
        self.send_tx_with(slot, i, len, to, user_data, SendOpts::default())
    }

    /// [`Ring::send_tx`], with UDP GSO when `segment` is given (see [`Ring::send_gso`]).
    ///
    /// # Errors
    /// The submission queue could not take it, or `i` is not a transmit buffer.
    pub fn send_tx_gso(
        &mut self,
        slot: u32,
        i: u16,
        len: usize,
        segment: Option<u16>,
        to: SocketAddr,
        user_data: u64,
    ) -> io::Result<()> {
        self.send_tx_with(
            slot,
            i,
            len,
            to,
            user_data,
            SendOpts {
                segment,
                stamp_id: None,
            },
        )
    }

    /// [`Ring::send_tx`] with what `opts` asks (see [`Ring::send_with`]).
    ///
    /// # Errors
    /// The submission queue could not take it, or `i` is not a transmit buffer.
    pub fn send_tx_with(
        &mut self,
        slot: u32,
        i: u16,
        len: usize,
        to: SocketAddr,
        user_data: u64,
        opts: SendOpts,
    ) -> io::Result<()> {
        let e = self.tx.send_entry(i, len, to, slot, user_data, opts)?;
        self.push_send(&e, opts)
    }

    /// Makes each wait gather up to `batch` completions: the kernel waits for `batch` until `wait`
    /// has passed, then returns as soon as one is there (IORING_ENTER min_wait, Linux 6.12+;
    /// ignored where unsupported). Fewer wake-ups per packet at high rates, at most `wait` of
    /// added latency. `batch` 1 or `wait` 0: return on the first completion.
    pub fn set_batching(&mut self, batch: usize, wait: Duration) {
        self.batch = batch.clamp(1, 256);
        self.batch_wait_usec = u32::try_from(wait.as_micros()).unwrap_or(u32::MAX);
    }

    /// Whether [`Ring::set_batching`] takes effect on this kernel.
    #[must_use]
    pub const fn batching_supported(&self) -> bool {
        self.min_timeout
    }

    /// Submits everything queued and waits for a completion (or a batch, see
    /// [`Ring::set_batching`]) or `timeout`. Sends submitted now complete during the submit;
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

    /// Copies every available completion out of the queue.
    pub fn drain_completions(&mut self) -> Vec<Completion> {
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        for c in self.ring.completion() {
            out.push(Completion {
                user_data: c.user_data(),
                result: c.result(),
                flags: c.flags(),
                big: *c.big_cqe(),
            });
        }
        out
    }

    /// Returns the vector from [`Ring::drain_completions`] for reuse.
    pub fn give_back(&mut self, v: Vec<Completion>) {
        self.scratch = v;
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if let Some(l) = self.large.take() {
            let _ = self.ring.submitter().unregister_buf_ring(BGID_LARGE);
            // SAFETY: made in `add_large` with this length, no longer registered.
            unsafe {
                libc::munmap(l.ring_mem.as_ptr().cast(), l.ring_len);
            }
        }
        let _ = self.ring.submitter().unregister_buf_ring(BGID);
        // SAFETY: the mapping was created in `new` with this length and is no longer registered.
        unsafe {
            libc::munmap(self.ring_mem.as_ptr().cast(), self.ring_len);
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

/// Reads a multishot receive's buffer: header, name field, control field, payload.
fn parse_received<'a>(buf: &'a [u8], recv_msg: &libc::msghdr) -> Option<Received<'a>> {
    let out = RecvMsgOut::parse(buf, recv_msg).ok()?;
    let (from, n, c, truncated) = (
        sockaddr_from_bytes(out.name_data()),
        out.payload_data().len(),
        out.control_data().len(),
        out.is_payload_truncated(),
    );
    // The parser's views borrow it, not the buffer; the layout is fixed: header, name field,
    // control field, payload.
    let payload = buf.get(PAYLOAD_OFFSET..PAYLOAD_OFFSET + n)?;
    let control = buf.get(16 + NAME_LEN..16 + NAME_LEN + c.min(CONTROL_LEN))?;
    Some(Received {
        from,
        payload,
        truncated,
        segment: crate::cmsg::gro_segment(control).ok().flatten(),
        control,
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
    Ring::new(8, 1, 1).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_stamps_come_back_through_the_ring_with_their_ids() {
        let ip = "127.0.0.1".parse().unwrap();
        let mut ring = Ring::with_tx(16, 4, 2, 8).unwrap();
        let (tx, rx) = (
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
        );
        crate::enable_tx_timestamps(&tx).unwrap();
        ring.register_socket(0, tx.as_raw_fd()).unwrap();
        ring.arm_tx_stamps(0, 99).unwrap();
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
            let i = ring.tx_acquire().unwrap();
            ring.tx_buffer(i).unwrap()[..20].fill(u8::try_from(k).unwrap());
            let opts = SendOpts {
                segment: None,
                stamp_id: Some(id),
            };
            ring.send_tx_with(0, i, 20, to, 1, opts).unwrap();
        }
        let i = ring.tx_acquire().unwrap();
        let opts = SendOpts {
            segment: Some(10),
            stamp_id: Some(14),
        };
        ring.send_tx_with(0, i, 30, to, 1, opts).unwrap();
        let mut stamps = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stamps.len() < 4 {
            assert!(std::time::Instant::now() < deadline, "stamps: {stamps:?}");
            ring.submit_and_wait(Some(Duration::from_millis(20)))
                .unwrap();
            for c in ring.drain_completions() {
                match c.user_data {
                    1 => assert!(c.result > 0, "send: {}", c.result),
                    99 => {
                        assert!(c.more(), "the command stays armed: {}", c.result);
                        stamps.push(c.tx_stamp().unwrap());
                    }
                    other => panic!("unexpected completion {other}"),
                }
            }
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
    fn a_multishot_receive_carries_the_kernels_receive_time() {
        if probe().is_err() {
            eprintln!("SKIPPED (io_uring unavailable here)");
            return;
        }
        let mut ring = Ring::new(8, 4, 1).unwrap();
        let rx = crate::bind_udp("127.0.0.1".parse().unwrap(), 0, 65_536).unwrap();
        crate::enable_rx_timestamps(&rx).unwrap();
        ring.register_socket(0, rx.as_raw_fd()).unwrap();
        ring.arm_recv(0, 7).unwrap();
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
            .iter()
            .find(|c| c.user_data == 7)
            .expect("a receive completion");
        let r = ring
            .received(c.buffer().unwrap(), usize::try_from(c.result).unwrap())
            .unwrap();
        assert_eq!(r.payload, &[0x80; 172][..]);
        assert_eq!(r.from, Some(tx.local_addr().unwrap()));
        let t = crate::cmsg::rx_timestamp(r.control)
            .unwrap()
            .expect("a timestamp");
        assert!((before..=after).contains(&u128::from(t.0)));
    }

    #[test]
    fn a_gso_send_arrives_coalesced_by_gro_and_splits_into_its_datagrams() {
        if probe().is_err() {
            eprintln!("SKIPPED (io_uring unavailable here)");
            return;
        }
        let mut ring = Ring::with_buffer_size(8, 4, 2, 2, MAX_BUFFER_SIZE).unwrap();
        assert!(ring.max_payload() >= 64 << 10);
        let rx = crate::bind_udp("127.0.0.1".parse().unwrap(), 0, 1 << 20).unwrap();
        let tx = crate::bind_udp("127.0.0.1".parse().unwrap(), 0, 1 << 20).unwrap();
        crate::enable_udp_gro(&rx).unwrap();
        crate::enable_rx_timestamps(&rx).unwrap();
        ring.register_socket(0, rx.as_raw_fd()).unwrap();
        ring.register_socket(1, tx.as_raw_fd()).unwrap();
        ring.arm_recv(0, 7).unwrap();
        // 20 datagrams of 172 bytes and a last of 100, each numbered, in one send.
        let i = ring.tx_acquire().unwrap();
        let b = ring.tx_buffer(i).unwrap();
        for (k, chunk) in b[..20 * 172 + 100].chunks_mut(172).enumerate() {
            chunk.fill(u8::try_from(k).unwrap());
        }
        ring.send_tx_gso(1, i, 20 * 172 + 100, Some(172), rx.local_addr().unwrap(), 9)
            .unwrap();
        let (mut datagrams, mut sent, mut coalesced) = (Vec::new(), false, 0);
        for _ in 0..100 {
            ring.submit_and_wait(Some(Duration::from_millis(20)))
                .unwrap();
            let got = ring.drain_completions();
            for c in &got {
                if c.user_data == 9 {
                    assert_eq!(c.result, 20 * 172 + 100, "the whole payload was sent");
                    sent = true;
                }
                if c.user_data == 7 {
                    let bid = c.buffer().unwrap();
                    let r = ring
                        .received(bid, usize::try_from(c.result).unwrap())
                        .unwrap();
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
        if probe().is_err() {
            eprintln!("SKIPPED (io_uring unavailable here)");
            return;
        }
        let ip = "127.0.0.1".parse().unwrap();
        let mut ring = Ring::with_tx(8, 4, 3, 4).unwrap();
        ring.add_large(4, 2).unwrap();
        assert!(ring.add_large(4, 2).is_err(), "one large group");
        let (gro, small, out) = (
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
            crate::bind_udp(ip, 0, 1 << 20).unwrap(),
        );
        crate::enable_udp_gro(&gro).unwrap();
        for (slot, s) in [(0, &gro), (1, &small), (2, &out)] {
            ring.register_socket(slot, s.as_raw_fd()).unwrap();
        }
        ring.arm_recv_large(0, 10).unwrap();
        ring.arm_recv(1, 11).unwrap();
        // 8 numbered datagrams of 200 bytes, one GSO send from a large buffer.
        let i = ring.large_tx_acquire().unwrap();
        for (k, c) in ring.large_tx_buffer(i).unwrap()[..1600]
            .chunks_mut(200)
            .enumerate()
        {
            c.fill(u8::try_from(k).unwrap());
        }
        let gso = SendOpts {
            segment: Some(200),
            stamp_id: None,
        };
        ring.send_large_tx(2, i, 1600, gro.local_addr().unwrap(), 20, gso)
            .unwrap();
        let (mut seen, mut forwarded, mut got_small) = (0, false, None);
        for _ in 0..100 {
            ring.submit_and_wait(Some(Duration::from_millis(20)))
                .unwrap();
            let cs = ring.drain_completions();
            for c in &cs {
                let len = usize::try_from(c.result.max(0)).unwrap();
                match c.user_data {
                    10 => {
                        let bid = c.buffer().unwrap();
                        let r = ring.received_large(bid, len).unwrap();
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
                            let t = ring.tx_copy_from_large(bid, len, off, 200).unwrap();
                            ring.send_tx(2, t, 200, small.local_addr().unwrap(), 21)
                                .unwrap();
                            forwarded = true;
                        }
                        assert!(
                            ring.tx_copy_from_large(bid, len, n - 10, 200).is_none(),
                            "past the end"
                        );
                        seen += n / seg;
                        ring.recycle_large(bid);
                    }
                    11 => {
                        let bid = c.buffer().unwrap();
                        got_small = ring.received(bid, len).map(|r| r.payload.to_vec());
                        ring.recycle(bid);
                    }
                    20 => ring.large_tx_release(i),
                    _ => {}
                }
            }
            ring.give_back(cs);
            ring.sync_buffers();
            if seen == 8 && got_small.is_some() {
                break;
            }
        }
        assert_eq!(seen, 8, "every datagram arrived in the large group");
        assert_eq!(
            got_small,
            Some(vec![3u8; 200]),
            "segment 3 arrived in a small buffer"
        );
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
