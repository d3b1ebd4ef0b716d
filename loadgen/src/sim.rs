//! `loadgen sim-asterisk`: an ARI server that behaves like Asterisk 22 for everything control
//! uses, so the whole pipeline (control, relay, echo) runs and is tested on a machine without
//! Asterisk.
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
//! It originates `--calls` caller channels over `--ramp`, holds each for `--hold`, then stops its
//! RTP, lets the last packets return (100 ms at most) and hangs up (StasisEnd, ChannelDestroyed).
//! It measures each call's round trip (sent → back from the relay), loss and strict-RTP drops, and
//! once every call has ended and control has cleaned up (or `--grace` has passed) prints a report.
//! Fault options: `--answer-404` fails that fraction of first answer attempts with 404, and
//! `--drop-ws-at` closes every events WebSocket once at that time.
//!
//! Not a hot path: a multi-thread tokio runtime, one task per externalMedia channel, one mutex
//! over the call state (never held across an await).

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use relay_proto::rng::SplitMix64;
use relay_proto::rtp::{parse_rtp, RtpHeader, Ssrc};
use relay_proto::stats::{LatencyHistogram, LatencySummary};

use crate::report::{Added, RelaySide};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, oneshot, watch};

/// RTP packet size Asterisk sends for 20 ms of ulaw.
pub const PACKET_LEN: usize = 172;
/// Packets per second.
const PACKETS_PER_SECOND: u32 = 50;
/// How long a hung-up call waits for its last packets to come back.
const DRAIN: Duration = Duration::from_millis(100);

/// `loadgen sim-asterisk` settings.
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
}

/// Operations `--fail` can break.
pub const FAILABLE: [&str; 3] = ["external_media", "create_bridge", "add_channel"];

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallEnd {
    /// Held for its duration and hung up by the simulator.
    Completed,
    /// Hung up by the application (control) before its duration.
    HungUpByApp,
    /// Still up when the report was made.
    Active,
}

/// One caller's record in the report.
#[derive(Clone, Debug, Serialize)]
pub struct CallReport {
    /// The caller channel.
    pub id: String,
    /// Whether it was answered.
    pub answered: bool,
    /// Whether its externalMedia channel was bridged with it and RTP flowed.
    pub bridged: bool,
    /// How it ended.
    pub end: CallEnd,
    /// RTP packets sent to the relay.
    pub sent: u64,
    /// Packets that came back (first copies).
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// Copies of a packet already received.
    pub duplicates: u64,
    /// Returned packets dropped because they came from a wrong address (strict RTP).
    pub strict_rtp_drops: u64,
    /// Returned datagrams that were not RTP or not this stream's.
    pub malformed: u64,
    /// Round trip Asterisk → relay → echo → relay → Asterisk.
    pub rtt: LatencySummary,
}

/// The simulator's report.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    /// Calls originated.
    pub calls: u32,
    /// Calls answered.
    pub answered: u64,
    /// Calls bridged with RTP flowing.
    pub bridged: u64,
    /// Calls the application hung up before their time.
    pub hung_up_by_app: u64,
    /// Packets sent, all calls.
    pub sent: u64,
    /// Packets back, all calls.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// `lost / sent`.
    pub loss_ratio: f64,
    /// Duplicates back.
    pub duplicates: u64,
    /// Strict-RTP drops, all calls.
    pub strict_rtp_drops: u64,
    /// Non-RTP or foreign datagrams.
    pub malformed: u64,
    /// End-to-end round trip, all calls.
    pub rtt: LatencySummary,
    /// Call set-up as Asterisk sees it: StasisStart of the caller to both channels bridged.
    pub setup: LatencySummary,
    /// First answer attempts failed on purpose.
    pub answer_404_injected: u64,
    /// Requests failed on purpose with 500 (`--fail`), by operation.
    pub injected_failures: BTreeMap<String, u64>,
    /// Times the events WebSockets were dropped on purpose.
    pub ws_drops: u64,
    /// WebSocket connections accepted.
    pub ws_connections: u64,
    /// Channels still existing when the report was made (should be 0).
    pub channels_left: usize,
    /// Bridges still existing when the report was made (should be 0).
    pub bridges_left: usize,
    /// What the relay measured (its global statistics), with `--relay-ctl`.
    pub relay: Option<RelaySide>,
    /// End to end minus the relay's RTT, percentile by percentile: the two extra hops through
    /// the relay (an estimate), with `--relay-ctl`.
    pub added_by_relay: Option<Added>,
    /// Every call.
    pub per_call: Vec<CallReport>,
}

