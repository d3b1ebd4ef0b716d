//! The full pipeline over loopback, as a user runs it: `sim-asterisk` (playing Asterisk 22),
//! `control`, `relay` (io_uring, strict: it only accepts the address control gives it) and `echo`,
//! each its own process. Every test ends by checking that nothing leaked: no channel or bridge left
//! in the simulated Asterisk, no relay channel, every port back in the pool, and the ARI password
//! never in control's log.
//!
//! - 50 calls for 10 s: every call bridged, RTP both ways, the relay measures RTT on every call
//!   with no drop and no strict-RTP drop; afterwards the relay's file descriptors are back to their
//!   starting count and control's no higher.
//! - 20 calls through `--echo-leg shared`, once on each backend: every call bridged, its RTP back
//!   from its own port with its own SSRC (the simulator would count anything else as a strict-RTP
//!   drop or malformed: none), measured and scored by the relay.
//! - The relay killed (SIGKILL) mid-run and started again: every call flows both ways again within
//!   2 s (measured: 0.07 s), by control's resync.
//! - The events WebSocket dropped mid-run: control reconnects, and every call, those originated
//!   during and after the drop included, is bridged.
//! - A 5-port range with 10 simultaneous calls: 5 bridged, 5 hung up cleanly, counted as `no_port`.
//! - Answer failing with 404 on every first attempt: every retry succeeds.
//! - Failures injected at the externalMedia, bridge-creation and addChannel stages: each failed
//!   call unwinds completely, and control's failure counters equal the injected counts, stage by
//!   stage.
//! - 200 calls at once against an Asterisk answering each request in 50 ms: all set up within 5 s
//!   (measured 0.23-0.31 s).
//! - Control stopped (SIGTERM) mid-call: it exits 0 after tearing every call down.
//! - `loadgen ari --callers tone` against the simulator: calls originated, held, hung up, both
//!   summaries printed.
//! - Through Asterisk (`through_asterisk_*`, once on each backend): `loadgen ari --callers rtp`, 2
//!   calls of 8 s, in two runs with `--bridge-delay 1ms` and `3ms --bridge-loss 0.05`. Asterisk in
//!   and Asterisk out each grow by 2 x 2 ms within 0.2 ms at p50 (two traversals each way; measured
//!   4.00-4.11 ms), the relay loop by no more than 0.2 ms (measured under 0.05 ms); the probes lost
//!   before and after the relay equal, exactly, the simulator's frames dropped or unrouted on each
//!   side; every probe's four stamps are in order (sent < relay arrival < relay return < back), so
//!   its legs add up; at most two probes a call unsplit; a tone call in the same run comes back
//!   byte for byte and the relay records no probe for it.
//! - A real Prometheus scraping relay, control and echo every second during 20 calls: targets up,
//!   packet counters equal to what the simulated Asterisk sent and received, `histogram_quantile`
//!   p50/p99 in the same bucket as the relay's HdrHistogram, every dashboard panel's query returns
//!   data, the alert rules load healthy.
//!
//! Every call record the tests produce is validated against `docs/call-record.schema.json`.
//!
//! The tests run one at a time (a lock): each drives real-time RTP on a two-core machine.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use sim_asterisk::relay_client::RelayClient;
use testkit::{
    fd_count, fd_counts, http_get, start, start_logged, uring_available, wait_for, Log, Proc,
};

static SERIAL: Mutex<()> = Mutex::new(());

const PASS: &str = "pipeline-secret";

/// The four processes of a run.
struct Pipeline {
    echo_addr: String,
    /// The echo's metrics URL.
    echo_metrics: String,
    /// The relay's metrics URL.
    relay_metrics: String,
    relay: Option<Proc>,
    control: Proc,
    control_http: String,
    control_log: Log,
    sim: Proc,
    sim_url: String,
    sim_json: PathBuf,
    /// Control's call log.
    call_log: PathBuf,
    ctl: PathBuf,
    ports: usize,
    /// Extra flags for the relay (e.g. `--cores`).
    relay_args: Vec<&'static str>,
    _echo: Proc,
}

impl Pipeline {
    /// Starts echo, relay, sim-asterisk (with `sim_args`) and control (with `ports`, a range such
    /// as `21000-21099`); returns once control reports both links up.
    fn launch(name: &str, sim_args: &[&str], ports: &str) -> Self {
        Self::launch_logging_to(name, sim_args, ports, None, &[])
    }

