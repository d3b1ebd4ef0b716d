//! A score per call: the ITU-T G.107 E-model in its common reduced form, from what the relay
//! measures of every packet (round trip, jitter, loss), so every call gets an R-factor and a MOS
//! without RTCP (which Asterisk's externalMedia channels do not send, and without which rtpengine
//! scores nothing).
//!
//! - effective latency `Le = RTT/2 + 2·jitter + 10 ms` (RTT: the call's mean round trip; jitter:
//!   its RFC 3550 estimate at close; 10 ms for the codec and packetisation);
//! - `R = 93.2 − Le/40` when `Le < 160 ms`, else `R = 93.2 − (Le − 120)/10` (Le in ms);
//! - `R −= 2.5 · loss%`, loss from the exact round-trip counts; `R` clamped to [0, 100];
//! - `MOS = 1 + 0.035·R + 7·10⁻⁶·R·(R − 60)·(100 − R)`; a call that measured nothing scores
//!   MOS 1 (R 0).
//!
//! What it does not capture: the codec's own impairment (G.711 is taken as the reference, so a
//! G.722 or Opus call scores the same as G.711 on the same network), and one-way asymmetry (RTT/2
//! assumes both legs are equal).

use serde::{Deserialize, Serialize};

/// A call's score.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The E-model's transmission rating, 0–100.
    pub r_factor: f64,
    /// Mean opinion score, 1–4.5.
    pub mos: f64,
}

/// What a call measured, as the score needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    /// Mean round trip, nanoseconds.
    pub rtt_mean_ns: u64,
    /// RFC 3550 interarrival jitter at close, nanoseconds.
    pub jitter_ns: u64,
    /// Packets sent toward the echo (round trips attempted).
    pub sent: u64,
    /// Of those, packets whose echo came back in time.
    pub returned: u64,
}

/// Upper bounds of the MOS histogram's buckets: 1.0 to 4.5 by 0.1.
pub const MOS_BOUNDS: [f64; 36] = {
    let mut b = [0.0; 36];
    let mut i = 0;
    while i < 36 {
        b[i] = (10 + i) as f64 / 10.0;
        i += 1;
    }
    b
};

/// Upper bounds of the R-factor histogram's buckets.
pub const R_BOUNDS: [f64; 15] = [
    10.0, 20.0, 30.0, 40.0, 50.0, 55.0, 60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 100.0,
];

/// Scores observed at channel closes, in histogram form (cumulative counts per bound), for
/// Prometheus: `rtprelay_call_mos` and `rtprelay_call_r_factor`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreHistograms {
    /// Cumulative counts at [`MOS_BOUNDS`].
    pub mos: Vec<u64>,
    /// Sum of the MOS observed.
    pub mos_sum: f64,
    /// Cumulative counts at [`R_BOUNDS`].
    pub r_factor: Vec<u64>,
    /// Sum of the R-factors observed.
    pub r_sum: f64,
    /// Calls scored.
    pub count: u64,
}

impl ScoreHistograms {
    /// Empty histograms.
    #[must_use]
    pub fn new() -> Self {
        Self {
            mos: vec![0; MOS_BOUNDS.len()],
            r_factor: vec![0; R_BOUNDS.len()],
            ..Self::default()
        }
    }

    /// Observes one call's score.
    pub fn observe(&mut self, s: Score) {
        for (c, &b) in self.mos.iter_mut().zip(&MOS_BOUNDS) {
            *c += u64::from(s.mos <= b + 1e-9);
        }
        for (c, &b) in self.r_factor.iter_mut().zip(&R_BOUNDS) {
            *c += u64::from(s.r_factor <= b + 1e-9);
        }
        self.mos_sum += s.mos;
        self.r_sum += s.r_factor;
        self.count += 1;
    }

    /// Adds `other`'s observations.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in [
            (&mut self.mos, &other.mos),
            (&mut self.r_factor, &other.r_factor),
        ] {
            if a.len() < b.len() {
                a.resize(b.len(), 0);
            }
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self.mos_sum += other.mos_sum;
        self.r_sum += other.r_sum;
        self.count += other.count;
    }
}

