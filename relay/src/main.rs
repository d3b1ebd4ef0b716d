//! `relay`: the io_uring data plane, control socket and metrics endpoint
//!
//! Not built yet (issue 3). This binary says so and exits non-zero, so nothing can mistake it
//! for a working relay.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("relay: not implemented yet (issue 3: the io_uring data plane, control socket and metrics endpoint)");
    ExitCode::from(2)
}
