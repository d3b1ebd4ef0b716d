//! The ARI REST calls control makes, over reqwest with a timeout, each one counted and timed by
//! operation and status. Ids go into URLs as escaped path segments; the password only into the
//! basic-auth header (reqwest's errors name the URL, which never carries it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

use crate::ari::Channel;
use crate::config::Config;
use crate::metrics::Metrics;

/// A failed ARI request.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// ARI answered with an error status.
    #[error("{op}: HTTP {status}: {message}")]
    Status {
        /// The operation.
        op: &'static str,
        /// The status.
        status: u16,
        /// ARI's message.
        message: String,
    },
    /// No answer (connection refused, timeout, bad body).
    #[error("{op}: {message}")]
    Transport {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl RestError {
    /// The HTTP status, when ARI answered.
    #[must_use]
    pub const fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Transport { .. } => None,
        }
    }
}

/// An ARI client that cannot be built (at start, from the configuration).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--ari-url` is not a URL.
    #[error(transparent)]
    Url(<Url as std::str::FromStr>::Err),
    /// reqwest cannot build its client (its TLS backend, typically).
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

/// A DELETE's result: `true` when it deleted, `false` when the object was already gone (404).
fn gone_is_fine(r: Result<reqwest::Response, RestError>) -> Result<bool, RestError> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.status() == Some(StatusCode::NOT_FOUND.as_u16()) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A bridge as ARI lists it (the fields control reads).
#[derive(Clone, Debug, Deserialize)]
pub struct Bridge {
    /// Id.
    pub id: String,
    /// Member channel ids.
    #[serde(default)]
    pub channels: Vec<String>,
}

/// An ARI REST client.
#[derive(Clone, Debug)]
pub struct Ari {
    http: reqwest::Client,
    base: Url,
    user: String,
    pass: crate::config::Secret,
    app: String,
    metrics: Arc<Metrics>,
}

