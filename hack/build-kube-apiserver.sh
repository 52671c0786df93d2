#!/usr/bin/env bash
# Builds kube-apiserver from Debian's `kubernetes` source package (1.20.2) and caches the
# binary outside the clone, so later runs (and fresh clones on the same machine) skip the
# ~6 minute build. Prints the path of the cached binary on stdout.
# See ../shared/reference/local-kube-apiserver.md for why each step is here.
set -euo pipefail

CACHE_DIR=${BLOCKCOPY_CACHE_DIR:-/var/cache/blockcopy-operator}
OUT="$CACHE_DIR/bin/kube-apiserver"
if [ -x "$OUT" ] && "$OUT" --version >/dev/null 2>&1; then
  echo "$OUT"
  exit 0
fi

log() { echo "[build-kube-apiserver] $*" >&2; }
mkdir -p "$CACHE_DIR/bin" "$CACHE_DIR/src"
SRC_LIST=/etc/apt/sources.list.d/blockcopy-deb-src.list
if ! grep -rqs '^deb-src .*bookworm main' /etc/apt/sources.list /etc/apt/sources.list.d/ \
   && ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/; then
  log "adding deb-src for bookworm"
  echo 'deb-src http://deb.debian.org/debian bookworm main' > "$SRC_LIST"
  apt-get update -qq
fi

WORK=$(mktemp -d "$CACHE_DIR/src/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
log "downloading the kubernetes source package"
apt-get source --download-only kubernetes >&2
ORIG=$(ls kubernetes_*.orig.tar.* | head -1)
mkdir tree
tar -xf "$ORIG" -C tree --strip-components=1
cd tree

# The vendored reflect2 1.0.1 / json-iterator crash under Go >= 1.18 (SIGSEGV in mapiterinit
# on the first custom-resource write): use Debian's current sources of both instead.
for mod in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  log "replacing vendor/$mod"
  rm -rf "vendor/$mod"
  mkdir -p "vendor/$mod"
  cp -r "/usr/share/gocode/src/$mod/." "vendor/$mod/"
  find "vendor/$mod" -name '*_test.go' -delete
done

log "building cmd/kube-apiserver (several minutes on 2 cores)"
export GOFLAGS=-mod=vendor GO111MODULE=on GOTOOLCHAIN=local
export GOCACHE="$CACHE_DIR/go-build" GOPATH="$CACHE_DIR/gopath"
make WHAT=cmd/kube-apiserver >&2
install -m 0755 _output/bin/kube-apiserver "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "cached $OUT"
echo "$OUT"
