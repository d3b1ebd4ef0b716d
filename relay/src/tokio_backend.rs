//! The tokio baseline: the same core driven the way a careful tokio user would drive it.
//!
//! A current-thread runtime per shard, on the shard's pinned core, one task per channel socket.
//! Each task waits for readiness, then drains the socket with `try_recv_from` into a buffer it reuses, asks
//! the core, and answers with `try_send_to` (falling back to an awaited send only when the socket
//! is full). No allocation per packet, no lock: the core lives in an `Rc<RefCell<_>>` shared by
//! the tasks of this one thread, never borrowed across an `.await`.
//!
//! It exists so that `bench` compares only the I/O layer: same core, same sockets, same
//! measurement; the differences are readiness + one syscall per datagram each way here, against
//! batched completions there.
//!
//! Time (`--timestamps kernel`): datagrams are read with `recvmsg` and their control messages;
//! the realtime − monotonic offset is re-sampled right after each read (so every stamp precedes
//! its sample), the arrival is the kernel's stamp, and T0 is the middle of the `sendmsg` that
//! forwards it (the clock read just before and just after it). With `--timestamps user`, arrival and T0 are the read of the
//! clock after the datagram was read.

use std::cell::RefCell;
use std::net::UdpSocket as StdUdpSocket;
use std::rc::Rc;
use std::time::Duration;

use relay_proto::{ErrorCode, ErrorReply, GlobalStats, Relay, SocketId, Verdict};
use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, LocalSet};

use crate::dataplane::{self, BackendCounters, Clock, CtlMsg, Shard, SocketTable};
use relay_io::ring::MAX_PAYLOAD;

/// The state the tasks share.
struct Shared {
    /// The core.
    relay: Relay,
    /// Backend counters.
    counters: BackendCounters,
    /// The clock and the conversion of kernel stamps (one for all tasks of this thread).
    clock: Clock,
    /// Kernel timestamps asked for.
    kernel_time: bool,
    /// Refused sends, logged at most once a second.
    send_log: dataplane::SendErrorLog,
}

type SharedRef = Rc<RefCell<Shared>>;

/// The channel tasks, by slot.
struct Tasks {
    /// Shared state, cloned into each task.
    shared: SharedRef,
    /// Abort handles by slot.
    tasks: Vec<Option<AbortHandle>>,
}

impl SocketTable for Tasks {
    fn open(&mut self, id: SocketId, socket: StdUdpSocket) -> Result<(), ErrorReply> {
        let socket = UdpSocket::from_std(socket)
            .map_err(|e| ErrorReply::new(ErrorCode::Io, format!("register with tokio: {e}")))?;
        let entry = self
            .tasks
            .get_mut(id.0 as usize)
            .ok_or_else(|| ErrorReply::new(ErrorCode::Internal, "socket slot out of range"))?;
        let task = tokio::task::spawn_local(channel(socket, id, Rc::clone(&self.shared)));
        *entry = Some(task.abort_handle());
        Ok(())
    }

    fn close(&mut self, id: SocketId) {
        if let Some(t) = self.tasks.get_mut(id.0 as usize).and_then(Option::take) {
            t.abort();
        }
    }
}

/// Runs the tokio data plane on the calling thread until a shutdown message.
///
/// # Errors
/// The runtime could not be built.
pub fn run(shard: Shard) -> std::io::Result<GlobalStats> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = LocalSet::new();
    Ok(local.block_on(&rt, main_loop(shard)))
}

