# The simulated nodes of hack/cluster-nodes.sh: names, paths and settings shared with
# hack/cluster-nodes-down.sh. One copy, sourced. The caller sets $STATE, $NODES_STATE, $RUN
# and defines log() and die(). Runs in their shells, under set -euo pipefail.
# shellcheck shell=bash disable=SC2034  # its variables are for the callers

# What every node has in common.
ALLOWED_ROOT=/var/lib/libvirt/images          # the agents' --allowed-path
TAINT_KEY=blockcopy.dev/simulated             # NoSchedule: no kubelet runs there
AGENT_GROUP=blockcopy:sim-node-agents         # the agents' client certificates' O=
RBAC_NAME=blockcopy-sim-node-agents           # their ClusterRole and ClusterRoleBinding
# The plan controller (one per state dir): its client certificate's group, its RBAC (the
# chart's controller ClusterRole), its process (pid file nodes-controller.pid).
CONTROLLER_GROUP=blockcopy:sim-plan-controller
CONTROLLER_RBAC=blockcopy-sim-plan-controller
CONTROLLER_CERT=sim-plan-controller
CONTROLLER_MATCH="-m blockcopy --mode controller"

# save_settings / load_settings: what the bring-up chose (prefix, images root, namespaces,
# venv), so that start-agent, the teardown and a later bring-up agree with it.
save_settings() {
  {
    printf 'PREFIX=%q\n' "$PREFIX"
    printf 'IMAGES_ROOT=%q\n' "$IMAGES_ROOT"
    printf 'NAMESPACES=%q\n' "$NAMESPACES"
    printf 'VENV=%q\n' "$VENV"
  } >"$NODES_STATE/settings.tmp"
  mv "$NODES_STATE/settings.tmp" "$NODES_STATE/settings"
}
load_settings() {
  [ -s "$NODES_STATE/settings" ] || return 1
  # shellcheck source=/dev/null
  source "$NODES_STATE/settings"
}

# node_vars NAME: the node's user, daemon and agent, as variables.
node_vars() {
  local entry
  NODE_NAME=$1
  NODE_INDEX=${1##*-}
  HOMES=/var/lib/$PREFIX-nodes
  entry=$(getent passwd "$1" || true)
  NODE_UID=$(echo "$entry" | cut -d: -f3)
  NODE_GID=$(echo "$entry" | cut -d: -f4)
  NODE_HOME=$(echo "$entry" | cut -d: -f6)
  [ -n "$NODE_HOME" ] || NODE_HOME=$HOMES/$1
  URI="qemu+unix:///session?socket=/run/user/${NODE_UID:-UNKNOWN}/libvirt/libvirt-sock"
  IMAGES_DIR=$IMAGES_ROOT/$1
  LIBVIRTD_CONF=$NODE_HOME/.config/libvirt/libvirtd.conf
  LIBVIRTD_BIN=$PREFIX-libvirtd   # its process name (a link to libvirtd in its home's bin/)
  # Patterns that find the node's processes (pid_of, find_ours, stop_matching).
  LIBVIRTD_MATCH="libvirtd --config $LIBVIRTD_CONF"
  AGENT_MATCH="-m blockcopy --node-name $1 --libvirt-uri"
  AGENT_CERT=sim-node-agent-$1
  NODE_LABELS=("blockcopy.dev/sim-node=$1"
               "topology.blockcopy.dev/rack=r$(( (NODE_INDEX + 1) / 2 ))"
               "blockcopy.dev/test-node-group=$PREFIX-nodes"
               "kubernetes.io/hostname=$1" "kubernetes.io/os=linux")
}

# as_user CMD...: CMD as the node's user (after node_vars).
as_user() {
  setpriv --reuid="$NODE_UID" --regid="$NODE_GID" --init-groups \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$NODE_HOME" \
    XDG_RUNTIME_DIR="/run/user/$NODE_UID" "$@"
}

# claim_user NAME: the users are machine-wide, state dirs are not: a node whose user serves
# another state dir's live agent or daemon is not taken over (use another
# BLOCKCOPY_NODES_PREFIX there).
claim_user() {
  local marker=$NODE_HOME/.blockcopy-state-dir other
  other=$(cat "$marker" 2>/dev/null || true)
  if [ -n "$other" ] && [ "$other" != "$STATE" ]; then
    for what in agent libvirtd; do
      local pid
      pid=$(cat "$other/run/$1.$what.pid" 2>/dev/null || true)
      if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        die "user $1 serves the nodes of $other (its $what runs, pid $pid): tear those down, or set BLOCKCOPY_NODES_PREFIX"
      fi
    done
    log "taking over user $1 from $other (nothing of it runs)"
  fi
  echo "$STATE" >"$marker"
}

# node_json: the node's entry in nodes.json (after node_vars).
node_json() {
  local labels="" label ns namespaces=""
  for label in "${NODE_LABELS[@]}"; do
    labels+="${labels:+, }\"${label%%=*}\": \"${label#*=}\""
  done
  if [ "$NAMESPACES" != "*" ]; then
    for ns in $NAMESPACES; do namespaces+="${namespaces:+, }\"$ns\""; done
  fi
  printf '  {"name": "%s", "libvirtUri": "%s", "imagesDir": "%s",\n' "$NODE_NAME" "$URI" "$IMAGES_DIR"
  printf '   "user": "%s", "uid": %s, "labels": {%s}, "namespaces": [%s],\n' \
    "$NODE_NAME" "${NODE_UID:--1}" "$labels" "$namespaces"
  printf '   "agentLog": "%s", "agentPidFile": "%s", "libvirtdLog": "%s"}' \
    "$LOGS/$NODE_NAME.agent.log" "$RUN/$NODE_NAME.agent.pid" "$LOGS/$NODE_NAME.libvirtd.log"
}
