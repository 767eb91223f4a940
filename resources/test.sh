#!/usr/bin/env bash
# The whole smudge test suite, runnable on a fresh Debian 12 machine:
# installs what the tests need (QEMU for the parity tests), then checks
# formatting and lints, and runs every test (unit and guest-booting).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "== installing qemu-system-x86 (QEMU parity tests boot the guest under it)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-system-x86 >/dev/null
fi
if [ ! -e /dev/kvm ]; then
  echo "error: /dev/kvm is missing: the integration tests boot real guests under KVM" >&2
  exit 1
fi

echo "== format and lints"
cargo fmt --all -- --check
(cd guest && cargo fmt -- --check)
cargo clippy --release --locked --all-targets -- -D warnings
(cd guest && cargo clippy --release --locked -- -D warnings)

echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --locked --all-targets 2>&1 | tee "$log"

echo "== fuzz smoke (cargo-fuzz on stable, no sanitizer; resources/fuzz-smoke.sh)"
bash resources/fuzz-smoke.sh 15

echo "== benchmarks, quick (keeps their code paths alive; no timing claims)"
./target/release/smudge bench boot --quick --json >/dev/null
./target/release/smudge bench harvest --quick --json >/dev/null
./target/release/smudge bench writeback --quick --json >/dev/null
./target/release/smudge bench snapshot --quick --json >/dev/null
./target/release/smudge bench migrate --quick --json >/dev/null
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s += $1} END {print s + 0}')
echo "tests: $passed passed, $failed failed"
