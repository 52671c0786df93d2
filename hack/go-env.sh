# Sourced by the Go build scripts: picks a Go toolchain new enough for the modules of
# hack/kube and hack/etcd (go 1.26) and keeps every Go cache outside the clone, under the
# cache directory, so a second build (or a fresh clone on the same machine) rebuilds nothing.
# shellcheck shell=bash

GO_MIN_MINOR=26
CACHE=${BLOCKCOPY_CACHE_DIR:-/var/cache/blockcopy-operator}
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOPATH="$CACHE/go/path"
# The machine's own toolchain only: no toolchain download behind our back.
export GOTOOLCHAIN=local
export CGO_ENABLED=${CGO_ENABLED:-1}

go_minor() { "$1" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p'; }

# Debian's golang-go (1.19) may be first in PATH; the machine's Go lives in /usr/local/go.
GO=
for candidate in "$(command -v go || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
  [ -n "$candidate" ] && [ -x "$candidate" ] || continue
  minor=$(go_minor "$candidate")
  if [ -n "$minor" ] && [ "$minor" -ge "$GO_MIN_MINOR" ]; then GO=$candidate; break; fi
done
if [ -z "$GO" ]; then
  echo "ERROR: Go >= 1.$GO_MIN_MINOR is needed (found: $(command -v go || echo none)); " \
       "install it in /usr/local/go" >&2
  exit 1
fi
mkdir -p "$GOMODCACHE" "$GOCACHE" "$GOPATH"

# elapsed SECONDS_AT_START: "12 s" since then.
elapsed() { echo "$(( SECONDS - $1 )) s"; }
