//! The simulated Asterisk's state of the world: its channels (the simulator's own callers, the
//! halves of Local channel pairs, externalMedia channels), bridges and call records behind one
//! mutex, the events it announces, and the operations on them that more than one handler needs
//! (originate a caller or a Local pair, answer, hang up, start and stop a channel's media, and
//! give every forwarding channel its route whenever a bridge's membership changes). The REST
//! handlers ([`super::rest`]) and the events WebSocket ([`super::events`]) act through [`Sim`];
//! the report ([`super::report`]) reads it.
//!
//! A Local pair, `Local/<exten>@stasis[/n]` originated into application `app`, is two channels,
//! `Local/<exten>@stasis-XXXXXXXX;1` (the originated one, `channelId`) and `…;2`
//! (`otherChannelId`). The `;2` half runs the dialplan line `exten => <exten>,1,Stasis(${EXTEN})`:
//! it enters application `<exten>` (StasisStart, state Ring) `--stasis-delay` after the
//! originate. The `;1` half enters `app` only once `;2` is answered (both are Up then), as any
//! channel originated into an application does once its far side answers; until then it is
//! Down and not in Stasis (addChannel answers 422, answer 409). Hanging up either half hangs up
//! both: StasisEnd and ChannelDestroyed of each in its own application (a `;1` that never
//! entered gets ChannelDestroyed only, in `app`). Their channel JSON carries their dialplan:
//! context `stasis`, the extension, `app_name` Stasis, `app_data` the application (`<exten>`
//! for `;2`, `app` for `;1`), so control's reconcile adopts a `;2` of its application and
//! nothing else.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use relay_proto::rng::SplitMix64;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use super::bridge::{Bridges, Forwarding, Route, Side, MAX_HOPS};
use super::media::{RtpFigures, Running, TimingSource};
use super::SimConfig;

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

/// What a channel is.
#[derive(Debug)]
pub(super) enum Kind {
    /// A caller: its answer attempts so far.
    Caller {
        /// Answer requests received.
        answer_attempts: u32,
        /// `CHANNEL(audionativeformat)` as Asterisk answers it, without the parentheses:
        /// `slin192` for a Local channel originated without `formats` (as Asterisk 22 does),
        /// the `formats` asked for otherwise (`ulaw|alaw`), `ulaw` for the simulator's own
        /// SIP-like callers.
        native: String,
    },
    /// An externalMedia channel.
    External {
        /// Where its RTP goes.
        external_host: SocketAddr,
        /// Where it sends from (bound, waiting for the bridge).
        socket: Option<UdpSocket>,
        /// Its address.
        local: SocketAddr,
        /// Its media, once started: stopping it hands back its figures.
        media: Option<Running>,
        /// The caller it was first bridged with: its RTP figures are that call's.
        caller: Option<String>,
        /// Its media format (`ulaw` or `alaw`).
        format: String,
        /// Bridged with a Local half rather than a caller: it forwards ([`super::bridge`]).
        forward: Option<Forwarding>,
    },
    /// A half of a Local channel pair originated into the `stasis` context.
    Local {
        /// The other half's id.
        peer: String,
        /// 1 (the originated half) or 2 (the half running the dialplan).
        half: u8,
        /// `;1`: the application it was originated into (it enters it once `;2` is answered).
        owner: Option<String>,
        /// The dialplan extension: the application `;2` enters.
        exten: String,
        /// The dialplan context ([`super::STASIS_CONTEXT`]).
        context: String,
        /// `CHANNEL(audionativeformat)` without the parentheses (the `formats` asked for).
        native: String,
    },
}

/// A channel.
#[derive(Debug)]
pub(super) struct SimChannel {
    /// Id.
    pub(super) id: String,
    /// Name.
    pub(super) name: String,
    /// `Ring`, `Up`.
    pub(super) state: &'static str,
    /// The Stasis application it is in.
    pub(super) app: Option<String>,
    /// Its bridge.
    pub(super) bridge: Option<String>,
    /// Creation time, ARI format.
    pub(super) created: String,
    /// Caller or externalMedia.
    pub(super) kind: Kind,
}

