#!/usr/bin/env bash
# The local OCI registry of the release tests: the CNCF distribution registry (built from Go
# modules by hack/build-registry.sh, cached), listening on 127.0.0.1:$REGISTRY_PORT over plain
# HTTP, its blobs under $STATE/registry. `make release` pushes the image and the chart there;
# the one-node cluster's containerd pulls from it (hack/cluster-node.sh); hack/cluster-down.sh
# stops it and removes its data.
#
#   hack/registry.sh start     start it (idempotent: nothing to do when it answers); prints
#                              its address
#   hack/registry.sh stop      stop it and remove what was pushed
#   hack/registry.sh address   print its address (127.0.0.1:PORT)
#
# Environment: BLOCKCOPY_STATE_DIR, BLOCKCOPY_CACHE_DIR, BLOCKCOPY_REGISTRY_PORT (15000).
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/env.sh
source "$HACK/lib/env.sh"   # REPO CACHE STATE RUN LOGS REGISTRY_PORT REGISTRY_ADDRESS
DIR="$STATE/registry"

log() { echo "[registry] $*" >&2; }
die() { echo "[registry] ERROR: $*" >&2; exit 1; }

source "$HACK/lib/processes.sh"

answers() { curl -fsS --max-time 3 "http://$REGISTRY_ADDRESS/v2/" >/dev/null 2>&1; }

start() {
  mkdir -p "$DIR/data" "$RUN" "$LOGS"
  exec 9>"$DIR/.lock"
  flock 9
  local binary pid
  binary=$(BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/build-registry.sh")
  pid=$(pid_of "$RUN/registry.pid" "$DIR/config.yml")
  [ -n "$pid" ] || pid=$(find_ours "$RUN/registry.pid" "registry serve $DIR/config.yml")
  if [ -n "$pid" ] && running_other_binary "$pid" "$binary"; then
    log "replacing the registry (pid $pid): another build"
    stop_pid registry "$pid"; rm -f "$RUN/registry.pid"; pid=
  fi
  if [ -n "$pid" ] && wait_for 10 "$pid" answers; then
    echo "$REGISTRY_ADDRESS"
    return 0
  fi
  port_busy "$REGISTRY_PORT" && die "127.0.0.1:$REGISTRY_PORT is taken by another process \
(another state dir's registry?): set BLOCKCOPY_REGISTRY_PORT"
  cat >"$DIR/config.yml" <<CONFIG
# The local test registry (hack/registry.sh); plain HTTP on the loopback only.
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DIR/data
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDRESS
CONFIG
  # OTEL_TRACES_EXPORTER: the registry would otherwise try to send traces to a collector.
  OTEL_TRACES_EXPORTER=none start_bg registry "$binary" serve "$DIR/config.yml"
  pid=$(cat "$RUN/registry.pid")
  if ! wait_for 30 "$pid" answers; then
    tail -n 20 "$LOGS/registry.log" >&2 || true
    die "the registry did not answer on $REGISTRY_ADDRESS within 30 s (log: $LOGS/registry.log)"
  fi
  log "registry up on $REGISTRY_ADDRESS (pid $pid, data $DIR/data)"
  echo "$REGISTRY_ADDRESS"
}

stop() {
  stop_from_pidfile registry "$RUN/registry.pid"
  stop_matching registry "registry serve $DIR/config.yml"
  rm -rf "$DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  address) echo "$REGISTRY_ADDRESS" ;;
  *) die "usage: $0 start|stop|address" ;;
esac
