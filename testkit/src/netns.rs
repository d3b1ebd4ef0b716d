//! Real hosts for tests that must cross a network, built from Linux network namespaces: each
//! [`Host`] has its own interfaces, addresses, routes and ports, and hosts are joined by veth
//! links, so a relay on one host and control on another talk over an address of their own, not
//! loopback. Processes run inside a host with `ip netns exec` (which execs the binary: the child's
//! pid is the binary's), and a [`Net`] deletes every namespace it made on drop, killing what
//! still runs in them first, panics included. Unix sockets are files, not network objects, so
//! the test process (in the root namespace) still reaches a relay's `--ctl` socket.
//!
//! Making namespaces needs root and a kernel and container that allow it: [`Net::new`] says
//! `SKIPPED (network namespaces unavailable here): …` and returns `None` where they cannot be
//! made. Namespace names carry the test's pid; a run killed before its drop leaves namespaces
//! behind, and the next [`Net::new`] deletes those whose pid is gone.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{try_ready_value, Log, Proc};

/// Every namespace this module makes is named `rtp-<pid>-<n>-<host>`.
const PREFIX: &str = "rtp-";

/// Runs `ip` with `args`; its standard output, or what it said on failure.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// [`ip`], panicking on failure (a broken set-up once namespaces are known to work).
fn ip_ok(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// The effective uid, from `/proc/self/status` (no `unsafe` for `geteuid`).
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Kills (SIGKILL) every process in namespace `ns`, then deletes it.
fn delete(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = ip(&["netns", "delete", ns]);
}

/// Deletes the namespaces earlier runs left behind (their pid no longer exists).
fn delete_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = ns.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete(ns);
        }
    }
}

/// The namespaces of one test, deleted (with everything running in them) on drop.
#[derive(Debug)]
pub struct Net {
    /// The namespaces made so far, in order.
    namespaces: Vec<String>,
    /// The names of the veth ends made in the root namespace ([`Net::link_root`]).
    root_links: Vec<String>,
}

/// One host: a network namespace with its loopback up.
#[derive(Clone, Debug)]
pub struct Host {
    /// The short name the test gave it (`c`, `r1`); interfaces toward it are named `to-<name>`.
    name: String,
    /// The namespace's name, unique on the machine.
    ns: String,
}

impl Net {
    /// An empty network, or `None` (after printing why, as a SKIPPED line) where namespaces
    /// cannot be made: not root, no `ip`, or `ip netns add` refused.
    #[must_use]
    pub fn new() -> Option<Self> {
        let skip = |why: &str| {
            eprintln!("SKIPPED (network namespaces unavailable here): {why}");
            None
        };
        match euid() {
            Some(0) => {}
            Some(uid) => return skip(&format!("not root (uid {uid})")),
            None => return skip("the uid is unknown (/proc/self/status)"),
        }
        delete_stale();
        let probe = format!("{PREFIX}{}-probe", std::process::id());
        if let Err(e) = ip(&["netns", "add", &probe]) {
            return skip(&e);
        }
        delete(&probe);
        Some(Self {
            namespaces: Vec::new(),
            root_links: Vec::new(),
        })
    }

    /// A new host named `name` (short: it names the interfaces toward it), loopback up.
    ///
    /// # Panics
    /// The namespace cannot be made.
    pub fn host(&mut self, name: &str) -> Host {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let ns = format!("{PREFIX}{}-{n}-{name}", std::process::id());
        ip_ok(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        Host {
            name: name.to_owned(),
            ns,
        }
    }

    /// A veth link between `a` and `b`, with address `a_addr` (CIDR, e.g. `10.201.1.1/24`) on
    /// `a`'s end (named `to-<b>`) and `b_addr` on `b`'s (named `to-<a>`), both up.
    ///
    /// # Panics
    /// The link cannot be made.
    pub fn link(&self, a: &Host, a_addr: &str, b: &Host, b_addr: &str) {
        let (a_if, b_if) = (format!("to-{}", b.name), format!("to-{}", a.name));
        ip_ok(&[
            "link", "add", &a_if, "netns", &a.ns, "type", "veth", "peer", "name", &b_if, "netns",
            &b.ns,
        ]);
        for (h, dev, addr) in [(a, &a_if, a_addr), (b, &b_if, b_addr)] {
            ip_ok(&["-n", &h.ns, "addr", "add", addr, "dev", dev]);
            ip_ok(&["-n", &h.ns, "link", "set", dev, "up"]);
        }
    }

    /// A veth link between the root namespace (where the test runs) and `host`, on a /30 of
    /// 10.202.0.0/16 chosen by the test's pid, so the test can reach servers on `host` over TCP
    /// (a Prometheus, an HTTP endpoint). The host's address on it, e.g. `10.202.3.6`.
    ///
    /// # Panics
    /// The link cannot be made.
    pub fn link_root(&mut self, host: &Host) -> String {
        let pid = std::process::id();
        let n = u32::try_from(self.root_links.len()).unwrap_or(u32::MAX);
        // 16384 /30s in 10.202.0.0/16: one per (pid, link), distinct for concurrent runs.
        let slot = (pid.wrapping_mul(4).wrapping_add(n)) % 16384;
        let base = slot * 4;
        let (third, fourth) = (base / 256, base % 256);
        let root_addr = format!("10.202.{third}.{}/30", fourth + 1);
        let host_addr = format!("10.202.{third}.{}", fourth + 2);
        // Root-side names are machine-wide: the pid and the link's number keep them unique.
        let root_if = format!("rtp{pid}r{n}");
        let host_if = "to-root";
        ip_ok(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", host_if, "netns", &host.ns,
        ]);
        self.root_links.push(root_if.clone());
        ip_ok(&["addr", "add", &root_addr, "dev", &root_if]);
        ip_ok(&["link", "set", &root_if, "up"]);
        ip_ok(&[
            "-n",
            &host.ns,
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            host_if,
        ]);
        ip_ok(&["-n", &host.ns, "link", "set", host_if, "up"]);
        host_addr
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Processes first (a namespace outlives `ip netns delete` while anything runs in it),
        // then the namespaces, which takes their veth ends and so their peers with them.
        for ns in self.namespaces.iter().rev() {
            delete(ns);
        }
        for dev in &self.root_links {
            let _ = ip(&["link", "delete", dev]);
        }
    }
}

