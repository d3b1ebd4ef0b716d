//! The caller's round trip through Asterisk, split per probe into three legs, and what the run
//! reports of it: each leg's distribution, the loss on each side of the relay, and a time series.
//!
//! For each probe that came back, with every time a kernel stamp of one `CLOCK_REALTIME`:
//!
//! | leg | from | to |
//! |---|---|---|
//! | Asterisk in | loadgen's transmit stamp | the relay's arrival stamp |
//! | relay loop | the relay's arrival stamp | the relay's stamp of the echo's return |
//! | Asterisk out | the relay's stamp of the echo's return | loadgen's receive stamp |
//!
//! The three are differences of four stamps, so they add up to the total (loadgen's receive
//! stamp minus its transmit stamp) exactly, for every probe. Across hosts they are valid only as
//! far as the two clocks agree: a leg that comes out negative shows they do not, and the run then
//! reports totals only ([`Split::legs_valid`]).
//!
//! Loss is split with the relay's own count of the probes it received from Asterisk on the
//! call's channel (control's call record, `relay.probe.received`): lost before the relay = sent −
//! received by the relay; after it = received by the relay − back at loadgen. Without that count
//! (no `--control`, or no record) only the total is known.

use relay_proto::stats::LatencyHistogram;
use serde::{Deserialize, Serialize};

use super::probes::CallMedia;

/// Significant figures of the histograms (0.1 %).
const SIGFIG: u8 = 3;
/// Most windows of run time when the run's span is not given (a day).
const DEFAULT_MAX_WINDOWS: usize = 86_400;
/// Points of each leg's CDF in the JSON.
const CDF_POINTS: usize = 200;

/// One leg's (or the total's) distribution, in microseconds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LegSummary {
    /// Probes measured.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// The distribution: `[µs, fraction of probes at or below]`, ascending, for plotting.
    #[serde(default)]
    pub cdf: Vec<(f64, f64)>,
}

#[allow(clippy::cast_precision_loss)] // nanoseconds to microseconds for reading
fn us(ns: u64) -> f64 {
    (ns as f64 / 1_000.0 * 10.0).round() / 10.0
}

impl LegSummary {
    fn of(h: &LatencyHistogram<u64>) -> Self {
        let s = h.summary();
        let hist = h.histogram();
        let mut cdf = Vec::new();
        if !h.is_empty() {
            for i in 0..=CDF_POINTS {
                #[allow(clippy::cast_precision_loss)] // i ≤ 200
                let q = i as f64 / CDF_POINTS as f64;
                let v = us(hist.value_at_quantile(q));
                if cdf.last().is_none_or(|&(last, _): &(f64, f64)| v > last) {
                    cdf.push((v, q));
                } else if let Some(l) = cdf.last_mut() {
                    l.1 = q;
                }
            }
        }
        Self {
            count: s.count,
            mean_us: us(s.mean_ns),
            p50_us: us(s.p50_ns),
            p95_us: us(s.p95_ns),
            p99_us: us(s.p99_ns),
            p999_us: us(s.p999_ns),
            max_us: us(s.max_ns),
            cdf,
        }
    }
}

/// `through_asterisk` in the report: the total and, when valid, each leg.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ThroughAsterisk {
    /// loadgen's send to its receipt of the return.
    pub total: LegSummary,
    /// loadgen's send to the relay's arrival (`null` when the legs are not valid).
    pub asterisk_in: Option<LegSummary>,
    /// The relay's arrival to the echo's return at the relay: the relay's forward and the echo
    /// leg.
    pub relay: Option<LegSummary>,
    /// The echo's return at the relay to loadgen's receipt: the relay's forward to Asterisk and
    /// Asterisk's way back.
    pub asterisk_out: Option<LegSummary>,
    /// Returns timed in total but not split: the relay had not written its times (the first
    /// probes of a call, before the relay recognises it) or they were not usable.
    #[serde(default)]
    pub unsplit: u64,
    /// Probes with a leg below zero: the clocks of loadgen's and the relay's hosts disagree.
    /// Any of them makes the run report totals only.
    #[serde(default)]
    pub negative_legs: u64,
    /// Returns not timed at all: a kernel stamp (transmit or receive) missing.
    #[serde(default)]
    pub untimed: u64,
}

