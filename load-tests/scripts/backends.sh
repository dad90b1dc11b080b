#!/usr/bin/env bash
# Issue #9 figures: ingest, batch and fanout on SQLite, on PostgreSQL with
# one instance and with two, interleaved run by run (3 runs each).
# Needs `cargo build --release --workspace` and PostgreSQL at $PG.
set -u
cd "$(dirname "$0")/../.."
L=target/release/credgate-load
PG=${PG:-postgres://postgres@127.0.0.1:5432/test}
for run in 1 2 3; do
 echo "=== ingest sqlite $run"; $L ingest --connections 64 --duration 10 2>&1 | head -1
 echo "=== ingest pg x1 $run"; $L --postgres $PG ingest --connections 64 --duration 10 2>&1 | head -1
 echo "=== ingest pg x2 $run"; $L --postgres $PG --instances 2 ingest --connections 64 --duration 10 2>&1 | head -1
 echo "=== batch sqlite $run"; $L ingest --batch 100 --connections 16 --duration 10 2>&1 | head -1
 echo "=== batch pg x1 $run"; $L --postgres $PG ingest --batch 100 --connections 16 --duration 10 2>&1 | head -1
 echo "=== batch pg x2 $run"; $L --postgres $PG --instances 2 ingest --batch 100 --connections 16 --duration 10 2>&1 | head -1
 echo "=== fanout sqlite $run"; $L fanout --duration 10 2>&1 | head -1
 echo "=== fanout pg x1 $run"; $L --postgres $PG fanout --duration 10 2>&1 | head -1
 echo "=== fanout pg x2 $run"; $L --postgres $PG --instances 2 fanout --duration 10 2>&1 | head -1
done
echo "=== done"; date
