//! `loadgen report`: a call log (control's `--call-log`, one JSON record per call) turned into one
//! self-contained HTML file a person can look at after the run: no script, no stylesheet or font
//! fetched, every chart inline SVG drawn by plotters (as `bench` draws its chart).
//!
//! What it shows: a summary table (calls, bridged and failed, round-trip loss, RTT percentiles,
//! the MOS distribution), the distribution of the calls' RTT as a CDF on a log axis (each call's
//! p50 and p99), RTT p50/p99 over time in 10 s windows (by the time each call ended), a MOS
//! histogram, and the 20 worst calls by MOS with their figures. With `--run` (sim-asterisk's
//! `--json` report) the summary adds what the simulated Asterisk measured end to end.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context as _};
use plotters::prelude::*;
use serde::Deserialize;
use serde_json::Value;

/// The part of a call record the report reads (see `docs/call-record.schema.json`).
#[derive(Clone, Debug, Deserialize)]
pub struct Call {
    /// The caller channel.
    pub caller_id: String,
    /// Its name.
    #[serde(default)]
    pub caller_name: String,
    /// The format.
    pub format: Option<String>,
    /// When it ended, RFC 3339.
    pub ended: String,
    /// Who ended it.
    pub ended_by: String,
    /// The failed set-up stage, if any.
    pub failure_stage: Option<String>,
    /// The relay's figures.
    pub relay: Option<Relay>,
}

/// The relay's figures of a call.
#[derive(Clone, Debug, Deserialize)]
pub struct Relay {
    /// Packets toward the echo.
    pub packets_to_echo: u64,
    /// Round-trip loss.
    pub lost_to_asterisk: u64,
    /// Echo timeouts.
    pub echo_timeouts: u64,
    /// Round trips measured.
    pub rtt_count: u64,
    /// RTT p50, µs.
    pub rtt_p50_us: f64,
    /// RTT p99, µs.
    pub rtt_p99_us: f64,
    /// RTT max, µs.
    pub rtt_max_us: f64,
    /// Jitter, µs.
    pub jitter_us: f64,
    /// R-factor.
    pub r_factor: f64,
    /// MOS.
    pub mos: f64,
}

/// Reads a call log: one record a line (blank lines skipped).
///
/// # Errors
/// The file cannot be read, or a line is not a call record (named by its number).
pub fn read_calls(path: &Path) -> anyhow::Result<Vec<Call>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a call record", path.display(), i + 1))
        })
        .collect()
}