impl Host {
    /// The short name the test gave it.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name (for `ip netns exec` and `ip -n`).
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Adds `cidr` (e.g. `10.201.0.1/32`) to interface `dev` (e.g. `lo`).
    ///
    /// # Panics
    /// `ip` refuses.
    pub fn add_address(&self, dev: &str, cidr: &str) {
        ip_ok(&["-n", &self.ns, "addr", "add", cidr, "dev", dev]);
    }

    /// Adds a route to `dest` (a CIDR, or `default`) through the gateway `via`.
    ///
    /// # Panics
    /// `ip` refuses.
    pub fn route(&self, dest: &str, via: &str) {
        ip_ok(&["-n", &self.ns, "route", "add", dest, "via", via]);
    }

    /// A command that runs `program` inside this host (`ip netns exec <ns> <program>`); `ip`
    /// execs the program, so the child's pid is the program's.
    #[must_use]
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// [`crate::start`] inside this host: starts the workspace binary `name` with `args`
    /// (`RUST_LOG=info`), waits for its log line containing `ready` and returns the value of
    /// `key=` on it.
    #[must_use]
    pub fn start(&self, name: &str, args: &[&str], ready: &str, key: &str) -> (Proc, String) {
        let (p, v, _) = self.start_logged(name, args, ready, key);
        (p, v)
    }

    /// [`Host::start`], also returning the child's log as it grows.
    #[must_use]
    pub fn start_logged(
        &self,
        name: &str,
        args: &[&str],
        ready: &str,
        key: &str,
    ) -> (Proc, String, Log) {
        self.try_start_logged(name, args, ready, key)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Host::start_logged`], returning an error instead of panicking (the child is killed).
    ///
    /// # Errors
    /// The binary cannot be started or did not log its ready line within 20 s.
    pub fn try_start_logged(
        &self,
        name: &str,
        args: &[&str],
        ready: &str,
        key: &str,
    ) -> Result<(Proc, String, Log), String> {
        let log = Log::default();
        let label = format!("{name}@{}", self.name);
        let mut child = self
            .command(crate::bin(name))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {label}: {e}"))?;
        match try_ready_value(&mut child, &label, ready, key, Some(log.clone())) {
            Ok(v) => Ok((Proc(child), v, log)),
            Err(e) => {
                drop(Proc(child));
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_get_their_addresses_and_everything_goes_on_drop() {
        let Some(mut net) = Net::new() else {
            return;
        };
        let a = net.host("a");
        let b = net.host("b");
        net.link(&a, "10.209.1.1/24", &b, "10.209.1.2/24");
        b.route("default", "10.209.1.1");
        let shown = ip_ok(&["-n", a.namespace(), "-br", "addr", "show", "to-b"]);
        assert!(
            shown.contains("10.209.1.1/24") && shown.contains("UP"),
            "{shown}"
        );
        let route = ip_ok(&["-n", b.namespace(), "route", "show", "default"]);
        assert!(route.contains("via 10.209.1.1 dev to-a"), "{route}");
        let on_root = net.link_root(&a);
        assert!(on_root.starts_with("10.202."), "{on_root}");
        let mut sleeper = Proc(b.command("sleep").arg("60").spawn().expect("sleep runs"));
        // `ip netns exec` enters the namespace, then execs: the child becomes the program.
        crate::wait_for(
            "the sleeper in the namespace",
            std::time::Duration::from_secs(5),
            || {
                ip_ok(&["netns", "pids", b.namespace()])
                    .split_whitespace()
                    .any(|p| p == sleeper.pid().to_string())
                    .then_some(())
            },
        );
        let names = [a.namespace().to_owned(), b.namespace().to_owned()];
        drop(net);
        let status = crate::wait_for(
            "the sleeper killed",
            std::time::Duration::from_secs(5),
            || sleeper.0.try_wait().ok().flatten(),
        );
        assert!(!status.success());
        let left = ip_ok(&["netns", "list"]);
        for ns in &names {
            assert!(!left.contains(ns.as_str()), "{ns} left: {left}");
        }
        assert!(!ip_ok(&["-br", "link"]).contains(&format!("rtp{}r0", std::process::id())));
    }
}