    /// [`Pipeline::launch`], with control's call log at `call_log` (default: a fresh temporary
    /// file).
    fn launch_logging_to(
        name: &str,
        sim_args: &[&str],
        ports: &str,
        log_to: Option<&std::path::Path>,
        relay_args: &[&'static str],
    ) -> Self {
        let tmp = std::env::temp_dir();
        let ctl = tmp.join(format!("rtp-pipeline-{}-{name}.sock", std::process::id()));
        let sim_json = tmp.join(format!("rtp-pipeline-{}-{name}.json", std::process::id()));
        let _ = std::fs::remove_file(&sim_json);
        let call_log = tmp.join(format!(
            "rtp-pipeline-{}-{name}.calls.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&call_log);
        let call_log = log_to.map_or(call_log, std::path::Path::to_path_buf);
        let (echo, echo_addr, echo_log) = start_logged(
            "echo",
            &["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
            "echo ready",
            "listen",
        );
        let echo_metrics = log_value(&echo_log, "echo ready", "metrics");
        let mut p = Self {
            relay: None,
            control: Proc(std::process::Command::new("true").spawn().unwrap()),
            control_http: String::new(),
            control_log: Log::default(),
            sim: Proc(std::process::Command::new("true").spawn().unwrap()),
            sim_url: String::new(),
            sim_json,
            call_log,
            ctl,
            ports: 0,
            relay_args: relay_args.to_vec(),
            echo_addr,
            echo_metrics,
            relay_metrics: String::new(),
            _echo: echo,
        };
        p.start_relay();
        let json = p.sim_json.to_str().unwrap().to_owned();
        let (sim, sim_addr) = start(
            "sim-asterisk",
            &[
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--ari-pass",
                    PASS,
                    "--json",
                    &json,
                    "--grace",
                    "5s",
                ][..],
                sim_args,
            ]
            .concat(),
            "sim-asterisk ready",
            "listen",
        );
        p.sim = sim;
        p.sim_url = format!("http://{sim_addr}");
        let (lo, hi) = ports.split_once('-').unwrap();
        p.ports = usize::from(hi.parse::<u16>().unwrap() - lo.parse::<u16>().unwrap() + 1);
        let (echo_host, echo_port) = p.echo_addr.rsplit_once(':').unwrap();
        let (control, http, log) = start_logged(
            "control",
            &[
                "--ari-url",
                &p.sim_url,
                "--ari-pass",
                PASS,
                "--relay-socket",
                p.ctl.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:0",
                "--port-range",
                ports,
                "--echo-host",
                echo_host,
                "--echo-port",
                echo_port,
                "--metrics-interval-sec",
                "2",
                "--call-log",
                p.call_log.to_str().unwrap(),
            ],
            "control ready",
            "metrics",
        );
        p.control = control;
        p.control_http = http;
        p.control_log = log;
        wait_for(
            "control's links up (/healthz 200)",
            Duration::from_secs(10),
            || {
                http_get(&p.control_http, "/healthz")
                    .ok()
                    .filter(|(s, _)| *s == 200)
            },
        );
        p
    }

    fn start_relay(&mut self) {
        let (relay, metrics) = start(
            "relay",
            &[
                "--ctl",
                self.ctl.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:0",
                "--echo",
                &self.echo_addr,
                "--strict",
            ]
            .into_iter()
            .chain(self.relay_args.iter().copied())
            .collect::<Vec<_>>(),
            "relay ready",
            "metrics",
        );
        self.relay = Some(relay);
        self.relay_metrics = metrics;
    }

    fn relay_pid(&self) -> u32 {
        self.relay.as_ref().unwrap().pid()
    }

    fn relay(&self) -> RelayClient {
        RelayClient::connect(&self.ctl).unwrap()
    }

    /// Control's `/stats`.
    fn stats(&self) -> Value {
        let (status, body) = http_get(&self.control_http, "/stats").unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Control's `/metrics`.
    fn metrics(&self) -> String {
        http_get(&self.control_http, "/metrics").unwrap().1
    }

    /// Waits until every relay channel control made has Asterisk's address and RTP flowing
    /// both ways; returns the channel count.
    fn wait_flowing(&self, calls: usize, deadline: Duration) {
        let mut relay = self.relay();
        wait_for(
            &format!("{calls} relay channels with RTP both ways"),
            deadline,
            || {
                let list = relay.list().ok()?;
                (list.len() == calls
                    && list.iter().all(|c| {
                        c.asterisk.is_some()
                            && c.traffic.to_echo.packets > 0
                            && c.traffic.to_asterisk.packets > 0
                    }))
                .then_some(())
            },
        );
    }

    /// Waits for sim-asterisk to finish; its JSON report.
    fn finish(&mut self, deadline: Duration) -> Value {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.sim.0.try_wait().unwrap() {
                assert!(status.success(), "sim-asterisk failed: {status}");
                break;
            }
            assert!(Instant::now() < end, "sim-asterisk did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.sim_json).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Nothing left anywhere: the simulated Asterisk's channels and bridges, the relay's
    /// channels, control's calls and ports.
    /// Control's call records so far, each checked against `docs/call-record.schema.json`.
    fn call_records(&self) -> Vec<Value> {
        let schema: Value = serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../docs/call-record.schema.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let validator = jsonschema::validator_for(&schema).expect("a valid schema");
        let text = std::fs::read_to_string(&self.call_log).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                let errors: Vec<String> =
                    validator.iter_errors(&v).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{errors:?} in {v}");
                v
            })
            .collect()
    }

    fn assert_clean(&self, report: &Value) {
        let log = self.control_log.lock().unwrap();
        assert!(log.len() > 3, "control logged");
        assert!(
            log.iter().all(|l| !l.contains(PASS)),
            "the ARI password appeared in control's log"
        );
        drop(log);
        assert_eq!(report["channels_left"], 0, "channels left in Asterisk");
        assert_eq!(report["bridges_left"], 0, "bridges left in Asterisk");
        let mut relay = self.relay();
        wait_for(
            "the relay to have no channel",
            Duration::from_secs(5),
            || relay.list().ok().filter(Vec::is_empty),
        );
        wait_for(
            "control to have no call and a full pool",
            Duration::from_secs(5),
            || {
                let s = self.stats();
                (s["calls"]["active"] == 0
                    && s["ports"]["free"] == self.ports
                    && s["ports"]["in_use"] == 0
                    && s["links"]["relay_channels"] == 0)
                    .then_some(())
            },
        );
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.sim_json);
    }
}

/// The value of `key=` on the first logged line containing `line`.
fn log_value(log: &Log, line: &str, key: &str) -> String {
    let log = log.lock().unwrap();
    let l = log
        .iter()
        .find(|l| l.contains(line))
        .expect("the ready line");
    let at = l.find(&format!("{key}=")).expect("the key") + key.len() + 1;
    l[at..].split_whitespace().next().unwrap_or("").to_owned()
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The report without its per-call list, for failure messages.
fn brief(r: &Value) -> Value {
    let mut v = r.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("per_call");
    }
    v
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics"))
}

#[test]
fn fifty_calls_are_bridged_measured_and_leave_nothing_behind() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let mut p = Pipeline::launch(
        "fifty",
        &["--calls", "50", "--ramp", "1s", "--hold", "10s"],
        "21000-21099",
    );
    // Calls may already be arriving: the relay's baseline is what it holds besides UDP (channel)
    // sockets, read in one pass.
    let (all, udp) = fd_counts(p.relay_pid());
    let (relay_fds, control_fds) = (all - udp, fd_count(p.control.pid()));
    p.wait_flowing(50, Duration::from_secs(10));
    // The relay measures the round trip of every call.
    let mut relay = p.relay();
    for c in relay.list().unwrap() {
        let s = relay.channel(c.channel.as_str()).unwrap();
        assert!(s.rtt.count > 0, "no RTT measured on {}", c.channel.as_str());
        assert_eq!(
            s.drops.total(),
            0,
            "drops on {}: {:?}",
            c.channel.as_str(),
            s.drops
        );
    }
    drop(relay);
    let r = p.finish(Duration::from_secs(30));
    assert_eq!(u(&r["calls"]), 50);
    assert_eq!(u(&r["bridged"]), 50, "{}", brief(&r));
    // The main job's shape: MEDIA_FORMAT=auto bridges every call in its caller's native format.
    assert_eq!(u(&r["transcoding_calls"]), 0, "{}", brief(&r));
    // One record per call, valid against the schema, with the relay's figures and a score.
    let records = wait_for("50 call records", Duration::from_secs(10), || {
        let v = p.call_records();
        (v.len() == 50).then_some(v)
    });
    for c in &records {
        assert_eq!(c["ended_by"], "caller", "{c}");
        assert_eq!(c["hangup_cause"], 16, "{c}");
        assert_eq!(c["format"], "ulaw", "{c}");
        assert!(
            c["failure_stage"].is_null() && c["bridged"].is_string(),
            "{c}"
        );
        let relay = &c["relay"];
        assert!(u(&relay["packets_to_echo"]) >= 450, "{c}");
        assert!(u(&relay["rtt_count"]) >= 440, "{c}");
        // Loopback with no loss: an excellent score.
        assert!(relay["mos"].as_f64().unwrap() > 4.3, "{c}");
    }
    assert_eq!(u(&r["strict_rtp_drops"]), 0);
    assert_eq!(u(&r["malformed"]), 0);
    for c in r["per_call"].as_array().unwrap() {
        assert_eq!(c["end"], "completed", "{c}");
        // 10 s at 50/s; the first packets leave once the bridge is up.
        assert!(u(&c["sent"]) >= 450, "{c}");
        assert!(u(&c["received"]) + 2 >= u(&c["sent"]), "RTP lost: {c}");
    }
    p.assert_clean(&r);
    let s = p.stats();
    assert_eq!(u(&s["calls"]["completed"]), 50, "{s}");
    assert_eq!(u(&s["calls"]["bridged"]), 50);
    assert!(u(&s["relay"]["rtt"]["count"]) > 50 * 400, "{s}");
    wait_for(
        "the relay's descriptors back to their count",
        Duration::from_secs(5),
        || {
            let (all, udp) = fd_counts(p.relay_pid());
            (udp == 0 && all == relay_fds).then_some(())
        },
    );
    wait_for(
        "control's descriptors back to their count",
        Duration::from_secs(10),
        || (fd_count(p.control.pid()) <= control_fds).then_some(()),
    );
}

/// The shared echo leg under control and a strict simulated Asterisk: every call's RTP comes
/// back from its own port with its own SSRC (the simulator counts anything else as a strict-RTP
/// drop or malformed), measured by the relay, scored, and nothing is left behind.
fn calls_through_a_shared_echo_leg_get_their_own_packets_back(backend: &'static str) {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let name = format!("shared-{backend}");
    let mut p = Pipeline::launch_logging_to(
        &name,
        &["--calls", "20", "--ramp", "1s", "--hold", "8s"],
        "21400-21439",
        None,
        &["--backend", backend, "--echo-leg", "shared"],
    );
    let (_, text) = http_get(&host_port(&p.relay_metrics), "/metrics").unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("rtprelay_info{") && l.contains("echo_leg=\"shared\"")),
        "the relay runs the shared leg:\n{text}"
    );
    let r = p.finish(Duration::from_secs(30));
    assert_eq!(u(&r["bridged"]), 20, "{}", brief(&r));
    assert_eq!(u(&r["strict_rtp_drops"]), 0, "{}", brief(&r));
    assert_eq!(u(&r["malformed"]), 0, "{}", brief(&r));
    for c in r["per_call"].as_array().unwrap() {
        assert_eq!(c["end"], "completed", "{c}");
        assert!(u(&c["sent"]) >= 350, "{c}");
        assert!(u(&c["received"]) + 2 >= u(&c["sent"]), "RTP lost: {c}");
    }
    let records = wait_for("20 call records", Duration::from_secs(10), || {
        let v = p.call_records();
        (v.len() == 20).then_some(v)
    });
    for c in &records {
        let relay = &c["relay"];
        assert!(u(&relay["rtt_count"]) >= 340, "{c}");
        assert!(relay["mos"].as_f64().unwrap() > 4.3, "{c}");
    }
    p.assert_clean(&r);
}

