#!/usr/bin/env bash
# The comparison in BENCHMARKS.md: this project's relay (io_uring and tokio backends), a minimal
# io_uring forwarder (the floor) and rtpengine, side by side.
#
#   scripts/bench.sh [bench compare flags...]     e.g. --channels 100,1000 --duration 20s
#   scripts/bench.sh --mode drain                  the maximum forwarding rate instead
#   scripts/bench.sh --targets uring,sharded --core 2 --shard-cores 2-5 --load-core 0 --echo-core 1
#                                                  one shard against four (cores: the relay's,
#                                                  the sharded relay's list, loadgen's, the echo's)
#
# Installs rtpengine (Debian package rtpengine-daemon; userspace forwarding, no kernel module)
# when it is missing and the machine allows it, builds everything in release mode, runs
# `bench compare`, and leaves target/bench-compare/compare.json and compare.svg. The criterion
# benches are separate: cargo bench -p bench --bench core | --bench backends.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v rtpengine >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "==> installing rtpengine-daemon" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rtpengine-daemon >/dev/null
    # The package starts a system daemon where systemd runs; the benchmark starts its own.
    if command -v systemctl >/dev/null && systemctl is-active --quiet rtpengine-daemon 2>/dev/null; then
      systemctl stop rtpengine-daemon || true
    fi
  else
    echo "bench.sh: rtpengine is not installed and cannot be installed here (needs root and apt-get); its rows will say skipped" >&2
  fi
fi

echo "==> building (release)" >&2
cargo build --release --quiet -p relay -p echo -p loadgen -p bench
exec target/release/bench compare "$@"
