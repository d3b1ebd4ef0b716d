//! A relay pool across real hosts: network namespaces made by the test ([`testkit::netns`]), two
//! relay hosts and a host `c` for control, the simulated Asterisk, the echo and Prometheus,
//! joined by veth links with addresses of their own:
//!
//! ```text
//!   r1 10.201.1.2 ── 10.201.1.1 ┐
//!                               c  (10.201.0.1 on lo: Asterisk's RTP and the echo)
//!   r2 10.201.2.2 ── 10.201.2.1 ┘── 10.202.x.y: a link to the test, for Prometheus' API
//! ```
//!
//! The relays route through `c`; each binds and advertises its own address, serves the control
//! protocol on `tls://<its address>:7000` behind mutual TLS (certificates the test makes with
//! [`testkit::pki`]) and its metrics on `<its address>:9100`.
//!
//! - 40 overlapping calls on two relays of equal capacity land exactly 20 and 20 (each relay's
//!   channel list, read through its Unix `--ctl` socket, a file the test reaches from outside
//!   the namespaces). Then r1 is killed (`kill -9`) mid-call: its twenty calls move to r2, every
//!   call completes, each moved call's audio is back at the caller within 1 s, and its record
//!   lists r1 then r2 with at most 3 s that no relay's figures cover; the others lose nothing.
//! - A TLS client on host `c` without a certificate, or with one another CA signed, gets no reply
//!   to `hello`, and the relay logs each refusal; with control's certificate it gets one.
//!   (The client is `openssl s_client`, run inside `c`; where openssl is missing, that part
//!   says SKIPPED.)
//! - A real Prometheus on `c` finds the relays through file-based service discovery (job
//!   `relay`, as in `docker/prometheus/prometheus.yml`): a target file naming r1, then r1 and
//!   r2 (rewritten while it runs); `up{job="relay"}` is 1 for both instances, and each
//!   instance's `rtprelay_channels` was seen (r2's reaching 40 once r1's calls moved). The Grafana dashboard's `instance` variable
//!   offers both relays, and its forwarded-packets panel set to either shows that relay's
//!   traffic both ways.
//!
//! Skips loudly where network namespaces cannot be made (not root, no `ip`, a container that
//! refuses) and where io_uring is unavailable (the echo needs it). Timing: about 21 s on a
//! two-core VM: namespaces under 1 s, Prometheus ready in 1-3 s, the calls 2 s of ramp and 8 s
//! of hold, the rest start-up, the calls' clean-up and the last scrapes. Every wait has a
//! deadline.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use relay_proto::control::PROTOCOL_VERSION;
use serde_json::Value;
use sim_asterisk::relay_client::RelayClient;
use testkit::netns::{Host, Net};
use testkit::{http_get, wait_for, Log, Proc};

const PASS: &str = "netns-secret";

/// Each relay's control protocol port on its own address.
const CTL_PORT: u16 = 7000;

/// The address on host `c` the simulated Asterisk sends RTP from and the echo listens on.
const C_ADDR: &str = "10.201.0.1";

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A relay on `host` at `addr`; (process, its Unix socket, its log).
fn relay(
    host: &Host,
    dir: &Path,
    pki: &testkit::pki::Pki,
    addr: &str,
) -> (Proc, std::path::PathBuf, Log) {
    let ctl = dir.join(format!("{}.sock", host.name()));
    let (p, metrics, log) = host.start_logged(
        "relay",
        &[
            "--backend",
            "tokio",
            "--ctl",
            ctl.to_str().unwrap(),
            "--ctl-listen",
            &format!("tcp://{addr}:{CTL_PORT}"),
            "--tls-cert",
            pki.relay.cert.to_str().unwrap(),
            "--tls-key",
            pki.relay.key.to_str().unwrap(),
            "--tls-client-ca",
            pki.ca.to_str().unwrap(),
            "--relay-id",
            host.name(),
            "--bind",
            addr,
            "--max-channels",
            "40",
            "--metrics",
            &format!("{addr}:9100"),
            "--echo",
            &format!("{C_ADDR}:4000"),
            "--strict",
        ],
        "relay ready",
        "metrics",
    );
    assert_eq!(metrics, format!("http://{addr}:9100/metrics"));
    (p, ctl, log)
}

/// A program on the `PATH`, or `None` after a SKIPPED line naming `part`.
fn which(name: &str, part: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!(
            "SKIPPED ({part}: {name} is not installed; scripts/test.sh installs it on Debian)"
        );
    }
    found
}