/// What a channel is.
#[derive(Debug)]
enum Kind {
    /// A caller: its answer attempts so far.
    Caller {
        /// Answer requests received.
        answer_attempts: u32,
    },
    /// An externalMedia channel.
    External {
        /// Where its RTP goes.
        external_host: SocketAddr,
        /// Where it sends from (bound, waiting for the bridge).
        socket: Option<UdpSocket>,
        /// Its address.
        local: SocketAddr,
        /// Stops the RTP task, which hands back its figures.
        stop: Option<oneshot::Sender<()>>,
        /// The RTP task.
        task: Option<tokio::task::JoinHandle<RtpFigures>>,
        /// The caller it was first bridged with: its RTP figures are that call's.
        caller: Option<String>,
    },
}

/// A channel.
#[derive(Debug)]
struct SimChannel {
    /// Id.
    id: String,
    /// Name.
    name: String,
    /// `Ring`, `Up`.
    state: &'static str,
    /// The Stasis application it is in.
    app: Option<String>,
    /// Its bridge.
    bridge: Option<String>,
    /// Creation time, ARI format.
    created: String,
    /// Caller or externalMedia.
    kind: Kind,
}

impl SimChannel {
    /// The channel as ARI shows it.
    fn json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "protocol_id": "",
            "caller": {"name": "", "number": "100"},
            "connected": {"name": "", "number": ""},
            "accountcode": "",
            "dialplan": {"context": "load", "exten": "s", "priority": 1,
                         "app_name": "Stasis", "app_data": self.app.clone().unwrap_or_default()},
            "creationtime": self.created,
            "language": "en",
        });
        if let Kind::External { local, .. } = &self.kind {
            v["channelvars"] = json!({
                "UNICASTRTP_LOCAL_ADDRESS": local.ip().to_string(),
                "UNICASTRTP_LOCAL_PORT": local.port().to_string(),
            });
        }
        v
    }
}

/// A bridge.
#[derive(Debug)]
struct SimBridge {
    /// Id.
    id: String,
    /// `mixing`, …
    bridge_type: String,
    /// Name.
    name: String,
    /// Members.
    channels: Vec<String>,
}

impl SimBridge {
    fn json(&self) -> Value {
        json!({
            "id": self.id, "technology": "simple_bridge", "bridge_type": self.bridge_type,
            "bridge_class": "stasis", "creator": "Stasis", "name": self.name,
            "channels": self.channels, "creationtime": now_stamp(), "video_mode": "none",
        })
    }
}

/// A caller's life as the simulator records it.
#[derive(Debug, Default)]
struct CallRecord {
    /// Answered.
    answered: bool,
    /// Its externalMedia channel's RTP started.
    bridged: bool,
    /// How it ended, once it has.
    end: Option<CallEnd>,
    /// RTP figures, once the call's externalMedia channel is gone.
    figures: RtpFigures,
    /// When the caller entered Stasis.
    originated: Option<Instant>,
    /// StasisStart to the media flowing (both channels bridged).
    setup: Option<Duration>,
}

/// Everything the simulator holds.
#[derive(Debug, Default)]
struct World {
    /// Channels by id.
    channels: HashMap<String, SimChannel>,
    /// Bridges by id.
    bridges: HashMap<String, SimBridge>,
    /// Callers by id, in origination order.
    calls: BTreeMap<u64, (String, CallRecord)>,
    /// Caller id → key in `calls`.
    call_index: HashMap<String, u64>,
    /// Random numbers (SSRCs, first sequence numbers, faults), seeded with `--seed` on first use.
    rng: Option<SplitMix64>,
}

impl World {
    /// The record of caller `id`.
    fn call_mut(&mut self, id: &str) -> Option<&mut CallRecord> {
        let key = *self.call_index.get(id)?;
        self.calls.get_mut(&key).map(|(_, rec)| rec)
    }
}

/// Shared state of the server.
#[derive(Debug)]
struct Sim {
    /// Settings.
    cfg: SimConfig,
    /// The world.
    world: Mutex<World>,
    /// Events: (application, JSON text).
    events: broadcast::Sender<(String, Arc<str>)>,
    /// Bumped to close every WebSocket.
    ws_generation: watch::Sender<u64>,
    /// Applications connected: count of WebSockets per app.
    apps: Mutex<HashMap<String, usize>>,
    /// Channel id counter.
    next_id: AtomicU64,
    /// First answers failed on purpose.
    injected_404: AtomicU64,
    /// WebSocket drops.
    ws_drops: AtomicU64,
    /// Requests failed on purpose, by operation.
    injected: Mutex<BTreeMap<String, u64>>,
    /// WebSocket connections.
    ws_connections: AtomicU64,
    /// Start of the run, for ids.
    epoch: u64,
}

fn now_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", secs.as_secs(), secs.subsec_millis())
}

