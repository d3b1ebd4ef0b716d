//! `control`: the Asterisk ARI client that opens and closes relay channels as calls come and go.
//!
//! Issue 5 fills this crate: the ARI REST and WebSocket client, the port pool, the call lifecycle
//! and the relay client. Until then it only re-exports the protocol it will speak to the relay.
#![forbid(unsafe_code)]

pub use relay_proto::control as protocol;
