#!/usr/bin/env bash
# Builds Kubernetes commands (default: kube-apiserver, kube-controller-manager, kubectl) from
# Go modules, once per version, into $CACHE/kube/v$KUBE_VERSION/bin, and prints that directory.
#
#   KUBE_VERSION   the release (default: the one hack/kube/go.mod requires, the newest stable
#                  release the Go module proxy served when it was last updated)
#   hack/build-kube.sh [COMMAND...]          build (only what is missing) and print the bin dir
#   hack/build-kube.sh --print-go-mod 1.35.4 print the go.mod that builds another release
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every k8s.io staging module
# (k8s.io/api, apiserver, client-go...) with a directory inside its own repository. Our module
# requires it and pins each of those staging modules at the matching v0.x release instead
# (see ../shared/reference/local-kube-apiserver.md). Every step prints how long it took.
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=go-env.sh
source "$HACK/go-env.sh"
MODULE_DIR="$HACK/kube"
DEFAULT_VERSION=$(sed -n 's/^require k8s.io\/kubernetes v\(.*\)$/\1/p' "$MODULE_DIR/go.mod")
KUBE_VERSION=${KUBE_VERSION:-$DEFAULT_VERSION}
KUBE_VERSION=${KUBE_VERSION#v}

log() { echo "[build-kube] $*" >&2; }

# go_mod_for VERSION: our go.mod for that release, from the release's own go.mod (every
# staging module it requires at v0.0.0 gets a replace line at v0.MINOR.PATCH).
go_mod_for() {
  local version=$1 upstream
  upstream=$(GOFLAGS=-mod=mod "$GO" mod download -json "k8s.io/kubernetes@v$version" \
             | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
  [ -s "$upstream" ] || { log "the Go module proxy has no k8s.io/kubernetes v$version"; exit 1; }
  echo "module blockcopy.dev/kube-build"
  echo
  echo "go $(sed -n 's/^go \(.*\)$/\1/p' "$upstream")"
  echo
  echo "require k8s.io/kubernetes v$version"
  echo
  echo "replace ("
  sed -n 's/^[[:space:]]*\(k8s\.io\/[^ ]*\) v0\.0\.0$/\1/p' "$upstream" \
    | while read -r mod; do printf '\t%s => %s v0.%s\n' "$mod" "$mod" "${version#1.}"; done
  echo ")"
}

if [ "${1:-}" = "--print-go-mod" ]; then
  go_mod_for "${2:?usage: $0 --print-go-mod VERSION}"
  exit 0
fi

COMMANDS=("$@")
[ ${#COMMANDS[@]} -gt 0 ] || COMMANDS=(kube-apiserver kube-controller-manager kubectl)
OUT="$CACHE/kube/v$KUBE_VERSION/bin"
mkdir -p "$OUT"

missing=()
for cmd in "${COMMANDS[@]}"; do
  # Written to a temporary name and renamed when complete: present means usable.
  [ -x "$OUT/$cmd" ] || missing+=("$cmd")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$OUT"
  exit 0
fi

# The module to build in: ours for the default release (go.sum committed, read-only), or one
# generated under the cache for another release.
if [ "$KUBE_VERSION" = "$DEFAULT_VERSION" ]; then
  WORK=$MODULE_DIR
  export GOFLAGS="-mod=readonly -buildvcs=false"
else
  WORK="$CACHE/kube/v$KUBE_VERSION/module"
  mkdir -p "$WORK"
  if [ ! -s "$WORK/go.sum" ]; then
    start=$SECONDS
    log "generating the build module for v$KUBE_VERSION"
    go_mod_for "$KUBE_VERSION" >"$WORK/go.mod"
    cp "$MODULE_DIR/tools.go" "$WORK/tools.go"
    (cd "$WORK" && GOFLAGS=-mod=mod "$GO" mod tidy >&2)
    log "module for v$KUBE_VERSION ready in $(elapsed $start)"
  fi
  export GOFLAGS="-mod=readonly -buildvcs=false"
fi
cd "$WORK"

start=$SECONDS
log "downloading modules of k8s.io/kubernetes v$KUBE_VERSION (cached in $GOMODCACHE)"
"$GO" mod download >&2
log "modules ready in $(elapsed $start)"

# What `kubectl version` and helm's kubeVersion checks read (a plain go build leaves v0.0.0).
minor=${KUBE_VERSION#*.}; minor=${minor%%.*}
LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS+=" -X $pkg.gitVersion=v$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

for cmd in "${missing[@]}"; do
  start=$SECONDS
  log "building $cmd v$KUBE_VERSION with $($GO env GOVERSION) (several minutes on 2 cores the first time)"
  "$GO" build -trimpath -ldflags "$LDFLAGS" -o "$OUT/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2
  mv "$OUT/$cmd.tmp" "$OUT/$cmd"
  log "$cmd built in $(elapsed $start)"
done
echo "$OUT"
