#!/usr/bin/env bash
# The echo's maximum sustained rate for BENCHMARKS.md: echo pinned to core 1, `loadgen blast`
# (closed loop, 16 sockets × 64 packets in flight) on core 0, 5 s after 0.5 s of warm-up.
# Prints loadgen's measured returns/s and the echo's own summary (CPU per packet).
# GSO=N: loadgen sends UDP GSO batches of N packets and receives with GRO; the echo runs --gro.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p echo -p loadgen
port=$((20000 + RANDOM % 20000))
gro=(); gso=()
if [[ -n ${GSO:-} ]]; then gro=(--gro); gso=(--gso "$GSO"); fi
target/release/echo --listen "127.0.0.1:$port" --metrics off --core 1 "${gro[@]}" >/tmp/echo-measure.$$.json 2>/dev/null &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null || true; rm -f /tmp/echo-measure.$$.json' EXIT
sleep 0.5
echo "loadgen blast: $(target/release/loadgen blast --target "127.0.0.1:$port" --core 0 --duration "${DURATION:-5s}" "${gso[@]}")"
kill -TERM "$echo_pid"; wait "$echo_pid" || true
echo "echo summary:  $(cat /tmp/echo-measure.$$.json)"
