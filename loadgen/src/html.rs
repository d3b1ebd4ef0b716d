//! `loadgen report`: a call log (control's `--call-log`, one JSON record per call) and the run's
//! own JSON reports turned into one self-contained HTML file a person can look at after the run:
//! no script, no stylesheet or font fetched, every chart inline SVG drawn by plotters (as `bench`
//! draws its chart).
//!
//! From the call log: a summary table (calls, bridged and failed, round-trip loss, the relay's
//! RTT percentiles, the MOS distribution), the distribution of the calls' RTT as a CDF on a log
//! axis (each call's p50 and p99), a MOS histogram, and the 20 worst calls by MOS with their
//! figures.
//!
//! `--run` adds a run's JSON report. It may be given twice, one of each kind; each file is
//! recognised by its keys, and a file of neither kind (or a second of one kind) is refused,
//! naming it:
//! - sim-asterisk's `--json` report (`per_call`, `transcoding_calls`): the summary adds what the
//!   simulated Asterisk measured end to end.
//! - `loadgen ari --json` (`through_asterisk`, [`crate::ari::AriLoadReport`]), read back into
//!   loadgen ari's own types ([`crate::ari::through_asterisk`]) so that writer and reader cannot
//!   drift apart: the caller's round trip through Asterisk split per probe: one CDF per leg (total,
//!   Asterisk in, relay loop, Asterisk out) in one chart on a log axis, a table of each leg's
//!   count, mean, p50/p95/p99/p99.9 and max, the probes lost before and after the relay, and the
//!   run's note on clocks. Legs the run left out (`null`: a leg came out negative, so the two
//!   hosts' clocks disagree, `negative_legs`) are left out here too, with a sentence saying why.
//!
//! "RTT over time": with `loadgen ari`'s time series (`timeseries`), 1 s windows of run time:
//! the round trip's p50 and p99 and each leg's p50 against seconds since the start of the run, and the
//! probes lost per window. Without one (a call log alone, or sim-asterisk's report only), 10 s
//! windows by the time each call ended, titled so.

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use serde::Deserialize;
use serde_json::Value;

use crate::ari::{LegSummary, Lost, ThroughAsterisk, Window};

