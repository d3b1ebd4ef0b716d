//! The call log: one JSON line per finished call (`--call-log PATH`, env `CALL_LOG`), so that
//! which calls were bad, and how bad for a listener, survives the run. `loadgen report` turns it
//! into an HTML report; `docs/call-record.schema.json` is its schema.
//!
//! Each record is written by one `write` on a file opened for appending, so concurrent calls
//! never interleave and a reader never sees half a line (short of a full disk). A failed write is
//! logged and counted (`rtprelay_control_call_log_errors_total`); it never holds up or fails a
//! call.
//!
//! With or without the file, the last [`RECENT_CALLS`] records are kept in memory, by caller id,
//! and served as `GET /calls/{caller_id}` ([`router`]): `loadgen ari` reads there the relay's
//! count of the probes it received on a call once the call is torn down, which splits the call's
//! loss on each side of the relay.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use appkit::http;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use relay_proto::{ChannelStats, ProbeStats};
use serde::Serialize;

use crate::metrics::Metrics;

/// Finished calls whose records `GET /calls/{caller_id}` serves: the newest this many.
pub const RECENT_CALLS: usize = 10_000;

/// Who ended a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndedBy {
    /// The caller hung up (its StasisEnd or ChannelDestroyed).
    Caller,
    /// The externalMedia channel went away.
    ExternalMedia,
    /// Asterisk no longer had the caller when control reconciled (an end it missed).
    Asterisk,
    /// Control: its set-up failed, no port was free, or control was stopping.
    Control,
}

/// One finished call.
#[derive(Clone, Debug, Serialize)]
pub struct CallRecord {
    /// The caller channel's id.
    pub caller_id: String,
    /// Its name (`PJSIP/alice-00000001`, `Local/s@load-00000002;1`).
    pub caller_name: String,
    /// The externalMedia channel's id (also the relay channel's).
    pub external_media_id: String,
    /// The relay port the call used, if it got one.
    pub relay_port: Option<u16>,
    /// The externalMedia format, once chosen.
    pub format: Option<String>,
    /// The caller's StasisStart, RFC 3339 with microseconds.
    pub started: String,
    /// When both channels were bridged, if they were.
    pub bridged: Option<String>,
    /// When the call's teardown finished.
    pub ended: String,
    /// Who ended it.
    pub ended_by: EndedBy,
    /// The hang-up cause (Q.850), when Asterisk gave one.
    pub hangup_cause: Option<u32>,
    /// Its text.
    pub hangup_cause_txt: Option<String>,
    /// The set-up stage that failed, if one did.
    pub failure_stage: Option<&'static str>,
    /// Why it failed.
    pub failure: Option<String>,
    /// StasisStart to bridged, milliseconds.
    pub setup_ms: Option<f64>,
    /// What the relays measured of the call: every relay channel it had, merged exactly
    /// (counters summed, round-trip histograms merged; a lost relay's from its last interim
    /// report); `null` if it had none.
    pub relay: Option<RelayFigures>,
    /// Every relay that carried the call, in order (more than one when its relay was lost and
    /// it moved); empty when none took it.
    pub relays: Vec<String>,
    /// Time since the call's first relay channel opened that no relay's figures cover, in
    /// milliseconds: a lost relay's last moments (after its last interim report), the grace
    /// period and the move. `null` when no relay took the call.
    pub unmeasured_ms: Option<f64>,
}

