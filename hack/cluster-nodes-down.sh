#!/usr/bin/env bash
# Tears down the simulated nodes of hack/cluster-nodes.sh (all of them, or those named):
# each node's agent, every domain of its session daemon (destroyed, undefined), the daemon
# and whatever else still runs as its user (QEMU, virtlogd), its images dir, its Node object
# (when the API server answers); with all nodes gone, also the agents' ClusterRole and
# ClusterRoleBinding, nodes.json and $STATE/nodes. The users stay (and their home dirs:
# the next bring-up reuses them); certificates stay in $STATE/pki, as with hack/cluster-down.sh.
# Called by hack/cluster-down.sh first; safe to run when nothing is up: exits 0.
#
#   hack/cluster-nodes-down.sh [NAME...]
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HACK")
STATE=${BLOCKCOPY_STATE_DIR:-$REPO/.local}
RUN="$STATE/run"
LOGS="$STATE/log"
NODES_STATE="$STATE/nodes"
status=0

log() { echo "[cluster-nodes-down] $*" >&2; }
die() { echo "[cluster-nodes-down] ERROR: $*" >&2; exit 1; }

[ -d "$NODES_STATE" ] || { log "no nodes in $STATE"; exit 0; }
exec 9>"$NODES_STATE/.lock"
flock 9

source "$HACK/lib/processes.sh"
source "$HACK/lib/nodes.sh"
if ! load_settings; then
  rm -rf "$NODES_STATE" "$STATE/nodes.json"
  log "no nodes were set up in $STATE"
  exit 0
fi

all=1
if [ "$#" -gt 0 ]; then
  names=("$@")
  all=0
else
  names=()
  for dir in "$NODES_STATE"/*/; do
    [ -d "$dir" ] && names+=("$(basename "$dir")")
  done
fi

KUBECTL=()
if [ -s "$STATE/kubeconfig" ]; then
  KUBECTL=("$STATE/bin/kubectl" --kubeconfig "$STATE/kubeconfig" --request-timeout=10s)
  [ -x "$STATE/bin/kubectl" ] || KUBECTL=(kubectl --kubeconfig "$STATE/kubeconfig" --request-timeout=10s)
  "${KUBECTL[@]}" get --raw /readyz >/dev/null 2>&1 || KUBECTL=()
fi

# ---------------------------------------------------------------- cluster-wide part: HOOK
# HOOK: the plans' cluster-wide controller (see hack/cluster-nodes.sh), stopped before the
# agents so it starts nothing new on nodes that are going away.
if [ "$all" = 1 ]; then
  stop_from_pidfile "$CONTROLLER_MATCH" "$RUN/nodes-controller.pid"
  rm -f "$RUN/nodes-controller.pid"
fi

# ---------------------------------------------------------------- nodes
for name in "${names[@]}"; do
  [[ "$name" =~ ^[a-z][a-z0-9-]*-node-[0-9]+$ ]] || { log "WARNING: skipping $name: not a node name"; continue; }
  node_vars "$name"
  log "removing node $name"
  stop_from_pidfile "$AGENT_MATCH" "$RUN/$name.agent.pid"
  stop_matching "agent of $name" "$AGENT_MATCH"

  if [ -n "$NODE_UID" ]; then
    # Every domain of this hypervisor is ours: the node exists for the tests alone.
    if timeout 10 virsh -c "$URI" version >/dev/null 2>&1; then
      while read -r dom; do
        [ -n "$dom" ] || continue
        timeout 30 virsh -c "$URI" destroy "$dom" >/dev/null 2>&1 || true
        if timeout 10 virsh -c "$URI" dominfo "$dom" >/dev/null 2>&1; then
          timeout 30 virsh -c "$URI" undefine "$dom" --nvram --snapshots-metadata \
            --checkpoints-metadata >/dev/null 2>&1 \
            || timeout 30 virsh -c "$URI" undefine "$dom" >/dev/null \
            || { log "WARNING: could not undefine $dom on $name"; status=1; }
        fi
      done < <(timeout 30 virsh -c "$URI" list --all --name 2>/dev/null || true)
    fi
    stop_from_pidfile "$LIBVIRTD_MATCH" "$RUN/$name.libvirtd.pid"
    stop_matching "libvirtd of $name" "$LIBVIRTD_MATCH"
    # What is left running as the node's user: QEMU of a domain libvirt could not destroy,
    # the session's virtlogd, an autostarted libvirtd.
    for pid in $(pgrep -u "$NODE_UID" || true); do
      stop_pid "$(cat "/proc/$pid/comm" 2>/dev/null || echo process) of $name" "$pid"
    done
    [ "$(cat "$NODE_HOME/.blockcopy-state-dir" 2>/dev/null)" != "$STATE" ] \
      || rm -f "$NODE_HOME/.blockcopy-state-dir"
  fi
  rm -f "$RUN/$name.agent.pid" "$RUN/$name.libvirtd.pid"
  # The node's VMs and copies (user data of the tests, like blockcopy-test for qemu:///system).
  case "$IMAGES_DIR" in
    "$ALLOWED_ROOT"/?*/"$name") rm -rf --one-file-system "$IMAGES_DIR" ;;
    *) log "WARNING: not removing $IMAGES_DIR: not under $ALLOWED_ROOT"; status=1 ;;
  esac
  if [ "${#KUBECTL[@]}" -gt 0 ]; then
    "${KUBECTL[@]}" delete node "$name" --ignore-not-found --wait=false >/dev/null || status=1
    # The node inventory its agent published (none where the CRD is not installed).
    "${KUBECTL[@]}" delete diskinventories.blockcopy.dev "$name" --ignore-not-found \
      --wait=false >/dev/null 2>&1 || true
  fi
  rm -rf "${NODES_STATE:?}/$name"
done

if [ "$all" = 1 ]; then
  if [ "${#KUBECTL[@]}" -gt 0 ]; then
    "${KUBECTL[@]}" delete clusterrolebinding "$RBAC_NAME" --ignore-not-found >/dev/null || status=1
    "${KUBECTL[@]}" delete clusterrole "$RBAC_NAME" --ignore-not-found >/dev/null || status=1
    "${KUBECTL[@]}" delete clusterrolebinding "$CONTROLLER_RBAC" --ignore-not-found >/dev/null || status=1
    "${KUBECTL[@]}" delete clusterrole "$CONTROLLER_RBAC-controller" --ignore-not-found >/dev/null || status=1
  fi
  rmdir "$IMAGES_ROOT" 2>/dev/null || true
  rm -rf "$NODES_STATE" "$STATE/nodes.json"
  log "nodes down"
fi
exit "$status"
