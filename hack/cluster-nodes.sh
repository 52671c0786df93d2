#!/usr/bin/env bash
# Several hypervisor nodes on one machine, for tests: on top of hack/cluster-up.sh (`make
# cluster`), N simulated nodes, each
#
#   a hypervisor      a libvirt session daemon of its own unprivileged user (bcn-node-I): its
#                     own domains and QEMU processes (running as that user), so the same
#                     domain name can run on two nodes, as on real hosts. Root reaches it at
#                     qemu+unix:///session?socket=/run/user/UID/libvirt/libvirt-sock
#   an agent          `python -m blockcopy --node-name bcn-node-I --libvirt-uri <that URI>`
#                     (this checkout's venv), with a client certificate of its own and the
#                     chart's ClusterRole (rendered from charts/, bound to its group)
#   a Node object     named bcn-node-I, labelled (selectors can pick nodes):
#                       blockcopy.dev/sim-node=bcn-node-I         one node
#                       topology.blockcopy.dev/rack=rK            two nodes per rack (1-2: r1)
#                       blockcopy.dev/test-node-group=bcn-nodes   all of them
#                     and tainted blockcopy.dev/simulated=true:NoSchedule: no kubelet runs
#                     there, so no pod may be scheduled (or a DaemonSet's pod be counted).
#                     kube-controller-manager marks such nodes NotReady/unreachable (taints
#                     node.kubernetes.io/unreachable) after 40 s, and leaves them there.
#   an images dir     /var/lib/libvirt/images/blockcopy-nodes/bcn-node-I (owner bcn-node-I,
#                     0750), inside the agents' allowed root: that node's VMs and copies
#
# and writes $STATE/nodes.json, one entry per node:
#   {"name", "libvirtUri", "imagesDir", "user", "uid", "labels", "namespaces",
#    "agentLog", "agentPidFile", "libvirtdLog"}
# (tests/support/multinode.py reads it).
#
#   hack/cluster-nodes.sh                      bring up NODES nodes (idempotent; nodes beyond
#                                              NODES from an earlier run are torn down)
#   hack/cluster-nodes.sh stop-agent NAME [SIG] stop one node's agent (TERM; KILL: no cleanup)
#   hack/cluster-nodes.sh start-agent NAME     start it again (no-op if it runs)
#   hack/cluster-nodes.sh restart-agent NAME
#   hack/cluster-nodes.sh stop-controller [SIG] / start-controller / restart-controller
#                                              the plan controller (`python -m blockcopy
#                                              --mode controller`, pid file
#                                              $STATE/run/nodes-controller.pid, log
#                                              $STATE/log/nodes-controller.log)
#   hack/cluster-nodes-down.sh [NAME...]       tear down (hack/cluster-down.sh calls it)
#
# Environment (bring-up; later calls reuse what it recorded in $STATE/nodes/settings):
#   NODES                        how many (default 4)
#   BLOCKCOPY_STATE_DIR, BLOCKCOPY_API_PORT   as hack/cluster-up.sh
#   BLOCKCOPY_NODES_PREFIX       machine-wide name prefix of the users/nodes (default bcn:
#                                bcn-node-1...); another state dir on this machine needs
#                                another one: users and their daemons are machine-wide
#   BLOCKCOPY_NODES_IMAGES       parent of the nodes' images dirs
#                                (default /var/lib/libvirt/images/blockcopy-nodes)
#   BLOCKCOPY_NODES_NAMESPACES   namespaces the agents watch, space-separated, created when
#                                missing (default blockcopy-nodes); "*": all namespaces
#   BLOCKCOPY_VENV               the venv whose python runs the agents (default $REPO/.venv)
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HACK")
STATE=${BLOCKCOPY_STATE_DIR:-$REPO/.local}
API_PORT=${BLOCKCOPY_API_PORT:-16443}
PKI="$STATE/pki"
RUN="$STATE/run"
LOGS="$STATE/log"
NODES_STATE="$STATE/nodes"

