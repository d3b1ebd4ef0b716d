//! A relay's settings: what [`Relay::new`](super::Relay::new) checks before it builds anything.
//!
//! Kept apart from the state machine so that a binary can build and validate a [`RelayConfig`]
//! (from its flags) without reading the machinery it configures.

use core::time::Duration;
use std::net::SocketAddr;

use crate::seq::MIN_SEQUENTIAL;
use crate::timing::LatenessConfig;

/// Where the time a forwarded datagram left comes from (its T0 toward the echo, and the end of
/// its forward time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SendTimes {
    /// The kernel's transmit stamp of each send, reported with
    /// [`Relay::tx_stamped`](super::Relay::tx_stamped): exact whatever the scheduler does.
    #[default]
    Kernel,
    /// An estimate from clock reads around the system call that submitted the send
    /// ([`Relay::submitted_between`](super::Relay::submitted_between)): the way before kernel
    /// stamps, kept for comparison. Wrong whenever the relay is preempted between the reads.
    Estimated,
}

/// Settings of a relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// Most channels open at once (socket slots 0..max_channels).
    pub max_channels: u32,
    /// Echo server for channels whose `add` names none.
    pub default_echo: SocketAddr,
    /// Refuse to latch Asterisk's address from traffic: it must come from control.
    pub strict_source: bool,
    /// A channel with no media in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// A packet whose echo has not come back after this long counts as an echo timeout.
    pub echo_timeout: Duration,
    /// T0 table slots per channel (rounded up to a power of two, at most 65536).
    pub t0_slots: usize,
    /// Packets in sequence before a new RTP source is counted (RFC 3550 A.1).
    pub min_sequential: u8,
    /// When a packet is late.
    pub lateness: LatenessConfig,
    /// Round trips above this are counted as `rtt_high`.
    pub rtt_threshold: Duration,
    /// How often the timer runs (echo-timeout sweep and idle check).
    pub timer_interval: Duration,
    /// Which data-plane shard this relay is (0 for a one-shard relay): named in `add` and
    /// `list` replies and in channel statistics.
    pub shard: u32,
    /// Where send times come from.
    pub send_times: SendTimes,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_channels: 4096,
            default_echo: SocketAddr::from(([127, 0, 0, 1], 4000)),
            strict_source: false,
            idle_timeout: Duration::from_secs(60),
            echo_timeout: Duration::from_secs(2),
            t0_slots: 1024,
            min_sequential: MIN_SEQUENTIAL,
            lateness: LatenessConfig::default(),
            rtt_threshold: Duration::from_millis(50),
            timer_interval: Duration::from_millis(100),
            shard: 0,
            send_times: SendTimes::Kernel,
        }
    }
}

/// A [`RelayConfig`] value out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `max_channels` is 0 or above 1 048 576.
    #[error("max_channels must be 1..=1048576, got {0}")]
    MaxChannels(u32),
    /// `t0_slots` is not a power of two in 1..=65536.
    #[error("t0_slots must be a power of two in 1..=65536, got {0}")]
    T0Slots(usize),
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// The echo address has port 0 or an unspecified IP.
    #[error("default echo address {0} is not a usable destination")]
    Echo(SocketAddr),
}

impl RelayConfig {
    /// Checks every value.
    ///
    /// # Errors
    /// The first value out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_channels == 0 || self.max_channels > 1 << 20 {
            return Err(ConfigError::MaxChannels(self.max_channels));
        }
        if !self.t0_slots.is_power_of_two() || self.t0_slots > 1 << 16 {
            return Err(ConfigError::T0Slots(self.t0_slots));
        }
        for (name, d) in [
            ("idle_timeout", self.idle_timeout),
            ("echo_timeout", self.echo_timeout),
            ("timer_interval", self.timer_interval),
            ("lateness window", self.lateness.window),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if !usable(self.default_echo) {
            return Err(ConfigError::Echo(self.default_echo));
        }
        Ok(())
    }
}

/// Whether `a` can be sent to: a port and a specified IP.
pub(super) fn usable(a: SocketAddr) -> bool {
    a.port() != 0 && !a.ip().is_unspecified()
}