/// An ARI error reply.
fn ari_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message }))).into_response()
}

impl Sim {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn emit(&self, app: &str, mut event: Value) {
        event["timestamp"] = json!(now_stamp());
        event["application"] = json!(app);
        event["asterisk_id"] = json!("00:00:00:00:00:01");
        let _ = self.events.send((app.to_owned(), event.to_string().into()));
    }

    /// A 500 reply for `op` when `--fail` says this request fails.
    fn inject(&self, op: &str) -> Option<Response> {
        let p = self
            .cfg
            .fail
            .iter()
            .find(|(o, _)| o == op)
            .map_or(0.0, |(_, p)| *p);
        if p <= 0.0 {
            return None;
        }
        let roll = self
            .world()
            .rng
            .get_or_insert_with(|| SplitMix64::new(self.cfg.seed))
            .unit();
        if roll >= p {
            return None;
        }
        *self
            .injected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(op.to_owned())
            .or_default() += 1;
        Some(ari_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error (injected by --fail)",
        ))
    }

    fn authorised(&self, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
        let pair = format!("{}:{}", self.cfg.user, self.cfg.pass);
        if query.get("api_key") == Some(&pair) {
            return true;
        }
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Basic "))
            .is_some_and(|b| b.trim() == base64(pair.as_bytes()))
    }

    fn new_id(&self) -> String {
        format!(
            "{}.{}",
            self.epoch,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Creates a caller channel in `app` and announces it.
    fn originate(&self, app: &str, id: Option<String>) -> Result<Value, Box<Response>> {
        let id = id.unwrap_or_else(|| self.new_id());
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ch = SimChannel {
            id: id.clone(),
            name: format!("PJSIP/load-{n:08x}"),
            state: "Ring",
            app: Some(app.to_owned()),
            bridge: None,
            created: now_stamp(),
            kind: Kind::Caller { answer_attempts: 0 },
        };
        let v = ch.json();
        {
            let mut w = self.world();
            if w.channels.contains_key(&id) {
                return Err(Box::new(ari_error(
                    StatusCode::CONFLICT,
                    "Channel with given unique ID already exists",
                )));
            }
            w.channels.insert(id.clone(), ch);
            let key = w.calls.len() as u64;
            let rec = CallRecord {
                originated: Some(Instant::now()),
                ..CallRecord::default()
            };
            w.calls.insert(key, (id.clone(), rec));
            w.call_index.insert(id, key);
        }
        self.emit(
            app,
            json!({"type": "StasisStart", "args": [], "channel": v}),
        );
        Ok(v)
    }

    /// Hangs a channel up: stops its RTP (waiting for the figures), takes it out of its bridge,
    /// sends StasisEnd and ChannelDestroyed. `by_app` marks a caller as hung up by the application.
    async fn hangup(&self, id: &str, by_app: bool) -> bool {
        self.stop_media(id).await;
        let removed = {
            let mut w = self.world();
            let Some(ch) = w.channels.remove(id) else {
                return false;
            };
            if let Some(b) = ch.bridge.as_ref().and_then(|b| w.bridges.get_mut(b)) {
                b.channels.retain(|c| c != id);
            }
            if matches!(ch.kind, Kind::Caller { .. }) {
                if let Some(rec) = w.call_mut(id) {
                    if rec.end.is_none() {
                        rec.end = Some(if by_app {
                            CallEnd::HungUpByApp
                        } else {
                            CallEnd::Completed
                        });
                    }
                }
            }
            ch
        };
        let v = removed.json();
        if let Some(app) = &removed.app {
            self.emit(app, json!({"type": "StasisEnd", "channel": v}));
            self.emit(
                app,
                json!({"type": "ChannelDestroyed", "cause": 16, "cause_txt": "Normal Clearing", "channel": v}),
            );
        }
        true
    }

    /// Stops a channel's RTP if it sends any (keeping the channel), waits for its last packets,
    /// and files its figures under the call it was bridged with.
    async fn stop_media(&self, id: &str) {
        let (stop, task, caller) = {
            let mut w = self.world();
            match w.channels.get_mut(id) {
                Some(SimChannel {
                    kind:
                        Kind::External {
                            stop, task, caller, ..
                        },
                    ..
                }) => (stop.take(), task.take(), caller.clone()),
                _ => return,
            }
        };
        let (Some(stop), Some(task)) = (stop, task) else {
            return;
        };
        let _ = stop.send(());
        let figures = task.await.unwrap_or_default();
        if let Some(caller) = caller {
            if let Some(rec) = self.world().call_mut(&caller) {
                rec.figures.merge(&figures);
            }
        }
    }

    /// Starts the RTP of every externalMedia channel in `bridge` that shares it with another
    /// channel and is not sending yet.
    fn start_media(self: &Arc<Self>, bridge: &str) {
        let mut w = self.world();
        let members: Vec<String> = w
            .bridges
            .get(bridge)
            .map(|b| b.channels.clone())
            .unwrap_or_default();
        if members.len() < 2 {
            return;
        }
        let seed = w
            .rng
            .get_or_insert_with(|| SplitMix64::new(self.cfg.seed))
            .next_u64();
        let caller = members
            .iter()
            .find(|m| {
                w.channels
                    .get(*m)
                    .is_some_and(|c| matches!(c.kind, Kind::Caller { .. }))
            })
            .cloned();
        if let Some(rec) = caller.as_deref().and_then(|c| w.call_mut(c)) {
            rec.bridged = true;
            rec.setup = rec.setup.or_else(|| rec.originated.map(|t| t.elapsed()));
        }
        for m in members {
            if let Some(SimChannel {
                kind:
                    Kind::External {
                        external_host,
                        socket,
                        stop,
                        task,
                        caller: owner,
                        ..
                    },
                ..
            }) = w.channels.get_mut(&m)
            {
                if let Some(sock) = socket.take() {
                    owner.clone_from(&caller);
                    let (tx, rx) = oneshot::channel();
                    *stop = Some(tx);
                    *task = Some(tokio::spawn(rtp_stream(sock, *external_host, seed, rx)));
                }
            }
        }
    }
}

/// Standard base64 (for comparing a basic-auth header).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One externalMedia channel's RTP figures.
#[derive(Debug)]
struct RtpFigures {
    sent: u64,
    received: u64,
    duplicates: u64,
    strict_drops: u64,
    malformed: u64,
    rtt: LatencyHistogram<u64>,
}

impl Default for RtpFigures {
    fn default() -> Self {
        Self {
            sent: 0,
            received: 0,
            duplicates: 0,
            strict_drops: 0,
            malformed: 0,
            rtt: LatencyHistogram::new(3),
        }
    }
}

impl RtpFigures {
    fn merge(&mut self, o: &Self) {
        self.sent += o.sent;
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.strict_drops += o.strict_drops;
        self.malformed += o.malformed;
        self.rtt.merge(&o.rtt);
    }
}

/// Sends 50 packets a second from `sock` to `to` until stopped, then waits up to [`DRAIN`] for
/// the last ones; measures what comes back.
async fn rtp_stream(
    sock: UdpSocket,
    to: SocketAddr,
    seed: u64,
    mut stop: oneshot::Receiver<()>,
) -> RtpFigures {
    let mut rng = SplitMix64::new(seed);
    let ssrc = Ssrc(rng.next_u32());
    #[allow(clippy::cast_possible_truncation)] // 16 random bits
    let first_seq = rng.next_u32() as u16;
    let mut f = RtpFigures::default();
    // Send time of each sequence number in flight (1,024 covers 20 s of 50/s).
    let mut t0: Vec<Option<(u16, Instant)>> = vec![None; 1024];
    let mut packet = [0u8; PACKET_LEN];
    let mut buf = [0u8; 2048];
    let mut tick = tokio::time::interval(Duration::from_secs(1) / PACKETS_PER_SECOND);
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut n: u32 = 0;
    loop {
        let drain_end =
            stopping.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = tick.tick(), if stopping.is_none() => {
                #[allow(clippy::cast_possible_truncation)] // sequence numbers wrap
                let seq = first_seq.wrapping_add(n as u16);
                let header = RtpHeader {
                    marker: n == 0,
                    payload_type: 0,
                    sequence: seq,
                    timestamp: 160u32.wrapping_add(n.wrapping_mul(160)),
                    ssrc,
                };
                let _ = header.write(&mut packet);
                packet[12..].fill(0xff);
                if sock.send_to(&packet, to).await.is_ok() {
                    f.sent += 1;
                    t0[usize::from(seq) % 1024] = Some((seq, Instant::now()));
                }
                n = n.wrapping_add(1);
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((len, from)) = r else { continue };
                if from != to {
                    f.strict_drops += 1;
                    continue;
                }
                match buf.get(..len).map(parse_rtp) {
                    Some(Ok(p)) if p.ssrc == ssrc => {
                        let slot = &mut t0[usize::from(p.sequence) % 1024];
                        match *slot {
                            Some((s, at)) if s == p.sequence => {
                                f.rtt.record(u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX));
                                f.received += 1;
                                *slot = None;
                            }
                            _ => f.duplicates += 1,
                        }
                    }
                    _ => f.malformed += 1,
                }
                if stopping.is_some() && f.received + f.duplicates >= f.sent {
                    break;
                }
            }
            _ = &mut stop, if stopping.is_none() => {
                if f.received >= f.sent {
                    break;
                }
                stopping = Some(tokio::time::Instant::now() + DRAIN);
            }
            () = tokio::time::sleep_until(drain_end), if stopping.is_some() => break,
        }
    }
    f
}

