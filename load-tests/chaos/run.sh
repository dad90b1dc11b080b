#!/usr/bin/env bash
# The fault campaign (issue #12), full length, on one or both stores:
#
#   - CYCLES (default 100) kill -9 cycles at a random moment under mixed
#     load: 8 submitting connections, pushes to a real HTTPS receiver,
#     pulls, an administrator switching a subscription off and on; after
#     every restart: no acknowledged notice missing from any agency's
#     stream, no (notice, subscription) delivered twice, `audit verify`
#     passes; at the end every acknowledged notice was pushed;
#   - push endpoints that hang, reset, dribble or show a foreign CA;
#   - power loss (unsynced writes dropped by a FUSE disk) and a full disk;
#   - on PostgreSQL: the server stopped and restarted under load, and a
#     power loss under the database's own data directory.
#
# The campaign is the test suite's fault tests run long (the suite runs
# the kill -9 campaign with 4 cycles); this script gives them the full
# cycle count and prints the figures each one reports.
#
#   load-tests/chaos/run.sh [CYCLES] [sqlite|postgres|both]
#
# Needs root (FUSE mounts, a private PostgreSQL cluster run as `postgres`)
# and, for postgres, the server $POSTGRES_TEST_URL names
# (default postgres://postgres@127.0.0.1:5432/test).
set -euo pipefail
cd "$(dirname "$0")/../.."
cycles=${1:-100}
backends=${2:-both}
case "$backends" in
  sqlite) binaries=(e2e) ;;
  postgres) binaries=(e2e_postgres) ;;
  both) binaries=(e2e e2e_postgres) ;;
  *) echo "usage: $0 [CYCLES] [sqlite|postgres|both]" >&2; exit 2 ;;
esac
export POSTGRES_TEST_URL="${POSTGRES_TEST_URL:-postgres://postgres@127.0.0.1:5432/test}"
start=$(date +%s)
status=0
for binary in "${binaries[@]}"; do
  log=$(mktemp)
  label=SQLite; [ "$binary" = e2e_postgres ] && label=PostgreSQL
  echo "== chaos on $label: $cycles kill -9 cycles, then the other faults"
  # One test at a time: the kill -9 cycles measure the gateway, not the
  # other fault tests competing for the two cores.
  if CHAOS_CYCLES="$cycles" cargo test --test "$binary" -- \
      chaos:: powerloss:: pg_outage:: --test-threads 1 --nocapture > "$log" 2>&1; then
    :
  else
    status=1
    grep -E "panicked|FAILED|failed" -A5 "$log" | head -60
  fi
  # With --nocapture a test's first line follows libtest's "test name ... "
  # on the same line: match the figures anywhere in a line.
  grep -oE "(chaos: |disk full: |power loss: |postgres outage: |postgres power loss: ).*|^test result.*" "$log" || true
  echo "cycles whose invariants held: $(grep -c "chaos cycle .*invariants hold" "$log" || true)"
  rm -f "$log"
done
echo "== chaos campaign: $(( $(date +%s) - start )) s, exit $status"
exit $status
