//! `control`: the Asterisk ARI call lifecycle and port pool
//!
//! Not built yet (issue 5). This binary says so and exits non-zero, so nothing can mistake it
//! for a working control.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "control: not implemented yet (issue 5: the Asterisk ARI call lifecycle and port pool)"
    );
    ExitCode::from(2)
}
