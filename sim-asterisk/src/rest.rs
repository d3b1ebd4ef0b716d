//! The ARI REST surface control and `loadgen ari` use, with Asterisk 22's URLs, JSON shapes and
//! error codes (401, 404 "Channel not found", 409, 422 "Channel not in Stasis application", 400),
//! behind one gate for authentication and `--latency`; `--fail` and `--answer-404` inject
//! failures here (`--answer-404` only on the simulator's own callers).
//!
//! `POST /channels` with an endpoint `Local/<exten>@stasis[/options]` makes a Local pair
//! ([`super::world`] describes it), honouring `channelId`, `otherChannelId` and `formats`; any
//! other endpoint (`Local/s@load`, `PJSIP/…`) is one of the simulator's callers, placed in `app`
//! at once and playing its tone once bridged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use relay_proto::rng::SplitMix64;
use serde_json::{json, Value};

use super::events::events;
use super::world::{ari_error, now_stamp, update_routes, Kind, Sim, SimBridge, SimChannel};
use super::STASIS_CONTEXT;

pub(super) type Q = Query<HashMap<String, String>>;

/// Router for the ARI endpoints.
pub(super) fn router(sim: Arc<Sim>) -> Router {
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
        .route("/ari/channels/{id}/variable", get(get_variable))
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
pub(super) async fn gate(
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

pub(super) async fn info() -> Response {
    Json(json!({"system": {"version": "22.0.0-sim", "entity_id": "00:00:00:00:00:01"}}))
        .into_response()
}

pub(super) async fn list_channels(State(sim): State<Arc<Sim>>) -> Response {
    let list: Vec<Value> = sim
        .world()
        .channels
        .values()
        .map(SimChannel::json)
        .collect();
    Json(list).into_response()
}

pub(super) async fn get_channel(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match sim.world().channels.get(&id) {
        Some(c) => Json(c.json()).into_response(),
        None => ari_error(StatusCode::NOT_FOUND, "Channel not found"),
    }
}

pub(super) async fn originate(State(sim): State<Arc<Sim>>, Query(q): Q) -> Response {
    if !q.contains_key("endpoint") {
        return ari_error(StatusCode::BAD_REQUEST, "Endpoint must be specified");
    }
    let Some(app) = q.get("app") else {
        return ari_error(
            StatusCode::BAD_REQUEST,
            "Application or extension must be specified",
        );
    };
    // Asterisk 22 gives a Local channel originated without `formats` the native format slin192
    // (what a real one answered); `formats=ulaw,alaw` gives (ulaw|alaw). Other endpoints are
    // taken as SIP phones offering ulaw.
    let endpoint = q.get("endpoint").map_or("", String::as_str);
    let native = match q.get("formats").filter(|f| !f.is_empty()) {
        Some(f) => f.split(',').map(str::trim).collect::<Vec<_>>().join("|"),
        None if endpoint.starts_with("Local/") => "slin192".to_owned(),
        None => "ulaw".to_owned(),
    };
    let result = match local_endpoint(endpoint) {
        Some((exten, context)) if context == STASIS_CONTEXT => sim.originate_local(
            app,
            (exten, context),
            (
                q.get("channelId").cloned(),
                q.get("otherChannelId").cloned(),
            ),
            &native,
        ),
        _ => sim.originate(app, q.get("channelId").cloned(), &native),
    };
    match result {
        Ok(v) => Json(v).into_response(),
        Err(r) => *r,
    }
}

/// `Local/<exten>@<context>[/options]`: (exten, context); `None` for another endpoint or a
/// Local one without a context.
pub(super) fn local_endpoint(endpoint: &str) -> Option<(&str, &str)> {
    let rest = endpoint.strip_prefix("Local/")?;
    let target = rest.split('/').next().unwrap_or(rest);
    target.split_once('@')
}

/// `GET /channels/{id}/variable?variable=NAME`: `CHANNEL(audionativeformat)` for a caller, the
/// `UNICASTRTP_LOCAL_*` variables for an externalMedia channel; 404 for an unknown channel or
/// variable, 400 without `variable`, as Asterisk answers.
pub(super) async fn get_variable(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    Query(q): Q,
) -> Response {
    let Some(name) = q.get("variable") else {
        return ari_error(StatusCode::BAD_REQUEST, "Variable name is required");
    };
    let w = sim.world();
    let Some(ch) = w.channels.get(&id) else {
        return ari_error(StatusCode::NOT_FOUND, "Channel not found");
    };
    let value = match (&ch.kind, name.as_str()) {
        (
            Kind::Caller { native, .. } | Kind::Local { native, .. },
            "CHANNEL(audionativeformat)",
        ) => Some(format!("({native})")),
        (Kind::External { format, .. }, "CHANNEL(audionativeformat)") => {
            Some(format!("({format})"))
        }
        (Kind::External { local, .. }, "UNICASTRTP_LOCAL_ADDRESS") => Some(local.ip().to_string()),
        (Kind::External { local, .. }, "UNICASTRTP_LOCAL_PORT") => Some(local.port().to_string()),
        _ => None,
    };
    match value {
        Some(v) => Json(json!({ "value": v })).into_response(),
        None => ari_error(StatusCode::NOT_FOUND, "Provided variable was not found"),
    }
}

pub(super) async fn delete_channel(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Response {
    if sim.hangup(&id, true).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        ari_error(StatusCode::NOT_FOUND, "Channel not found")
    }
}

pub(super) async fn answer(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
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
    if let Kind::Caller {
        answer_attempts, ..
    } = &mut ch.kind
    {
        *answer_attempts += 1;
        if *answer_attempts == 1 && roll < fraction {
            sim.injected_404.fetch_add(1, Ordering::Relaxed);
            return ari_error(StatusCode::NOT_FOUND, "Channel not found");
        }
    }
    ch.state = "Up";
    let peer = match &ch.kind {
        Kind::Local { peer, .. } => Some(peer.clone()),
        _ => None,
    };
    if let Some(rec) = w.call_mut(&id) {
        rec.answered = true;
    }
    // A Local half answered: its peer is Up too, and a `;1` originated into an application
    // enters it now.
    let entered = peer.and_then(|p| w.channels.get_mut(&p)).and_then(|p| {
        p.state = "Up";
        match &p.kind {
            Kind::Local {
                owner: Some(owner), ..
            } if p.app.is_none() => {
                let owner = owner.clone();
                p.app = Some(owner.clone());
                Some((owner, p.json()))
            }
            _ => None,
        }
    });
    drop(w);
    if let Some((app, v)) = entered {
        sim.emit(
            &app,
            json!({"type": "StasisStart", "args": [], "channel": v}),
        );
    }
    StatusCode::NO_CONTENT.into_response()
}

pub(super) async fn external_media(State(sim): State<Arc<Sim>>, Query(q): Q) -> Response {
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
    if format != "ulaw" && format != "alaw" {
        return ari_error(
            StatusCode::BAD_REQUEST,
            "the simulator plays ulaw and alaw only",
        );
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
    let sock = match std::net::UdpSocket::bind((sim.cfg.rtp_ip, 0)) {
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
            media: None,
            caller: None,
            format: format.clone(),
            forward: None,
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

pub(super) async fn list_bridges(State(sim): State<Arc<Sim>>) -> Response {
    let list: Vec<Value> = sim.world().bridges.values().map(SimBridge::json).collect();
    Json(list).into_response()
}

pub(super) async fn get_bridge(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match sim.world().bridges.get(&id) {
        Some(b) => Json(b.json()).into_response(),
        None => ari_error(StatusCode::NOT_FOUND, "Bridge not found"),
    }
}

pub(super) fn make_bridge(sim: &Sim, id: String, q: &HashMap<String, String>) -> Response {
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

pub(super) async fn create_bridge(State(sim): State<Arc<Sim>>, Query(q): Q) -> Response {
    if let Some(r) = sim.inject("create_bridge") {
        return r;
    }
    let id = q.get("bridgeId").cloned().unwrap_or_else(|| sim.new_id());
    make_bridge(&sim, id, &q)
}

pub(super) async fn create_bridge_with_id(
    State(sim): State<Arc<Sim>>,
    Query(q): Q,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = sim.inject("create_bridge") {
        return r;
    }
    make_bridge(&sim, id, &q)
}

pub(super) async fn delete_bridge(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    let mut w = sim.world();
    let Some(b) = w.bridges.remove(&id) else {
        return ari_error(StatusCode::NOT_FOUND, "Bridge not found");
    };
    for c in b.channels {
        if let Some(ch) = w.channels.get_mut(&c) {
            ch.bridge = None;
        }
    }
    update_routes(&w);
    StatusCode::NO_CONTENT.into_response()
}

pub(super) async fn add_channel(
    State(sim): State<Arc<Sim>>,
    Query(q): Q,
    Path(id): Path<String>,
) -> Response {
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
