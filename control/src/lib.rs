//! `control`: the Asterisk ARI side of rtp-relay. For each call entering the Stasis application it
//! answers, takes a relay port from the pool, creates an externalMedia channel aimed at it,
//! bridges the two and tells the relay; when the call ends it undoes all of it.
//!
//! - [`config`]: the operators' environment variables, the password kept secret;
//! - [`ari`]: the ARI messages control reads; [`rest`]: the REST calls it makes;
//! - [`events`]: the events WebSocket, reconnected with backoff, reconciled on each connection;
//! - [`calls`]: the call lifecycle; [`pool`]: the port pool; [`call_log`]: one JSON line per
//!   finished call, the newest kept for `GET /calls/{caller_id}`;
//! - [`relay_link`]: the pipelined, self-resyncing connection to one relay, on its Unix socket
//!   or over mutual TLS; [`relays`]: the pool of them calls are placed on;
//! - [`metrics`]: `rtprelay_control_*`, served with `/healthz` and `/stats` by [`run`].
#![forbid(unsafe_code)]

pub mod ari;
pub mod call_log;
pub mod calls;
pub mod config;
pub mod events;
pub mod metrics;
pub mod pool;
pub mod relay_link;
pub mod relays;
pub mod rest;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use appkit::http;
use axum::http::StatusCode;
pub use relay_proto::control as protocol;
use serde_json::json;

use crate::calls::Controller;
use crate::config::Config;
use crate::metrics::Metrics;

/// Why control could not start (or could not watch for its stop signal).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The ARI client cannot be built from `--ari-url`.
    #[error(transparent)]
    Ari(#[from] rest::ClientError),
    /// The metrics address cannot be bound.
    #[error("cannot listen on --metrics {addr}")]
    Metrics {
        /// `--metrics`.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The call log cannot be opened.
    #[error("cannot open --call-log {}", path.display())]
    CallLog {
        /// `--call-log`.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metrics listener's address, or the SIGTERM handler, is unavailable.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How long control waits for a relay before it takes calls anyway.
const RELAY_WAIT: Duration = Duration::from_secs(10);

/// Runs control until SIGINT or SIGTERM, then tears every call down.
///
/// # Errors
/// The metrics address cannot be bound, the call log cannot be opened, or the ARI URL is
/// unusable.
pub async fn run(cfg: Config) -> Result<(), RunError> {
    install_tls_provider();
    let metrics = Arc::new(Metrics::new());
    let ari = rest::Ari::new(&cfg, Arc::clone(&metrics))?;
    let relay = relays::RelayPool::spawn(
        cfg.relays.clone(),
        cfg.relay_grace,
        cfg.interim,
        Arc::clone(&metrics),
    );
    let listener = tokio::net::TcpListener::bind(cfg.metrics)
        .await
        .map_err(|source| RunError::Metrics {
            addr: cfg.metrics,
            source,
        })?;
    let metrics_addr = listener.local_addr()?;
    let summary = cfg.summary_interval;
    // Every finished call's record is kept (the newest, for `/calls/{id}`); with --call-log,
    // each is appended to the file too.
    let call_log = match &cfg.call_log {
        Some(path) => call_log::CallLog::open(path).map_err(|source| RunError::CallLog {
            path: path.clone(),
            source,
        })?,
        None => call_log::CallLog::in_memory(),
    };
    let ctl = Controller::new(
        cfg.clone(),
        ari,
        relay,
        Arc::clone(&metrics),
        Some(call_log.clone()),
    );
    {
        let ctl = Arc::clone(&ctl);
        let metrics = Arc::clone(&metrics);
        tokio::spawn(http::serve(listener, router(ctl, metrics, call_log)));
    }
    // Calls are taken (the application subscribed) once a relay can carry them: a call that
    // arrived before would find no relay and be hung up.
    {
        let (cfg, ctl, metrics) = (cfg.clone(), Arc::clone(&ctl), Arc::clone(&metrics));
        tokio::spawn(async move {
            if !ctl.relay().wait_connected(RELAY_WAIT).await {
                tracing::warn!(
                    "no relay connected after {RELAY_WAIT:?}: taking calls anyway (each finds no \
                     relay until one connects: outcome no_relay)"
                );
            }
            events::run(cfg, ctl, metrics).await;
        });
    }
    if let Some(every) = summary {
        let (ctl, metrics) = (Arc::clone(&ctl), Arc::clone(&metrics));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                log_summary(&ctl, &metrics).await;
            }
        });
    }
    tracing::info!(
        ari = %cfg.ari_url,
        app = %cfg.app_name,
        ports = format!("{}-{}", cfg.port_range.start(), cfg.port_range.end()),
        "control ready metrics={metrics_addr}"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!(calls = ctl.active(), "stopping: tearing every call down");
    ctl.shutdown(Duration::from_secs(10)).await;
    log_summary(&ctl, &metrics).await;
    Ok(())
}

/// Makes ring the process's TLS provider, for `https://` and `wss://` ARI URLs (reqwest and
/// tokio-tungstenite both use rustls). Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn log_summary(ctl: &Controller, m: &Metrics) {
    let (free, in_use, _) = ctl.ports();
    let outcome = |o: &str| m.calls.with_label_values(&[o]).get();
    let rtt = match ctl.relay().global().await {
        Ok(g) => format!(
            "relay rtt p50 {:.3} ms p99 {:.3} ms over {} packets",
            g.rtt.p50_ns as f64 / 1e6,
            g.rtt.p99_ns as f64 / 1e6,
            g.rtt.count
        ),
        Err(e) => format!("relay: {e}"),
    };
    let setup = m.setup_summary();
    tracing::info!(
        active = ctl.active(),
        bridged = m.calls_bridged.get(),
        completed = outcome("completed"),
        failed = outcome("failed"),
        no_port = outcome("no_port"),
        ports_free = free,
        ports_in_use = in_use,
        setup_p99_ms = setup.p99_ns as f64 / 1e6,
        "summary: {rtt}"
    );
}

