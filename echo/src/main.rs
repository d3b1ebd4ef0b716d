//! `echo`: the single-port RTP reflector with fault injection
//!
//! Not built yet (issue 4). This binary says so and exits non-zero, so nothing can mistake it
//! for a working echo.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "echo: not implemented yet (issue 4: the single-port RTP reflector with fault injection)"
    );
    ExitCode::from(2)
}