type Q = Query<HashMap<String, String>>;

/// Router for the ARI endpoints.
fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/ari/events", get(events))
        .route("/ari/asterisk/info", get(info))
        .route("/ari/channels", get(list_channels).post(originate))
        .route("/ari/channels/externalMedia", post(external_media))
        .route(
            "/ari/channels/{id}",
            get(get_channel).delete(delete_channel),
        )
        .route("/ari/channels/{id}/answer", post(answer))
        .route("/ari/bridges", get(list_bridges).post(create_bridge))
        .route(
            "/ari/bridges/{id}",
            get(get_bridge)
                .post(create_bridge_with_id)
                .delete(delete_bridge),
        )
        .route("/ari/bridges/{id}/addChannel", post(add_channel))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&sim), gate))
        .with_state(sim)
}

/// In front of every request: authentication (401 without valid credentials), then the
/// `--latency` hold for REST requests (not the events WebSocket).
async fn gate(
    State(sim): State<Arc<Sim>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let query = Query::<HashMap<String, String>>::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .unwrap_or_default();
    if !sim.authorised(req.headers(), &query) {
        return ari_error(StatusCode::UNAUTHORIZED, "Authentication required");
    }
    if !sim.cfg.latency.is_zero() && req.uri().path() != "/ari/events" {
        tokio::time::sleep(sim.cfg.latency).await;
    }
    next.run(req).await
}