/// Says `hello` to the relay at `addr` over TLS from `host` with `openssl s_client`, presenting
/// `cert` (or none); the reply line, or `None` when the relay closed the connection without one
/// (or said nothing for 5 s).
fn hello_from(
    host: &Host,
    openssl: &Path,
    addr: &str,
    ca: &Path,
    cert: Option<&testkit::pki::Pair>,
) -> Option<String> {
    let mut cmd = host.command(openssl);
    cmd.args([
        "s_client",
        "-connect",
        addr,
        "-quiet",
        "-verify_return_error",
    ])
    .arg("-CAfile")
    .arg(ca);
    if let Some(pair) = cert {
        cmd.arg("-cert").arg(&pair.cert).arg("-key").arg(&pair.key);
    }
    let mut client = Proc(
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = client.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let n = BufReader::new(stdout).read_line(&mut line).unwrap_or(0);
        let _ = tx.send((n > 0).then_some(line));
    });
    let hello = format!("{{\"id\":1,\"cmd\":\"hello\",\"version\":{PROTOCOL_VERSION}}}\n");
    // The standard input stays open (s_client would close the connection at its end); a write to
    // a client the relay already refused may fail, which is what is being tested.
    let _ = client.0.stdin.as_mut().unwrap().write_all(hello.as_bytes());
    rx.recv_timeout(Duration::from_secs(5)).ok().flatten()
}

/// A real Prometheus on `host`, listening on `listen`, scraping the relays named in a target
/// file it watches (file-based service discovery).
struct Prometheus {
    _proc: Proc,
    addr: String,
    targets: std::path::PathBuf,
    /// Its log, shown when the test fails.
    log: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- prometheus.log\n{log}");
        }
    }
}