log() { echo "[cluster-nodes] $*" >&2; }
die() { echo "[cluster-nodes] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (users, their session daemons)"
[ -s "$STATE/kubeconfig" ] && [ -s "$PKI/ca.key" ] \
  || die "no local control plane in $STATE: run hack/cluster-up.sh (make cluster) first"
mkdir -p "$NODES_STATE" "$RUN" "$LOGS"

source "$HACK/lib/processes.sh"
# replace_if_changed, client_cert, kubeconfig_for
source "$HACK/lib/kubeconfig.sh"
# node_* helpers shared with hack/cluster-nodes-down.sh
source "$HACK/lib/nodes.sh"

ADMIN=("$STATE/bin/kubectl" --kubeconfig "$STATE/kubeconfig" --request-timeout=30s)
[ -x "$STATE/bin/kubectl" ] || ADMIN=(kubectl --kubeconfig "$STATE/kubeconfig" --request-timeout=30s)
HELM="$STATE/bin/helm"
[ -x "$HELM" ] || HELM=helm

# ---------------------------------------------------------------- code
# A long-lived agent or controller started from other code than the caller's (the checkout
# edited since, or another checkout's tests pointed at this state dir) is restarted, not
# reused: $RUN/WHAT.code holds the fingerprint (hack/code_fingerprint.py) it started with.
CODE=""
code_now() {
  [ -z "$CODE" ] || return 0
  [ -x "$VENV/bin/python" ] || die "no $VENV/bin/python: run make venv (or set BLOCKCOPY_VENV)"
  CODE=$("$VENV/bin/python" "$HACK/code_fingerprint.py") \
    || die "cannot fingerprint the blockcopy code of $VENV/bin/python"
}
# stop_if_other_code WHAT PID: stops PID (pid file $RUN/WHAT.pid) when it runs other code;
# true when it did (the caller starts it again).
stop_if_other_code() {
  local what=$1 pid=$2 had
  code_now
  had=$(cat "$RUN/$what.code" 2>/dev/null || echo unknown)
  [ "$had" != "$CODE" ] || return 1
  log "$what (pid $pid) runs code $had, this checkout's is $CODE: restarting it"
  stop_pid "$what" "$pid"
  rm -f "$RUN/$what.pid"
}

# ---------------------------------------------------------------- agents
# launch_agent NAME: starts the node's agent unless it runs (the agent's command line: one
# place, for the bring-up and start-agent), without waiting: await_agent NAME does. The
# nodes' agents start side by side (each takes seconds to import and connect).
declare -A AGENT_OFFSET=()   # where a launched agent's log began
launch_agent() {
  local name=$1 pid ns
  node_vars "$name"
  pid=$(pid_of "$RUN/$name.agent.pid" "$AGENT_MATCH")
  [ -n "$pid" ] || pid=$(find_ours "$RUN/$name.agent.pid" "$AGENT_MATCH")
  if [ -n "$pid" ]; then stop_if_other_code "$name.agent" "$pid" || return 0; fi
  local args=(--node-name "$name" --libvirt-uri "$URI" --allowed-path "$ALLOWED_ROOT")
  if [ "$NAMESPACES" != "*" ]; then
    for ns in $NAMESPACES; do args+=(--namespace "$ns"); done
  fi
  code_now
  AGENT_OFFSET[$name]=$(stat -c %s "$LOGS/$name.agent.log" 2>/dev/null || echo 0)
  # No in-cluster service environment may take precedence over the kubeconfig.
  start_bg "$name.agent" env -u KUBERNETES_SERVICE_HOST -u KUBERNETES_SERVICE_PORT \
    KUBECONFIG="$NODES_STATE/$name/agent.kubeconfig" NODE_NAME="$name" \
    "$VENV/bin/python" -m blockcopy "${args[@]}"
  echo "$CODE" >"$RUN/$name.agent.code"
}

# await_logged WHAT PIDFILE LOG OFFSET TEXT: until the process logged TEXT after byte OFFSET of
# LOG (dies with the log's tail after 90 s, or when the process exits first).
await_logged() {
  local what=$1 pid log=$3 offset=$4 text=$5
  pid=$(cat "$2")
  logged() { tail -c +"$((offset + 1))" "$log" | grep -F "$text" >/dev/null; }
  if ! wait_for 90 "$pid" logged; then
    tail -c +"$((offset + 1))" "$log" | tail -n 30 >&2 || true
    die "$what not ready after 90 s (log: $log)"
  fi
  log "$what ready (pid $pid)"
}

# await_agent NAME: after launch_agent, until the agent logged "agent ready".
await_agent() {
  local name=$1 offset
  [ -n "${AGENT_OFFSET[$name]:-}" ] || return 0   # it was running already
  offset=${AGENT_OFFSET[$name]}
  await_logged "agent of $name" "$RUN/$name.agent.pid" "$LOGS/$name.agent.log" "$offset" \
    "agent ready"
}

start_agent() { launch_agent "$1"; await_agent "$1"; }

# ---------------------------------------------------------------- the plan controller
# start_controller: the BlockCopyPlan controller of these nodes (one process), with a client
# certificate of its own bound to the chart's controller ClusterRole; no-op if it runs.
start_controller() {
  local pid offset ns args=(--mode controller --agent-timeout "$AGENT_TIMEOUT")
  pid=$(pid_of "$RUN/nodes-controller.pid" "$CONTROLLER_MATCH")
  if [ -n "$pid" ]; then stop_if_other_code nodes-controller "$pid" || return 0; fi
  if [ "$NAMESPACES" != "*" ]; then
    for ns in $NAMESPACES; do args+=(--namespace "$ns"); done
  fi
  offset=$(stat -c %s "$LOGS/nodes-controller.log" 2>/dev/null || echo 0)
  code_now
  start_bg nodes-controller env -u KUBERNETES_SERVICE_HOST -u KUBERNETES_SERVICE_PORT \
    KUBECONFIG="$NODES_STATE/controller.kubeconfig" "$VENV/bin/python" -m blockcopy "${args[@]}"
  echo "$CODE" >"$RUN/nodes-controller.code"
  await_logged "plan controller" "$RUN/nodes-controller.pid" "$LOGS/nodes-controller.log" \
    "$offset" "plan controller ready"
}

# stop_with WHAT PID SIG: SIGTERM through stop_pid (which escalates), any other signal sent as
# is (a test's crash), then waited for until the process is gone or a zombie (pid 1 may reap
# its adopted children late): it runs no more.
stop_with() {
  local what=$1 pid=$2 sig=$3
  if [ "$sig" = TERM ]; then
    stop_pid "$what" "$pid"
    return
  fi
  log "sending SIG$sig to the $what (pid $pid)"
  kill -s "$sig" "$pid"
  while kill -0 "$pid" 2>/dev/null \
        && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
    sleep 0.1
  done
}

stop_controller() {
  local sig=${1:-TERM} pid
  pid=$(pid_of "$RUN/nodes-controller.pid" "$CONTROLLER_MATCH")
  if [ -z "$pid" ]; then log "the plan controller is not running"; return 0; fi
  stop_with "plan controller" "$pid" "$sig"
  rm -f "$RUN/nodes-controller.pid" "$RUN/nodes-controller.code"
}

stop_agent() {
  local name=$1 sig=${2:-TERM} pid
  node_vars "$name"
  pid=$(pid_of "$RUN/$name.agent.pid" "$AGENT_MATCH")
  [ -n "$pid" ] || pid=$(find_ours "$RUN/$name.agent.pid" "$AGENT_MATCH")
  if [ -z "$pid" ]; then log "agent of $name is not running"; return 0; fi
  stop_with "agent of $name" "$pid" "$sig"
  rm -f "$RUN/$name.agent.pid" "$RUN/$name.agent.code"
}

# One bring-up (or agent start/stop) at a time per state dir. Its own lock: cluster-up.sh
# holds $STATE/.lock, and cluster-down.sh calls hack/cluster-nodes-down.sh while holding it.
exec 9>"$NODES_STATE/.lock"
flock 9

case "${1:-up}" in
  up) ;;
  start-agent|stop-agent|restart-agent)
    [ -n "${2:-}" ] || die "usage: $0 $1 NAME"
    load_settings || die "no nodes in $STATE (run $0 first)"
    [ -d "$NODES_STATE/$2" ] || die "no node $2 in $STATE"
    case "$1" in
      start-agent) start_agent "$2" ;;
      stop-agent) stop_agent "$2" "${3:-TERM}" ;;
      restart-agent) stop_agent "$2"; start_agent "$2" ;;
    esac
    exit 0 ;;
  start-controller|stop-controller|restart-controller)
    load_settings || die "no nodes in $STATE (run $0 first)"
    AGENT_TIMEOUT=${BLOCKCOPY_NODES_AGENT_TIMEOUT:-900}
    case "$1" in
      start-controller) start_controller ;;
      stop-controller) stop_controller "${2:-TERM}" ;;
      restart-controller) stop_controller; start_controller ;;
    esac
    exit 0 ;;
  *) die "unknown command $1 (up, start-agent, stop-agent, restart-agent, start-controller, stop-controller, restart-controller)" ;;
