//! The events WebSocket, `/ari/events?app=…`: one JSON event per text message, for the
//! connections of that application, closed when the client lags (as Asterisk does) or when
//! `--drop-ws-at` drops every connection.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::world::{ari_error, Sim};

pub(super) async fn events(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(app) = q.get("app").filter(|a| !a.is_empty()).cloned() else {
        return ari_error(StatusCode::BAD_REQUEST, "Missing parameter app");
    };
    ws.on_upgrade(move |socket| serve_events(sim, app, socket))
}

pub(super) async fn serve_events(sim: Arc<Sim>, app: String, mut socket: WebSocket) {
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
