#!/usr/bin/env bash
# Console page times with a full store (issue #13): a release gateway with
# PARTICIPANTS participants and at least RECORDS records submitted through
# the API (so every one counts in the overview's figures), then each
# console page fetched ROUNDS times with the administrator's certificate;
# prints the median and the slowest time per page, with the catalog API
# (`GET /v1/catalog`) measured the same way as the baseline.
#
#   load-tests/console/measure.sh [RECORDS] [PARTICIPANTS] [ROUNDS]
#
# Defaults: 100000 records, 1000 participants, 20 rounds. Uses ports
# 18443/18444/19090; leaves nothing running. KEEP_DIR=/some/dir keeps the
# store there and reuses it on the next run (no loading).
set -euo pipefail
cd "$(dirname "$0")/../.."
records=${1:-100000}
participants=${2:-1000}
rounds=${3:-20}
cargo build --release -q -p credgate -p credgate-load-tests
root=$(pwd)
. "$root/load-tests/lib.sh"
pid=
if [ -n "${KEEP_DIR:-}" ]; then
  dir=$KEEP_DIR
  mkdir -p "$dir"
  stop_gateway_on_exit
else
  dir=$(mktemp -d)
  stop_gateway_on_exit "$dir"
fi
if [ ! -d "$dir/config" ]; then
cp -r config catalogs "$dir/"
sed -i 's/127.0.0.1:8443/127.0.0.1:18443/; s/127.0.0.1:9090/127.0.0.1:19090/; s/127.0.0.1:8444/127.0.0.1:18444/' "$dir/config/credgate.toml"
# Participants beyond the sample: departments and agencies in turn.
have=$(grep -c '^\[\[participant\]\]' "$dir/config/participants.toml")
for i in $(seq 1 $((participants - have))); do
  if [ $((i % 2)) = 0 ]; then kind=department; else kind=agency; fi
  printf '\n[[participant]]\nid = "load-%s-%04d"\nkind = "%s"\nname = "Load test %s %d"\nname_zh = "压测单位%d"\nregion = "320000"\n' \
    "$kind" "$i" "$kind" "$kind" "$i" "$i" >> "$dir/config/participants.toml"
done
fi
echo "== $(grep -c '^\[\[participant\]\]' "$dir/config/participants.toml") participants; starting the gateway (development certificates for each)"
(cd "$dir" && exec "$root/target/release/credgate" serve > "$dir/gateway.log" 2>&1) &
pid=$!
for _ in $(seq 1 300); do
  curl -sf http://127.0.0.1:19090/readyz > /dev/null && break
  sleep 0.5
done
curl -sf http://127.0.0.1:19090/readyz > /dev/null || { tail -20 "$dir/gateway.log"; exit 1; }
count() {
  python3 -c "import sqlite3,sys; print(sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True).execute('select count(*) from records').fetchone()[0])" "$dir/data/credgate.db"
}
while [ "$(count)" -lt "$records" ]; do
  target/release/credgate-load ingest --target 127.0.0.1:18443 --certs "$dir/certs/dev" \
    --batch 100 --connections 16 --duration 10 > /dev/null 2>&1 || true
  echo "   $(count) records"
done
certs="$dir/certs/dev"
get() {
  curl -s -o /dev/null -w '%{http_code} %{time_total}\n' --cacert "$certs/ca.pem" \
    --cert "$certs/admin-credit-office.pem" --key "$certs/admin-credit-office.key" "https://localhost:18443$1"
}
echo "== $(count) records; each page $rounds times (after one warm-up), milliseconds"
printf '%-52s %8s %8s %6s\n' page median slowest status
for path in /v1/catalog /console/ "/console/?days=365" /console/catalog /console/catalog/administrative_penalty \
    "/console/catalog/administrative_penalty/diff?from=1&to=1" /console/participants /console/subscriptions /console/audit \
    "/console/audit?actor=dept-market"; do
  get "$path" > /dev/null
  times=$(for _ in $(seq 1 "$rounds"); do get "$path"; done)
  status=$(echo "$times" | awk '{print $1}' | sort -u | tr '\n' ' ')
  echo "$times" | awk '{print $2 * 1000}' | sort -n | awk -v p="$path" -v s="$status" \
    '{ t[NR] = $1 } END { printf "%-52s %8.1f %8.1f %6s\n", p, t[int((NR + 1) / 2)], t[NR], s }'
done