/// `lost` in the report.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lost {
    /// Probes handed to the kernel.
    pub sent: u64,
    /// Probes back.
    pub returned: u64,
    /// Sent and never back.
    pub total: u64,
    /// Never reached the relay (`null` without the relay's count).
    pub before_relay: Option<u64>,
    /// Reached the relay, never came back.
    pub after_relay: Option<u64>,
    /// Calls whose loss could not be split (no relay count for them).
    #[serde(default)]
    pub calls_unsplit: u64,
}

/// What else came back, or did not leave (`media` in the report).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MediaCounts {
    /// Sends the kernel refused (not counted as sent).
    pub send_errors: u64,
    /// Further copies of a probe already back.
    pub duplicates: u64,
    /// Returns that were not RTP, or carried no valid probe of their call (a damaged header: a
    /// transcoding or mixing path destroys it).
    pub malformed: u64,
    /// Datagrams from an address other than the externalMedia channel's (strict RTP).
    pub strict_drops: u64,
    /// Returns read without a kernel receive stamp (not timed).
    pub no_rx_stamp: u64,
    /// Probes sent outside the run's time series (a step of the wall clock): timed, but in no
    /// window.
    pub outside_windows: u64,
}

/// One second of run time (by the probes' send times).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Window {
    /// Start of the window, seconds since the start of the run.
    pub t_s: u64,
    /// Probes sent in it.
    pub sent: u64,
    /// Of those, back.
    pub returned: u64,
    /// Total round trip of those back and timed: median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Median of each leg (`null` where not split).
    pub asterisk_in_p50_us: Option<f64>,
    /// Median relay loop.
    pub relay_p50_us: Option<f64>,
    /// Median Asterisk out.
    pub asterisk_out_p50_us: Option<f64>,
}

/// Histograms of one window.
#[derive(Debug)]
struct WindowHist {
    sent: u64,
    returned: u64,
    total: LatencyHistogram<u64>,
    legs: [LatencyHistogram<u64>; 3],
}

impl WindowHist {
    fn new() -> Self {
        Self {
            sent: 0,
            returned: 0,
            total: LatencyHistogram::new(2),
            legs: std::array::from_fn(|_| LatencyHistogram::new(2)),
        }
    }
}

/// The run's probes, call by call.
#[derive(Debug)]
pub struct Split {
    total: LatencyHistogram<u64>,
    /// Asterisk in, relay, Asterisk out.
    legs: [LatencyHistogram<u64>; 3],
    unsplit: u64,
    negative: u64,
    untimed: u64,
    sent: u64,
    returned: u64,
    before: u64,
    after: u64,
    calls_unsplit: u64,
    calls_split: u64,
    /// Run time windows, from `epoch` (the start of the run), at most `max_windows`.
    windows: Vec<WindowHist>,
    epoch: Option<u64>,
    max_windows: usize,
    media: MediaCounts,
}

impl Default for Split {
    fn default() -> Self {
        Self::new()
    }
}

/// A probe's legs: Asterisk in, relay loop, Asterisk out (signed: across hosts they may come out
/// negative). `None` unless all four stamps are known.
#[must_use]
pub fn legs(p: &super::probes::ProbeTimes) -> Option<[i64; 3]> {
    if p.sent == 0 || p.back == 0 || p.relay_arrival == 0 || p.relay_returned == 0 {
        return None;
    }
    let d = |a: u64, b: u64| i64::try_from(i128::from(b) - i128::from(a)).ok();
    Some([
        d(p.sent, p.relay_arrival)?,
        d(p.relay_arrival, p.relay_returned)?,
        d(p.relay_returned, p.back)?,
    ])
}

impl Split {
    /// Nothing yet.
    #[must_use]
    pub fn new() -> Self {
        Self {
            total: LatencyHistogram::new(SIGFIG),
            legs: std::array::from_fn(|_| LatencyHistogram::new(SIGFIG)),
            unsplit: 0,
            negative: 0,
            untimed: 0,
            sent: 0,
            returned: 0,
            before: 0,
            after: 0,
            calls_unsplit: 0,
            calls_split: 0,
            windows: Vec::new(),
            epoch: None,
            max_windows: DEFAULT_MAX_WINDOWS,
            media: MediaCounts::default(),
        }
    }