/// The relay's final statistics of a call, flattened for the record.
#[derive(Clone, Debug, Serialize)]
pub struct RelayFigures {
    /// Packets from Asterisk, forwarded to the echo.
    pub packets_to_echo: u64,
    /// Packets from the echo, forwarded to Asterisk.
    pub packets_to_asterisk: u64,
    /// Bytes toward the echo.
    pub bytes_to_echo: u64,
    /// Bytes toward Asterisk.
    pub bytes_to_asterisk: u64,
    /// RTP lost on Asterisk's stream (RFC 3550 A.1).
    pub lost_to_echo: u64,
    /// RTP lost on the round trip (sent to the echo, never back).
    pub lost_to_asterisk: u64,
    /// Duplicates, both streams.
    pub duplicates: u64,
    /// Reordered packets, both streams.
    pub reordered: u64,
    /// Late packets, both streams.
    pub late: u64,
    /// Echo timeouts.
    pub echo_timeouts: u64,
    /// Round trips measured.
    pub rtt_count: u64,
    /// RTT p50, microseconds.
    pub rtt_p50_us: f64,
    /// RTT p95, microseconds.
    pub rtt_p95_us: f64,
    /// RTT p99, microseconds.
    pub rtt_p99_us: f64,
    /// RTT max, microseconds.
    pub rtt_max_us: f64,
    /// RTT mean, microseconds.
    pub rtt_mean_us: f64,
    /// RFC 3550 jitter of the echo's return at close, microseconds.
    pub jitter_us: f64,
    /// E-model R-factor.
    pub r_factor: f64,
    /// Mean opinion score.
    pub mos: f64,
    /// Packets whose send the kernel stamped (both directions).
    pub kernel_timed: u64,
    /// Times not recorded for want of a usable kernel stamp (every kind).
    pub timestamps_missing: u64,
    /// Echoes that came back but whose round trip could not be timed.
    pub rtt_unmeasured: u64,
    /// The call's probe headers (`loadgen ari --callers rtp`), or `None` (JSON `null`) when no
    /// valid probe header crossed its channel.
    pub probe: Option<ProbeFigures>,
}

/// What the relay saw of a call's probe headers ([`relay_proto::probe`]), flattened.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeFigures {
    /// Whether the relay took the channel as carrying probes (three valid headers in a row).
    pub recognised: bool,
    /// Distinct valid probes the relay received from Asterisk, from the first: the caller's
    /// sent minus this is what was lost before the relay.
    pub received: u64,
    /// Valid probes back from the echo.
    pub returned: u64,
    /// Returns the relay wrote its two times into.
    pub written: u64,
    /// Relay loops measured (arrival from Asterisk to the echo's return, exact).
    pub loop_count: u64,
    /// Relay loop p50, microseconds.
    pub loop_p50_us: f64,
    /// Relay loop p99, microseconds.
    pub loop_p99_us: f64,
    /// Relay loop max, microseconds.
    pub loop_max_us: f64,
    /// Relay loop mean, microseconds.
    pub loop_mean_us: f64,
    /// Approximate Asterisk in measured (the relay's arrival minus the header's send time, a
    /// user-space reading on the sender's side).
    pub asterisk_in_count: u64,
    /// Approximate Asterisk in p50, microseconds.
    pub asterisk_in_p50_us: f64,
    /// Approximate Asterisk in p99, microseconds.
    pub asterisk_in_p99_us: f64,
    /// Approximate Asterisk in max, microseconds.
    pub asterisk_in_max_us: f64,
    /// Approximate Asterisk in mean, microseconds.
    pub asterisk_in_mean_us: f64,
    /// Probes whose approximate Asterisk in came out zero or negative (not in the figures).
    pub asterisk_in_negative: u64,
}

impl From<&ProbeStats> for ProbeFigures {
    fn from(p: &ProbeStats) -> Self {
        let us = |ns: u64| ns as f64 / 1e3;
        let (l, a) = (&p.relay_loop, &p.asterisk_in);
        Self {
            recognised: p.recognised,
            received: p.received,
            returned: p.returned,
            written: p.written,
            loop_count: l.count,
            loop_p50_us: us(l.p50_ns),
            loop_p99_us: us(l.p99_ns),
            loop_max_us: us(l.max_ns),
            loop_mean_us: us(l.mean_ns),
            asterisk_in_count: a.count,
            asterisk_in_p50_us: us(a.p50_ns),
            asterisk_in_p99_us: us(a.p99_ns),
            asterisk_in_max_us: us(a.max_ns),
            asterisk_in_mean_us: us(a.mean_ns),
            asterisk_in_negative: p.asterisk_in_negative,
        }
    }
}

