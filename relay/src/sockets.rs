//! Channel sockets: where they bind, the backend's table of them, and the execution of a control
//! command, which may open or close one. Both backends run commands through [`execute`], so they
//! differ only in how a socket is polled.

use std::io;
use std::net::{IpAddr, UdpSocket};

use relay_proto::{Command, ErrorCode, ErrorReply, MonoTime, Relay, Response};

/// Binds a channel's UDP socket on `ip:port` (see [`relay_io::bind_udp`]) and turns a failure
/// into the reply control gets.
///
/// # Errors
/// `port_in_use` when the port is taken, `io` for anything else, with the system's message.
pub fn bind_channel_socket(ip: IpAddr, port: u16, rcvbuf: usize) -> Result<UdpSocket, ErrorReply> {
    relay_io::bind_udp(ip, port, rcvbuf).map_err(|e| {
        let code = if e.kind() == io::ErrorKind::AddrInUse {
            ErrorCode::PortInUse
        } else {
            ErrorCode::Io
        };
        ErrorReply::new(code, e.to_string())
    })
}

/// What a backend must do after a command: nothing, open a socket, or close one.
pub use relay_proto::CommandOutcome;

/// The backend's side of opening and closing channel sockets.
pub trait SocketTable {
    /// Starts receiving on `socket` for channel slot `id`.
    ///
    /// # Errors
    /// The backend could not take the socket (the reply to send).
    fn open(&mut self, id: relay_proto::SocketId, socket: UdpSocket) -> Result<(), ErrorReply>;
    /// Stops receiving on slot `id` and closes its socket.
    fn close(&mut self, id: relay_proto::SocketId);
}

/// Shared echo leg: most datagrams in one GSO send (the kernel's UDP_MAX_SEGMENTS is 64 or more).
pub const MAX_SEGMENTS: usize = 64;
/// Shared echo leg: most bytes in one GSO send (under the 64 KiB of one UDP datagram).
pub const MAX_GSO_BYTES: usize = 65_000;

/// Where channel sockets bind.
#[derive(Clone, Copy, Debug)]
pub struct BindConfig {
    /// Address.
    pub ip: IpAddr,
    /// SO_RCVBUF in bytes.
    pub rcvbuf: usize,
    /// Ask the kernel for receive timestamps on every channel socket (the core's `send_times`
    /// says whether sends are stamped too).
    pub timestamps: bool,
    /// io_uring: collect transmit stamps with the ring's command rather than from error queues.
    pub stamp_command: bool,
    /// One shared socket per shard toward the echo (`--echo-leg shared`).
    pub shared_echo: bool,
}

/// Executes one command against the core, opening or closing sockets as it says.
pub fn execute(
    relay: &mut Relay,
    table: &mut impl SocketTable,
    bind: BindConfig,
    now: MonoTime,
    command: Command,
) -> Result<Response, ErrorReply> {
    match relay.handle_command(now, command) {
        CommandOutcome::Reply(r) => r,
        CommandOutcome::Close { socket, reply } => {
            table.close(socket);
            reply
        }
        CommandOutcome::Open(pending) => {
            let id = pending.socket();
            let mut opened = false;
            let bound = bind_channel_socket(bind.ip, pending.port(), bind.rcvbuf).and_then(|s| {
                if bind.timestamps {
                    if let Err(e) = relay_io::enable_rx_timestamps(&s) {
                        warn_timestamps_refused(&e);
                    }
                }
                let port = s
                    .local_addr()
                    .map_err(|e| ErrorReply::new(ErrorCode::Io, format!("local address: {e}")))?
                    .port();
                table.open(id, s)?;
                opened = true;
                Ok(port)
            });
            let reply = relay.complete_open(now, pending, bound);
            if reply.is_err() && opened {
                table.close(id);
            }
            if let Ok(Response::Added { channel, port, .. }) = &reply {
                tracing::debug!(%channel, port, "channel added");
            }
            reply
        }
    }
}

/// Logs, once per process, that a channel socket refused kernel timestamps (its datagrams are
/// then taken at handling time and counted in `rtprelay_timestamps_fallback_total{cause="missing"}`).
fn warn_timestamps_refused(e: &io::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!("a channel socket refused SO_TIMESTAMPNS ({e}); its arrivals are user time");
    });
}

/// Whether the kernel gives UDP sockets receive timestamps here; why not, if it does not.
///
/// # Errors
/// The probe socket could not be made, or the option was refused.
pub fn probe_timestamps(ip: IpAddr) -> io::Result<()> {
    let s = relay_io::bind_udp(ip, 0, 4096)?;
    relay_io::enable_rx_timestamps(&s)
}

/// Whether the kernel stamps UDP sends here with the id each carries (SO_TIMESTAMPING with
/// OPT_ID, OPT_TSONLY and OPT_RX_FILTER, and SCM_TS_OPT_ID: Linux 6.13+); why not, if it does not.
///
/// # Errors
/// See [`relay_io::probe_tx_stamps`].
pub fn probe_tx_timestamps(ip: IpAddr) -> io::Result<()> {
    relay_io::probe_tx_stamps(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_port_in_use() {
        let a = bind_channel_socket("127.0.0.1".parse().unwrap(), 0, 65_536).unwrap();
        let port = a.local_addr().unwrap().port();
        let e = bind_channel_socket("127.0.0.1".parse().unwrap(), port, 65_536).unwrap_err();
        assert_eq!(e.code, ErrorCode::PortInUse);
        assert!(e.message.contains(&port.to_string()));
    }
}
