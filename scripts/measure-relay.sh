#!/usr/bin/env bash
# Relay figures for BENCHMARKS.md: for each backend and channel count, run the whole pipeline
# (scripts/run-local.sh) and print one table row: relay CPU per forwarded packet (utime+stime of
# the relay process from /proc over the run, divided by the packets it forwarded), loss, and the
# latency the relay added (end to end minus the relay's echo RTT) at p50 and p99.
#
#   scripts/measure-relay.sh              # 100, 500, 1000 channels, 20 s each, both backends
#   COUNTS="100 1000" DURATION=10s scripts/measure-relay.sh
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${COUNTS:-"100 500 1000"}
DURATION=${DURATION:-20s}
BACKENDS=${BACKENDS:-"uring tokio"}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "| backend | channels | packets forwarded | relay CPU per packet | loss | added p50 | added p99 | relay RTT p50 | end-to-end p99 |"
echo "|---|---|---|---|---|---|---|---|---|"
for backend in $BACKENDS; do
  for n in $COUNTS; do
    MODE=rtp BACKEND=$backend CHANNELS=$n DURATION=$DURATION scripts/run-local.sh --json "$out/$backend-$n.json" \
      >"$out/$backend-$n.txt" 2>&1 || { cat "$out/$backend-$n.txt" >&2; exit 1; }
    python3 - "$out/$backend-$n.json" "$backend" "$n" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); rl = r["relay"]
us = lambda ns: "%.1f µs" % (ns / 1e3)
cpu = "%.1f µs" % (rl["cpu_ns_per_packet"] / 1e3) if rl.get("cpu_ns_per_packet") else "n/a"
print(f"| {sys.argv[2]} | {sys.argv[3]} | {rl['forwarded']} | {cpu} | {r['lost']} ({r['loss_ratio']*100:.3f} %) "
      f"| {us(r['added_by_relay']['p50_ns'])} | {us(r['added_by_relay']['p99_ns'])} | {us(rl['rtt']['p50_ns'])} | {us(r['e2e_rtt']['p99_ns'])} |")
PY
  done
done
