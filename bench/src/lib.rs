//! The parts of `bench` that `bench compare` and its tests share: the comparison itself
//! ([`compare`]), its chart ([`chart`]), the minimal forwarder ([`floor`]) and rtpengine's ng
//! protocol ([`ng`]).

pub mod chart;
pub mod compare;
pub mod floor;
pub mod ng;