esac

# ---------------------------------------------------------------- settings
COUNT=${NODES:-4}
[[ "$COUNT" =~ ^[0-9]+$ ]] && [ "$COUNT" -ge 1 ] || die "NODES must be a positive number, not '$COUNT'"
if load_settings && [ "$PREFIX" != "${BLOCKCOPY_NODES_PREFIX:-$PREFIX}" ]; then
  die "nodes of prefix $PREFIX are up in $STATE: tear them down first (hack/cluster-nodes-down.sh)"
fi
PREFIX=${BLOCKCOPY_NODES_PREFIX:-bcn}
IMAGES_ROOT=${BLOCKCOPY_NODES_IMAGES:-/var/lib/libvirt/images/blockcopy-nodes}
NAMESPACES=${BLOCKCOPY_NODES_NAMESPACES:-blockcopy-nodes}
AGENT_TIMEOUT=${BLOCKCOPY_NODES_AGENT_TIMEOUT:-900}
VENV=${BLOCKCOPY_VENV:-$REPO/.venv}
[[ "$PREFIX" =~ ^[a-z][a-z0-9-]{0,20}$ ]] || die "BLOCKCOPY_NODES_PREFIX: a short lower-case name, not '$PREFIX'"
case "$IMAGES_ROOT/" in
  "$ALLOWED_ROOT"/?*) ;;
  *) die "BLOCKCOPY_NODES_IMAGES ($IMAGES_ROOT) must lie under the agents' allowed root $ALLOWED_ROOT" ;;
