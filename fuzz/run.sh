#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 5), starting from its
# committed seeds and the local corpus (kept in corpus/, not committed).
# A crash, a panic or a failed invariant stops with a non-zero exit; the
# input that caused it is in artifacts/<target>/.
#
#   fuzz/run.sh [SECONDS] [--quick]
#
# By default the targets are built optimised with AddressSanitizer (what
# the nightly run uses; a cold build takes about 10 minutes here).
# `--quick` builds them unoptimised without a sanitizer (about 3 minutes
# cold): still coverage-guided libFuzzer with the targets' own invariant
# checks and Rust's overflow checks, which is what a few seconds of
# fuzzing in every CI run can use. The code under test is safe Rust, so
# AddressSanitizer mostly guards the C parts (SQLite, aws-lc), which the
# targets do not reach.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-5}
build=()
if [ "${2:-}" = --quick ]; then
  build=(--dev --sanitizer none)
fi
command -v cargo-fuzz > /dev/null || cargo install --locked cargo-fuzz
# The stable toolchain takes the sanitizer flags cargo fuzz passes.
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== build the fuzz targets ${build[*]:-(release, AddressSanitizer)}"
cargo fuzz build "${build[@]}"
for target in codes records catalog_item redaction; do
  mkdir -p "corpus/$target"
  echo "== fuzz $target (${secs} s)"
  if ! cargo fuzz run "${build[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 > "$log" 2>&1; then
    grep -E "panicked|SUMMARY|ERROR|error" -A3 "$log" | head -40
    echo "fuzz $target failed; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E "^(Done|stat::number_of_executed_units)" "$log" || true
done
