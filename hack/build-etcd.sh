#!/usr/bin/env bash
# Builds etcd from Go modules (hack/etcd/go.mod: the etcd release kubeadm pairs with our
# Kubernetes release) once, into $CACHE/etcd/v$VERSION/etcd, and prints that path.
# Debian's etcd-server is 3.4.23: older than any etcd that Kubernetes >= 1.34 is tested with.
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=go-env.sh
source "$HACK/go-env.sh"
MODULE_DIR="$HACK/etcd"
VERSION=$(sed -n 's/^require go.etcd.io\/etcd\/server\/v3 v\(.*\)$/\1/p' "$MODULE_DIR/go.mod")
OUT="$CACHE/etcd/v$VERSION/etcd"

log() { echo "[build-etcd] $*" >&2; }

if [ -x "$OUT" ] && "$OUT" --version >/dev/null 2>&1; then
  echo "$OUT"
  exit 0
fi
mkdir -p "$(dirname "$OUT")"
cd "$MODULE_DIR"
export GOFLAGS="-mod=readonly -buildvcs=false"
start=$SECONDS
"$GO" mod download >&2
log "modules of etcd v$VERSION ready in $(elapsed $start)"
start=$SECONDS
log "building etcd v$VERSION with $($GO env GOVERSION)"
"$GO" build -trimpath -ldflags "-s -w" -o "$OUT.tmp" go.etcd.io/etcd/server/v3 >&2
mv "$OUT.tmp" "$OUT"
log "etcd built in $(elapsed $start)"
echo "$OUT"
