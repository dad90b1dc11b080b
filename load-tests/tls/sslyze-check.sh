#!/usr/bin/env bash
# TLS configuration check with sslyze (Mozilla "intermediate" profile)
# against credgate started the way an operator would run it: production
# mode, a private CA and a server certificate valid for one year (ECDSA
# P-256), made here with openssl. Both HTTPS listeners are scanned: the
# mTLS one (with a client certificate) and the public channel (without).
# Exit code 0 only when the gateway started and sslyze found both
# compliant (sslyze itself exits 0 when it cannot connect at all).
#
#   load-tests/tls/sslyze-check.sh [path/to/credgate]
#
# Needs openssl and python3 (sslyze is installed into a virtual
# environment under target/, once).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release/credgate}
[ -x "$bin" ] || { echo "build it first: cargo build --release" >&2; exit 2; }
venv=target/sslyze-venv
if [ ! -x "$venv/bin/sslyze" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'sslyze>=6,<7'
fi

. "$PWD/load-tests/lib.sh"
dir=$(mktemp -d)
pid=
stop_gateway_on_exit "$dir"
cd "$dir"
ec() { openssl ecparam -name prime256v1 -genkey -noout -out "$1"; }
ec ca.key
openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/CN=credgate operator test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem 2>/dev/null
issue() { # name subject extensions
  ec "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 16 | sed 's/^./7/')" \
    -days 365 -sha256 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
}
issue server "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
issue admin "/CN=admin-credit-office" "keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > gateway.secret
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
ops=$(free_port)
public=$(free_port)
repo=$OLDPWD
"$repo/$bin" review keygen "$dir/review-signing.key" > /dev/null
cat > credgate.toml <<TOML
mode = "production"
[server]
listen = "127.0.0.1:$port"
ops_listen = "127.0.0.1:$ops"
[tls]
client_ca = "$dir/ca.pem"
cert = "$dir/server.pem"
key = "$dir/server.key"
[catalog]
dir = "$repo/catalogs/credit"
grades_file = "$repo/catalogs/grades.toml"
[participants]
file = "$repo/config/participants.toml"
[subscriptions]
file = "$dir/none.toml"
[store]
data_dir = "$dir/data"
[privacy]
secret_file = "$dir/gateway.secret"
[review]
signing_key_file = "$dir/review-signing.key"
[public]
enabled = true
listen = "127.0.0.1:$public"
TOML
"$repo/$bin" serve --config credgate.toml 2> gateway.log &
pid=$!
ready=no
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$ops/readyz" >/dev/null 2>&1 && { ready=yes; break; }
  sleep 0.1
done
if [ "$ready" != yes ]; then
  echo "the gateway did not start:" >&2
  cat gateway.log >&2
  exit 1
fi
status=0
scan() { # label, then sslyze arguments
  local label=$1; shift
  "$repo/$venv/bin/sslyze" --mozilla_config=intermediate --certinfo_ca_file ca.pem --sni localhost "$@" > "scan-$label.txt" || status=1
  cat "scan-$label.txt"
  grep -q "OK - Compliant" "scan-$label.txt" || { echo "$label listener: not found compliant" >&2; status=1; }
}
scan mtls --cert admin.pem --key admin.key "127.0.0.1:$port"
scan public "127.0.0.1:$public"
exit $status
