#!/usr/bin/env bash
# The hashed lock files every install of this project goes through, made by uv (pinned below,
# installed from PyPI into a tool venv under the cache directory, never into the clone):
#
#   requirements/runtime.txt  what the image installs: pyproject's dependencies and every
#                             transitive one, pinned with hashes (Dockerfile: pip --require-hashes)
#   requirements/ci.txt       the CI and development venv (`make venv`): the runtime set plus the
#                             test extra
#   requirements/release.txt  the SBOM tool of hack/release.sh (requirements/release.in), in a
#                             tool venv of its own
#   requirements/build.txt    pip and the build backend (requirements/build.in): installed
#                             first, so that every later install runs --no-build-isolation and
#                             nothing is installed without a hash
#
#   hack/lock.sh            re-lock after a change of pyproject.toml or build.in (`make lock`);
#                           what is locked already stays (uv prefers the existing pins)
#   hack/lock.sh --upgrade  re-lock everything to the newest releases the inputs allow
#   hack/lock.sh --check    fail when a lock file is not what its inputs lock to (CI, `make lint`)
#
# Resolved for the image's interpreter, CPython 3.11 on x86_64 Linux with glibc 2.36 (Debian
# 12, also this machine's); the hashes cover every file of each pinned release (all wheels and
# the sdist), so pip checks whichever file it picks. Needs PyPI (about 20 s).
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HACK")
CACHE=${BLOCKCOPY_CACHE_DIR:-/var/cache/blockcopy-operator}
UV_VERSION=0.13.8
PYTHON_VERSION=3.11
PLATFORM=x86_64-manylinux_2_36

log() { echo "[lock] $*" >&2; }
die() { echo "[lock] ERROR: $*" >&2; exit 1; }

check=0 upgrade=()
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  --upgrade) upgrade=(--upgrade) ;;
  *) die "usage: $0 [--check|--upgrade]" ;;
esac

TOOLS="$CACHE/tools/uv-$UV_VERSION"
# shellcheck source=lib/toolvenv.sh
source "$HACK/lib/toolvenv.sh"
tool_venv "$TOOLS" uv "uv==$UV_VERSION"

# compile OUTPUT INPUT [ARGS...]: one lock file, into OUTPUT; a lock file already there is
# copied first: uv keeps its pins where the inputs allow them.
compile() {
  local output=$1; shift
  [ ! -f "$REPO/requirements/${output##*/}" ] || cp "$REPO/requirements/${output##*/}" "$output"
  (cd "$REPO" && UV_CACHE_DIR="$CACHE/uv" "$TOOLS/bin/uv" pip compile --quiet --generate-hashes \
     --python-version "$PYTHON_VERSION" --python-platform "$PLATFORM" \
     --custom-compile-command "hack/lock.sh" ${upgrade[@]+"${upgrade[@]}"} "$@" -o "$output")
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
compile "$TMP/runtime.txt" pyproject.toml
compile "$TMP/ci.txt" pyproject.toml --extra test
compile "$TMP/release.txt" requirements/release.in
compile "$TMP/build.txt" requirements/build.in

status=0
for name in runtime.txt ci.txt build.txt release.txt; do
  if [ "$check" = 1 ]; then
    if ! diff -u "$REPO/requirements/$name" "$TMP/$name" >&2; then
      log "requirements/$name is not what its inputs lock to: run hack/lock.sh (make lock)"
      status=1
    fi
  elif ! cmp -s "$TMP/$name" "$REPO/requirements/$name"; then
    cp "$TMP/$name" "$REPO/requirements/$name"
    log "wrote requirements/$name"
  fi
done
[ "$check" = 0 ] || [ "$status" = 1 ] || log "lock files up to date"
exit "$status"
