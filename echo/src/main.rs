//! `echo`: parse the command line, run until stopped, print the summary.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use appkit::flags::parse_duration;
use clap::Parser;
use echo::faults::FaultConfig;
use echo::{Config, SharedCounts, TxStamps};

/// The echo's command line.
#[derive(Debug, Parser)]
#[command(
    name = "echo",
    version,
    about = "RTP reflector: returns every datagram to its source, with reproducible fault injection"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:4000")]
    listen: SocketAddr,
    /// Metrics endpoint (/metrics, /healthz); "off" disables it; port 0 picks one (logged).
    #[arg(long, env = "ECHO_METRICS", default_value = "127.0.0.1:9101")]
    metrics: String,
    /// Pin the I/O thread to this core.
    #[arg(long, env = "ECHO_CORE")]
    core: Option<usize>,
    /// Fixed delay added to every packet (e.g. 5ms).
    #[arg(long, env = "ECHO_DELAY", default_value = "0s", value_parser = parse_duration, allow_hyphen_values = true)]
    delay: Duration,
    /// Extra delay, uniform in [0, jitter).
    #[arg(long, env = "ECHO_JITTER", default_value = "0s", value_parser = parse_duration, allow_hyphen_values = true)]
    jitter: Duration,
    /// Probability (0–1) a packet is dropped.
    #[arg(
        long,
        env = "ECHO_LOSS",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    loss: f64,
    /// Probability (0–1) a packet is sent twice.
    #[arg(
        long,
        env = "ECHO_DUPLICATE",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    duplicate: f64,
    /// Probability (0–1) a packet is held until the next packet of its stream has left.
    #[arg(
        long,
        env = "ECHO_REORDER",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    reorder: f64,
    /// Release each stream's packets at the spacing of their RTP timestamps.
    #[arg(long, env = "ECHO_PACE")]
    pace: bool,
    /// RTP clock rate for --pace.
    #[arg(long, env = "ECHO_CLOCK_RATE", default_value_t = 8000)]
    clock_rate: u32,
    /// Seed of every random decision.
    #[arg(long, env = "ECHO_SEED", default_value_t = 1)]
    seed: u64,
    /// Receive buffers in the ring (power of two, at most 32768).
    #[arg(long, env = "ECHO_BUFFERS", default_value_t = 8192)]
    buffers: u16,
    /// SO_RCVBUF of the socket, in bytes (SO_RCVBUFFORCE when permitted).
    #[arg(long, env = "ECHO_RCVBUF", default_value_t = 32 << 20)]
    rcvbuf: usize,
    /// Receive with UDP GRO (for GSO senders: the shared echo leg, `loadgen blast --gso`):
    /// buffers become 64 KiB, at most 512 of them. Without faults each coalesced batch goes back
    /// as one UDP GSO send; with faults each of its datagrams is faulted on its own, and those
    /// leaving together are gathered again into GSO sends.
    #[arg(long, env = "ECHO_GRO")]
    gro: bool,
    /// How the transmit stamps that end each hold are read: error-queue (recvmsg(MSG_ERRQUEUE)
    /// after every submission) or command (io_uring's SOCKET_URING_OP_TX_TIMESTAMP, not with
    /// --gro; seen corrupting provided-buffer receives on Linux 6.18: for experiments).
    #[arg(
        long,
        env = "ECHO_TX_STAMPS",
        value_enum,
        default_value = "error-queue"
    )]
    tx_stamps: TxStamps,
    /// Stop after this long (default: run until SIGTERM or SIGINT).
    #[arg(long, env = "ECHO_DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
}

/// A flag whose value is out of range.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for --{flag}: {reason}")]
struct ConfigError {
    /// The flag, without dashes.
    flag: &'static str,
    /// What is wrong.
    reason: String,
}

fn bad(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        reason: reason.into(),
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, Self::Error> {
        for (flag, p) in [
            ("loss", a.loss),
            ("duplicate", a.duplicate),
            ("reorder", a.reorder),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(bad(flag, format!("{p} is not a probability in 0..=1")));
            }
        }
        if !a.buffers.is_power_of_two() || a.buffers > 1 << 15 {
            return Err(bad("buffers", "must be a power of two up to 32768"));
        }
        if a.clock_rate == 0 {
            return Err(bad("clock-rate", "must be positive"));
        }
        let metrics = match a.metrics.as_str() {
            "off" => None,
            m => Some(
                m.parse()
                    .map_err(|e| bad("metrics", format!("{m:?}: {e}")))?,
            ),
        };
        Ok(Self {
            listen: a.listen,
            metrics,
            core: a.core,
            faults: FaultConfig {
                delay: a.delay,
                jitter: a.jitter,
                loss: a.loss,
                duplicate: a.duplicate,
                reorder: a.reorder,
                pace: a.pace,
                clock_hz: a.clock_rate,
                reorder_hold: Duration::from_millis(200),
                seed: a.seed,
            },
            buffers: a.buffers,
            rcvbuf: a.rcvbuf,
            duration: a.duration,
            gro: a.gro,
            tx_stamps: a.tx_stamps,
        })
    }
}

fn main() -> ExitCode {
    let config = match Config::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("echo: {e}");
            return ExitCode::from(2);
        }
    };
    appkit::init_logging();
    match run(&config) {
        Ok(summary) => {
            println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("echo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Config) -> anyhow::Result<echo::Summary> {
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(SharedCounts::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let io = {
        let (config, stop, shared) = (config.clone(), Arc::clone(&stop), Arc::clone(&shared));
        std::thread::Builder::new()
            .name("rtp-echo".into())
            .spawn(move || {
                echo::run(&config, &stop, &shared, |addr, waker| {
                    let _ = ready_tx.send((addr, waker));
                })
            })?
    };
    let Ok((listen, waker)) = ready_rx.recv() else {
        return Ok(io
            .join()
            .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let metrics = match config.metrics {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on --metrics {addr}: {e}"))?;
                let local = l.local_addr()?;
                let shared = Arc::clone(&shared);
                let task = tokio::spawn(appkit::http::serve(l, metrics_router(shared)));
                Some((local, task))
            }
            None => None,
        };
        tracing::info!(
            listen = %listen,
            metrics = %metrics.as_ref().map_or("off".to_owned(), |(a, _)| format!("http://{a}/metrics")),
            "echo ready"
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let finished = async {
            while !io.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
            () = finished => {},
        }
        stop.store(true, Ordering::Relaxed);
        waker.notify();
        if let Some((_, task)) = metrics {
            task.abort();
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(io
        .join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??)
}

/// `/metrics` (the echo's counters) and `/healthz`.
fn metrics_router(shared: Arc<SharedCounts>) -> axum::Router {
    use appkit::http;
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let shared = Arc::clone(&shared);
                async move { http::prometheus_text(shared.render()) }
            }),
        )
        .route(
            "/healthz",
            get(|| async { http::text(axum::http::StatusCode::OK, "ok\n") }),
        )
        .fallback(http::not_found("/metrics or /healthz"))
}
