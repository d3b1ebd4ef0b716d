//! `loadgen`: drives rtp-relay end to end.
//!
//! - [`rtp`]: `loadgen rtp`, synthetic Asterisk externalMedia streams against a running relay;
//! - [`rtp_report`]: `loadgen rtp`'s report (text and JSON) and its SLA check;
//! - [`blast`]: `loadgen blast`, the maximum rate a reflector sustains (closed loop);
//! - [`ctl`]: the blocking client of the relay's control socket (it lives in `sim-asterisk`,
//!   which reads the relay's statistics too, and is re-exported here for loadgen's modes);
//! - [`ari`]: `loadgen ari`, calls originated through ARI (a real Asterisk or `sim-asterisk`);
//! - [`html`]: `loadgen report`, a call log and a run's JSON reports as one self-contained HTML
//!   page.
#![forbid(unsafe_code)]

pub mod ari;
pub mod blast;
pub mod error;
pub mod html;
pub mod rtp;
pub mod rtp_report;

pub use sim_asterisk::relay_client as ctl;
