#!/usr/bin/env bash
# Makes the local base image localhost/debian:bookworm (no registry can be pulled from here).
#
#   debootstrap --variant=minbase bookworm ROOTFS   -> cached as a tarball under $CACHE/base/
#   buildah from scratch + buildah add TARBALL /    -> buildah commit localhost/debian:bookworm
#
# Idempotent and cheap when done: exits at once when the image exists; rebuilds the image from
# the cached tarball (a few seconds) when only the image is gone; runs debootstrap (about 30 s)
# only when the tarball is missing. Delete the tarball to pick up a newer bookworm point release.
#
# The rootfs is trimmed like the official debian:bookworm-slim: the same dpkg path excludes (no
# docs, man pages, locales), and apt sources for bookworm, bookworm-updates, bookworm-security.
# Storage: buildah's vfs driver (works everywhere as root, no overlay/fuse needed).
set -euo pipefail

CACHE=${BLOCKCOPY_CACHE_DIR:-/var/cache/blockcopy-operator}
IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
SUITE=bookworm
ARCH=$(dpkg --print-architecture)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BASE_DIR="$CACHE/base"
TARBALL="$BASE_DIR/debian-$SUITE-minbase-$ARCH.tar.gz"
BUILDAH=(buildah --storage-driver vfs)

log() { echo "[make-base-image] $*" >&2; }
die() { echo "[make-base-image] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, buildah vfs storage)"
command -v debootstrap >/dev/null || die "debootstrap missing: run hack/install-system-deps.sh"
command -v buildah >/dev/null || die "buildah missing: run hack/install-system-deps.sh"

mkdir -p "$BASE_DIR"
# Several checkouts/sessions share this machine and the cache: one builder at a time.
exec 9>"$BASE_DIR/.lock"
flock 9

if "${BUILDAH[@]}" inspect --type image "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE exists"
  exit 0
fi

if [ ! -s "$TARBALL" ]; then
  ROOTFS=$(mktemp -d /var/tmp/blockcopy-rootfs.XXXXXX)
  trap 'rm -rf "$ROOTFS" "$TARBALL.tmp"' EXIT
  log "debootstrap --variant=minbase $SUITE ($MIRROR) into $ROOTFS"
  start=$SECONDS
  debootstrap --variant=minbase --arch="$ARCH" "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$BASE_DIR/debootstrap.log" 2>&1 \
    || { tail -n 30 "$BASE_DIR/debootstrap.log" >&2; die "debootstrap failed"; }

  # What debian:*-slim does: keep docs/man/locales out of every later apt-get install too.
  cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$ROOTFS"/usr/share/{man,groff,info,lintian,linda,locale}/*
  # No apt caches or lists in the image; images install with apt-get update first anyway.
  cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  rm -f "$ROOTFS/etc/apt/sources.list"
  cat >"$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
         "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/log/* "$ROOTFS"/tmp/*
  # Leave resolv.conf/hostname to the runtime.
  : >"$ROOTFS/etc/resolv.conf"
  tar -C "$ROOTFS" --numeric-owner --xattrs -czf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  rm -rf "$ROOTFS"
  trap - EXIT
  log "rootfs cached in $TARBALL ($(du -h "$TARBALL" | cut -f1), $((SECONDS - start)) s)"
fi

log "committing $IMAGE from $TARBALL"
ctr=$("${BUILDAH[@]}" from scratch)
trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
# buildah add unpacks a local tar archive into the container, keeping owners and modes.
"${BUILDAH[@]}" add "$ctr" "$TARBALL" / >/dev/null
"${BUILDAH[@]}" config \
  --os linux --arch "$ARCH" \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd /bin/bash \
  --label org.opencontainers.image.title="debian $SUITE minbase (local)" \
  --label org.opencontainers.image.source="debootstrap --variant=minbase $SUITE $MIRROR" \
  "$ctr"
"${BUILDAH[@]}" commit --quiet --rm "$ctr" "$IMAGE" >/dev/null
trap - EXIT
log "made $IMAGE"
