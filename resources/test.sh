#!/usr/bin/env bash
# The whole smudge test suite, runnable on a fresh Debian 12 machine:
# installs what the tests need (QEMU for the parity tests), then checks
# formatting and lints, and runs every test (unit and guest-booting).
#
#   resources/test.sh                # the suite (what CI runs)
#   resources/test.sh --under-load   # the same while two CPU-bound processes
#                                    # of normal priority run throughout
#
# Every test runs even after one fails (`--no-fail-fast`); the run ends with
# the names of the failing tests and "tests: N passed, N failed", and exits
# non-zero if any test failed.
set -euo pipefail
cd "$(dirname "$0")/.."

under_load=0
for arg in "$@"; do
  case "$arg" in
    --under-load) under_load=1 ;;
    -h | --help)
      sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "error: unknown argument '$arg' (resources/test.sh [--under-load])" >&2
      exit 2
      ;;
  esac
done

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "== installing qemu-system-x86 (QEMU parity tests boot the guest under it)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-system-x86 >/dev/null
fi
# tests/journal_eio.rs and the reliability campaign's EIO case make a disk
# that fails: ext4 on a loop device (e2fsprogs, util-linux's losetup).
if ! command -v mkfs.ext4 >/dev/null 2>&1 || ! command -v losetup >/dev/null 2>&1; then
  echo "== installing e2fsprogs and util-linux (the EIO tests put ext4 on a loop device)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq e2fsprogs util-linux >/dev/null
fi
if [ ! -e /dev/loop-control ]; then
  echo "error: /dev/loop-control is missing: the EIO tests need loop devices" >&2
  exit 1
fi
if [ ! -e /dev/kvm ]; then
  echo "error: /dev/kvm is missing: the integration tests boot real guests under KVM" >&2
  exit 1
fi

log=$(mktemp)
hogs=()
cleanup() {
  for pid in "${hogs[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$under_load" = 1 ]; then
  # Two busy loops at normal priority for the whole run: every test must
  # hold on a machine whose cores are taken.
  for _ in 1 2; do
    (while :; do :; done) &
    hogs+=("$!")
  done
  echo "== under load: CPU hogs ${hogs[*]} run until the suite ends"
fi

echo "== format and lints"
cargo fmt --all -- --check
(cd guest && cargo fmt -- --check)
cargo clippy --release --locked --all-targets -- -D warnings
(cd guest && cargo clippy --release --locked -- -D warnings)

echo "== tests"
set +e
cargo test --release --locked --all-targets --no-fail-fast 2>&1 | tee "$log"
tests_status=${PIPESTATUS[0]}
set -e

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
# "Running ../tests/snapshot.rs (…)" names the test binary of the lines after it.
failures=$(awk '
  /^ *Running / { bin = ($2 == "unittests") ? $3 : $2; sub(/^\.\.\//, "", bin) }
  /^ *Doc-tests / { bin = "doc-tests of " $2 }
  /^test .* \.\.\. FAILED$/ { sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print "  " bin ": " $0 }
' "$log")
if [ -n "$failures" ]; then
  echo "== failing tests"
  echo "$failures"
elif [ "$tests_status" != 0 ]; then
  # A test binary that crashed or did not build names no test.
  echo "== failing test targets"
  grep -E '^ +`-p ' "$log" || grep -E '^error' "$log" || true
fi
echo "tests: $passed passed, $failed failed"
if [ "$tests_status" != 0 ] || [ "$failed" != 0 ]; then
  exit 1
fi
