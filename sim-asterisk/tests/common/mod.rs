//! How every test of the simulator starts it and reads its report: the `sim-asterisk` binary
//! serving ARI only (`--calls 0`; the test plays the applications), user [`USER`] with password
//! [`PASS`], its JSON report going to a file of the test's own.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// The ARI user the simulator accepts.
pub const USER: &str = "asterisk";
/// Its password.
pub const PASS: &str = "secret";
/// `USER:PASS` for HTTP basic authentication.
pub const BASIC: &str = "YXN0ZXJpc2s6c2VjcmV0";

/// One HTTP/1.0 request, with `Authorization: Basic <auth>` when given; (status, body).
pub fn request(addr: &str, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: Basic {a}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply.split(' ').nth(1).unwrap().parse().unwrap();
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The names of process `pid`'s threads.
pub fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|n| n.trim_end().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A running `sim-asterisk --calls 0` and where its JSON report goes (the file is removed when
/// this is dropped; the process is killed).
pub struct Sim {
    /// The process.
    pub proc: testkit::Proc,
    /// Where it serves ARI (`IP:PORT`).
    pub addr: String,
    /// Its `--json` report.
    json: PathBuf,
}

impl Sim {
    /// Starts it with `extra` flags; `name` (unique within the test binary) names its report file.
    pub fn start(name: &str, extra: &[&str]) -> Self {
        let json =
            std::env::temp_dir().join(format!("sim-asterisk-{}-{name}.json", std::process::id()));
        let _ = std::fs::remove_file(&json);
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--ari-user",
            USER,
            "--ari-pass",
            PASS,
            "--calls",
            "0",
            "--json",
            json.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (proc, addr) = testkit::start("sim-asterisk", &args, "sim-asterisk ready", "listen");
        Self { proc, addr, json }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The names of its threads.
    pub fn threads(&self) -> Vec<String> {
        thread_names(self.pid())
    }

    /// Interrupts it (Ctrl-C, as a user ends `--calls 0` without `--serve-for`); its report, as
    /// JSON and as the text it printed, once it has exited (within `deadline`) with success.
    pub fn interrupt(mut self, deadline: Duration) -> (Value, String) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .status();
        self.report(deadline)
    }

    /// Waits (at most `deadline`) for it to exit by itself (`--serve-for`); its report, as JSON
    /// and as the text it printed.
    pub fn finish(mut self, deadline: Duration) -> (Value, String) {
        self.report(deadline)
    }

    fn report(&mut self, deadline: Duration) -> (Value, String) {
        let status = testkit::wait_for("sim-asterisk to report and exit", deadline, || {
            self.proc.0.try_wait().unwrap()
        });
        assert!(status.success(), "sim-asterisk exited: {status}");
        let json = std::fs::read_to_string(&self.json).unwrap();
        let mut text = String::new();
        if let Some(out) = self.proc.0.stdout.as_mut() {
            out.read_to_string(&mut text).unwrap();
        }
        (serde_json::from_str(&json).unwrap(), text)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.json);
    }
}
