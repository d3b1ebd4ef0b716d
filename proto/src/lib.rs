//! `relay-proto`: the sans-IO core of rtp-relay.
//!
//! Everything the relay decides and measures lives here, with no sockets, no threads, no clock
//! reads and no unsafe code, in the manner of `quinn-proto`: time is an argument ([`MonoTime`]),
//! and outputs are values ([`Verdict`], [`CommandOutcome`], [`Event`]). Both data-plane backends
//! (io_uring and tokio) drive this one core, so comparing them compares only their I/O, and tests
//! run the whole relay on a virtual clock, bytes in and bytes out.
//!
//! | module | what it holds |
//! |---|---|
//! | [`rtp`] | RTP/RTCP parsing into borrowed views; never panics |
//! | [`seq`] | RFC 3550 A.1 sequence tracking, exact for loss, duplicates and reordering |
//! | [`timing`] | RFC 3550 A.8 jitter and windowed-baseline lateness |
//! | [`t0`] | the per-channel T0 ring: O(1) insert and lookup, exact timeouts |
//! | [`probe`] | the probe header loadgen puts in its payloads and the relay writes its times into |
//! | [`score`] | the E-model's R-factor and MOS of a call, from what it measured (no RTCP) |
//! | [`stats`] | counters, HdrHistograms (each channel's and the relay-wide ones), the serialisable summaries, and the merge of several relays' |
//! | [`relay`] | the state machine: channels, verdicts, commands, timers, send times, echo-leg tags |
//! | [`control`] | the newline-delimited JSON control protocol and its bounded decoder |
//! | [`channel_id`] | the validated channel identifier both the protocol and the statistics use |
//! | [`format`](mod@format), [`time`], [`rng`] | media formats with their RTP clocks; monotonic time as a value; a seedable generator |
#![forbid(unsafe_code)]

pub mod channel_id;
pub mod control;
pub mod figures;
pub mod format;
pub mod probe;
pub mod relay;
pub mod rng;
pub mod rtp;
pub mod score;
pub mod sends;
pub mod seq;
pub mod stats;
pub mod t0;
pub mod tag;
pub mod time;
pub mod timing;

pub use control::{
    ChannelId, Command, ControlSession, ErrorCode, ErrorReply, Reply, Request, Response,
};
pub use format::{ClockRate, Format};
pub use relay::{
    CommandOutcome, ConfigError, Event, PendingOpen, Relay, RelayConfig, SendTimes, SocketId,
    Verdict,
};
pub use rtp::{RtpHeader, Ssrc};
pub use stats::{
    merge_global, ChannelStats, Direction, DropReason, GlobalStats, LatencySummary, MissingKind,
    ProbeStats, ProbeTotals, TimestampCounters,
};
pub use time::MonoTime;