impl Ari {
    /// A client for `cfg`'s Asterisk.
    ///
    /// # Errors
    /// The URL does not parse, or the HTTP client cannot be built.
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(256)
            .build()?;
        let base = Url::parse(&format!("{}/", cfg.ari_url)).map_err(ClientError::Url)?;
        Ok(Self {
            http,
            base,
            user: cfg.ari_user.clone(),
            pass: cfg.ari_pass.clone(),
            app: cfg.app_name.clone(),
            metrics,
        })
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut p) = url.path_segments_mut() {
            p.pop_if_empty().push("ari").extend(segments);
        }
        url
    }

    async fn send(
        &self,
        op: &'static str,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<reqwest::Response, RestError> {
        let start = Instant::now();
        let r = self
            .http
            .request(method, self.url(segments))
            .basic_auth(&self.user, Some(self.pass.expose()))
            .query(query)
            .send()
            .await;
        let took = start.elapsed();
        match r {
            Ok(r) if r.status().is_success() => {
                self.metrics
                    .ari_request(op, Some(r.status().as_u16()), took);
                Ok(r)
            }
            Ok(r) => {
                let status = r.status().as_u16();
                self.metrics.ari_request(op, Some(status), took);
                let body = r.text().await.unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_owned))
                    .unwrap_or(body);
                Err(RestError::Status {
                    op,
                    status,
                    message,
                })
            }
            Err(e) => {
                self.metrics.ari_request(op, None, took);
                Err(RestError::Transport {
                    op,
                    message: e.without_url().to_string(),
                })
            }
        }
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        op: &'static str,
        r: reqwest::Response,
    ) -> Result<T, RestError> {
        r.json().await.map_err(|e| RestError::Transport {
            op,
            message: format!("unreadable reply: {}", e.without_url()),
        })
    }

    /// `POST /channels/{id}/answer`.
    ///
    /// # Errors
    /// See [`RestError`].
    pub async fn answer(&self, channel: &str) -> Result<(), RestError> {
        self.send(
            "answer",
            Method::POST,
            &["channels", channel, "answer"],
            &[],
        )
        .await
        .map(drop)
    }

    /// `DELETE /channels/{id}`; `Ok(false)` when the channel was already gone (404).
    ///
    /// # Errors
    /// See [`RestError`].
    pub async fn hangup(&self, channel: &str) -> Result<bool, RestError> {
        gone_is_fine(
            self.send("hangup", Method::DELETE, &["channels", channel], &[])
                .await,
        )
    }

    /// `POST /channels/externalMedia`: RTP over UDP to `external_host`, `format`, both
    /// directions, Asterisk as the client; the channel gets the id `channel_id`.
    ///
    /// # Errors
    /// See [`RestError`].
    pub async fn external_media(
        &self,
        channel_id: &str,
        external_host: &str,
        format: &str,
    ) -> Result<Channel, RestError> {
        let r = self
            .send(
                "external_media",
                Method::POST,
                &["channels", "externalMedia"],
                &[
                    ("app", &self.app),
                    ("channelId", channel_id),
                    ("external_host", external_host),
                    ("format", format),
                    ("encapsulation", "rtp"),
                    ("transport", "udp"),
                    ("connection_type", "client"),
                    ("direction", "both"),
                ],
            )
            .await?;
        Self::json("external_media", r).await
    }

    /// `POST /bridges?type=mixing&bridgeId=…`.
    ///
    /// # Errors
    /// See [`RestError`].
    pub async fn create_bridge(&self, id: &str) -> Result<(), RestError> {
        self.send(
            "create_bridge",
            Method::POST,
            &["bridges"],
            &[("type", "mixing"), ("bridgeId", id), ("name", id)],
        )
        .await
        .map(drop)
    }

    /// `POST /bridges/{id}/addChannel?channel=a,b`.
    ///
    /// # Errors
    /// See [`RestError`]; 422 means a channel is not in Stasis (yet).
    pub async fn add_to_bridge(&self, bridge: &str, channels: &[&str]) -> Result<(), RestError> {
        let list = channels.join(",");
        self.send(
            "add_channel",
            Method::POST,
            &["bridges", bridge, "addChannel"],
            &[("channel", &list)],
        )
        .await
        .map(drop)
    }

    /// `DELETE /bridges/{id}`; `Ok(false)` when it was already gone.
    ///
    /// # Errors
    /// See [`RestError`].
    pub async fn destroy_bridge(&self, id: &str) -> Result<bool, RestError> {
        gone_is_fine(
            self.send("destroy_bridge", Method::DELETE, &["bridges", id], &[])
                .await,
        )
    }

    /// `GET /channels`.
    ///
    /// # Errors
    /// See [`RestError`].
    pub async fn channels(&self) -> Result<Vec<Channel>, RestError> {
        let r = self
            .send("list_channels", Method::GET, &["channels"], &[])
            .await?;
        Self::json("list_channels", r).await
    }

    /// `GET /channels/{id}/variable?variable=NAME`: the value of a channel variable or function
    /// (`CHANNEL(audionativeformat)` answers `(ulaw)`, `(slin192)`, `(ulaw|alaw)`).
    ///
    /// # Errors
    /// See [`RestError`] (404: no such channel or variable).
    pub async fn variable(&self, channel: &str, name: &str) -> Result<String, RestError> {
        #[derive(Deserialize)]
        struct Value {
            value: String,
        }
        let r = self
            .send(
                "get_variable",
                Method::GET,
                &["channels", channel, "variable"],
                &[("variable", name)],
            )
            .await?;
        Self::json::<Value>("get_variable", r)
            .await
            .map(|v| v.value)
    }

    /// `GET /bridges`.
    ///
    /// # Errors
    /// See [`RestError`].
    pub async fn bridges(&self) -> Result<Vec<Bridge>, RestError> {
        let r = self
            .send("list_bridges", Method::GET, &["bridges"], &[])
            .await?;
        Self::json("list_bridges", r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn https_urls_are_supported() {
        crate::install_tls_provider();
        let args = <crate::config::Args as clap::Parser>::try_parse_from([
            "control",
            "--ari-pass",
            "x",
            "--ari-url",
            "https://127.0.0.1:1",
        ])
        .unwrap();
        let cfg = Config::try_from(args).unwrap();
        assert!(cfg
            .events_url()
            .starts_with("wss://127.0.0.1:1/ari/events?"));
        let ari = Ari::new(&cfg, Arc::new(Metrics::new())).unwrap();
        // Nothing listens on port 1: a connection error, not an unsupported scheme.
        match ari.channels().await {
            Err(RestError::Transport { message, .. }) => {
                assert!(!message.contains("scheme"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
