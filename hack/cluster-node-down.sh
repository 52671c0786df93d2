#!/usr/bin/env bash
# Tears down what hack/cluster-node.sh started, and only that: the kubelet, the pods' containers
# (killed through containerd, then any process left in the kubepods cgroups), kube-scheduler,
# the node's containerd and its shims, the kubepods cgroups, every mount under $STATE/node
# (pod volumes, container root file systems), the pods' network namespaces and the bcnode0
# bridge; the Node object and its ClusterRoleBinding when the API server still answers; the
# mount propagation it changed. Then removes $STATE/node (images imported there included).
# Called by hack/cluster-down.sh first; safe to run when nothing is up: exits 0.
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/env.sh
source "$HACK/lib/env.sh"   # REPO STATE RUN NODE_NAME NODE SOCK CTR
status=0

log() { echo "[cluster-node-down] $*" >&2; }

[ -d "$NODE" ] || { log "no node in $STATE"; exit 0; }
exec 9>"$NODE/.lock"
flock 9

source "$HACK/lib/processes.sh"
# stop NAME PATTERN: the pid in $RUN/NAME.pid if it is NAME, and any process matching PATTERN
# (a flag pointing into $NODE, so only this state dir's processes match).
stop() {
  stop_from_pidfile "$1" "$RUN/$1.pid"
  stop_matching "$1" "$2"
}

# ---------------------------------------------------------------- API objects
if [ -s "$STATE/kubeconfig" ]; then
  KUBECTL=("$STATE/bin/kubectl" --kubeconfig "$STATE/kubeconfig" --request-timeout=10s)
  [ -x "$STATE/bin/kubectl" ] || KUBECTL=(kubectl --kubeconfig "$STATE/kubeconfig" --request-timeout=10s)
  if "${KUBECTL[@]}" get --raw /readyz >/dev/null 2>&1; then
    # Pods bound to a deleted node are removed by kube-controller-manager's pod GC.
    "${KUBECTL[@]}" delete node "$NODE_NAME" --ignore-not-found --wait=false >/dev/null || status=1
    "${KUBECTL[@]}" delete clusterrolebinding "blockcopy-local:node:$NODE_NAME" \
      --ignore-not-found >/dev/null || status=1
  fi
fi

# ---------------------------------------------------------------- processes
stop kubelet "kubelet .*--config=$NODE/kubelet.yaml"
if "${CTR[@]}" version >/dev/null 2>&1; then
  for task in $("${CTR[@]}" tasks ls -q 2>/dev/null || true); do
    "${CTR[@]}" tasks kill --signal SIGKILL "$task" >/dev/null 2>&1 || true
  done
  sleep 1
  for task in $("${CTR[@]}" tasks ls -q 2>/dev/null || true); do
    "${CTR[@]}" tasks delete --force "$task" >/dev/null 2>&1 || true
  done
  for container in $("${CTR[@]}" containers ls -q 2>/dev/null || true); do
    "${CTR[@]}" containers delete "$container" >/dev/null 2>&1 || true
  done
fi
# What follows is machine-wide (cgroups, network namespaces, the bridge): only when this state
# dir's node was set up here, not for a state dir that merely has an empty node/ directory.
if [ ! -f "$NODE/containerd.toml" ]; then
  rm -rf --one-file-system "$NODE"
  log "no node was set up in $STATE"
  exit "$status"
fi
# Whatever still runs in a pod's cgroup (a container whose shim is gone, say).
for procs in $(find /sys/fs/cgroup/*/kubepods -name cgroup.procs 2>/dev/null); do
  while read -r pid; do
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  done <"$procs"
done
stop kube-scheduler "kube-scheduler .*--kubeconfig=$NODE/scheduler.kubeconfig"
stop containerd "containerd --config $NODE/containerd.toml"
for pid in $(pgrep -f -- "containerd-shim-runc-v2 .*-address $SOCK" || true); do
  stop_pid containerd-shim "$pid"
done

# ---------------------------------------------------------------- cgroups
# Deepest first; a cgroup still holding a process stays (and is reported).
for hierarchy in /sys/fs/cgroup/*/; do
  [ -d "${hierarchy}kubepods" ] || continue
  for _ in 1 2 3 4 5; do
    find "${hierarchy}kubepods" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ -d "${hierarchy}kubepods" ] || break
    sleep 1
  done
  [ ! -d "${hierarchy}kubepods" ] || { log "WARNING: ${hierarchy}kubepods not removed"; status=1; }
done

# ---------------------------------------------------------------- mounts and network
# Deepest first: pod volumes, container root file systems, sandbox shm.
{ findmnt -rn -o TARGET | grep -F "$NODE/" || true; } | sort -r | while read -r target; do
  umount "$target" 2>/dev/null || umount -l "$target" || true
done
for netns in /run/netns/cni-*; do
  [ -e "$netns" ] || continue
  umount "$netns" 2>/dev/null || true
  rm -f "$netns"
done
if ip link show bcnode0 >/dev/null 2>&1; then
  ip link delete bcnode0 || status=1
fi
if [ -f "$NODE/made-shared" ]; then
  while read -r mnt; do
    [ -n "$mnt" ] || continue
    log "making mount $mnt private again"
    mount --make-private "$mnt" || status=1
  done <"$NODE/made-shared"
fi

# ---------------------------------------------------------------- files
if findmnt -rn -o TARGET | grep -F "$NODE/" >/dev/null; then
  log "WARNING: mounts left under $NODE; not removing it:"
  findmnt -rn -o TARGET | grep -F "$NODE/" >&2
  exit 1
fi
# --one-file-system: never follow into a mount we missed.
rm -rf --one-file-system "$NODE"
log "node down"
exit "$status"
