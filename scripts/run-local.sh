#!/usr/bin/env bash
# The main job: the whole pipeline on loopback, printing a latency report.
#
#   scripts/run-local.sh [extra flags for the driver...]
#
# Builds in release mode and starts echo, relay (pinned to its own core where the machine has
# two, strict: it only accepts the RTP address control gives it), a simulated Asterisk 22
# (`sim-asterisk`, serving ARI) and control, then `loadgen ari --callers rtp` makes the
# calls: through a Local channel pair into control's application, its probes go loadgen ->
# Asterisk -> relay -> echo -> relay -> Asterisk -> loadgen, each timed on both sides of Asterisk.
# Control answers each call, bridges it to an externalMedia channel on a relay port, and tears it
# all down when the call ends. Prints loadgen's report (the caller's round trip split into
# Asterisk in, relay loop and Asterisk out, loss on each side of the relay) and the simulated
# Asterisk's (its bridges, leftovers, the relay's CPU per packet), and stops everything it
# started, also on Ctrl-C and on failure. Settings from the environment:
#   CALLS (100), HOLD (30s: each call's length), RAMP (2s), BACKEND (uring|tokio, default uring),
#   ECHO_ARGS (extra echo flags, e.g. "--delay 5ms"), SIM_ARGS (extra sim-asterisk flags, e.g.
#   "--bridge-delay 1ms --bridge-loss 0.001"), OUT (a directory for the run's files, default a
#   new runs/<timestamp>: calls.jsonl (control's call log), report.json (loadgen ari's report),
#   sim.json (sim-asterisk's) and report.html (`loadgen report` of all three); the last line
#   printed says where).
#   MODE=rtp runs the relay without Asterisk or control instead: `loadgen rtp` adds the channels
#   itself (CHANNELS, default 200; DURATION, default 20s).
# Extra arguments go to the driver (loadgen ari, or loadgen rtp), e.g. --probes probes.csv
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${MODE:-pipeline}
CALLS=${CALLS:-100}
HOLD=${HOLD:-30s}
RAMP=${RAMP:-2s}
CHANNELS=${CHANNELS:-200}
DURATION=${DURATION:-20s}
BACKEND=${BACKEND:-uring}
ECHO_ARGS=${ECHO_ARGS:-}
SIM_ARGS=${SIM_ARGS:-}

echo "==> building (release)" >&2
cargo build --release --quiet -p relay -p echo -p loadgen -p sim-asterisk -p control

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
  --echo "$echo_addr" --strict "${relay_core[@]}" 2>"$tmp/relay.log" &
pids+=($!)
relay_pid=$!
metrics=$(await "$tmp/relay.log" "relay ready" metrics)

if [[ $MODE == rtp ]]; then
  echo "==> echo on $echo_addr, relay ($BACKEND) metrics at $metrics; $CHANNELS channels for $DURATION" >&2
  # In the background and waited for, so that a signal to this script is handled at once.
  target/release/loadgen rtp --relay-ctl "$tmp/relay.sock" --channels "$CHANNELS" \
    --duration "$DURATION" --ramp 0 --relay-pid "$relay_pid" "${other_core[@]}" "$@" &
  pids+=($!)
  wait "${pids[-1]}"
  exit
fi
[[ $MODE == pipeline ]] || { echo "run-local: MODE must be pipeline or rtp, not '$MODE'" >&2; exit 2; }

OUT=${OUT:-runs/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
pass=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
ports="21000-$((21000 + CALLS + 99))"
pin=(); if [[ ${#other_core[@]} -gt 0 ]] && command -v taskset >/dev/null; then pin=(taskset -c 0); fi
# The simulated Asterisk serves ARI until it is interrupted. It is not pinned: its media threads
# share the relay's core, as a real Asterisk's do (README, sim-asterisk). Control and
# loadgen stay off the relay's core.
# shellcheck disable=SC2086 # SIM_ARGS is a list of flags
target/release/sim-asterisk --listen 127.0.0.1:0 --ari-pass "$pass" --calls 0 \
  --relay-ctl "$tmp/relay.sock" --relay-pid "$relay_pid" --json "$OUT/sim.json" $SIM_ARGS \
  >"$tmp/sim.out" 2>"$tmp/sim.log" &
pids+=($!)
sim_pid=$!
ari=$(await "$tmp/sim.log" "sim-asterisk ready" listen)

ARI_PASS=$pass "${pin[@]}" target/release/control --ari-url "http://$ari" \
  --relay-socket "$tmp/relay.sock" --metrics 127.0.0.1:0 --port-range "$ports" \
  --echo-host "${echo_addr%:*}" --echo-port "${echo_addr##*:}" --call-log "$OUT/calls.jsonl" \
  2>"$tmp/control.log" &
pids+=($!)
control_pid=$!
control=$(await "$tmp/control.log" "control ready" metrics)

echo "==> echo on $echo_addr, relay ($BACKEND) metrics at $metrics, control at http://$control," \
  "simulated Asterisk at http://$ari: $CALLS calls of $HOLD, ramp $RAMP" >&2
status=0
# loadgen is the callers: probes through the simulated Asterisk, timed on both sides of it.
# In the background and waited for, so that a signal to this script is handled at once.
ARI_PASS=$pass "${pin[@]}" target/release/loadgen ari --callers rtp --ari-url "http://$ari" \
  --calls "$CALLS" --hold "$HOLD" --ramp "$RAMP" --relay-ctl "$tmp/relay.sock" \
  --control "http://$control" --json "$OUT/report.json" "$@" 2>"$tmp/loadgen.log" &
pids+=($!)
wait "${pids[-1]}" || status=$?
# The simulated Asterisk's own view (its bridges, what was left over, the relay's CPU): it
# reports once interrupted.
kill -INT "$sim_pid" 2>/dev/null || true
wait "$sim_pid" || status=$?
echo
echo "the simulated Asterisk:"
cat "$tmp/sim.out"
# Control tears down what is left and writes its last call records, then the report is drawn.
kill -TERM "$control_pid" 2>/dev/null || true
wait "$control_pid" 2>/dev/null || true
target/release/loadgen report --calls "$OUT/calls.jsonl" --run "$OUT/report.json" \
  --run "$OUT/sim.json" --out "$OUT/report.html" 2>>"$tmp/report.log" || status=1
echo "run files: $OUT/calls.jsonl, $OUT/report.json, $OUT/sim.json, $OUT/report.html"
exit "$status"