/// The E-model's score for `m` (see the module header).
#[must_use]
pub fn score(m: Measured) -> Score {
    if m.sent == 0 || m.returned == 0 {
        return Score {
            r_factor: 0.0,
            mos: 1.0,
        };
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    let le = ms(m.rtt_mean_ns) / 2.0 + 2.0 * ms(m.jitter_ns) + 10.0;
    let mut r = if le < 160.0 {
        93.2 - le / 40.0
    } else {
        93.2 - (le - 120.0) / 10.0
    };
    let lost = m.sent.saturating_sub(m.returned.min(m.sent));
    r -= 2.5 * (lost as f64 * 100.0 / m.sent as f64);
    let r = r.clamp(0.0, 100.0);
    Score {
        r_factor: r,
        mos: mos(r),
    }
}

/// MOS from an R-factor (ITU-T G.107 annex B), 1 at R 0, 4.5 at R 100.
#[must_use]
pub fn mos(r: f64) -> f64 {
    let r = r.clamp(0.0, 100.0);
    (1.0 + 0.035 * r + 7e-6 * r * (r - 60.0) * (100.0 - r)).clamp(1.0, 4.5)
}

/// The E-model score: R 92.95 and MOS 4.404 for a perfect network; loss and a long round trip cost
/// what the formula says; jitter counts twice and the two latency branches meet; the histograms are
/// cumulative; the edges clamp (nothing measured, everything lost, R below 0 are MOS 1; more
/// returns than sends is no loss).
#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 0.005
    }

    #[test]
    fn a_perfect_network_scores_r_92_95_and_mos_4_404() {
        let s = score(Measured {
            rtt_mean_ns: 0,
            jitter_ns: 0,
            sent: 1_000,
            returned: 1_000,
        });
        // Le = 10 ms: R = 93.2 − 0.25.
        assert!(close(s.r_factor, 92.95), "{s:?}");
        assert!(close(s.mos, 4.404), "{s:?}");
    }

    #[test]
    fn loss_and_a_long_round_trip_cost_what_the_formula_says() {
        // 2 % loss, 300 ms RTT, no jitter: Le = 160 ms, the second branch: R = 93.2 − 4 − 5.
        let s = score(Measured {
            rtt_mean_ns: 300 * MS,
            jitter_ns: 0,
            sent: 1_000,
            returned: 980,
        });
        assert!(close(s.r_factor, 84.2), "{s:?}");
        let want = 1.0 + 0.035 * 84.2 + 7e-6 * 84.2 * 24.2 * 15.8;
        assert!(close(s.mos, want), "{s:?} vs {want}");
        // 20 % loss: R = 92.95 − 50 = 42.95.
        let s = score(Measured {
            rtt_mean_ns: 0,
            jitter_ns: 0,
            sent: 1_000,
            returned: 800,
        });
        assert!(close(s.r_factor, 42.95), "{s:?}");
        assert!(close(s.mos, mos(42.95)) && s.mos < 2.3, "{s:?}");
    }

    #[test]
    fn jitter_counts_twice_and_the_branches_meet() {
        // 20 ms jitter adds 40 ms of effective latency.
        let s = score(Measured {
            rtt_mean_ns: 20 * MS,
            jitter_ns: 20 * MS,
            sent: 10,
            returned: 10,
        });
        assert!(close(s.r_factor, 93.2 - 60.0 / 40.0), "{s:?}");
        // At Le = 160 ms both branches give 89.2.
        let below = score(Measured {
            rtt_mean_ns: 299_999_998,
            sent: 1,
            returned: 1,
            ..Measured::default()
        });
        assert!((below.r_factor - 89.2).abs() < 1e-3, "{below:?}");
    }

    #[test]
    fn histograms_are_cumulative() {
        let mut h = ScoreHistograms::new();
        h.observe(Score {
            r_factor: 92.95,
            mos: 4.404,
        });
        h.observe(Score {
            r_factor: 0.0,
            mos: 1.0,
        });
        assert_eq!(
            (h.mos[0], h.mos[34], h.mos[35]),
            (1, 1, 2),
            "≤1.0, ≤4.4, ≤4.5"
        );
        assert_eq!((h.r_factor[0], h.r_factor[13], h.r_factor[14]), (1, 2, 2));
        assert_eq!(h.count, 2);
        assert!((h.mos_sum - 5.404).abs() < 1e-9);
        assert!((MOS_BOUNDS[0] - 1.0).abs() < 1e-12 && (MOS_BOUNDS[35] - 4.5).abs() < 1e-12);
    }

    #[test]
    fn edges_clamp_and_nothing_measured_is_mos_1() {
        let none = score(Measured::default());
        assert_eq!((none.r_factor, none.mos), (0.0, 1.0));
        let lost_all = score(Measured {
            sent: 100,
            returned: 0,
            ..Measured::default()
        });
        assert_eq!(lost_all.mos, 1.0);
        // 10 s round trips and 50 % loss: R below 0 clamps to 0, MOS to 1.
        let awful = score(Measured {
            rtt_mean_ns: 10_000 * MS,
            jitter_ns: 0,
            sent: 100,
            returned: 50,
        });
        assert_eq!((awful.r_factor, awful.mos), (0.0, 1.0));
        // More returns than sends (never, but counted defensively) is no loss, not a gain.
        let odd = score(Measured {
            sent: 10,
            returned: 12,
            ..Measured::default()
        });
        assert!(close(odd.r_factor, 92.95));
        assert!((mos(100.0) - 4.5).abs() < 1e-9 && (mos(-5.0) - 1.0).abs() < 1e-9);
    }
}
