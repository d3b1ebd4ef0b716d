//! The HTTP server behind every binary's `/metrics`, `/stats` and `/healthz`: an axum
//! [`Router`] served connection by connection with hyper's HTTP/1.1 server, so that request
//! parsing, keep-alive and error answers are a well-kept library's, and a scrape cannot be held
//! up by a slow or hostile client:
//! - GET (and HEAD) only: anything else is answered 405 before it reaches a handler;
//! - a bounded request: headers larger than [`Limits::max_request`] are refused (431) and a
//!   request announcing a body is refused (413), nothing is buffered without bound;
//! - a read timeout: a connection that has not sent its whole request head within
//!   [`Limits::read_timeout`] is closed, so a client trickling one byte a second costs one idle
//!   task for at most that long and never a scrape's answer.
//!
//! Each connection is its own task; the accept loop never waits on a client.

use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::prom::PROMETHEUS_TEXT;

/// What one request may cost the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest time a client may take to send a request's head (line and headers).
    pub read_timeout: Duration,
    /// Largest request head accepted, in bytes (hyper's floor is 8 KiB).
    pub max_request: usize,
}

impl Default for Limits {
    /// 5 s and 16 KiB: a Prometheus scrape or a curl sends well under 1 KiB at once.
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(5),
            max_request: 16 * 1024,
        }
    }
}

/// Serves `router` on `listener` with the default [`Limits`] until the task is dropped.
pub async fn serve(listener: TcpListener, router: Router) {
    serve_with(listener, router, Limits::default()).await;
}

/// Serves `router` on `listener` with `limits` until the task is dropped.
pub async fn serve_with(listener: TcpListener, router: Router, limits: Limits) {
    let router = router.layer(axum::middleware::from_fn(get_only));
    let service = TowerToHyperService::new(router);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept: wait a little, go on.
                tracing::debug!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.read_timeout)
                .max_buf_size(limits.max_request.max(8 * 1024))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("metrics endpoint: connection ended: {e}");
            }
        });
    }
}

/// Refuses every method but GET and HEAD, and any request that carries a body.
async fn get_only(request: Request, next: Next) -> Response {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "GET only\n",
        )
            .into_response();
    }
    let headers = request.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return (StatusCode::PAYLOAD_TOO_LARGE, "a GET has no body\n").into_response();
    }
    next.run(request).await
}

/// A `200 OK` in the Prometheus text format.
#[must_use]
pub fn prometheus_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], body).into_response()
}

/// A `200 OK` with a JSON body already encoded.
#[must_use]
pub fn json_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A plain-text answer with `status`.
#[must_use]
pub fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

/// A fallback for unknown paths: 404 naming the paths there are.
pub fn not_found(paths: &'static str) -> axum::routing::MethodRouter {
    axum::routing::any(move || async move { text(StatusCode::NOT_FOUND, format!("try {paths}\n")) })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route(
                "/metrics",
                get(|| async { prometheus_text("up 1\n".into()) }),
            )
            .fallback(not_found("/metrics"));
        tokio::spawn(serve_with(listener, router, limits));
        addr
    }

    /// Sends `request` raw and reads until the server closes; the whole answer.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn answers_get_refuses_other_methods_bodies_and_oversize_heads() {
        let addr = start(Limits::default()).await;
        let ok = raw(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        assert!(
            ok.contains(PROMETHEUS_TEXT) && ok.ends_with("up 1\n"),
            "{ok}"
        );
        let post = raw(addr, b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.0 405"), "{post}");
        let body = raw(
            addr,
            b"GET /metrics HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert!(body.starts_with("HTTP/1.0 413"), "{body}");
        let missing = raw(addr, b"GET /nothing HTTP/1.0\r\n\r\n").await;
        assert!(
            missing.starts_with("HTTP/1.0 404") && missing.contains("try /metrics"),
            "{missing}"
        );
        let huge = format!(
            "GET /metrics HTTP/1.0\r\nX: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let refused = raw(addr, huge.as_bytes()).await;
        assert!(
            refused.is_empty() || refused.starts_with("HTTP/1.1 431"),
            "an oversize head is refused: {refused:.80}"
        );
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_request_is_cut_off() {
        let limits = Limits {
            read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let addr = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metr").await.unwrap();
        let t = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the server closed the connection");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "closed after {waited:?}"
        );
    }
}
