//! Helpers shared by the workspace's integration tests, which run the real binaries as a user
//! would: start one and wait for the log line that says it is ready (and what address it took),
//! wait on a condition with a deadline instead of sleeping in hope, receive without tripping on
//! signals, and skip io_uring tests loudly where the kernel refuses io_uring. [`netns`] builds
//! hosts of their own (network namespaces joined by veth links); [`pki`] makes the
//! certificates of the mutual-TLS control link.
#![forbid(unsafe_code)]

pub mod netns;
pub mod pki;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::Child;
use std::time::{Duration, Instant};

/// A directory of the test's own under the system's temporary directory, removed (with what it
/// holds) on drop.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// A new, empty directory whose name starts with `prefix`.
    ///
    /// # Panics
    /// It cannot be created.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("a temporary directory");
        Self(p)
    }

    /// Its path.
    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether io_uring can be set up here; prints why not, so a skipped test says so.
#[must_use]
pub fn uring_available() -> bool {
    match relay_io::ring::probe() {
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
    ready_value_logged(child, name, ready, key, None)
}

/// Every line a child has logged so far (see [`start_logged`]).
pub type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`ready_value`], also keeping every line in `log`.
#[must_use]
pub fn ready_value_logged(
    child: &mut Child,
    name: &str,
    ready: &str,
    key: &str,
    log: Option<Log>,
) -> String {
    try_ready_value(child, name, ready, key, log).unwrap_or_else(|e| panic!("{e}"))
}

/// [`ready_value_logged`], returning an error instead of panicking (for binaries, whose
/// release profile aborts on panic and would leave children running).
///
/// # Errors
/// The line did not come within 20 s.
pub fn try_ready_value(
    child: &mut Child,
    name: &str,
    ready: &str,
    key: &str,
    log: Option<Log>,
) -> Result<String, String> {
    let stderr = child.stderr.take().expect("the child's stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let (label, wanted, key) = (name.to_owned(), ready.to_owned(), format!("{key}="));
    let missing = format!("{name} did not log `{ready}` with `{key}` within 20 s");
    let exited = format!("{name} closed its log (exited?) before logging `{ready}` with `{key}`");
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{label}] {line}");
            if let Some(log) = &log {
                log.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(line.clone());
            }
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
        .map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => missing,
            std::sync::mpsc::RecvTimeoutError::Disconnected => exited,
        })
}

/// A binary of this workspace, in the running test's (or binary's) `target/<profile>`;
/// built with `cargo build -p <name>` if a narrower `cargo test` did not build it.
#[must_use]
pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the running binary's path");
    // A test runs from target/<profile>/deps/, a binary (bench) from target/<profile>/.
    let mut dir = exe.parent().expect("the binary has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps has a parent");
    }
    let path = dir.join(name);
    if !path.exists() {
        let status =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "-p", name])
                .args(dir.ends_with("release").then_some("--release"))
                .status()
                .expect("cargo runs");
        assert!(status.success(), "building {name}");
    }
    path
}

/// A child process, killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends SIGTERM and waits (up to `deadline`) for the process to exit; its exit status.
    pub fn terminate(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Proc {
    /// Sends SIGTERM, waits (up to `deadline`) for a successful exit, and returns what the
    /// process printed on its standard output (which must be piped), such as a summary line.
    ///
    /// # Panics
    /// The process did not exit in time, exited with a failure, or its output is unreadable.
    pub fn stop_for_stdout(&mut self, deadline: Duration) -> String {
        let name = format!("process {}", self.pid());
        let status = self.terminate(deadline);
        assert!(
            status.is_some_and(|s| s.success()),
            "{name} exited: {status:?}"
        );
        let mut out = String::new();
        if let Some(stdout) = self.0.stdout.as_mut() {
            std::io::Read::read_to_string(stdout, &mut out).expect("its standard output");
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the workspace binary `name` with `args` (stdout and stderr piped, `RUST_LOG=info`),
/// waits for its log line containing `ready` and returns the value of `key=` on it.
#[must_use]
pub fn start(name: &str, args: &[&str], ready: &str, key: &str) -> (Proc, String) {
    let (p, v, _) = start_logged(name, args, ready, key);
    (p, v)
}

/// [`start`], also returning the child's log as it grows.
#[must_use]
pub fn start_logged(name: &str, args: &[&str], ready: &str, key: &str) -> (Proc, String, Log) {
    try_start_logged(name, args, ready, key).unwrap_or_else(|e| panic!("{e}"))
}

/// [`start`], returning an error instead of panicking (the child is killed).
///
/// # Errors
/// The binary cannot be started or did not log its ready line within 20 s.
pub fn try_start(
    name: &str,
    args: &[&str],
    ready: &str,
    key: &str,
) -> Result<(Proc, String), String> {
    try_start_logged(name, args, ready, key).map(|(p, v, _)| (p, v))
}

/// [`start_logged`], returning an error instead of panicking (the child is killed).
///
/// # Errors
/// The binary cannot be started or did not log its ready line within 20 s.
pub fn try_start_logged(
    name: &str,
    args: &[&str],
    ready: &str,
    key: &str,
) -> Result<(Proc, String, Log), String> {
    let log = Log::default();
    let mut child = std::process::Command::new(bin(name))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    match try_ready_value(&mut child, name, ready, key, Some(log.clone())) {
        Ok(v) => Ok((Proc(child), v, log)),
        Err(e) => {
            drop(Proc(child));
            Err(e)
        }
    }
}

/// Open file descriptors of process `pid`.
#[must_use]
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Open file descriptors of process `pid` that are UDP sockets (IPv4 or IPv6), read in the same
/// pass as [`fd_count`] would: (all descriptors, UDP sockets among them).
#[must_use]
pub fn fd_counts(pid: u32) -> (usize, usize) {
    let mut udp = std::collections::HashSet::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        // Columns: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        udp.extend(
            text.lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(9).map(str::to_owned)),
        );
    }
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let (mut all, mut socks) = (0, 0);
    for e in dir.filter_map(Result::ok) {
        all += 1;
        let link = std::fs::read_link(e.path()).unwrap_or_default();
        let inode = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'));
        socks += usize::from(inode.is_some_and(|i| udp.contains(i)));
    }
    (all, socks)
}

/// `GET path` on `addr` (HTTP/1.1, one request); (status code, body).
///
/// # Errors
/// The connection or the read failed, or the reply is not HTTP.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let bad = || std::io::Error::other(format!("not an HTTP reply: {reply:.80}"));
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .ok_or_else(bad)?;
    Ok((status, body))
}

