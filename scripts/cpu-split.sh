#!/usr/bin/env bash
# User and system CPU per forwarded packet of the relay, per backend: where the time goes.
#
#   scripts/cpu-split.sh [CHANNELS (1000)] [SECONDS (6)]
#
# Relay alone on core 1, echo and loadgen rtp on core 0, 50 packets/s each way per channel; the
# relay's utime and stime are read from /proc/PID/stat after a 2 s warm-up and SECONDS later.
set -euo pipefail
cd "$(dirname "$0")/.."
channels=${1:-1000}; seconds=${2:-6}
cargo build --release --quiet -p relay -p echo -p loadgen
tmp=$(mktemp -d); pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$tmp"' EXIT
hz=$(getconf CLK_TCK)
for backend in uring tokio; do
  target/release/echo --listen 127.0.0.1:0 --metrics off --core 0 2>"$tmp/echo-$backend.log" >/dev/null &
  pids+=($!)
  for _ in $(seq 100); do grep -q "echo ready" "$tmp/echo-$backend.log" && break; sleep 0.05; done
  echo_addr=$(sed -nE 's/.*listen=([^ ]+).*/\1/p' "$tmp/echo-$backend.log" | head -1)
  target/release/relay --backend "$backend" --ctl "$tmp/$backend.sock" --metrics 127.0.0.1:0 \
    --echo "$echo_addr" --core 1 2>/dev/null &
  relay=$!; pids+=("$relay")
  for _ in $(seq 100); do [[ -S $tmp/$backend.sock ]] && break; sleep 0.05; done
  target/release/loadgen rtp --relay-ctl "$tmp/$backend.sock" --channels "$channels" \
    --duration "$((seconds + 3))s" --ramp 0 --core 0 >/dev/null 2>&1 &
  lg=$!
  sleep 2
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$relay/stat")
  sleep "$seconds"
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$relay/stat")
  wait "$lg"
  packets=$((channels * 100 * seconds))
  awk -v b="$backend" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" -v p="$packets" 'BEGIN {
    printf "%-6s user %.2f µs  system %.2f µs  total %.2f µs per packet (%d packets)\n",
      b, u / hz / p * 1e6, s / hz / p * 1e6, (u + s) / hz / p * 1e6, p }'
done
