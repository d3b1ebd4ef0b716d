//! `control`: validates its configuration, then says plainly that the ARI lifecycle is not built
//! yet (issue 5) and exits 2, so nothing mistakes it for a working control plane.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use control::config::{Args, Config};

fn main() -> ExitCode {
    match Config::try_from(Args::parse()) {
        Ok(c) => {
            eprintln!(
                "control: configuration valid (ARI {} app {}, ports {}-{}), but the ARI call \
                 lifecycle is not implemented yet (issue 5)",
                c.ari_url,
                c.app_name,
                c.port_range.start(),
                c.port_range.end()
            );
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("control: {e}");
            ExitCode::from(2)
        }
    }
}
