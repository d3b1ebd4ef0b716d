//! Socket set-up every UDP endpoint of the workspace shares: binding a channel socket
//! non-blocking with a large receive buffer (forced past `net.core.rmem_max` where permitted, so
//! a burst of thousands of channels fits), and raising the file limit a relay with thousands of
//! sockets needs. Kept apart from the ring because the tokio backend and the tools use it too.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

#[allow(clippy::cast_possible_truncation)] // a c_int's size is 4
const INT_LEN: libc::socklen_t = size_of::<libc::c_int>() as libc::socklen_t;

/// Binds a UDP socket on `ip:port`, non-blocking and close-on-exec, with a receive buffer of
/// `rcvbuf` bytes (SO_RCVBUFFORCE when permitted, SO_RCVBUF otherwise).
///
/// # Errors
/// The socket could not be made or bound; the error says which step, for `addr`. Its kind is
/// [`io::ErrorKind::AddrInUse`] when the port is taken.
pub fn bind_udp(ip: IpAddr, port: u16, rcvbuf: usize) -> io::Result<UdpSocket> {
    let addr = SocketAddr::new(ip, port);
    let step = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {addr}: {e}"));
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.cloexec(),
        Some(Protocol::UDP),
    )
    .map_err(|e| step("socket for", e))?;
    if set_rcvbuf_force(&socket, rcvbuf).is_err() {
        let _ = socket.set_recv_buffer_size(rcvbuf);
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| step("non-blocking", e))?;
    socket.bind(&addr.into()).map_err(|e| step("bind", e))?;
    Ok(socket.into())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
///
/// # Errors
/// The system call failed.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit for the duration of the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Sets a socket's receive buffer with SO_RCVBUFFORCE, which may exceed `net.core.rmem_max`
/// (needs CAP_NET_ADMIN).
///
/// # Errors
/// Not permitted, or another failure; the caller falls back to SO_RCVBUF.
pub fn set_rcvbuf_force(fd: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v)
}

/// Asks the kernel to stamp every datagram `fd` receives with its software receive time
/// (`SO_TIMESTAMPNS`: a `CLOCK_REALTIME` timespec in a control message; see
/// [`crate::cmsg::rx_timestamp`]).
///
/// # Errors
/// The kernel refused the option (the caller falls back to user-space time).
pub fn enable_rx_timestamps(fd: &impl AsRawFd) -> io::Result<()> {
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// Lets the kernel coalesce datagrams of one flow and size that `fd` receives (UDP GRO; on
/// loopback, the segments of a GSO send): a receive then holds several datagrams, with their
/// segment size in a control message ([`crate::cmsg::gro_segment`]). The receive buffer must
/// have room for a coalesced datagram (up to 64 KiB), or it is truncated.
///
/// # Errors
/// The kernel refused the option (before Linux 5.0).
pub fn enable_udp_gro(fd: &impl AsRawFd) -> io::Result<()> {
    set_int_option(fd, crate::cmsg::SOL_UDP, crate::cmsg::UDP_GRO, 1)
}

/// The kernel's `UDP_MAX_SEGMENTS` (`linux/udp.h`): most datagrams one GSO send may carry, 64
/// since UDP GSO came (Linux 4.18; later kernels take more, never fewer).
pub const UDP_MAX_SEGMENTS: usize = 64;

/// Most datagrams one GSO send may carry on this machine: [`UDP_MAX_SEGMENTS`] where the kernel
/// takes the `UDP_SEGMENT` option, 1 (no GSO) where it does not. Probed once per process, as
/// quinn-udp does: `setsockopt(UDP_SEGMENT)` on a throwaway loopback socket. A device without
/// segmentation offload still fails a GSO send with `EIO`; the ring then lowers its own limit
/// ([`crate::ring::Gso`]).
pub fn max_gso_segments() -> usize {
    static PROBED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| {
        let probe = UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .or_else(|_| UdpSocket::bind((std::net::Ipv6Addr::LOCALHOST, 0)));
        match probe {
            Ok(s)
                if set_int_option(&s, crate::cmsg::SOL_UDP, crate::cmsg::UDP_SEGMENT, 1200)
                    .is_ok() =>
            {
                UDP_MAX_SEGMENTS
            }
            _ => 1,
        }
    })
}