#[test]
fn calls_through_a_shared_echo_leg_get_their_own_packets_back_uring() {
    calls_through_a_shared_echo_leg_get_their_own_packets_back("uring");
}

#[test]
fn calls_through_a_shared_echo_leg_get_their_own_packets_back_tokio() {
    calls_through_a_shared_echo_leg_get_their_own_packets_back("tokio");
}

#[test]
fn calls_flow_again_within_250_ms_of_a_relay_restart() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let mut p = Pipeline::launch(
        "restart",
        &["--calls", "10", "--ramp", "0s", "--hold", "10s"],
        "21100-21199",
    );
    p.wait_flowing(10, Duration::from_secs(10));
    drop(p.relay.take()); // SIGKILL: no goodbye, the socket file stays behind
    wait_for(
        "control to see the relay gone",
        Duration::from_secs(5),
        || {
            http_get(&p.control_http, "/healthz")
                .ok()
                .filter(|(s, _)| *s == 503)
        },
    );
    p.start_relay();
    // From the new relay's socket being ready (its ready line) to RTP flowing again on every
    // call: control's link retries every 5–20 ms and resyncs at once (target 100 ms).
    let restarted = Instant::now();
    p.wait_flowing(10, Duration::from_millis(250));
    eprintln!("flowing again {:?} after the restart", restarted.elapsed());
    let s = p.stats();
    assert!(u(&s["links"]["relay_resyncs"]) >= 1, "{s}");
    let r = p.finish(Duration::from_secs(30));
    assert_eq!(u(&r["bridged"]), 10, "{}", brief(&r));
    assert_eq!(u(&r["strict_rtp_drops"]), 0);
    p.assert_clean(&r);
    assert!(
        metric(
            &p.metrics(),
            "rtprelay_control_relay_channels_readded_total"
        ) >= 10.0
    );
}

