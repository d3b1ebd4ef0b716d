//! `loadgen rtp`: N synthetic Asterisk externalMedia streams against a running relay.
//!
//! Each channel is one UDP socket, registered with the relay over its control socket (giving the
//! socket's own address as Asterisk's), sending what Asterisk 22 sends for an externalMedia ulaw
//! channel: payload type 0, 160-byte payload, one packet per ptime, random SSRC and starting
//! sequence, first timestamp 160 and +160 per packet.
//!
//! Sending is paced on absolute deadlines: global slot `g` leaves at `start + g·ptime/N`, so the
//! channels are spread evenly over the period and nothing drifts however long the run. All
//! channels share one io_uring (the relay's ring code): a multishot receive per socket, sends
//! from a transmit pool, one `io_uring_enter` per batch. Channels are added by a helper thread at
//! the ramp rate, so control round trips never delay a send.
//!
//! Returns are measured with the relay's own core types: a T0 table per channel (end-to-end
//! round trip), the RFC 3550 sequence tracker (loss, duplicates, reordering), lateness, and a
//! payload check.
//!
//! **Times are the kernel's.** A packet's T0 is the kernel's transmit stamp of its send
//! (`SO_TIMESTAMPING`, software stamp taken as the packet is handed to the device): each send
//! carries a stamp id (a place in a [`Sends`] ring, O(1), no allocation), and the stamp comes back
//! on the channel socket's error queue, read after each submission that sent from it and when it
//! polls ready (io_uring's transmit-stamp command can read them instead, [`Tuning`]). T1 is
//! the kernel's receive stamp of the return (`SO_TIMESTAMPNS`). Both are `CLOCK_REALTIME`,
//! converted to loadgen's monotonic clock ([`relay_io::WallToMono`]); the stamp and the return
//! may come in either order ([`T0Table::stamp`], [`T0Table::lookup`]). A return whose round trip
//! cannot be taken from the two stamps (the transmit stamp never came, a clock step, or T1 not
//! after T0) is counted in `timestamps_missing`, never recorded. Where the kernel refuses stamps
//! the report says `timestamps: user`: T0 is then read just before the submission, T1 at handling.
#![allow(clippy::cast_possible_truncation)] // sequence numbers, timestamps and the payload pattern wrap by design

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use relay_io::ring::{Arm, Completion, Group, Ring, UserData};
use relay_io::{SendOpts, TxStamp, TxStampError};
use relay_proto::rng::SplitMix64;
use relay_proto::rtp::{parse_rtp, RtpHeader, RTP_HEADER_LEN};
use relay_proto::sends::{Record, Sends};
use relay_proto::seq::{SeqEvent, SequenceTracker};
use relay_proto::stats::{Direction, LatencyHistogram};
use relay_proto::t0::{Lookup, Stamp, T0Table, Unstamped};
use relay_proto::time::duration_nanos;
use relay_proto::timing::{LatenessConfig, Timing};
use relay_proto::{Format, MonoTime, Ssrc};

use crate::ctl::{RelayClient, RelayClientError};
use crate::error::{io, RunError};
use crate::rtp_report::{ChanTotals, Plan, RelaySide, Report, StampTotals};

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct RtpConfig {
    /// The relay's control socket.
    pub relay_ctl: PathBuf,
    /// Channels to run.
    pub channels: u32,
    /// How long to send.
    pub duration: Duration,
    /// Channels added per second (0: all at once).
    pub ramp: f64,
    /// Packet interval.
    pub ptime: Duration,
    /// Address the channel sockets bind.
    pub bind: IpAddr,
    /// Echo server to name in `add` (the relay's default when absent).
    pub echo: Option<SocketAddr>,
    /// Seed of SSRCs and starting sequence numbers.
    pub seed: u64,
    /// Core to pin the I/O thread to.
    pub core: Option<usize>,
    /// How long to wait for returns after the last send.
    pub grace: Duration,
    /// Show a live progress line on standard error.
    pub progress: bool,
    /// The relay's process, to measure its CPU time over the run.
    pub relay_pid: Option<u32>,
    /// Send to these addresses instead of adding channels to a relay (another forwarder, or the
    /// echo itself for a baseline): channel i uses entry `i % len`. Returns must come from there.
    pub targets: Option<Vec<SocketAddr>>,
    /// Bind channel i's socket to this port + i (default: any port).
    pub local_port_base: Option<u16>,
    /// Send this long before measuring: latency, CPU and the window counts start after it.
    pub warmup: Duration,
}

