#!/usr/bin/env bash
# The README's performance table (issue #14): every scenario against the
# nginx reference in the same run, with the built-in client and with oha,
# on SQLite and on PostgreSQL; medians of RUNS runs of DURATION seconds.
# Needs `cargo build --release --workspace`, nginx-light, oha
# (`cargo install oha --locked`) and PostgreSQL at $PG.
#
#   load-tests/scripts/performance.sh [RUNS] [DURATION] > figures.log
set -euo pipefail
cd "$(dirname "$0")/../.."
L=target/release/credgate-load
PG=${PG:-postgres://postgres@127.0.0.1:5432/test}
runs=${1:-3}
secs=${2:-10}
command -v oha > /dev/null || { echo "oha is missing: cargo install oha --locked" >&2; exit 2; }
section() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
section "SQLite: ingest, floor, h2, handshake, batch; built-in client and oha"
$L compare --runs "$runs" --duration "$secs" --only ingest,floor,h2,handshake,batch --client builtin,oha 2>&1 | grep -v '^{'
section "PostgreSQL: ingest, batch; built-in client and oha"
$L --postgres "$PG" compare --runs "$runs" --duration "$secs" --only ingest,batch --client builtin,oha 2>&1 | grep -v '^{'
section "idle (SQLite)"
$L compare --runs "$runs" --duration "$secs" --only idle 2>&1 | grep -v '^{'
for backend in sqlite postgres; do
  flags=()
  [ "$backend" = postgres ] && flags=(--postgres "$PG")
  section "fanout, $backend: as fast as possible"
  rates=()
  for _ in $(seq 1 "$runs"); do
    line=$($L "${flags[@]}" fanout --duration "$secs" 2>&1 | head -1)
    echo "$line"
    rates+=("$(sed -E 's/.* records \(([0-9]+)\/s\).*/\1/' <<< "$line")")
  done
  median=$(printf '%s\n' "${rates[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
  section "fanout, $backend: at 80 % of that ($(( median * 8 / 10 )) records/s)"
  for _ in $(seq 1 "$runs"); do $L "${flags[@]}" fanout --duration "$secs" --rate $(( median * 8 / 10 )) 2>&1 | head -1; done
done
section "done"
