#!/usr/bin/env bash
# Builds tests/gitops (the gitops-health command: what Flux's kstatus and Argo CD's Lua health
# check say of BlockCopy objects) once per content, into
# $CACHE/gitops-health/<hash of go.mod, go.sum and the sources>/gitops-health, and prints that
# path. A second run with the same sources builds nothing; module and build caches live under
# the cache directory (hack/go-env.sh), never in the clone.
set -euo pipefail
export LC_ALL=C  # the order of *.go in the hash

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=go-env.sh
source "$HACK/go-env.sh"
MODULE_DIR="$HACK/../tests/gitops"

log() { echo "[build-gitops-health] $*" >&2; }

cd "$MODULE_DIR"
# The Go version is part of the key: another toolchain builds another binary.
key=$( { "$GO" env GOVERSION; for f in go.mod go.sum *.go; do echo "== $f"; cat "$f"; done; } \
      | sha256sum | cut -c1-16)
OUT="$CACHE/gitops-health/$key/gitops-health"
if [ -x "$OUT" ]; then
  echo "$OUT"
  exit 0
fi

mkdir -p "$(dirname "$OUT")"
export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
start=$SECONDS
log "downloading modules (cached in $GOMODCACHE)"
"$GO" mod download >&2
log "building gitops-health with $("$GO" env GOVERSION)"
# Written to a temporary name and renamed when complete: present means usable.
"$GO" build -trimpath -ldflags "-s -w" -o "$OUT.tmp.$$" . >&2
mv "$OUT.tmp.$$" "$OUT"
log "built in $(elapsed "$start"): $OUT"
echo "$OUT"
