//! The ARI events WebSocket (`/ari/events?app=…&api_key=…`): connected at start, reconnected with
//! exponential backoff and jitter whenever it drops, and reconciled on every connection, because
//! events missed while it was down (a StasisEnd, typically) must not leave a call, a bridge or a
//! relay channel behind. The URL carries the password, so errors are logged without it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio_tungstenite::tungstenite::Message;

use crate::ari::parse_event;
use crate::calls::Controller;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::relay_link::Backoff;

/// Keeps the events WebSocket connected and feeds its events to `ctl`; never returns.
pub async fn run(cfg: Config, ctl: Arc<Controller>, metrics: Arc<Metrics>) {
    let url = cfg.events_url();
    let shown = format!("{}/ari/events?app={}", cfg.ari_url, cfg.app_name);
    // At most 0.6 s between attempts (0.4 s ± 50 %): the WebSocket is back within a second of
    // Asterisk answering again, and a down Asterisk costs two cheap attempts a second.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
    let mut connected_before = false;
    // Failed attempts since the last line about them (one line per 10 s while Asterisk is down).
    let (mut failures, mut last_line): (u64, Option<std::time::Instant>) = (0, None);
    loop {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => {
                if connected_before {
                    metrics.ws_reconnects.inc();
                }
                connected_before = true;
                backoff.reset();
                failures = 0;
                last_line = None;
                metrics.ws_connected.set(1);
                tracing::info!("events WebSocket connected to {shown}");
                {
                    let ctl = Arc::clone(&ctl);
                    tokio::spawn(async move {
                        if let Err(e) = ctl.reconcile().await {
                            tracing::warn!("reconciliation failed: {e}");
                        }
                    });
                }
                let mut read = ws;
                while let Some(msg) = read.next().await {
                    match msg {
                        Ok(Message::Text(text)) => match parse_event(&text) {
                            Ok(ev) => ctl.handle_event(ev),
                            Err(e) => {
                                metrics.events.with_label_values(&["unreadable"]).inc();
                                tracing::warn!("unreadable ARI event ({e}): dropped");
                            }
                        },
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                metrics.ws_connected.set(0);
                tracing::warn!("events WebSocket to {shown} closed; reconnecting");
            }
            Err(e) => {
                failures += 1;
                if last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        attempts = failures,
                        "cannot connect the events WebSocket to {shown}: {} (retrying every 0.4 s; \
                         one line per 10 s)",
                        redact(&e.to_string(), &cfg)
                    );
                    last_line = Some(std::time::Instant::now());
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// `text` with the password replaced, in case an error message quotes the URL.
fn redact(text: &str, cfg: &Config) -> String {
    let pass = cfg.ari_pass.expose();
    if pass.is_empty() {
        text.to_owned()
    } else {
        text.replace(pass, "***")
    }
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::error::{Error, UrlError};

    #[tokio::test]
    async fn wss_urls_are_supported() {
        crate::install_tls_provider();
        // Nothing listens on port 1: the connection fails, but not for want of TLS support.
        let e = tokio_tungstenite::connect_async("wss://127.0.0.1:1/ari/events")
            .await
            .unwrap_err();
        assert!(
            !matches!(e, Error::Url(UrlError::TlsFeatureNotEnabled)),
            "wss is not compiled in: {e}"
        );
        assert!(matches!(e, Error::Io(_)), "{e}");
    }
}
