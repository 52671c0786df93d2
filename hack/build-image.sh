#!/usr/bin/env bash
# Builds the agent image from ../Dockerfile with buildah (no Docker engine here), on the local
# base image made by hack/make-base-image.sh, then proves it runs: `blockcopy-operator --help`
# inside the result (buildah from + buildah run), and prints the image size.
#
#   hack/build-image.sh                 # -> localhost/blockcopy-operator:dev
#   IMAGE=localhost/x:y hack/build-image.sh
#   hack/build-image.sh --label K=V --build-arg K=V   # further arguments go to `buildah bud`
#   BASE_IMAGE=NAME@sha256:DIGEST hack/build-image.sh # the base pinned by digest: taken from
#                                       # buildah's storage (pulled when absent there)
#
# Layer cache: buildah reuses the layers of an unchanged prefix of the Dockerfile (--layers), so
# a rebuild after a source edit only redoes the last builder step and the final COPY. The
# builder stage's result is tagged $IMAGE-builder (the cache of its last step); the images the
# new build replaced (previous final and builder images, with their now unused layers) are
# removed, so repeated builds do not fill the disk (vfs stores every layer as a full copy).
#
# pip traffic from this machine is TLS-inspected: the build mounts this machine's CA bundle (where
# the image's own ca-certificates would not rewrite it) and a pip.conf that points pip at it. Both
# are build-time mounts only: neither ends up in the image, and the Dockerfile needs no change.
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HACK")
IMAGE=${IMAGE:-localhost/blockcopy-operator:dev}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
CACHE=${BLOCKCOPY_CACHE_DIR:-/var/cache/blockcopy-operator}
# shellcheck source=lib/buildah.sh
source "$HACK/lib/buildah.sh"   # BUILDAH, TMP and ctr (removed on exit)

log() { echo "[build-image] $*" >&2; }
die() { echo "[build-image] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (buildah vfs storage, chroot isolation)"
command -v buildah >/dev/null || die "buildah missing: run hack/install-system-deps.sh"
[ -s "$HOST_CA" ] || die "CA bundle $HOST_CA not found (set HOST_CA)"

if [[ "$BASE_IMAGE" == *@sha256:* ]]; then
  # A pinned base: exactly that manifest, from local storage or its registry.
  "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 \
    || "${BUILDAH[@]}" pull --quiet "$BASE_IMAGE" >/dev/null \
    || die "base image $BASE_IMAGE neither in buildah's storage nor pullable"
else
  BASE_IMAGE="$BASE_IMAGE" BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/make-base-image.sh"
fi


printf '[global]\ncert = /run/host-ca.crt\n' >"$TMP/pip.conf"

BUILDER_TAG="$IMAGE-builder"
image_id() { { "${BUILDAH[@]}" images --no-trunc --format '{{.ID}}' "$1" 2>/dev/null || true; } | sed -n 1p; }

log "building $IMAGE from $REPO/Dockerfile on $BASE_IMAGE"
start=$SECONDS
# Concurrent builds of the same tag from several checkouts would race on the tag: serialise.
mkdir -p "$CACHE"
exec 9>"$CACHE/.build-image.lock"
flock 9
old_final=$(image_id "$IMAGE")
old_builder=$(image_id "$BUILDER_TAG")
"${BUILDAH[@]}" bud \
  --isolation chroot \
  --layers \
  --pull=false \
  --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --volume "$HOST_CA:/run/host-ca.crt:ro" \
  --volume "$TMP/pip.conf:/etc/pip.conf:ro" \
  --file "$REPO/Dockerfile" \
  --tag "$IMAGE" \
  "$@" \
  "$REPO" 2>&1 | tee "$TMP/bud.log"
log "built $IMAGE in $((SECONDS - start)) s"

# The builder stage's last image is the "--> ID" line just before the final stage starts.
builder=$(awk '/^\[2\/2\] STEP 1\//{print last; exit} /^--> [0-9a-f]+$/{last=$2}' "$TMP/bud.log")
if [ -n "$builder" ]; then
  "${BUILDAH[@]}" tag "$builder" "$BUILDER_TAG"
else
  log "WARNING: could not find the builder stage's image in the build output; not tagged"
fi
for pair in "$old_final|$IMAGE" "$old_builder|$BUILDER_TAG"; do
  old=${pair%%|*} name=${pair#*|}
  new=$(image_id "$name")
  if [ -n "$old" ] && [ -n "$new" ] && [ "$old" != "$new" ]; then
    # Also removes its parent layers that no other image uses. Fails harmlessly when the old
    # image is still tagged elsewhere or used by a container.
    if "${BUILDAH[@]}" rmi "$old" >/dev/null 2>&1; then
      log "removed the replaced image ${old:0:19}"
    fi
  fi
done

# Smoke test: the entrypoint runs in the final image (Python, the venv, libvirt0 all load), and
# the final image holds no build tools (they stay in the builder stage).
ctr=$("${BUILDAH[@]}" from --pull=false "$IMAGE")
"${BUILDAH[@]}" run --isolation chroot "$ctr" -- blockcopy-operator --help
# shellcheck disable=SC2016  # expanded by the container's shell, not this one
"${BUILDAH[@]}" run --isolation chroot "$ctr" -- sh -ec '
  python3 -c "import libvirt, kopf, kubernetes; print(\"libvirt-python loads libvirt\", libvirt.getVersion())"
  for tool in gcc cc pip pip3 pkg-config; do
    if command -v "$tool" >/dev/null; then echo "build tool $tool in the final image" >&2; exit 1; fi
  done
  for pkg in libvirt-dev python3-dev gcc python3-pip; do
    if [ "$(dpkg-query -W -f="\${db:Status-Status}" "$pkg" 2>/dev/null)" = installed ]; then
      echo "package $pkg in the final image" >&2; exit 1
    fi
  done
  # qemu-img: the agent reads images with it (the check at the switch, chain moves, sizes)
  echo "qemu-img in the image: $(qemu-img --version | sed -n 1p)"
  echo "runtime packages: $(dpkg-query -W -f="\${Package}=\${Version} " python3 libvirt0 qemu-utils)"
'
"${BUILDAH[@]}" rm "$ctr" >/dev/null
ctr=
exec 9>&-

config=$("${BUILDAH[@]}" inspect --type image \
  --format 'entrypoint={{.OCIv1.Config.Entrypoint}} user={{.OCIv1.Config.User}}' "$IMAGE")
echo "image config: $config"
size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" | sed -n 1p)
echo "image $IMAGE size: $size"
