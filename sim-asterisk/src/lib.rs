//! `sim-asterisk`: an ARI server that behaves like Asterisk 22 for everything control and
//! `loadgen ari` use, so the whole pipeline (control, relay, echo) runs and is tested on a
//! machine without Asterisk.
//!
//! What it reproduces, because control depends on it:
//! - the REST URLs, JSON shapes, authentication (HTTP basic or `api_key=user:pass`) and error codes
//!   (401, 404 "Channel not found", 422 "Channel not in Stasis application", 409, 400);
//! - the events WebSocket `/ari/events?app=…`, one JSON event per message;
//! - an externalMedia channel's own StasisStart about 1 ms after the request, racing the HTTP reply
//!   (the reply is held back 0–3 ms, so either can come first);
//! - channel variables `UNICASTRTP_LOCAL_ADDRESS` / `UNICASTRTP_LOCAL_PORT` (the port a string);
//! - RTP only once the externalMedia channel shares a bridge with another channel, sent from
//!   exactly `UNICASTRTP_LOCAL_ADDRESS:PORT` to `external_host`: 172-byte packets, payload type 0,
//!   50 per second, random SSRC and first sequence number, first timestamp 160;
//! - strict RTP: packets coming back from anywhere but `external_host` are dropped and counted.
//!
//! Two kinds of caller:
//! - its own, invented by the simulator: the `--calls` it originates, and any originate of an
//!   endpoint other than a `stasis` Local one (`Local/s@load` from `loadgen ari --callers tone`).
//!   Each is placed directly in `app`; once bridged, its externalMedia channel plays a fixed
//!   pseudo-random 160-byte payload to the relay from the one [`media`] timing source and
//!   measures what comes back (round trip, loss, and whether the payload came back byte for
//!   byte: `payload_changed`);
//! - a Local channel pair, `Local/<exten>@stasis[/n]` ([`STASIS_CONTEXT`]), as `loadgen ari
//!   --callers rtp` originates into its own application: the `;2` half enters application
//!   `<exten>` (control's) through the dialplan `exten => <exten>,1,Stasis(${EXTEN})`, the `;1`
//!   half enters the originating application once `;2` is answered, and hanging up either hangs
//!   up both ([`world`]). Here the simulator plays nothing: the externalMedia channels bridged
//!   with the halves forward what they receive, byte for byte, through the bridges and across the
//!   pair to the other side's externalMedia channel, each under its own RTP header, with
//!   `--bridge-delay`, `--bridge-jitter` and `--bridge-loss` per bridge traversal, and count per
//!   side of the relay what they forwarded, dropped and could not route ([`bridge`]).
//!
//! It originates `--calls` caller channels over `--ramp`, holds each for `--hold`, then stops its
//! RTP, lets the last packets return (100 ms at most) and hangs up (StasisEnd, ChannelDestroyed).
//! It measures each call's round trip (sent → back from the relay), loss and strict-RTP drops, and
//! once every call has ended and control has cleaned up (or `--grace` has passed) prints a report.
//! With `--calls 0` it only serves (for `loadgen ari`), for `--serve-for` or until interrupted,
//! then reports. Fault options: `--answer-404` fails that fraction of its own callers' first
//! answer attempts with 404, and `--drop-ws-at` closes every events WebSocket once at that time.
//!
//! Not a hot path: ARI on a multi-thread tokio runtime, one mutex over the call state (never held
//! across an await, never taken per packet). The RTP runs on OS threads as Asterisk's does (see
//! [`media`] and [`bridge`]): one timing thread sends every caller's frames in a burst each 20 ms,
//! each externalMedia channel has a thread of its own reading what comes back (or forwarding it),
//! and one delay-line thread sends delayed forwarded frames when they are due.
//!
//! By concern: [`world`] (the state and the operations on it), [`rest`] (the REST handlers),
//! [`events`] (the events WebSocket), [`media`] (the callers' RTP and what is measured of it),
//! [`bridge`] (media forwarded through bridges), [`report`]; this module holds the settings and
//! the run, `main.rs` the command line.
//!
//! Two modules serve the other tools as well, which is why they are public and live here rather
//! than in loadgen (loadgen depends on this crate, never the reverse): [`relay_client`], the
//! blocking client of the relay's control socket, and [`relay_side`], what the relay measured as
//! a report carries it.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use crate::relay_client::RelayClient;
use crate::relay_side::{Added, RelaySide};
use world::{Kind, Sim, World};

mod bridge;
mod events;
mod media;
pub mod relay_client;
pub mod relay_side;
mod report;
mod rest;
mod world;