impl SimChannel {
    /// The channel as ARI shows it.
    pub(super) fn json(&self) -> Value {
        let dialplan = match &self.kind {
            Kind::Local {
                half,
                owner,
                exten,
                context,
                ..
            } => {
                let app = if *half == 1 {
                    owner.clone().unwrap_or_default()
                } else {
                    exten.clone()
                };
                json!({"context": context, "exten": exten, "priority": 1,
                       "app_name": "Stasis", "app_data": app})
            }
            _ => json!({"context": "load", "exten": "s", "priority": 1,
                        "app_name": "Stasis", "app_data": self.app.clone().unwrap_or_default()}),
        };
        let mut v = json!({
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "protocol_id": "",
            "caller": {"name": "", "number": "100"},
            "connected": {"name": "", "number": ""},
            "accountcode": "",
            "dialplan": dialplan,
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
pub(super) struct SimBridge {
    /// Id.
    pub(super) id: String,
    /// `mixing`, …
    pub(super) bridge_type: String,
    /// Name.
    pub(super) name: String,
    /// Members.
    pub(super) channels: Vec<String>,
}

impl SimBridge {
    pub(super) fn json(&self) -> Value {
        json!({
            "id": self.id, "technology": "simple_bridge", "bridge_type": self.bridge_type,
            "bridge_class": "stasis", "creator": "Stasis", "name": self.name,
            "channels": self.channels, "creationtime": now_stamp(), "video_mode": "none",
        })
    }
}

/// A caller's life as the simulator records it.
#[derive(Debug, Default)]
pub(super) struct CallRecord {
    /// Answered.
    pub(super) answered: bool,
    /// Its externalMedia channel's RTP started.
    pub(super) bridged: bool,
    /// How it ended, once it has.
    pub(super) end: Option<CallEnd>,
    /// RTP figures, once the call's externalMedia channel is gone.
    pub(super) figures: RtpFigures,
    /// When the caller entered Stasis.
    pub(super) originated: Option<Instant>,
    /// StasisStart to the media flowing (both channels bridged).
    pub(super) setup: Option<Duration>,
    /// Its externalMedia channel's format is none of the caller's native formats: Asterisk
    /// would transcode this call.
    pub(super) transcoding: bool,
}

/// Everything the simulator holds.
#[derive(Debug, Default)]
pub(super) struct World {
    /// Channels by id.
    pub(super) channels: HashMap<String, SimChannel>,
    /// Bridges by id.
    pub(super) bridges: HashMap<String, SimBridge>,
    /// Callers by id, in origination order.
    pub(super) calls: BTreeMap<u64, (String, CallRecord)>,
    /// Caller id → key in `calls`.
    pub(super) call_index: HashMap<String, u64>,
    /// Random numbers (SSRCs, first sequence numbers, faults), seeded with `--seed` on first use.
    pub(super) rng: Option<SplitMix64>,
}

impl World {
    /// The record of caller `id`.
    pub(super) fn call_mut(&mut self, id: &str) -> Option<&mut CallRecord> {
        let key = *self.call_index.get(id)?;
        self.calls.get_mut(&key).map(|(_, rec)| rec)
    }
}

/// Shared state of the server.
#[derive(Debug)]
pub(super) struct Sim {
    /// Settings.
    pub(super) cfg: SimConfig,
    /// The world.
    pub(super) world: Mutex<World>,
    /// Events: (application, JSON text).
    pub(super) events: broadcast::Sender<(String, Arc<str>)>,
    /// Bumped to close every WebSocket.
    pub(super) ws_generation: watch::Sender<u64>,
    /// Applications connected: count of WebSockets per app.
    pub(super) apps: Mutex<HashMap<String, usize>>,
    /// Channel id counter.
    pub(super) next_id: AtomicU64,
    /// First answers failed on purpose.
    pub(super) injected_404: AtomicU64,
    /// WebSocket drops.
    pub(super) ws_drops: AtomicU64,
    /// Requests failed on purpose, by operation.
    pub(super) injected: Mutex<BTreeMap<String, u64>>,
    /// WebSocket connections.
    pub(super) ws_connections: AtomicU64,
    /// Start of the run, for ids.
    pub(super) epoch: u64,
    /// The one thread that sends every channel's RTP.
    pub(super) timing: TimingSource,
    /// Media through bridges: settings, counts, the delay line.
    pub(super) bridges: Bridges,
}

pub(super) fn now_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", secs.as_secs(), secs.subsec_millis())
}

/// An ARI error reply.
pub(super) fn ari_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message }))).into_response()
}

