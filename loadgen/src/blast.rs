//! `loadgen blast`: the maximum rate a reflector sustains.
//!
//! A closed loop: `sockets` UDP sockets each keep `window` RTP packets in flight against the
//! target; every packet that comes back is answered with a new one from the same socket. The rate
//! of returns is the rate the target sustains (if loadgen's own core is not the limit: compare the
//! target's CPU per packet). Used to show the echo is never a benchmark's bottleneck.
//!
//! With `--gso N` each send is a UDP GSO batch of N packets and the sockets receive with UDP
//! GRO, the way the shared echo leg talks to the echo: a returned batch (however the kernel
//! coalesced it) is answered with a batch of as many new packets.
#![allow(clippy::cast_possible_truncation)] // sequence numbers wrap by design

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::error::{io, RunError};
use relay_io::ring::{Arm, Group, Ring, SendOpts, UserData};
use relay_proto::rtp::{RtpHeader, RTP_HEADER_LEN};
use relay_proto::Ssrc;
use serde::Serialize;

/// Settings.
#[derive(Clone, Debug)]
pub struct BlastConfig {
    /// The reflector.
    pub target: SocketAddr,
    /// Sockets.
    pub sockets: u32,
    /// Packets in flight per socket.
    pub window: u32,
    /// How long.
    pub duration: Duration,
    /// Core to pin to.
    pub core: Option<usize>,
    /// Packets per UDP GSO send (0: plain sends and receives).
    pub gso: u32,
}

/// The result.
#[derive(Clone, Debug, Serialize)]
pub struct BlastReport {
    /// Packets sent.
    pub sent: u64,
    /// Packets that came back.
    pub received: u64,
    /// Measured time, seconds.
    pub seconds: f64,
    /// Returns per second.
    pub packets_per_second: f64,
    /// Packets per GSO send (0: none).
    pub gso: u32,
    /// Receives that held more than one packet (GRO coalesced them).
    pub coalesced: u64,
}

// The kinds of the ring's user data ([`UserData::kind`]), with the socket's slot.
const RECV: u8 = 1;
const SEND_TX: u8 = 2;

/// The multishot receive of the socket in fixed-file `slot`.
const fn recv(slot: u32) -> Arm {
    Arm::Recv {
        slot,
        group: Group::Small,
    }
}