/// Parses a target list: `IP:PORT` (every channel to one address), `IP:LO-HI` (channel i to
/// port LO + i), or `@FILE` (one address a line).
///
/// # Errors
/// The text is none of those, or the file cannot be read.
pub fn parse_targets(s: &str) -> Result<Targets, String> {
    parse_target_list(s).map(Targets)
}

/// A list of target addresses (see [`parse_targets`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets(pub Vec<SocketAddr>);

fn parse_target_list(s: &str) -> Result<Vec<SocketAddr>, String> {
    if let Some(path) = s.strip_prefix('@') {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        return text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.trim()
                    .parse()
                    .map_err(|_| format!("{path}: {l:?} is not IP:PORT"))
            })
            .collect();
    }
    let (ip, ports) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not IP:PORT, IP:LO-HI or @FILE"))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{ip:?} is not an IP address"))?;
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("{p:?} is not a port"));
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(ports)?, port(ports)?),
    };
    if lo == 0 || lo > hi {
        return Err(format!("{ports:?} is not a port range"));
    }
    Ok((lo..=hi).map(|p| SocketAddr::new(ip, p)).collect())
}

// The kinds of the ring's user data ([`UserData::kind`]), each with its channel socket's slot.
const RECV: u8 = 1;
/// A send (the stamp id it carries as the tag).
const SEND_TX: u8 = 2;
/// io_uring's transmit-stamp command on a channel's socket.
const TX_STAMPS: u8 = 3;
/// The error-readiness poll of a channel's socket (transmit stamps on its error queue).
const ERR_POLL: u8 = 4;
const PAYLOAD: usize = 160;
/// How long a send waits for its transmit stamp before it is given up on (a stamp takes
/// microseconds).
const STAMP_TIMEOUT_NS: u64 = 1_000_000_000;

/// A send's user data: its socket's slot and the stamp id it carries (its transmit buffer comes
/// back with its completion).
const fn send_data(slot: u32, id: u32) -> UserData {
    UserData::new(SEND_TX, slot, id)
}

/// A channel socket's multishot receive.
const fn recv(slot: u32) -> (Arm, UserData) {
    let arm = Arm::Recv {
        slot,
        group: Group::Small,
    };
    (arm, UserData::new(RECV, slot, 0))
}

/// Where loadgen's transmit stamps come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// io_uring's command on each channel's socket.
    Ring,
    /// Each socket's error queue.
    ErrorQueue,
    /// None: T0 is read just before the submission.
    User,
}

/// Round-trip timing from kernel stamps: the sends waiting for their transmit stamp, and what
/// could not be timed.
#[derive(Debug)]
struct Stamps {
    /// Where transmit stamps come from.
    source: Source,
    /// Sends waiting for their stamp, by stamp id.
    sends: Sends,
    /// Stamps read from error queues, settled after the sample that follows them.
    errq: Vec<TxStamp>,
    /// Returns whose round trip could not be taken from two kernel stamps.
    missing: u64,
    /// Stamps that settled nothing.
    stale: u64,
}

impl Stamps {
    /// Record `r`'s send is given up on: its stamp never came.
    fn give_up(chans: &mut [Chan], missing: &mut u64, r: Record) {
        let Some((ssrc, seq)) = r.t0 else { return };
        if let Some(c) = chans.get_mut(r.socket as usize) {
            // A return already waiting for this stamp cannot be timed; one still to come will
            // find the entry unstamped and be counted then.
            if c.t0.unstamped(ssrc, seq) == Unstamped::Returned {
                *missing += 1;
            }
        }
    }

    /// A transmit stamp came back: T0 of its packet, which may have returned already.
    fn stamped(
        &mut self,
        chans: &mut [Chan],
        e2e: &mut LatencyHistogram<u64>,
        wall: &relay_io::WallToMono,
        s: TxStamp,
    ) {
        let t0 = wall.to_mono(s.at);
        let (missing, stale) = (&mut self.missing, &mut self.stale);
        let found = self.sends.settle(s.id, |r| {
            let Some(t0) = t0 else {
                Self::give_up(chans, missing, r);
                return;
            };
            let Some((ssrc, seq)) = r.t0 else { return };
            let Some(c) = chans.get_mut(r.socket as usize) else {
                return;
            };
            match c.t0.stamp(ssrc, seq, MonoTime::from_nanos(t0)) {
                Stamp::Waiting => {}
                Stamp::Matched { rtt_ns } => e2e.record(rtt_ns),
                Stamp::NotPositive => *missing += 1,
                Stamp::Gone => *stale += 1,
            }
        });
        if !found {
            self.stale += 1;
        }
    }