#[test]
fn a_dropped_websocket_is_reconnected_and_new_calls_are_handled() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let mut p = Pipeline::launch(
        "wsdrop",
        &[
            "--calls",
            "20",
            "--ramp",
            "4s",
            "--hold",
            "2s",
            "--drop-ws-at",
            "2s",
        ],
        "21200-21299",
    );
    let r = p.finish(Duration::from_secs(30));
    assert_eq!(u(&r["ws_drops"]), 1);
    assert!(u(&r["ws_connections"]) >= 2, "{}", brief(&r));
    // Calls originated after the drop (half of them) were handled too.
    assert_eq!(u(&r["bridged"]), 20, "{}", brief(&r));
    assert_eq!(u(&r["strict_rtp_drops"]), 0);
    p.assert_clean(&r);
    let s = p.stats();
    assert!(u(&s["links"]["ws_reconnects"]) >= 1, "{s}");
    assert_eq!(u(&s["calls"]["completed"]), 20, "{s}");
}

#[test]
fn five_ports_for_ten_calls_bridge_five_and_hang_up_five_cleanly() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let mut p = Pipeline::launch(
        "fiveports",
        &["--calls", "10", "--ramp", "0s", "--hold", "3s"],
        "21300-21304",
    );
    let r = p.finish(Duration::from_secs(30));
    assert_eq!(u(&r["bridged"]), 5, "{}", brief(&r));
    assert_eq!(u(&r["hung_up_by_app"]), 5, "{}", brief(&r));
    for c in r["per_call"].as_array().unwrap() {
        let bridged = c["bridged"] == true;
        assert_eq!(
            c["end"],
            if bridged {
                "completed"
            } else {
                "hung_up_by_app"
            },
            "{c}"
        );
    }
    p.assert_clean(&r);
    let s = p.stats();
    assert_eq!(u(&s["calls"]["no_port"]), 5, "{s}");
    assert_eq!(u(&s["ports"]["exhausted"]), 5, "{s}");
    assert_eq!(
        metric(
            &p.metrics(),
            "rtprelay_control_setup_failures_total{stage=\"port\"}"
        ),
        5.0
    );
}

#[test]
fn an_answer_failing_with_404_is_retried() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let mut p = Pipeline::launch(
        "answer404",
        &[
            "--calls",
            "5",
            "--ramp",
            "0s",
            "--hold",
            "2s",
            "--answer-404",
            "1",
        ],
        "21400-21409",
    );
    let r = p.finish(Duration::from_secs(30));
    assert_eq!(u(&r["answer_404_injected"]), 5, "{}", brief(&r));
    assert_eq!(u(&r["answered"]), 5, "{}", brief(&r));
    assert_eq!(u(&r["bridged"]), 5, "{}", brief(&r));
    p.assert_clean(&r);
    let m = p.metrics();
    assert_eq!(
        metric(
            &m,
            "rtprelay_control_ari_requests_total{op=\"answer\",status=\"404\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(
            &m,
            "rtprelay_control_ari_requests_total{op=\"answer\",status=\"204\"}"
        ),
        5.0
    );
}

#[test]
fn failures_at_every_stage_unwind_without_leaking() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let mut p = Pipeline::launch(
        "unwind",
        &[
            "--calls",
            "30",
            "--ramp",
            "1s",
            "--hold",
            "2s",
            "--seed",
            "3",
            "--fail",
            "external_media=0.25",
            "--fail",
            "create_bridge=0.25",
            "--fail",
            "add_channel=0.25",
        ],
        "21500-21599",
    );
    let r = p.finish(Duration::from_secs(30));
    let injected = |op: &str| r["injected_failures"][op].as_u64().unwrap_or(0);
    let (em, br, add) = (
        injected("external_media"),
        injected("create_bridge"),
        injected("add_channel"),
    );
    assert!(
        em > 0 && br > 0 && add > 0,
        "every stage failed at least once: {}",
        brief(&r)
    );
    assert_eq!(u(&r["bridged"]) + em + br + add, 30, "{}", brief(&r));
    assert_eq!(u(&r["hung_up_by_app"]), em + br + add, "{}", brief(&r));
    p.assert_clean(&r);
    let m = p.metrics();
    let stage = |s: &str| {
        metric(
            &m,
            &format!("rtprelay_control_setup_failures_total{{stage=\"{s}\"}}"),
        )
    };
    assert_eq!(stage("external_media"), em as f64);
    assert_eq!(stage("bridge"), (br + add) as f64);
    assert_eq!(u(&p.stats()["calls"]["failed"]), em + br + add);
    // Every call has its record; the failed ones say at which stage, and were ended by control.
    let records = p.call_records();
    let failed = |s: &str| records.iter().filter(|c| c["failure_stage"] == s).count() as u64;
    assert_eq!(failed("external_media"), em);
    assert_eq!(failed("bridge"), br + add);
    assert!(records
        .iter()
        .filter(|c| !c["failure_stage"].is_null())
        .all(|c| c["ended_by"] == "control" && c["failure"].is_string()));
}

