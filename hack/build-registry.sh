#!/usr/bin/env bash
# Builds the CNCF distribution registry (github.com/distribution/distribution/v3, cmd/registry)
# from Go modules, once per version, into $CACHE/registry/$REGISTRY_VERSION/registry, and prints
# that path. The module and build caches live under the cache directory (hack/go-env.sh), never
# in the clone: a second run, or a fresh clone on the same machine, builds nothing. The local
# OCI registry of the release tests (hack/registry.sh) runs this binary.
#
#   REGISTRY_VERSION  the module version (default below; `go list -m -versions
#                     github.com/distribution/distribution/v3` lists the others)
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=go-env.sh
source "$HACK/go-env.sh"
REGISTRY_VERSION=${REGISTRY_VERSION:-v3.0.0}
MODULE=github.com/distribution/distribution/v3
OUT="$CACHE/registry/$REGISTRY_VERSION/registry"

log() { echo "[build-registry] $*" >&2; }

if [ -x "$OUT" ]; then
  echo "$OUT"
  exit 0
fi
mkdir -p "$(dirname "$OUT")"
# Several checkouts share the cache: one builder at a time, and the second finds it built.
exec 9>"$(dirname "$OUT")/.lock"
flock 9
if [ -x "$OUT" ]; then
  echo "$OUT"
  exit 0
fi

start=$SECONDS
log "building $MODULE/cmd/registry@$REGISTRY_VERSION with $("$GO" env GOVERSION) (several minutes the first time)"
# `go install pkg@version` builds with the module's own go.mod and go.sum (checked against the
# checksum database), independent of any module of ours. Into a temporary GOBIN, then renamed:
# present means usable.
tmp=$(mktemp -d "$(dirname "$OUT")/.gobin.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
GOBIN="$tmp" CGO_ENABLED=0 GOFLAGS="-buildvcs=false -trimpath" \
  "$GO" install -ldflags "-s -w" "$MODULE/cmd/registry@$REGISTRY_VERSION" >&2
mv "$tmp/registry" "$OUT"
log "built in $(elapsed "$start"): $OUT"
echo "$OUT"
