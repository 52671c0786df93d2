#!/usr/bin/env bash
# Installs the Debian packages the local environment needs (libvirt, QEMU, buildah and
# debootstrap for the image, containerd and runc for the one-node cluster). Kubernetes and etcd are built from Go modules with the
# machine's Go (hack/build-kube.sh, hack/build-etcd.sh), not taken from Debian.
# Then puts libvirt + QEMU on the stack HYPERVISOR_STACK names (stock, the default, or
# backports: hack/hypervisor-stack.sh).
# Idempotent: does nothing when every package is already installed and the stack is right.
set -euo pipefail
HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

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
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exec "$HACK/hypervisor-stack.sh"
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages (${missing[*]}) and not root: run 'sudo $0'" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# No init system here: keep package scripts from trying to start services.
ours=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  ours=1
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
if [ -n "$ours" ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
exec "$HACK/hypervisor-stack.sh"