async fn info() -> Response {
    Json(json!({"system": {"version": "22.0.0-sim", "entity_id": "00:00:00:00:00:01"}}))
        .into_response()
}

async fn events(State(sim): State<Arc<Sim>>, Query(q): Q, ws: WebSocketUpgrade) -> Response {
    let Some(app) = q.get("app").filter(|a| !a.is_empty()).cloned() else {
        return ari_error(StatusCode::BAD_REQUEST, "Missing parameter app");
    };
    ws.on_upgrade(move |socket| serve_events(sim, app, socket))
}

async fn serve_events(sim: Arc<Sim>, app: String, mut socket: WebSocket) {
    let mut rx = sim.events.subscribe();
    let mut generation = sim.ws_generation.subscribe();
    generation.mark_unchanged();
    sim.ws_connections.fetch_add(1, Ordering::Relaxed);
    *sim.apps
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(app.clone())
        .or_default() += 1;
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok((a, text)) if a == app => {
                    if socket.send(Message::Text(text.as_ref().into())).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                // Asterisk closes a client that cannot keep up; so does the simulator.
                Err(_) => break,
            },
            _ = generation.changed() => break,
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    if let Some(n) = sim
        .apps
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get_mut(&app)
    {
        *n = n.saturating_sub(1);
    }
    let _ = socket.send(Message::Close(None)).await;
}

async fn list_channels(State(sim): State<Arc<Sim>>) -> Response {
    let list: Vec<Value> = sim
        .world()
        .channels
        .values()
        .map(SimChannel::json)
        .collect();
    Json(list).into_response()
}

async fn get_channel(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match sim.world().channels.get(&id) {
        Some(c) => Json(c.json()).into_response(),
        None => ari_error(StatusCode::NOT_FOUND, "Channel not found"),
    }
}

async fn originate(State(sim): State<Arc<Sim>>, Query(q): Q) -> Response {
    if !q.contains_key("endpoint") {
        return ari_error(StatusCode::BAD_REQUEST, "Endpoint must be specified");
    }
    let Some(app) = q.get("app") else {
        return ari_error(
            StatusCode::BAD_REQUEST,
            "Application or extension must be specified",
        );
    };
    match sim.originate(app, q.get("channelId").cloned()) {
        Ok(v) => Json(v).into_response(),
        Err(r) => *r,
    }
}

async fn delete_channel(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    if sim.hangup(&id, true).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        ari_error(StatusCode::NOT_FOUND, "Channel not found")
    }
}