esac
save_settings
start=$SECONDS

# ---------------------------------------------------------------- cluster-wide objects
# The CRDs (copies, inventories, plans), as users apply them (only when missing: tests may be working with them right now).
for crd in blockcopy:blockcopies diskinventory:diskinventories blockcopyplan:blockcopyplans; do
  file=${crd%%:*} name=${crd#*:}.blockcopy.dev
  "${ADMIN[@]}" get crd "$name" >/dev/null 2>&1 \
    || "${ADMIN[@]}" apply -f "$REPO/crds/$file.yaml" >/dev/null
  "${ADMIN[@]}" wait --for=condition=Established "crd/$name" --timeout=60s >/dev/null
done
if [ "$NAMESPACES" != "*" ]; then
  for ns in $NAMESPACES; do
    "${ADMIN[@]}" get namespace "$ns" >/dev/null 2>&1 \
      || "${ADMIN[@]}" create namespace "$ns" >/dev/null
  done
fi
# The agents' rights: exactly the chart's ClusterRole (what users give the DaemonSet's
# ServiceAccount), bound to the group of their client certificates.
helm_args=(template "$RBAC_NAME" "$REPO/charts/blockcopy-operator" --set "fullnameOverride=$RBAC_NAME"
           --show-only templates/clusterrole.yaml)
# shellcheck disable=SC2086 # one word per namespace, joined with commas
[ "$NAMESPACES" = "*" ] || helm_args+=(--set "watchNamespaces={$(echo $NAMESPACES | tr ' ' ,)}")
# (helm's notes on stderr, such as the chart's crds/ link, only when it fails.)
role=$("$HELM" "${helm_args[@]}" 2>"$NODES_STATE/helm.err") \
  || { cat "$NODES_STATE/helm.err" >&2; die "helm template of the chart's ClusterRole failed"; }
rm -f "$NODES_STATE/helm.err"
{
  echo "$role"
  cat <<EOF
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: $RBAC_NAME
  labels: {app.kubernetes.io/managed-by: blockcopy-cluster-nodes}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: $RBAC_NAME}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "$AGENT_GROUP"}
EOF
} | "${ADMIN[@]}" apply -f - >/dev/null

# ---------------------------------------------------------------- nodes
# Nodes beyond NODES (an earlier, larger bring-up) go first.
surplus=()
for dir in "$NODES_STATE"/"$PREFIX"-node-*/; do
  [ -d "$dir" ] || continue
  name=$(basename "$dir")
  [ "${name##*-}" -le "$COUNT" ] 2>/dev/null || surplus+=("$name")
done
if [ "${#surplus[@]}" -gt 0 ]; then
  log "removing nodes beyond NODES=$COUNT: ${surplus[*]}"
  flock -u 9
  BLOCKCOPY_STATE_DIR="$STATE" "$HACK/cluster-nodes-down.sh" "${surplus[@]}"
  flock 9
fi

# write_owned FILE: stdin into FILE (replaced only when it changed), owned by the node's user.
write_owned() {
  cat >"$1.tmp"
  chown "$NODE_UID:$NODE_GID" "$1.tmp"
  replace_if_changed "$1.tmp" "$1" || true
}