pub use bridge::{BridgeReport, SideReport};
pub use media::PACKET_LEN;
pub use report::{render, CallEnd, CallReport, SimReport};

/// The dialplan context whose extensions run `Stasis(${EXTEN})`: a `Local/<exten>@stasis`
/// originate makes a Local pair whose `;2` half enters application `<exten>`.
pub const STASIS_CONTEXT: &str = "stasis";

/// The simulator's settings (`main.rs` makes them from its flags).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// HTTP and WebSocket listen address (port 0: any).
    pub listen: SocketAddr,
    /// ARI user.
    pub user: String,
    /// ARI password.
    pub pass: String,
    /// The Stasis application calls are sent to.
    pub app: String,
    /// Caller channels to originate (0: only serve, for `loadgen ari` or a manual run).
    pub calls: u32,
    /// Spread the originations over this long.
    pub ramp: Duration,
    /// Each call lasts this long.
    pub hold: Duration,
    /// Address the externalMedia channels send RTP from (`UNICASTRTP_LOCAL_ADDRESS`).
    pub rtp_ip: IpAddr,
    /// Fraction of first answer attempts that fail with 404.
    pub answer_404: f64,
    /// Close every events WebSocket once, this long after the first call was originated.
    pub drop_ws_at: Option<Duration>,
    /// After the last call ends, wait this long at most for control to clean up.
    pub grace: Duration,
    /// How long to wait for the application to connect before originating.
    pub wait_app: Duration,
    /// With `calls` = 0: serve this long (`None`: until interrupted).
    pub serve_for: Option<Duration>,
    /// Random seed (SSRCs, sequence numbers, faults).
    pub seed: u64,
    /// How long after the externalMedia request its channel enters Stasis (Asterisk: ~1 ms).
    pub stasis_delay: Duration,
    /// Every REST request takes at least this long (a busy Asterisk); shows whether the
    /// application sets calls up concurrently.
    pub latency: Duration,
    /// The relay's control socket: its statistics join the report.
    pub relay_ctl: Option<std::path::PathBuf>,
    /// The relay's process id: its CPU time per forwarded packet joins the report.
    pub relay_pid: Option<u32>,
    /// Operations (`external_media`, `create_bridge`, `add_channel`) failed with 500 with the
    /// given probability, to exercise the application's unwinding.
    pub fail: Vec<(String, f64)>,
    /// Every bridge traversal of forwarded media takes this long.
    pub bridge_delay: Duration,
    /// ... plus a uniform draw in `[0, bridge_jitter)`.
    pub bridge_jitter: Duration,
    /// Probability (0..=1) that a bridge traversal drops the frame.
    pub bridge_loss: f64,
}

/// Timer slack of the simulator's threads, nanoseconds (Linux's default is 50 µs).
const TIMER_SLACK_NS: u32 = 1_000;

/// Lowers the calling thread's timer slack to [`TIMER_SLACK_NS`] (through
/// `/proc/self/timerslack_ns`, which sets the process's first thread: call it from `main` before
/// any thread is started; threads inherit it). Without it every timed sleep may end up to 50 µs
/// late, which the bridge delay line (`--bridge-delay`) would add to every frame it holds. A
/// refusal is logged and changes nothing else.
pub fn precise_timers() {
    if let Err(e) = std::fs::write("/proc/self/timerslack_ns", TIMER_SLACK_NS.to_string()) {
        tracing::debug!("timer slack left at the default: {e}");
    }
}

/// Operations `--fail` can break.
pub const FAILABLE: [&str; 3] = ["external_media", "create_bridge", "add_channel"];

/// Why the simulator could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// `--listen`.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A thread of the RTP (the timing source, the bridges' delay line) could not start.
    #[error("cannot start the {what}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The application did not connect to `/ari/events` within `--wait-app`.
    #[error("application {app:?} did not connect to /ari/events within {wait:?}")]
    AppNotConnected {
        /// `--app`.
        app: String,
        /// `--wait-app`.
        wait: Duration,
    },
    /// The task reading the relay's statistics panicked or was cancelled.
    #[error("the relay statistics task failed")]
    RelayTask(#[from] tokio::task::JoinError),
}