/// Nearest-rank percentile of `v` (sorted).
fn pct(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // q in [0, 1]: 0..=len
    let k = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v.get(k).copied()
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Seconds since the Unix epoch of an RFC 3339 time.
fn epoch_s(t: &str) -> Option<f64> {
    humantime::parse_rfc3339(t)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The decade at or below `v` (so a log axis starts on a labelled power of ten).
fn decade_below(v: f64) -> f64 {
    10f64.powf(v.max(1e-3).log10().floor())
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
}

/// The CDF of the calls' RTT p50 and p99 on a log axis.
fn cdf_svg(p50: &[f64], p99: &[f64]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let lo = decade_below(p50.first().copied().unwrap_or(1.0).max(1.0));
        let hi = p99.last().copied().unwrap_or(10.0).max(lo * 10.0);
        let mut chart = ChartBuilder::on(&root)
            .caption("RTT per call: CDF (µs, log)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d((lo..hi * 1.5).log_scale(), 0.0..1.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("round trip, µs")
            .y_desc("fraction of calls")
            .draw()
            .map_err(plot_err)?;
        for (values, colour, name) in [(p50, &BLUE, "p50"), (p99, &RED, "p99")] {
            let n = values.len().max(1) as f64;
            let pts: Vec<(f64, f64)> = values
                .iter()
                .enumerate()
                .map(|(i, &v)| (v.max(lo), (i + 1) as f64 / n))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, colour))
                .map_err(plot_err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// RTT p50 (median of the calls') and p99 (worst call's) in 10 s windows of call end times.
fn windows_svg(calls: &[Call]) -> anyhow::Result<String> {
    let mut ends: Vec<(f64, &Relay)> = calls
        .iter()
        .filter_map(|c| Some((epoch_s(&c.ended)?, c.relay.as_ref()?)))
        .filter(|(_, r)| r.rtt_count > 0)
        .collect();
    ends.sort_by(|a, b| a.0.total_cmp(&b.0));
    let t0 = ends.first().map_or(0.0, |e| e.0);
    let mut windows: Vec<(f64, f64, f64)> = Vec::new();
    let mut k = 0usize;
    while let Some(start) = ends.get(k).map(|e| ((e.0 - t0) / 10.0).floor() * 10.0) {
        let group: Vec<&Relay> = ends[k..]
            .iter()
            .take_while(|e| e.0 - t0 < start + 10.0)
            .map(|e| e.1)
            .collect();
        k += group.len().max(1);
        let p50 = sorted(group.iter().map(|r| r.rtt_p50_us).collect());
        let p99 = group.iter().map(|r| r.rtt_p99_us).fold(0.0_f64, f64::max);
        windows.push((start, pct(&p50, 0.5).unwrap_or(0.0), p99));
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let x_hi = windows.last().map_or(10.0, |w| w.0 + 10.0);
        let y_lo = decade_below(
            windows
                .iter()
                .map(|w| w.1)
                .fold(f64::MAX, f64::min)
                .clamp(1.0, 1e12),
        );
        let y_hi = windows.iter().map(|w| w.2).fold(y_lo * 10.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "RTT over the run, 10 s windows by call end (µs, log)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_hi, (y_lo..y_hi * 1.5).log_scale())
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the first call ended")
            .draw()
            .map_err(plot_err)?;
        for (colour, name, get) in [
            (
                &BLUE,
                "median of calls' p50",
                (|w: &(f64, f64, f64)| w.1) as fn(&(f64, f64, f64)) -> f64,
            ),
            (&RED, "worst call's p99", |w: &(f64, f64, f64)| w.2),
        ] {
            let pts: Vec<(f64, f64)> = windows
                .iter()
                .map(|w| (w.0 + 5.0, get(w).max(y_lo)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), colour))
                .map_err(plot_err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Calls per MOS bin of 0.1 from 1.0 to 4.5.
fn mos_svg(mos: &[f64]) -> anyhow::Result<String> {
    let mut bins = [0u32; 35];
    for &m in mos {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to 0..=34
        let i = (((m - 1.0) * 10.0).floor().clamp(0.0, 34.0) as usize).min(34);
        bins[i] += 1;
    }
    let top = bins.iter().copied().max().unwrap_or(1).max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("MOS per call (E-model)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(1.0..4.5, 0u32..top + top / 10 + 1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("MOS")
            .y_desc("calls")
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(bins.iter().enumerate().map(|(i, &n)| {
                let x = 1.0 + i as f64 / 10.0;
                let colour = if x < 3.6 { RED } else { GREEN };
                Rectangle::new([(x, 0), (x + 0.09, n)], colour.filled())
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// The whole HTML page for `calls` (and sim-asterisk's report `run`, if given).
///
/// # Errors
/// A chart could not be drawn.
pub fn render(calls: &[Call], run: Option<&Value>) -> anyhow::Result<String> {
    let measured: Vec<&Call> = calls
        .iter()
        .filter(|c| c.relay.as_ref().is_some_and(|r| r.rtt_count > 0))
        .collect();
    let p50 = sorted(
        measured
            .iter()
            .filter_map(|c| Some(c.relay.as_ref()?.rtt_p50_us))
            .collect(),
    );
    let p99 = sorted(
        measured
            .iter()
            .filter_map(|c| Some(c.relay.as_ref()?.rtt_p99_us))
            .collect(),
    );
    let mos = sorted(
        calls
            .iter()
            .filter_map(|c| Some(c.relay.as_ref()?.mos))
            .collect(),
    );
    let sent: u64 = calls
        .iter()
        .filter_map(|c| Some(c.relay.as_ref()?.packets_to_echo))
        .sum();
    let lost: u64 = calls
        .iter()
        .filter_map(|c| Some(c.relay.as_ref()?.lost_to_asterisk))
        .sum();
    let failed = calls.iter().filter(|c| c.failure_stage.is_some()).count();
    let below = mos.iter().filter(|&&m| m < 3.6).count();
    let f = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
    let m2 = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"));

    let mut html = String::new();
    html.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>rtp-relay run report</title><style>\
         body{font-family:sans-serif;margin:2em;max-width:70em;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}\
         th{background:#eee}td.l,th.l{text-align:left}h2{margin-top:1.5em}.bad{color:#b00}\
         </style></head><body>\n<h1>rtp-relay run report</h1>\n",
    );
    let _ = write!(
        html,
        "<h2>Summary</h2>\n<table id=\"summary\">\
         <tr><th class=\"l\">calls</th><td>{}</td></tr>\
         <tr><th class=\"l\">measured (RTT)</th><td>{}</td></tr>\
         <tr><th class=\"l\">set-up failed</th><td>{failed}</td></tr>\
         <tr><th class=\"l\">round-trip loss</th><td>{lost} of {sent} ({:.4} %)</td></tr>\
         <tr><th class=\"l\">RTT p50 (median call), µs</th><td>{}</td></tr>\
         <tr><th class=\"l\">RTT p99 (p99 of the calls' p99), µs</th><td>{}</td></tr>\
         <tr><th class=\"l\">RTT p99 (worst call), µs</th><td>{}</td></tr>\
         <tr><th class=\"l\">MOS p10 / p50 / p90</th><td>{} / {} / {}</td></tr>\
         <tr><th class=\"l\">calls below MOS 3.6</th><td>{below}</td></tr>",
        calls.len(),
        measured.len(),
        if sent == 0 {
            0.0
        } else {
            lost as f64 * 100.0 / sent as f64
        },
        f(pct(&p50, 0.5)),
        f(pct(&p99, 0.99)),
        f(p99.last().copied()),
        m2(pct(&mos, 0.1)),
        m2(pct(&mos, 0.5)),
        m2(pct(&mos, 0.9)),
    );
    if let Some(r) = run {
        let us = |v: &Value| v.as_f64().map(|n| n / 1e3);
        let _ = write!(
            html,
            "<tr><th class=\"l\">at Asterisk: sent / returned / lost</th><td>{} / {} / {}</td></tr>\
             <tr><th class=\"l\">at Asterisk: end-to-end RTT p50 / p99, µs</th><td>{} / {}</td></tr>\
             <tr><th class=\"l\">transcoding calls</th><td>{}</td></tr>",
            r["sent"], r["received"], r["lost"],
            f(us(&r["rtt"]["p50_ns"])), f(us(&r["rtt"]["p99_ns"])),
            r["transcoding_calls"],
        );
    }
    html.push_str("</table>\n");
    let _ = write!(
        html,
        "<h2>RTT distribution</h2>\n<div id=\"rtt-cdf\">{}</div>\n\
         <h2>RTT over time</h2>\n<div id=\"rtt-time\">{}</div>\n\
         <h2>MOS</h2>\n<div id=\"mos-histogram\">{}</div>\n",
        cdf_svg(&p50, &p99)?,
        windows_svg(calls)?,
        mos_svg(&mos)?,
    );
    let mut worst: Vec<&Call> = calls.iter().filter(|c| c.relay.is_some()).collect();
    worst.sort_by(|a, b| {
        let m = |c: &Call| c.relay.as_ref().map_or(1.0, |r| r.mos);
        m(a).total_cmp(&m(b))
    });
    html.push_str(
        "<h2>The 20 worst calls by MOS</h2>\n<table id=\"worst\"><tr><th class=\"l\">caller</th><th class=\"l\">name</th>\
         <th>format</th><th>MOS</th><th>R</th><th>RTT p50 µs</th><th>RTT p99 µs</th><th>RTT max µs</th><th>jitter µs</th>\
         <th>lost</th><th>echo timeouts</th><th class=\"l\">ended by</th></tr>\n",
    );
    for c in worst.iter().take(20) {
        let Some(r) = &c.relay else { continue };
        let _ = writeln!(
            html,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td{}>{:.2}</td><td>{:.1}</td><td>{:.1}</td>\
             <td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td></tr>",
            esc(&c.caller_id),
            esc(&c.caller_name),
            esc(c.format.as_deref().unwrap_or("–")),
            if r.mos < 3.6 { " class=\"bad\"" } else { "" },
            r.mos,
            r.r_factor,
            r.rtt_p50_us,
            r.rtt_p99_us,
            r.rtt_max_us,
            r.jitter_us,
            r.lost_to_asterisk,
            r.echo_timeouts,
            esc(&c.ended_by),
        );
    }
    html.push_str("</table>\n<p>MOS: ITU-T G.107 E-model (reduced form) from each call's mean RTT, return jitter and \
                   round-trip loss, as the relay measured them; it does not include codec impairment or one-way \
                   asymmetry.</p>\n</body></html>\n");
    Ok(html)
}

/// Reads `calls` (and `run`), writes the report to `out`.
///
/// # Errors
/// A file cannot be read or written, or a chart cannot be drawn.
pub fn run(calls: &Path, run: Option<&Path>, out: &Path) -> anyhow::Result<usize> {
    let records = read_calls(calls)?;
    let run = match run {
        Some(p) => Some(
            serde_json::from_str::<Value>(
                &std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            )
            .with_context(|| format!("{}: not sim-asterisk's JSON report", p.display()))?,
        ),
        None => None,
    };
    let html = render(&records, run.as_ref())?;
    std::fs::write(out, html).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(records.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize, mos: f64, p50: f64) -> String {
        format!(
            r#"{{"caller_id":"c{i}","caller_name":"PJSIP/x<{i}>","external_media_id":"rtprelay-em-c{i}","relay_port":21000,"format":"ulaw","started":"2026-12-01T10:00:00.000000Z","bridged":"2026-12-01T10:00:00.010000Z","ended":"2026-12-01T10:00:{:02}.000000Z","ended_by":"caller","hangup_cause":16,"hangup_cause_txt":"Normal Clearing","failure_stage":null,"failure":null,"setup_ms":10.0,"relay":{{"packets_to_echo":1500,"packets_to_asterisk":1500,"bytes_to_echo":1,"bytes_to_asterisk":1,"lost_to_echo":0,"lost_to_asterisk":{},"duplicates":0,"reordered":0,"late":0,"echo_timeouts":0,"rtt_count":1500,"rtt_p50_us":{p50},"rtt_p95_us":{p50},"rtt_p99_us":{},"rtt_max_us":{},"rtt_mean_us":{p50},"jitter_us":5.0,"r_factor":90.0,"mos":{mos}}}}}"#,
            i % 60,
            i % 3,
            p50 * 2.0,
            p50 * 3.0
        )
    }

    #[test]
    fn a_report_has_every_chart_and_table_and_escapes_names() {
        let dir = std::env::temp_dir().join(format!("loadgen-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("calls.jsonl");
        let lines: Vec<String> = (0..40)
            .map(|i| record(i, 4.4 - i as f64 * 0.05, 50.0 + i as f64))
            .collect();
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        let out = dir.join("report.html");
        assert_eq!(run(&log, None, &out).unwrap(), 40);
        let html = std::fs::read_to_string(&out).unwrap();
        for id in [
            "id=\"summary\"",
            "id=\"rtt-cdf\"",
            "id=\"rtt-time\"",
            "id=\"mos-histogram\"",
            "id=\"worst\"",
        ] {
            assert!(html.contains(id), "{id}");
        }
        assert_eq!(html.matches("<svg").count(), 3);
        assert!(!html.contains("<script"), "self-contained, no script");
        for fetch in ["src=\"http", "href=\"http", "url(http", "@import"] {
            assert!(!html.contains(fetch), "nothing fetched: {fetch}");
        }
        assert!(html.contains("PJSIP/x&lt;39&gt;"), "names are escaped");
        // The worst call (lowest MOS) comes first in its table and is marked.
        let worst = html.split("id=\"worst\"").nth(1).unwrap();
        assert!(worst.find(">c39<").unwrap() < worst.find(">c38<").unwrap());
        assert!(worst.contains("class=\"bad\""));
        // A bad line is named.
        std::fs::write(&log, "{\"nope\":1}\n").unwrap();
        let e = run(&log, None, &out).unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
