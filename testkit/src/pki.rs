//! Certificates for tests of the mutual-TLS control link: a CA, certificates it signs for a
//! relay (server) and for control (client), and a second, unrelated CA with a client
//! certificate of its own, all written as PEM files into a directory the test owns.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// The files a test's TLS set-up uses.
#[derive(Clone, Debug)]
pub struct Pki {
    /// The CA both ends trust.
    pub ca: PathBuf,
    /// The relay's server certificate, for `localhost`, 127.0.0.1 and the `hosts` given.
    pub relay: Pair,
    /// control's client certificate.
    pub control: Pair,
    /// Another CA, which neither end trusts.
    pub other_ca: PathBuf,
    /// A client certificate that other CA signed.
    pub stranger: Pair,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(p, KeyPair::generate().expect("a key")).expect("a CA")
}

fn leaf(
    dir: &Path,
    name: &str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> Pair {
    let mut p = CertificateParams::new(sans).expect("leaf parameters");
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("a key");
    let cert = p.signed_by(&key, issuer).expect("a signed certificate");
    let pair = Pair {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&pair.cert, cert.pem()).expect("writing a certificate");
    std::fs::write(&pair.key, key.serialize_pem()).expect("writing a key");
    pair
}

impl Pki {
    /// Makes every file in `dir`; the relay's certificate also names `hosts` (addresses or DNS
    /// names).
    ///
    /// # Panics
    /// The certificates cannot be made or written (a broken test set-up).
    #[must_use]
    pub fn new(dir: &Path, hosts: &[&str]) -> Self {
        let authority = ca("rtp-relay test CA");
        let other = ca("another CA");
        let write = |name: &str, issuer: &CertifiedIssuer<'static, KeyPair>| {
            let path = dir.join(name);
            std::fs::write(&path, issuer.pem()).expect("writing a CA certificate");
            path
        };
        let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        sans.extend(hosts.iter().map(|h| (*h).to_owned()));
        Self {
            ca: write("ca.pem", &authority),
            relay: leaf(
                dir,
                "relay",
                sans,
                ExtendedKeyUsagePurpose::ServerAuth,
                &authority,
            ),
            control: leaf(
                dir,
                "control",
                vec!["control".into()],
                ExtendedKeyUsagePurpose::ClientAuth,
                &authority,
            ),
            other_ca: write("other-ca.pem", &other),
            stranger: leaf(
                dir,
                "stranger",
                vec!["stranger".into()],
                ExtendedKeyUsagePurpose::ClientAuth,
                &other,
            ),
        }
    }
}