/// Why [`output`] gave up on a child.
#[derive(Debug)]
pub enum RunError {
    /// It could not be started.
    Start(std::io::Error),
    /// It was still running at the deadline (it was killed).
    TimedOut(Duration),
    /// `cancel` was set while it ran (it was killed).
    Cancelled,
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Start(e) => write!(f, "cannot start: {e}"),
            Self::TimedOut(d) => write!(f, "still running after {d:?}, killed"),
            Self::Cancelled => f.write_str("interrupted"),
        }
    }
}

impl std::error::Error for RunError {}

/// Runs `cmd` to its end like [`std::process::Command::output`], but held in a [`Proc`] the
/// whole time: killed and reaped if it outlives `deadline`, if `cancel` is set, or if the caller
/// unwinds, so no child outlives the test (or the benchmark) that started it.
///
/// # Errors
/// The child could not start, ran past `deadline`, or was cancelled.
pub fn output(
    cmd: &mut std::process::Command,
    deadline: Duration,
    cancel: Option<&std::sync::atomic::AtomicBool>,
) -> Result<std::process::Output, RunError> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Proc(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(RunError::Start)?,
    );
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.0.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.0.stderr.take().map(|p| Box::new(p) as _));
    let end = Instant::now() + deadline;
    let status = loop {
        if let Ok(Some(s)) = child.0.try_wait() {
            break s;
        }
        if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            return Err(RunError::Cancelled);
        }
        if Instant::now() >= end {
            return Err(RunError::TimedOut(deadline));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `n` TCP connections to `addr` that each trickle a request one byte a second (slowloris),
/// from one thread, until dropped; they count how many the server has closed.
#[derive(Debug)]
pub struct SlowClients {
    /// Set to stop the thread.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections the server has closed so far.
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The trickling thread.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlowClients {
    /// Opens the `n` connections (each sends its first byte at once), then trickles.
    ///
    /// # Panics
    /// A connection cannot be opened.
    #[must_use]
    pub fn open(addr: &str, n: usize) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let request = b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Slow: ";
        let mut conns: Vec<Option<std::net::TcpStream>> = (0..n)
            .map(|i| {
                let mut s = std::net::TcpStream::connect(addr)
                    .unwrap_or_else(|e| panic!("slow connection {i} to {addr}: {e}"));
                s.set_nonblocking(true).expect("non-blocking");
                let _ = s.write(&request[..1]);
                Some(s)
            })
            .collect();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let closed = std::sync::Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, closed) = (stop.clone(), closed.clone());
            std::thread::spawn(move || {
                let mut sent = 1;
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    for c in &mut conns {
                        let Some(s) = c else { continue };
                        // The server closing shows as end of file or an error; anything it sends
                        // (an error reply) is read and ignored.
                        let gone = match s.read(&mut buf) {
                            Ok(0) => true,
                            Ok(_) => false,
                            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                        };
                        let byte = request.get(sent..=sent).unwrap_or(b"x");
                        if gone || s.write(byte).is_err() {
                            *c = None;
                            closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    sent += 1;
                    for _ in 0..20 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        };
        Self {
            stop,
            closed,
            thread: Some(thread),
        }
    }

    /// Connections the server has closed so far.
    #[must_use]
    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for SlowClients {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
