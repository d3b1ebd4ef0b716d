//! The parts of `bench` that `bench compare` and its tests share: the comparison itself
//! ([`compare`]), what it measured and the table of it ([`results`]), its chart ([`chart`]), the
//! minimal forwarder ([`floor`]) and rtpengine's ng protocol ([`ng`]).
#![forbid(unsafe_code)]

pub mod chart;
pub mod compare;
pub mod floor;
pub mod ng;
pub mod results;
