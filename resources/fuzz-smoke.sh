#!/usr/bin/env bash
# Fuzz smoke run: every cargo-fuzz target in fuzz/ for SECONDS (default 20)
# each, on the stable toolchain. Exits non-zero if a target crashes (or
# fails to build); the crashing input is left in fuzz/artifacts/TARGET/.
#
#   resources/fuzz-smoke.sh [SECONDS]
#
# Stable works because it runs without a sanitizer (`cargo fuzz -s none`):
# the sanitizer-coverage flags cargo-fuzz passes are stable rustc options,
# only `-Zsanitizer=address` needs nightly. The first run installs
# cargo-fuzz into ~/.cargo/bin (about a minute) and builds the targets
# (about a minute on 2 cores); both are cached after that.
#
# Longer runs locally:
#   resources/fuzz-smoke.sh 3600                 # an hour per target
#   FUZZ_ARGS="-fork=4" resources/fuzz-smoke.sh 600  # any libFuzzer flags
# The corpus it grows is kept in fuzz/target/smoke-corpus/TARGET, so each
# run goes on from where the last one stopped. By hand, from fuzz/:
#   cargo fuzz run -s none migration_frame              # until a crash
#   cargo fuzz run -s none migration_frame artifacts/migration_frame/crash-...
# (the second replays one input; with nightly, dropping `-s none` adds ASan).
# The seed corpus in fuzz/corpus/ is made by `cargo run --example
# make_corpus` (run from fuzz/) and committed; what a fuzz run adds there
# is ignored by git.
set -euo pipefail

secs="${1:-20}"
case "$secs" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS]" >&2
    exit 2
    ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fuzz="$here/../fuzz"
cd "$fuzz"
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz into ~/.cargo/bin" >&2
    t0=$SECONDS
    cargo install cargo-fuzz --locked --quiet
    echo "cargo-fuzz installed in $((SECONDS - t0)) s" >&2
fi

if ! ls corpus/migration_frame/seed-* >/dev/null 2>&1; then
    cargo run --quiet --example make_corpus >&2
fi

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

t0=$SECONDS
if ! cargo fuzz build -s none >"$logs/build" 2>&1; then
    cat "$logs/build" >&2
    echo "fuzz: the targets do not build" >&2
    exit 1
fi
echo "fuzz targets built in $((SECONDS - t0)) s" >&2

failed=0
for target in $(cargo fuzz list); do
    work="target/smoke-corpus/$target"
    mkdir -p "$work" "corpus/$target"
    log="$logs/$target"
    # The first corpus dir is where libFuzzer writes what it finds; the
    # seeds and the kept crashers (regressions/) are only read, so every
    # smoke run replays each past crash first.
    read_only=("corpus/$target")
    if [ -d "regressions/$target" ]; then read_only+=("regressions/$target"); fi
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    if cargo fuzz run -s none "$target" "$work" "${read_only[@]}" -- \
        -max_total_time="$secs" -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1; then
        done_line="$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1)"
        runs="$(echo "$done_line" | awk '{print $2}')"
        took="$(echo "$done_line" | awk '{print $5}')"
        echo "fuzz $target: ${runs:-?} runs in ${took:-?} s, no crash"
    else
        failed=1
        echo "----- $target: last lines of the libFuzzer log -----" >&2
        tail -n 60 "$log" >&2
        artifact="$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -n 1 | sed 's/^Test unit written to //')"
        # A panic is "thread ... panicked at FILE:LINE:COL:" then the message.
        why="$(grep -m 1 -A 1 'panicked at' "$log" | sed 's/^thread .* panicked at /panic at /' | paste -sd ' ' || true)"
        [ -n "$why" ] || why="$(grep -m 1 'ERROR: libFuzzer' "$log" || true)"
        echo "fuzz $target: FAILED: ${why:-see the log above}; input: ${artifact:-none written}"
    fi
done
exit "$failed"
