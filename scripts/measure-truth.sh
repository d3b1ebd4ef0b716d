#!/usr/bin/env bash
# The relay's figures against the wire's: for each timestamp mode and channel count, loadgen rtp
# drives the relay (io_uring, core 1) and the echo (core 0) over loopback while tcpdump captures
# every packet with its kernel timestamp (nanoseconds); scripts/wire.py matches the packets by
# (relay port, sequence number) and prints the wire's round trip and residence inside the relay
# beside the relay's RTT and forward percentiles, with the targets met or not.
#
#   scripts/measure-truth.sh                       # 100, 300, 1000 channels, kernel and user
#   COUNTS="300" DURATION=5s TIMESTAMPS=kernel scripts/measure-truth.sh
#   ECHO_ARGS="--delay 5ms" COUNTS=100 scripts/measure-truth.sh
#   RELAY_ARGS="--echo-leg shared" ECHO_ARGS="--gro" scripts/measure-truth.sh   # shared echo leg
#
# Packets are captured whole (SNAPLEN=0): a GSO send or a GRO-coalesced return is one packet on
# loopback, and wire.py cuts it into its datagrams. SNAPLEN=96 captures headers only (less load
# on the machine; enough for a per-channel leg).
#
# Installs tcpdump (Debian package) when it is missing and the machine allows it. Exits 1 when a
# target is missed (every row is printed first).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${COUNTS:-"100 300 1000"}
DURATION=${DURATION:-10s}
TIMESTAMPS=${TIMESTAMPS:-"kernel user"}
BACKEND=${BACKEND:-uring}
ECHO_ARGS=${ECHO_ARGS:-}
RELAY_ARGS=${RELAY_ARGS:-}

if ! command -v tcpdump >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "==> installing tcpdump" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tcpdump; } >/dev/null
  else
    echo "measure-truth.sh: tcpdump is missing and cannot be installed here (needs root and apt-get)" >&2
    exit 2
  fi
fi
echo "==> building (release)" >&2
cargo build --release --quiet -p relay -p echo -p loadgen
bin=target/release
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# Waits (10 s at most) for `key=` on a line of log file $1 containing $2; prints the value.
ready() {
  local log=$1 want=$2 key=$3
  for _ in $(seq 1 200); do
    local v
    v=$(grep -m1 "$want" "$log" 2>/dev/null | sed -n "s/.*$key=\([^ ]*\).*/\1/p" || true)
    if [[ -n "$v" ]]; then echo "$v"; return 0; fi
    sleep 0.05
  done
  echo "measure-truth.sh: no '$want' in $log:" >&2; cat "$log" >&2; return 1
}

echo "| timestamps, channels | relay ports | wire RTT p50 µs | relay RTT p50 µs | diff | ≤ 5 µs + 2 % | wire RTT p99 µs | relay RTT p99 µs | diff | ≤ 10 µs + 5 % | wire residence p50 µs | relay forward p50 µs | diff | ≤ 5 µs |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
missed=0
for ts in $TIMESTAMPS; do
  for n in $COUNTS; do
    pids=()
    # shellcheck disable=SC2086 # the extra arguments are meant to split
    RUST_LOG=info $bin/echo --listen 127.0.0.1:0 --metrics off --core 0 $ECHO_ARGS \
      >"$dir/echo.out" 2>"$dir/echo.log" & pids+=($!)
    echo_addr=$(ready "$dir/echo.log" "echo ready" listen)
    # shellcheck disable=SC2086
    RUST_LOG=info $bin/relay --backend "$BACKEND" --ctl "$dir/relay.sock" --metrics 127.0.0.1:0 \
      --echo "$echo_addr" --core 1 --timestamps "$ts" --max-channels $((n + 16)) $RELAY_ARGS \
      2>"$dir/relay.log" & pids+=($!)
    relay_pid=$!
    ready "$dir/relay.log" "relay ready" metrics >/dev/null
    tcpdump -i lo -n -q --time-stamp-precision=nano -s "${SNAPLEN:-0}" -B 262144 -w "$dir/cap.pcap" \
      "udp and not port 53" 2>"$dir/tcpdump.log" & pids+=($!)
    tcpdump_pid=$!
    for _ in $(seq 1 200); do grep -q "listening on" "$dir/tcpdump.log" && break; sleep 0.05; done
    $bin/loadgen rtp --relay-ctl "$dir/relay.sock" --channels "$n" --duration "$DURATION" \
      --warmup 1s --ramp 0 --core 0 --relay-pid "$relay_pid" --json "$dir/lg.json" >/dev/null 2>"$dir/lg.log" \
      || { cat "$dir/lg.log" >&2; exit 1; }
    sleep 0.2
    kill -INT "$tcpdump_pid"; wait "$tcpdump_pid" 2>/dev/null || true
    dropped=$(sed -n 's/^\([0-9]*\) packets dropped by kernel/\1/p' "$dir/tcpdump.log")
    if [[ "${dropped:-0}" != 0 ]]; then
      echo "measure-truth.sh: tcpdump dropped $dropped packets at $n channels; the wire figures cover the rest" >&2
    fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f "$dir/relay.sock"
    echo_port=${echo_addr##*:}
    python3 scripts/wire.py "$dir/cap.pcap" "$dir/lg.json" "$echo_port" "$ts, $n" || missed=1
  done
done
exit $missed
