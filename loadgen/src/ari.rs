//! `loadgen ari`: load on a real Asterisk. Originates calls into the Stasis application control
//! serves (`POST /ari/channels?endpoint=Local/s@load&app=APP`; the Local channel's other half
//! runs the dialplan, which answers and plays a tone), `--calls` of them spread over `--ramp`,
//! holds each for `--hold`, hangs them up, waits for control to tear them down, then prints the
//! relay's and control's figures for this run: their counters at the end minus their counters at
//! the start (both are stated too, since those processes may have run calls before).
//! Every originate carries `formats` (default `ulaw`): without it Asterisk gives a Local channel
//! the native format slin192 and every call would be transcoded.
//! The README's "Against a real Asterisk" section has the Asterisk configuration it expects.
//! It works the same against `loadgen sim-asterisk --calls 0`, which is how it is tested.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use serde::Serialize;
use serde_json::Value;

use crate::ctl::RelayClient;

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
    /// Control's metrics endpoint, for its `/stats`.
    pub control: Option<String>,
}

/// What `loadgen ari` reports.
#[derive(Debug, Serialize)]
pub struct AriLoadReport {
    /// Calls asked for.
    pub calls: u32,
    /// Originations Asterisk accepted.
    pub originated: u32,
    /// Originations refused, with the first reason.
    pub failed: u32,
    /// First failure.
    pub first_error: Option<String>,
    /// Calls still up at the end of the hold that were hung up.
    pub hung_up: u32,
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

/// Runs the load and gathers the summaries.
///
/// # Errors
/// ARI cannot be reached at all.
pub async fn run(cfg: &AriLoadConfig) -> anyhow::Result<AriLoadReport> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let base = cfg.url.trim_end_matches('/');
    let relay_start = relay_global(cfg).await;
    let control_start = control_stats(&http, cfg).await;
    let mut ids = Vec::new();
    let mut failed = 0;
    let mut first_error = None;
    let start = tokio::time::Instant::now();
    for i in 0..cfg.calls {
        tokio::time::sleep_until(start + cfg.ramp.mul_f64(f64::from(i) / f64::from(cfg.calls)))
            .await;
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
            .context("cannot reach ARI")?;
        let status = r.status();
        if status.is_success() {
            let ch: Value = r.json().await?;
            let id = ch["id"]
                .as_str()
                .ok_or_else(|| anyhow!("ARI's originate reply has no channel id"))?;
            ids.push((
                start + cfg.ramp.mul_f64(f64::from(i) / f64::from(cfg.calls)),
                id.to_owned(),
            ));
        } else {
            failed += 1;
            if first_error.is_none() {
                first_error = Some(format!("{status}: {}", r.text().await.unwrap_or_default()));
            }
        }
    }
    let mut hung_up = 0;
    for (at, id) in &ids {
        tokio::time::sleep_until(*at + cfg.hold).await;
        let r = http
            .delete(format!("{base}/ari/channels/{id}"))
            .basic_auth(&cfg.user, Some(&cfg.pass))
            .send()
            .await?;
        // 404: the call already ended (control hung it up, or the dialplan did).
        if r.status().is_success() {
            hung_up += 1;
        }
    }
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
        calls: cfg.calls,
        originated: u32::try_from(ids.len()).unwrap_or(u32::MAX),
        failed,
        first_error,
        hung_up,
        relay,
        control,
    })
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