/// `loadgen ari --callers tone` against the pipeline, with `formats` as given (`""`: left out);
/// its JSON.
fn loadgen_ari(p: &Pipeline, formats: &str) -> Value {
    let json = p.sim_json.with_extension(format!("ari-{formats}.json"));
    let out = testkit::output(
        std::process::Command::new(testkit::bin("loadgen")).args([
            "ari",
            "--callers",
            "tone",
            "--json",
            json.to_str().unwrap(),
            "--ari-url",
            &p.sim_url,
            "--ari-pass",
            PASS,
            "--endpoint",
            "Local/s@load",
            "--formats",
            formats,
            "--calls",
            "3",
            "--ramp",
            "0s",
            "--hold",
            "2s",
            "--relay-ctl",
            p.ctl.to_str().unwrap(),
            "--control",
            &format!("http://{}", p.control_http),
        ]),
        Duration::from_secs(120),
        None,
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(
        stdout.contains("loadgen ari: 3 calls"),
        "a summary for people on stdout"
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[test]
fn loadgen_ari_originates_calls_and_reports_this_runs_figures_without_transcoding() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let mut p = Pipeline::launch(
        "ari",
        &["--calls", "0", "--serve-for", "14s"],
        "21600-21609",
    );
    // Default: formats=ulaw, so the caller's native format is ulaw and control bridges in ulaw.
    let v = loadgen_ari(&p, "ulaw");
    assert_eq!(u(&v["originated"]), 3, "{v}");
    assert_eq!(u(&v["hung_up"]), 3, "{v}");
    // This run's figures, not totals since the processes started.
    assert_eq!(u(&v["relay"]["run"]["channels_opened"]), 3, "{v}");
    assert!(u(&v["relay"]["run"]["rtt"]["count"]) > 0, "{v}");
    assert_eq!(u(&v["control"]["run"]["calls"]["completed"]), 3, "{v}");
    assert_eq!(u(&v["control"]["run"]["calls"]["transcoded"]), 0, "{v}");
    // Without formats Asterisk makes the Local channel slin192, which the relay does not
    // measure: control falls back to ulaw, and says so.
    let v = loadgen_ari(&p, "");
    assert_eq!(u(&v["relay"]["run"]["channels_opened"]), 3, "{v}");
    assert_eq!(u(&v["control"]["run"]["calls"]["completed"]), 3, "{v}");
    assert_eq!(u(&v["control"]["run"]["calls"]["transcoded"]), 3, "{v}");
    assert_eq!(
        u(&v["control"]["end"]["calls"]["completed"]),
        6,
        "the totals are kept beside: {v}"
    );
    let m = p.metrics();
    assert_eq!(
        metric(
            &m,
            "rtprelay_control_transcoded_calls_total{caller_format=\"slin192\"}"
        ),
        3.0
    );
    let r = p.finish(Duration::from_secs(30));
    assert_eq!(u(&r["bridged"]), 6, "{}", brief(&r));
    assert_eq!(
        u(&r["transcoding_calls"]),
        3,
        "only the calls originated without formats: {}",
        brief(&r)
    );
    p.assert_clean(&r);
}

#[test]
fn a_call_log_that_cannot_be_written_is_counted_and_stops_no_call() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    // /dev/full opens for appending and refuses every write (ENOSPC).
    let mut p = Pipeline::launch_logging_to(
        "full-log",
        &["--calls", "3", "--ramp", "0s", "--hold", "2s"],
        "21620-21629",
        Some(std::path::Path::new("/dev/full")),
        &[],
    );
    let r = p.finish(Duration::from_secs(20));
    assert_eq!(u(&r["bridged"]), 3, "{}", brief(&r));
    wait_for("3 call-log errors counted", Duration::from_secs(5), || {
        (metric(&p.metrics(), "rtprelay_control_call_log_errors_total") == 3.0).then_some(())
    });
    assert_eq!(u(&p.stats()["calls"]["completed"]), 3);
    let log = p.control_log.lock().unwrap().join("\n");
    assert!(
        log.contains("call log /dev/full"),
        "each failure is logged:\n{log}"
    );
    p.assert_clean(&r);
}

#[test]
fn the_events_websocket_is_back_within_a_second_of_asterisk_answering_again() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let mut p = Pipeline::launch(
        "asterisk-restart",
        &["--calls", "0", "--serve-for", "60s"],
        "21610-21619",
    );
    let listen = p.sim_url.trim_start_matches("http://").to_owned();
    // The first connection's reconciliation pass has finished (killing Asterisk during it fails
    // the pass, and the line this test counts is never written).
    wait_for(
        "the first reconciliation pass",
        Duration::from_secs(5),
        || {
            let log = p.control_log.lock().unwrap();
            log.iter()
                .any(|l| l.contains("reconciled with Asterisk"))
                .then_some(())
        },
    );
    // Asterisk goes away (kill -9) and stays away long enough for control's backoff to grow.
    drop(std::mem::replace(
        &mut p.sim,
        Proc(std::process::Command::new("true").spawn().unwrap()),
    ));
    wait_for(
        "control to see Asterisk gone",
        Duration::from_secs(5),
        || {
            http_get(&p.control_http, "/healthz")
                .ok()
                .filter(|(s, b)| *s == 503 && b.contains("events_ws down"))
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let (sim, _) = start(
        "sim-asterisk",
        &[
            "--listen",
            &listen,
            "--ari-pass",
            PASS,
            "--calls",
            "0",
            "--serve-for",
            "30s",
        ],
        "sim-asterisk ready",
        "listen",
    );
    p.sim = sim;
    let answering = Instant::now();
    wait_for(
        "the events WebSocket back within 1 s of Asterisk answering",
        Duration::from_secs(1),
        || {
            http_get(&p.control_http, "/healthz")
                .ok()
                .filter(|(s, _)| *s == 200)
        },
    );
    eprintln!(
        "events WebSocket back {:?} after Asterisk answered",
        answering.elapsed()
    );
    assert!(
        u(&p.stats()["links"]["ws_reconnects"]) >= 1,
        "{}",
        p.stats()
    );
    // One info line per reconciliation pass, saying what it found and did. The pass runs once the
    // WebSocket is up (which /healthz already shows), so its line may follow by a few ms.
    let log = wait_for(
        "a reconciliation line at each connection",
        Duration::from_secs(5),
        || {
            let log = p.control_log.lock().unwrap().join("\n");
            (log.matches("reconciled with Asterisk").count() >= 2).then_some(log)
        },
    );
    assert!(log.contains("calls_ended=0"), "{log}");
}

#[test]
fn two_hundred_calls_arriving_together_are_set_up_concurrently() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    // Every ARI request takes 50 ms: a call needs at least five in a row (answer, externalMedia,
    // bridge, addChannel, plus the wait for StasisStart), so 200 set-ups one after another would
    // take 50 s or more; side by side they take well under a second each.
    let mut p = Pipeline::launch(
        "together",
        &[
            "--calls",
            "200",
            "--ramp",
            "0s",
            "--hold",
            "3s",
            "--latency",
            "50ms",
        ],
        "21700-21999",
    );
    let r = p.finish(Duration::from_secs(60));
    assert_eq!(u(&r["bridged"]), 200, "{}", brief(&r));
    let slowest = u(&r["setup"]["max_ns"]) as f64 / 1e9;
    let fastest = u(&r["setup"]["min_ns"]) as f64 / 1e9;
    eprintln!("set-up of 200 simultaneous calls: {fastest:.3} s to {slowest:.3} s");
    assert!(fastest >= 0.2, "the 50 ms latency applies: {fastest} s");
    assert!(
        slowest < 5.0,
        "set-ups queued behind each other: slowest {slowest} s"
    );
    p.assert_clean(&r);
}

#[test]
fn stopping_control_tears_every_call_down() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    let mut p = Pipeline::launch(
        "stop",
        &["--calls", "5", "--ramp", "0s", "--hold", "6s"],
        "21800-21809",
    );
    p.wait_flowing(5, Duration::from_secs(10));
    let status = p.control.terminate(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "control exits cleanly: {status:?}"
    );
    let mut relay = p.relay();
    wait_for(
        "the relay to have no channel",
        Duration::from_secs(1),
        || relay.list().ok().filter(Vec::is_empty),
    );
    let r = p.finish(Duration::from_secs(30));
    assert_eq!(u(&r["bridged"]), 5, "{}", brief(&r));
    assert_eq!(u(&r["hung_up_by_app"]), 5, "{}", brief(&r));
    assert_eq!(r["channels_left"], 0);
    assert_eq!(r["bridges_left"], 0);
}

