//! Mutual TLS for the control link to a relay on another host: the relay's server side and
//! control's client side, built from PEM files, so that both ends check the other against a CA
//! the operator runs and nothing else.
//!
//! TLS 1.3 only, with rustls and its `ring` provider (the one the workspace already uses for
//! HTTPS). The relay requires a client certificate signed by `--tls-client-ca`: a client without
//! one fails the handshake, before it can send any command. control checks the relay's
//! certificate against `--relay-ca` for the host name of the relay's URL, and presents its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why a TLS configuration could not be built; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read as PEM.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{}: no certificate in it", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate was refused as a trust anchor.
    #[error("{}: not a usable CA certificate: {source}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// rustls refused the combination (a key that does not match its certificate, say).
    #[error("{what}: {source}")]
    Config {
        /// The certificate and key, or the CA.
        what: String,
        /// Why.
        source: rustls::Error,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in `path` (a chain: the leaf first).
///
/// # Errors
/// The file cannot be read, is not PEM, or holds no certificate.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The private key in `path` (PKCS#8, PKCS#1 or SEC1).
///
/// # Errors
/// The file cannot be read or holds no key.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        source,
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: ca.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// The relay's side: its certificate chain and key, and the CA a client's certificate must be
/// signed by.
///
/// # Errors
/// A file is unreadable or unusable, or the key does not match the certificate.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca)?), provider())
            .build()
            .map_err(|e| TlsError::Config {
                what: format!("client CA {}", client_ca.display()),
                source: rustls::Error::General(e.to_string()),
            })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            what: "TLS 1.3".into(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(cert)?, private_key(key)?)
        .map_err(|source| TlsError::Config {
            what: format!("{} with {}", cert.display(), key.display()),
            source,
        })?;
    Ok(Arc::new(config))
}

/// control's side: the CA the relays' certificates are signed by, and control's own
/// certificate chain and key.
///
/// # Errors
/// A file is unreadable or unusable, or the key does not match the certificate.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            what: "TLS 1.3".into(),
            source,
        })?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certificates(cert)?, private_key(key)?)
        .map_err(|source| TlsError::Config {
            what: format!("{} with {}", cert.display(), key.display()),
            source,
        })?;
    Ok(Arc::new(config))
}

/// The name a relay's certificate must carry, from the host of its URL (a DNS name or an IP
/// address).
///
/// # Errors
/// The host is neither.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?}: {e}"))
}

#[cfg(test)]
mod tests;
