//! The tokio baseline: the same core driven the way a careful tokio user would drive it.
//!
//! A current-thread runtime on the same pinned core, one task per channel socket. Each task
//! waits for readiness, then drains the socket with `try_recv_from` into a buffer it reuses, asks
//! the core, and answers with `try_send_to` (falling back to an awaited send only when the socket
//! is full). No allocation per packet, no lock: the core lives in an `Rc<RefCell<_>>` shared by
//! the tasks of this one thread, never borrowed across an `.await`.
//!
//! It exists so that `bench` compares only the I/O layer: same core, same sockets, same
//! measurement; the differences are readiness + one syscall per datagram each way here, against
//! batched completions there.

use std::cell::RefCell;
use std::net::UdpSocket as StdUdpSocket;
use std::rc::Rc;
use std::time::Duration;

use relay_proto::{ErrorCode, ErrorReply, GlobalStats, Relay, SocketId, Verdict};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::{AbortHandle, LocalSet};

use crate::dataplane::{self, BackendCounters, BindConfig, Clock, CtlMsg, SocketTable};
use crate::metrics::Publisher;
use relay_io::ring::MAX_PAYLOAD;

/// The state the tasks share.
struct Shared {
    /// The core.
    relay: Relay,
    /// Backend counters.
    counters: BackendCounters,
}

type SharedRef = Rc<RefCell<Shared>>;

/// The channel tasks, by slot.
struct Tasks {
    /// Shared state, cloned into each task.
    shared: SharedRef,
    /// Abort handles by slot.
    tasks: Vec<Option<AbortHandle>>,
    /// The clock.
    clock: Clock,
}

impl SocketTable for Tasks {
    fn open(&mut self, id: SocketId, socket: StdUdpSocket) -> Result<(), ErrorReply> {
        let socket = UdpSocket::from_std(socket)
            .map_err(|e| ErrorReply::new(ErrorCode::Io, format!("register with tokio: {e}")))?;
        let entry = self
            .tasks
            .get_mut(id.0 as usize)
            .ok_or_else(|| ErrorReply::new(ErrorCode::Internal, "socket slot out of range"))?;
        let task =
            tokio::task::spawn_local(channel(socket, id, Rc::clone(&self.shared), self.clock));
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
pub fn run(
    relay: Relay,
    rx: UnboundedReceiver<CtlMsg>,
    publisher: Publisher,
    bind: BindConfig,
) -> std::io::Result<GlobalStats> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = LocalSet::new();
    Ok(local.block_on(&rt, main_loop(relay, rx, publisher, bind)))
}

async fn main_loop(
    relay: Relay,
    mut rx: UnboundedReceiver<CtlMsg>,
    mut publisher: Publisher,
    bind: BindConfig,
) -> GlobalStats {
    let clock = Clock::new();
    let start = tokio::time::Instant::now();
    let n = relay.config().max_channels as usize;
    let shared = Rc::new(RefCell::new(Shared {
        relay,
        counters: BackendCounters::default(),
    }));
    let mut tasks = Tasks {
        shared: Rc::clone(&shared),
        tasks: (0..n).map(|_| None).collect(),
        clock,
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
                        let _ = reply.send(dataplane::stats_doc(&sh.relay, &sh.counters, "tokio", now));
                    }
                    Some(CtlMsg::Shutdown { reply }) => {
                        let sh = shared.borrow();
                        publisher.publish(now, &sh.relay, &sh.counters);
                        let stats = sh.relay.global_stats();
                        let _ = reply.send(stats.clone());
                        return stats;
                    }
                    None => return shared.borrow().relay.global_stats(),
                }
            }
            () = tokio::time::sleep_until(at) => {
                let now = clock.now();
                let mut sh = shared.borrow_mut();
                if sh.relay.poll_timeout().is_some_and(|t| t <= now) {
                    sh.relay.handle_timeout(now);
                    dataplane::close_expired(&mut sh.relay, &mut tasks);
                }
                let Shared { relay, counters } = &*sh;
                publisher.maybe_publish(now, relay, counters);
            }
        }
    }
}

/// One channel's socket: drain on readiness, forward from the same socket.
async fn channel(socket: UdpSocket, id: SocketId, shared: SharedRef, clock: Clock) {
    // One byte more than the largest payload, to tell an oversize datagram from a full one.
    let mut buf = vec![0u8; MAX_PAYLOAD + 1];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let mut drained = 0usize;
        loop {
            let (n, from) = match socket.try_recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    shared.borrow_mut().counters.recv_errors += 1;
                    break;
                }
            };
            drained += 1;
            if n > MAX_PAYLOAD {
                shared.borrow_mut().counters.oversize += 1;
                continue;
            }
            let now = clock.now();
            let Some(payload) = buf.get(..n) else {
                continue;
            };
            let verdict = shared
                .borrow_mut()
                .relay
                .handle_datagram(now, id, from, payload);
            if let Verdict::Forward { to, direction } = verdict {
                let sent = match socket.try_send_to(payload, to) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        socket.send_to(payload, to).await
                    }
                    r => r,
                };
                let mut sh = shared.borrow_mut();
                match sent {
                    Ok(_) => sh
                        .relay
                        .record_forward(direction, clock.now().nanos_since(now)),
                    Err(_) => sh.counters.send_errors += 1,
                }
            }
        }
        shared.borrow_mut().counters.batch(drained);
    }
}