/// `host:port` of a `http://host:port/metrics` URL.
fn host_port(url: &str) -> String {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

/// A real Prometheus server scraping relay, control and echo every second.
struct Prometheus {
    _proc: Proc,
    addr: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(p: &Pipeline) -> Option<Self> {
        let Ok(path) = which("prometheus") else {
            eprintln!("SKIPPED (prometheus is not installed; scripts/test.sh installs the Debian package `prometheus` where it can)");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("rtp-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let alerts =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docker/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n\
             \x20 - job_name: relay\n    static_configs:\n      - targets: [\"{}\"]\n\
             \x20 - job_name: control\n    static_configs:\n      - targets: [\"{}\"]\n\
             \x20 - job_name: echo\n    static_configs:\n      - targets: [\"{}\"]\n",
            alerts.display(),
            host_port(&p.relay_metrics),
            p.control_http,
            host_port(&p.echo_metrics),
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = std::process::Command::new(path)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        let prom = Self {
            _proc: Proc(child),
            addr,
            dir,
        };
        wait_for("Prometheus to answer", Duration::from_secs(30), || {
            http_get(&prom.addr, "/-/ready")
                .ok()
                .filter(|(s, _)| *s == 200)
        });
        Some(prom)
    }

    /// An instant query; its result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let (status, body) = http_get(&self.addr, &path).unwrap();
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(status, 200, "query {promql}: {body}");
        assert_eq!(v["status"], "success", "query {promql}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of a query returning one series.
    fn scalar(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql);
        r.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Ok(log) = std::fs::read_to_string(self.dir.join("prometheus.log")) {
            if std::thread::panicking() {
                eprintln!("--- prometheus.log\n{log}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .ok_or(())
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

/// The index of the bucket (sorted upper bounds) a value falls in.
fn bucket_of(bounds: &[f64], v: f64) -> usize {
    bounds.iter().position(|&b| v <= b).unwrap_or(bounds.len())
}

#[test]
fn prometheus_agrees_with_the_relay_and_every_dashboard_panel_has_data() {
    let _s = serial();
    if !uring_available() {
        return;
    }
    // A relay of two shards: control needs nothing new, and the shard panels get two series.
    let mut p = Pipeline::launch_logging_to(
        "prometheus",
        &["--calls", "20", "--ramp", "1s", "--hold", "8s"],
        "21900-21999",
        None,
        &["--cores", "0,1"],
    );
    let Some(prom) = Prometheus::start(&p) else {
        return;
    };
    wait_for(
        "Prometheus to scrape relay, control and echo",
        Duration::from_secs(20),
        || {
            let up = prom.query("up");
            (up.len() == 3 && up.iter().all(|s| s["value"][1] == "1")).then_some(())
        },
    );
    let r = p.finish(Duration::from_secs(40));
    assert_eq!(u(&r["bridged"]), 20, "{}", brief(&r));
    // The calls are over: the relay's counters are final once Prometheus has scraped them.
    let (sent, received) = (u(&r["sent"]), u(&r["received"]));
    wait_for(
        "Prometheus to see every packet the simulated Asterisk sent",
        Duration::from_secs(15),
        || {
            (prom.scalar("sum(rtprelay_packets_total{direction=\"to_echo\"})")? == sent as f64)
                .then_some(())
        },
    );
    let back = prom
        .scalar("sum(rtprelay_packets_total{direction=\"to_asterisk\"})")
        .unwrap();
    if u(&r["lost"]) == 0 {
        assert_eq!(
            back, received as f64,
            "forwarded back = received by Asterisk"
        );
    } else {
        assert!((received as f64..=sent as f64).contains(&back));
    }
    wait_for(
        "Prometheus to see the echo's count reach every packet",
        Duration::from_secs(10),
        || (prom.scalar("sum(rtpecho_received_total)")? == sent as f64).then_some(()),
    );

    // histogram_quantile over the relay's buckets lands within one bucket of its HdrHistogram.
    let global = p.relay().global().unwrap();
    let mut bounds: Vec<f64> = prom
        .query("rtprelay_rtt_seconds_bucket")
        .iter()
        .filter_map(|s| s["metric"]["le"].as_str()?.parse::<f64>().ok())
        .filter(|b| b.is_finite())
        .collect();
    bounds.sort_by(f64::total_cmp);
    assert!(bounds.len() > 10, "{bounds:?}");
    for (q, hdr_ns) in [(0.5, global.rtt.p50_ns), (0.99, global.rtt.p99_ns)] {
        let promql = prom
            .scalar(&format!(
                "histogram_quantile({q}, sum by (le) (rtprelay_rtt_seconds_bucket))"
            ))
            .unwrap();
        let hdr = hdr_ns as f64 / 1e9;
        let (a, b) = (bucket_of(&bounds, promql), bucket_of(&bounds, hdr));
        eprintln!(
            "RTT q{q}: Prometheus {promql:.6} s (bucket {a}), HdrHistogram {hdr:.6} s (bucket {b})"
        );
        assert!(
            a.abs_diff(b) <= 1,
            "q{q}: Prometheus {promql} s vs relay {hdr} s, buckets {a} and {b}"
        );
    }

    // Every call was scored at its close: 20 MOS observations, an excellent median on loopback,
    // none at or below 3.6. (Each shard publishes its own snapshot: the last close may reach
    // Prometheus a scrape after the last packet did.)
    wait_for(
        "Prometheus to see 20 scored calls",
        Duration::from_secs(15),
        || (prom.scalar("sum(rtprelay_call_mos_count)") == Some(20.0)).then_some(()),
    );
    let median = prom
        .scalar("histogram_quantile(0.5, sum by (le) (rtprelay_call_mos_bucket))")
        .unwrap();
    assert!(median > 4.0, "median MOS {median}");
    assert_eq!(
        prom.scalar("sum(rtprelay_call_mos_bucket{le=\"3.6\"})"),
        Some(0.0)
    );

    // Every panel of the Grafana dashboard evaluates, with data.
    let dashboard: Value = serde_json::from_str(include_str!(
        "../../docker/grafana/dashboards/rtp-relay.json"
    ))
    .unwrap();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        for target in panel["targets"].as_array().unwrap() {
            // Grafana's substitutions: the rate window, and the "Relay" variable at "All".
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            let result = prom.query(&expr);
            assert!(
                !result.is_empty(),
                "panel {:?}: `{expr}` returned no data",
                panel["title"]
            );
            exprs += 1;
        }
    }
    assert!(exprs >= 24, "{exprs} queries");
    // The per-shard row shows both shards, and both carried calls.
    let per_shard = prom.query("sum by (shard) (rtprelay_shard_packets_total)");
    assert_eq!(per_shard.len(), 2, "{per_shard:?}");
    for s in &per_shard {
        let v: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
        assert!(v > 0.0, "every shard forwarded: {per_shard:?}");
    }

    // The alert rules are loaded and evaluate without error.
    let (_, rules) = http_get(&prom.addr, "/api/v1/rules").unwrap();
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let group = &rules["data"]["groups"][0];
    assert_eq!(group["name"], "rtp-relay");
    let list = group["rules"].as_array().unwrap();
    assert_eq!(list.len(), 7);
    for rule in list {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    p.assert_clean(&r);
}

/// `loadgen ari --callers rtp` against the pipeline: `calls` calls of `hold`; its JSON report
/// and every probe's four stamps (`sent, relay arrival, relay return, back`, 0 where unknown).
fn loadgen_rtp(p: &Pipeline, calls: u32, hold: &str) -> (Value, Vec<[u64; 4]>) {
    let json = p.sim_json.with_extension("rtp.json");
    let csv = p.sim_json.with_extension("probes.csv");
    let out = testkit::output(
        std::process::Command::new(testkit::bin("loadgen")).args([
            "ari",
            "--ari-url",
            &p.sim_url,
            "--ari-pass",
            PASS,
            "--calls",
            &calls.to_string(),
            "--ramp",
            "200ms",
            "--hold",
            hold,
            "--relay-ctl",
            p.ctl.to_str().unwrap(),
            "--control",
            &format!("http://{}", p.control_http),
            "--json",
            json.to_str().unwrap(),
            "--probes",
            csv.to_str().unwrap(),
        ]),
        Duration::from_secs(120),
        None,
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    for line in [
        "through Asterisk",
        "Asterisk in",
        "relay loop",
        "Asterisk out",
    ] {
        assert!(stdout.contains(line), "the summary shows {line:?}");
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    // `--probes`' header, as loadgen documents it.
    assert_eq!(
        lines.next(),
        Some("call,probe,sent_ns,relay_arrival_ns,relay_returned_ns,back_ns")
    );
    let probes = lines
        .map(|l| {
            let f: Vec<u64> = l.split(',').map(|x| x.parse().unwrap()).collect();
            [f[2], f[3], f[4], f[5]]
        })
        .collect();
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(csv);
    (v, probes)
}

/// A leg's p50 in µs.
fn p50(v: &Value, leg: &str) -> f64 {
    v["through_asterisk"][leg]["p50_us"]
        .as_f64()
        .unwrap_or_else(|| panic!("no {leg}: {}", v["through_asterisk"]))
}

/// The caller's round trip through the simulated Asterisk, split by the relay's times: more delay
/// injected in every bridge traversal comes back in Asterisk in and Asterisk out (two bridges
/// each way), not in the relay loop; drops injected in the bridges are counted on the side of the
/// relay they happened on, exactly; each probe's relay times lie between its send and its return,
/// so its legs add up to its total; and a call without probe headers (a tone caller in the same
/// run) comes back byte for byte.
fn through_asterisk(backend: &'static str, ports: [&str; 2]) {
    let _s = serial();
    if !uring_available() {
        return;
    }
    // Both runs go through the simulator's delay line, whose own wake-up (tens of µs) then
    // cancels out: what is compared is the growth for 2 ms more per traversal. Two calls, not
    // more: with six, the threads of the simulator and loadgen contend for the two cores enough
    // to move a leg's p50 by up to 0.28 ms between the runs (measured); with two, by 0.11 ms.
    const DELAY_MS: f64 = 2.0;
    const CALLS: u32 = 2;
    let relay_args: &[&'static str] = &["--backend", backend];
    let runs: Vec<(Value, Value, Vec<[u64; 4]>)> = [
        (["--bridge-delay", "1ms", "--bridge-loss", "0"], ports[0]),
        (["--bridge-delay", "3ms", "--bridge-loss", "0.05"], ports[1]),
    ]
    .into_iter()
    .enumerate()
    .map(|(run, (bridge, range))| {
        let sim_args = [
            &["--calls", "0", "--serve-for", "14s", "--seed", "7"][..],
            &bridge[..],
        ]
        .concat();
        let mut p = Pipeline::launch_logging_to(
            &format!("through-{backend}-{run}"),
            &sim_args,
            range,
            None,
            relay_args,
        );
        // A tone caller beside the probes in the first run: its payload has no header.
        let tone = (run == 0).then(|| {
            let (url, ctl) = (p.sim_url.clone(), p.ctl.clone());
            std::thread::spawn(move || {
                testkit::output(
                    std::process::Command::new(testkit::bin("loadgen")).args([
                        "ari",
                        "--callers",
                        "tone",
                        "--ari-url",
                        &url,
                        "--ari-pass",
                        PASS,
                        "--calls",
                        "1",
                        "--hold",
                        "3s",
                        "--relay-ctl",
                        ctl.to_str().unwrap(),
                    ]),
                    Duration::from_secs(60),
                    None,
                )
                .unwrap()
            })
        });
        let (v, probes) = loadgen_rtp(&p, CALLS, "8s");
        if let Some(t) = tone {
            assert!(t.join().unwrap().status.success());
        }
        let records = p.call_records();
        let r = p.finish(Duration::from_secs(30));
        p.assert_clean(&r);
        // Control's records carry the relay's view of the probe calls, and none of the tone's.
        let probe_calls: Vec<&Value> = records
            .iter()
            .filter(|c| c["relay"]["probe"]["received"].as_u64().unwrap_or(0) > 0)
            .collect();
        assert_eq!(probe_calls.len(), CALLS as usize, "{records:?}");
        if run == 0 {
            let tone: Vec<&Value> = records
                .iter()
                .filter(|c| {
                    !c["caller_id"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("loadgen-")
                })
                .collect();
            assert_eq!(tone.len(), 1, "{records:?}");
            assert!(
                u(&tone[0]["relay"]["packets_to_echo"]) > 0,
                "the tone call played: {}",
                tone[0]
            );
            // Its payload carries no header: the relay saw no probe and wrote nothing.
            assert!(tone[0]["relay"]["probe"].is_null(), "{}", tone[0]);
        }
        (v, r, probes)
    })
    .collect();
    let (base, delayed) = (&runs[0].0, &runs[1].0);
    // Every probe back with the relay's times has them between its send and its return.
    for (v, _, probes) in &runs {
        let split: Vec<&[u64; 4]> = probes.iter().filter(|p| p.iter().all(|&t| t > 0)).collect();
        assert!(
            split.len() as u64 >= u(&v["through_asterisk"]["asterisk_in"]["count"]),
            "{}",
            v["through_asterisk"]
        );
        for p in &split {
            assert!(
                p[0] < p[1] && p[1] < p[2] && p[2] < p[3],
                "a probe's stamps out of order (legs would not add up): {p:?}"
            );
        }
        // Only the first probes of a call, before the relay recognises it, go unsplit.
        let unsplit = u(&v["through_asterisk"]["unsplit"]);
        assert!(unsplit <= u64::from(CALLS) * 2, "{}", v["through_asterisk"]);
    }
    // A bridge delay D shows in Asterisk in and Asterisk out, two traversals each, not in the
    // relay loop.
    let grew = |leg: &str| (p50(delayed, leg) - p50(base, leg)) / 1_000.0;
    eprintln!(
        "grew by (ms): asterisk_in {}, relay {}, asterisk_out {}",
        grew("asterisk_in"),
        grew("relay"),
        grew("asterisk_out")
    );
    for leg in ["asterisk_in", "asterisk_out"] {
        assert!(
            (grew(leg) - 2.0 * DELAY_MS).abs() <= 0.2,
            "{leg} grew by {} ms for 2 x {DELAY_MS} ms of bridge delay",
            grew(leg)
        );
    }
    // The relay loop does not take the bridges' delay.
    assert!(
        grew("relay").abs() <= 0.2,
        "the relay loop moved by {} ms",
        grew("relay")
    );
    // No loss without injected drops; injected drops on the right side of the relay, exactly.
    assert_eq!(u(&base["lost"]["total"]), 0, "{}", base["lost"]);
    let (sim, lost) = (&runs[1].1, &delayed["lost"]);
    let side = |s: &str| u(&sim["bridges"][s]["dropped"]) + u(&sim["bridges"][s]["unrouted"]);
    assert!(
        u(&sim["bridges"]["toward_relay"]["dropped"]) > 0,
        "{}",
        sim["bridges"]
    );
    assert!(
        u(&sim["bridges"]["toward_caller"]["dropped"]) > 0,
        "{}",
        sim["bridges"]
    );
    assert_eq!(
        u(&lost["before_relay"]),
        side("toward_relay"),
        "{lost} {}",
        sim["bridges"]
    );
    assert_eq!(
        u(&lost["after_relay"]),
        side("toward_caller"),
        "{lost} {}",
        sim["bridges"]
    );
    assert_eq!(
        u(&lost["total"]),
        u(&lost["before_relay"]) + u(&lost["after_relay"])
    );
    // The tone call's payload came back as it was sent.
    let tone_calls: Vec<&Value> = runs[0].1["per_call"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| u(&c["received"]) > 0)
        .collect();
    assert_eq!(tone_calls.len(), 1, "{}", brief(&runs[0].1));
    assert_eq!(u(&tone_calls[0]["payload_changed"]), 0, "{}", tone_calls[0]);
}

#[test]
fn through_asterisk_legs_and_loss_per_side_io_uring() {
    through_asterisk("uring", ["21630-21639", "21640-21649"]);
}

#[test]
fn through_asterisk_legs_and_loss_per_side_tokio() {
    through_asterisk("tokio", ["21650-21659", "21660-21669"]);
}
