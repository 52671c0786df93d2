#!/usr/bin/env bash
# Installs the Debian packages the local environment needs (libvirt, QEMU, buildah and
# debootstrap for the image, containerd and runc for the one-node cluster). Kubernetes and etcd are built from Go modules with the
# machine's Go (hack/build-kube.sh, hack/build-etcd.sh), not taken from Debian.
# Idempotent: does nothing when every package is already installed.
set -euo pipefail

PKGS=(
  # hypervisor
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
  libvirt-dev pkg-config
  # small guest that writes to its disk during copies
  linux-image-cloud-amd64 busybox-static cpio
  # cgo parts of the Kubernetes build
  gcc libc6-dev
  # container image build without a Docker engine
  buildah debootstrap
  # the one-node cluster (hack/cluster-node.sh): CRI runtime, OCI runtime, pod network
  containerd runc containernetworking-plugins
  # misc tools used by scripts and tests
  curl unzip psmisc procps socat
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages (${missing[*]}) and not root: run 'sudo $0'" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# No init system here: keep package scripts from trying to start services.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
