#!/usr/bin/env bash
# The relay's figures against the wire's. For each shape, backend, echo leg and channel count the
# relay (core 1) forwards RTP between a traffic source and the echo over loopback while tcpdump
# captures every packet with its kernel timestamp (nanoseconds); scripts/wire.py matches the
# packets by (relay port, sequence number) and prints the wire's round trip and residence inside
# the relay beside the relay's own figures, with the targets met or not.
#
# Shapes (SHAPES):
#   plain     loadgen rtp on core 0, the echo on core 0: the relay has its core to itself.
#   corunner  the echo at real-time priority (chrt -f 1) on the relay's own core: it preempts the
#             relay each time the relay sends to it. loadgen rtp on core 0.
#   sim       the simulated Asterisk's media (one timing thread sending every call's frame in a
#             burst each 20 ms, one receiving thread per call), through control, nothing
#             pinned but the relay: Asterisk's threads share the relay's core as they do beside a
#             real Asterisk. The echo on core 0.
#
#   scripts/measure-truth.sh                                  # every shape, 50/300/1000, both
#                                                             # backends, both legs, kernel stamps
#   SHAPES=corunner COUNTS=300 BACKENDS=uring LEGS=per-channel scripts/measure-truth.sh
#   TIMESTAMPS="kernel user" SHAPES=corunner scripts/measure-truth.sh   # beside the old estimate
#   ECHO_ARGS="--delay 5ms" COUNTS=50 SHAPES=plain scripts/measure-truth.sh
#
# Packets are captured whole (SNAPLEN=0): a GSO send or a GRO-coalesced return is one packet on
# loopback, and wire.py cuts it into its datagrams. SNAPLEN=96 captures headers only.
#
# Installs tcpdump (Debian package) when it is missing and the machine allows it. Exits 1 when a
# target is missed (every row is printed first).
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPES=${SHAPES:-"plain corunner sim"}
COUNTS=${COUNTS:-"50 300 1000"}
BACKENDS=${BACKENDS:-"uring tokio"}
LEGS=${LEGS:-"per-channel shared"}
TIMESTAMPS=${TIMESTAMPS:-kernel}
DURATION=${DURATION:-10s}
ECHO_ARGS=${ECHO_ARGS:-}
RELAY_ARGS=${RELAY_ARGS:-}

for tool in tcpdump chrt curl; do
  if ! command -v "$tool" >/dev/null; then
    pkg=$tool; [[ $tool == chrt ]] && pkg=util-linux
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      echo "==> installing $pkg" >&2
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg"; } >/dev/null
    else
      echo "measure-truth.sh: $tool is missing and cannot be installed here (needs root and apt-get)" >&2
      exit 2
    fi
  fi
done
echo "==> building (release)" >&2
cargo build --release --quiet -p relay -p echo -p loadgen -p sim-asterisk -p control
bin=target/release
dir=$(mktemp -d)
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() { stop_all; rm -rf "$dir"; }
trap cleanup EXIT

# Waits (15 s at most) for `key=` on a line of log file $1 containing $2; prints the value.
ready() {
  local log=$1 want=$2 key=$3
  for _ in $(seq 1 300); do
    local v
    v=$(grep -m1 "$want" "$log" 2>/dev/null | sed -n "s/.*$key=\([^ ]*\).*/\1/p" || true)
    if [[ -n "$v" ]]; then echo "$v"; return 0; fi
    sleep 0.05
  done
  echo "measure-truth.sh: no '$want' in $log:" >&2; cat "$log" >&2; return 1
}

