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
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&v).cast(),
            INT_LEN,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_addr_in_use_and_named() {
        let a = bind_udp("127.0.0.1".parse().unwrap(), 0, 65_536).unwrap();
        let port = a.local_addr().unwrap().port();
        let e = bind_udp("127.0.0.1".parse().unwrap(), port, 65_536).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains(&port.to_string()), "{e}");
    }

    #[test]
    fn the_file_limit_is_raised_to_the_hard_limit() {
        let soft = raise_nofile_limit().unwrap();
        assert!(soft >= 1024, "{soft}");
        assert_eq!(raise_nofile_limit().unwrap(), soft, "idempotent");
    }
}