session_ok() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }

# Each node's user, files, daemon and Node object; the daemons start side by side, then the
# agents do (each waits for its daemon: the agent connects at once).
new_daemons=()
for i in $(seq 1 "$COUNT"); do
  name="$PREFIX-node-$i"
  node_vars "$name"

  # The user, its runtime dir (libvirt's sockets) and its images dir.
  if ! getent passwd "$name" >/dev/null; then
    mkdir -p "$HOMES"
    useradd --system --user-group --create-home --home-dir "$HOMES/$name" \
      --shell /usr/sbin/nologin --comment "blockcopy test node $name (hack/cluster-nodes.sh)" "$name"
    log "created user $name"
  fi
  node_vars "$name"   # now with its UID
  install -d -o "$NODE_UID" -g "$NODE_GID" -m 0755 "$NODE_HOME"
  claim_user "$name"
  install -d -o "$NODE_UID" -g "$NODE_GID" -m 0700 "/run/user/$NODE_UID"
  install -d -m 0755 "$IMAGES_ROOT"
  install -d -o "$NODE_UID" -g "$NODE_GID" -m 0750 "$IMAGES_DIR"
  # Its QEMU opens files there: every parent must be traversable by the user.
  as_user test -w "$IMAGES_DIR" -a -x "$IMAGES_DIR" \
    || die "user $name cannot write $IMAGES_DIR (a parent directory not traversable?)"
  mkdir -p "$NODES_STATE/$name"

  # Its libvirt session daemon, started here (not by a client's autostart, which would give
  # it --timeout=120: it would exit when idle). Through a link named $LIBVIRTD_BIN, so that
  # its process name is not the system daemon's (`pgrep -x libvirtd` finds root's alone).
  install -d -o "$NODE_UID" -g "$NODE_GID" -m 0700 "$NODE_HOME/.config" \
    "$NODE_HOME/.config/libvirt" "$NODE_HOME/bin"
  ln -sfn "$(command -v libvirtd)" "$NODE_HOME/bin/$LIBVIRTD_BIN"
  write_owned "$LIBVIRTD_CONF" <<EOF
# libvirtd of simulated node $name (hack/cluster-nodes.sh), a session daemon: the defaults,
# started with --config pointing here (which is how the scripts recognise this process).
EOF
  # QEMU's own log straight to a file: no session virtlogd per node (one process fewer,
  # and none that `pgrep -x virtlogd` could take for the system's).
  write_owned "$NODE_HOME/.config/libvirt/qemu.conf" <<EOF
# QEMU driver of simulated node $name (hack/cluster-nodes.sh)
stdio_handler = "file"
EOF
  pid=$(pid_of "$RUN/$name.libvirtd.pid" "$LIBVIRTD_MATCH")
  [ -n "$pid" ] || pid=$(find_ours "$RUN/$name.libvirtd.pid" "$LIBVIRTD_MATCH")
  if [ -n "$pid" ] && ! wait_for 30 "$pid" session_ok; then
    log "libvirtd of $name (pid $pid) does not answer; restarting it"
    stop_pid "libvirtd of $name" "$pid"; rm -f "$RUN/$name.libvirtd.pid"; pid=
  fi
  if [ -z "$pid" ]; then
    # A daemon someone's client started (with --timeout) holds the user's pid file.
    other=$(cat "/run/user/$NODE_UID/libvirt/libvirtd.pid" 2>/dev/null || true)
    if [[ "$other" =~ ^[0-9]+$ ]] && [ "$(stat -c %u "/proc/$other" 2>/dev/null)" = "$NODE_UID" ] \
       && [[ "$(cat "/proc/$other/comm" 2>/dev/null)" == *libvirtd ]]; then
      log "replacing the autostarted libvirtd of $name (pid $other)"
      stop_pid "libvirtd of $name" "$other"
    fi
    log "starting libvirtd of $name (uid $NODE_UID)"
    start_bg "$name.libvirtd" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$NODE_HOME" \
      USER="$name" LOGNAME="$name" XDG_RUNTIME_DIR="/run/user/$NODE_UID" \
      setpriv --reuid="$NODE_UID" --regid="$NODE_GID" --init-groups \
      "$NODE_HOME/bin/$LIBVIRTD_BIN" --config "$LIBVIRTD_CONF"
    new_daemons+=("$name")
  fi

  # Its Node object: created once; labels and taint (re)set like hack/cluster-node.sh does
  # (an apply would replace spec.taints, dropping those kube-controller-manager added).
  if ! "${ADMIN[@]}" get node "$name" >/dev/null 2>&1; then
    "${ADMIN[@]}" create -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $name