echo "| shape, backend, stamps, channels | wire RTT p50 µs | relay | diff | ≤ 2 µs + 1 % | wire RTT p99 µs | relay | diff | ≤ 5 µs + 2 % | wire RTTs < 10 µs % | relay | ≤ 1 pp | wire min RTT µs | relay | ≥ wire − 2 µs | wire residence p50 µs | relay forward p50 µs | diff | ≤ 2 µs |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
missed=0
for shape in $SHAPES; do
 for backend in $BACKENDS; do
  for leg in $LEGS; do
   for ts in $TIMESTAMPS; do
    for n in $COUNTS; do
      echo_core=(--core 0); [[ $shape == corunner ]] && echo_core=(--core 1)
      echo_gro=(); [[ $leg == shared ]] && echo_gro=(--gro)
      # shellcheck disable=SC2086 # the extra arguments are meant to split
      RUST_LOG=info $bin/echo --listen 127.0.0.1:0 --metrics off "${echo_core[@]}" "${echo_gro[@]}" \
        $ECHO_ARGS >"$dir/echo.out" 2>"$dir/echo.log" & pids+=($!)
      echo_pid=$!
      echo_addr=$(ready "$dir/echo.log" "echo ready" listen)
      if [[ $shape == corunner ]]; then chrt -a -f -p 1 "$echo_pid" >/dev/null; fi
      # shellcheck disable=SC2086
      RUST_LOG=info $bin/relay --backend "$backend" --ctl "$dir/relay.sock" --metrics 127.0.0.1:0 \
        --echo "$echo_addr" --core 1 --timestamps "$ts" --echo-leg "$leg" \
        --max-channels $((n + 16)) $RELAY_ARGS 2>"$dir/relay.log" & pids+=($!)
      relay_pid=$!
      metrics=$(ready "$dir/relay.log" "relay ready" metrics)
      metrics=${metrics#http://}; metrics=${metrics%/metrics}
      tcpdump -i lo -n -q --time-stamp-precision=nano -s "${SNAPLEN:-0}" -B 262144 -w "$dir/cap.pcap" \
        "udp and not port 53" 2>"$dir/tcpdump.log" & pids+=($!)
      tcpdump_pid=$!
      for _ in $(seq 1 200); do grep -q "listening on" "$dir/tcpdump.log" && break; sleep 0.05; done
      if [[ $shape == sim ]]; then
        pass=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
        $bin/sim-asterisk --listen 127.0.0.1:0 --ari-pass "$pass" --calls "$n" \
          --hold "$DURATION" --ramp 1s --relay-ctl "$dir/relay.sock" --relay-pid "$relay_pid" \
          --json "$dir/sim.json" >/dev/null 2>"$dir/sim.log" & pids+=($!)
        sim_pid=$!
        ari=$(ready "$dir/sim.log" "sim-asterisk ready" listen)
        ARI_PASS=$pass $bin/control --ari-url "http://$ari" --relay-socket "$dir/relay.sock" \
          --metrics 127.0.0.1:0 --port-range "21000-$((21000 + n + 99))" \
          --echo-host "${echo_addr%:*}" --echo-port "${echo_addr##*:}" \
          --call-log "$dir/calls.jsonl" 2>"$dir/control.log" & pids+=($!)
        ready "$dir/control.log" "control ready" metrics >/dev/null
        wait "$sim_pid" || { cat "$dir/sim.log" >&2; exit 1; }
      else
        $bin/loadgen rtp --relay-ctl "$dir/relay.sock" --echo "$echo_addr" --channels "$n" \
          --duration "$DURATION" --warmup 1s --ramp 0 --core 0 --relay-pid "$relay_pid" \
          --json "$dir/lg.json" >/dev/null 2>"$dir/lg.log" || { cat "$dir/lg.log" >&2; exit 1; }
      fi
      sleep 0.3
      kill -INT "$tcpdump_pid"; wait "$tcpdump_pid" 2>/dev/null || true
      # The relay's own figures over the whole capture: /stats, and /metrics for the share of
      # round trips under 10 µs.
      curl -sf "http://$metrics/stats" >"$dir/stats.json"
      curl -sf "http://$metrics/metrics" >"$dir/metrics.txt"
      dropped=$(sed -n 's/^\([0-9]*\) packets dropped by kernel/\1/p' "$dir/tcpdump.log")
      if [[ "${dropped:-0}" != 0 ]]; then
        echo "measure-truth.sh: tcpdump dropped $dropped packets ($shape, $n); the wire figures cover the rest" >&2
      fi
      stop_all
      rm -f "$dir/relay.sock"
      echo_port=${echo_addr##*:}
      python3 scripts/wire.py "$dir/cap.pcap" "$dir/stats.json" "$echo_port" \
        "$shape, $backend, $ts, $n" "$dir/metrics.txt" || missed=1
    done
   done
  done
 done
done
exit $missed