    /// Sets the start of run time (ns `CLOCK_REALTIME`) for the windows, and how long the run
    /// can last: a probe sent later than that (the wall clock stepped) is in no window, so that
    /// a step cannot grow the series without bound. Without it, windows start at each call's
    /// first transmit stamp.
    pub fn set_epoch(&mut self, ns: u64, span: std::time::Duration) {
        self.epoch = Some(self.epoch.map_or(ns, |e| e.min(ns)));
        self.max_windows = usize::try_from(span.as_secs())
            .unwrap_or(usize::MAX)
            .saturating_add(2);
    }

    /// What else came back, or did not leave.
    #[must_use]
    pub const fn media(&self) -> MediaCounts {
        self.media
    }

    /// Adds a call's probes; `relay_received` is the relay's count of its probes from Asterisk.
    pub fn add_call(&mut self, m: &CallMedia, relay_received: Option<u64>) {
        let sent = u64::from(m.sent).saturating_sub(m.send_errors);
        self.media.send_errors += m.send_errors;
        self.media.duplicates += m.duplicates;
        self.media.malformed += m.malformed;
        self.media.strict_drops += m.strict_drops;
        self.media.no_rx_stamp += m.no_rx_stamp;
        self.sent += sent;
        self.returned += m.returned;
        match relay_received {
            Some(r) => {
                self.calls_split += 1;
                self.before += sent.saturating_sub(r);
                self.after += r.saturating_sub(m.returned);
            }
            None => self.calls_unsplit += 1,
        }
        let epoch = self
            .epoch
            .or_else(|| m.probes.iter().map(|p| p.sent).find(|&t| t != 0));
        for p in &m.probes {
            let window = epoch
                .filter(|_| p.sent != 0)
                .map(|e| usize::try_from(p.sent.saturating_sub(e) / 1_000_000_000))
                .and_then(|i| match i {
                    Ok(i) if i < self.max_windows => Some(i),
                    _ => {
                        self.media.outside_windows += 1;
                        None
                    }
                });
            let mut w = window.map(|i| {
                if self.windows.len() <= i {
                    self.windows.resize_with(i + 1, WindowHist::new);
                }
                &mut self.windows[i]
            });
            if let Some(w) = w.as_deref_mut() {
                w.sent += 1;
                w.returned += u64::from(p.returned);
            }
            if !p.returned {
                continue;
            }
            if p.sent == 0 || p.back == 0 || p.back <= p.sent {
                self.untimed += 1;
                continue;
            }
            let total = p.back - p.sent;
            self.total.record(total);
            let split = legs(p);
            if let Some(w) = w {
                w.total.record(total);
                if let Some(l) = split.filter(|l| l.iter().all(|&x| x >= 0)) {
                    for (h, v) in w.legs.iter_mut().zip(l) {
                        h.record(v.unsigned_abs());
                    }
                }
            }
            match split {
                None => self.unsplit += 1,
                Some(l) if l.iter().any(|&x| x < 0) => self.negative += 1,
                Some(l) => {
                    for (h, v) in self.legs.iter_mut().zip(l) {
                        h.record(v.unsigned_abs());
                    }
                }
            }
        }
    }

    /// Whether the legs can be reported: no probe had a negative leg.
    #[must_use]
    pub const fn legs_valid(&self) -> bool {
        self.negative == 0
    }

    /// `through_asterisk`.
    #[must_use]
    pub fn through_asterisk(&self) -> ThroughAsterisk {
        let leg = |i: usize| {
            self.legs_valid()
                .then(|| LegSummary::of(&self.legs[i]))
                .filter(|l| l.count > 0)
        };
        ThroughAsterisk {
            total: LegSummary::of(&self.total),
            asterisk_in: leg(0),
            relay: leg(1),
            asterisk_out: leg(2),
            unsplit: self.unsplit,
            negative_legs: self.negative,
            untimed: self.untimed,
        }
    }

    /// `lost`.
    #[must_use]
    pub fn lost(&self) -> Lost {
        let split = self.calls_split > 0 && self.calls_unsplit == 0;
        Lost {
            sent: self.sent,
            returned: self.returned,
            total: self.sent.saturating_sub(self.returned),
            before_relay: split.then_some(self.before),
            after_relay: split.then_some(self.after),
            calls_unsplit: self.calls_unsplit,
        }
    }