async fn main_loop(shard: Shard) -> GlobalStats {
    let Shard {
        relay,
        mut rx,
        mut publisher,
        bind,
        closed,
    } = shard;
    let clock = Clock::new();
    let start = tokio::time::Instant::now();
    let n = relay.config().max_channels as usize;
    let shared = Rc::new(RefCell::new(Shared {
        relay,
        counters: BackendCounters::default(),
        clock,
        kernel_time: bind.timestamps,
        send_log: dataplane::SendErrorLog::default(),
    }));
    let mut tasks = Tasks {
        shared: Rc::clone(&shared),
        tasks: (0..n).map(|_| None).collect(),
    };
    loop {
        let next = {
            let sh = shared.borrow();
            sh.relay
                .poll_timeout()
                .map_or(publisher.deadline(), |t| t.min(publisher.deadline()))
        };
        let at = start + Duration::from_nanos(next.as_nanos());
        tokio::select! {
            msg = rx.recv() => {
                let now = clock.now();
                match msg {
                    Some(CtlMsg::Command { command, reply }) => {
                        let mut sh = shared.borrow_mut();
                        let r = dataplane::execute(&mut sh.relay, &mut tasks, bind, now, command);
                        let _ = reply.send(r);
                    }
                    Some(CtlMsg::Snapshot { reply }) => {
                        let sh = shared.borrow();
                        let _ = reply.send(dataplane::shard_doc(&sh.relay, &sh.counters, now));
                    }
                    Some(CtlMsg::Shutdown { reply }) => {
                        let sh = shared.borrow();
                        publisher.publish(now, &sh.relay, &sh.counters);
                        let _ = reply.send(dataplane::shard_stats(&sh.relay));
                        return sh.relay.global_stats();
                    }
                    None => return shared.borrow().relay.global_stats(),
                }
            }
            () = tokio::time::sleep_until(at) => {
                let now = clock.now();
                let mut sh = shared.borrow_mut();
                if sh.relay.poll_timeout().is_some_and(|t| t <= now) {
                    sh.relay.handle_timeout(now);
                    dataplane::close_expired(&mut sh.relay, &mut tasks, &closed);
                }
                let Shared { relay, counters, .. } = &*sh;
                publisher.maybe_publish(now, relay, counters);
            }
        }
    }
}

/// One channel's socket: drain on readiness, forward from the same socket.
async fn channel(socket: UdpSocket, id: SocketId, shared: SharedRef) {
    // One byte more than the largest payload, to tell an oversize datagram from a full one.
    let mut buf = vec![0u8; MAX_PAYLOAD + 1];
    let mut control = [0u8; relay_io::socket::CONTROL_LEN];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let mut drained = 0usize;
        loop {
            let got = socket.try_io(tokio::io::Interest::READABLE, || {
                relay_io::recv_msg(&socket, &mut buf, &mut control)
            });
            let meta = match got {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    shared.borrow_mut().counters.recv_errors += 1;
                    break;
                }
            };
            drained += 1;
            if meta.truncated || meta.len > MAX_PAYLOAD {
                shared.borrow_mut().counters.oversize += 1;
                continue;
            }
            let (Some(payload), Some(from)) = (buf.get(..meta.len), meta.from) else {
                shared.borrow_mut().counters.recv_errors += 1;
                continue;
            };
            // (user time: when handling started, the start of the forward time)
            let (verdict, started) = {
                let mut sh = shared.borrow_mut();
                let Shared {
                    relay,
                    counters,
                    clock,
                    kernel_time,
                    ..
                } = &mut *sh;
                if *kernel_time {
                    let handled = clock.resample(counters);
                    let ctl = control.get(..meta.control_len).unwrap_or_default();
                    let arrival = clock.arrival(ctl, handled, counters);
                    (
                        relay.handle_received(arrival, handled, id, from, payload),
                        handled,
                    )
                } else {
                    let now = clock.now();
                    (relay.handle_datagram(now, id, from, payload), now)
                }
            };
            if let Verdict::Forward { to, direction } = verdict {
                // Kernel time: the send's packet meets the wire inside its `sendmsg`; T0 and the
                // end of the forward time are the middle of that call (the clock read around it).
                let kernel_time = shared.borrow().kernel_time;
                let before = kernel_time.then(|| shared.borrow().clock.now());
                let sent = match socket.try_send_to(payload, to) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if let Some(before) = before {
                            // Other tasks run while this one waits: settle it first.
                            shared.borrow_mut().relay.submitted(before);
                        }
                        socket.send_to(payload, to).await
                    }
                    r => {
                        if let Some(before) = before {
                            let mut sh = shared.borrow_mut();
                            let after = sh.clock.now();
                            sh.relay.submitted_between(before, after);
                        }
                        r
                    }
                };
                let mut sh = shared.borrow_mut();
                match sent {
                    Ok(_) if !kernel_time => {
                        let elapsed = sh.clock.now().nanos_since(started);
                        sh.relay.record_forward(direction, elapsed);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let now = sh.clock.now();
                        let Shared {
                            counters, send_log, ..
                        } = &mut *sh;
                        send_log.note(
                            counters,
                            now,
                            e.raw_os_error().unwrap_or(0),
                            id.0,
                            direction,
                        );
                    }
                }
            }
        }
        shared.borrow_mut().counters.batch(drained);
    }
}
