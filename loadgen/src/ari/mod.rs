//! `loadgen ari`: load on a real Asterisk, `--calls` calls spread over `--ramp`, each held for
//! `--hold`, then the relay's and control's figures for this run: their counters at the end
//! minus their counters at the start (both are stated too, since those processes may have run
//! calls before).
//!
//! Two kinds of caller:
//! - `--callers rtp` (the default, [`caller`]): loadgen is the caller. Through a Local channel
//!   pair it enters control's application like any caller and plays probes whose every packet it
//!   times on both sides of Asterisk: the round trip the caller hears, split per packet into
//!   Asterisk in, the relay's loop and Asterisk out ([`through_asterisk`]), with loss on each side of the
//!   relay.
//! - `--callers tone`: originates `--endpoint` (default `Local/s@load`, whose dialplan answers
//!   and plays a tone) into control's application; what comes back is discarded inside Asterisk,
//!   so only the relay's own loop is measured.
//!
//! Every originate carries `formats=ulaw` (for tone callers `--formats`): without it Asterisk
//! gives a Local channel the native format slin192 and every call would be transcoded.
//! `docs/operations.md`'s "Against a real Asterisk" section has the Asterisk configuration it
//! expects.
//! It works the same against `sim-asterisk --calls 0`, which is how it is tested.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::ctl::RelayClient;

pub mod caller;
pub mod probes;
pub mod through_asterisk;

pub use caller::RtpCallers;
pub use through_asterisk::{LegSummary, Lost, ThroughAsterisk, Window};

/// Who the calls are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Callers {
    /// loadgen plays probes through Asterisk and times them on both sides.
    Rtp,
    /// `--endpoint` plays a tone into control's application; only the relay's loop is measured.
    Tone,
}

/// `loadgen ari` settings.
#[derive(Clone, Debug)]
pub struct AriLoadConfig {
    /// ARI base URL.
    pub url: String,
    /// ARI user.
    pub user: String,
    /// ARI password.
    pub pass: String,
    /// The application control serves.
    pub app: String,
    /// The endpoint to originate (a Local channel into a context that answers and plays a tone).
    pub endpoint: String,
    /// `formats` passed on every originate (`None`: left out).
    pub formats: Option<String>,
    /// Calls.
    pub calls: u32,
    /// Spread the originations over this long.
    pub ramp: Duration,
    /// Hold each call this long.
    pub hold: Duration,
    /// The relay's control socket, for its summary.
    pub relay_ctl: Option<PathBuf>,
    /// Control's metrics endpoint, for its `/stats` and (rtp callers) its call records.
    pub control: Option<String>,
    /// Who the calls are.
    pub callers: Callers,
    /// Settings of the rtp callers.
    pub rtp: RtpCallers,
    /// rtp callers: write every probe's four stamps here (CSV).
    pub probes: Option<PathBuf>,
}

/// What `loadgen ari` reports.
#[derive(Debug, Serialize)]
pub struct AriLoadReport {
    /// Who the calls were.
    pub callers: Callers,
    /// Calls asked for.
    pub calls: u32,
    /// How long each was held, seconds.
    pub hold_s: f64,
    /// Originations Asterisk accepted.
    pub originated: u32,
    /// Originations refused, with the first reason.
    pub failed: u32,
    /// First failure.
    pub first_error: Option<String>,
    /// Calls still up at the end of the hold that were hung up.
    pub hung_up: u32,
    /// rtp callers: calls that played their probes.
    pub played: u32,
    /// rtp callers: ARI objects loadgen could not remove (should be empty).
    pub leftovers: Vec<String>,
    /// rtp callers: the caller's round trip through Asterisk, split per probe.
    pub through_asterisk: Option<ThroughAsterisk>,
    /// rtp callers: probes lost, on each side of the relay.
    pub lost: Option<Lost>,
    /// rtp callers: the round trip over run time, one window a second.
    pub timeseries: Vec<Window>,
    /// rtp callers: what else came back, or did not leave.
    pub media: Option<through_asterisk::MediaCounts>,
    /// What the split's times are, and when they hold.
    pub clocks: Option<&'static str>,
    /// The relay's figures.
    pub relay: Option<Figures>,
    /// Control's figures (`/stats`).
    pub control: Option<Figures>,
}

