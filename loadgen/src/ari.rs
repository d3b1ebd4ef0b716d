//! `loadgen ari`: load on a real Asterisk. Originates calls into the Stasis application control
//! serves (`POST /ari/channels?endpoint=Local/s@load&app=APP`; the Local channel's other half
//! runs the dialplan, which answers and plays a tone), `--calls` of them spread over `--ramp`,
//! holds each for `--hold`, hangs them up, then prints the relay's and control's summaries.
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
    /// The relay's global statistics (after the calls).
    pub relay: Option<Value>,
    /// Control's `/stats`.
    pub control: Option<Value>,
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
    // Give control a moment to tear down before reading the summaries.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let relay = match &cfg.relay_ctl {
        Some(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                RelayClient::connect(&path).and_then(|mut c| c.global())
            })
            .await?
            .ok()
            .and_then(|g| serde_json::to_value(g).ok())
        }
        None => None,
    };
    let control = match &cfg.control {
        Some(url) => {
            let r = http
                .get(format!("{}/stats", url.trim_end_matches('/')))
                .send()
                .await;
            match r {
                Ok(r) => r.json::<Value>().await.ok(),
                Err(_) => None,
            }
        }
        None => None,
    };
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
