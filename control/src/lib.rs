//! `control`: the Asterisk ARI side of rtp-relay. For each call entering the Stasis application it
//! answers, takes a relay port from the pool, creates an externalMedia channel aimed at it,
//! bridges the two and tells the relay; when the call ends it undoes all of it.
//!
//! Built so far: [`config`] (the operators' environment variables, the password kept secret),
//! [`pool`] (the port pool) and [`ari`] (the ARI messages control reads). The ARI client, the call lifecycle and the relay client are issue 5's
//! remaining work.
#![forbid(unsafe_code)]

pub mod ari;
pub mod config;
pub mod pool;

pub use relay_proto::control as protocol;
