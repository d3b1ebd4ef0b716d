//! `control`: reads its configuration (flags or the operators' environment variables), then runs
//! the ARI call lifecycle until SIGINT or SIGTERM. A bad setting exits 2 naming the flag.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use control::config::{Args, Config};

fn main() -> ExitCode {
    let cfg = match Config::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("control: {e}");
            return ExitCode::from(2);
        }
    };
    appkit::init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(control::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // anyhow prints the error with its causes: `cannot listen on --metrics …: <why>`.
            eprintln!("control: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