/// `/metrics`, `/healthz` (200 when the events WebSocket and at least one relay are connected),
/// `/stats` (JSON: calls, ports, links, set-up times, each relay of the pool, a relay's global
/// statistics) and
/// `/calls/{caller_id}` (a finished call's record, [`call_log::router`]).
fn router(ctl: Arc<Controller>, m: Arc<Metrics>, log: call_log::CallLog) -> axum::Router {
    use axum::routing::get;
    let metrics = {
        let m = Arc::clone(&m);
        move || {
            let m = Arc::clone(&m);
            async move { http::prometheus_text(m.render()) }
        }
    };
    let healthz = {
        let m = Arc::clone(&m);
        move || {
            let m = Arc::clone(&m);
            async move { healthz(&m) }
        }
    };
    let stats = move || {
        let (ctl, m) = (Arc::clone(&ctl), Arc::clone(&m));
        async move { stats(&ctl, &m).await }
    };
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .merge(call_log::router(log))
        .fallback(http::not_found(
            "/metrics, /healthz, /stats or /calls/{caller_id}",
        ))
}

fn healthz(m: &Metrics) -> axum::response::Response {
    // With a pool, one relay connected is enough to take calls.
    let (ws, relay) = (m.ws_connected.get() == 1, m.relay_connected.get() >= 1);
    let body = format!("events_ws {}\nrelay {}\n", up(ws), up(relay));
    let status = if ws && relay {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    http::text(status, body)
}

async fn stats(ctl: &Controller, m: &Metrics) -> axum::response::Response {
    let (free, in_use, exhausted) = ctl.ports();
    let outcome = |o: &str| m.calls.with_label_values(&[o]).get();
    let relay = ctl.relay().global().await.ok();
    let body = json!({
        "calls": {
            "active": ctl.active(),
            "bridged": m.calls_bridged.get(),
            "completed": outcome("completed"),
            "abandoned": outcome("abandoned"),
            "no_port": outcome("no_port"),
            "failed": outcome("failed"),
            "transcoded": m.transcoded_total(),
            "setup": m.setup_summary(),
        },
        "ports": {"free": free, "in_use": in_use, "exhausted": exhausted},
        "links": {
            "events_ws": m.ws_connected.get() == 1,
            "ws_reconnects": m.ws_reconnects.get(),
            "relay": m.relay_connected.get() >= 1,
            "relay_resyncs": m.relay_resyncs.get(),
            "relay_channels": ctl.relay().len(),
        },
        "relays": ctl.relay().status(),
        "relay": relay,
    });
    http::json_text(format!("{body:#}\n"))
}

const fn up(b: bool) -> &'static str {
    if b {
        "up"
    } else {
        "down"
    }
}