spec:
  taints:
  - {key: $TAINT_KEY, value: "true", effect: NoSchedule}
EOF
  fi
  "${ADMIN[@]}" label node "$name" --overwrite "${NODE_LABELS[@]}" >/dev/null
  "${ADMIN[@]}" taint node "$name" "$TAINT_KEY=true:NoSchedule" --overwrite >/dev/null

  # Its agent's identity: a client certificate of its own, in the agents' group.
  client_cert "$AGENT_CERT" "/O=$AGENT_GROUP/CN=$AGENT_GROUP:$name"
  kubeconfig_for "$NODES_STATE/$name/agent.kubeconfig" "$AGENT_CERT"
done
for name in "${new_daemons[@]}"; do
  node_vars "$name"
  pid=$(cat "$RUN/$name.libvirtd.pid")
  if ! wait_for 60 "$pid" session_ok; then
    tail -n 20 "$LOGS/$name.libvirtd.log" >&2 || true
    die "libvirtd of $name does not answer at $URI (log: $LOGS/$name.libvirtd.log)"
  fi
done
for i in $(seq 1 "$COUNT"); do launch_agent "$PREFIX-node-$i"; done
for i in $(seq 1 "$COUNT"); do await_agent "$PREFIX-node-$i"; done

# ---------------------------------------------------------------- cluster-wide part
# The plan controller, once the nodes and their agents are up: its rights are exactly the
# chart's controller ClusterRole (the ClusterRole document of templates/controller.yaml),
# bound to the group of its client certificate. hack/cluster-nodes-down.sh stops it first.
helm_args=(template "$CONTROLLER_RBAC" "$REPO/charts/blockcopy-operator"
           --set "fullnameOverride=$CONTROLLER_RBAC" --show-only templates/controller.yaml)
# shellcheck disable=SC2086 # one word per namespace, joined with commas
[ "$NAMESPACES" = "*" ] || helm_args+=(--set "watchNamespaces={$(echo $NAMESPACES | tr ' ' ,)}")
controller_role=$("$HELM" "${helm_args[@]}" 2>"$NODES_STATE/helm.err") \
  || { cat "$NODES_STATE/helm.err" >&2; die "helm template of the chart's controller failed"; }
rm -f "$NODES_STATE/helm.err"
{
  # Its ClusterRole alone (the file also holds the chart's ServiceAccount and Deployment).
  echo "$controller_role" | awk 'BEGIN { RS = "\n---\n" } /\nkind: ClusterRole\n/ { print "---"; print }'
  cat <<EOF
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: $CONTROLLER_RBAC
  labels: {app.kubernetes.io/managed-by: blockcopy-cluster-nodes}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: $CONTROLLER_RBAC-controller}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "$CONTROLLER_GROUP"}
EOF
} | "${ADMIN[@]}" apply -f - >/dev/null
client_cert "$CONTROLLER_CERT" "/O=$CONTROLLER_GROUP/CN=$CONTROLLER_GROUP:controller"
kubeconfig_for "$NODES_STATE/controller.kubeconfig" "$CONTROLLER_CERT"
start_controller

# ---------------------------------------------------------------- nodes.json
entries="" nl=$'\n'
for i in $(seq 1 "$COUNT"); do
  node_vars "$PREFIX-node-$i"
  entries+="${entries:+,$nl}$(node_json)"
done
printf '[\n%s\n]\n' "$entries" >"$STATE/nodes.json.tmp"
mv "$STATE/nodes.json.tmp" "$STATE/nodes.json"

cat <<EOF
$COUNT nodes up in $((SECONDS - start)) s ($STATE/nodes.json):
$(for i in $(seq 1 "$COUNT"); do node_vars "$PREFIX-node-$i"; echo "  $NODE_NAME  $URI  $IMAGES_DIR"; done)
  kubectl get nodes -l blockcopy.dev/test-node-group=$PREFIX-nodes -L topology.blockcopy.dev/rack
  virsh -c '$URI' list --all
Agents watch: $NAMESPACES; logs: $LOGS/<node>.agent.log
Tear down with: $HACK/cluster-nodes-down.sh (hack/cluster-down.sh does it too)
EOF
