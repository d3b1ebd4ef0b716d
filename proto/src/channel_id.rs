//! A channel's identifier, in a module of its own because both the control protocol
//! ([`crate::control`]) and the statistics ([`crate::stats`]) name channels by it, and neither
//! should depend on the other for that.

use core::fmt;

use serde::{Deserialize, Serialize};

/// Longest channel identifier, in bytes.
pub const MAX_CHANNEL_ID: usize = 128;

/// A channel's identifier, chosen by control (for example the Asterisk channel id): 1–128
/// printable ASCII characters, no spaces.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelId(String);

impl ChannelId {
    /// The identifier as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A channel identifier that is empty, too long, or not printable ASCII.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("channel id must be 1-{MAX_CHANNEL_ID} printable ASCII characters without spaces")]
pub struct BadChannelId;

impl TryFrom<String> for ChannelId {
    type Error = BadChannelId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.is_empty() || s.len() > MAX_CHANNEL_ID || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BadChannelId);
        }
        Ok(Self(s))
    }
}

impl TryFrom<&str> for ChannelId {
    type Error = BadChannelId;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::try_from(s.to_owned())
    }
}

impl From<ChannelId> for String {
    fn from(id: ChannelId) -> Self {
        id.0
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
