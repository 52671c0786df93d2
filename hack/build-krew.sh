#!/usr/bin/env bash
# Builds krew and validate-krew-manifest (sigs.k8s.io/krew, pinned in tests/krew/go.mod) once
# per content, into $CACHE/krew/<hash of go.mod, go.sum and tools.go>/, and prints that
# directory: kubectl-krew (krew as kubectl runs it) and validate-krew-manifest. A second run
# with the same sources builds nothing; module and build caches live under the cache
# directory (hack/go-env.sh), never in the clone.
set -euo pipefail
export LC_ALL=C

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=go-env.sh
source "$HACK/go-env.sh"
MODULE_DIR="$HACK/../tests/krew"

log() { echo "[build-krew] $*" >&2; }

cd "$MODULE_DIR"
key=$( { "$GO" env GOVERSION; for f in go.mod go.sum tools.go; do echo "== $f"; cat "$f"; done; } \
      | sha256sum | cut -c1-16)
OUT="$CACHE/krew/$key"
if [ -x "$OUT/kubectl-krew" ] && [ -x "$OUT/validate-krew-manifest" ]; then
  echo "$OUT"
  exit 0
fi

mkdir -p "$OUT"
export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
start=$SECONDS
log "downloading modules (cached in $GOMODCACHE)"
"$GO" mod download >&2
log "building krew and validate-krew-manifest with $("$GO" env GOVERSION)"
tmp="$OUT/tmp.$$"
mkdir -p "$tmp"
"$GO" build -trimpath -ldflags "-s -w" -o "$tmp/" \
  sigs.k8s.io/krew/cmd/krew sigs.k8s.io/krew/cmd/validate-krew-manifest >&2
# Renamed when complete: present means usable.
mv "$tmp/validate-krew-manifest" "$OUT/validate-krew-manifest"
mv "$tmp/krew" "$OUT/kubectl-krew"
rmdir "$tmp"
log "built in $(elapsed "$start"): $OUT"
echo "$OUT"
