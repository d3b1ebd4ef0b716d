//! `loadgen blast`: the maximum rate a reflector sustains.
//!
//! A closed loop: `sockets` UDP sockets each keep `window` RTP packets in flight against the
//! target; every packet that comes back is answered with a new one from the same socket. The rate
//! of returns is the rate the target sustains (if loadgen's own core is not the limit: compare the
//! target's CPU per packet). Used to show the echo is never a benchmark's bottleneck.
#![allow(clippy::cast_possible_truncation)] // sequence numbers wrap by design

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use relay_io::ring::Ring;
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
}

const RECV: u64 = 1 << 56;
const SEND_TX: u64 = 2 << 56;
const KIND: u64 = 0xff << 56;

/// Runs the loop.
///
/// # Errors
/// Set-up or the ring failed.
pub fn run(cfg: &BlastConfig) -> anyhow::Result<BlastReport> {
    if let Some(id) = cfg.core {
        if !relay_io::pin_current_thread(id) {
            eprintln!("loadgen: cannot pin to core {id}");
        }
    }
    let n = cfg.sockets.max(1);
    let in_flight = n * cfg.window.max(1);
    let tx = u16::try_from(in_flight.next_power_of_two().min(1 << 15))
        .map_err(|_| anyhow!("--sockets × --window too large"))?;
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| relay_io::bind_udp([127, 0, 0, 1].into(), 0, 8 << 20).map_err(anyhow::Error::from))
        .collect::<Result<_, _>>()?;
    let mut ring = Ring::with_tx(4096, tx, n, tx).context("io_uring")?;
    for (i, s) in sockets.iter().enumerate() {
        let slot = u32::try_from(i)?;
        ring.register_socket(slot, std::os::fd::AsRawFd::as_raw_fd(s))?;
        ring.arm_recv(slot, RECV | u64::from(slot))?;
    }
    let mut seq = 0u16;
    let mut pkt = [0u8; RTP_HEADER_LEN + 160];
    let mut send = |ring: &mut Ring, slot: u32| -> anyhow::Result<bool> {
        let Some(i) = ring.tx_acquire() else {
            return Ok(false);
        };
        seq = seq.wrapping_add(1);
        RtpHeader {
            sequence: seq,
            timestamp: u32::from(seq) * 160,
            ssrc: Ssrc(slot),
            ..RtpHeader::default()
        }
        .write(&mut pkt);
        if let Some(b) = ring.tx_buffer(i) {
            b[..pkt.len()].copy_from_slice(&pkt);
        }
        ring.send_tx(slot, i, pkt.len(), cfg.target, SEND_TX | u64::from(i))?;
        Ok(true)
    };
    let (mut sent, mut received) = (0u64, 0u64);
    for slot in 0..n {
        for _ in 0..cfg.window.max(1) {
            sent += u64::from(send(&mut ring, slot)?);
        }
    }
    let start = Instant::now();
    let mut counted_from = (Instant::now(), 0u64);
    let mut warm = false;
    while start.elapsed() < cfg.duration + Duration::from_millis(500) {
        ring.submit_and_wait(Some(Duration::from_millis(10)))?;
        if !warm && start.elapsed() >= Duration::from_millis(500) {
            warm = true; // measure after half a second of warm-up
            counted_from = (Instant::now(), received);
        }
        let completions = ring.drain_completions();
        let mut rearm = Vec::new();
        for c in &completions {
            match c.user_data & KIND {
                RECV => {
                    let slot = (c.user_data & 0xffff_ffff) as u32;
                    if !c.more() {
                        rearm.push(slot);
                    }
                    if let Some(bid) = c.buffer() {
                        ring.recycle(bid);
                        received += 1;
                        sent += u64::from(send(&mut ring, slot)?);
                    }
                }
                SEND_TX => ring.tx_release((c.user_data & 0xffff) as u16),
                _ => {}
            }
        }
        ring.give_back(completions);
        ring.sync_buffers();
        for slot in rearm {
            ring.arm_recv(slot, RECV | u64::from(slot))?;
        }
    }
    let seconds = counted_from.0.elapsed().as_secs_f64();
    let counted = received - counted_from.1;
    Ok(BlastReport {
        sent,
        received,
        seconds,
        packets_per_second: counted as f64 / seconds.max(1e-9),
    })
}