async fn answer(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    let mut w = sim.world();
    let fraction = sim.cfg.answer_404;
    let roll = w
        .rng
        .get_or_insert_with(|| SplitMix64::new(sim.cfg.seed))
        .unit();
    let Some(ch) = w.channels.get_mut(&id) else {
        return ari_error(StatusCode::NOT_FOUND, "Channel not found");
    };
    if ch.app.is_none() {
        return ari_error(StatusCode::CONFLICT, "Channel not in Stasis application");
    }
    if let Kind::Caller { answer_attempts } = &mut ch.kind {
        *answer_attempts += 1;
        if *answer_attempts == 1 && roll < fraction {
            sim.injected_404.fetch_add(1, Ordering::Relaxed);
            return ari_error(StatusCode::NOT_FOUND, "Channel not found");
        }
    }
    ch.state = "Up";
    if let Some(rec) = w.call_mut(&id) {
        rec.answered = true;
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn external_media(State(sim): State<Arc<Sim>>, Query(q): Q) -> Response {
    if let Some(r) = sim.inject("external_media") {
        return r;
    }
    let (Some(app), Some(host), Some(format)) =
        (q.get("app"), q.get("external_host"), q.get("format"))
    else {
        return ari_error(
            StatusCode::BAD_REQUEST,
            "app, external_host and format are required",
        );
    };
    let Ok(external_host) = host.parse::<SocketAddr>() else {
        return ari_error(StatusCode::BAD_REQUEST, "external_host must be host:port");
    };
    if format != "ulaw" {
        return ari_error(StatusCode::BAD_REQUEST, "the simulator plays ulaw only");
    }
    for (k, v) in [
        ("encapsulation", "rtp"),
        ("transport", "udp"),
        ("connection_type", "client"),
        ("direction", "both"),
    ] {
        if q.get(k).is_some_and(|x| x != v) {
            return ari_error(
                StatusCode::BAD_REQUEST,
                &format!("the simulator supports {k}={v} only"),
            );
        }
    }
    let sock = match UdpSocket::bind((sim.cfg.rtp_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            return ari_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("RTP socket: {e}"),
            )
        }
    };
    let Ok(local) = sock.local_addr() else {
        return ari_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "RTP socket has no address",
        );
    };
    let id = q.get("channelId").cloned().unwrap_or_else(|| sim.new_id());
    let n = sim.next_id.fetch_add(1, Ordering::Relaxed);
    let ch = SimChannel {
        id: id.clone(),
        name: format!("UnicastRTP/{external_host}-{n:08x}"),
        state: "Up",
        // Not in Stasis until its StasisStart: addChannel before that answers 422, as Asterisk does.
        app: None,
        bridge: None,
        created: now_stamp(),
        kind: Kind::External {
            external_host,
            socket: Some(sock),
            local,
            stop: None,
            task: None,
            caller: None,
        },
    };
    let v = ch.json();
    let reply_delay = {
        let mut w = sim.world();
        if w.channels.contains_key(&id) {
            return ari_error(
                StatusCode::CONFLICT,
                "Channel with given unique ID already exists",
            );
        }
        w.channels.insert(id.clone(), ch);
        w.rng
            .get_or_insert_with(|| SplitMix64::new(sim.cfg.seed))
            .below(3_000)
    };
    // The channel enters Stasis on its own, about 1 ms later (--stasis-delay), racing the reply.
    let (sim2, app2, id2) = (Arc::clone(&sim), app.clone(), id.clone());
    tokio::spawn(async move {
        tokio::time::sleep(sim2.cfg.stasis_delay).await;
        let entered = {
            let mut w = sim2.world();
            w.channels.get_mut(&id2).map(|c| {
                c.app = Some(app2.clone());
                c.json()
            })
        };
        if let Some(v) = entered {
            sim2.emit(
                &app2,
                json!({"type": "StasisStart", "args": [], "channel": v}),
            );
        }
    });
    tokio::time::sleep(Duration::from_micros(reply_delay)).await;
    Json(v).into_response()
}

async fn list_bridges(State(sim): State<Arc<Sim>>) -> Response {
    let list: Vec<Value> = sim.world().bridges.values().map(SimBridge::json).collect();
    Json(list).into_response()
}

async fn get_bridge(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match sim.world().bridges.get(&id) {
        Some(b) => Json(b.json()).into_response(),
        None => ari_error(StatusCode::NOT_FOUND, "Bridge not found"),
    }
}

fn make_bridge(sim: &Sim, id: String, q: &HashMap<String, String>) -> Response {
    let bridge = SimBridge {
        id: id.clone(),
        bridge_type: q.get("type").cloned().unwrap_or_else(|| "mixing".into()),
        name: q.get("name").cloned().unwrap_or_default(),
        channels: Vec::new(),
    };
    let v = bridge.json();
    let mut w = sim.world();
    if w.bridges.contains_key(&id) {
        return ari_error(StatusCode::CONFLICT, "Bridge with given id already exists");
    }
    w.bridges.insert(id, bridge);
    Json(v).into_response()
}

async fn create_bridge(State(sim): State<Arc<Sim>>, Query(q): Q) -> Response {
    if let Some(r) = sim.inject("create_bridge") {
        return r;
    }
    let id = q.get("bridgeId").cloned().unwrap_or_else(|| sim.new_id());
    make_bridge(&sim, id, &q)
}

