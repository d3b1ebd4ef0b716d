//! `relay`: the data plane that drives [`relay_proto::Relay`] with real sockets.
//!
//! Two threads. The *data plane* runs on one pinned core and owns the core and every channel
//! socket; it is either the io_uring backend ([`uring`]) or the tokio baseline
//! ([`tokio_backend`]). The *control thread* runs a small tokio runtime serving the Unix control
//! socket ([`ctl`]), the metrics endpoint ([`metrics`]) and signals. They share no lock: control
//! requests travel on a queue ([`dataplane::Handle`]), metrics are snapshots the data plane
//! publishes.
//!
//! `unsafe` code lives only in [`ring`].
#![deny(unsafe_code)]

pub mod config;
pub mod ctl;
pub mod dataplane;
pub mod http;
pub mod metrics;
#[allow(unsafe_code)] // the one module that talks to io_uring and libc directly
pub mod ring;
pub mod tokio_backend;
pub mod uring;

use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use arc_swap::ArcSwap;
use relay_proto::{GlobalStats, Relay};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Backend, Config};
use crate::dataplane::{BindConfig, CtlMsg, Handle};
use crate::metrics::{Publisher, Snapshot};

/// Logs to standard error, colored only on a terminal, at the level `RUST_LOG` sets (`info`
/// by default). Shared by every binary of the workspace.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// CPU time (user + system) consumed so far by what `stat` describes: `/proc/PID/stat` for a
/// process, `/proc/thread-self/stat` for the calling thread. In nanoseconds; `/proc` counts in
/// USER_HZ, which is 100 on Linux, so the resolution is 10 ms. `None` if it cannot be read.
#[must_use]
pub fn cpu_time_ns(stat: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name, which is in parentheses and may itself contain spaces.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 10_000_000)
}

/// Pins the calling thread to CPU core `id`; false when the core does not exist or the
/// system refuses.
#[must_use]
pub fn pin_current_thread(id: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id })
}

/// Runs the relay until SIGTERM or SIGINT; returns the final global statistics.
///
/// # Errors
/// Set-up failed (control socket, metrics address, io_uring), or the data plane failed.
pub fn run(config: &Config) -> anyhow::Result<GlobalStats> {
    match ring::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "file limit raised"),
        Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    let mut ctl = ctl::SocketFile::bind(&config.ctl)?;
    let metrics_listener = std::net::TcpListener::bind(config.metrics)
        .with_context(|| format!("cannot listen on --metrics {}", config.metrics))?;
    metrics_listener.set_nonblocking(true)?;
    let metrics_addr = metrics_listener.local_addr()?;

    let backend = config.backend;
    let shared = Arc::new(ArcSwap::from_pointee(Snapshot {
        backend: backend.as_str(),
        ..Snapshot::default()
    }));
    let publisher = Publisher::new(
        Arc::clone(&shared),
        backend.as_str(),
        config.publish_interval,
    );
    let relay = Relay::new(config.relay.clone())?;
    let bind = BindConfig {
        ip: config.bind,
        rcvbuf: config.socket_rcvbuf,
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
                if !pin_current_thread(id) {
                    tracing::warn!(core = id, "cannot pin the data plane to this core");
                }
            }
            match backend {
                Backend::Uring => {
                    match ring::Ring::new(ring_config.sq_entries, ring_config.buffers, max_channels)
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

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_reads_proc_and_grows_with_work() {
        let me = std::path::Path::new("/proc/thread-self/stat");
        let before = super::cpu_time_ns(me).expect("readable on Linux");
        // Spin until the reading grows (it has 10 ms resolution), failing after 5 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut x = 0u64;
        let after = loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            let now = super::cpu_time_ns(me).expect("still readable");
            if now > before {
                break now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "CPU time never grew from {before}"
            );
        };
        assert_eq!((after - before) % 10_000_000, 0, "whole USER_HZ ticks");
        assert_eq!(
            super::cpu_time_ns(std::path::Path::new("/proc/none/stat")),
            None
        );
    }
}
