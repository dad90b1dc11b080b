# Shell helpers shared by the load-test and CI scripts. Source it:
#   . "$(dirname "$0")/../lib.sh"

# On exit, stop the gateway whose process id is in $pid (if any), wait until
# it has finished writing (a gateway shutting down still checkpoints its
# store), then remove the directory given (if any). Removing the directory
# while the gateway is still writing into it fails with "Directory not
# empty", which under `set -e` would turn a clean run into a failure.
stop_gateway_on_exit() {
  _cleanup_dir=${1:-}
  trap '_status=$?; stop_gateway; [ -z "$_cleanup_dir" ] || rm -rf "$_cleanup_dir" || true; exit $_status' EXIT
}

# Stop the gateway in $pid and wait for it (at most 30 s, then SIGKILL).
stop_gateway() {
  [ -n "${pid:-}" ] || return 0
  kill "$pid" 2> /dev/null || return 0
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2> /dev/null || true
  wait "$pid" 2> /dev/null || true
  pid=
}
