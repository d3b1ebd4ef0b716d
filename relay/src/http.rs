//! A minimal HTTP/1.1 responder for metrics endpoints: GET only, one request per connection,
//! bounded request size and read time. Enough for Prometheus, curl and tests, with no framework.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A response: status line text (`"200 OK"`), content type, body.
pub type Page = (&'static str, &'static str, String);

/// Serves GET requests on `listener`, answering each path with `handler`, until dropped.
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Page> + Send,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = respond(stream, handler).await;
        });
    }
}

async fn respond<F, Fut>(mut stream: TcpStream, handler: F) -> std::io::Result<()>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Page>,
{
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            req.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let line = req.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let (status, ctype, body) = if method == "GET" {
        handler(path).await
    } else {
        ("405 Method Not Allowed", "text/plain", "GET only\n".into())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