/// A process's figures over the run: its counters at the start and the end, and their
/// difference. Percentiles (`p50_ns` … `max_ns`, `mean_ns`) and gauges cannot be differenced:
/// in `run` they are left out; `end` has them since the process started.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// Counters of this run: `end − start`, counters only.
    pub run: Value,
    /// As read before the first call.
    pub start: Value,
    /// As read after the last call was torn down.
    pub end: Value,
}

/// Keys whose values are not counters: percentiles, means and gauges.
const NOT_COUNTERS: [&str; 14] = [
    "min_ns",
    "mean_ns",
    "p50_ns",
    "p95_ns",
    "p99_ns",
    "p999_ns",
    "max_ns",
    "channels",
    "active",
    "free",
    "in_use",
    "jitter_ns",
    "relay_channels",
    "draining",
];

/// `end − start` for every counter both hold (objects recursively); what is not a counter, or
/// is in only one of them, is left out.
#[must_use]
pub fn counters_between(start: &Value, end: &Value) -> Value {
    match (start, end) {
        (Value::Object(a), Value::Object(b)) => Value::Object(
            b.iter()
                .filter(|(k, _)| !NOT_COUNTERS.contains(&k.as_str()))
                .filter_map(|(k, v)| {
                    let d = counters_between(a.get(k)?, v);
                    (!d.is_null()).then(|| (k.clone(), d))
                })
                .collect(),
        ),
        (Value::Number(a), Value::Number(b)) => match (a.as_u64(), b.as_u64()) {
            (Some(a), Some(b)) => Value::from(b.saturating_sub(a)),
            _ => Value::Null,
        },
        _ => Value::Null,
    }
}

/// What the calls themselves came to (the rest of the report is the processes' figures).
#[derive(Debug, Default)]
struct Calls {
    originated: u32,
    failed: u32,
    first_error: Option<String>,
    hung_up: u32,
    played: u32,
    leftovers: Vec<String>,
    split: Option<through_asterisk::Split>,
}

/// Set once Ctrl-C (SIGINT) or SIGTERM comes: every call ends and is torn down. A second
/// signal exits at once (status 130), leaving whatever was not torn down yet.
fn interrupted() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            tracing::warn!("cannot watch for SIGTERM: only Ctrl-C tears calls down");
            let _ = tokio::signal::ctrl_c().await;
            let _ = tx.send(true);
            return std::future::pending::<()>().await;
        };
        let mut signals = 0;
        loop {
            tokio::select! {
                () = async {
                    if tokio::signal::ctrl_c().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                } => {}
                _ = term.recv() => {}
            }
            signals += 1;
            if signals == 1 {
                tracing::warn!(
                    "interrupted: ending every call and tearing it down (again to quit now)"
                );
                let _ = tx.send(true);
            } else {
                tracing::warn!("interrupted twice: quitting without finishing the teardown");
                std::process::exit(130);
            }
        }
    });
    rx
}

