#!/usr/bin/env bash
# The main job: the whole pipeline on loopback, printing a latency report.
#
#   scripts/run-local.sh [loadgen rtp flags...]
#
# Builds in release mode, starts the echo and the relay (pinned to its own core where the
# machine has two), drives them with `loadgen rtp`, prints the report, and stops everything it
# started, also on Ctrl-C and on failure. Settings from the environment:
#   CHANNELS (200), DURATION (20s), BACKEND (uring|tokio, default uring), ECHO_ARGS (extra echo
#   flags, e.g. "--delay 5ms"). Extra arguments go to loadgen, e.g. --max-loss 0.001 --json r.json
set -euo pipefail
cd "$(dirname "$0")/.."

CHANNELS=${CHANNELS:-200}
DURATION=${DURATION:-20s}
BACKEND=${BACKEND:-uring}
ECHO_ARGS=${ECHO_ARGS:-}

echo "==> building (release)" >&2
cargo build --release --quiet -p relay -p echo -p loadgen

tmp=$(mktemp -d)
pids=()
cleanup() {
  local status=$?
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ $status -ne 0 && -d $tmp ]]; then
    for log in "$tmp"/*.log; do [[ -s $log ]] && { echo "--- $log" >&2; tail -n 20 "$log" >&2; }; done
  fi
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits for a line matching $2 in log $1 and prints the value of key $3 from it.
await() {
  local log=$1 pattern=$2 key=$3
  for _ in $(seq 300); do
    if line=$(grep -m1 "$pattern" "$log" 2>/dev/null); then
      sed -E "s/.*${key}=([^ ]+).*/\1/" <<<"$line"
      return 0
    fi
    sleep 0.05
  done
  echo "run-local: timed out waiting for '$pattern' in $log" >&2
  return 1
}

# Two cores or more: the relay alone on core 1, echo and loadgen on core 0.
relay_core=(); other_core=()
if [[ $(nproc) -ge 2 ]]; then relay_core=(--core 1); other_core=(--core 0); fi

# shellcheck disable=SC2086 # ECHO_ARGS is a list of flags
target/release/echo --listen 127.0.0.1:0 --metrics off "${other_core[@]}" $ECHO_ARGS \
  2>"$tmp/echo.log" >"$tmp/echo.json" &
pids+=($!)
echo_addr=$(await "$tmp/echo.log" "echo ready" listen)

target/release/relay --backend "$BACKEND" --ctl "$tmp/relay.sock" --metrics 127.0.0.1:0 \
  --echo "$echo_addr" "${relay_core[@]}" 2>"$tmp/relay.log" &
pids+=($!)
relay_pid=$!
metrics=$(await "$tmp/relay.log" "relay ready" metrics)

echo "==> echo on $echo_addr, relay ($BACKEND) metrics at $metrics; $CHANNELS channels for $DURATION" >&2
# In the background and waited for, so that a signal to this script is handled at once.
target/release/loadgen rtp --relay-ctl "$tmp/relay.sock" --channels "$CHANNELS" \
  --duration "$DURATION" --ramp 0 --relay-pid "$relay_pid" "${other_core[@]}" "$@" &
pids+=($!)
wait "${pids[-1]}"
