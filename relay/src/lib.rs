//! `relay`: the data plane that drives [`relay_proto::Relay`] with real sockets.
//!
//! The *data plane* is one or more shards ([`shard`]), each a thread pinned to its core that
//! owns a core `Relay` and its channels' sockets ([`sockets`]), driven by the io_uring backend
//! ([`uring`]) or the tokio baseline ([`tokio_backend`]), with its own counters ([`counters`]) and
//! arrival clock ([`arrival`]). The *control thread* runs a small tokio runtime serving the
//! Unix control socket ([`ctl`]), the HTTP endpoint ([`http`]: `/metrics` rendered by
//! [`metrics`], `/stats`) and signals; its [`coordinator`] places channels on shards and merges
//! their statistics. Nothing is shared on the packet path: control requests travel on each
//! shard's queue ([`shard::ShardHandle`]), metrics are snapshots each shard publishes
//! ([`snapshot`]) and the scrape merges.
//!
//! The modules point one way (each uses only those before it): `config`, `counters`, `arrival`,
//! `snapshot`, `sockets`, `shard`, the two backends, `coordinator`, `metrics`, `ctl`, `http`,
//! and this file, which starts it all.
//!
//! A shard that fails ends the relay, naming the shard: it never serves half its channels
//! silently. SIGTERM stops every shard and reports the merged final statistics.
//!
//! The crate is the data plane and nothing else: the io_uring plumbing, socket set-up, pinning
//! and CPU time are `relay-io`'s (the workspace's only `unsafe`), logging and the HTTP endpoint
//! are `appkit`'s.
#![forbid(unsafe_code)]

pub mod arrival;
pub mod config;
pub mod coordinator;
pub mod counters;
pub mod ctl;
pub mod http;
pub mod metrics;
pub mod shard;
pub mod snapshot;
pub mod sockets;
pub mod tokio_backend;
pub mod uring;

use std::sync::Arc;

use arc_swap::ArcSwap;
use relay_proto::{GlobalStats, Relay, RelayConfig};
use tokio::sync::mpsc;

use crate::config::{Backend, Config, Timestamps};
use crate::coordinator::{Coordinator, ShardInfo};
use crate::shard::{ClosedTx, Shard, ShardBody, ShardHandle, ShardStart};
use crate::snapshot::{Publisher, Snapshot};
use crate::sockets::BindConfig;

/// Runs one shard on the calling thread: pins it, builds its ring (or runtime), says it is
/// ready, and serves until a shutdown message or a failure.
///
/// # Errors
/// The shard's ring or runtime failed.
pub fn shard_main(start: ShardStart) -> std::io::Result<GlobalStats> {
    let ShardStart {
        index,
        core,
        backend,
        ring: ring_config,
        shard,
        ready,
    } = start;
    if let Some(id) = core {
        if !relay_io::pin_current_thread(id) {
            tracing::warn!(
                shard = index,
                core = id,
                "cannot pin the shard to this core"
            );
        }
    }
    match backend {
        Backend::Uring => uring::start(&ring_config, shard, &ready),
        Backend::Tokio => {
            let _ = ready.send(Ok(None));
            tokio_backend::run(shard)
        }
    }
}

