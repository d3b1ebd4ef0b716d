//! `relay-io`: the workspace's I/O plumbing, and its only `unsafe` code.
//!
//! The relay's data plane, the echo, loadgen and the benchmark's floor forwarder all need the
//! same few things from the kernel: an io_uring with a provided-buffer ring and multishot
//! receives ([`ring`]), UDP sockets bound with large receive buffers, kernel receive timestamps
//! ([`socket`], parsed by [`cmsg`]) and kernel transmit timestamps keyed by an id each send
//! carries ([`txstamp`]), one monotonic clock that kernel stamps convert to
//! ([`clock`]), and threads pinned to a core whose CPU time can be read ([`cpu`]). They live here, behind safe APIs, so
//! that every other crate can be `#![forbid(unsafe_code)]` and the relay crate is the data plane
//! and nothing else. Each `unsafe` block says why it is sound in a `// SAFETY:` line.

pub mod clock;
pub mod cmsg;
pub mod cpu;
#[allow(unsafe_code)] // io_uring, the mapped buffer ring, eventfd, sockaddr layouts
pub mod ring;
#[allow(unsafe_code)] // setsockopt and rlimit calls
pub mod socket;
pub mod txstamp;

pub use clock::{Clock, Sample, WallToMono};
pub use cmsg::{gro_segment, rx_timestamp, WallTime};
pub use cpu::{cpu_time_ns, pin_current_thread, process_cpu_ns, thread_cpu_ns};
pub use socket::{
    bind_udp, enable_rx_timestamps, enable_tx_timestamps, enable_udp_gro, max_gso_segments,
    probe_tx_stamps, raise_nofile_limit, recv_msg, recv_tx_stamp, recv_tx_stamps, send_gso,
    send_msg, set_rcvbuf_force, RecvMeta, SendOpts,
};
pub use txstamp::{TxStamp, TxStampError};