    /// Gives up on sends whose stamp is overdue at `now` (all of them with `u64::MAX`).
    fn sweep(&mut self, chans: &mut [Chan], now: u64) {
        let deadline = MonoTime::from_nanos(now.saturating_sub(STAMP_TIMEOUT_NS));
        let missing = &mut self.missing;
        self.sends
            .sweep(deadline, |r| Self::give_up(chans, missing, r));
    }

    /// Reads the stamps waiting on `socket`'s error queue (settled after the next sample).
    fn read_errq(&mut self, socket: &UdpSocket) {
        // Bounded: a socket's stamps are few (its sends of one batch).
        for _ in 0..64 {
            let (errq, stale) = (&mut self.errq, &mut self.stale);
            let read = relay_io::recv_tx_stamps(socket, |r| match r {
                Ok(s) => errq.push(s),
                Err(_) => *stale += 1,
            });
            // Fewer than a full batch: the queue was empty when the call returned.
            if !matches!(read, Ok(relay_io::socket::STAMP_BATCH)) {
                break;
            }
        }
    }
}

/// Sets up transmit stamps on every channel socket (registered in `ring`, nothing armed yet)
/// and says where they come from: the error queues, or with `command` io_uring's command where
/// the kernel takes it (a kernel without it refuses it at once, at submission; the error queues
/// then).
fn tx_stamp_source(
    ring: &mut Ring,
    sockets: &[UdpSocket],
    bind: IpAddr,
    command: bool,
) -> Result<Source, RunError> {
    if let Err(e) = sockets
        .iter()
        .try_for_each(relay_io::enable_tx_timestamps)
        .and_then(|()| relay_io::probe_tx_stamps(bind))
    {
        eprintln!("loadgen: no kernel transmit stamps with ids ({e}); T0 is user time");
        return Ok(Source::User);
    }
    let slots = u32::try_from(sockets.len()).unwrap_or(u32::MAX);
    if command {
        for slot in 0..slots {
            ring.arm(Arm::TxStamps { slot }, UserData::new(TX_STAMPS, slot, 0))
                .map_err(io("arming the transmit-stamp command"))?;
        }
        ring.submit().map_err(io("submitting to io_uring"))?;
        let cs = ring.drain_completions();
        let refused = cs
            .iter()
            .find(|c| c.user_data.kind == TX_STAMPS && !c.more())
            .map(|c| c.result);
        ring.give_back(cs);
        let Some(r) = refused else {
            // Each stamped send completes twice: the wait counts its stamp in.
            ring.expect_stamps(true);
            return Ok(Source::Ring);
        };
        eprintln!(
            "loadgen: io_uring refused the transmit-stamp command ({}); reading stamps from the error queues",
            std::io::Error::from_raw_os_error(-r)
        );
    }
    for slot in 0..slots {
        ring.arm(Arm::ErrorPoll { slot }, UserData::new(ERR_POLL, slot, 0))
            .map_err(io("arming an error-queue poll"))?;
    }
    Ok(Source::ErrorQueue)
}

/// One synthetic call leg.
#[derive(Debug)]
struct Chan {
    /// Its SSRC.
    ssrc: Ssrc,
    /// Its first sequence number.
    first_seq: u16,
    /// The relay's address for it, once added.
    relay: Option<SocketAddr>,
    /// Packets sent.
    sent: u64,
    /// When each packet left (its kernel transmit stamp) and, while that stamp is awaited,
    /// when it came back.
    t0: T0Table,
    /// Sequence tracking of what came back.
    seq: SequenceTracker,
    /// Jitter and lateness of what came back.
    timing: Timing,
    /// Returns measured (first copies).
    matched: u64,
    /// Returns whose payload differed from what was sent.
    corrupt: u64,
    /// Datagrams from an address other than the relay's port.
    wrong_source: u64,
}