/// `setsockopt(fd, level, name, &value, sizeof(int))`: the form every option here takes.
fn set_int_option(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            INT_LEN,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub use crate::cmsg::CONTROL_LEN;

/// What one [`recv_msg`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvMeta {
    /// Payload bytes written to the buffer.
    pub len: usize,
    /// The source address (IPv4 or IPv6).
    pub from: Option<SocketAddr>,
    /// Control bytes written to the control buffer.
    pub control_len: usize,
    /// The datagram was longer than the buffer and was cut.
    pub truncated: bool,
}

/// `recvmsg` on a non-blocking socket: the datagram into `buf`, its control messages into
/// `control`. Retries `EINTR`; `WouldBlock` when nothing is queued.
///
/// # Errors
/// What `recvmsg` returns.
pub fn recv_msg(fd: &impl AsRawFd, buf: &mut [u8], control: &mut [u8]) -> io::Result<RecvMeta> {
    // SAFETY: sockaddr_in6 is plain old data; all-zero is valid.
    let mut name: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = std::ptr::from_mut(&mut name).cast();
    #[allow(clippy::cast_possible_truncation)] // 28 bytes
    let namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    msg.msg_namelen = namelen;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    loop {
        // SAFETY: every pointer in `msg` refers to a live, writable buffer of the stated length
        // (`name`, `buf` through `iov`, `control`) for the duration of the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
        if n >= 0 {
            let name_len = (msg.msg_namelen as usize).min(size_of::<libc::sockaddr_in6>());
            // SAFETY: reading the bytes of a plain-old-data struct we own, within its size.
            let name_bytes = unsafe {
                std::slice::from_raw_parts(std::ptr::from_ref(&name).cast::<u8>(), name_len)
            };
            return Ok(RecvMeta {
                len: usize::try_from(n).unwrap_or(0),
                from: crate::ring::sockaddr_from_bytes(name_bytes),
                control_len: msg.msg_controllen.min(control.len()),
                truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
            });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What a send carries besides its payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendOpts {
    /// UDP GSO: the kernel cuts the payload into datagrams of this many bytes (the last may be
    /// shorter).
    pub segment: Option<u16>,
    /// The id the send's kernel transmit stamp comes back with (`SCM_TS_OPT_ID`; the socket
    /// needs [`enable_tx_timestamps`]).
    pub stamp_id: Option<u32>,
}

/// Sends `payload` to `to` in one `sendmsg`; with `segment`, the kernel cuts it into datagrams of
/// that many bytes (UDP GSO; the last may be shorter). For a readiness-driven socket (tokio);
/// the ring has its own ([`crate::ring::Ring::send`]).
///
/// # Errors
/// What `sendmsg` reported (`WouldBlock` when the socket's buffer is full).
pub fn send_gso(
    fd: &impl std::os::fd::AsFd,
    payload: &[u8],
    segment: Option<u16>,
    to: SocketAddr,
) -> io::Result<usize> {
    send_msg(
        fd,
        payload,
        to,
        SendOpts {
            segment,
            stamp_id: None,
        },
    )
}

/// Sends `payload` to `to` in one `sendmsg` with the control messages `opts` asks for: a GSO
/// segment size, and the id of its transmit stamp (read back with [`recv_tx_stamp`]).
///
/// # Errors
/// What `sendmsg` reported (`WouldBlock` when the socket's buffer is full).
pub fn send_msg(
    fd: &impl std::os::fd::AsFd,
    payload: &[u8],
    to: SocketAddr,
    opts: SendOpts,
) -> io::Result<usize> {
    let sock = socket2::SockRef::from(fd);
    let addr = socket2::SockAddr::from(to);
    let bufs = [io::IoSlice::new(payload)];
    let mut cmsg = [0u8; crate::cmsg::SEND_CMSG_SPACE];
    let n = crate::cmsg::send_cmsgs(opts.segment, opts.stamp_id, &mut cmsg);
    let mut msg = socket2::MsgHdr::new().with_addr(&addr).with_buffers(&bufs);
    if n > 0 {
        msg = msg.with_control(cmsg.get(..n).unwrap_or_default());
    }
    loop {
        match sock.sendmsg(&msg, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Asks the kernel to stamp every datagram `fd` sends as it leaves (software transmit stamps,
/// keyed by the id each send carries, without a copy of the packet; see
/// [`crate::txstamp::TX_STAMP_FLAGS`]). The stamps queue on the socket's error queue, or reach
/// io_uring through [`crate::ring::Arm::TxStamps`].
///
/// # Errors
/// The kernel refused the option: before Linux 6.12 (`OPT_RX_FILTER`) it is `EINVAL`; the error
/// says so.
pub fn enable_tx_timestamps(fd: &impl AsRawFd) -> io::Result<()> {
    let flags = libc::c_int::try_from(crate::txstamp::TX_STAMP_FLAGS).unwrap_or(0);
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPING, flags).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "SO_TIMESTAMPING (kernel transmit stamps, Linux 6.13+): {e}; \
                 run with --timestamps user on older kernels"
            ),
        )
    })
}

/// Checks that the kernel stamps sends with the id they carry (`SCM_TS_OPT_ID`, Linux 6.13+),
/// on a throwaway loopback socket sending one byte to itself: a kernel with `SO_TIMESTAMPING`
/// but without ids refuses every such send. Every endpoint that stamps its sends (relay, echo,
/// loadgen, the simulated Asterisk) asks this once at start.
///
/// # Errors
/// The option or the send was refused, or the stamp did not come back with the send's id.
pub fn probe_tx_stamps(ip: IpAddr) -> io::Result<()> {
    let lo = if ip.is_ipv6() && !ip.is_unspecified() {
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
    };
    let s = bind_udp(lo, 0, 1 << 16)?;
    enable_tx_timestamps(&s)?;
    let opts = SendOpts {
        segment: None,
        stamp_id: Some(0x5eed),
    };
    send_msg(&s, &[0], s.local_addr()?, opts)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match recv_tx_stamp(&s) {
            Ok(t) if t.id == 0x5eed => return Ok(()),
            Ok(t) => {
                return Err(io::Error::other(format!(
                    "the stamp came back with id {:#x}, not the send's",
                    t.id
                )))
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::yield_now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::other("no transmit stamp came back within 1 s"))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads one transmit stamp from `fd`'s error queue without blocking.
///
/// # Errors
/// `WouldBlock` when none is queued; what `recvmsg` reported; or `InvalidData` (with the
/// [`crate::txstamp::TxStampError`] inside) for an entry that is not a usable stamp, which is
/// consumed all the same.
pub fn recv_tx_stamp(fd: &impl AsRawFd) -> io::Result<crate::txstamp::TxStamp> {
    // u64s: control messages are aligned to 8 bytes.
    let mut control = [0u64; 32];
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header (no name, no data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    loop {
        // SAFETY: the only pointer in `msg` is `control`, live and writable for its stated
        // length for the duration of the call.
        let n = unsafe {
            libc::recvmsg(
                fd.as_raw_fd(),
                &mut msg,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            let len = msg.msg_controllen.min(size_of_val(&control));
            let mut raw = [0u8; 256];
            for (out, w) in raw.chunks_exact_mut(8).zip(control.iter()) {
                out.copy_from_slice(&w.to_ne_bytes());
            }
            return crate::txstamp::from_errqueue(raw.get(..len).unwrap_or_default())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Most transmit stamps one [`recv_tx_stamps`] reads.
pub const STAMP_BATCH: usize = 16;
#[allow(clippy::cast_possible_truncation)] // 16
const STAMP_BATCH_UINT: libc::c_uint = STAMP_BATCH as libc::c_uint;

/// Reads up to [`STAMP_BATCH`] transmit stamps from `fd`'s error queue in one system call
/// (`recvmmsg` with `MSG_ERRQUEUE`, without blocking), handing each entry to `f` (an entry that is
/// not a usable stamp as its error). Returns how many entries were read: fewer than
/// [`STAMP_BATCH`] means the queue is empty now, so a caller drains a socket with one call in the
/// common case, where [`recv_tx_stamp`] needs one per stamp and one more to find it empty.
///
/// # Errors
/// What `recvmmsg` reported, other than `WouldBlock` (which is `Ok(0)`).
pub fn recv_tx_stamps(
    fd: &impl AsRawFd,
    mut f: impl FnMut(Result<crate::txstamp::TxStamp, crate::txstamp::TxStampError>),
) -> io::Result<usize> {
    const CONTROL_WORDS: usize = 16; // 128 bytes: a stamp's entry takes 64 + 48
    let mut control = [[0u64; CONTROL_WORDS]; STAMP_BATCH];
    // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header.
    let mut msgs: [libc::mmsghdr; STAMP_BATCH] = unsafe { std::mem::zeroed() };
    for (m, c) in msgs.iter_mut().zip(control.iter_mut()) {
        m.msg_hdr.msg_control = c.as_mut_ptr().cast();
        m.msg_hdr.msg_controllen = size_of_val(c);
    }
    let n = loop {
        // SAFETY: each header's only pointer is its own control buffer, live and writable for
        // its stated length for the duration of the call; `msgs` holds STAMP_BATCH headers.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                STAMP_BATCH_UINT,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n >= 0 {
            break usize::try_from(n).unwrap_or(0);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    };
    let mut raw = [0u8; CONTROL_WORDS * 8];
    for (m, c) in msgs.iter().zip(control.iter()).take(n) {
        for (out, w) in raw.chunks_exact_mut(8).zip(c.iter()) {
            out.copy_from_slice(&w.to_ne_bytes());
        }
        let len = m.msg_hdr.msg_controllen.min(raw.len());
        f(crate::txstamp::from_errqueue(
            raw.get(..len).unwrap_or_default(),
        ));
    }
    Ok(n)
}

/// The plain socket calls on loopback: a GSO send arrives as its datagrams, or as one GRO receive
/// with its segment size; a taken port is `AddrInUse` and named; received datagrams carry the
/// kernel's receive time (none without the option); a send with an id comes back stamped with it,
/// one stamp at a time, in order, changing neither side's receive control data; transmit stamps are
/// read in batches of at most sixteen (40 in at most 4 calls); the file limit is raised to the hard
/// limit, idempotently.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gso_send_arrives_as_its_datagrams_and_coalesced_with_gro() {
        let lo = "127.0.0.1".parse().unwrap();
        let plain = bind_udp(lo, 0, 1 << 20).unwrap();
        let gro = bind_udp(lo, 0, 1 << 20).unwrap();
        enable_udp_gro(&gro).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let payload: Vec<u8> = (0..500u32).map(|i| (i % 251) as u8).collect();
        for to in [&plain, &gro] {
            let sent = send_gso(&tx, &payload, Some(200), to.local_addr().unwrap()).unwrap();
            assert_eq!(sent, 500);
        }
        // Without GRO: three datagrams, 200 + 200 + 100.
        plain.set_nonblocking(false).unwrap();
        plain
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        for want in [200, 200, 100] {
            let n = plain.recv(&mut buf).unwrap();
            assert_eq!(n, want);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, payload);
        // With GRO: one receive of all 500 bytes, segment size in the control message.
        gro.set_nonblocking(false).unwrap();
        gro.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut big = [0u8; 4096];
        let mut control = [0u8; CONTROL_LEN];
        let meta = recv_msg(&gro, &mut big, &mut control).unwrap();
        assert_eq!(&big[..meta.len], &payload[..]);
        let segment = crate::cmsg::gro_segment(&control[..meta.control_len]).unwrap();
        assert_eq!(segment, Some(200));
        // No segment: one plain datagram.
        send_gso(&tx, &payload[..10], None, plain.local_addr().unwrap()).unwrap();
        assert_eq!(plain.recv(&mut buf).unwrap(), 10);
    }

    #[test]
    fn a_taken_port_is_addr_in_use_and_named() {
        let a = bind_udp("127.0.0.1".parse().unwrap(), 0, 65_536).unwrap();
        let port = a.local_addr().unwrap().port();
        let e = bind_udp("127.0.0.1".parse().unwrap(), port, 65_536).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains(&port.to_string()), "{e}");
    }

    #[test]
    fn received_datagrams_carry_the_kernels_receive_time() {
        let rx = bind_udp("127.0.0.1".parse().unwrap(), 0, 65_536).unwrap();
        enable_rx_timestamps(&rx).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        tx.send_to(b"hello", rx.local_addr().unwrap()).unwrap();
        let (mut buf, mut control) = ([0u8; 64], [0u8; CONTROL_LEN]);
        let meta = loop {
            match recv_msg(&rx, &mut buf, &mut control) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                r => break r.unwrap(),
            }
        };
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert_eq!(
            (&buf[..meta.len], meta.from),
            (&b"hello"[..], Some(tx.local_addr().unwrap()))
        );
        assert!(!meta.truncated);
        let t = crate::cmsg::rx_timestamp(&control[..meta.control_len])
            .unwrap()
            .expect("a timestamp");
        let (lo, hi) = (before.as_nanos(), after.as_nanos());
        assert!(
            (lo..=hi).contains(&u128::from(t.0)),
            "{lo} <= {} <= {hi}",
            t.0
        );
        // Without the option: no timestamp.
        let plain = bind_udp("127.0.0.1".parse().unwrap(), 0, 65_536).unwrap();
        tx.send_to(b"x", plain.local_addr().unwrap()).unwrap();
        let meta = loop {
            match recv_msg(&plain, &mut buf, &mut control) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                r => break r.unwrap(),
            }
        };
        assert_eq!(
            crate::cmsg::rx_timestamp(&control[..meta.control_len]),
            Ok(None)
        );
    }

    #[test]
    fn a_send_with_an_id_comes_back_stamped_with_it() {
        let lo = "127.0.0.1".parse().unwrap();
        let rx = bind_udp(lo, 0, 65_536).unwrap();
        enable_rx_timestamps(&rx).unwrap();
        let tx = bind_udp(lo, 0, 65_536).unwrap();
        enable_tx_timestamps(&tx).unwrap();
        enable_rx_timestamps(&tx).unwrap();
        let wall = || {
            u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos(),
            )
            .unwrap()
        };
        assert_eq!(
            recv_tx_stamp(&tx).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing sent, nothing queued"
        );
        let to = rx.local_addr().unwrap();
        let mut stamps = Vec::new();
        for id in [7u32, 0xffff_fff0, 7] {
            let before = wall();
            let opts = SendOpts {
                segment: None,
                stamp_id: Some(id),
            };
            assert_eq!(send_msg(&tx, b"hello", to, opts).unwrap(), 5);
            let after = wall();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            let s = loop {
                match recv_tx_stamp(&tx) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < deadline, "no stamp");
                        std::thread::yield_now();
                    }
                    r => break r.unwrap(),
                }
            };
            assert_eq!(s.id, id);
            assert!(
                (before..=after).contains(&s.at.0),
                "{before} <= {} <= {after}",
                s.at.0
            );
            stamps.push(s.at);
        }
        assert!(stamps.windows(2).all(|w| w[0] <= w[1]));
        // The receiver's stamps are unchanged: SO_TIMESTAMPNS only. And the sender's own receive
        // control data gains no software SCM_TIMESTAMPING (OPT_RX_FILTER).
        let (mut buf, mut control) = ([0u8; 64], [0u8; CONTROL_LEN]);
        let meta = recv_msg(&rx, &mut buf, &mut control).unwrap();
        assert!(crate::cmsg::rx_timestamp(&control[..meta.control_len])
            .unwrap()
            .is_some());
        send_gso(&rx, b"back", None, tx.local_addr().unwrap()).unwrap();
        let meta = loop {
            match recv_msg(&tx, &mut buf, &mut control) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                r => break r.unwrap(),
            }
        };
        assert_eq!(&buf[..meta.len], b"back");
        assert_eq!(
            meta.control_len, 32,
            "one SO_TIMESTAMPNS message and nothing else"
        );
    }

    #[test]
    fn stamps_are_read_in_batches() {
        let lo = "127.0.0.1".parse().unwrap();
        let rx = bind_udp(lo, 0, 1 << 20).unwrap();
        let tx = bind_udp(lo, 0, 1 << 20).unwrap();
        enable_tx_timestamps(&tx).unwrap();
        assert_eq!(
            recv_tx_stamps(&tx, |_| panic!("nothing queued")).unwrap(),
            0
        );
        let to = rx.local_addr().unwrap();
        for id in 0..40u32 {
            let opts = SendOpts {
                segment: None,
                stamp_id: Some(1_000 + id),
            };
            send_msg(&tx, b"x", to, opts).unwrap();
        }
        // On loopback each stamp is queued during its send: 40 are there, read 16 at a time.
        let mut ids = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut calls = 0;
        while ids.len() < 40 {
            assert!(std::time::Instant::now() < deadline, "{ids:?}");
            let n = recv_tx_stamps(&tx, |r| ids.push(r.unwrap().id)).unwrap();
            assert!(n <= STAMP_BATCH);
            calls += 1;
        }
        assert_eq!(ids, (1_000..1_040).collect::<Vec<_>>());
        assert!(calls <= 4, "{calls} calls for 40 stamps");
        assert_eq!(recv_tx_stamps(&tx, |_| panic!("drained")).unwrap(), 0);
    }

    #[test]
    fn the_file_limit_is_raised_to_the_hard_limit() {
        let soft = raise_nofile_limit().unwrap();
        assert!(soft >= 1024, "{soft}");
        assert_eq!(raise_nofile_limit().unwrap(), soft, "idempotent");
    }
}
