//! The control protocol on TCP behind mutual TLS (`--ctl-listen`), against the real binary:
//! - a client with a certificate the CA signed says hello and is told who the relay is
//!   (`relay_id`, `advertise`, `capacity`), then adds, lists and removes a channel, while the
//!   Unix socket keeps serving without TLS;
//! - a client without a certificate, or with one another CA signed, gets no reply to anything;
//! - a client speaking another protocol version is refused, naming both versions;
//! - `--ctl-listen` without one of its TLS files, with an unreadable one, with a bad URL, a TLS
//!   file without `--ctl-listen`, and `--bind 0.0.0.0` without `--advertise`, each exit 2
//!   naming the flag.

#![allow(clippy::cast_possible_truncation)] // common's small known test values

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::RelayProc;
use relay_proto::control::PROTOCOL_VERSION;
use serde_json::Value;

/// A TLS client over a blocking TCP stream.
type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> BufReader<Tls> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = appkit::tls::server_name("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    BufReader::new(rustls::StreamOwned::new(conn, tcp))
}

/// Sends `line` and reads the reply line; an error when there is none (the relay dropped the
/// connection or the handshake failed).
fn ask(c: &mut BufReader<Tls>, line: &str) -> std::io::Result<Value> {
    c.get_mut().write_all(format!("{line}\n").as_bytes())?;
    c.get_mut().flush()?;
    let mut reply = String::new();
    if c.read_line(&mut reply)? == 0 {
        return Err(std::io::Error::other("connection closed"));
    }
    Ok(serde_json::from_str(&reply).unwrap())
}

fn hello() -> String {
    format!("{{\"id\":1,\"cmd\":\"hello\",\"version\":{PROTOCOL_VERSION}}}")
}

/// A relay with `--ctl-listen` on a port of its choosing; its TCP address.
fn start(pki: &testkit::pki::Pki, extra: &[&str]) -> (RelayProc, SocketAddr) {
    let files = [
        ("--tls-cert", &pki.relay.cert),
        ("--tls-key", &pki.relay.key),
        ("--tls-client-ca", &pki.ca),
    ];
    let mut args: Vec<String> = vec!["--ctl-listen".into(), "tcp://127.0.0.1:0".into()];
    for (flag, path) in files {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = RelayProc::start("tokio", &args);
    let line = testkit::wait_for("the ready line", Duration::from_secs(10), || {
        relay
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("relay ready"))
            .cloned()
    });
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ctl_tcp=tcp://"))
        .unwrap_or_else(|| panic!("no ctl_tcp in {line:?}"))
        .parse()
        .unwrap();
    (relay, addr)
}

