#!/usr/bin/env bash
# Contract test: Schemathesis (PyPI) holds credgate to its own OpenAPI
# document. A gateway is started on a fresh store with the development
# configuration (its own ports, data directory and dev certificates), and
# Schemathesis runs every check it has (`--checks all`) with a department's,
# an agency's and an administrator's certificate against the mTLS
# listener, then without a certificate against the public and operations
# listeners. Exit code 0 only when every run is clean.
#
#   load-tests/contract/schemathesis.sh [path/to/credgate] [max examples per operation]
#
# Schemathesis is installed into a virtual environment under target/,
# once. Reports (JUnit, and the failing cases as pytest files) are written
# to target/schemathesis/.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
bin=${1:-target/debug/credgate}
examples=${2:-25}
[ -x "$bin" ] || { echo "build it first: cargo build" >&2; exit 2; }
venv=target/schemathesis-venv
if [ ! -x "$venv/bin/st" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'schemathesis>=4.3,<5'
fi
out=target/schemathesis
rm -rf "$out"; mkdir -p "$out"

. "$repo/load-tests/lib.sh"
dir=$(mktemp -d)
pid=
stop_gateway_on_exit "$dir"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); ops=$(free_port); public=$(free_port)
certs="$repo/certs/dev"
# The development configuration, on its own ports and store; quotas high
# enough that the run measures the contract, not the rate limiter (429 is
# documented, so it would pass, but it would hide the answers behind it).
export CREDGATE_SERVER__LISTEN="127.0.0.1:$port"
export CREDGATE_SERVER__OPS_LISTEN="127.0.0.1:$ops"
export CREDGATE_PUBLIC__LISTEN="127.0.0.1:$public"
export CREDGATE_PUBLIC__ENABLED=true
export CREDGATE_PUBLIC__PER_ADDRESS_PER_SECOND=100000
export CREDGATE_PUBLIC__PER_ADDRESS_BURST=100000
export CREDGATE_STORE__DATA_DIR="$dir/data"
export CREDGATE_PRIVACY__SECRET_FILE="$dir/data/gateway.secret"
export CREDGATE_REVIEW__SIGNING_KEY_FILE="$dir/data/review-signing.key"
sed -E 's/^(department|agency|admin) = \{.*/\1 = { per_second = 100000, burst = 100000 }/' \
  config/credgate.toml > "$dir/credgate.toml"
"$bin" serve --config "$dir/credgate.toml" 2> "$out/gateway.log" &
pid=$!
for _ in $(seq 1 150); do
  curl -fsS "http://127.0.0.1:$ops/readyz" > /dev/null 2>&1 && break
  kill -0 "$pid" 2> /dev/null || break
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$ops/readyz" > /dev/null || { echo "the gateway did not start:" >&2; cat "$out/gateway.log" >&2; exit 1; }

status=0
st() { # label, then st arguments
  local label=$1; shift
  echo "== schemathesis: $label"
  if ! "$repo/$venv/bin/st" --config-file "$repo/load-tests/contract/schemathesis.toml" run --checks all --max-examples "$examples" --seed 20261128 \
      --workers 2 --request-timeout 40 --max-response-time 40 --no-color \
      --report junit,pytest --report-junit-path "$out/$label.xml" --report-pytest-path "$out/$label.py" \
      "$@"; then
    status=1
  fi
}
doc="$out/openapi.json"
curl -fsS --cacert "$certs/ca.pem" --cert "$certs/admin-credit-office.pem" --key "$certs/admin-credit-office.key" \
  "https://127.0.0.1:$port/v1/openapi.json" -o "$doc"
mtls() { # label, participant, filter arguments
  local label=$1 who=$2; shift 2
  st "$label" "$doc" --url "https://127.0.0.1:$port" --tls-verify "$certs/ca.pem" \
    --request-cert "$certs/$who.pem" --request-cert-key "$certs/$who.key" \
    --include-path-regex '^/(v1|admin)/' "$@"
}
mtls department dept-market
mtls agency agency-procurement
mtls admin admin-credit-office
st public "$doc" --url "https://127.0.0.1:$public" --tls-verify "$certs/ca.pem" --include-path-regex '^/public/'
st ops "$doc" --url "http://127.0.0.1:$ops" --include-path-regex '^/(healthz|readyz|metrics)$'
if grep -q "panicked" "$out/gateway.log"; then
  echo "the gateway panicked during the run:" >&2
  grep -A5 panicked "$out/gateway.log" >&2
  status=1
fi
exit $status
