//! `relay`: the data plane that drives [`relay_proto::Relay`] with real sockets.
//!
//! Issue 3 fills this crate: the io_uring backend (fixed files, multishot RecvMsg on a provided
//! buffer ring, batched SendMsg), the tokio baseline backend, the control-socket server and the
//! metrics endpoint. Until then it only re-exports the core it will drive.
#![forbid(unsafe_code)]

pub use relay_proto as proto;