async fn create_bridge_with_id(
    State(sim): State<Arc<Sim>>,
    Query(q): Q,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = sim.inject("create_bridge") {
        return r;
    }
    make_bridge(&sim, id, &q)
}

async fn delete_bridge(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    let mut w = sim.world();
    let Some(b) = w.bridges.remove(&id) else {
        return ari_error(StatusCode::NOT_FOUND, "Bridge not found");
    };
    for c in b.channels {
        if let Some(ch) = w.channels.get_mut(&c) {
            ch.bridge = None;
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn add_channel(State(sim): State<Arc<Sim>>, Query(q): Q, Path(id): Path<String>) -> Response {
    if let Some(r) = sim.inject("add_channel") {
        return r;
    }
    let Some(list) = q.get("channel") else {
        return ari_error(StatusCode::BAD_REQUEST, "Missing parameter channel");
    };
    let wanted: Vec<String> = list.split(',').map(str::to_owned).collect();
    {
        let mut w = sim.world();
        if !w.bridges.contains_key(&id) {
            return ari_error(StatusCode::NOT_FOUND, "Bridge not found");
        }
        for c in &wanted {
            match w.channels.get(c) {
                None => return ari_error(StatusCode::BAD_REQUEST, "Channel not found"),
                Some(ch) if ch.app.is_none() => {
                    return ari_error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Channel not in Stasis application",
                    )
                }
                Some(ch) if ch.bridge.as_ref().is_some_and(|b| *b != id) => {
                    return ari_error(StatusCode::CONFLICT, "Channel is already bridged")
                }
                Some(_) => {}
            }
        }
        for c in &wanted {
            if let Some(ch) = w.channels.get_mut(c) {
                ch.bridge = Some(id.clone());
            }
            if let Some(b) = w.bridges.get_mut(&id) {
                if !b.channels.contains(c) {
                    b.channels.push(c.clone());
                }
            }
        }
    }
    sim.start_media(&id);
    StatusCode::NO_CONTENT.into_response()
}

/// Runs the simulator: serves ARI, originates the calls, and returns the report.
///
/// # Errors
/// The listen address cannot be bound.
pub async fn run(cfg: SimConfig) -> anyhow::Result<SimReport> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
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
        cfg,
    });
    let server = tokio::spawn(axum::serve(listener, router(Arc::clone(&sim))).into_future());
    tracing::info!("sim-asterisk ready listen={addr} app={}", sim.cfg.app);
    let cfg = sim.cfg.clone();
    let mut relay_cpu_start = cfg.relay_pid.and_then(process_cpu_ns);

    if cfg.calls == 0 {
        match cfg.serve_for {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    } else {
        // Asterisk refuses Stasis() for an application nobody is connected to: wait for it.
        let connected = || {
            sim.apps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&cfg.app)
                .is_some_and(|&n| n > 0)
        };
        let deadline = Instant::now() + cfg.wait_app;
        while !connected() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "application {:?} did not connect to /ari/events within {:?}",
                cfg.app,
                cfg.wait_app
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let start = tokio::time::Instant::now();
        relay_cpu_start = cfg.relay_pid.and_then(process_cpu_ns);
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
            if let Err(e) = sim.originate(&cfg.app, Some(id.clone())) {
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
        .and_then(process_cpu_ns)
        .zip(relay_cpu_start)
        .map(|(end, start)| end.saturating_sub(start));
    let global = match cfg.relay_ctl.clone() {
        Some(path) => tokio::task::spawn_blocking(move || {
            crate::ctl::RelayClient::connect(&path).and_then(|mut c| c.global())
        })
        .await?
        .map_err(|e| tracing::warn!("no relay statistics: {e:#}"))
        .ok(),
        None => None,
    };
    let mut r = report(&sim);
    r.added_by_relay = global.as_ref().map(|g| Added::between(&r.rtt, &g.rtt));
    r.relay = global.map(|g| {
        let mut side = RelaySide::from_global_totals(&g);
        side.set_cpu(relay_cpu);
        side
    });
    Ok(r)
}

/// CPU time of process `pid` so far, in nanoseconds.
fn process_cpu_ns(pid: u32) -> Option<u64> {
    relay::cpu_time_ns(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

fn report(sim: &Sim) -> SimReport {
    let w = sim.world();
    let mut all = LatencyHistogram::<u64>::new(3);
    let mut per_call = Vec::new();
    let mut setup = LatencyHistogram::<u64>::new(3);
    for (id, rec) in w.calls.values() {
        if let Some(d) = rec.setup {
            setup.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        }
        let f = &rec.figures;
        all.merge(&f.rtt);
        per_call.push(CallReport {
            id: id.clone(),
            answered: rec.answered,
            bridged: rec.bridged,
            end: rec.end.unwrap_or(CallEnd::Active),
            sent: f.sent,
            received: f.received,
            lost: f.sent.saturating_sub(f.received),
            duplicates: f.duplicates,
            strict_rtp_drops: f.strict_drops,
            malformed: f.malformed,
            rtt: f.rtt.summary(),
        });
    }
    let sum = |g: fn(&CallReport) -> u64| per_call.iter().map(g).sum::<u64>();
    let (sent, received) = (sum(|c| c.sent), sum(|c| c.received));
    let lost = sent.saturating_sub(received);
    #[allow(clippy::cast_precision_loss)] // a ratio
    let loss_ratio = if sent == 0 {
        0.0
    } else {
        lost as f64 / sent as f64
    };
    SimReport {
        calls: u32::try_from(per_call.len()).unwrap_or(u32::MAX),
        answered: sum(|c| u64::from(c.answered)),
        bridged: sum(|c| u64::from(c.bridged)),
        hung_up_by_app: sum(|c| u64::from(c.end == CallEnd::HungUpByApp)),
        sent,
        received,
        lost,
        loss_ratio,
        duplicates: sum(|c| c.duplicates),
        strict_rtp_drops: sum(|c| c.strict_rtp_drops),
        malformed: sum(|c| c.malformed),
        rtt: all.summary(),
        setup: setup.summary(),
        answer_404_injected: sim.injected_404.load(Ordering::Relaxed),
        injected_failures: sim
            .injected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
        ws_drops: sim.ws_drops.load(Ordering::Relaxed),
        ws_connections: sim.ws_connections.load(Ordering::Relaxed),
        channels_left: w.channels.len(),
        bridges_left: w.bridges.len(),
        relay: None,
        added_by_relay: None,
        per_call,
    }
}

/// The report as text.
#[must_use]
pub fn render(r: &SimReport) -> String {
    use std::fmt::Write as _;
    let ms = |ns: u64| ns as f64 / 1e6;
    let row = |name: &str, s: &LatencySummary| {
        format!(
            "  {name:<31} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}  ({} samples)\n",
            ms(s.p50_ns),
            ms(s.p95_ns),
            ms(s.p99_ns),
            ms(s.p999_ns),
            ms(s.max_ns),
            s.count
        )
    };
    let mut out = format!(
        "rtp-relay pipeline report (sim-asterisk -> control -> relay -> echo)\n\
         calls: {} originated, {} answered, {} bridged, {} hung up by control\n\
         RTP at Asterisk: sent {} returned {} lost {} ({:.4} %), duplicates {}, strict-RTP drops {}, malformed {}\n\
         faults: {} answers failed with 404, {} WebSocket drops ({} connections), failed on purpose {:?}\n\
         left over: {} channels, {} bridges\n\
         latency (ms){:>30}{:>9}{:>9}{:>9}{:>9}\n",
        r.calls,
        r.answered,
        r.bridged,
        r.hung_up_by_app,
        r.sent,
        r.received,
        r.lost,
        r.loss_ratio * 100.0,
        r.duplicates,
        r.strict_rtp_drops,
        r.malformed,
        r.answer_404_injected,
        r.ws_drops,
        r.ws_connections,
        r.injected_failures,
        r.channels_left,
        r.bridges_left,
        "p50",
        "p95",
        "p99",
        "p99.9",
        "max",
    );
    out.push_str(&row("call set-up (StasisStart..RTP)", &r.setup));
    out.push_str(&row("end to end (at Asterisk)", &r.rtt));
    if let (Some(v), Some(added)) = (&r.relay, &r.added_by_relay) {
        out.push_str(&row("relay RTT (T1 - T0)", &v.rtt));
        let _ = writeln!(
            out,
            "  {:<31} {:>8.3} {:>17.3}",
            "added by the relay",
            ms(added.p50_ns),
            ms(added.p99_ns)
        );
        out.push_str(&row("relay forward to echo", &v.forward.to_echo));
        out.push_str(&row("relay forward to Asterisk", &v.forward.to_asterisk));
        let _ = write!(
            out,
            "relay: forwarded {}, measured {}, lost {}, echo timeouts {}, drops {} (unknown source {})",
            v.forwarded, v.measured, v.lost, v.echo_timeouts, v.drops, v.unknown_source_drops
        );
        if let Some(c) = v.cpu_ns_per_packet {
            let _ = write!(out, ", CPU {c:.0} ns per forwarded packet");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("asterisk:secret", "YXN0ZXJpc2s6c2VjcmV0"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
    }
}
