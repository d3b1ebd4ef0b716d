//! Helpers shared by the workspace's integration tests, which run the real binaries as a user
//! would: start one and wait for the log line that says it is ready (and what address it took),
//! wait on a condition with a deadline instead of sleeping in hope, receive without tripping on
//! signals, and skip io_uring tests loudly where the kernel refuses io_uring.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::Child;
use std::time::{Duration, Instant};

/// Whether io_uring can be set up here; prints why not, so a skipped test says so.
#[must_use]
pub fn uring_available() -> bool {
    match relay::ring::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIPPED (io_uring unavailable here): {e}");
            false
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `deadline` naming `what`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `recv_from`, retried when a signal interrupts it.
///
/// # Errors
/// What `recv_from` returns, other than an interruption (a read timeout, for instance).
pub fn recv(s: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    loop {
        match s.recv_from(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Reads `child`'s standard error (which must be piped) until a line containing `ready`, and
/// returns the value of `key=` on that line. The log keeps being drained afterwards, each line
/// echoed to the test's output as `[name] …`, so the child never blocks on a full pipe and a
/// failing test shows the log. Panics after 20 s without the line.
#[must_use]
pub fn ready_value(child: &mut Child, name: &str, ready: &str, key: &str) -> String {
    let stderr = child.stderr.take().expect("the child's stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let (label, wanted, key) = (name.to_owned(), ready.to_owned(), format!("{key}="));
    let missing = format!("{name} did not log `{ready}` with `{key}` within 20 s");
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{label}] {line}");
            if line.contains(&wanted) {
                if let (Some(i), Some(tx)) = (line.find(&key), tx.take()) {
                    let value = line[i + key.len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("");
                    let _ = tx.send(value.to_owned());
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{missing}"))
}