impl Prometheus {
    fn start(host: &Host, dir: &Path, listen: &str) -> Option<Self> {
        let path = which("prometheus", "the Prometheus part")?;
        let targets = dir.join("targets");
        std::fs::create_dir_all(&targets).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
             \x20 - job_name: relay\n    file_sd_configs:\n      - files: [\"{}/*.json\"]\n\
             \x20       refresh_interval: 1s\n",
            targets.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let child = host
            .command(path)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        let prom = Self {
            _proc: Proc(child),
            addr: listen.to_owned(),
            targets,
            log: dir.join("prometheus.log"),
        };
        wait_for("Prometheus to answer", Duration::from_secs(30), || {
            http_get(&prom.addr, "/-/ready")
                .ok()
                .filter(|(s, _)| *s == 200)
        });
        Some(prom)
    }

    /// Replaces the target file (written aside, then renamed, so Prometheus never reads half).
    fn set_targets(&self, targets: &[&str]) {
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let json = format!("[{{\"targets\": [{}]}}]\n", list.join(", "));
        let tmp = self.targets.join("relays.json.tmp");
        std::fs::write(&tmp, json).unwrap();
        std::fs::rename(&tmp, self.targets.join("relays.json")).unwrap();
    }

    /// An instant query; (instance, value) of each series.
    fn query(&self, promql: &str) -> Vec<(String, f64)> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let (status, body) = http_get(&self.addr, &path).unwrap();
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(status, 200, "query {promql}: {body}");
        assert_eq!(v["status"], "success", "query {promql}: {body}");
        let mut series: Vec<(String, f64)> = v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["metric"]["instance"].as_str().unwrap_or("").to_owned(),
                    s["value"][1]
                        .as_str()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(f64::NAN),
                )
            })
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        series
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn forty_calls_spread_over_relays_on_two_hosts_and_prometheus_finds_both() {
    let Some(mut net) = Net::new() else {
        return;
    };
    if !testkit::uring_available() {
        return;
    }
    let started = Instant::now();
    let c = net.host("c");
    let r1 = net.host("r1");
    let r2 = net.host("r2");
    net.link(&c, "10.201.1.1/24", &r1, "10.201.1.2/24");
    net.link(&c, "10.201.2.1/24", &r2, "10.201.2.2/24");
    c.add_address("lo", &format!("{C_ADDR}/32"));
    r1.route("default", "10.201.1.1");
    r2.route("default", "10.201.2.1");
    let c_root = net.link_root(&c);

    let dir = testkit::TempDir::new("control-netns");
    let pki = testkit::pki::Pki::new(dir.path(), &["10.201.1.2", "10.201.2.2"]);
    let (_echo, echo_addr) = c.start(
        "echo",
        &[
            "--listen",
            &format!("{C_ADDR}:4000"),
            "--metrics",
            "127.0.0.1:0",
        ],
        "echo ready",
        "listen",
    );
    assert_eq!(echo_addr, format!("{C_ADDR}:4000"));
    let (r1_proc, r1_ctl, r1_log) = relay(&r1, dir.path(), &pki, "10.201.1.2");
    let (_r2, r2_ctl, _) = relay(&r2, dir.path(), &pki, "10.201.2.2");
    let (r1_url, r2_url) = (
        format!("tls://10.201.1.2:{CTL_PORT}"),
        format!("tls://10.201.2.2:{CTL_PORT}"),
    );

    // Only clients the CA signed are answered, from another host as on loopback.
    let r1_tcp = format!("10.201.1.2:{CTL_PORT}");
    if let Some(openssl) = which("openssl", "the TLS refusal checks") {
        let none = hello_from(&c, &openssl, &r1_tcp, &pki.ca, None);
        assert_eq!(none, None, "no certificate: the relay replied");
        let stranger = hello_from(&c, &openssl, &r1_tcp, &pki.ca, Some(&pki.stranger));
        assert_eq!(
            stranger, None,
            "another CA's certificate: the relay replied"
        );
        wait_for("two refusals logged", Duration::from_secs(10), || {
            let log = r1_log.lock().unwrap();
            (log.iter()
                .filter(|l| l.contains("control client refused: TLS"))
                .count()
                >= 2)
                .then_some(())
        });
        let good = hello_from(&c, &openssl, &r1_tcp, &pki.ca, Some(&pki.control))
            .expect("control's certificate gets a reply");
        let good: Value = serde_json::from_str(&good).unwrap();
        assert_eq!(good["ok"], true, "{good}");
        assert_eq!(good["result"]["relay_id"], "r1", "{good}");
        assert_eq!(good["result"]["advertise"], "10.201.1.2", "{good}");
    }

    // Prometheus on c, told of r1 first, then of both through its target file.
    let prom = Prometheus::start(
        &c,
        &dir.path().join("prometheus"),
        &format!("{c_root}:9090"),
    );
    if let Some(prom) = &prom {
        prom.set_targets(&["10.201.1.2:9100"]);
        wait_for("Prometheus to scrape r1", Duration::from_secs(15), || {
            (prom.query("up{job=\"relay\"}") == [("10.201.1.2:9100".into(), 1.0)]).then_some(())
        });
        prom.set_targets(&["10.201.1.2:9100", "10.201.2.2:9100"]);
        wait_for(
            "Prometheus to scrape both relays",
            Duration::from_secs(15),
            || {
                (prom.query("up{job=\"relay\"}")
                    == [
                        ("10.201.1.2:9100".into(), 1.0),
                        ("10.201.2.2:9100".into(), 1.0),
                    ])
                .then_some(())
            },
        );
    }

    let json = dir.path().join("sim.json");
    let (mut sim, sim_addr) = c.start(
        "sim-asterisk",
        &[
            "--listen",
            "127.0.0.1:0",
            "--ari-pass",
            PASS,
            "--rtp-ip",
            C_ADDR,
            "--json",
            json.to_str().unwrap(),
            "--grace",
            "5s",
            "--calls",
            "40",
            "--ramp",
            "2s",
            "--hold",
            "8s",
        ],
        "sim-asterisk ready",
        "listen",
    );
    let calls_log = dir.path().join("calls.jsonl");
    let (_control, http) = c.start(
        "control",
        &[
            "--ari-url",
            &format!("http://{sim_addr}"),
            "--ari-pass",
            PASS,
            "--relay",
            &format!("{r1_url},{r2_url}"),
            "--relay-ca",
            pki.ca.to_str().unwrap(),
            "--relay-cert",
            pki.control.cert.to_str().unwrap(),
            "--relay-key",
            pki.control.key.to_str().unwrap(),
            "--metrics",
            &format!("{c_root}:0"),
            "--port-range",
            "22000-22099",
            "--echo-host",
            C_ADDR,
            "--echo-port",
            "4000",
            "--call-log",
            calls_log.to_str().unwrap(),
        ],
        "control ready",
        "metrics",
    );

    // Each relay's channels, once all forty calls flow: Asterisk's address known, RTP both ways.
    let flowing = |ctl: &Path, n: usize| {
        let mut c = RelayClient::connect(ctl).unwrap();
        wait_for(
            &format!("{n} channels flowing on {}", ctl.display()),
            Duration::from_secs(15),
            || {
                let list = c.list().ok()?;
                (list.len() == n
                    && list.iter().all(|c| {
                        c.asterisk.is_some_and(|a| a.ip().to_string() == C_ADDR)
                            && c.traffic.to_echo.packets > 0
                            && c.traffic.to_asterisk.packets > 0
                    }))
                .then_some(list)
            },
        )
    };
    // Equal capacities: the calls alternate, 20 and 20.
    let on_r1 = flowing(&r1_ctl, 20);
    let on_r2 = flowing(&r2_ctl, 20);
    let mut ports: Vec<u16> = on_r1.iter().chain(&on_r2).map(|c| c.port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 40, "{ports:?}");
    let metrics = http_get(&http, "/metrics").unwrap().1;
    for url in [&r1_url, &r2_url] {
        assert_eq!(
            metric(
                &metrics,
                &format!("rtprelay_control_relay_calls{{relay=\"{url}\"}}")
            ),
            Some(20.0),
            "{metrics}"
        );
    }
    assert_eq!(
        metric(&metrics, "rtprelay_control_relay_connected"),
        Some(2.0)
    );

    // r1 dies mid-call: its twenty calls move to r2 (room for forty), each silent for the
    // grace (500 ms) and the move.
    let killed = std::process::Command::new("kill")
        .args(["-9", &r1_proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    drop(r1_proc);
    wait_for("the twenty calls moved", Duration::from_secs(10), || {
        let m = http_get(&http, "/metrics").ok()?.1;
        (metric(&m, "rtprelay_control_calls_moved_total") == Some(20.0)).then_some(())
    });
    let moved: Vec<String> = on_r1
        .iter()
        .map(|c| {
            c.channel
                .as_str()
                .trim_start_matches("rtprelay-em-")
                .to_owned()
        })
        .collect();
    flowing(&r2_ctl, 40);

    // Every call comes back whole through its own relay.
    let end = Instant::now() + Duration::from_secs(30);
    while sim.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "sim-asterisk did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["bridged"], 40, "{r}");
    let calls = r["per_call"].as_array().unwrap();
    assert_eq!(calls.len(), 40, "{r}");
    let records: Vec<Value> = wait_for("40 call records", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&calls_log).ok()?;
        let v: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (v.len() == 40).then_some(v)
    });
    for c in calls {
        assert_eq!(c["end"], "completed", "every call survives: {c}");
        let id = c["id"].as_str().unwrap();
        let rec = records.iter().find(|r| r["caller_id"] == id).unwrap();
        let (sent, received) = (c["sent"].as_u64().unwrap(), c["received"].as_u64().unwrap());
        let gap = c["max_gap_ms"].as_f64().unwrap();
        let unmeasured = rec["unmeasured_ms"].as_f64().unwrap();
        if moved.iter().any(|m| m == id) {
            // Audio back within 1 s of the loss; the record merges both relays' figures.
            assert!(gap < 1_000.0, "{c}");
            assert_eq!(rec["relays"], serde_json::json!(["r1", "r2"]), "{rec}");
            assert!(unmeasured <= 3_000.0, "{rec}");
            assert!(sent >= 300, "{c}");
        } else {
            assert!(sent >= 300 && received + 2 >= sent, "RTP lost: {c}");
            assert_eq!(rec["relays"], serde_json::json!(["r2"]), "{rec}");
        }
    }

    // Prometheus saw both relays carry their twenty.
    if let Some(prom) = &prom {
        wait_for(
            "Prometheus to see r1's channels, and r2's 40 once r1's moved",
            Duration::from_secs(10),
            || {
                // r1 was scraped (every second) until its death, which came as soon as its
                // twentieth call flowed: it may not have been scraped holding all twenty.
                let seen = prom.query("max_over_time(rtprelay_channels{job=\"relay\"}[1m])");
                (seen.len() == 2
                    && seen[0].0 == "10.201.1.2:9100"
                    && (1.0..=20.0).contains(&seen[0].1)
                    && seen[1] == ("10.201.2.2:9100".into(), 40.0))
                    .then_some(())
            },
        );
    }
    // The dashboard's "Relay" variable offers both relays, and a relay panel set to one of
    // them shows that relay's traffic.
    if let Some(prom) = &prom {
        let dashboard: Value = serde_json::from_str(include_str!(
            "../../docker/grafana/dashboards/rtp-relay.json"
        ))
        .unwrap();
        let variable = &dashboard["templating"]["list"][0];
        assert_eq!(variable["name"], "instance", "{variable}");
        let values = variable["query"]["query"]
            .as_str()
            .unwrap()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(", instance)"))
            .expect("label_values(<series>, instance)");
        let path = format!(
            "/api/v1/label/instance/values?match[]={}",
            urlencode(values)
        );
        let found: Value = serde_json::from_str(&http_get(&prom.addr, &path).unwrap().1).unwrap();
        assert_eq!(
            found["data"],
            serde_json::json!(["10.201.1.2:9100", "10.201.2.2:9100"]),
            "{found}"
        );
        let forwarded = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == "Forwarded packets/s by direction")
            .expect("the forwarded packets panel");
        let expr = forwarded["targets"][0]["expr"].as_str().unwrap();
        for instance in ["10.201.1.2:9100", "10.201.2.2:9100"] {
            let one = prom.query(
                &expr
                    .replace("$__rate_interval", "1m")
                    .replace("$instance", instance),
            );
            assert_eq!(one.len(), 2, "{instance}: {expr}: {one:?}");
            assert!(one.iter().all(|(_, v)| *v > 0.0), "{instance}: {one:?}");
        }
    }
    eprintln!("netns test: {:.1} s", started.elapsed().as_secs_f64());
}