/// Runs the simulator: serves ARI, originates the calls, and returns the report.
///
/// # Errors
/// The listen address cannot be bound, a thread cannot start, or the application does not
/// connect in time.
pub async fn run(cfg: SimConfig) -> Result<SimReport, SimError> {
    let listen = |source| SimError::Listen {
        addr: cfg.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(listen)?;
    let addr = listener.local_addr().map_err(listen)?;
    let (events, _) = broadcast::channel(65_536);
    let sim = Arc::new(Sim {
        world: Mutex::new(World::default()),
        events,
        ws_generation: watch::Sender::new(0),
        apps: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        injected_404: AtomicU64::new(0),
        ws_drops: AtomicU64::new(0),
        injected: Mutex::new(BTreeMap::new()),
        ws_connections: AtomicU64::new(0),
        epoch: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        timing: media::TimingSource::new().map_err(|source| SimError::Thread {
            what: "RTP timing thread",
            source,
        })?,
        bridges: bridge::Bridges::new(&cfg).map_err(|source| SimError::Thread {
            what: "bridges' delay line",
            source,
        })?,
        cfg,
    });
    let server = tokio::spawn(axum::serve(listener, rest::router(Arc::clone(&sim))).into_future());
    tracing::info!("sim-asterisk ready listen={addr} app={}", sim.cfg.app);
    let cfg = sim.cfg.clone();
    let mut relay_cpu_start = cfg.relay_pid.and_then(relay_io::process_cpu_ns);

    if cfg.calls == 0 {
        match cfg.serve_for {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    } else {
        // Asterisk refuses Stasis() for an application nobody is connected to: wait for it.
        let deadline = Instant::now() + cfg.wait_app;
        while !sim.connected(&cfg.app) {
            if Instant::now() >= deadline {
                return Err(SimError::AppNotConnected {
                    app: cfg.app.clone(),
                    wait: cfg.wait_app,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let start = tokio::time::Instant::now();
        relay_cpu_start = cfg.relay_pid.and_then(relay_io::process_cpu_ns);
        if let Some(at) = cfg.drop_ws_at {
            let sim = Arc::clone(&sim);
            tokio::spawn(async move {
                tokio::time::sleep_until(start + at).await;
                tracing::info!("dropping every events WebSocket (--drop-ws-at)");
                sim.ws_drops.fetch_add(1, Ordering::Relaxed);
                sim.ws_generation.send_modify(|g| *g += 1);
            });
        }
        let mut calls = Vec::new();
        for i in 0..cfg.calls {
            let at = start + cfg.ramp.mul_f64(f64::from(i) / f64::from(cfg.calls));
            tokio::time::sleep_until(at).await;
            let id = sim.new_id();
            if let Err(e) = sim.originate(&cfg.app, Some(id.clone()), "ulaw") {
                tracing::warn!(status = %e.status(), "cannot originate");
                continue;
            }
            let sim = Arc::clone(&sim);
            let hold = cfg.hold;
            calls.push(tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                // Stop the media first so the last packets can come back, then hang up.
                let em = {
                    let w = sim.world();
                    w.channels
                        .get(&id)
                        .and_then(|c| c.bridge.clone())
                        .and_then(|b| {
                            w.channels.values().find_map(|c| {
                                (c.bridge.as_deref() == Some(b.as_str())
                                    && matches!(c.kind, Kind::External { .. }))
                                .then(|| c.id.clone())
                            })
                        })
                };
                if let Some(em) = em {
                    sim.stop_media(&em).await;
                }
                sim.hangup(&id, false).await;
            }));
        }
        for c in calls {
            let _ = c.await;
        }
        // Control hangs up the externalMedia channels and destroys the bridges.
        let deadline = Instant::now() + cfg.grace;
        while Instant::now() < deadline {
            let clean = {
                let w = sim.world();
                w.channels.is_empty() && w.bridges.is_empty()
            };
            if clean {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    server.abort();
    let relay_cpu = cfg
        .relay_pid
        .and_then(relay_io::process_cpu_ns)
        .zip(relay_cpu_start)
        .map(|(end, start)| end.saturating_sub(start));
    let global = match cfg.relay_ctl.clone() {
        Some(path) => tokio::task::spawn_blocking(move || {
            RelayClient::connect(&path).and_then(|mut c| c.global())
        })
        .await?
        .map_err(|e| tracing::warn!("no relay statistics: {}", chain(&e)))
        .ok(),
        None => None,
    };
    let mut r = report::report(&sim);
    r.added_by_relay = global.as_ref().map(|g| Added::between(&r.rtt, &g.rtt));
    r.relay = global.map(|g| {
        let mut side = RelaySide::from_global_totals(&g);
        side.set_cpu(relay_cpu);
        side
    });
    Ok(r)
}

/// `e` and its sources, `: `-separated (as a binary's `{:#}` of an `anyhow::Error` prints it).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