/// Why a run could not be made (a call that fails is counted in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum AriError {
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    /// ARI did not answer an originate (tone callers).
    #[error("cannot reach ARI")]
    Unreachable(#[source] reqwest::Error),
    /// A later ARI request failed, or its reply could not be read (tone callers).
    #[error("ARI request failed")]
    Request(#[from] reqwest::Error),
    /// ARI's originate reply has no channel id.
    #[error("ARI's originate reply has no channel id")]
    NoChannelId,
    /// The kernel gives no transmit stamps by id (rtp callers).
    #[error("loadgen times its probes with kernel transmit stamps (Linux 6.13+)")]
    TxStamps(#[source] std::io::Error),
    /// loadgen's application could not connect its events WebSocket (rtp callers).
    #[error("cannot connect the events WebSocket of application {app:?} at {base}/ari/events")]
    Events {
        /// loadgen's application.
        app: String,
        /// ARI's base URL.
        base: String,
        /// Why.
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// The probes' timing thread could not start (rtp callers).
    #[error("cannot start the probes' timing thread")]
    TimingThread(#[source] std::io::Error),
    /// The `--probes` file could not be created or written.
    #[error("cannot {what} {}", path.display())]
    Probes {
        /// `create` or `write`.
        what: &'static str,
        /// `--probes`.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the load and gathers the summaries.
///
/// # Errors
/// ARI cannot be reached at all, or (rtp callers) loadgen's application cannot connect.
pub async fn run(cfg: &AriLoadConfig) -> Result<AriLoadReport, AriError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(AriError::Client)?;
    let relay_start = relay_global(cfg).await;
    let control_start = control_stats(&http, cfg).await;
    let stop = interrupted();
    let calls = match cfg.callers {
        Callers::Tone => tone_calls(cfg, &http, stop).await?,
        Callers::Rtp => rtp_calls(cfg, &http, stop).await?,
    };
    // Control tears the calls down: wait until it has no call left (10 s at most) before
    // reading the figures.
    if cfg.control.is_some() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            let active = control_stats(&http, cfg)
                .await
                .and_then(|s| s["calls"]["active"].as_u64());
            if active == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let figures = |start: Option<Value>, end: Option<Value>| {
        start.zip(end).map(|(start, end)| Figures {
            run: counters_between(&start, &end),
            start,
            end,
        })
    };
    let relay = figures(relay_start, relay_global(cfg).await);
    let control = figures(control_start, control_stats(&http, cfg).await);
    Ok(AriLoadReport {
        callers: cfg.callers,
        calls: cfg.calls,
        hold_s: cfg.hold.as_secs_f64(),
        originated: calls.originated,
        failed: calls.failed,
        first_error: calls.first_error,
        hung_up: calls.hung_up,
        played: calls.played,
        leftovers: calls.leftovers,
        through_asterisk: calls
            .split
            .as_ref()
            .map(through_asterisk::Split::through_asterisk),
        lost: calls.split.as_ref().map(through_asterisk::Split::lost),
        timeseries: calls
            .split
            .as_ref()
            .map(through_asterisk::Split::windows)
            .unwrap_or_default(),
        media: calls.split.as_ref().map(through_asterisk::Split::media),
        clocks: calls.split.as_ref().map(|_| CLOCKS),
        relay,
        control,
    })
}

/// What the split's times are.
const CLOCKS: &str = "every time is a kernel stamp of CLOCK_REALTIME (loadgen's transmit and \
    receive stamps, the relay's receive stamps): exact when loadgen and the relay share a host; \
    across hosts the legs hold only as well as the two clocks are synchronised, and a negative \
    leg leaves totals only";

/// The originate time of call `i`.
fn slot(cfg: &AriLoadConfig, start: tokio::time::Instant, i: u32) -> tokio::time::Instant {
    start + cfg.ramp.mul_f64(f64::from(i) / f64::from(cfg.calls))
}

/// Tone callers: originate `--endpoint` into control's application, hold, hang up.
async fn tone_calls(
    cfg: &AriLoadConfig,
    http: &reqwest::Client,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Calls, AriError> {
    let base = cfg.url.trim_end_matches('/');
    let mut calls = Calls::default();
    let mut ids = Vec::new();
    let start = tokio::time::Instant::now();
    for i in 0..cfg.calls {
        tokio::select! {
            () = tokio::time::sleep_until(slot(cfg, start, i)) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let r = http
            .post(format!("{base}/ari/channels"))
            .basic_auth(&cfg.user, Some(&cfg.pass))
            .query(&[
                ("endpoint", cfg.endpoint.as_str()),
                ("app", cfg.app.as_str()),
            ])
            .query(&cfg.formats.as_ref().map(|f| [("formats", f.as_str())]))
            .send()
            .await
            .map_err(AriError::Unreachable)?;
        let status = r.status();
        if status.is_success() {
            let ch: Value = r.json().await?;
            let id = ch["id"].as_str().ok_or(AriError::NoChannelId)?;
            ids.push((slot(cfg, start, i), id.to_owned()));
        } else {
            calls.failed += 1;
            if calls.first_error.is_none() {
                calls.first_error =
                    Some(format!("{status}: {}", r.text().await.unwrap_or_default()));
            }
        }
    }
    calls.originated = u32::try_from(ids.len()).unwrap_or(u32::MAX);
    for (at, id) in &ids {
        // Ctrl-C: hang every call up at once.
        if !*stop.borrow() {
            tokio::select! {
                () = tokio::time::sleep_until(*at + cfg.hold) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
        let r = http
            .delete(format!("{base}/ari/channels/{id}"))
            .basic_auth(&cfg.user, Some(&cfg.pass))
            .send()
            .await?;
        // 404: the call already ended (control hung it up, or the dialplan did).
        if r.status().is_success() {
            calls.hung_up += 1;
        }
    }
    Ok(calls)
}

/// rtp callers: loadgen's own application, one task a call ([`caller::call`]), then the split.
async fn rtp_calls(
    cfg: &AriLoadConfig,
    http: &reqwest::Client,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Calls, AriError> {
    // Every probe's send time is its kernel transmit stamp, found by its id: without ids the
    // kernel refuses every send, so say so now rather than report a run of nothing.
    relay_io::probe_tx_stamps(cfg.rtp.rtp_ip).map_err(AriError::TxStamps)?;
    let ari = caller::Ari::new(http.clone(), &cfg.url, &cfg.user, &cfg.pass);
    let app = caller::App::connect(&ari, &cfg.rtp.app).await?;
    let ctx = Arc::new(caller::CallCtx {
        ari,
        app,
        cfg: cfg.rtp.clone(),
        control_app: cfg.app.clone(),
        control: cfg.control.clone(),
        timing: probes::TimingSource::new().map_err(AriError::TimingThread)?,
        stop: stop.clone(),
    });
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
            & 0xff_ffff_ffff
    );
    let mut split = through_asterisk::Split::new();
    // Run time: the ramp, the hold, set-up and the drain, with room to spare.
    split.set_epoch(
        wall_now_ns(),
        cfg.ramp + cfg.hold + cfg.rtp.drain + Duration::from_secs(60),
    );
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    let mut stop_ramp = stop.clone();
    for i in 0..cfg.calls {
        tokio::select! {
            () = tokio::time::sleep_until(slot(cfg, start, i)) => {}
            _ = stop_ramp.wait_for(|s| *s) => break,
        }
        tasks.push(tokio::spawn(caller::call(
            Arc::clone(&ctx),
            run.clone(),
            i,
            cfg.hold,
        )));
    }
    // Every call ends (and tears down) before anything else can fail the run.
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.unwrap_or_else(|e| caller::CallResult {
            failure: Some(format!("the call's task failed: {e}")),
            ..caller::CallResult::default()
        }));
    }
    let probes_error = |what, path: &std::path::Path| {
        let path = path.to_owned();
        move |source| AriError::Probes { what, path, source }
    };
    let mut out = match &cfg.probes {
        Some(path) => {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(path).map_err(probes_error("create", path))?,
            );
            writeln!(f, "{PROBES_HEADER}").map_err(probes_error("write", path))?;
            Some((path, f))
        }
        None => None,
    };
    let mut calls = Calls::default();
    for (i, r) in (0..).zip(results) {
        if let (Some((path, f)), Some(m)) = (&mut out, &r.media) {
            write_probes(f, i, m).map_err(probes_error("write", path))?;
        }
        calls.originated += u32::from(r.originated);
        if let Some(e) = &r.failure {
            calls.failed += 1;
            if calls.first_error.is_none() {
                calls.first_error = Some(e.clone());
            }
        }
        calls.leftovers.extend(r.leftovers);
        calls.hung_up += u32::from(r.hung_up);
        if let Some(m) = &r.media {
            calls.played += 1;
            split.add_call(m, r.relay_received);
        }
    }
    if let Some((path, mut f)) = out {
        std::io::Write::flush(&mut f).map_err(probes_error("write", path))?;
    }
    calls.split = Some(split);
    Ok(calls)
}

/// The first line of `--probes`: one probe a line after it; a time is 0 where it is not known.
pub const PROBES_HEADER: &str = "call,probe,sent_ns,relay_arrival_ns,relay_returned_ns,back_ns";

/// One line per probe of call `call`: its four kernel stamps (ns `CLOCK_REALTIME`).
fn write_probes(
    f: &mut impl std::io::Write,
    call: u32,
    m: &probes::CallMedia,
) -> std::io::Result<()> {
    for (seq, p) in m.probes.iter().enumerate() {
        writeln!(
            f,
            "{call},{seq},{},{},{},{}",
            p.sent, p.relay_arrival, p.relay_returned, p.back
        )?;
    }
    Ok(())
}

/// `CLOCK_REALTIME` now, ns.
fn wall_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The report as a person reads it.
#[must_use]
pub fn render(r: &AriLoadReport) -> String {
    let mut out = String::new();
    let callers = match r.callers {
        Callers::Rtp => "rtp callers (probes timed on both sides of Asterisk)",
        Callers::Tone => "tone callers",
    };
    let _ = writeln!(
        out,
        "loadgen ari: {} calls of {:.0} s, {callers}: {} originated, {} failed{}",
        r.calls,
        r.hold_s,
        r.originated,
        r.failed,
        r.first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    if let Some(l) = &r.lost {
        #[allow(clippy::cast_precision_loss)] // a ratio for reading
        let pct = |n: u64| 100.0 * n as f64 / l.sent.max(1) as f64;
        let side = |n: Option<u64>| {
            n.map_or_else(
                || "unknown".to_owned(),
                |n| format!("{n} ({:.3} %)", pct(n)),
            )
        };
        let _ = writeln!(
            out,
            "probes: {} sent, {} back, {} lost ({:.3} %): before the relay {}, after it {}",
            l.sent,
            l.returned,
            l.total,
            pct(l.total),
            side(l.before_relay),
            side(l.after_relay)
        );
        if l.calls_unsplit > 0 {
            let _ = writeln!(
                out,
                "  loss not split: {} calls had no relay count (control's call record, --control, gives it)",
                l.calls_unsplit
            );
        }
    }
    if let Some(t) = &r.through_asterisk {
        let _ = writeln!(
            out,
            "through Asterisk (µs)  {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "count", "p50", "p95", "p99", "p99.9", "max"
        );
        let mut row = |name: &str, l: Option<&LegSummary>| {
            let _ = match l {
                Some(l) => writeln!(
                    out,
                    "  {name:<20} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                    l.count, l.p50_us, l.p95_us, l.p99_us, l.p999_us, l.max_us
                ),
                None => writeln!(out, "  {name:<20} {:>9}", "-"),
            };
        };
        row("total", Some(&t.total));
        row("Asterisk in", t.asterisk_in.as_ref());
        row("relay loop", t.relay.as_ref());
        row("Asterisk out", t.asterisk_out.as_ref());
        if t.negative_legs > 0 {
            let _ = writeln!(
                out,
                "  {} probes had a negative leg: loadgen's and the relay's clocks disagree, totals only",
                t.negative_legs
            );
        }
        if t.unsplit > 0 || t.untimed > 0 {
            let _ = writeln!(
                out,
                "  {} returns timed in total only (the relay had not recognised the call yet), {} not timed (a kernel stamp missing)",
                t.unsplit, t.untimed
            );
        }
    }
    if let Some(m) = &r.media {
        if *m != through_asterisk::MediaCounts::default() {
            let _ = writeln!(
                out,
                "returns: {} duplicates, {} malformed (no valid probe header), {} from a wrong address, {} without a receive stamp; {} sends refused, {} probes outside the run's windows",
                m.duplicates, m.malformed, m.strict_drops, m.no_rx_stamp, m.send_errors, m.outside_windows
            );
        }
    }
    if r.clocks.is_some() {
        let _ = writeln!(
            out,
            "(every time is a kernel stamp of CLOCK_REALTIME: the split is exact with loadgen and the relay on one host; across hosts only as good as their clocks' synchronisation)"
        );
    }
    if !r.leftovers.is_empty() {
        let _ = writeln!(out, "left behind on Asterisk: {}", r.leftovers.join(", "));
    }
    if let Some(run) = r.relay.as_ref().map(|f| &f.run) {
        let _ = writeln!(
            out,
            "relay, this run: {} packets to the echo, {} back",
            run["traffic"]["to_echo"]["packets"], run["traffic"]["to_asterisk"]["packets"]
        );
    }
    out
}

/// The relay's global statistics, when its socket is given and answers.
async fn relay_global(cfg: &AriLoadConfig) -> Option<Value> {
    let path = cfg.relay_ctl.clone()?;
    tokio::task::spawn_blocking(move || RelayClient::connect(&path).and_then(|mut c| c.global()))
        .await
        .ok()?
        .ok()
        .and_then(|g| serde_json::to_value(g).ok())
}

/// Control's `/stats`, when its endpoint is given and answers.
async fn control_stats(http: &reqwest::Client, cfg: &AriLoadConfig) -> Option<Value> {
    let url = cfg.control.as_ref()?;
    http.get(format!("{}/stats", url.trim_end_matches('/')))
        .send()
        .await
        .ok()?
        .json::<Value>()
        .await
        .ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn counters_are_differenced_and_percentiles_left_out() {
        let start = json!({"channels_opened": 38, "traffic": {"to_echo": {"packets": 1000}},
                           "rtt": {"count": 900, "p50_ns": 70_000}, "channels": 0});
        let end = json!({"channels_opened": 48, "traffic": {"to_echo": {"packets": 15_740}},
                         "rtt": {"count": 15_640, "p50_ns": 71_000}, "channels": 0, "new": 3});
        assert_eq!(
            super::counters_between(&start, &end),
            json!({"channels_opened": 10, "traffic": {"to_echo": {"packets": 14_740}},
                   "rtt": {"count": 14_740}})
        );
    }
}
