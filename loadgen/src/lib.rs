//! `loadgen`: drives rtp-relay end to end.
//!
//! - [`rtp`]: `loadgen rtp`, synthetic Asterisk externalMedia streams against a running relay;
//! - [`report`]: the latency report and the SLA check;
//! - [`blast`]: `loadgen blast`, the maximum rate a reflector sustains (closed loop);
//! - [`ctl`]: a blocking client of the relay's control socket;
//! - [`sim`]: `loadgen sim-asterisk`, an ARI server that behaves like Asterisk 22;
//! - [`ari`]: `loadgen ari`, calls originated on a real Asterisk;
//! - [`html_report`]: `loadgen report`, a call log as a self-contained HTML report.
#![forbid(unsafe_code)]

pub mod ari;
pub mod blast;
pub mod ctl;
pub mod html_report;
pub mod report;
pub mod rtp;
pub mod sim;
