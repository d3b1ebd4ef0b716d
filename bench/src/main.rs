//! `bench`: the backend comparison binary (`bench compare`), which arrives with the io_uring and
//! tokio backends. Until then the criterion micro-benchmarks of the core live in `benches/`:
//! `cargo bench -p bench --bench core`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "bench: `bench compare` needs the relay's data-plane backends, which are not built yet; \
         run the core micro-benchmarks with `cargo bench -p bench --bench core`"
    );
    ExitCode::from(2)
}
