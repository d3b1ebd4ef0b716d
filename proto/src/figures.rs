//! A channel's figures in a form that merges exactly: what a relay hands control while a call
//! runs (`interim`) and when its channel closes (`remove`), so that a call carried by several
//! relays in turn (one died, the call moved) is measured as one, and a relay's crash loses at
//! most the figures since its last interim.
//!
//! Counters are carried as they are and summed. The round trips are the channel's HdrHistogram
//! itself, serialised (HdrHistogram's V2 format, base64: about a kilobyte for a call; not
//! DEFLATE-compressed, which made an `interim` of 1,000 channels take 15 ms of the shard's
//! thread rather than 3), with the sum of its values for the exact mean; merged histograms give the same
//! percentiles as one histogram fed every round trip. Jitter is an estimate per stream, not a
//! count: the merge keeps the largest. The score is computed again from the merged figures.

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Counter;
use serde::{Deserialize, Serialize};

use crate::channel_id::ChannelId;
use crate::stats::{
    ChannelStats, DropCounts, EchoCounters, LatencyHistogram, PerDirection, StreamCounters,
    TimestampCounters, TrafficCounters,
};

/// One channel's mergeable figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelFigures {
    /// The channel.
    pub channel: ChannelId,
    /// How long the figures cover: the channel's age when they were taken (merged: the sum).
    pub age_ns: u64,
    /// Packets and bytes forwarded, per direction.
    pub traffic: PerDirection<TrafficCounters>,
    /// RTP stream counters, per direction.
    pub streams: PerDirection<StreamCounters>,
    /// Round-trip accounting.
    pub round_trip: EchoCounters,
    /// How the channel's packets were timed.
    pub timestamps: TimestampCounters,
    /// Drops, by reason.
    pub drops: DropCounts,
    /// The round trips: HdrHistogram V2, base64 (empty: none).
    pub rtt: String,
    /// Their sum, in nanoseconds.
    pub rtt_sum_ns: u64,
}

/// Figures that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum FiguresError {
    /// The round-trip histogram is not base64.
    #[error("round-trip histogram: not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// Nor an HdrHistogram.
    #[error("round-trip histogram: {0:?}")]
    Histogram(hdrhistogram::serialization::DeserializeError),
}

/// `h` as [`ChannelFigures::rtt`].
pub(crate) fn encode<T: Counter>(h: &LatencyHistogram<T>) -> String {
    if h.is_empty() {
        return String::new();
    }
    let mut bytes = Vec::new();
    // Writing to a Vec fails only for a histogram the serializer cannot express (none of ours).
    match V2Serializer::new().serialize(h.histogram(), &mut bytes) {
        Ok(_) => base64::engine::general_purpose::STANDARD.encode(bytes),
        Err(_) => String::new(),
    }
}

impl ChannelFigures {
    /// The figures of a channel whose statistics are `stats` and round trips `rtt`.
    #[must_use]
    pub fn new<T: Counter>(stats: &ChannelStats, rtt: &LatencyHistogram<T>) -> Self {
        Self {
            channel: stats.channel.clone(),
            age_ns: stats.age_ns,
            traffic: stats.traffic,
            streams: stats.streams,
            round_trip: stats.round_trip,
            timestamps: stats.timestamps,
            drops: stats.drops,
            rtt: encode(rtt),
            rtt_sum_ns: u64::try_from(rtt.sum_ns()).unwrap_or(u64::MAX),
        }
    }

    /// The round trips, read back.
    ///
    /// # Errors
    /// [`FiguresError`]: the histogram is not one this module wrote.
    pub fn rtt_histogram(&self) -> Result<LatencyHistogram<u64>, FiguresError> {
        let mut out = LatencyHistogram::new(2);
        if self.rtt.is_empty() {
            return Ok(out);
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(&self.rtt)?;
        let h: hdrhistogram::Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(FiguresError::Histogram)?;
        out.add_histogram(&h, u128::from(self.rtt_sum_ns));
        Ok(out)
    }

    /// Adds `other` (the same call on the next relay, or the next interval): counters summed,
    /// round trips merged, the largest jitter kept.
    ///
    /// # Errors
    /// Either histogram cannot be read back; `self` is then unchanged.
    pub fn merge(&mut self, other: &Self) -> Result<(), FiguresError> {
        let mut rtt = self.rtt_histogram()?;
        rtt.merge(&other.rtt_histogram()?);
        for d in crate::stats::Direction::ALL {
            self.traffic.get_mut(d).accumulate(other.traffic.get(d));
            self.streams.get_mut(d).accumulate(other.streams.get(d));
        }
        self.round_trip.accumulate(&other.round_trip);
        self.timestamps.accumulate(&other.timestamps);
        self.drops.accumulate(&other.drops);
        self.age_ns = self.age_ns.saturating_add(other.age_ns);
        self.rtt = encode(&rtt);
        self.rtt_sum_ns = u64::try_from(rtt.sum_ns()).unwrap_or(u64::MAX);
        Ok(())
    }

    /// As statistics: the summaries and the score computed from these figures; what they do not
    /// carry (the socket, the addresses, the probe figures) is taken from `last`, the final
    /// statistics of the call's last channel, where there are some (none when its relay was
    /// lost: then those are left empty).
    ///
    /// # Errors
    /// The histogram cannot be read back.
    pub fn stats(&self, last: Option<&ChannelStats>) -> Result<ChannelStats, FiguresError> {
        let last = last
            .cloned()
            .unwrap_or_else(|| ChannelStats::empty(self.channel.clone()));
        let rtt = self.rtt_histogram()?.summary();
        let score = crate::score::score(crate::score::Measured {
            rtt_mean_ns: rtt.mean_ns,
            jitter_ns: self.streams.to_asterisk.jitter_ns,
            sent: self.round_trip.sent,
            returned: self.round_trip.returned(),
        });
        Ok(ChannelStats {
            age_ns: self.age_ns,
            traffic: self.traffic,
            streams: self.streams,
            round_trip: self.round_trip,
            rtt,
            timestamps: self.timestamps,
            drops: self.drops,
            score,
            ..last
        })
    }
}

#[cfg(test)]
mod tests;
