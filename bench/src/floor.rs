//! `bench floor`: the least a forwarder can do on io_uring, kept to show what the relay's
//! measurement costs. The same batching as the relay's data plane (one multishot RecvMsg per
//! fixed-file socket on a shared provided-buffer ring, a zero-copy SendMsg from the receive
//! buffer, buffers recycled on send completion, one `io_uring_enter` per batch), and nothing
//! else: no parsing, no T0 table, no statistics, no control socket. Each socket forwards datagrams
//! from the echo to the last other source it saw (latched), and anything else to the echo.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use relay_io::ring::{Arm, Group, Ring, SendOpts, UserData};

// The kinds of the ring's user data ([`UserData::kind`]), with the socket's slot.
const RECV: u8 = 1;
const SEND: u8 = 2;

/// The multishot receive of the socket in fixed-file `slot`.
const fn recv(slot: u32) -> (Arm, UserData) {
    let arm = Arm::Recv {
        slot,
        group: Group::Small,
    };
    (arm, UserData::new(RECV, slot, 0))
}

/// `bench floor` settings.
#[derive(Clone, Debug)]
pub(crate) struct FloorConfig {
    /// Address the sockets bind.
    pub(crate) bind: IpAddr,
    /// First port; socket i binds `port_base + i`.
    pub(crate) port_base: u16,
    /// Sockets.
    pub(crate) channels: u32,
    /// The echo server.
    pub(crate) echo: SocketAddr,
    /// Pin to this core.
    pub(crate) core: Option<usize>,
    /// Provided buffers.
    pub(crate) buffers: u16,
    /// Stop after this long (`None`: until killed).
    pub(crate) duration: Option<Duration>,
}

/// Runs the forwarder; returns the datagrams forwarded.
///
/// # Errors
/// A socket cannot be bound or the ring cannot be set up.
pub(crate) fn run(cfg: &FloorConfig) -> anyhow::Result<u64> {
    if let Some(core) = cfg.core {
        if !relay_io::pin_current_thread(core) {
            eprintln!("floor: cannot pin to core {core}");
        }
    }
    let _ = relay_io::raise_nofile_limit();
    let n = usize::try_from(cfg.channels)?;
    let sockets: Vec<UdpSocket> = (0..cfg.channels)
        .map(|i| {
            let port = u16::try_from(u32::from(cfg.port_base) + i)
                .map_err(|_| anyhow!("--port-base + --channels passes 65535"))?;
            relay_io::bind_udp(cfg.bind, port, 4 << 20)
                .map_err(|e| anyhow!("binding port {port}: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut ring = Ring::builder(4096)
        .buffers(cfg.buffers)
        .files(cfg.channels)
        .build()
        .context("io_uring")?;
    for (i, s) in sockets.iter().enumerate() {
        let slot = u32::try_from(i)?;
        ring.register_socket(slot, std::os::fd::AsRawFd::as_raw_fd(s))?;
        let (arm, ud) = recv(slot);
        ring.arm(arm, ud)?;
    }
    ring.submit()?;
    eprintln!(
        "floor ready ports={}-{} echo={}",
        cfg.port_base,
        u32::from(cfg.port_base) + cfg.channels - 1,
        cfg.echo
    );
    let mut peer: Vec<Option<SocketAddr>> = vec![None; n];
    let mut rearm = Vec::new();
    let mut forwarded = 0u64;
    let end = cfg.duration.map(|d| Instant::now() + d);
    loop {
        let wait = end.map_or(Duration::from_millis(100), |e| {
            e.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100))
        });
        if end.is_some_and(|e| Instant::now() >= e) {
            break;
        }
        ring.submit_and_wait(Some(wait.max(Duration::from_micros(1))))?;
        let mut completions = ring.drain_completions();
        for c in &mut completions {
            match c.user_data.kind {
                RECV => {
                    let slot = c.user_data.slot;
                    if !c.more() {
                        rearm.push(slot);
                    }
                    let Some(bid) = c.take_rx() else { continue };
                    let (from, payload) = match ring.received(&bid) {
                        Some(r) => (r.from, r.payload.len()),
                        None => (None, 0),
                    };
                    let to = match from {
                        Some(from) if from == cfg.echo => {
                            peer.get(slot as usize).copied().flatten()
                        }
                        Some(from) => {
                            if let Some(p) = peer.get_mut(slot as usize) {
                                *p = Some(from);
                            }
                            Some(cfg.echo)
                        }
                        None => None,
                    };
                    let Some(to) = to else {
                        ring.recycle(bid);
                        continue;
                    };
                    let ud = UserData::new(SEND, slot, 0);
                    match ring.send(slot, bid, payload, to, ud, SendOpts::default()) {
                        Ok(()) => forwarded += 1,
                        Err(refused) => ring.recycle(refused.buf),
                    }
                }
                SEND => {
                    if let Some(bid) = c.take_rx() {
                        ring.recycle(bid);
                    }
                }
                _ => {}
            }
        }
        ring.give_back(completions);
        ring.sync_buffers();
        for slot in rearm.drain(..) {
            let (arm, ud) = recv(slot);
            ring.arm(arm, ud)?;
        }
    }
    Ok(forwarded)
}
