//! `relay`: the data plane that drives [`relay_proto::Relay`] with real sockets.
//!
//! Two threads. The *data plane* runs on one pinned core and owns the core and every channel
//! socket; it is either the io_uring backend ([`uring`]) or the tokio baseline
//! ([`tokio_backend`]). The *control thread* runs a small tokio runtime serving the Unix control
//! socket ([`ctl`]), the metrics endpoint ([`metrics`]) and signals. They share no lock: control
//! requests travel on a queue ([`dataplane::Handle`]), metrics are snapshots the data plane
//! publishes.
//!
//! The crate is the data plane and nothing else: the io_uring plumbing, socket set-up, pinning
//! and CPU time are `relay-io`'s (the workspace's only `unsafe`), logging and the HTTP endpoint
//! are `appkit`'s.
#![forbid(unsafe_code)]

pub mod config;
pub mod ctl;
pub mod dataplane;
pub mod metrics;
pub mod tokio_backend;
pub mod uring;

use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use arc_swap::ArcSwap;
use relay_proto::{GlobalStats, Relay};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Backend, Config, Timestamps};
use crate::dataplane::{BindConfig, CtlMsg, Handle};
use crate::metrics::{Publisher, Snapshot};

/// Runs the relay until SIGTERM or SIGINT; returns the final global statistics.
///
/// # Errors
/// Set-up failed (control socket, metrics address, io_uring), or the data plane failed.
pub fn run(config: &Config) -> anyhow::Result<GlobalStats> {
    match relay_io::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "file limit raised"),
        Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    let mut ctl = ctl::SocketFile::bind(&config.ctl)?;
    let metrics_listener = std::net::TcpListener::bind(config.metrics)
        .with_context(|| format!("cannot listen on --metrics {}", config.metrics))?;
    metrics_listener.set_nonblocking(true)?;
    let metrics_addr = metrics_listener.local_addr()?;

    let backend = config.backend;
    let timestamps = match config.timestamps {
        Timestamps::Kernel => match dataplane::probe_timestamps(config.bind) {
            Ok(()) => Timestamps::Kernel,
            Err(e) => {
                tracing::warn!(
                    "the kernel gives no receive timestamps here ({e}): --timestamps user, \
                     arrivals and T0 are read in user space"
                );
                Timestamps::User
            }
        },
        Timestamps::User => Timestamps::User,
    };
    let shared = Arc::new(ArcSwap::from_pointee(Snapshot {
        backend: backend.as_str(),
        timestamps: timestamps.as_str(),
        ..Snapshot::default()
    }));
    let publisher = Publisher::new(
        Arc::clone(&shared),
        backend.as_str(),
        timestamps.as_str(),
        config.publish_interval,
    );
    let relay = Relay::new(config.relay.clone())?;
    let bind = BindConfig {
        ip: config.bind,
        rcvbuf: config.socket_rcvbuf,
        timestamps: timestamps == Timestamps::Kernel,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = oneshot::channel::<()>();
    let core = config.core;
    let ring_config = config.ring;
    let max_channels = config.relay.max_channels;

    let data_plane = std::thread::Builder::new()
        .name("rtp-data-plane".into())
        .spawn(move || {
            let _exit = exit_tx; // dropped when this thread ends, whatever the reason
            if let Some(id) = core {
                if !relay_io::pin_current_thread(id) {
                    tracing::warn!(core = id, "cannot pin the data plane to this core");
                }
            }
            match backend {
                Backend::Uring => {
                    match relay_io::ring::Ring::new(ring_config.sq_entries, ring_config.buffers, max_channels)
                    {
                        Ok(mut ring) => {
                            ring.set_batching(ring_config.batch, ring_config.batch_wait);
                            if ring_config.batch > 1 && !ring.batching_supported() {
                                tracing::warn!("--batch needs Linux 6.12 (io_uring min_wait); waking on every completion");
                            }
                            let _ = ready_tx.send(Ok(Some(ring.waker())));
                            uring::run(ring, relay, rx, publisher, bind)
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            Ok(GlobalStats::default())
                        }
                    }
                }
                Backend::Tokio => {
                    let _ = ready_tx.send(Ok(None));
                    tokio_backend::run(relay, rx, publisher, bind)
                }
            }
        })
        .context("cannot start the data-plane thread")?;

    let waker = match ready_rx.recv() {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            let _ = data_plane.join();
            return Err(anyhow!(e));
        }
        Err(_) => return Err(anyhow!("the data plane exited during set-up")),
    };
    let handle = Handle::new(tx, waker);
    tracing::info!(
        backend = backend.as_str(),
        timestamps = timestamps.as_str(),
        ctl = %ctl.path().display(),
        metrics = %format!("http://{metrics_addr}/metrics"),
        core = ?core,
        "relay ready"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stopped = rt.block_on(async {
        let listener = ctl
            .take_listener()
            .ok_or_else(|| anyhow!("control listener already taken"))?;
        let ctl_task = tokio::spawn(ctl::serve(
            tokio::net::UnixListener::from_std(listener)?,
            handle.clone(),
        ));
        let metrics_task = tokio::spawn(metrics::serve(
            tokio::net::TcpListener::from_std(metrics_listener)?,
            Arc::clone(&shared),
            handle.clone(),
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let died = tokio::select! {
            _ = term.recv() => false,
            _ = tokio::signal::ctrl_c() => false,
            _ = exit_rx => true,
        };
        ctl_task.abort();
        metrics_task.abort();
        if died {
            return Ok::<_, anyhow::Error>(None);
        }
        tracing::info!("stopping");
        let (reply, rx) = oneshot::channel();
        handle.send(CtlMsg::Shutdown { reply })?;
        Ok(rx.await.ok())
    })?;
    let result = data_plane
        .join()
        .map_err(|_| anyhow!("the data plane panicked"))?;
    drop(ctl); // removes the socket file
    match (stopped, result) {
        (_, Err(e)) => Err(anyhow::Error::new(e).context("the data plane failed")),
        (Some(stats), Ok(_)) => Ok(stats),
        (None, Ok(_)) => Err(anyhow!("the data plane stopped without being asked to")),
    }
}
