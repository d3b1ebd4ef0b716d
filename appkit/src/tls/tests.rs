//! Handshakes over an in-memory stream: the right client is served, a client without a
//! certificate or with one from another CA is refused, and bad files are named.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// Runs a handshake between `server` and `client` (for the name `localhost`) and one line each
/// way; the client's and the server's outcomes.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (std::io::Result<String>, std::io::Result<String>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let serve = async move {
        let mut s = TlsAcceptor::from(server).accept(a).await?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await?;
        s.write_all(b"pong\n").await?;
        s.flush().await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let call = async move {
        let name = server_name("localhost").map_err(std::io::Error::other)?;
        let mut c = TlsConnector::from(client).connect(name, b).await?;
        c.write_all(b"ping\n").await?;
        c.flush().await?;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let (s, c) = tokio::join!(serve, call);
    (c, s)
}

fn relay_side(pki: &testkit::pki::Pki) -> Arc<ServerConfig> {
    server_config(&pki.relay.cert, &pki.relay.key, &pki.ca).unwrap()
}

#[tokio::test]
async fn a_client_signed_by_the_ca_is_served() {
    let dir = testkit::TempDir::new("appkit-tls");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let client = client_config(&pki.ca, &pki.control.cert, &pki.control.key).unwrap();
    let (c, s) = handshake(relay_side(&pki), client).await;
    assert_eq!(c.unwrap(), "pong\n");
    assert_eq!(s.unwrap(), "ping\n");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_before_it_sends_anything() {
    let dir = testkit::TempDir::new("appkit-tls");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&pki.ca).unwrap())
        .with_no_client_auth();
    let (c, s) = handshake(relay_side(&pki), Arc::new(client)).await;
    let e = s.unwrap_err().to_string();
    assert!(e.contains("certificate"), "{e}");
    assert!(c.is_err(), "the client got {c:?}");
}

#[tokio::test]
async fn a_client_signed_by_another_ca_is_refused() {
    let dir = testkit::TempDir::new("appkit-tls");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let client = client_config(&pki.ca, &pki.stranger.cert, &pki.stranger.key).unwrap();
    let (c, s) = handshake(relay_side(&pki), client).await;
    assert!(s.is_err() && c.is_err(), "{s:?} {c:?}");
}

#[tokio::test]
async fn a_relay_signed_by_another_ca_is_refused_by_control() {
    let dir = testkit::TempDir::new("appkit-tls");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let client = client_config(&pki.other_ca, &pki.control.cert, &pki.control.key).unwrap();
    let (c, _) = handshake(relay_side(&pki), client).await;
    let e = c.unwrap_err().to_string();
    assert!(e.contains("UnknownIssuer") || e.contains("issuer"), "{e}");
}

#[test]
fn bad_files_are_named() {
    let dir = testkit::TempDir::new("appkit-tls");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let missing = dir.path().join("nope.pem");
    let e = server_config(&missing, &pki.relay.key, &pki.ca).unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    // A key file given as the certificate: no certificate in it.
    let e = server_config(&pki.relay.key, &pki.relay.key, &pki.ca).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    assert!(e.to_string().contains("relay.key"), "{e}");
    // Control's key with the relay's certificate.
    let e = server_config(&pki.relay.cert, &pki.control.key, &pki.ca).unwrap_err();
    assert!(matches!(e, TlsError::Config { .. }), "{e}");
    let e = client_config(&pki.ca, &pki.control.cert, &missing).unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    assert!(server_name("relay-1.example").is_ok() && server_name("10.0.0.1").is_ok());
    assert!(server_name("not a host").is_err());
}
