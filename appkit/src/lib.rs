//! `appkit`: what every binary of the workspace (relay, control, echo, loadgen, bench) shares as
//! a process, kept out of the data-plane crate so that no tool depends on the relay for it:
//! - [`init_logging`]: one log format and filter (`RUST_LOG`) for all of them;
//! - [`flags`]: flag values that are not the product's business (durations, via `humantime`);
//! - [`prom`]: building Prometheus metric families and rendering the text exposition format;
//! - [`http`]: the one HTTP server behind every `/metrics`, `/stats` and `/healthz` (hyper and
//!   axum), GET only, with a bounded request size and a read timeout;
//! - [`pacer`]: one named thread ticking streams on absolute deadlines, the timing source of the
//!   tools that send media at a phone's pace (`sim-asterisk`, `loadgen ari`);
//! - [`tls`]: mutual TLS 1.3 for the control link to relays on other hosts (rustls).
#![forbid(unsafe_code)]

pub mod flags;
pub mod http;
pub mod pacer;
pub mod prom;
pub mod tls;

/// Logs to standard error, colored only on a terminal, at the level `RUST_LOG` sets (`info`
/// by default).
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