/// Why the report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HtmlError {
    /// A file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line of the call log is not a call record.
    #[error("{path} line {line}: not a call record")]
    CallRecord {
        /// The call log.
        path: String,
        /// The line's number, from 1.
        line: usize,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A `--run` file is not what `--run` takes (the message says which of its faults).
    #[error("{0}")]
    Run(String),
    /// A `--run` file has `through_asterisk` but is not in the shape `loadgen ari` writes.
    #[error(
        "{name}: has `through_asterisk`, so loadgen ari's report, but not as loadgen ari writes it"
    )]
    AriShape {
        /// The file.
        name: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A chart could not be drawn.
    #[error("drawing a chart: {0}")]
    Chart(String),
    /// The report cannot be written.
    #[error("cannot write {path}")]
    Write {
        /// `--out`.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

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
pub fn read_calls(path: &Path) -> Result<Vec<Call>, HtmlError> {
    let text = std::fs::read_to_string(path).map_err(|source| HtmlError::Read {
        path: path.display().to_string(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| HtmlError::CallRecord {
                path: path.display().to_string(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// `loadgen ari --json`, the part the report reads (see [`crate::ari::AriLoadReport`]; every
/// time in µs): its envelope, each field optional, and the figures as loadgen ari's own types.
#[derive(Clone, Debug, Deserialize)]
pub struct AriRun {
    /// `rtp` or `tone`.
    pub callers: Option<String>,
    /// Calls asked for.
    pub calls: Option<u64>,
    /// Originations Asterisk accepted.
    pub originated: Option<u64>,
    /// Originations refused.
    pub failed: Option<u64>,
    /// The first refusal.
    pub first_error: Option<String>,
    /// Calls that played their probes.
    pub played: Option<u64>,
    /// ARI objects loadgen could not remove.
    #[serde(default)]
    pub leftovers: Vec<String>,
    /// The caller's round trip through Asterisk, split (`null` with tone callers).
    pub through_asterisk: Option<ThroughAsterisk>,
    /// Probes lost, on each side of the relay.
    pub lost: Option<Lost>,
    /// One window a second of run time.
    #[serde(default)]
    pub timeseries: Vec<Window>,
    /// What the split's times are, and when they hold.
    pub clocks: Option<String>,
}

/// The `--run` files: at most one of each kind.
#[derive(Clone, Debug, Default)]
pub struct Runs {
    /// sim-asterisk's `--json` report.
    pub sim: Option<Value>,
    /// `loadgen ari --json`.
    pub ari: Option<AriRun>,
}

/// What a `--run` file is.
#[derive(Debug)]
pub enum RunFile {
    /// sim-asterisk's `--json` report.
    Sim(Value),
    /// `loadgen ari --json`.
    Ari(Box<AriRun>),
}

/// Keys every sim-asterisk report has (and `loadgen ari`'s has not).
const SIM_KEYS: [&str; 3] = ["per_call", "transcoding_calls", "received"];

/// What `--run` takes, for error messages.
const RUN_KINDS: &str = "--run takes sim-asterisk's --json report or loadgen ari's --json report";

/// Tells a run report's kind by its keys: `through_asterisk` is `loadgen ari`'s; `per_call`,
/// `transcoding_calls` and `received` together are sim-asterisk's. `name` names it in errors.
///
/// # Errors
/// It is neither, or it has `through_asterisk` but not in the shape `loadgen ari` writes.
pub fn classify(v: Value, name: &str) -> Result<RunFile, HtmlError> {
    let Some(o) = v.as_object() else {
        return Err(HtmlError::Run(format!(
            "{name}: not a JSON object; {RUN_KINDS}"
        )));
    };
    if o.contains_key("through_asterisk") {
        let ari = serde_json::from_value::<AriRun>(v).map_err(|source| HtmlError::AriShape {
            name: name.to_owned(),
            source,
        })?;
        return Ok(RunFile::Ari(Box::new(ari)));
    }
    if SIM_KEYS.iter().all(|k| o.contains_key(*k)) {
        return Ok(RunFile::Sim(v));
    }
    Err(HtmlError::Run(format!(
        "{name}: neither sim-asterisk's --json report (it has no `{}`) nor loadgen ari's --json \
         report (it has no `through_asterisk`); {RUN_KINDS}",
        SIM_KEYS.join("`, `")
    )))
}

/// Reads and tells apart the `--run` files (at most one of each kind).
///
/// # Errors
/// A file cannot be read, is not JSON, is of neither kind, or is a second of its kind.
pub fn read_runs(paths: &[impl AsRef<Path>]) -> Result<Runs, HtmlError> {
    let mut runs = Runs::default();
    let mut seen: [Option<String>; 2] = [None, None];
    for p in paths {
        let p = p.as_ref();
        let name = p.display().to_string();
        let text = std::fs::read_to_string(p).map_err(|source| HtmlError::Read {
            path: name.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| HtmlError::Run(format!("{name}: not JSON ({e}); {RUN_KINDS}")))?;
        let (slot, kind) = match classify(v, &name)? {
            RunFile::Sim(v) => {
                runs.sim = Some(v);
                (0, "sim-asterisk's report")
            }
            RunFile::Ari(a) => {
                runs.ari = Some(*a);
                (1, "loadgen ari's report")
            }
        };
        if let Some(first) = &seen[slot] {
            return Err(HtmlError::Run(format!(
                "--run {first} and --run {name} are both {kind}: give at most one of each kind"
            )));
        }
        seen[slot] = Some(name);
    }
    Ok(runs)
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

/// A log axis's label: whole µs without a decimal point.
#[allow(clippy::trivially_copy_pass_by_ref)] // plotters' label formatters take a reference
fn us_label(v: &f64) -> String {
    if *v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// A plotters error, as the report's.
fn plot_err<E: std::fmt::Display>(e: E) -> HtmlError {
    HtmlError::Chart(e.to_string())
}

/// What a chart is drawn on: an area of an SVG written to a string.
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A chart's SVG text: `size` px, white, drawn by `draw`.
fn chart_svg(
    size: (u32, u32),
    draw: impl FnOnce(&Area<'_>) -> Result<(), HtmlError>,
) -> Result<String, HtmlError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Every chart's frame: `caption` in `font` px sans-serif, a 12 px margin, 35 px for the x
/// labels and `y_labels` px for the y labels; the caller gives the axes.
fn frame<'a, 'b, 'c>(
    root: &'a Area<'b>,
    caption: &str,
    font: u32,
    y_labels: u32,
) -> ChartBuilder<'a, 'c, SVGBackend<'b>> {
    let mut b = ChartBuilder::on(root);
    b.caption(caption, ("sans-serif", font))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(y_labels);
    b
}

/// A legend entry's mark: an 18 px line in its series' style.
fn swatch(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style)
}

/// The legend of `chart`'s labelled series, at `at`: a translucent white box, black border.
fn legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    at: SeriesLabelPosition,
) -> Result<(), HtmlError> {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

/// The CDF of the calls' RTT p50 and p99 on a log axis.
fn cdf_svg(p50: &[f64], p99: &[f64]) -> Result<String, HtmlError> {
    chart_svg((760, 360), |root| {
        let lo = decade_below(p50.first().copied().unwrap_or(1.0).max(1.0));
        let hi = p99.last().copied().unwrap_or(10.0).max(lo * 10.0);
        let mut chart = frame(root, "RTT per call: CDF (µs, log)", 18, 50)
            .build_cartesian_2d((lo..hi * 1.5).log_scale(), 0.0..1.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_label_formatter(&us_label)
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
                .legend(swatch(colour.into()));
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    })
}

/// The largest time drawn, µs (a bad file cannot push an axis to infinity).
const MAX_US: f64 = 1e12;
/// The latest window drawn, seconds of run time.
const MAX_S: f64 = 1e9;
/// The relay loop's colour (plotters' `GREEN` is too light on white).
const DARK_GREEN: RGBColor = RGBColor(0, 140, 0);
/// The total's p99 over time.
const GREY: RGBColor = RGBColor(130, 130, 130);

/// A time fit for a log axis: finite and above zero, clamped to 0.001..=[`MAX_US`].
fn positive(v: f64) -> Option<f64> {
    (v.is_finite() && v > 0.0).then(|| v.clamp(1e-3, MAX_US))
}

/// The decade below the least of `v` (1 when there is none).
fn axis_floor(v: impl Iterator<Item = f64>) -> f64 {
    let least = v.fold(f64::INFINITY, f64::min);
    decade_below(if least.is_finite() { least } else { 1.0 })
}

/// The names, colours and figures of the total and the legs the run kept, in that order.
fn kept_legs(t: &ThroughAsterisk) -> Vec<(&'static str, RGBColor, &LegSummary)> {
    [
        ("total", BLACK, Some(&t.total)),
        ("Asterisk in", BLUE, t.asterisk_in.as_ref()),
        ("relay loop", DARK_GREEN, t.relay.as_ref()),
        ("Asterisk out", RED, t.asterisk_out.as_ref()),
    ]
    .into_iter()
    .filter_map(|(n, c, l)| Some((n, c, l?)))
    .collect()
}

/// The legs the run left out (`null`), by name.
fn left_out(t: &ThroughAsterisk) -> Vec<&'static str> {
    [
        ("Asterisk in", t.asterisk_in.is_none()),
        ("relay loop", t.relay.is_none()),
        ("Asterisk out", t.asterisk_out.is_none()),
    ]
    .into_iter()
    .filter_map(|(n, out)| out.then_some(n))
    .collect()
}

/// A curve's points, in chart coordinates.
type Points = Vec<(f64, f64)>;

/// One CDF per leg (from each leg's `cdf`), one chart, log x axis.
fn split_cdf_svg(legs: &[(&'static str, RGBColor, &LegSummary)]) -> Result<String, HtmlError> {
    let curves: Vec<(&str, RGBColor, Points)> = legs
        .iter()
        .map(|&(name, colour, leg)| {
            let pts = leg
                .cdf
                .iter()
                .filter_map(|&(us, q)| Some((positive(us)?, q.clamp(0.0, 1.0))))
                .collect();
            (name, colour, pts)
        })
        .collect();
    let xs = || curves.iter().flat_map(|c| c.2.iter().map(|p| p.0));
    let lo = axis_floor(xs());
    let hi = xs().fold(lo * 10.0, f64::max);
    chart_svg((760, 380), |root| {
        let mut chart = frame(
            root,
            "Round trip through Asterisk, per probe: CDF of each leg (µs, log)",
            18,
            50,
        )
        .build_cartesian_2d((lo..hi * 1.5).log_scale(), 0.0..1.0)
        .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_label_formatter(&us_label)
            .x_desc("µs")
            .y_desc("fraction of probes")
            .draw()
            .map_err(plot_err)?;
        for (name, colour, pts) in curves {
            chart
                .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
                .map_err(plot_err)?
                .label(name)
                .legend(swatch(colour.stroke_width(2)));
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    })
}

/// A window's figure, `None` where it has none.
type Figure = fn(&Window) -> Option<f64>;

/// The curves over run time: the total's p50 and p99, each leg's p50.
const OVER_TIME: [(&str, RGBColor, Figure); 5] = [
    ("total p50", BLACK, |w| (w.returned > 0).then_some(w.p50_us)),
    ("total p99", GREY, |w| (w.returned > 0).then_some(w.p99_us)),
    ("Asterisk in p50", BLUE, |w| w.asterisk_in_p50_us),
    ("relay loop p50", DARK_GREEN, |w| w.relay_p50_us),
    ("Asterisk out p50", RED, |w| w.asterisk_out_p50_us),
];

/// The middle of a window, seconds of run time.
fn window_mid(w: &Window) -> f64 {
    (w.t_s as f64).min(MAX_S) + 0.5
}

/// The round trip in 1 s windows of run time: [`OVER_TIME`], a line broken where a window has
/// no figure.
fn timeseries_svg(ts: &[Window]) -> Result<String, HtmlError> {
    let curves: Vec<(&str, RGBColor, Vec<Points>)> = OVER_TIME
        .iter()
        .map(|&(name, colour, get)| {
            let mut segments: Vec<Points> = Vec::new();
            let mut open = false;
            for w in ts {
                match get(w).and_then(positive) {
                    Some(v) if open => {
                        if let Some(s) = segments.last_mut() {
                            s.push((window_mid(w), v));
                        }
                    }
                    Some(v) => {
                        segments.push(vec![(window_mid(w), v)]);
                        open = true;
                    }
                    None => open = false,
                }
            }
            (name, colour, segments)
        })
        .collect();
    let ys = || {
        curves
            .iter()
            .flat_map(|c| c.2.iter().flatten().map(|p| p.1))
    };
    let y_lo = axis_floor(ys());
    let y_hi = ys().fold(y_lo * 10.0, f64::max);
    let x_hi = ts.iter().map(window_mid).fold(0.5, f64::max) + 0.5;
    chart_svg((760, 380), |root| {
        let mut chart = frame(
            root,
            "Round trip through Asterisk over run time, 1 s windows (µs, log)",
            18,
            60,
        )
        // Headroom above the curves for the legend's five lines.
        .build_cartesian_2d(0.0..x_hi, (y_lo..y_hi * 5.0).log_scale())
        .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds of run time (since the start of the run)")
            .y_desc("µs")
            .y_label_formatter(&us_label)
            .draw()
            .map_err(plot_err)?;
        for (name, colour, segments) in curves {
            for (i, seg) in segments.into_iter().enumerate() {
                let dots = seg.clone();
                let line = chart
                    .draw_series(LineSeries::new(seg, colour.stroke_width(2)))
                    .map_err(plot_err)?;
                if i == 0 {
                    line.label(name).legend(swatch(colour.stroke_width(2)));
                }
                chart
                    .draw_series(dots.into_iter().map(|p| Circle::new(p, 2, colour.filled())))
                    .map_err(plot_err)?;
            }
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// Percent of a window's probes that never came back (`None`: none sent in it).
#[allow(clippy::cast_precision_loss)] // a ratio for drawing
fn window_loss(w: &Window) -> Option<f64> {
    (w.sent > 0).then(|| w.sent.saturating_sub(w.returned) as f64 * 100.0 / w.sent as f64)
}

/// Probes lost per 1 s window of run time, % of those sent in it.
fn loss_svg(ts: &[Window]) -> Result<String, HtmlError> {
    let bars: Vec<(f64, f64)> = ts
        .iter()
        .filter_map(|w| Some((window_mid(w) - 0.5, window_loss(w).filter(|&l| l > 0.0)?)))
        .collect();
    let top = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    let x_hi = ts.iter().map(window_mid).fold(0.5, f64::max) + 0.5;
    chart_svg((760, 260), |root| {
        let mut chart = frame(
            root,
            "Probes lost per 1 s window of run time (% of those sent in it)",
            18,
            60,
        )
        .build_cartesian_2d(0.0..x_hi, 0.0..(top * 1.15).max(1.0))
        .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds of run time (since the start of the run)")
            .y_desc("% lost")
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x, pct)| Rectangle::new([(x, 0.0), (x + 0.9, pct)], RED.filled())),
            )
            .map_err(plot_err)?;
        Ok(())
    })
}

/// RTT p50 (median of the calls') and p99 (worst call's) in 10 s windows of call end times.
fn windows_svg(calls: &[Call]) -> Result<String, HtmlError> {
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
    chart_svg((760, 320), |root| {
        let x_hi = windows.last().map_or(10.0, |w| w.0 + 10.0);
        let y_lo = decade_below(
            windows
                .iter()
                .map(|w| w.1)
                .fold(f64::MAX, f64::min)
                .clamp(1.0, 1e12),
        );
        let y_hi = windows.iter().map(|w| w.2).fold(y_lo * 10.0, f64::max);
        let mut chart = frame(
            root,
            "RTT by call end time, 10 s windows: no run-time series recorded (µs, log)",
            17,
            60,
        )
        .build_cartesian_2d(0.0..x_hi, (y_lo..y_hi * 1.5).log_scale())
        .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the first call ended")
            .y_label_formatter(&us_label)
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
                .legend(swatch(colour.into()));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(plot_err)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// Calls per MOS bin of 0.1 from 1.0 to 4.5.
fn mos_svg(mos: &[f64]) -> Result<String, HtmlError> {
    let mut bins = [0u32; 35];
    for &m in mos {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to 0..=34
        let i = (((m - 1.0) * 10.0).floor().clamp(0.0, 34.0) as usize).min(34);
        bins[i] += 1;
    }
    let top = bins.iter().copied().max().unwrap_or(1).max(1);
    chart_svg((760, 320), |root| {
        let mut chart = frame(root, "MOS per call (E-model)", 18, 50)
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
        Ok(())
    })
}

/// `n` as a share of `of`, for a table.
#[allow(clippy::cast_precision_loss)] // a ratio for reading
fn share(n: u64, of: u64) -> String {
    if of == 0 {
        format!("{n}")
    } else {
        format!("{n} ({:.3} %)", n as f64 * 100.0 / of as f64)
    }
}

/// "Through Asterisk": `loadgen ari`'s split of the caller's round trip, its loss and its notes.
fn through_asterisk_html(a: &AriRun) -> Result<String, HtmlError> {
    let mut html = String::from("<h2>Through Asterisk: the caller's round trip, split</h2>\n");
    let n = |v: Option<u64>| v.map_or_else(|| "–".to_owned(), |v| v.to_string());
    let _ = writeln!(
        html,
        "<p id=\"ari-run\">loadgen ari, {} callers: {} calls asked, {} originated, {} failed{}, {} \
         played their probes.</p>",
        esc(a.callers.as_deref().unwrap_or("?")),
        n(a.calls),
        n(a.originated),
        n(a.failed),
        a.first_error
            .as_deref()
            .map(|e| format!(" (first: {})", esc(e)))
            .unwrap_or_default(),
        n(a.played),
    );
    if !a.leftovers.is_empty() {
        let _ = writeln!(
            html,
            "<p class=\"bad\">Left behind on Asterisk: {}.</p>",
            esc(&a.leftovers.join(", "))
        );
    }
    let Some(t) = &a.through_asterisk else {
        html.push_str(
            "<p id=\"split-none\">This run has no split: only <code>loadgen ari --callers rtp</code> \
             times the caller's round trip through Asterisk (tone callers' audio is discarded \
             inside Asterisk).</p>\n",
        );
        return Ok(html);
    };
    html.push_str(
        "<p>Per probe, with kernel stamps: <b>Asterisk in</b> is loadgen's send to the relay's \
         arrival, <b>relay loop</b> the relay's arrival to the echo's return at the relay (the \
         relay's forward and the echo leg), <b>Asterisk out</b> the echo's return at the relay to \
         loadgen's receipt (the relay's forward to Asterisk and Asterisk's way back). The three \
         add up to the total for every probe.</p>\n",
    );
    let legs = kept_legs(t);
    let _ = writeln!(
        html,
        "<div id=\"split-cdf\">{}</div>",
        split_cdf_svg(&legs)?
    );
    let out = left_out(t);
    if !out.is_empty() {
        let why = if t.negative_legs > 0 {
            format!(
                "{} probes had a leg below zero, so loadgen's and the relay's clocks disagree (two \
                 hosts not synchronised) and the run reports totals only",
                t.negative_legs
            )
        } else {
            format!(
                "no probe carried the relay's times (the relay did not recognise the calls' \
                 probes; {} returns were timed in total only)",
                t.unsplit
            )
        };
        let _ = writeln!(
            html,
            "<p id=\"legs-left-out\" class=\"bad\">Left out: {}. {}.</p>",
            out.join(", "),
            capitalise(&why)
        );
    }
    html.push_str(
        "<table id=\"split-table\"><tr><th class=\"l\">µs</th><th>count</th><th>mean</th>\
         <th>p50</th><th>p95</th><th>p99</th><th>p99.9</th><th>max</th></tr>\n",
    );
    for (name, _, l) in &legs {
        let _ = writeln!(
            html,
            "<tr><th class=\"l\">{name}</th><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td>\
             <td>{:.1}</td><td>{:.1}</td><td>{:.1}</td></tr>",
            l.count, l.mean_us, l.p50_us, l.p95_us, l.p99_us, l.p999_us, l.max_us
        );
    }
    html.push_str("</table>\n");
    if t.unsplit > 0 || t.untimed > 0 {
        let _ = writeln!(
            html,
            "<p>{} returns were timed in total only (the first probes of each call, before the \
             relay recognises it), {} not timed at all (a kernel stamp missing).</p>",
            t.unsplit, t.untimed
        );
    }
    if let Some(l) = &a.lost {
        let side = |v: Option<u64>| {
            v.map_or_else(
                || "unknown (no relay count)".to_owned(),
                |v| share(v, l.sent),
            )
        };
        let _ = writeln!(
            html,
            "<table id=\"split-loss\">\
             <tr><th class=\"l\">probes sent</th><td>{}</td></tr>\
             <tr><th class=\"l\">back</th><td>{}</td></tr>\
             <tr><th class=\"l\">lost before the relay</th><td>{}</td></tr>\
             <tr><th class=\"l\">lost after the relay</th><td>{}</td></tr>\
             <tr><th class=\"l\">lost in total</th><td>{}</td></tr></table>",
            l.sent,
            l.returned,
            side(l.before_relay),
            side(l.after_relay),
            share(l.total, l.sent),
        );
        if l.calls_unsplit > 0 {
            let _ = writeln!(
                html,
                "<p>The loss of {} calls is not split: the relay's count of their probes comes \
                 from control's call record (<code>loadgen ari --control</code>).</p>",
                l.calls_unsplit
            );
        }
    }
    if let Some(c) = &a.clocks {
        let _ = writeln!(html, "<p id=\"clocks\">Clocks: {}.</p>", esc(c));
    }
    Ok(html)
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// "RTT over time": `loadgen ari`'s 1 s windows of run time when a run has them, else the
/// calls' RTT by call end time, 10 s windows.
fn over_time_html(calls: &[Call], runs: &Runs) -> Result<String, HtmlError> {
    let mut html = String::from("<h2>RTT over time</h2>\n");
    match runs.ari.as_ref().filter(|a| !a.timeseries.is_empty()) {
        Some(a) => {
            let _ = writeln!(
                html,
                "<p>1 s windows of run time (seconds since the start of the run, each probe in the \
                 window of its send) from loadgen ari's time series: the caller's round trip \
                 through Asterisk (p50, p99) and each leg's p50. A line breaks where a window has \
                 no figure (nothing came back, or its legs were not split).</p>\n\
                 <div id=\"rtt-time\" data-windows=\"run-time-1s\">{}</div>\n\
                 <div id=\"loss-time\">{}</div>",
                timeseries_svg(&a.timeseries)?,
                loss_svg(&a.timeseries)?,
            );
        }
        None => {
            let _ = writeln!(
                html,
                "<p>By call end time, 10 s windows: no run file given records a time series of \
                 run time (<code>loadgen ari --callers rtp --json</code> does), so each point is \
                 the calls that ended in that window: the median of their RTT p50 and the worst \
                 call's p99, as the relay measured them.</p>\n\
                 <div id=\"rtt-time\" data-windows=\"call-end-10s\">{}</div>",
                windows_svg(calls)?,
            );
        }
    }
    Ok(html)
}

/// The whole HTML page for `calls` and the run files `runs`.
///
/// # Errors
/// A chart could not be drawn.
pub fn render(calls: &[Call], runs: &Runs) -> Result<String, HtmlError> {
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
    if let Some(r) = &runs.sim {
        let us = |v: &Value| v.as_f64().map(|n| n / 1e3);
        let _ = write!(
            html,
            "<tr><th class=\"l\">at Asterisk: sent / returned / lost</th><td>{} / {} / {}</td></tr>\
             <tr><th class=\"l\">at Asterisk: end-to-end RTT p50 / p99, µs</th><td>{} / {}</td></tr>\
             <tr><th class=\"l\">transcoding calls</th><td>{}</td></tr>",
            r["sent"],
            r["received"],
            r["lost"],
            f(us(&r["rtt"]["p50_ns"])),
            f(us(&r["rtt"]["p99_ns"])),
            r["transcoding_calls"],
        );
    }
    html.push_str("</table>\n");
    if let Some(a) = &runs.ari {
        html.push_str(&through_asterisk_html(a)?);
    }
    let _ = write!(
        html,
        "<h2>RTT distribution (the relay's, per call)</h2>\n<div id=\"rtt-cdf\">{}</div>\n{}\
         <h2>MOS</h2>\n<div id=\"mos-histogram\">{}</div>\n",
        cdf_svg(&p50, &p99)?,
        over_time_html(calls, runs)?,
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

/// Reads `calls` and the run files `runs` (at most one of each kind, [`read_runs`]), writes
/// the report to `out`; the number of calls.
///
/// # Errors
/// A file cannot be read or written or is not what it should be, or a chart cannot be drawn.
pub fn run(calls: &Path, runs: &[impl AsRef<Path>], out: &Path) -> Result<usize, HtmlError> {
    let runs = read_runs(runs)?;
    let records = read_calls(calls)?;
    let html = render(&records, &runs)?;
    std::fs::write(out, html).map_err(|source| HtmlError::Write {
        path: out.display().to_string(),
        source,
    })?;
    Ok(records.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_RUNS: &[&Path] = &[];

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
        assert_eq!(run(&log, NO_RUNS, &out).unwrap(), 40);
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
        let e = run(&log, NO_RUNS, &out).unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod run_files {
    use serde_json::json;

    use super::*;

    /// A CDF of `n` points from `lo` to `hi` µs, as `loadgen ari` writes it.
    fn cdf(lo: f64, hi: f64) -> Value {
        json!((0..=10)
            .map(|i| {
                let q = f64::from(i) / 10.0;
                [lo + (hi - lo) * q, q]
            })
            .collect::<Vec<_>>())
    }

    fn leg(count: u64, p50: f64) -> Value {
        json!({"count": count, "mean_us": p50 * 1.1, "p50_us": p50, "p95_us": p50 * 1.5,
               "p99_us": p50 * 2.0, "p999_us": p50 * 3.0, "max_us": p50 * 4.0,
               "cdf": cdf(p50 / 2.0, p50 * 4.0)})
    }

    /// `loadgen ari --callers rtp --json` of a 3 s run, field names as in `ari::through_asterisk` and
    /// `ari::AriLoadReport`.
    fn ari_json() -> Value {
        json!({
            "callers": "rtp", "calls": 20, "hold_s": 3.0, "originated": 20, "failed": 0,
            "first_error": null, "hung_up": 20, "played": 20, "leftovers": [],
            "through_asterisk": {
                "total": leg(2990, 1293.0), "asterisk_in": leg(2950, 534.0),
                "relay": leg(2950, 332.0), "asterisk_out": leg(2950, 509.0),
                "unsplit": 40, "negative_legs": 0, "untimed": 0
            },
            "lost": {"sent": 3000, "returned": 2990, "total": 10, "before_relay": 4,
                     "after_relay": 6, "calls_unsplit": 0},
            "timeseries": [
                {"t_s": 0, "sent": 1000, "returned": 996, "p50_us": 1200.0, "p99_us": 2400.0,
                 "max_us": 3000.0, "asterisk_in_p50_us": 500.0, "relay_p50_us": 300.0,
                 "asterisk_out_p50_us": 480.0},
                {"t_s": 1, "sent": 1000, "returned": 1000, "p50_us": 1300.0, "p99_us": 2500.0,
                 "max_us": 3100.0, "asterisk_in_p50_us": 540.0, "relay_p50_us": 330.0,
                 "asterisk_out_p50_us": 510.0},
                {"t_s": 2, "sent": 1000, "returned": 994, "p50_us": 1350.0, "p99_us": 2600.0,
                 "max_us": 3300.0, "asterisk_in_p50_us": 560.0, "relay_p50_us": 340.0,
                 "asterisk_out_p50_us": 520.0}
            ],
            "clocks": "every time is a kernel stamp of CLOCK_REALTIME <same host>",
            "relay": null, "control": null
        })
    }

    /// sim-asterisk's `--json` report, the keys the report reads and tells it by.
    fn sim_json() -> Value {
        json!({"calls": 20, "answered": 20, "bridged": 20, "transcoding_calls": 0, "sent": 3000,
               "received": 2990, "lost": 10, "loss_ratio": 0.0033,
               "rtt": {"p50_ns": 1_293_000, "p99_ns": 2_477_000}, "per_call": []})
    }

    fn ari_runs(v: Value) -> Runs {
        match classify(v, "ari.json").unwrap() {
            RunFile::Ari(a) => Runs {
                sim: None,
                ari: Some(*a),
            },
            RunFile::Sim(_) => panic!("loadgen ari's report taken for sim-asterisk's"),
        }
    }

    /// The inside of `<div id="{id}" …>`.
    fn div<'a>(html: &'a str, id: &str) -> &'a str {
        let from = html
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no {id}"));
        let rest = &html[from..];
        &rest[..rest.find("</div>").unwrap()]
    }

    /// The inside of `<table id="{id}">`.
    fn table<'a>(html: &'a str, id: &str) -> &'a str {
        let from = html
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no {id}"));
        let rest = &html[from..];
        &rest[..rest.find("</table>").unwrap()]
    }

    fn calls() -> Vec<Call> {
        (0..5)
            .map(|i| {
                serde_json::from_value(json!({
                    "caller_id": format!("c{i}"), "format": "ulaw",
                    "ended": format!("2026-12-01T10:00:{:02}.000000Z", 10 + i * 7),
                    "ended_by": "caller", "failure_stage": null,
                    "relay": {"packets_to_echo": 150, "lost_to_asterisk": 0, "echo_timeouts": 0,
                              "rtt_count": 150, "rtt_p50_us": 330.0, "rtt_p99_us": 800.0,
                              "rtt_max_us": 900.0, "jitter_us": 5.0, "r_factor": 92.0, "mos": 4.4}
                }))
                .unwrap()
            })
            .collect()
    }

    fn self_contained(html: &str) {
        assert!(!html.contains("<script"), "no script");
        for fetch in ["src=\"http", "href=\"http", "url(http", "@import"] {
            assert!(!html.contains(fetch), "nothing fetched: {fetch}");
        }
    }

    #[test]
    fn a_loadgen_ari_run_draws_one_cdf_per_leg_and_run_time_windows() {
        let html = render(&calls(), &ari_runs(ari_json())).unwrap();
        self_contained(&html);
        // One chart, four curves with their legend.
        let cdf = div(&html, "split-cdf");
        assert_eq!(cdf.matches("<svg").count(), 1);
        assert!(cdf.contains("CDF of each leg"));
        for name in ["total", "Asterisk in", "relay loop", "Asterisk out"] {
            assert!(
                cdf.contains(&format!(">\n{name}\n</text>")),
                "legend {name}"
            );
        }
        assert_eq!(
            cdf.matches("stroke-width=\"2\"").count(),
            4 * 2,
            "four curves, each with its legend sample"
        );
        let t = table(&html, "split-table");
        for row in [
            "<th class=\"l\">total</th><td>2990</td><td>1422.3</td><td>1293.0</td><td>1939.5</td><td>2586.0</td><td>3879.0</td><td>5172.0</td>",
            "<th class=\"l\">Asterisk in</th><td>2950</td>",
            "<th class=\"l\">relay loop</th><td>2950</td><td>365.2</td><td>332.0</td>",
            "<th class=\"l\">Asterisk out</th><td>2950</td>",
        ] {
            assert!(t.contains(row), "{row} in {t}");
        }
        let l = table(&html, "split-loss");
        assert!(
            l.contains("lost before the relay</th><td>4 (0.133 %)"),
            "{l}"
        );
        assert!(
            l.contains("lost after the relay</th><td>6 (0.200 %)"),
            "{l}"
        );
        assert!(l.contains("lost in total</th><td>10 (0.333 %)"), "{l}");
        assert!(html.contains(
            "id=\"clocks\">Clocks: every time is a kernel stamp of CLOCK_REALTIME &lt;same host&gt;"
        ));
        assert!(!html.contains("id=\"legs-left-out\""));
        assert!(html.contains("40 returns were timed in total only"));
        // RTT over time: 1 s windows of run time, the total and each leg.
        let time = div(&html, "rtt-time");
        assert!(time.contains("data-windows=\"run-time-1s\""));
        assert!(time.contains("over run time, 1 s windows"));
        assert!(time.contains("seconds of run time"));
        for name in [
            "total p50",
            "total p99",
            "Asterisk in p50",
            "relay loop p50",
            "Asterisk out p50",
        ] {
            assert!(
                time.contains(&format!(">\n{name}\n</text>")),
                "legend {name}"
            );
        }
        assert!(!time.contains("call end"));
        let loss = div(&html, "loss-time");
        assert!(loss.contains("Probes lost per 1 s window"));
        assert_eq!(
            loss.matches("<rect").count() - 1,
            2,
            "two windows lost probes: {loss}"
        );
        // rtt-cdf, split-cdf, rtt-time, loss-time, mos-histogram.
        assert_eq!(html.matches("<svg").count(), 5);
    }

    #[test]
    fn legs_left_out_by_the_run_are_left_out_with_the_reason() {
        let mut v = ari_json();
        v["through_asterisk"]["asterisk_in"] = Value::Null;
        v["through_asterisk"]["relay"] = Value::Null;
        v["through_asterisk"]["asterisk_out"] = Value::Null;
        v["through_asterisk"]["negative_legs"] = json!(7);
        for w in v["timeseries"].as_array_mut().unwrap() {
            w["asterisk_in_p50_us"] = Value::Null;
            w["relay_p50_us"] = Value::Null;
            w["asterisk_out_p50_us"] = Value::Null;
        }
        v["lost"]["before_relay"] = Value::Null;
        v["lost"]["after_relay"] = Value::Null;
        v["lost"]["calls_unsplit"] = json!(20);
        let html = render(&calls(), &ari_runs(v)).unwrap();
        let cdf = div(&html, "split-cdf");
        assert!(cdf.contains(">\ntotal\n</text>"));
        for name in ["Asterisk in", "relay loop", "Asterisk out"] {
            assert!(
                !cdf.contains(&format!(">\n{name}\n</text>")),
                "{name} drawn"
            );
        }
        assert_eq!(
            cdf.matches("stroke-width=\"2\"").count(),
            2,
            "the total only"
        );
        let why = html.split("id=\"legs-left-out\"").nth(1).unwrap();
        let why = &why[..why.find("</p>").unwrap()];
        assert!(
            why.contains("Left out: Asterisk in, relay loop, Asterisk out.")
                && why.contains("7 probes had a leg below zero")
                && why.contains("clocks disagree"),
            "{why}"
        );
        let t = table(&html, "split-table");
        assert!(
            t.contains(">total</th>") && !t.contains(">Asterisk in</th>"),
            "{t}"
        );
        assert!(table(&html, "split-loss").contains("unknown (no relay count)"));
        assert!(html.contains("The loss of 20 calls is not split"));
        let time = div(&html, "rtt-time");
        assert!(time.contains(">\ntotal p50\n</text>"));
        assert!(
            !time.contains(">\nAsterisk in p50\n</text>"),
            "no leg over time"
        );
    }

    #[test]
    fn without_a_time_series_rtt_over_time_says_it_is_by_call_end() {
        let sim = Runs {
            sim: Some(sim_json()),
            ari: None,
        };
        let mut empty = ari_runs(ari_json());
        if let Some(a) = &mut empty.ari {
            a.timeseries.clear();
        }
        for runs in [Runs::default(), sim, empty] {
            let html = render(&calls(), &runs).unwrap();
            let time = div(&html, "rtt-time");
            assert!(time.contains("data-windows=\"call-end-10s\""));
            assert!(
                time.contains("RTT by call end time, 10 s windows: no run-time series recorded"),
                "{time}"
            );
            assert!(html.contains("no run file given records a time series"));
            assert!(!html.contains("id=\"loss-time\""));
        }
    }

    #[test]
    fn tone_callers_have_no_split_and_say_so() {
        let mut v = ari_json();
        v["callers"] = json!("tone");
        v["through_asterisk"] = Value::Null;
        v["lost"] = Value::Null;
        v["timeseries"] = json!([]);
        v["clocks"] = Value::Null;
        let html = render(&calls(), &ari_runs(v)).unwrap();
        assert!(html.contains("id=\"split-none\""));
        assert!(!html.contains("id=\"split-cdf\""));
        assert!(div(&html, "rtt-time").contains("call-end-10s"));
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("loadgen-report-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write_calls(d: &Path) -> std::path::PathBuf {
        let log = d.join("calls.jsonl");
        let lines: Vec<String> = calls()
            .iter()
            .enumerate()
            .map(|(i, _)| {
                json!({"caller_id": format!("c{i}"), "format": "ulaw",
                       "ended": "2026-12-01T10:00:10.000000Z", "ended_by": "caller",
                       "failure_stage": null, "relay": null})
                .to_string()
            })
            .collect();
        std::fs::write(&log, lines.join("\n")).unwrap();
        log
    }

    #[test]
    fn both_kinds_of_run_file_together_in_either_order() {
        let d = dir("both");
        let log = write_calls(&d);
        let (sim, ari) = (d.join("sim.json"), d.join("ari.json"));
        std::fs::write(&sim, sim_json().to_string()).unwrap();
        std::fs::write(&ari, ari_json().to_string()).unwrap();
        let out = d.join("report.html");
        for runs in [[&sim, &ari], [&ari, &sim]] {
            assert_eq!(run(&log, &runs, &out).unwrap(), 5);
            let html = std::fs::read_to_string(&out).unwrap();
            let summary = table(&html, "summary");
            assert!(
                summary.contains("at Asterisk: sent / returned / lost</th><td>3000 / 2990 / 10")
            );
            assert!(summary.contains("end-to-end RTT p50 / p99, µs</th><td>1293.0 / 2477.0"));
            assert!(div(&html, "split-cdf").contains(">\nAsterisk out\n</text>"));
            assert!(div(&html, "rtt-time").contains("run-time-1s"));
            self_contained(&html);
        }
        // A second of one kind is refused, naming both.
        let e = format!("{:#}", run(&log, &[&sim, &sim], &out).unwrap_err());
        assert!(
            e.contains("both sim-asterisk's report") && e.contains("sim.json"),
            "{e}"
        );
        let e = format!("{:#}", run(&log, &[&ari, &sim, &ari], &out).unwrap_err());
        assert!(e.contains("both loadgen ari's report"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_run_file_of_neither_kind_is_refused_clearly() {
        let d = dir("bad");
        let log = write_calls(&d);
        let out = d.join("report.html");
        let bad = d.join("bad.json");
        for (text, want) in [
            ("{\"hello\": 1}", "neither sim-asterisk's --json report"),
            ("[1, 2]", "not a JSON object"),
            ("calls: 3", "not JSON"),
            (
                // `through_asterisk` but not as loadgen ari writes it.
                "{\"through_asterisk\": {\"total\": {\"count\": \"many\"}}}",
                "has `through_asterisk`, so loadgen ari's report, but not as loadgen ari writes it",
            ),
        ] {
            std::fs::write(&bad, text).unwrap();
            let e = format!("{:#}", run(&log, &[&bad], &out).unwrap_err());
            assert!(e.contains(want) && e.contains("bad.json"), "{text}: {e}");
            assert!(!out.exists(), "nothing written");
        }
        let e = format!(
            "{:#}",
            run(&log, &[d.join("absent.json")], &out).unwrap_err()
        );
        assert!(
            e.contains("cannot read") && e.contains("absent.json"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn odd_figures_draw_without_a_panic() {
        let mut v = ari_json();
        let t = &mut v["through_asterisk"];
        t["total"]["cdf"] = json!([[0.0, 0.0], [-5.0, 0.5], [1e300, 2.0], [1e-9, -1.0]]);
        t["asterisk_in"]["cdf"] = json!([]);
        t["relay"] = leg(0, 0.0);
        t["asterisk_out"]["cdf"] = json!([[5.0, 0.1], [5.0, 0.2]]);
        // `t_s` is a count of seconds (a u64): the largest there is, and the first.
        v["timeseries"] = json!([
            {"t_s": u64::MAX, "sent": 0, "returned": 5, "p50_us": -1.0, "p99_us": 0.0,
             "max_us": 1e308, "asterisk_in_p50_us": 1e308, "relay_p50_us": null,
             "asterisk_out_p50_us": -3.0},
            {"t_s": 0, "sent": 3, "returned": 9, "p50_us": 1e-300, "p99_us": 1e308,
             "max_us": 0.0, "asterisk_in_p50_us": null, "relay_p50_us": 0.0,
             "asterisk_out_p50_us": null}
        ]);
        v["lost"]["sent"] = json!(0);
        let html = render(&[], &ari_runs(v)).unwrap();
        assert!(html.contains("id=\"split-cdf\""));
        // Nothing to draw at all.
        let mut v = ari_json();
        v["through_asterisk"]["total"] = leg(0, 0.0);
        v["through_asterisk"]["total"]["cdf"] = json!([]);
        v["timeseries"] = json!([{"t_s": 0, "sent": 0, "returned": 0, "p50_us": 0.0,
                                  "p99_us": 0.0, "max_us": 0.0, "asterisk_in_p50_us": null,
                                  "relay_p50_us": null, "asterisk_out_p50_us": null}]);
        render(&[], &ari_runs(v)).unwrap();
        // A call log with odd figures, drawn by call end time.
        let odd: Vec<Call> = [
            (1e308, -1.0, "2026-12-01T10:00:00Z"),
            (0.0, 1e-300, "garbage"),
        ]
        .iter()
        .map(|&(p99, p50, ended)| {
            serde_json::from_value(json!({
                "caller_id": "c", "format": null, "ended": ended, "ended_by": "caller",
                "failure_stage": null,
                "relay": {"packets_to_echo": 0, "lost_to_asterisk": 9, "echo_timeouts": 0,
                          "rtt_count": 1, "rtt_p50_us": p50, "rtt_p99_us": p99,
                          "rtt_max_us": p99, "jitter_us": -1.0, "r_factor": 1e308,
                          "mos": -7.0}
            }))
            .unwrap()
        })
        .collect();
        render(&odd, &Runs::default()).unwrap();
    }

    /// What `loadgen ari` writes, through its own types, reads back: the reader and the writer
    /// agree on every name.
    #[test]
    fn loadgen_aris_own_report_reads_back() {
        use crate::ari::probes::{CallMedia, ProbeTimes};
        let base = 1_700_000_000_000_000_000u64;
        let probes: Vec<ProbeTimes> = (0..200u64)
            .map(|i| {
                let sent = base + i * 20_000_000;
                ProbeTimes {
                    sent,
                    relay_arrival: sent + 500_000 + i * 100,
                    relay_returned: sent + 800_000 + i * 150,
                    back: sent + 1_300_000 + i * 300,
                    returned: true,
                }
            })
            .collect();
        let m = CallMedia {
            sent: 200,
            returned: 200,
            probes,
            ..CallMedia::default()
        };
        let mut split = crate::ari::through_asterisk::Split::new();
        split.add_call(&m, Some(200));
        let report = crate::ari::AriLoadReport {
            callers: crate::ari::Callers::Rtp,
            calls: 1,
            hold_s: 4.0,
            originated: 1,
            failed: 0,
            first_error: None,
            hung_up: 1,
            played: 1,
            leftovers: Vec::new(),
            through_asterisk: Some(split.through_asterisk()),
            lost: Some(split.lost()),
            timeseries: split.windows(),
            media: Some(split.media()),
            clocks: Some("kernel stamps"),
            relay: None,
            control: None,
        };
        let v = serde_json::to_value(&report).unwrap();
        let runs = ari_runs(v);
        let a = runs.ari.as_ref().unwrap();
        assert_eq!(a.timeseries.len(), 4);
        assert!(
            a.through_asterisk
                .as_ref()
                .unwrap()
                .relay
                .as_ref()
                .unwrap()
                .cdf
                .len()
                > 10
        );
        let html = render(&[], &runs).unwrap();
        let cdf = div(&html, "split-cdf");
        for name in ["total", "Asterisk in", "relay loop", "Asterisk out"] {
            assert!(
                cdf.contains(&format!(">\n{name}\n</text>")),
                "legend {name}"
            );
        }
        assert!(div(&html, "rtt-time").contains(">\nrelay loop p50\n</text>"));
        assert!(table(&html, "split-table").contains(">relay loop</th><td>200</td>"));
        assert!(table(&html, "split-loss").contains("lost before the relay</th><td>0 (0.000 %)"));
    }
}
