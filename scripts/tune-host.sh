#!/usr/bin/env bash
# Prepares a bare-metal host for the relay: UDP buffer sysctls, the file-descriptor limit, and
# advice on isolating the relay's core and steering NIC interrupts away from it.
#
#   scripts/tune-host.sh --dry-run            print what would change, change nothing
#   scripts/tune-host.sh [--core N] [--yes]   apply (asks first unless --yes); N: the relay's core
#
# Sysctls are applied at once and written to /etc/sysctl.d/90-rtp-relay.conf; the fd limit to
# /etc/security/limits.d/90-rtp-relay.conf. CPU isolation and IRQ affinity need a reboot or care
# on a live machine, so they are printed as advice, never applied.
set -euo pipefail

dry=0; yes=0; core=2
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1 ;;
    --yes) yes=1 ;;
    --core) core=${2:?--core needs a number}; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "tune-host.sh: unknown flag $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $core =~ ^[0-9]+$ ]] || { echo "tune-host.sh: invalid value for --core: $core" >&2; exit 2; }

# name, wanted value: receive/send buffers for 10,000 sockets' bursts, a deep backlog.
sysctls=(
  "net.core.rmem_max 33554432"
  "net.core.wmem_max 33554432"
  "net.core.rmem_default 2097152"
  "net.core.wmem_default 1048576"
  "net.core.netdev_max_backlog 250000"
  "net.ipv4.udp_mem 786432 1048576 1572864"
  "net.ipv4.ip_local_port_range 32768 60999"
  "fs.file-max 2097152"
)

changes=()
for s in "${sysctls[@]}"; do
  name=${s%% *}; want=${s#* }
  have=$(sysctl -n "$name" 2>/dev/null | tr -s '\t ' ' ' || echo "?")
  # A single number is a minimum: never lower what is already higher.
  if [[ $want =~ ^[0-9]+$ && $have =~ ^[0-9]+$ ]] && (( have >= want )); then
    printf 'sysctl %-32s %s (already at least %s)\n' "$name" "$have" "$want"
    continue
  fi
  if [[ $have != "$want" ]]; then
    changes+=("$name|$have|$want")
    printf 'sysctl %-32s %s -> %s\n' "$name" "$have" "$want"
  else
    printf 'sysctl %-32s %s (already)\n' "$name" "$have"
  fi
done
nofile=$(ulimit -n)
printf 'limit  %-32s %s -> 1048576 (for the rtprelay user, limits.d)\n' "nofile" "$nofile"

cores=$(nproc)
echo
echo "advice (not applied):"
if (( core >= cores )); then
  echo "  - this machine has $cores cores; --core $core does not exist: pick one below $cores"
fi
echo "  - isolate core $core from the scheduler: add 'isolcpus=$core nohz_full=$core rcu_nocbs=$core' to the kernel command line, reboot"
echo "  - keep NIC interrupts off core $core: for each IRQ in /proc/interrupts of the RTP NIC, write a mask without bit $core to /proc/irq/N/smp_affinity (and stop irqbalance, or set IRQBALANCE_BANNED_CPUS)"
echo "  - run the relay with --core $core and CPUAffinity=$core (scripts/systemd/rtp-relay.service)"
echo "  - keep Asterisk's rtp.conf range clear of control's PORT_RANGE"

if (( dry )); then
  echo; echo "dry run: nothing changed"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "tune-host.sh: applying needs root (or use --dry-run)" >&2
  exit 1
fi
if (( ! yes )); then
  if [[ ! -t 0 ]]; then
    echo "tune-host.sh: not a terminal and no --yes: nothing changed" >&2
    exit 1
  fi
  read -r -p "apply the sysctl and limit changes above? [y/N] " answer
  [[ $answer == y || $answer == Y ]] || { echo "nothing changed"; exit 0; }
fi
{
  echo "# rtp-relay (scripts/tune-host.sh)"
  for c in "${changes[@]}"; do IFS='|' read -r name _ want <<<"$c"; echo "$name = $want"; done
} > /etc/sysctl.d/90-rtp-relay.conf
sysctl -q -p /etc/sysctl.d/90-rtp-relay.conf
printf 'rtprelay soft nofile 1048576\nrtprelay hard nofile 1048576\n' > /etc/security/limits.d/90-rtp-relay.conf
echo "applied: /etc/sysctl.d/90-rtp-relay.conf, /etc/security/limits.d/90-rtp-relay.conf"