impl From<&ChannelStats> for RelayFigures {
    fn from(s: &ChannelStats) -> Self {
        let us = |ns: u64| ns as f64 / 1e3;
        let (e, a) = (&s.streams.to_echo, &s.streams.to_asterisk);
        Self {
            packets_to_echo: s.traffic.to_echo.packets,
            packets_to_asterisk: s.traffic.to_asterisk.packets,
            bytes_to_echo: s.traffic.to_echo.bytes,
            bytes_to_asterisk: s.traffic.to_asterisk.bytes,
            lost_to_echo: e.lost,
            lost_to_asterisk: a.lost,
            duplicates: e.duplicates + a.duplicates,
            reordered: e.reordered + a.reordered,
            late: e.late + a.late,
            echo_timeouts: s.round_trip.timeouts,
            rtt_count: s.rtt.count,
            rtt_p50_us: us(s.rtt.p50_ns),
            rtt_p95_us: us(s.rtt.p95_ns),
            rtt_p99_us: us(s.rtt.p99_ns),
            rtt_max_us: us(s.rtt.max_ns),
            rtt_mean_us: us(s.rtt.mean_ns),
            jitter_us: us(a.jitter_ns),
            r_factor: s.score.r_factor,
            mos: s.score.mos,
            kernel_timed: s.timestamps.kernel,
            timestamps_missing: s.timestamps.missing.total(),
            rtt_unmeasured: s.round_trip.unmeasured,
            probe: s.probe.as_ref().map(ProbeFigures::from),
        }
    }
}

/// `t` in RFC 3339 with microseconds, UTC.
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// The newest finished calls' records, by caller id, each as its JSON line: at most a
/// capacity, the oldest dropped first.
#[derive(Debug)]
pub struct RecentCalls {
    /// Most records kept.
    capacity: usize,
    /// Caller ids, oldest first.
    order: VecDeque<String>,
    /// Records by caller id.
    by_id: HashMap<String, Arc<str>>,
}

impl RecentCalls {
    /// An empty store of at most `capacity` records.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            by_id: HashMap::new(),
        }
    }

    /// Keeps `json`, the record of call `caller_id`, as the newest (replacing an older record
    /// of the same id); drops the oldest past the capacity.
    pub fn insert(&mut self, caller_id: &str, json: Arc<str>) {
        if self.by_id.insert(caller_id.to_owned(), json).is_some() {
            // A caller id seen again (rare): it moves to the newest place.
            self.order.retain(|id| id != caller_id);
        }
        self.order.push_back(caller_id.to_owned());
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    /// The record of call `caller_id`, if it is still kept.
    #[must_use]
    pub fn get(&self, caller_id: &str) -> Option<Arc<str>> {
        self.by_id.get(caller_id).cloned()
    }

    /// Records kept.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is kept.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Where records go: the newest in memory ([`RecentCalls`]), and every one to the file when
/// there is one.
#[derive(Debug, Clone)]
pub struct CallLog {
    /// The file, opened for appending, and its path (for messages).
    file: Option<(Arc<File>, PathBuf)>,
    /// The newest records.
    recent: Arc<Mutex<RecentCalls>>,
}

impl CallLog {
    /// A log keeping the newest [`RECENT_CALLS`] records in memory only.
    #[must_use]
    pub fn in_memory() -> Self {
        Self {
            file: None,
            recent: Arc::new(Mutex::new(RecentCalls::new(RECENT_CALLS))),
        }
    }

    /// A log keeping the newest records in memory and appending every one to `path` (opened,
    /// or created, for appending).
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file: Some((Arc::new(file), path.to_owned())),
            ..Self::in_memory()
        })
    }

    /// The JSON record of the finished call `caller_id`, if it is among the newest kept.
    #[must_use]
    pub fn record(&self, caller_id: &str) -> Option<Arc<str>> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(caller_id)
    }

    /// Keeps `record` among the newest and appends it to the file as one line, in one write; a
    /// failure is logged and counted.
    pub async fn append(&self, record: &CallRecord, metrics: &Metrics) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                metrics.call_log_errors.inc();
                tracing::warn!("call log: cannot encode a record: {e}");
                return;
            }
        };
        let json: Arc<str> = String::from_utf8_lossy(&line).into();
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(&record.caller_id, json);
        let Some((file, path)) = &self.file else {
            return;
        };
        line.push(b'\n');
        let file = Arc::clone(file);
        let written =
            tokio::task::spawn_blocking(move || (&*file).write(&line).map(|n| (n, line.len())))
                .await;
        let failure = match written {
            Ok(Ok((n, len))) if n == len => return,
            Ok(Ok((n, len))) => format!("wrote {n} of {len} bytes"),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        metrics.call_log_errors.inc();
        tracing::warn!(caller = %record.caller_id, "call log {}: {failure}", path.display());
    }
}

/// `GET /calls/{caller_id}`: the record of a finished call among the newest [`RECENT_CALLS`]
/// (the call-record JSON), or 404 with a JSON error.
pub fn router(log: CallLog) -> axum::Router {
    axum::Router::new().route(
        "/calls/{caller_id}",
        axum::routing::get(
            move |axum::extract::Path(caller_id): axum::extract::Path<String>| {
                let log = log.clone();
                async move { call_record(&log, &caller_id) }
            },
        ),
    )
}

