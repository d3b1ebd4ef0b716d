//! `loadgen ari --callers rtp`: callers that play probes through Asterisk, set up the way a
//! real Asterisk 22 was seen to pass payload bytes unchanged.
//!
//! loadgen runs a Stasis application of its own (`--loadgen-app`) on its own events WebSocket.
//! Per call it originates `Local/<control's app>@<context>/n` into that application, with
//! `formats=ulaw` and ids of its own choosing (`channelId` for the `;1` half, `otherChannelId`
//! for `;2`). The `;2` half runs the dialplan (`exten => <app>,1,Stasis(${EXTEN})` in the
//! context), so it enters control's application as any caller does; `/n` keeps the Local pair
//! from optimising itself away. Once control answers `;2`, the `;1` half enters loadgen's
//! application (StasisStart), and loadgen creates an externalMedia channel (ulaw) toward a UDP
//! socket of its own and bridges it with `;1` in a mixing bridge. Once control's bridge for `;2`
//! (`rtprelay-br-<;2's id>`) holds its two channels too, so that the whole media path exists, it
//! plays `--hold` of probes ([`super::probes`]) and, once they are back or the drain has passed, hangs up `;1`
//! (which ends `;2`, and control tears its side down), its externalMedia channel and its bridge.
//! Whatever happens (an ARI error, Ctrl-C, the far side hanging up) everything it created is
//! removed before the call's task ends.
//!
//! After the teardown, with `--control`, it reads control's record of the call
//! (`GET /calls/{;2's id}`) for the relay's count of the probes it received, which splits the
//! call's loss into before and after the relay ([`super::through_asterisk`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::probes::{CallMedia, TimingSource, FRAME};

/// Settings of the rtp callers.
#[derive(Clone, Debug)]
pub struct RtpCallers {
    /// loadgen's own Stasis application.
    pub app: String,
    /// The dialplan context whose extension `<control's app>` runs `Stasis(${EXTEN})`.
    pub context: String,
    /// The address loadgen's RTP sockets bind (Asterisk sends the returns there).
    pub rtp_ip: IpAddr,
    /// After the last probe, wait this long at most for the rest to come back.
    pub drain: Duration,
}

/// What one call came to.
#[derive(Debug, Default)]
pub struct CallResult {
    /// The originate was accepted.
    pub originated: bool,
    /// Why the call failed, if it did: the stage and the error.
    pub failure: Option<String>,
    /// Its media, if it played.
    pub media: Option<CallMedia>,
    /// The relay's count of this call's probes from Asterisk (control's record).
    pub relay_received: Option<u64>,
    /// ARI objects that could not be removed (should be none).
    pub leftovers: Vec<String>,
    /// Its `;1` half was still up at the end and loadgen hung it up.
    pub hung_up: bool,
}

/// A REST client for ARI with its credentials.
#[derive(Clone, Debug)]
pub struct Ari {
    http: reqwest::Client,
    base: String,
    user: String,
    pass: String,
}

/// Why an ARI request failed.
#[derive(Debug, thiserror::Error)]
pub enum AriError {
    /// No HTTP answer.
    #[error("ARI unreachable: {0}")]
    Http(#[from] reqwest::Error),
    /// An answer other than success.
    #[error("ARI answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// Its body.
        body: String,
    },
}

