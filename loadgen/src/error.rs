//! The error of loadgen's own load loops (`loadgen rtp`, `loadgen blast`): what a caller of the
//! library gets instead of an `anyhow::Error`, which only the binary uses.

use crate::ctl::RelayClientError;

/// Why a `loadgen rtp` or `loadgen blast` run could not start or could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting that cannot work; the message names the flag.
    #[error("{0}")]
    Settings(String),
    /// A socket or io_uring refused what the run needs.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// io_uring could not be set up.
    #[error("io_uring")]
    Ring(#[source] relay_io::ring::SetupError),
    /// The relay's control socket (connecting, its statistics, removing the channels).
    #[error(transparent)]
    Relay(#[from] RelayClientError),
    /// The relay refused a channel.
    #[error("adding a channel to the relay")]
    AddChannel(#[source] RelayClientError),
    /// The thread adding channels stopped early, or panicked.
    #[error("{0}")]
    Control(String),
}

/// A [`RunError::Io`] for `what`.
pub(crate) fn io(what: &str) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        what: what.to_owned(),
        source,
    }
}
