//! The HTTP side: `/metrics` (the current snapshots, rendered by [`crate::metrics`]), `/stats`
//! (every channel, asked of the shards through the [`Coordinator`], which costs the data plane a
//! pass over its channels: it is for people and tests) and `/healthz`.

use std::sync::Arc;

use appkit::http;
use arc_swap::ArcSwap;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::coordinator::Coordinator;
use crate::metrics::render;
use crate::snapshot::Snapshot;

/// the shards) and `/healthz`.
pub fn router(snapshots: Arc<[Arc<ArcSwap<Snapshot>>]>, shards: Arc<Coordinator>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let snapshots = Arc::clone(&snapshots);
                async move {
                    let parts: Vec<Arc<Snapshot>> =
                        snapshots.iter().map(|s| s.load_full()).collect();
                    http::prometheus_text(render(&parts))
                }
            }),
        )
        .route(
            "/healthz",
            get(|| async { http::text(StatusCode::OK, "ok\n") }),
        )
        .route(
            "/stats",
            get(move || {
                let shards = Arc::clone(&shards);
                async move { stats_page(&shards).await }
            }),
        )
        .fallback(http::not_found("/metrics, /stats or /healthz"))
}

/// Serves [`router`] until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    snapshots: Arc<[Arc<ArcSwap<Snapshot>>]>,
    shards: Arc<Coordinator>,
) {
    http::serve(listener, router(snapshots, shards)).await;
}

async fn stats_page(shards: &Coordinator) -> Response {
    match shards.stats_doc().await {
        Ok(doc) => http::json_text(serde_json::to_string_pretty(&doc).unwrap_or_default()),
        Err(_) => http::text(StatusCode::SERVICE_UNAVAILABLE, "data plane stopped\n"),
    }
}