impl Ari {
    /// A client for the ARI at `base`.
    #[must_use]
    pub fn new(http: reqwest::Client, base: &str, user: &str, pass: &str) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            pass: pass.to_owned(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Value, AriError> {
        let r = self
            .http
            .request(method, format!("{}/ari{path}", self.base))
            .basic_auth(&self.user, Some(&self.pass))
            .query(query)
            .send()
            .await?;
        let status = r.status();
        if !status.is_success() {
            let body = r.text().await.unwrap_or_default();
            return Err(AriError::Status { status, body });
        }
        Ok(r.json::<Value>().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, AriError> {
        self.send(reqwest::Method::POST, path, query).await
    }

    /// Deletes `path`: true when it was there, false when it was already gone (404).
    async fn delete(&self, path: &str) -> Result<bool, AriError> {
        match self.send(reqwest::Method::DELETE, path, &[]).await {
            Ok(_) => Ok(true),
            Err(AriError::Status { status, .. }) if status == StatusCode::NOT_FOUND => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The events WebSocket URL of application `app` (carries the password).
    fn events_url(&self, app: &str) -> String {
        let ws = self
            .base
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        format!(
            "{ws}/ari/events?app={app}&api_key={}:{}&subscribeAll=false",
            self.user, self.pass
        )
    }
}

/// What the events task tells a call.
#[derive(Debug)]
enum Signal {
    /// Its `;1` half entered loadgen's application.
    Started,
    /// Its `;1` half left (hung up from the far side).
    Ended,
}

/// Calls waiting for events, by `;1` channel id.
type Waiting = Arc<Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Signal>>>>;

/// loadgen's application: its events WebSocket and the calls listening to it.
#[derive(Debug)]
pub struct App {
    waiting: Waiting,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    /// Connects application `app`'s events WebSocket (Asterisk refuses `Stasis()` for an
    /// application nobody is connected to, so this comes before the first call).
    ///
    /// # Errors
    /// The WebSocket cannot be connected.
    pub async fn connect(ari: &Ari, app: &str) -> Result<Self, super::AriError> {
        let url = ari.events_url(app);
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| super::AriError::Events {
                app: app.to_owned(),
                base: ari.base.clone(),
                source: Box::new(e),
            })?;
        let waiting: Waiting = Arc::default();
        let w = Arc::clone(&waiting);
        let task = tokio::spawn(async move {
            let mut ws = ws;
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(ev) = serde_json::from_str::<Value>(&text) else {
                    tracing::debug!("unreadable ARI event dropped");
                    continue;
                };
                let signal = match ev["type"].as_str() {
                    Some("StasisStart") => Signal::Started,
                    Some("StasisEnd" | "ChannelDestroyed") => Signal::Ended,
                    _ => continue,
                };
                if let Some(id) = ev["channel"]["id"].as_str() {
                    let tx = w
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get(id)
                        .cloned();
                    if let Some(tx) = tx {
                        let _ = tx.send(signal);
                    }
                }
            }
            tracing::warn!("loadgen's events WebSocket closed");
            // Every call waiting for an event learns that none will come.
            w.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        });
        Ok(Self { waiting, task })
    }

    fn listen(&self, id: &str) -> tokio::sync::mpsc::UnboundedReceiver<Signal> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned(), tx);
        rx
    }

    fn forget(&self, id: &str) {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }
}

/// One call's names.
#[derive(Debug, Clone)]
pub struct CallIds {
    /// `;1`: loadgen's half.
    pub near: String,
    /// `;2`: the half control sees as its caller.
    pub far: String,
    /// loadgen's externalMedia channel.
    pub media: String,
    /// loadgen's bridge.
    pub bridge: String,
}

impl CallIds {
    /// The ids of call `i` of run `run`. None starts with control's prefixes, so control never
    /// takes loadgen's channels or bridges for leftovers of its own.
    #[must_use]
    pub fn new(run: &str, i: u32) -> Self {
        Self {
            near: format!("loadgen-{run}-{i}"),
            far: format!("loadgen-{run}-{i}-far"),
            media: format!("loadgen-{run}-{i}-em"),
            bridge: format!("loadgen-{run}-{i}-br"),
        }
    }
}

/// What every call of a run shares.
#[derive(Debug)]
pub struct CallCtx {
    /// ARI.
    pub ari: Ari,
    /// loadgen's application.
    pub app: App,
    /// Settings.
    pub cfg: RtpCallers,
    /// Control's application (the Local extension).
    pub control_app: String,
    /// Control's HTTP endpoint, for its call record.
    pub control: Option<String>,
    /// Sends the probes.
    pub timing: TimingSource,
    /// Set on Ctrl-C: stop now, tear down.
    pub stop: watch::Receiver<bool>,
}

/// How long a setup step may wait for an event.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long addChannel is retried while the externalMedia channel is not in Stasis yet (422).
const ADD_RETRY_FOR: Duration = Duration::from_secs(5);

/// Runs call `i`: originate, set up, play `hold` of probes, tear down, read control's record.
pub async fn call(ctx: Arc<CallCtx>, run: String, i: u32, hold: Duration) -> CallResult {
    let ctx = &*ctx;
    let run = run.as_str();
    let ids = CallIds::new(run, i);
    let mut events = ctx.app.listen(&ids.near);
    let mut result = CallResult::default();
    let mut created = Created::default();
    let played = play(ctx, &ids, i, hold, &mut events, &mut created, &mut result).await;
    if let Err(e) = played {
        result.failure = Some(e);
    }
    (result.hung_up, result.leftovers) = created.teardown(&ctx.ari, &ids).await;
    ctx.app.forget(&ids.near);
    if let (Some(control), true) = (&ctx.control, result.media.is_some()) {
        result.relay_received = relay_received(&ctx.ari, control, &ids.far).await;
    }
    result
}

/// What a call created, to remove.
#[derive(Debug, Default)]
struct Created {
    near: bool,
    media: bool,
    bridge: bool,
}

impl Created {
    /// Removes what was created: whether `;1` was still up and hung up, and the names of what
    /// could not be removed.
    async fn teardown(&self, ari: &Ari, ids: &CallIds) -> (bool, Vec<String>) {
        let mut left = Vec::new();
        let mut hung_up = false;
        let steps = [
            (self.near, format!("/channels/{}", ids.near)),
            (self.media, format!("/channels/{}", ids.media)),
            (self.bridge, format!("/bridges/{}", ids.bridge)),
        ];
        for (i, (made, path)) in steps.into_iter().enumerate() {
            if made {
                match ari.delete(&path).await {
                    Ok(was_there) => hung_up |= i == 0 && was_there,
                    Err(e) => {
                        tracing::warn!("cannot remove {path}: {e}");
                        left.push(path);
                    }
                }
            }
        }
        (hung_up, left)
    }
}

/// Waits for the `;1` half's StasisStart, for a step's time at most, or until Ctrl-C.
async fn started(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Signal>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let wait = async {
        match events.recv().await {
            Some(Signal::Started) => Ok(()),
            Some(Signal::Ended) => Err("hung up before it entered the application".to_owned()),
            None => Err("events WebSocket gone".to_owned()),
        }
    };
    tokio::select! {
        r = tokio::time::timeout(STEP_TIMEOUT, wait) => {
            r.map_err(|_| format!("no StasisStart within {STEP_TIMEOUT:?}"))?
        }
        () = stopped(stop) => Err("interrupted".to_owned()),
    }
}

/// Returns once Ctrl-C was pressed.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Returns once the `;1` half has left the application (hung up from the far side); never if
/// the events stop coming.
async fn hung_up(events: &mut tokio::sync::mpsc::UnboundedReceiver<Signal>) {
    loop {
        match events.recv().await {
            Some(Signal::Ended) => return,
            Some(Signal::Started) => {}
            None => std::future::pending::<()>().await,
        }
    }
}

async fn play(
    ctx: &CallCtx,
    ids: &CallIds,
    i: u32,
    hold: Duration,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Signal>,
    created: &mut Created,
    result: &mut CallResult,
) -> Result<(), String> {
    let mut stop = ctx.stop.clone();
    let endpoint = format!("Local/{}@{}/n", ctx.control_app, ctx.cfg.context);
    // Marked before each request: one that times out may still have been carried out, and a
    // delete of what does not exist is harmless (404).
    created.near = true;
    ctx.ari
        .post(
            "/channels",
            &[
                ("endpoint", endpoint.as_str()),
                ("app", ctx.cfg.app.as_str()),
                ("formats", "ulaw"),
                ("channelId", ids.near.as_str()),
                ("otherChannelId", ids.far.as_str()),
            ],
        )
        .await
        .map_err(|e| format!("originate: {e}"))?;
    result.originated = true;
    // `;1` enters loadgen's application once control has answered `;2`.
    started(events, &mut stop)
        .await
        .map_err(|e| format!("caller: {e}"))?;
    let sock = UdpSocket::bind((ctx.cfg.rtp_ip, 0)).map_err(|e| format!("RTP socket: {e}"))?;
    let local = sock
        .local_addr()
        .map_err(|e| format!("RTP socket: {e}"))?
        .to_string();
    created.media = true;
    let em = ctx
        .ari
        .post(
            "/channels/externalMedia",
            &[
                ("app", ctx.cfg.app.as_str()),
                ("external_host", local.as_str()),
                ("format", "ulaw"),
                ("channelId", ids.media.as_str()),
                ("encapsulation", "rtp"),
                ("transport", "udp"),
                ("connection_type", "client"),
                ("direction", "both"),
            ],
        )
        .await
        .map_err(|e| format!("externalMedia: {e}"))?;
    let to = media_address(&ctx.ari, &ids.media, &em)
        .await
        .map_err(|e| format!("externalMedia address: {e}"))?;
    created.bridge = true;
    ctx.ari
        .post(
            &format!("/bridges/{}", ids.bridge),
            &[("type", "mixing"), ("name", ids.bridge.as_str())],
        )
        .await
        .map_err(|e| format!("bridge: {e}"))?;
    add_channels(&ctx.ari, ids)
        .await
        .map_err(|e| format!("addChannel: {e}"))?;
    // Play only once the whole media path exists: what `;1` reads while `;2` is in no bridge is
    // dropped inside Asterisk, and would be counted as lost before the relay.
    far_side_bridged(&ctx.ari, &ids.far, &mut stop)
        .await
        .map_err(|e| format!("control's bridge: {e}"))?;
    let probes = u32::try_from(hold.as_nanos() / FRAME.as_nanos()).unwrap_or(u32::MAX);
    let seed = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(std::process::id());
    let running = ctx
        .timing
        .start(sock, to, i, probes.max(1), ctx.cfg.drain, seed)
        .map_err(|e| format!("media: {e}"))?;
    // The probes play out; the far side hanging up or Ctrl-C cuts them short.
    let abort = running.abort_handle();
    let mut finish = std::pin::pin!(running.finish());
    let media = tokio::select! {
        m = &mut finish => m,
        () = stopped(&mut stop) => { abort.abort(); finish.await }
        () = hung_up(events) => { abort.abort(); finish.await }
    };
    result.media = Some(media);
    Ok(())
}

/// Where the externalMedia channel takes RTP: `UNICASTRTP_LOCAL_ADDRESS:PORT`, from the reply's
/// `channelvars` or else asked for.
async fn media_address(ari: &Ari, id: &str, reply: &Value) -> Result<SocketAddr, String> {
    let vars = &reply["channelvars"];
    let (mut ip, mut port) = (
        vars["UNICASTRTP_LOCAL_ADDRESS"].as_str().map(str::to_owned),
        vars["UNICASTRTP_LOCAL_PORT"].as_str().map(str::to_owned),
    );
    for (name, slot) in [
        ("UNICASTRTP_LOCAL_ADDRESS", &mut ip),
        ("UNICASTRTP_LOCAL_PORT", &mut port),
    ] {
        if slot.is_none() {
            let v = ari
                .send(
                    reqwest::Method::GET,
                    &format!("/channels/{id}/variable"),
                    &[("variable", name)],
                )
                .await
                .map_err(|e| e.to_string())?;
            *slot = v["value"].as_str().map(str::to_owned);
        }
    }
    let (Some(ip), Some(port)) = (ip, port) else {
        return Err("no UNICASTRTP_LOCAL_ADDRESS/PORT".to_owned());
    };
    format!("{ip}:{port}")
        .parse()
        .or_else(|_| format!("[{ip}]:{port}").parse())
        .map_err(|_| format!("{ip}:{port} is not an address"))
}

/// The prefix control gives its bridge's id: `rtprelay-br-<caller id>`.
pub const CONTROL_BRIDGE_PREFIX: &str = "rtprelay-br-";
/// How often control's bridge is looked at while it is being set up.
const BRIDGE_POLL: Duration = Duration::from_millis(5);

/// Waits until control's bridge for the `;2` half (`rtprelay-br-<;2's id>`, one `GET
/// /bridges/{id}` a poll) holds two channels: `;2` and control's externalMedia channel. It is
/// normally there by the time loadgen's own bridge is (both sides set up in parallel once
/// control answers `;2`), so this costs one or two requests a call.
async fn far_side_bridged(
    ari: &Ari,
    far: &str,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let path = format!("/bridges/{CONTROL_BRIDGE_PREFIX}{far}");
    let wait = async {
        loop {
            match ari.send(reqwest::Method::GET, &path, &[]).await {
                Ok(b) if b["channels"].as_array().is_some_and(|c| c.len() >= 2) => return Ok(()),
                Ok(_) | Err(AriError::Status { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
            tokio::time::sleep(BRIDGE_POLL).await;
        }
    };
    tokio::select! {
        r = tokio::time::timeout(STEP_TIMEOUT, wait) => {
            r.map_err(|_| format!("{path} did not hold two channels within {STEP_TIMEOUT:?}"))?
        }
        () = stopped(stop) => Err("interrupted".to_owned()),
    }
}

/// Adds `;1` and the externalMedia channel to the bridge, retrying while the externalMedia
/// channel is not in Stasis yet (422: its StasisStart races the externalMedia reply).
async fn add_channels(ari: &Ari, ids: &CallIds) -> Result<(), AriError> {
    let deadline = tokio::time::Instant::now() + ADD_RETRY_FOR;
    let channels = format!("{},{}", ids.near, ids.media);
    loop {
        match ari
            .post(
                &format!("/bridges/{}/addChannel", ids.bridge),
                &[("channel", channels.as_str())],
            )
            .await
        {
            Err(AriError::Status { status, .. })
                if status == StatusCode::UNPROCESSABLE_ENTITY
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            r => return r.map(|_| ()),
        }
    }
}

/// The relay's count of the call's probes from Asterisk, from control's record of the call
/// (`relay.probe.received`); control writes it once its teardown is done, so it is polled for
/// a while.
async fn relay_received(ari: &Ari, control: &str, far: &str) -> Option<u64> {
    let url = format!("{}/calls/{far}", control.trim_end_matches('/'));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = ari.http.get(&url).send().await {
            if r.status().is_success() {
                let rec: Value = r.json().await.ok()?;
                // A relay channel that saw no probe at all has `probe: null`: none received.
                return match &rec["relay"] {
                    Value::Object(relay) => Some(
                        relay
                            .get("probe")
                            .and_then(|p| p["received"].as_u64())
                            .unwrap_or(0),
                    ),
                    _ => None,
                };
            }
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("control has no record of call {far}: its loss cannot be split");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