    /// The time series, one entry a second of run time.
    #[must_use]
    pub fn windows(&self) -> Vec<Window> {
        let valid = self.legs_valid();
        let p50 =
            |h: &LatencyHistogram<u64>| (valid && !h.is_empty()).then(|| us(h.summary().p50_ns));
        self.windows
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let s = w.total.summary();
                Window {
                    t_s: i as u64,
                    sent: w.sent,
                    returned: w.returned,
                    p50_us: us(s.p50_ns),
                    p99_us: us(s.p99_ns),
                    max_us: us(s.max_ns),
                    asterisk_in_p50_us: p50(&w.legs[0]),
                    relay_p50_us: p50(&w.legs[1]),
                    asterisk_out_p50_us: p50(&w.legs[2]),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::probes::{CallMedia, ProbeTimes};
    use super::*;

    fn probe(sent: u64, arrival: u64, returned: u64, back: u64) -> ProbeTimes {
        ProbeTimes {
            sent,
            back,
            relay_arrival: arrival,
            relay_returned: returned,
            returned: back != 0,
        }
    }

    #[test]
    fn legs_add_up_and_loss_splits_with_the_relay_count() {
        let base = 1_700_000_000_000_000_000;
        let mut m = CallMedia {
            sent: 4,
            ..CallMedia::default()
        };
        m.probes = vec![
            probe(base, base + 500_000, base + 600_000, base + 1_200_000),
            // Before the relay recognised the call: total only.
            ProbeTimes {
                sent: base + 20_000_000,
                back: base + 21_000_000,
                returned: true,
                ..ProbeTimes::default()
            },
            // Lost after the relay, and lost before it.
            probe(base + 40_000_000, 0, 0, 0),
            probe(base + 60_000_000, 0, 0, 0),
        ];
        m.returned = 2;
        let mut s = Split::new();
        s.add_call(&m, Some(3));
        let t = s.through_asterisk();
        assert_eq!(t.total.count, 2);
        assert_eq!(t.unsplit, 1);
        let (a, r, o) = (
            t.asterisk_in.unwrap(),
            t.relay.unwrap(),
            t.asterisk_out.unwrap(),
        );
        // Histograms hold three significant figures.
        let near = |v: f64, want: f64| (v - want).abs() <= want / 1_000.0;
        assert_eq!(a.count, 1);
        assert!(near(a.p50_us, 500.0), "{a:?}");
        assert!(near(r.p50_us, 100.0), "{r:?}");
        assert!(near(o.p50_us, 600.0), "{o:?}");
        assert_eq!(legs(&m.probes[0]).unwrap().iter().sum::<i64>(), 1_200_000);
        let l = s.lost();
        assert_eq!((l.sent, l.returned, l.total), (4, 2, 2));
        assert_eq!((l.before_relay, l.after_relay), (Some(1), Some(1)));
        let w = s.windows();
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].sent, w[0].returned), (4, 2));
    }

    #[test]
    fn a_negative_leg_leaves_totals_only_and_no_count_no_loss_split() {
        let base = 1_700_000_000_000_000_000;
        let m = CallMedia {
            sent: 1,
            returned: 1,
            // The relay's clock 1 ms behind: Asterisk in comes out negative.
            probes: vec![probe(
                base,
                base - 1_000_000,
                base - 900_000,
                base + 800_000,
            )],
            ..CallMedia::default()
        };
        let mut s = Split::new();
        s.add_call(&m, None);
        let t = s.through_asterisk();
        assert_eq!(t.total.count, 1);
        assert_eq!(t.negative_legs, 1);
        assert!(t.asterisk_in.is_none() && t.relay.is_none() && t.asterisk_out.is_none());
        assert_eq!(s.lost().before_relay, None);
        assert_eq!(s.lost().calls_unsplit, 1);
    }

    #[test]
    fn a_step_of_the_wall_clock_cannot_grow_the_series_without_bound() {
        let base = 1_700_000_000_000_000_000;
        let m = CallMedia {
            sent: 2,
            returned: 2,
            probes: vec![
                probe(base, base + 100, base + 200, base + 300),
                // An hour later: the wall clock stepped.
                probe(
                    base + 3_600_000_000_000,
                    base + 3_600_000_000_100,
                    base + 3_600_000_000_200,
                    base + 3_600_000_000_300,
                ),
            ],
            ..CallMedia::default()
        };
        let mut s = Split::new();
        s.set_epoch(base, std::time::Duration::from_secs(10));
        s.add_call(&m, Some(2));
        assert_eq!(s.windows().len(), 1);
        assert_eq!(s.media().outside_windows, 1);
        assert_eq!(s.through_asterisk().total.count, 2, "still timed");
    }
}