fn call_record(log: &CallLog, caller_id: &str) -> Response {
    match log.record(caller_id) {
        Some(json) => http::json_text(json.to_string()),
        None => {
            let body = serde_json::json!({
                "error": "unknown_call",
                "message": format!(
                    "no finished call with caller id {caller_id:?} (the newest {RECENT_CALLS} are kept)"
                ),
            });
            (
                StatusCode::NOT_FOUND,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                format!("{body}\n"),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::control::AddChannel;
    use relay_proto::probe::{self, Probe};
    use relay_proto::rtp::RtpHeader;
    use relay_proto::{
        ChannelId, Command, CommandOutcome, Format, MonoTime, Relay, RelayConfig, Ssrc,
    };
    use serde_json::Value;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn the_store_keeps_the_newest_records_and_drops_the_oldest() {
        let mut r = RecentCalls::new(RECENT_CALLS);
        for i in 0..=RECENT_CALLS {
            r.insert(&format!("c{i}"), format!("{{\"n\":{i}}}").into());
        }
        assert_eq!(r.len(), RECENT_CALLS);
        assert_eq!(r.get("c0"), None, "the oldest is dropped");
        assert_eq!(r.get("c1").as_deref(), Some("{\"n\":1}"));
        assert_eq!(
            r.get(&format!("c{RECENT_CALLS}")).as_deref(),
            Some(&*format!("{{\"n\":{RECENT_CALLS}}}"))
        );
        // A caller id seen again takes the newest place: the next drop is c2, not it.
        r.insert("c1", "{\"again\":true}".into());
        r.insert("new", "{}".into());
        assert_eq!(r.len(), RECENT_CALLS);
        assert_eq!(r.get("c1").as_deref(), Some("{\"again\":true}"));
        assert_eq!(r.get("c2"), None);
        assert!(r.get("c3").is_some());
    }

    /// The final statistics of a relay channel that carried `probes` probes and their echoes
    /// (the relay's own core, on a virtual clock).
    fn probe_channel_stats(probes: u32) -> ChannelStats {
        let mut relay = Relay::new(RelayConfig::default()).unwrap();
        relay.set_wall_offset(Some(1_764_547_200_000_000_000));
        let asterisk = "127.0.0.2:5000".parse().unwrap();
        let echo = relay.config().default_echo;
        let add = Command::Add(AddChannel {
            channel: ChannelId::try_from("rtprelay-em-1").unwrap(),
            port: 21_000,
            asterisk: Some(asterisk),
            echo: None,
            format: Format::Ulaw,
        });
        let CommandOutcome::Open(pending) = relay.handle_command(MonoTime::ZERO, add) else {
            panic!("add refused")
        };
        let socket = pending.socket();
        relay
            .complete_open(MonoTime::ZERO, pending, Ok(21_000))
            .unwrap();
        for seq in 0..probes {
            let mut b = vec![0xffu8; 172];
            RtpHeader {
                marker: false,
                payload_type: 0,
                sequence: u16::try_from(seq).unwrap(),
                timestamp: 160 * seq,
                ssrc: Ssrc(7),
            }
            .write(&mut b)
            .unwrap();
            let at = MonoTime::from_nanos(u64::from(seq) * 20_000_000 + 1_000_000_000);
            let sent_ns = 1_764_547_200_000_000_000 + at.as_nanos() - 500_000;
            probe::write(
                &mut b[12..],
                Probe {
                    call: 1,
                    seq,
                    sent_ns,
                },
            )
            .unwrap();
            let _ = relay.handle_received(at, at, socket, asterisk, &mut b);
            let back = MonoTime::from_nanos(at.as_nanos() + 250_000);
            let _ = relay.handle_received(back, back, socket, echo, &mut b);
        }
        relay
            .channel_stats(
                MonoTime::from_nanos(10_000_000_000),
                &ChannelId::try_from("rtprelay-em-1").unwrap(),
            )
            .unwrap()
    }

    fn record(caller: &str, stats: Option<&ChannelStats>) -> CallRecord {
        CallRecord {
            caller_id: caller.into(),
            caller_name: "Local/rtp-relay@stasis-00000001;2".into(),
            external_media_id: "rtprelay-em-1".into(),
            relay_port: Some(21_000),
            format: Some("ulaw".into()),
            started: rfc3339(SystemTime::UNIX_EPOCH),
            bridged: Some(rfc3339(SystemTime::UNIX_EPOCH)),
            ended: rfc3339(SystemTime::UNIX_EPOCH),
            ended_by: EndedBy::Caller,
            hangup_cause: Some(16),
            hangup_cause_txt: Some("Normal Clearing".into()),
            failure_stage: None,
            failure: None,
            setup_ms: Some(3.5),
            relay: stats.map(RelayFigures::from),
            relays: vec!["relay-a".into(), "relay-b".into()],
            unmeasured_ms: Some(1_250.0),
        }
    }

    fn schema_errors(v: &Value) -> Vec<String> {
        let schema: Value =
            serde_json::from_str(include_str!("../../docs/call-record.schema.json")).unwrap();
        let validator = jsonschema::validator_for(&schema).expect("a valid schema");
        validator.iter_errors(v).map(|e| e.to_string()).collect()
    }

    #[test]
    fn the_relay_figures_carry_the_probe_figures_and_fit_the_schema() {
        let stats = probe_channel_stats(10);
        let v = serde_json::to_value(record("1.1", Some(&stats))).unwrap();
        let p = &v["relay"]["probe"];
        assert_eq!(p["recognised"], true);
        assert_eq!(
            (p["received"].as_u64(), p["returned"].as_u64()),
            (Some(10), Some(10))
        );
        assert_eq!(
            (p["written"].as_u64(), p["loop_count"].as_u64()),
            (Some(8), Some(8))
        );
        assert!(
            (p["loop_mean_us"].as_f64().unwrap() - 250.0).abs() < 1e-9,
            "{p}"
        );
        assert!(
            (p["asterisk_in_mean_us"].as_f64().unwrap() - 500.0).abs() < 1e-9,
            "{p}"
        );
        assert!(p["loop_p99_us"].as_f64().unwrap() > 0.0);
        assert_eq!(schema_errors(&v), Vec::<String>::new(), "{v}");
        // A call without probes: `probe` is null; a call with no relay channel: `relay` is.
        let mut plain = stats.clone();
        plain.probe = None;
        let v = serde_json::to_value(record("1.2", Some(&plain))).unwrap();
        assert_eq!(v["relay"]["probe"], Value::Null);
        assert_eq!(schema_errors(&v), Vec::<String>::new(), "{v}");
        let v = serde_json::to_value(record("1.3", None)).unwrap();
        assert_eq!(schema_errors(&v), Vec::<String>::new(), "{v}");
    }

    /// GET `path` from `addr`: (status, body).
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.get(9..12).unwrap().parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn get_calls_serves_a_finished_calls_record_and_404_for_an_unknown_one() {
        let path = std::env::temp_dir().join(format!("call-log-test-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = CallLog::open(&path).unwrap();
        let metrics = Metrics::new();
        let stats = probe_channel_stats(6);
        log.append(&record("1764000000.7", Some(&stats)), &metrics)
            .await;
        log.append(&record("1764000000.8", None), &metrics).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(http::serve(listener, router(log.clone())));

        let (status, head, body) = get(addr, "/calls/1764000000.7").await;
        assert_eq!(status, 200, "{body}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["caller_id"], "1764000000.7");
        assert_eq!(v["relay"]["probe"]["received"], 6);
        // The same record as the file's line.
        let file = std::fs::read_to_string(&path).unwrap();
        let line: Value = serde_json::from_str(file.lines().next().unwrap()).unwrap();
        assert_eq!(line, v);
        let (status, _, body) = get(addr, "/calls/1764000000.8").await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["relay"],
            Value::Null
        );

        let (status, head, body) = get(addr, "/calls/1764000000.9").await;
        assert_eq!(status, 404);
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "unknown_call");
        assert!(
            v["message"].as_str().unwrap().contains("1764000000.9"),
            "{v}"
        );
        server.abort();
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn without_a_file_records_are_still_kept() {
        let log = CallLog::in_memory();
        assert_eq!(log.record("a"), None);
        log.append(&record("a", None), &Metrics::new()).await;
        let v: Value = serde_json::from_str(&log.record("a").unwrap()).unwrap();
        assert_eq!(v["caller_id"], "a");
    }
}