/// Runs the loop.
///
/// # Errors
/// Set-up or the ring failed.
pub fn run(cfg: &BlastConfig) -> Result<BlastReport, RunError> {
    if let Some(id) = cfg.core {
        if !relay_io::pin_current_thread(id) {
            eprintln!("loadgen: cannot pin to core {id}");
        }
    }
    let n = cfg.sockets.max(1);
    let window = cfg.window.max(1);
    // Packets a send carries (1 without GSO).
    let per_send = cfg
        .gso
        .clamp(1, u32::try_from(relay_io::max_gso_segments()).unwrap_or(1));
    let gso = cfg.gso > 0;
    let sends_in_flight = n * window.div_ceil(per_send);
    let tx = u16::try_from(sends_in_flight.next_power_of_two().min(1 << 15))
        .map_err(|_| RunError::Settings("--sockets × --window too large".into()))?;
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| relay_io::bind_udp([127, 0, 0, 1].into(), 0, 8 << 20))
        .collect::<Result<_, _>>()
        .map_err(io("binding a socket on 127.0.0.1"))?;
    let mut ring = if gso {
        for s in &sockets {
            relay_io::enable_udp_gro(s).map_err(io("UDP_GRO"))?;
        }
        // A receive may hold a whole coalesced batch; a send holds one batch.
        Ring::builder(4096)
            .buffers(tx)
            .files(n)
            .tx(tx)
            .buffer_size(relay_io::ring::MAX_BUFFER_SIZE)
    } else {
        Ring::builder(4096).buffers(tx).files(n).tx(tx)
    }
    .build()
    .map_err(RunError::Ring)?;
    for (slot, s) in (0..).zip(&sockets) {
        ring.register_socket(slot, std::os::fd::AsRawFd::as_raw_fd(s))
            .map_err(io("registering a socket with io_uring"))?;
        ring.arm(recv(slot), UserData::new(RECV, slot, 0))
            .map_err(io("arming a receive"))?;
    }
    let mut seq = 0u16;
    const LEN: usize = RTP_HEADER_LEN + 160;
    // Sends `k` packets from `slot` (one GSO send when k > 1); false when no buffer is free.
    let mut send = |ring: &mut Ring, slot: u32, k: u32| -> Result<bool, RunError> {
        let Some(mut i) = ring.tx_acquire(Group::Small) else {
            return Ok(false);
        };
        let k = k.clamp(1, per_send) as usize;
        if let Some(b) = ring.tx_buffer(&mut i) {
            for chunk in b.chunks_exact_mut(LEN).take(k) {
                seq = seq.wrapping_add(1);
                RtpHeader {
                    sequence: seq,
                    timestamp: u32::from(seq) * 160,
                    ssrc: Ssrc(slot),
                    ..RtpHeader::default()
                }
                .write(chunk);
            }
        }
        let opts = SendOpts {
            segment: (gso && k > 1).then_some(LEN as u16),
            stamp_id: None,
        };
        let ud = UserData::new(SEND_TX, slot, 0);
        ring.send(slot, i, k * LEN, cfg.target, ud, opts)
            .map_err(|refused| RunError::Io {
                what: "sending".to_owned(),
                source: refused.error,
            })?;
        Ok(true)
    };
    let (mut sent, mut received, mut coalesced) = (0u64, 0u64, 0u64);
    for slot in 0..n {
        let mut left = window;
        while left > 0 {
            let k = left.min(per_send);
            if send(&mut ring, slot, k)? {
                sent += u64::from(k);
            }
            left -= k;
        }
    }
    let start = Instant::now();
    let mut counted_from = (Instant::now(), 0u64);
    let mut warm = false;
    while start.elapsed() < cfg.duration + Duration::from_millis(500) {
        ring.submit_and_wait(Some(Duration::from_millis(10)))
            .map_err(io("waiting on io_uring"))?;
        if !warm && start.elapsed() >= Duration::from_millis(500) {
            warm = true; // measure after half a second of warm-up
            counted_from = (Instant::now(), received);
        }
        let mut completions = ring.drain_completions();
        let mut rearm = Vec::new();
        for c in &mut completions {
            match c.user_data.kind {
                RECV => {
                    let slot = c.user_data.slot;
                    if !c.more() {
                        rearm.push(slot);
                    }
                    if let Some(bid) = c.take_rx() {
                        let k = ring.received(&bid).map_or(1, |r| {
                            r.segment
                                .map_or(1, |s| r.payload.len().div_ceil(usize::from(s).max(1)))
                        }) as u32;
                        ring.recycle(bid);
                        received += u64::from(k);
                        coalesced += u64::from(k > 1);
                        // Answer with as many, in batches of at most --gso.
                        let mut left = k;
                        while left > 0 {
                            let b = left.min(per_send);
                            if send(&mut ring, slot, b)? {
                                sent += u64::from(b);
                            }
                            left -= b;
                        }
                    }
                }
                SEND_TX => {
                    if let Some(t) = c.take_tx() {
                        ring.recycle(t);
                    }
                }
                _ => {}
            }
        }
        ring.give_back(completions);
        ring.sync_buffers();
        for slot in rearm {
            ring.arm(recv(slot), UserData::new(RECV, slot, 0))
                .map_err(io("re-arming a receive"))?;
        }
    }
    let seconds = counted_from.0.elapsed().as_secs_f64();
    let counted = received - counted_from.1;
    Ok(BlastReport {
        sent,
        received,
        seconds,
        packets_per_second: counted as f64 / seconds.max(1e-9),
        gso: cfg.gso,
        coalesced,
    })
}