impl Sim {
    pub(super) fn world(&self) -> MutexGuard<'_, World> {
        self.world
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn emit(&self, app: &str, mut event: Value) {
        event["timestamp"] = json!(now_stamp());
        event["application"] = json!(app);
        event["asterisk_id"] = json!("00:00:00:00:00:01");
        let _ = self.events.send((app.to_owned(), event.to_string().into()));
    }

    /// A 500 reply for `op` when `--fail` says this request fails.
    pub(super) fn inject(&self, op: &str) -> Option<Response> {
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

    pub(super) fn authorised(&self, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
        let pair = format!("{}:{}", self.cfg.user, self.cfg.pass);
        if query.get("api_key") == Some(&pair) {
            return true;
        }
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Basic "))
            .is_some_and(|b| b.trim() == base64::engine::general_purpose::STANDARD.encode(&pair))
    }

    /// Whether some events WebSocket of application `app` is connected.
    pub(super) fn connected(&self, app: &str) -> bool {
        self.apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(app)
            .is_some_and(|&n| n > 0)
    }

    pub(super) fn new_id(&self) -> String {
        format!(
            "{}.{}",
            self.epoch,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Creates a caller channel in `app` and announces it.
    pub(super) fn originate(
        &self,
        app: &str,
        id: Option<String>,
        native: &str,
    ) -> Result<Value, Box<Response>> {
        let id = id.unwrap_or_else(|| self.new_id());
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ch = SimChannel {
            id: id.clone(),
            name: format!("PJSIP/load-{n:08x}"),
            state: "Ring",
            app: Some(app.to_owned()),
            bridge: None,
            created: now_stamp(),
            kind: Kind::Caller {
                answer_attempts: 0,
                native: native.to_owned(),
            },
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
    /// A half of a Local pair takes its peer with it.
    pub(super) async fn hangup(&self, id: &str, by_app: bool) -> bool {
        self.stop_media(id).await;
        let removed = {
            let mut w = self.world();
            let Some(ch) = w.channels.remove(id) else {
                return false;
            };
            let mut gone = vec![ch];
            if let Kind::Local { peer, .. } = &gone[0].kind {
                if let Some(p) = w.channels.remove(peer) {
                    gone.push(p);
                }
            }
            for ch in &gone {
                if let Some(b) = ch.bridge.as_ref().and_then(|b| w.bridges.get_mut(b)) {
                    b.channels.retain(|c| *c != ch.id);
                }
                if matches!(ch.kind, Kind::Caller { .. }) {
                    if let Some(rec) = w.call_mut(&ch.id) {
                        if rec.end.is_none() {
                            rec.end = Some(if by_app {
                                CallEnd::HungUpByApp
                            } else {
                                CallEnd::Completed
                            });
                        }
                    }
                }
            }
            update_routes(&w);
            gone
        };
        for ch in removed {
            let v = ch.json();
            let destroyed = json!({"type": "ChannelDestroyed", "cause": 16,
                                   "cause_txt": "Normal Clearing", "channel": v});
            match (&ch.app, &ch.kind) {
                (Some(app), _) => {
                    self.emit(app, json!({"type": "StasisEnd", "channel": v}));
                    self.emit(app, destroyed);
                }
                // A `;1` that never entered its application: subscribed to it since the
                // originate, it hears of its end.
                (
                    None,
                    Kind::Local {
                        owner: Some(owner), ..
                    },
                ) => self.emit(owner, destroyed),
                (None, _) => {}
            }
        }
        true
    }

    /// Stops a channel's RTP if it sends any (keeping the channel), waits for its last packets,
    /// and files its figures under the call it was bridged with.
    /// A forwarding channel closes at once and its thread ends at its next read (returns once it
    /// has).
    pub(super) async fn stop_media(&self, id: &str) {
        let (media, caller, forwarding) = {
            let mut w = self.world();
            match w.channels.get_mut(id) {
                Some(SimChannel {
                    kind:
                        Kind::External {
                            media,
                            caller,
                            forward,
                            ..
                        },
                    ..
                }) => (
                    media.take(),
                    caller.clone(),
                    forward.as_mut().and_then(Forwarding::close),
                ),
                _ => return,
            }
        };
        if let Some(done) = forwarding {
            let _ = done.await;
        }
        let Some(media) = media else {
            return;
        };
        let figures = media.stop().await;
        if let Some(caller) = caller {
            if let Some(rec) = self.world().call_mut(&caller) {
                rec.figures.merge(&figures);
            }
        }
    }

    /// Starts the media of every externalMedia channel in `bridge` that shares it with another
    /// channel and has not started yet: RTP of its own when the bridge holds one of the
    /// simulator's callers (or no Local half), forwarding when it holds a Local half. Then gives
    /// every forwarding channel its route, the bridge's membership having changed.
    pub(super) fn start_media(self: &Arc<Self>, bridge: &str) {
        let mut w = self.world();
        self.start_media_locked(&mut w, bridge);
        update_routes(&w);
    }

    fn start_media_locked(&self, w: &mut World, bridge: &str) {
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
        let local = members.iter().any(|m| {
            w.channels
                .get(m)
                .is_some_and(|c| matches!(c.kind, Kind::Local { .. }))
        });
        let native: Option<String> = caller.as_deref().and_then(|c| match w.channels.get(c) {
            Some(SimChannel {
                kind: Kind::Caller { native, .. },
                ..
            }) => Some(native.clone()),
            _ => None,
        });
        let em_formats: Vec<String> = members
            .iter()
            .filter_map(|m| match w.channels.get(m) {
                Some(SimChannel {
                    kind: Kind::External { format, .. },
                    ..
                }) => Some(format.clone()),
                _ => None,
            })
            .collect();
        if let Some(rec) = caller.as_deref().and_then(|c| w.call_mut(c)) {
            rec.bridged = true;
            rec.setup = rec.setup.or_else(|| rec.originated.map(|t| t.elapsed()));
            rec.transcoding |= native.is_some_and(|n| {
                em_formats
                    .iter()
                    .any(|f| !n.split('|').any(|x| x == f.as_str()))
            });
        }
        let forwards = caller.is_none() && local;
        for m in members {
            // Each forwarding channel its own header; drawn only for those, so that the
            // callers' draws are what they were.
            let fwd_seed = forwards.then(|| {
                w.rng
                    .get_or_insert_with(|| SplitMix64::new(self.cfg.seed))
                    .next_u64()
            });
            if let Some(SimChannel {
                app,
                kind:
                    Kind::External {
                        external_host,
                        socket,
                        media,
                        caller: owner,
                        format,
                        forward,
                        ..
                    },
                ..
            }) = w.channels.get_mut(&m)
            {
                let Some(sock) = socket.take() else { continue };
                let payload_type = if format == "alaw" { 8 } else { 0 };
                if let Some(fwd_seed) = fwd_seed {
                    let side = if app.as_deref() == Some(self.cfg.app.as_str()) {
                        Side::TowardCaller
                    } else {
                        Side::TowardRelay
                    };
                    match Forwarding::start(
                        &self.bridges,
                        sock,
                        *external_host,
                        side,
                        (fwd_seed, payload_type),
                    ) {
                        Ok(f) => *forward = Some(f),
                        Err(e) => tracing::warn!(channel = %m, "cannot start forwarding: {e}"),
                    }
                    continue;
                }
                owner.clone_from(&caller);
                match self
                    .timing
                    .start(sock, *external_host, (seed, payload_type))
                {
                    Ok(m) => *media = Some(m),
                    Err(e) => tracing::warn!(channel = %m, "cannot start its media: {e}"),
                }
            }
        }
    }

    /// Creates a Local pair for `Local/<exten>@<context>` originated into `app` (ids `ids`:
    /// `channelId`, `otherChannelId`; generated when absent), both halves of native format
    /// `native`; `;2` enters application `exten` `--stasis-delay` later. The `;1` half as ARI
    /// answers the originate. Refused (400) when nobody is connected to application `exten`,
    /// as `Stasis()` would fail.
    pub(super) fn originate_local(
        self: &Arc<Self>,
        app: &str,
        (exten, context): (&str, &str),
        ids: (Option<String>, Option<String>),
        native: &str,
    ) -> Result<Value, Box<Response>> {
        let bad = |m: &str| Box::new(ari_error(StatusCode::BAD_REQUEST, m));
        if exten.is_empty() {
            return Err(bad("Local endpoint without an extension"));
        }
        if !self.connected(exten) {
            return Err(bad(&format!(
                "Stasis application {exten:?} is not registered: nobody is connected to \
                 /ari/events?app={exten}, so Stasis(${{EXTEN}}) in context {context:?} would fail"
            )));
        }
        let near = ids.0.unwrap_or_else(|| self.new_id());
        let far = ids.1.unwrap_or_else(|| self.new_id());
        if near == far {
            return Err(bad("channelId and otherChannelId must differ"));
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let half = |id: &str, peer: &str, half: u8| SimChannel {
            id: id.to_owned(),
            name: format!("Local/{exten}@{context}-{n:08x};{half}"),
            state: if half == 1 { "Down" } else { "Ring" },
            app: None,
            bridge: None,
            created: now_stamp(),
            kind: Kind::Local {
                peer: peer.to_owned(),
                half,
                owner: (half == 1).then(|| app.to_owned()),
                exten: exten.to_owned(),
                context: context.to_owned(),
                native: native.to_owned(),
            },
        };
        let (a, b) = (half(&near, &far, 1), half(&far, &near, 2));
        let v = a.json();
        {
            let mut w = self.world();
            if w.channels.contains_key(&near) || w.channels.contains_key(&far) {
                return Err(Box::new(ari_error(
                    StatusCode::CONFLICT,
                    "Channel with given unique ID already exists",
                )));
            }
            w.channels.insert(near, a);
            w.channels.insert(far.clone(), b);
        }
        self.bridges.local_pairs.fetch_add(1, Ordering::Relaxed);
        // `;2` runs `Stasis(${EXTEN})`.
        let (sim, exten) = (Arc::clone(self), exten.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(sim.cfg.stasis_delay).await;
            let entered = {
                let mut w = sim.world();
                w.channels
                    .get_mut(&far)
                    .filter(|c| c.app.is_none())
                    .map(|c| {
                        c.app = Some(exten.clone());
                        c.json()
                    })
            };
            if let Some(v) = entered {
                sim.emit(
                    &exten,
                    json!({"type": "StasisStart", "args": [], "channel": v}),
                );
            }
        });
        Ok(v)
    }
}

/// Gives every forwarding channel its route as the bridges now stand.
pub(super) fn update_routes(w: &World) {
    for ch in w.channels.values() {
        if let Kind::External {
            forward: Some(f), ..
        } = &ch.kind
        {
            f.set_route(route_from(w, &ch.id));
        }
    }
}

/// Where a frame read by channel `start` goes: through its two-party bridge to the other member;
/// a Local half passes it to its peer, whose bridge it crosses next; an externalMedia channel
/// that forwards sends it. Anything else ends the path.
fn route_from(w: &World, start: &str) -> Route {
    let mut cur = start;
    let mut traversals = 0;
    while traversals < MAX_HOPS {
        let Some(bridge) = w
            .channels
            .get(cur)
            .and_then(|c| c.bridge.as_deref())
            .and_then(|b| w.bridges.get(b))
        else {
            break;
        };
        let [x, y] = bridge.channels.as_slice() else {
            break;
        };
        let other = if x == cur { y } else { x };
        traversals += 1;
        match w.channels.get(other).map(|c| &c.kind) {
            Some(Kind::External {
                forward: Some(f), ..
            }) => {
                return Route {
                    traversals,
                    egress: Some(Arc::clone(&f.egress)),
                }
            }
            Some(Kind::Local { peer, .. }) => cur = peer,
            _ => break,
        }
    }
    Route {
        traversals,
        egress: None,
    }
}
