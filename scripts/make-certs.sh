#!/usr/bin/env bash
# Certificates for the mutual-TLS control link between control and a pool of relays, made with
# openssl: a CA, one server certificate per relay host, and control's client certificate.
#
#   scripts/make-certs.sh [--days N] [--ca-name NAME] OUT_DIR RELAY[=SAN,SAN...] ...
#
# Each RELAY is a file name and, after `=`, the names and addresses the relay is reached by
# (what control's --relay tls://HOST:PORT says); without `=`, the RELAY itself is the one SAN.
#   scripts/make-certs.sh /etc/rtp-relay/pki relay-a=10.0.0.2,relay-a.example relay-b=10.0.0.3
# writes, into OUT_DIR (mode 0700, keys 0600):
#   ca.pem, ca.key            the CA (keep ca.key off the relay and control hosts)
#   relay-a.pem, relay-a.key  relay-a's server certificate and key: relay --tls-cert, --tls-key
#   control.pem, control.key  control's client certificate and key: control --relay-cert,
#                             --relay-key
# Relays take ca.pem as --tls-client-ca (they accept clients this CA signed), control takes it as
# --relay-ca (it accepts relays this CA signed). Keys are ECDSA P-256; certificates last --days
# (default 825). An existing CA in OUT_DIR (ca.pem and ca.key) is reused, so a relay added later
# is signed by the same CA; an existing leaf file is never overwritten (delete it to remake it).
#
# Rotation, without a moment when control and the relays distrust each other:
#   1. Make a new CA and its leaves in a new directory (scripts/make-certs.sh NEW_DIR ...).
#   2. On every relay, set --tls-client-ca to a bundle of both CAs (cat OLD/ca.pem NEW/ca.pem
#      > both.pem) and restart it; set control's --relay-ca to the same bundle and restart it.
#      Each side now accepts the other's certificate from either CA.
#   3. Give each relay its new certificate and key (NEW/relay-x.pem, .key) and restart it, then
#      control its new client certificate (NEW/control.pem, .key).
#   4. Once nothing presents an old certificate, set --tls-client-ca and --relay-ca to NEW/ca.pem
#      alone, restart, and destroy OLD/ca.key.
# Renewing leaves under the same CA is step 3 alone. A restarted relay drops its calls, and
# control places new calls on the other relays meanwhile: restart relays one at a time.
#
# Exit status: 0 done, 1 openssl failed, 2 bad arguments.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

days=825
ca_name="rtp-relay control CA"
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --days) days="${2:?--days needs a number}"; shift 2 ;;
    --ca-name) ca_name="${2:?--ca-name needs a name}"; shift 2 ;;
    --) shift; break ;;
    -*) echo "make-certs.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if (($# < 2)); then
  echo "make-certs.sh: needs OUT_DIR and at least one RELAY (see --help)" >&2
  exit 2
fi
[[ "$days" =~ ^[1-9][0-9]*$ ]] || { echo "make-certs.sh: --days must be a positive number" >&2; exit 2; }
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 1; }

out="$1"
shift
mkdir -p "$out"
chmod 700 "$out"
umask 077

# `10.0.0.2,relay-a.example` -> `IP:10.0.0.2,DNS:relay-a.example`
san_list() {
  local IFS=, item list=()
  for item in $1; do
    if [[ "$item" =~ ^[0-9.]+$ || "$item" == *:* ]]; then list+=("IP:$item"); else list+=("DNS:$item"); fi
  done
  (IFS=,; echo "${list[*]}")
}

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [[ ! -f "$out/ca.pem" || ! -f "$out/ca.key" ]]; then
  key "$out/ca.key"
  openssl req -x509 -new -key "$out/ca.key" -subj "/CN=$ca_name" -days "$days" -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.pem"
  echo "made $out/ca.pem"
fi

# leaf NAME SANS USAGE
leaf() {
  local name="$1" sans="$2" usage="$3" ext
  if [[ -f "$out/$name.pem" ]]; then
    echo "kept $out/$name.pem (delete it to remake it)"
    return
  fi
  ext=$(mktemp)
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
    "$usage" "$sans" >"$ext"
  key "$out/$name.key"
  openssl req -new -key "$out/$name.key" -subj "/CN=$name" -out "$out/$name.csr"
  openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -CAcreateserial -days "$days" -sha256 -extfile "$ext" -out "$out/$name.pem" 2>/dev/null
  rm -f "$ext" "$out/$name.csr"
  echo "made $out/$name.pem ($sans)"
}

for relay in "$@"; do
  name="${relay%%=*}"
  sans="${relay#*=}"
  if [[ -z "$name" || ! "$name" =~ ^[A-Za-z0-9._-]+$ || "$name" == ca || "$name" == control ]]; then
    echo "make-certs.sh: bad relay name '$name' (letters, digits, . _ -; not ca or control)" >&2
    exit 2
  fi
  leaf "$name" "$(san_list "$sans")" serverAuth
done
leaf control "DNS:control" clientAuth
chmod 644 "$out"/*.pem
