#!/usr/bin/env bash
# Tears down what hack/cluster-up.sh, hack/cluster-nodes.sh and hack/cluster-node.sh started:
# the simulated nodes (hack/cluster-nodes-down.sh), the node (kubelet, pods,
# containerd, kube-scheduler: hack/cluster-node-down.sh), the local registry (hack/registry.sh
# stop), kube-apiserver, etcd (and its data), the test
# VMs (libvirt domains named bct-*) and their throwaway images, and libvirtd/virtlogd only if
# cluster-up started them. Keeps $STATE/pki so certificates/tokens survive a restart.
# BLOCKCOPY_KEEP_VMS=1 leaves the VMs, libvirtd and virtlogd alone (a second environment
# sharing the libvirtd).
# Safe to run when nothing is up: exits 0.
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/env.sh
source "$HACK/lib/env.sh"   # REPO STATE RUN...
VM_PREFIX=bct-
IMAGES_DIR=/var/lib/libvirt/images/blockcopy-test
VIRSH=(virsh -c qemu:///system)
status=0   # set to 1 on a cleanup step that failed; the others still run

log() { echo "[cluster-down] $*" >&2; }

if [ -d "$STATE" ]; then
  # Same lock as cluster-up, so a teardown never races a bring-up.
  exec 9>"$STATE/.lock"
  flock 9
fi

source "$HACK/lib/processes.sh"

# ---------------------------------------------------------------- simulated nodes
# hack/cluster-nodes.sh's nodes (agents, session daemons and their domains, Node objects)
# while the API server still answers.
if [ -d "$STATE/nodes" ]; then
  BLOCKCOPY_STATE_DIR="$STATE" "$HACK/cluster-nodes-down.sh" || status=1
fi

# ---------------------------------------------------------------- node
# The one-node cluster of hack/cluster-node.sh first (kubelet, pods, containerd, scheduler),
# while the API server still answers: its Node object goes too.
if [ -d "$STATE/node" ]; then
  BLOCKCOPY_STATE_DIR="$STATE" "$HACK/cluster-node-down.sh" || status=1
fi

# ---------------------------------------------------------------- registry
# The local OCI registry of hack/registry.sh (release tests), with what was pushed to it.
if [ -d "$STATE/registry" ]; then
  BLOCKCOPY_STATE_DIR="$STATE" "$HACK/registry.sh" stop || status=1
fi

# ---------------------------------------------------------------- control plane
# The controller manager, then the apiserver: each would only log errors while what it
# talks to is going away.
stop_from_pidfile kube-controller-manager "$RUN/kube-controller-manager.pid"
stop_matching kube-controller-manager "kube-controller-manager .*--kubeconfig=$STATE/kcm.kubeconfig"
stop_from_pidfile kube-apiserver "$RUN/kube-apiserver.pid"
stop_matching kube-apiserver "kube-apiserver .*--token-auth-file=$STATE/pki/tokens.csv"
stop_from_pidfile etcd "$RUN/etcd.pid"
stop_matching etcd "etcd .*--data-dir $STATE/etcd( |\$)"
rm -rf "$STATE/etcd" "$STATE/kubeconfig" "$STATE/kubeconfig.tmp"

# ---------------------------------------------------------------- libvirt
virsh_ok() { timeout 10 "${VIRSH[@]}" version >/dev/null 2>&1; }
if [ -n "${BLOCKCOPY_KEEP_VMS:-}" ]; then
  log "BLOCKCOPY_KEEP_VMS set: leaving test VMs and their images alone"
elif virsh_ok; then
  # Test/demo VMs are all named bct-*; destroy (if running) and undefine each one. This is
  # machine-wide: it also removes bct-* VMs of any other checkout using the same libvirtd.
  # No --remove-all-storage: their images are removed with $IMAGES_DIR below.
  while read -r dom; do
    [ -n "$dom" ] || continue
    case "$dom" in "$VM_PREFIX"*) ;; *) continue ;; esac
    log "removing domain $dom"
    "${VIRSH[@]}" destroy "$dom" >/dev/null 2>&1 || true   # fails harmlessly if shut off
    # Transient domains vanish on destroy; persistent ones need undefine. A plain undefine
    # fails for domains with NVRAM or snapshot metadata, hence the fallback.
    if "${VIRSH[@]}" dominfo "$dom" >/dev/null 2>&1; then
      "${VIRSH[@]}" undefine "$dom" >/dev/null 2>&1 \
        || "${VIRSH[@]}" undefine "$dom" --nvram --snapshots-metadata --checkpoints-metadata >/dev/null \
        || { log "WARNING: could not undefine $dom"; status=1; }
    fi
  done < <("${VIRSH[@]}" list --all --name)
elif pgrep -f "qemu-system.*-name guest=$VM_PREFIX" >/dev/null; then
  log "WARNING: libvirtd is not answering but $VM_PREFIX* qemu processes exist"
fi
[ -n "${BLOCKCOPY_KEEP_VMS:-}" ] || rm -rf "$IMAGES_DIR"

# libvirtd and virtlogd are machine-wide: a second environment (BLOCKCOPY_KEEP_VMS) never
# stops them, even if it happened to start them, since the first one still uses them.
if [ -f "$RUN/libvirt-started-by-us" ] && [ -n "${BLOCKCOPY_KEEP_VMS:-}" ]; then
  log "BLOCKCOPY_KEEP_VMS set: leaving libvirtd and virtlogd running"
  rm -f "$RUN/libvirt-started-by-us"
elif [ -f "$RUN/libvirt-started-by-us" ]; then
  if virsh_ok; then
    # Networks we may have started would leave dnsmasq behind once libvirtd is gone.
    for net in $("${VIRSH[@]}" net-list --name); do
      log "stopping libvirt network $net"
      "${VIRSH[@]}" net-destroy "$net" >/dev/null || true
    done
  fi
  for d in libvirtd virtlogd; do
    stop_from_pidfile "$d" "/run/$d.pid"
  done
  rm -f "$RUN/libvirt-started-by-us"
fi

rm -rf "$RUN"
log "down"
exit "$status"