/// Why the relay could not start, or ended other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The control socket.
    #[error(transparent)]
    Ctl(#[from] ctl::CtlError),
    /// The metrics address.
    #[error("cannot listen on --metrics {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The control protocol's TCP address.
    #[error("cannot listen on --ctl-listen tcp://{addr}: {source}")]
    CtlListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A shard's core refused its share of the settings.
    #[error(transparent)]
    Config(#[from] relay_proto::ConfigError),
    /// A shard could not start.
    #[error("{shard}: {reason}")]
    ShardSetup {
        /// Which shard, and its core.
        shard: String,
        /// Why.
        reason: String,
    },
    /// A shard failed, or stopped unasked.
    #[error("{shard} {how}")]
    ShardEnded {
        /// Which shard, and its core.
        shard: String,
        /// How it ended.
        how: String,
    },
    /// Anything else the system refused.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Runs the relay until SIGTERM or SIGINT; returns the final global statistics (every shard's,
/// merged).
///
/// # Errors
/// Set-up failed (control socket, metrics address, io_uring), or a shard failed.
pub fn run(config: &Config) -> Result<GlobalStats, RunError> {
    run_with(config, shard_main)
}

/// The shard each of `n` shards is, and its share of `max` channels (the first `max % n` get one
/// more).
fn share(max: u32, n: usize, i: usize) -> u32 {
    let n = u32::try_from(n).unwrap_or(u32::MAX).max(1);
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    max / n + u32::from(i < max % n)
}

/// A running shard thread.
struct Running {
    /// Its thread.
    thread: std::thread::JoinHandle<std::io::Result<GlobalStats>>,
    /// Its core.
    core: Option<usize>,
}

/// [`run`] with each shard's thread running `body`.
///
/// # Errors
/// As [`run`].
#[allow(clippy::too_many_lines)] // set-up, serve, stop: one sequence, read top to bottom
pub fn run_with(config: &Config, body: ShardBody) -> Result<GlobalStats, RunError> {
    match relay_io::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "file limit raised"),
        Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    let mut ctl = ctl::SocketFile::bind(&config.ctl)?;
    let ctl_tcp = match &config.ctl_listen {
        Some(tcp) => {
            let err = |source| RunError::CtlListen {
                addr: tcp.addr,
                source,
            };
            let l = std::net::TcpListener::bind(tcp.addr).map_err(err)?;
            l.set_nonblocking(true).map_err(err)?;
            let addr = l.local_addr().map_err(err)?;
            Some((l, addr, Arc::clone(&tcp.tls)))
        }
        None => None,
    };
    let metrics_err = |source| RunError::Metrics {
        addr: config.metrics,
        source,
    };
    let metrics_listener = std::net::TcpListener::bind(config.metrics).map_err(metrics_err)?;
    metrics_listener
        .set_nonblocking(true)
        .map_err(metrics_err)?;
    let metrics_addr = metrics_listener.local_addr().map_err(metrics_err)?;

    let backend = config.backend;
    let rx_stamps = match sockets::probe_timestamps(config.bind) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "the kernel gives no receive timestamps here ({e}): arrivals are read in user \
                 space (rtprelay_timestamps_fallback_total)"
            );
            false
        }
    };
    let timestamps = match config.timestamps {
        Timestamps::Kernel => match sockets::probe_tx_timestamps(config.bind) {
            Ok(()) => Timestamps::Kernel,
            Err(e) => {
                tracing::warn!(
                    "the kernel gives no transmit timestamps here ({e}): --timestamps user, \
                     send times are estimated"
                );
                Timestamps::User
            }
        },
        Timestamps::User => Timestamps::User,
    };
    let send_times = match timestamps {
        Timestamps::Kernel => relay_proto::SendTimes::Kernel,
        Timestamps::User => relay_proto::SendTimes::Estimated,
    };
    let bind = BindConfig {
        ip: config.bind,
        rcvbuf: config.socket_rcvbuf,
        timestamps: rx_stamps,
        stamp_command: config.tx_stamps == config::TxStamps::Command,
        shared_echo: config.echo_leg == config::EchoLeg::Shared,
    };
    let n = config.shards.len();
    for (i, c) in config.shards.iter().enumerate() {
        if let Some(c) = c {
            if let Some(j) = config.shards[..i].iter().position(|x| x == &Some(*c)) {
                tracing::warn!(
                    core = c,
                    "core {c} is listed twice: shards {j} and {i} share it"
                );
            }
        }
    }

    let (closed_tx, closed_rx): (ClosedTx, _) = mpsc::unbounded_channel();
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<u32>();
    let mut snapshots = Vec::with_capacity(n);
    let mut infos = Vec::with_capacity(n);
    let mut running: Vec<Running> = Vec::with_capacity(n);
    let mut setup_error = None;
    for (i, &core) in config.shards.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let shared = Arc::new(ArcSwap::from_pointee(Snapshot {
            backend: backend.as_str(),
            timestamps: timestamps.as_str(),
            echo_leg: config.echo_leg.as_str(),
            shard: index,
            ..Snapshot::default()
        }));
        snapshots.push(Arc::clone(&shared));
        let relay = Relay::new(RelayConfig {
            max_channels: share(config.relay.max_channels, n, i),
            shard: index,
            send_times,
            ..config.relay.clone()
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let start = ShardStart {
            index,
            core,
            backend,
            ring: config.ring,
            shard: Shard {
                relay,
                rx,
                publisher: Publisher::new(
                    shared,
                    backend.as_str(),
                    timestamps.as_str(),
                    config.publish_interval,
                    index,
                ),
                bind,
                closed: closed_tx.clone(),
            },
            ready: ready_tx,
        };
        let exit = exit_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("rtp-shard-{i}"))
            .spawn(move || {
                // Says this shard ended, whatever the reason (a panic included).
                struct Exit(mpsc::UnboundedSender<u32>, u32);
                impl Drop for Exit {
                    fn drop(&mut self) {
                        let _ = self.0.send(self.1);
                    }
                }
                let _exit = Exit(exit, index);
                body(start)
            })
            .map_err(|source| RunError::Io {
                what: "cannot start a shard thread",
                source,
            })?;
        running.push(Running { thread, core });
        match ready_rx.recv() {
            Ok(Ok(waker)) => infos.push(ShardInfo {
                handle: ShardHandle::new(tx, waker),
                core,
            }),
            Ok(Err(e)) => {
                setup_error = Some(RunError::ShardSetup {
                    shard: format!("shard {i} (core {})", core_name(core)),
                    reason: e,
                });
                break;
            }
            Err(_) => {
                setup_error = Some(RunError::ShardSetup {
                    shard: format!("shard {i} (core {})", core_name(core)),
                    reason: "exited during set-up".to_owned(),
                });
                break;
            }
        }
    }
    drop(closed_tx);
    drop(exit_tx);
    let router = Arc::new(
        Coordinator::new(
            infos,
            config.relay.max_channels,
            closed_rx,
            backend.as_str(),
        )
        .with_identity(config.identity.clone()),
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| RunError::Io {
            what: "cannot start the control thread's runtime",
            source,
        })?;
    if let Some(e) = setup_error {
        rt.block_on(router.shutdown());
        join_all(running);
        return Err(e);
    }
    tracing::info!(
        backend = backend.as_str(),
        timestamps = timestamps.as_str(),
        echo_leg = config.echo_leg.as_str(),
        ctl = %ctl.path().display(),
        ctl_tcp = %ctl_tcp.as_ref().map_or_else(|| "none".to_owned(), |(_, a, _)| format!("tcp://{a}")),
        relay_id = %config.identity.relay_id,
        advertise = %config.identity.advertise,
        metrics = %format!("http://{metrics_addr}/metrics"),
        shards = n,
        cores = %cores_name(&config.shards),
        "relay ready"
    );

    let outcome = rt.block_on(async {
        let io = |what| move |source| RunError::Io { what, source };
        let listener = ctl.take_listener().ok_or(RunError::Io {
            what: "the control listener",
            source: std::io::Error::other("already taken"),
        })?;
        let ctl_task = tokio::spawn(ctl::serve(
            tokio::net::UnixListener::from_std(listener).map_err(io("the control listener"))?,
            Arc::clone(&router),
        ));
        let tcp_task = match ctl_tcp {
            Some((listener, _, tls)) => Some(tokio::spawn(ctl::serve_tls(
                tokio::net::TcpListener::from_std(listener)
                    .map_err(io("the control TCP listener"))?,
                tls,
                Arc::clone(&router),
            ))),
            None => None,
        };
        let metrics_task = tokio::spawn(http::serve(
            tokio::net::TcpListener::from_std(metrics_listener).map_err(metrics_err)?,
            snapshots.into(),
            Arc::clone(&router),
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io("cannot handle SIGTERM"))?;
        let died = tokio::select! {
            _ = term.recv() => None,
            _ = tokio::signal::ctrl_c() => None,
            i = exit_rx.recv() => Some(i.unwrap_or(0)),
        };
        ctl_task.abort();
        if let Some(t) = tcp_task {
            t.abort();
        }
        metrics_task.abort();
        if died.is_none() {
            tracing::info!("stopping");
        }
        // Every shard still running stops (after a failure too: the relay ends whole).
        let stats = router.shutdown().await;
        Ok::<_, RunError>((died, stats))
    });
    let results = join_all(running);
    drop(ctl); // removes the socket file
    let (died, stats) = outcome?;
    let died = died.map(|i| i as usize);
    // A shard that failed, or stopped unasked, is the relay's failure; the first one reported.
    for i in died.into_iter().chain(0..results.len()) {
        let Some(ended) = results.get(i) else {
            continue;
        };
        let shard = format!("shard {i} (core {})", core_name(ended.core));
        match &ended.outcome {
            Ended::Panicked => {
                return Err(RunError::ShardEnded {
                    shard,
                    how: "failed: it panicked".to_owned(),
                })
            }
            Ended::Failed(e) => {
                return Err(RunError::ShardEnded {
                    shard,
                    how: format!("failed: {e}"),
                })
            }
            Ended::Stopped if died == Some(i) => {
                return Err(RunError::ShardEnded {
                    shard,
                    how: "stopped without being asked to".to_owned(),
                })
            }
            Ended::Stopped => {}
        }
    }
    Ok(stats)
}

/// How a shard thread ended.
#[derive(Debug)]
enum Ended {
    /// Its loop returned.
    Stopped,
    /// Its ring or runtime failed.
    Failed(std::io::Error),
    /// It panicked.
    Panicked,
}

/// A shard thread, joined.
#[derive(Debug)]
struct Joined {
    /// Its core.
    core: Option<usize>,
    /// How it ended.
    outcome: Ended,
}

/// Joins every shard thread.
fn join_all(running: Vec<Running>) -> Vec<Joined> {
    running
        .into_iter()
        .map(|r| Joined {
            core: r.core,
            outcome: match r.thread.join() {
                Ok(Ok(_)) => Ended::Stopped,
                Ok(Err(e)) => Ended::Failed(e),
                Err(_) => Ended::Panicked,
            },
        })
        .collect()
}

fn core_name(core: Option<usize>) -> String {
    core.map_or_else(|| "unpinned".to_owned(), |c| c.to_string())
}

fn cores_name(shards: &[Option<usize>]) -> String {
    shards
        .iter()
        .map(|&c| core_name(c))
        .collect::<Vec<_>>()
        .join(",")
}
