//! `loadgen`: synthetic Asterisk streams, ARI calls and the simulated Asterisk
//!
//! Not built yet (issue 4). This binary says so and exits non-zero, so nothing can mistake it
//! for a working loadgen.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("loadgen: not implemented yet (issue 4: synthetic Asterisk streams, ARI calls and the simulated Asterisk)");
    ExitCode::from(2)
}
