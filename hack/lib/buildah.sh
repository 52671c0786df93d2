# The image scripts' buildah (build-image.sh, release.sh): one copy, sourced.
# shellcheck shell=bash
#
# BUILDAH runs buildah on vfs storage (no overlay inside these machines' containers). Sourcing
# this makes TMP, a scratch directory, and registers the cleanup on exit: TMP removed, and the
# working container in $ctr (set it while one exists, empty it after `buildah rm`) removed
# whatever happened in between.
BUILDAH=(buildah --storage-driver vfs)
TMP=$(mktemp -d)
ctr=
buildah_cleanup() {
  [ -z "$ctr" ] || "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap buildah_cleanup EXIT
