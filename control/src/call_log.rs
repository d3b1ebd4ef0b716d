//! The call log: one JSON line per finished call (`--call-log PATH`, env `CALL_LOG`), so that
//! which calls were bad, and how bad for a listener, survives the run. `loadgen report` turns it
//! into an HTML report; `docs/call-record.schema.json` is its schema.
//!
//! Each record is written by one `write` on a file opened for appending, so concurrent calls
//! never interleave and a reader never sees half a line (short of a full disk). A failed write is
//! logged and counted (`rtprelay_control_call_log_errors_total`); it never holds up or fails a
//! call.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use relay_proto::ChannelStats;
use serde::Serialize;

use crate::metrics::Metrics;

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
    /// The relay's final figures for the call's channel, if it had one.
    pub relay: Option<RelayFigures>,
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
        }
    }
}

/// `t` in RFC 3339 with microseconds, UTC.
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Where records go.
#[derive(Debug, Clone)]
pub struct CallLog {
    /// The file, opened for appending.
    file: Arc<File>,
    /// Its path, for messages.
    path: PathBuf,
}

impl CallLog {
    /// Opens (creating) `path` for appending.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file: Arc::new(file),
            path: path.to_owned(),
        })
    }

    /// Appends `record` as one line, in one write; a failure is logged and counted.
    pub async fn append(&self, record: &CallRecord, metrics: &Metrics) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                metrics.call_log_errors.inc();
                tracing::warn!("call log: cannot encode a record: {e}");
                return;
            }
        };
        line.push(b'\n');
        let file = Arc::clone(&self.file);
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
        tracing::warn!(caller = %record.caller_id, "call log {}: {failure}", self.path.display());
    }
}
