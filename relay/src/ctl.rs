//! The control socket: a Unix stream socket on which `control` (or a person with `socat`) sends
//! newline-delimited JSON commands, served on the control thread; and, with `--ctl-listen`, the
//! same protocol on TCP for a control on another host, behind TLS 1.3 with mutual
//! authentication ([`serve_tls`]: a client must present a certificate `--tls-client-ca`
//! signed, or it is dropped before it can send a command).
//!
//! Each connection gets a [`ControlSession`] from the core (framing, decoding, the handshake);
//! each valid request goes to the shard that owns it ([`Coordinator`]) through the shard's queue and
//! the reply comes back on a oneshot channel, so serving control never takes a lock the packet
//! path uses. Replies keep the
//! order of their requests on a connection. A client that sends garbage gets error replies and the
//! relay carries on; several clients may be connected at once.
//!
//! The socket file is created with mode 0660 and removed when the relay exits ([`SocketFile`]).
//! A file left by a relay that died is replaced; a path where a relay still answers is refused.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};

use relay_proto::control::{SessionItem, DEFAULT_MAX_LINE};
use relay_proto::{ControlSession, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use std::sync::Arc;

use crate::coordinator::Coordinator;

/// The control socket's file; removed on drop.
#[derive(Debug)]
pub struct SocketFile {
    /// The path.
    path: PathBuf,
    /// The bound listener, until the control thread takes it.
    listener: Option<std::os::unix::net::UnixListener>,
}

/// Why the control socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// A relay is already serving this path.
    #[error("another relay is already listening on {0}; stop it or choose another --ctl")]
    InUse(PathBuf),
    /// Anything else.
    #[error("cannot create the control socket {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl SocketFile {
    /// Binds the control socket at `path`, replacing a stale file, refusing a live one.
    ///
    /// # Errors
    /// [`CtlError::InUse`] when a relay answers there; [`CtlError::Io`] otherwise.
    pub fn bind(path: &Path) -> Result<Self, CtlError> {
        let io_err = |source| CtlError::Io {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            match StdUnixStream::connect(path) {
                Ok(_) => return Err(CtlError::InUse(path.to_owned())),
                Err(_) => std::fs::remove_file(path).map_err(io_err)?,
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        Ok(Self {
            path: path.to_owned(),
            listener: Some(listener),
        })
    }

    /// The listener, once (for the control thread's runtime).
    pub fn take_listener(&mut self) -> Option<std::os::unix::net::UnixListener> {
        self.listener.take()
    }

    /// The path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts control clients until the task is dropped.
pub async fn serve(listener: UnixListener, router: Arc<Coordinator>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let router = Arc::clone(&router);
                tokio::spawn(async move {
                    if let Err(e) = client(stream, &router).await {
                        tracing::debug!("control client: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a TCP client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts control clients on TCP, each behind a mutual-TLS handshake, until the task is
/// dropped. A client whose certificate the CA did not sign (or that has none) fails the
/// handshake and is dropped before it can send a command; it is logged.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Arc<Coordinator>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (router, acceptor) = (Arc::clone(&router), acceptor.clone());
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let stream = match tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, "control client refused: TLS: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "control client refused: no TLS handshake in 10 s");
                            return;
                        }
                    };
                    tracing::info!(%peer, "control client connected over TLS");
                    if let Err(e) = client(stream, &router).await {
                        tracing::debug!(%peer, "control client: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn client<S>(mut stream: S, router: &Coordinator) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut session = ControlSession::new(DEFAULT_MAX_LINE);
    if let Some(identity) = router.identity() {
        session = session.with_identity(identity.clone());
    }
    let mut items = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        session.push(buf.get(..n).unwrap_or_default(), &mut items);
        for item in items.drain(..) {
            let reply = match item {
                SessionItem::Reply(r) => r,
                SessionItem::Execute(req) => Reply {
                    id: req.id,
                    outcome: router.command(req.command).await,
                },
            };
            stream.write_all(reply.encode().as_bytes()).await?;
        }
        stream.flush().await?;
    }
}