#[test]
fn a_client_the_ca_signed_is_served_and_told_who_the_relay_is() {
    let dir = testkit::TempDir::new("relay-tls");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let (relay, addr) = start(
        &pki,
        &[
            "--relay-id",
            "relay-a",
            "--advertise",
            "127.0.0.2",
            "--max-channels",
            "64",
        ],
    );
    let config = appkit::tls::client_config(&pki.ca, &pki.control.cert, &pki.control.key).unwrap();
    let mut c = connect(addr, config);
    let r = ask(&mut c, &hello()).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let h = &r["result"];
    assert_eq!(h["type"], "hello");
    assert_eq!(h["version"], PROTOCOL_VERSION);
    assert_eq!(h["relay_id"], "relay-a");
    assert_eq!(h["advertise"], "127.0.0.2");
    assert_eq!(h["capacity"], 64);
    // The same protocol runs inside.
    let r = ask(
        &mut c,
        r#"{"id":2,"cmd":"add","channel":"tls-1","port":0,"echo":"127.0.0.1:9"}"#,
    )
    .unwrap();
    assert_eq!(r["result"]["type"], "added", "{r}");
    assert_eq!(r["id"], 2);
    let r = ask(&mut c, r#"{"id":3,"cmd":"list"}"#).unwrap();
    assert_eq!(r["result"]["channels"][0]["channel"], "tls-1", "{r}");
    // The Unix socket serves at the same time, without TLS, and sees the same channel.
    let mut unix = relay.client();
    let listed = unix.request(relay_proto::Command::List);
    assert!(format!("{listed:?}").contains("tls-1"), "{listed:?}");
    let r = ask(&mut c, r#"{"id":4,"cmd":"remove","channel":"tls-1"}"#).unwrap();
    assert_eq!(r["result"]["type"], "removed", "{r}");
    // Another version is refused, naming both.
    let mut c2 = connect(
        addr,
        appkit::tls::client_config(&pki.ca, &pki.control.cert, &pki.control.key).unwrap(),
    );
    let r = ask(&mut c2, r#"{"id":1,"cmd":"hello","version":1}"#).unwrap();
    assert_eq!(r["error"]["code"], "version_mismatch", "{r}");
    let m = r["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("client speaks version 1")
            && m.contains(&format!("relay speaks {PROTOCOL_VERSION}")),
        "{m}"
    );
}

#[test]
fn a_client_without_a_certificate_the_ca_signed_gets_no_reply() {
    let dir = testkit::TempDir::new("relay-tls");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let (relay, addr) = start(&pki, &[]);
    let roots = || {
        let mut r = rustls::RootCertStore::empty();
        for c in appkit::tls::certificates(&pki.ca).unwrap() {
            r.add(c).unwrap();
        }
        r
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let anonymous = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots())
        .with_no_client_auth();
    let stranger =
        appkit::tls::client_config(&pki.ca, &pki.stranger.cert, &pki.stranger.key).unwrap();
    for (who, config) in [
        ("no certificate", Arc::new(anonymous)),
        ("another CA's", stranger),
    ] {
        let mut c = connect(addr, config);
        let r = ask(&mut c, &hello());
        assert!(r.is_err(), "{who}: the relay replied {r:?}");
    }
    // Each refusal is logged.
    testkit::wait_for("two refusals logged", Duration::from_secs(10), || {
        let log = relay.log.lock().unwrap();
        (log.iter()
            .filter(|l| l.contains("control client refused: TLS"))
            .count()
            >= 2)
            .then_some(())
    });
    // And a good client is still served.
    let good = appkit::tls::client_config(&pki.ca, &pki.control.cert, &pki.control.key).unwrap();
    let r = ask(&mut connect(addr, good), &hello()).unwrap();
    assert_eq!(r["ok"], true, "{r}");
}

/// Runs the relay with `args` and returns its exit code and standard error.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let out = testkit::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(["--backend", "tokio", "--metrics", "127.0.0.1:0"])
            .args(args),
        Duration::from_secs(20),
        None,
    )
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_tls_flags_exit_2_naming_the_flag() {
    let dir = testkit::TempDir::new("relay-tls");
    let pki = testkit::pki::Pki::new(dir.path(), &[]);
    let (cert, key, ca) = (
        pki.relay.cert.display().to_string(),
        pki.relay.key.display().to_string(),
        pki.ca.display().to_string(),
    );
    let missing = dir.path().join("missing.pem").display().to_string();
    let listen = ["--ctl-listen", "tcp://127.0.0.1:0"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            [&listen[..], &["--tls-cert", &cert, "--tls-client-ca", &ca]].concat(),
            "--tls-key",
        ),
        (
            [&listen[..], &["--tls-key", &key, "--tls-client-ca", &ca]].concat(),
            "--tls-cert",
        ),
        (
            [&listen[..], &["--tls-cert", &cert, "--tls-key", &key]].concat(),
            "--tls-client-ca",
        ),
        (
            [
                &listen[..],
                &[
                    "--tls-cert",
                    &missing,
                    "--tls-key",
                    &key,
                    "--tls-client-ca",
                    &ca,
                ],
            ]
            .concat(),
            "--tls-cert",
        ),
        (
            [
                &listen[..],
                &[
                    "--tls-cert",
                    &cert,
                    "--tls-key",
                    &key,
                    "--tls-client-ca",
                    &missing,
                ],
            ]
            .concat(),
            "--tls-client-ca",
        ),
        (
            vec![
                "--ctl-listen",
                "127.0.0.1:7000",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &ca,
            ],
            "--ctl-listen",
        ),
        (vec!["--tls-cert", &cert], "--tls-cert"),
        (
            [
                &listen[..],
                &[
                    "--tls-cert",
                    &cert,
                    "--tls-key",
                    &key,
                    "--tls-client-ca",
                    &ca,
                    "--bind",
                    "0.0.0.0",
                ],
            ]
            .concat(),
            "--advertise",
        ),
    ];
    for (args, flag) in cases {
        let (code, stderr) = refused(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} should name {flag}: {stderr}"
        );
    }
}