/// The payload of packet `k` of channel `i`: recognisable, so a return can be checked.
fn payload_byte(i: usize, k: u64, j: usize) -> u8 {
    (k as u8).wrapping_add(j as u8) ^ (i as u8)
}

/// How a run gets its times, beyond the command line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tuning {
    /// Read transmit stamps through io_uring's `SOCKET_URING_OP_TX_TIMESTAMP` command (Linux
    /// 6.15+) instead of the sockets' error queues. Armed beside the channels' provided-buffer
    /// receives it was seen on Linux 6.18 to hand a receive a buffer still in use once the
    /// buffers ran short (returns duplicated and lost at 200 channels), as the relay saw: for
    /// experiments only.
    pub tx_stamps_command: bool,
}

/// Channel `i`'s ring slot (`i` < `--channels`, a `u32`).
fn slot_of(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// Runs the load; returns the report.
///
/// # Errors
/// Set-up failed, the relay refused a channel, or the ring failed.
pub fn run(cfg: &RtpConfig) -> Result<Report, RunError> {
    run_with(cfg, Tuning::default())
}

/// [`run`], tuned.
///
/// # Errors
/// Set-up failed, the relay refused a channel, or the ring failed.
#[allow(clippy::too_many_lines)] // one loop, read top to bottom
pub fn run_with(cfg: &RtpConfig, tuning: Tuning) -> Result<Report, RunError> {
    let n = cfg.channels as usize;
    if n == 0 {
        return Err(RunError::Settings("--channels must be at least 1".into()));
    }
    if let Some(id) = cfg.core {
        if !relay_io::pin_current_thread(id) {
            eprintln!("loadgen: cannot pin to core {id}");
        }
    }
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|i| {
            let port = match cfg.local_port_base {
                Some(base) => u16::try_from(usize::from(base) + i).map_err(|_| {
                    RunError::Settings("--local-port-base + --channels passes 65535".into())
                })?,
                None => 0,
            };
            relay_io::bind_udp(cfg.bind, port, 1 << 20).map_err(|source| RunError::Io {
                what: format!("binding a channel socket on --bind {}", cfg.bind),
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    let locals: Vec<SocketAddr> = sockets
        .iter()
        .map(UdpSocket::local_addr)
        .collect::<Result<_, _>>()
        .map_err(io("a channel socket's address"))?;
    let buffers = u16::try_from((n * 2).next_power_of_two().clamp(256, 1 << 15)).unwrap_or(1 << 15);
    let mut ring = Ring::builder(4096)
        .buffers(buffers)
        .files(cfg.channels)
        .tx(8192)
        .build()
        .map_err(RunError::Ring)?;
    // Returns are timed by the kernel's receive stamp, as the relay times them.
    let mut kernel_time = true;
    for s in &sockets {
        if let Err(e) = relay_io::enable_rx_timestamps(s) {
            if kernel_time {
                eprintln!(
                    "loadgen: no kernel receive timestamps ({e}); timing returns in user space"
                );
            }
            kernel_time = false;
        }
    }
    for (slot, s) in (0..cfg.channels).zip(&sockets) {
        ring.register_socket(slot, std::os::fd::AsRawFd::as_raw_fd(s))
            .map_err(io("registering a channel socket with io_uring"))?;
    }
    // Sends are timed by the kernel's transmit stamp (set up before the receives are armed, so
    // that what the check drains is the command's answer alone).
    let source = if kernel_time {
        tx_stamp_source(&mut ring, &sockets, cfg.bind, tuning.tx_stamps_command)?
    } else {
        Source::User
    };
    for slot in 0..cfg.channels {
        let (arm, ud) = recv(slot);
        ring.arm(arm, ud).map_err(io("arming a receive"))?;
    }
    ring.submit().map_err(io("submitting to io_uring"))?;
    let mut stamps = Stamps {
        source,
        sends: Sends::new(),
        errq: Vec::with_capacity(8192),
        missing: 0,
        stale: 0,
    };
    // Sockets that sent in the batch being submitted (read for stamps with the error queues).
    let mut sent_from = vec![false; n];
    let mut errq_slots: Vec<u32> = Vec::with_capacity(n);
    // Whether each socket's stamp command gave a stamp since it was armed.
    let mut ring_stamped = vec![false; n];

    let mut rng = SplitMix64::new(cfg.seed);
    let mut chans: Vec<Chan> = (0..n)
        .map(|_| Chan {
            ssrc: Ssrc(rng.next_u32()),
            first_seq: (rng.next_u32() & 0xffff) as u16,
            relay: None,
            sent: 0,
            t0: T0Table::new(1024),
            seq: SequenceTracker::new(2),
            timing: Timing::new(Format::Ulaw.clock_rate(), LatenessConfig::default()),
            matched: 0,
            corrupt: 0,
            wrong_source: 0,
        })
        .collect();
    let names: Vec<String> = (0..n)
        .map(|i| format!("lg{}-{i}", std::process::id()))
        .collect();

    // Static targets: nothing to add.
    if let Some(targets) = &cfg.targets {
        if targets.is_empty() {
            return Err(RunError::Settings("--to names no address".into()));
        }
        for (i, c) in chans.iter_mut().enumerate() {
            c.relay = targets.get(i % targets.len()).copied();
        }
    }
    // Channels are added at the ramp rate by a helper thread, on a connection made here so that
    // an unreachable relay fails the run at once.
    let mut ctl = match cfg.targets {
        Some(_) => None,
        None => Some(RelayClient::connect(&cfg.relay_ctl)?),
    };
    let (added_tx, added_rx) = mpsc::channel::<Result<(usize, u16), RelayClientError>>();
    let helper = {
        let (cfg, names, locals) = (cfg.clone(), names.clone(), locals.clone());
        std::thread::spawn(move || -> Option<RelayClient> {
            let mut ctl = ctl.take()?;
            let start = Instant::now();
            for (i, (name, local)) in names.iter().zip(&locals).enumerate() {
                if cfg.ramp > 0.0 {
                    let at = start + Duration::from_secs_f64(i as f64 / cfg.ramp);
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                }
                let r = ctl.add(name, 0, *local, cfg.echo).map(|port| (i, port));
                let failed = r.is_err();
                let _ = added_tx.send(r);
                if failed {
                    break;
                }
            }
            Some(ctl)
        })
    };

    let clock = relay_io::Clock::new();
    let mut wall = relay_io::WallToMono::new();
    // With user time: sends queued since the last submission, (channel, sequence), T0 settled
    // at submission.
    let mut queued: Vec<(usize, u16)> = Vec::with_capacity(8192);
    let mut relay_cpu_start = cfg.relay_pid.and_then(relay_io::process_cpu_ns);
    let warmup_end = duration_nanos(cfg.warmup);
    let mut warm = cfg.warmup.is_zero();
    let mut window_start = (0u64, 0u64);
    let now_ns = || clock.now_ns();
    let ptime_ns = duration_nanos(cfg.ptime).max(1);
    let ticks_per_packet =
        u32::try_from(duration_nanos(cfg.ptime) * 8_000 / 1_000_000_000).unwrap_or(160);
    let send_end = duration_nanos(cfg.warmup + cfg.duration);
    let stop_at = send_end + duration_nanos(cfg.grace);
    let slot_time = |g: u64| g / n as u64 * ptime_ns + (g % n as u64) * ptime_ns / n as u64;
    let mut g: u64 = 0;
    let mut e2e = LatencyHistogram::<u64>::new(3);
    let mut added = 0usize;
    let mut add_error = None;
    let mut rearm: Vec<u32> = Vec::new();
    let mut last_progress = 0u64;
    let mut progress_sent = 0u64;
    let mut pkt = [0u8; RTP_HEADER_LEN + PAYLOAD];

    loop {
        let now = now_ns();
        // Sampled before draining: once the helper has finished, everything it sent is queued.
        let helper_done = helper.is_finished();
        while let Ok(r) = added_rx.try_recv() {
            match r {
                Ok((i, port)) => {
                    if let Some(c) = chans.get_mut(i) {
                        c.relay = Some(SocketAddr::new(relay_ip(cfg.bind), port));
                        added += 1;
                    }
                }
                Err(e) => add_error = Some(e),
            }
        }
        if let Some(e) = add_error.take() {
            return Err(RunError::AddChannel(e));
        }
        if cfg.targets.is_some() {
            added = n;
        }
        if !warm && now >= warmup_end {
            // The measured window starts: latency from here, CPU from here, counts from here.
            warm = true;
            e2e = LatencyHistogram::new(3);
            (stamps.missing, stamps.stale) = (0, 0);
            relay_cpu_start = cfg.relay_pid.and_then(relay_io::process_cpu_ns);
            window_start = (
                chans.iter().map(|c| c.sent).sum(),
                chans.iter().map(|c| c.matched).sum(),
            );
        }
        if helper_done && added < n {
            return Err(RunError::Control(format!(
                "the control thread stopped after adding {added} of {n} channels"
            )));
        }
        // Every send that is due, on its absolute deadline.
        while slot_time(g) <= now && slot_time(g) < send_end {
            let i = (g % n as u64) as usize;
            g += 1;
            let Some((ssrc, seq, Some(to))) = chans
                .get(i)
                .map(|c| (c.ssrc, c.first_seq.wrapping_add(c.sent as u16), c.relay))
            else {
                continue;
            };
            let Some(mut tx) = ring.tx_acquire(Group::Small) else {
                continue;
            };
            // The stamp id this send carries; a send still waiting a lap ago is given up on.
            let id = if source == Source::User {
                0
            } else {
                let missing = &mut stamps.missing;
                stamps.sends.push(
                    Record {
                        socket: slot_of(i),
                        tag: 0,
                        arrival: MonoTime::from_nanos(now),
                        direction: Direction::ToEcho,
                        t0: Some((ssrc, seq)),
                    },
                    |r| Stamps::give_up(&mut chans, missing, r),
                )
            };
            let Some(c) = chans.get_mut(i) else { continue };
            let k = c.sent;
            RtpHeader {
                marker: k == 0,
                payload_type: 0,
                sequence: seq,
                timestamp: ticks_per_packet.wrapping_mul(k as u32 + 1),
                ssrc: c.ssrc,
            }
            .write(&mut pkt);
            for (j, b) in pkt[RTP_HEADER_LEN..].iter_mut().enumerate() {
                *b = payload_byte(i, k, j);
            }
            if let Some(buf) = ring.tx_buffer(&mut tx) {
                buf[..pkt.len()].copy_from_slice(&pkt);
            }
            let opts = SendOpts {
                segment: None,
                stamp_id: (source != Source::User).then_some(id),
            };
            let slot = slot_of(i);
            ring.send(slot, tx, pkt.len(), to, send_data(slot, id), opts)
                .map_err(|refused| RunError::Io {
                    what: "sending".to_owned(),
                    source: refused.error,
                })?;
            let _ = c.t0.insert(MonoTime::from_nanos(now), c.ssrc, seq);
            if source == Source::User {
                queued.push((i, seq));
            } else if stamps.source == Source::ErrorQueue {
                if let Some(f) = sent_from.get_mut(i).filter(|f| !**f) {
                    *f = true;
                    errq_slots.push(slot_of(i));
                }
            }
            c.sent += 1;
        }
        if now >= stop_at {
            break;
        }
        let next = if slot_time(g) < send_end {
            slot_time(g)
        } else {
            stop_at
        };
        let t_submit = now_ns();
        let wait = Duration::from_nanos(next.saturating_sub(t_submit).clamp(1, 100_000_000));
        // With user time, this enter submits the queued sends: now is their T0.
        for (i, seq) in queued.drain(..) {
            if let Some(c) = chans.get_mut(i) {
                let _ = c.t0.stamp(c.ssrc, seq, MonoTime::from_nanos(t_submit));
            }
        }
        ring.submit_and_wait(Some(wait))
            .map_err(io("waiting on io_uring"))?;
        let mut completions = ring.drain_completions();
        if stamps.source == Source::ErrorQueue {
            // The stamps of this enter's sends, and of sockets whose poll says some wait.
            for comp in &completions {
                if comp.user_data.kind == ERR_POLL {
                    let slot = comp.user_data.slot;
                    if let Some(f) = sent_from.get_mut(slot as usize).filter(|f| !**f) {
                        *f = true;
                        errq_slots.push(slot);
                    }
                }
            }
            for slot in errq_slots.drain(..) {
                if let Some(s) = sockets.get(slot as usize) {
                    stamps.read_errq(s);
                }
                if let Some(f) = sent_from.get_mut(slot as usize) {
                    *f = false;
                }
            }
        }
        // After the drain: every stamp in it is older than the sample.
        let sample = clock.sample();
        wall.resample(sample);
        let now = sample.mono_after;
        let rx_stamps = kernel_time.then_some(&wall);
        for comp in &mut completions {
            let slot = comp.user_data.slot;
            match comp.user_data.kind {
                RECV => on_recv(
                    &mut ring,
                    &mut chans,
                    (&mut e2e, &mut stamps.missing),
                    (now, rx_stamps),
                    comp,
                    &mut rearm,
                ),
                SEND_TX => {
                    if comp.result < 0 && source != Source::User {
                        // It never left: nothing to time (its packet is lost).
                        let _ = stamps.sends.settle(comp.user_data.tag, |_| {});
                    }
                    if let Some(tx) = comp.take_tx() {
                        ring.recycle(tx);
                    }
                }
                TX_STAMPS => match comp.tx_stamp() {
                    Ok(s) => {
                        if let Some(f) = ring_stamped.get_mut(slot as usize) {
                            *f = true;
                        }
                        stamps.stamped(&mut chans, &mut e2e, &wall, s);
                    }
                    Err(TxStampError::Ended(r)) => {
                        let stamped = ring_stamped
                            .get_mut(slot as usize)
                            .map(|f| std::mem::replace(f, false))
                            .unwrap_or(true);
                        if stamped {
                            ring.arm(Arm::TxStamps { slot }, UserData::new(TX_STAMPS, slot, 0))
                                .map_err(io("re-arming the transmit-stamp command"))?;
                        } else if stamps.source == Source::Ring {
                            // Ended at once: the stamps wait on the error queues from now on.
                            eprintln!(
                                "loadgen: the transmit-stamp command ended ({}); reading stamps from the error queues",
                                std::io::Error::from_raw_os_error(-r)
                            );
                            stamps.source = Source::ErrorQueue;
                            ring.expect_stamps(false);
                            for s in 0..cfg.channels {
                                let ud = UserData::new(ERR_POLL, s, 0);
                                ring.arm(Arm::ErrorPoll { slot: s }, ud)
                                    .map_err(io("arming an error-queue poll"))?;
                            }
                        }
                    }
                    Err(_) => stamps.stale += 1,
                },
                ERR_POLL if !comp.more() => {
                    ring.arm(Arm::ErrorPoll { slot }, UserData::new(ERR_POLL, slot, 0))
                        .map_err(io("arming an error-queue poll"))?;
                }
                _ => {}
            }
        }
        ring.give_back(completions);
        let mut errq = std::mem::take(&mut stamps.errq);
        for s in errq.drain(..) {
            stamps.stamped(&mut chans, &mut e2e, &wall, s);
        }
        stamps.errq = errq;
        stamps.sweep(&mut chans, now);
        ring.sync_buffers();
        for slot in rearm.drain(..) {
            let (arm, ud) = recv(slot);
            ring.arm(arm, ud).map_err(io("re-arming a receive"))?;
        }
        if cfg.progress && now >= last_progress + 1_000_000_000 {
            let sent: u64 = chans.iter().map(|c| c.sent).sum();
            let rate = (sent - progress_sent) as f64 * 1e9 / (now - last_progress).max(1) as f64;
            let p99 = e2e.summary().p99_ns as f64 / 1e6;
            eprint!("\rcalls {added}/{n}  packets/s {rate:>8.0}  e2e p99 {p99:>7.3} ms   ");
            let _ = std::io::stderr().flush();
            last_progress = now;
            progress_sent = sent;
        }
    }
    if cfg.progress {
        eprintln!();
    }
    // The grace period is long past every stamp: what still waits never comes.
    stamps.sweep(&mut chans, u64::MAX);

    let relay_cpu = cfg
        .relay_pid
        .and_then(relay_io::process_cpu_ns)
        .zip(relay_cpu_start)
        .map(|(end, start)| end.saturating_sub(start));
    let ctl = helper
        .join()
        .map_err(|_| RunError::Control("the control thread panicked".into()))?;
    let mut relay_side = RelaySide::default();
    if let Some(mut ctl) = ctl {
        let global = ctl.global()?;
        relay_side = RelaySide::from_global(&global);
        for (c, name) in chans.iter().zip(&names) {
            if c.relay.is_some() {
                let s = ctl.remove(name)?;
                relay_side.add_channel(&s);
            }
        }
    }
    relay_side.cpu_ns = relay_cpu;
    let window = crate::rtp_report::Window {
        sent: chans.iter().map(|c| c.sent).sum::<u64>() - window_start.0,
        returned: chans.iter().map(|c| c.matched).sum::<u64>() - window_start.1,
    };
    let plan = Plan {
        channels: cfg.channels,
        duration: cfg.duration,
        ptime: cfg.ptime,
    };
    Ok(Report::build(
        &plan,
        added,
        &chans.iter().map(ChanTotals::from).collect::<Vec<_>>(),
        &e2e,
        relay_side,
        window,
        StampTotals {
            source: if source == Source::User {
                "user"
            } else {
                "kernel"
            },
            tx_source: match stamps.source {
                Source::Ring => "ring",
                Source::ErrorQueue => "error_queue",
                Source::User => "none",
            },
            missing: stamps.missing,
            stale: stamps.stale,
        },
    ))
}

fn relay_ip(bind: IpAddr) -> IpAddr {
    if bind.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        bind
    }
}

/// A return on channel socket `comp`'s slot: T1 is its kernel receive stamp; its round trip is
/// recorded in `e2e` now if its transmit stamp came already, when that stamp comes otherwise, or
/// counted in `missing` if it cannot be taken from two kernel stamps.
fn on_recv(
    ring: &mut Ring,
    chans: &mut [Chan],
    (e2e, missing): (&mut LatencyHistogram<u64>, &mut u64),
    (now, stamps): (u64, Option<&relay_io::WallToMono>),
    comp: &mut Completion,
    rearm: &mut Vec<u32>,
) {
    let slot = comp.user_data.slot;
    if !comp.more() {
        rearm.push(slot);
    }
    if comp.result < 0 {
        return;
    }
    let Some(bid) = comp.take_rx() else { return };
    let i = slot as usize;
    if let (Some(c), Some(r)) = (chans.get_mut(i), ring.received(&bid)) {
        // The kernel's arrival stamp (with user time, the moment it was handled). A stamp that
        // cannot be converted (a step of the wall clock) times nothing.
        let arrival = match stamps {
            Some(w) => w.to_mono(
                relay_io::rx_timestamp(r.control)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            ),
            None => Some(now),
        };
        let timed = arrival.is_some();
        let now = MonoTime::from_nanos(arrival.unwrap_or(now));
        match (r.from, c.relay) {
            (Some(from), Some(relay)) if from == relay => {}
            _ => {
                c.wrong_source += 1;
                ring.recycle(bid);
                return;
            }
        }
        if let Ok(p) = parse_rtp(r.payload) {
            if p.ssrc == c.ssrc {
                let k = u64::from(p.sequence.wrapping_sub(c.first_seq));
                let intact = p.payload.len() == PAYLOAD
                    && p.payload
                        .iter()
                        .enumerate()
                        .all(|(j, &b)| b == payload_byte(i, k, j));
                c.corrupt += u64::from(!intact);
                if !timed {
                    // No T1: the round trip is not taken, whatever its T0.
                    let _ = c.t0.unstamped(p.ssrc, p.sequence);
                }
                match c.t0.lookup(now, p.ssrc, p.sequence) {
                    Lookup::Matched { .. } if !timed => {
                        c.matched += 1;
                        *missing += 1;
                    }
                    Lookup::Matched { rtt_ns } => {
                        c.matched += 1;
                        e2e.record(rtt_ns);
                    }
                    // Timed when its transmit stamp comes.
                    Lookup::AwaitingStamp => c.matched += 1,
                    Lookup::NotPositive | Lookup::Unstamped => {
                        c.matched += 1;
                        *missing += 1;
                    }
                    Lookup::Duplicate | Lookup::Late | Lookup::Unknown => {}
                }
                if c.seq.update(p.sequence) != SeqEvent::Duplicate {
                    let _ = c.timing.update(now, p.timestamp);
                }
            } else {
                c.wrong_source += 1;
            }
        } else {
            c.corrupt += 1;
        }
    }
    ring.recycle(bid);
}

impl From<&Chan> for ChanTotals {
    fn from(c: &Chan) -> Self {
        Self {
            sent: c.sent,
            matched: c.matched,
            lost: c.seq.lost(),
            duplicates: c.seq.duplicates(),
            reordered: c.seq.reordered(),
            late: c.timing.late(),
            corrupt: c.corrupt,
            wrong_source: c.wrong_source,
        }
    }
}
