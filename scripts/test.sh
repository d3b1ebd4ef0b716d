#!/usr/bin/env bash
# The project's test suite: exactly what CI runs (.ci/run calls this script).
#
#   scripts/test.sh
#
# Works on a fresh Debian machine with the Rust toolchain; it installs anything else it needs.
# Steps: formatting, clippy (warnings are errors), Prometheus and docker-compose installed when
# missing, every test in the workspace, the benchmarks and fuzz targets built (not run) so they
# cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${CI:-}" == "true" || ! -t 1 ]]; then
  export CARGO_TERM_COLOR=never CARGO_TERM_PROGRESS_WHEN=never
fi

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# Tools some tests need: a Prometheus server and promtool (control/tests/pipeline.rs and ops.rs),
# docker-compose (validating docker/docker-compose.yml), chromium (loadgen/tests/report.rs looks
# at the HTML report in a real browser). Installed from Debian where possible; elsewhere the
# tests that need them print SKIPPED. (rtpengine and tcpdump are the benchmark scripts' own.)
need=()
{ command -v prometheus && command -v promtool; } >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    step "installing ${need[*]} (Debian packages)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >/dev/null \
      || echo "test.sh: could not install ${need[*]}; the tests that need them print SKIPPED"
  else
    echo "test.sh: ${need[*]} missing and not installable here (needs root and apt-get); the tests that need them print SKIPPED"
  fi
fi

step "cargo test --workspace"
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
cargo test --workspace 2>&1 | tee "$test_log"
# Sum cargo's per-binary "test result" lines into one closing total.
read -r passed failed < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
  } END { print p + 0, f + 0 }' "$test_log")

step "benchmarks build (cargo bench --no-run)"
cargo bench -p bench --no-run

step "fuzz targets build"
cargo check --manifest-path fuzz/Cargo.toml --bins

step "all checks passed"
echo "tests: ${passed} passed, ${failed} failed"
