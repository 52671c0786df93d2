#!/usr/bin/env bash
# Turns the local environment of hack/cluster-up.sh (etcd, kube-apiserver,
# kube-controller-manager, libvirtd) into a one-node cluster that runs pods:
#
#   kube-scheduler and kubelet  built from the same Go modules as the control plane
#                               (hack/build-kube.sh, cached by version)
#   containerd (CRI) + runc     Debian's packages, started with a config of their own under
#                               $STATE/node (no system containerd is touched)
#   pause image                 pause.c of the same Kubernetes release, compiled static and
#                               packed with buildah (no registry is reachable here)
#   agent image                 localhost/blockcopy-operator:dev from `make image`, imported
#                               into containerd so that imagePullPolicy IfNotPresent finds it
#   registry                    containerd pulls 127.0.0.1:$BLOCKCOPY_REGISTRY_PORT/... from the
#                               local registry of hack/registry.sh over plain HTTP
#
# The node is this machine, named after its host name (which must resolve to a loopback
# address: the API server reaches the kubelet by that name, and the kubelet listens on
# 127.0.0.1 only). It is TAINTED blockcopy.dev/test-node=true:NoSchedule and labelled
# blockcopy.dev/test-node=true: nothing lands on it unless it tolerates the taint, so the
# releases other tests install with the chart's defaults never start pods here.
#
#   hack/cluster-node.sh                 bring the node up (idempotent: about 2 s when up)
#   hack/cluster-node.sh import IMAGE... import buildah images into the node's containerd
#   hack/cluster-node-down.sh            tear it down (hack/cluster-down.sh calls it)
#
# Environment: BLOCKCOPY_STATE_DIR, BLOCKCOPY_CACHE_DIR, BLOCKCOPY_API_PORT (as cluster-up.sh),
# KUBE_VERSION, BLOCKCOPY_NODE_NAME (default: the host name), BLOCKCOPY_NODE_IP (default: the
# address of the default route's interface), BLOCKCOPY_KUBELET_PORT (10250),
# BLOCKCOPY_SCHEDULER_PORT (16259), BLOCKCOPY_NODE_IMAGES (localhost/blockcopy-operator:dev).
#
# Host changes, all undone by hack/cluster-node-down.sh: the mount that holds
# /var/lib/libvirt/images is made shared when it is private (hosts without systemd): the
# chart mounts its allowed roots with mountPropagation HostToContainer, which the runtime
# refuses on a private mount (systemd hosts have every mount shared already); the kubelet
# creates cgroups under /sys/fs/cgroup/*/kubepods.
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/env.sh
source "$HACK/lib/env.sh"   # REPO CACHE STATE API_PORT PKI RUN LOGS NODE_NAME NODE SOCK CTR REGISTRY_ADDRESS
SCHED_PORT=${BLOCKCOPY_SCHEDULER_PORT:-16259}
KUBELET_PORT=${BLOCKCOPY_KUBELET_PORT:-10250}
KUBELET_HEALTHZ_PORT=${BLOCKCOPY_KUBELET_HEALTHZ_PORT:-10248}
# Unset: the dev image; empty: none (the release tests pull theirs from the local registry).
NODE_IMAGES=${BLOCKCOPY_NODE_IMAGES-localhost/blockcopy-operator:dev}
SHARED_PATHS=${BLOCKCOPY_NODE_SHARED_PATHS:-/var/lib/libvirt/images}
TAINT_KEY=blockcopy.dev/test-node
BUILDAH=(buildah --storage-driver vfs)

log() { echo "[cluster-node] $*" >&2; }
die() { echo "[cluster-node] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (containerd, kubelet, cgroups, mounts)"
[ -s "$STATE/kubeconfig" ] && [ -s "$PKI/ca.key" ] \
  || die "no local control plane in $STATE: run hack/cluster-up.sh (make cluster) first"
for tool in containerd runc ctr buildah gcc findmnt openssl; do
  command -v "$tool" >/dev/null || die "$tool missing: run hack/install-system-deps.sh"
done
[ -x /usr/lib/cni/bridge ] || die "CNI plugins missing: run hack/install-system-deps.sh"
mkdir -p "$NODE" "$RUN" "$LOGS"
ADMIN=("$STATE/bin/kubectl" --kubeconfig "$STATE/kubeconfig")
[ -x "$STATE/bin/kubectl" ] || ADMIN=(kubectl --kubeconfig "$STATE/kubeconfig")

# ---------------------------------------------------------------- helpers
source "$HACK/lib/processes.sh"
# write_kubeconfig, replace_if_changed, client_cert, kubeconfig_for (need $PKI, $API_PORT)
source "$HACK/lib/kubeconfig.sh"

containerd_ok() { "${CTR[@]}" version >/dev/null 2>&1; }

# import_image NAME: the buildah image NAME (built by hack/build-image.sh when missing) into
# the node's containerd, under the same name; skipped when containerd has this very build.
import_image() {
  local name=$1 id marker tar
  id=$("${BUILDAH[@]}" images --no-trunc --format '{{.ID}}' "$name" 2>/dev/null | sed -n 1p || true)
  if [ -z "$id" ]; then
    [[ "$name" == localhost/blockcopy-operator:* ]] || die "image $name not found in buildah's storage"
    log "$name not built yet: hack/build-image.sh"
    IMAGE="$name" BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/build-image.sh" >&2
    id=$("${BUILDAH[@]}" images --no-trunc --format '{{.ID}}' "$name" | sed -n 1p)
  fi
  mkdir -p "$NODE/images"
  marker="$NODE/images/$(echo "$name" | tr '/:' '__').id"
  if [ "$(cat "$marker" 2>/dev/null)" = "$id" ] \
     && "${CTR[@]}" images ls -q "name==$name" | grep -x "$name" >/dev/null; then
    return 0
  fi
  local start=$SECONDS
  tar="$NODE/images/import.tar"
  rm -f "$tar"
  # By ID, named on the way out: a concurrent build that moves the tag cannot slip in.
  "${BUILDAH[@]}" push --quiet "$id" "docker-archive:$tar:$name" >/dev/null
  "${CTR[@]}" images import "$tar" >/dev/null
  rm -f "$tar"
  "${CTR[@]}" images ls -q "name==$name" | grep -x "$name" >/dev/null \
    || die "containerd does not list $name after the import"
  echo "$id" >"$marker"
  id=${id#sha256:}
  log "imported $name (${id:0:12}) into containerd in $((SECONDS - start)) s"
  prune_replaced
}

# prune_replaced: the runtime keeps a replaced build under its ID (sha256:...) after a new
# import took its name; each is a few hundred MB. Drop those no name and no container uses.
prune_replaced() {
  local named used ref digest
  named=$("${CTR[@]}" images ls | awk 'NR > 1 && $1 !~ /^sha256:/ {print $3}')
  used=$("${CTR[@]}" containers ls | awk 'NR > 1 {print $2}')
  while read -r ref digest; do
    grep -qxF "$digest" <<<"$named" && continue
    grep -qxF "$ref" <<<"$used" && continue
    "${CTR[@]}" images rm "$ref" >/dev/null && log "removed the replaced image ${ref:7:12}"
  done < <("${CTR[@]}" images ls | awk 'NR > 1 && $1 ~ /^sha256:/ {print $1, $3}')
}

if [ "${1:-}" = import ]; then
  shift
  containerd_ok || die "the node's containerd is not running: run $0 first"
  for image in "$@"; do import_image "$image"; done
  exit 0
fi

# One bring-up at a time per state dir (its own lock: cluster-up.sh holds $STATE/.lock).
exec 9>"$NODE/.lock"
flock 9

# ---------------------------------------------------------------- binaries
KUBE_BIN=$(BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/build-kube.sh" kube-scheduler kubelet)
SCHEDULER="$KUBE_BIN/kube-scheduler"
KUBELET="$KUBE_BIN/kubelet"
KUBE_VERSION=$(basename "$(dirname "$KUBE_BIN")")   # v1.37.2

# The node's address: the kubelet refuses a loopback node IP. The API server dials the node
# by its Hostname address first (its default --kubelet-preferred-address-types), so the name
# must resolve to where the kubelet listens: 127.0.0.1.
NODE_IP=${BLOCKCOPY_NODE_IP:-$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')}
[ -n "$NODE_IP" ] || die "cannot find this machine's address (set BLOCKCOPY_NODE_IP)"
resolved=$(getent ahostsv4 "$NODE_NAME" | awk 'NR==1{print $1}')
[[ "$resolved" == 127.* ]] || die "node name $NODE_NAME resolves to '${resolved:-nothing}', not a \
loopback address: add '127.0.0.1 $NODE_NAME' to /etc/hosts or set BLOCKCOPY_NODE_NAME"

# ---------------------------------------------------------------- pause image
# The sandbox image, from pause.c of the same release (in the Go module cache already).
# shellcheck source=go-env.sh
source "$HACK/go-env.sh"
PAUSE_IMAGE="localhost/pause:$KUBE_VERSION"
PAUSE_BIN="$CACHE/pause/$KUBE_VERSION/pause"
if [ ! -x "$PAUSE_BIN" ]; then
  src=$(cd "$HACK/kube" && GOFLAGS=-mod=mod "$GO" mod download -json "k8s.io/kubernetes@$KUBE_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
  [ -s "$src/build/pause/linux/pause.c" ] || die "no build/pause/linux/pause.c in $src"
  mkdir -p "$(dirname "$PAUSE_BIN")"
  gcc -Os -Wall -static -DVERSION="$KUBE_VERSION" -o "$PAUSE_BIN.tmp" "$src/build/pause/linux/pause.c"
  strip "$PAUSE_BIN.tmp"
  mv "$PAUSE_BIN.tmp" "$PAUSE_BIN"
  log "compiled $PAUSE_BIN from $src/build/pause/linux/pause.c"
fi
if ! "${BUILDAH[@]}" inspect --type image "$PAUSE_IMAGE" >/dev/null 2>&1; then
  ctr=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" copy "$ctr" "$PAUSE_BIN" /pause >/dev/null
  "${BUILDAH[@]}" config --os linux --arch "$(dpkg --print-architecture)" \
    --entrypoint '["/pause"]' --user 65535:65535 \
    --label org.opencontainers.image.source="k8s.io/kubernetes@$KUBE_VERSION build/pause" "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$PAUSE_IMAGE" >/dev/null
  log "made $PAUSE_IMAGE"
fi

# ---------------------------------------------------------------- mount propagation
# The chart mounts its allowed roots with mountPropagation HostToContainer; the runtime
# refuses that unless the host mount holding the path is shared or slave.
for path in $SHARED_PATHS; do
  mkdir -p "$path"
  mnt=$(findmnt -n -o TARGET --target "$path")
  prop=$(findmnt -n -o PROPAGATION --target "$path")
  case "$prop" in
    shared*|*slave*) ;;
    *)
      log "making mount $mnt shared (it was $prop): mountPropagation HostToContainer of $path needs it"
      mount --make-shared "$mnt"
      grep -qxF "$mnt" "$NODE/made-shared" 2>/dev/null || echo "$mnt" >>"$NODE/made-shared"
      ;;
  esac
done

# ---------------------------------------------------------------- containerd
mkdir -p "$NODE/containerd" "$NODE/cni/net.d"
# CAP_SYS_RESOURCE is bit 24 of the capability sets.
if (( (16#$(awk '/^CapEff:/{print $2}' /proc/self/status) >> 24) & 1 )); then
  RESTRICT_OOM=false KUBELET_OOM_SCORE_ADJ=-999
else
  RESTRICT_OOM=true KUBELET_OOM_SCORE_ADJ=0
fi
cat >"$NODE/containerd.toml.tmp" <<EOF
# containerd of the local one-node cluster (hack/cluster-node.sh); not the system's.
version = 2
root = "$NODE/containerd/root"
state = "$NODE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  disable_apparmor = true
  enable_selinux = false
  # Without CAP_SYS_RESOURCE (this sandbox's bounding set lacks it) no process may lower its
  # oom_score_adj: runc would fail to set the kubelet's -998 for sandboxes ("failed to update
  # /proc/self/oom_score_adj: Permission denied"). Clamp to containerd's own value instead.
  restrict_oom_score_adj = $RESTRICT_OOM
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE/cni/net.d"
  # Registry hosts: certs.d/HOST:PORT/hosts.toml (read at each pull, no restart needed).
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$NODE/containerd/certs.d"
EOF
# The local registry of hack/registry.sh (the release tests push there): plain HTTP on the
# loopback, so images released there are pulled like from any registry (no import).
mkdir -p "$NODE/containerd/certs.d/$REGISTRY_ADDRESS"
cat >"$NODE/containerd/certs.d/$REGISTRY_ADDRESS/hosts.toml.tmp" <<EOF
# hack/cluster-node.sh: the local registry of hack/registry.sh, plain HTTP.
server = "http://$REGISTRY_ADDRESS"
[host."http://$REGISTRY_ADDRESS"]
  capabilities = ["pull", "resolve"]
EOF
replace_if_changed "$NODE/containerd/certs.d/$REGISTRY_ADDRESS/hosts.toml.tmp" \
  "$NODE/containerd/certs.d/$REGISTRY_ADDRESS/hosts.toml" || true
config_changed=0
replace_if_changed "$NODE/containerd.toml.tmp" "$NODE/containerd.toml" && config_changed=1
[ "$RESTRICT_OOM" = false ] || [ "$config_changed" = 0 ] \
  || log "no CAP_SYS_RESOURCE here: OOM score adjustments are clamped to 0 (restrict_oom_score_adj)"

# Pod network for pods without hostNetwork (the agent uses the host's): a bridge on this
# node only, no masquerading, no Service routing (there is no kube-proxy). Instantiated only
# when such a pod starts; its presence is what makes the runtime report NetworkReady.
cat >"$NODE/cni/net.d/10-blockcopy-node.conflist.tmp" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "blockcopy-node",
  "plugins": [
    {"type": "bridge", "bridge": "bcnode0", "isGateway": true, "ipMasq": false,
     "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$NODE/cni/ipam",
              "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "loopback"}
  ]
}
EOF
replace_if_changed "$NODE/cni/net.d/10-blockcopy-node.conflist.tmp" \
  "$NODE/cni/net.d/10-blockcopy-node.conflist" || true

CONTAINERD_PID=$(pid_of "$RUN/containerd.pid" containerd)
[ -n "$CONTAINERD_PID" ] || CONTAINERD_PID=$(find_ours "$RUN/containerd.pid" \
  "containerd --config $NODE/containerd.toml")
if [ -n "$CONTAINERD_PID" ] && { [ "$config_changed" = 1 ] || ! wait_for 15 "$CONTAINERD_PID" containerd_ok; }; then
  log "restarting containerd (pid $CONTAINERD_PID): new config, or not answering"
  stop_pid containerd "$CONTAINERD_PID"; rm -f "$RUN/containerd.pid"; CONTAINERD_PID=
fi
if [ -z "$CONTAINERD_PID" ]; then
  log "starting containerd $(containerd --version | awk '{print $3}') (socket $SOCK)"
  start_bg containerd containerd --config "$NODE/containerd.toml"
  CONTAINERD_PID=$(cat "$RUN/containerd.pid")
  if ! wait_for 30 "$CONTAINERD_PID" containerd_ok; then
    tail -n 30 "$LOGS/containerd.log" >&2 || true
    die "containerd did not answer within 30 s (log: $LOGS/containerd.log)"
  fi
fi

# ---------------------------------------------------------------- images
import_image "$PAUSE_IMAGE"
for image in $NODE_IMAGES; do import_image "$image"; done

# ---------------------------------------------------------------- identities
# Client certificates from the local CA (the API server trusts it: --client-ca-file), so
# nothing needs the API server restarted: the kubelet is system:node:NAME (group
# system:nodes), the scheduler system:kube-scheduler (bound by the bootstrap RBAC policy).
client_cert "kubelet-$NODE_NAME" "/O=system:nodes/CN=system:node:$NODE_NAME"
client_cert kube-scheduler "/CN=system:kube-scheduler"
kubeconfig_for "$NODE/kubelet.kubeconfig" "kubelet-$NODE_NAME"
kubeconfig_for "$NODE/scheduler.kubeconfig" kube-scheduler
# The API server authorizes with RBAC only (no Node authorizer): the kubelet gets the
# system:node role, bound to its user alone.
"${ADMIN[@]}" apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: blockcopy-local:node:$NODE_NAME
  labels: {app.kubernetes.io/managed-by: blockcopy-cluster-node}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:node}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:node:$NODE_NAME"}
EOF

# ---------------------------------------------------------------- kube-scheduler
sched_healthy() {
  [ "$(curl -sk --max-time 3 "https://127.0.0.1:$SCHED_PORT/healthz" 2>/dev/null)" = ok ]
}
SCHED_PID=$(pid_of "$RUN/kube-scheduler.pid" kube-scheduler)
[ -n "$SCHED_PID" ] || SCHED_PID=$(find_ours "$RUN/kube-scheduler.pid" \
  "kube-scheduler .*--kubeconfig=$NODE/scheduler.kubeconfig")
if [ -n "$SCHED_PID" ] && { running_other_binary "$SCHED_PID" "$SCHEDULER" \
                            || ! wait_for 30 "$SCHED_PID" sched_healthy; }; then
  log "replacing kube-scheduler (pid $SCHED_PID): another build, or not answering"
  stop_pid kube-scheduler "$SCHED_PID"; rm -f "$RUN/kube-scheduler.pid"; SCHED_PID=
fi
if [ -z "$SCHED_PID" ]; then
  ! port_busy "$SCHED_PORT" || die "port $SCHED_PORT is used by another process (see BLOCKCOPY_SCHEDULER_PORT)"
  log "starting kube-scheduler $KUBE_VERSION"
  start_bg kube-scheduler "$SCHEDULER" \
    --kubeconfig="$NODE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$NODE/scheduler.kubeconfig" \
    --authorization-kubeconfig="$NODE/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" \
    --cert-dir="$NODE/scheduler-certs" --leader-elect=false
  SCHED_PID=$(cat "$RUN/kube-scheduler.pid")
  if ! wait_for 60 "$SCHED_PID" sched_healthy; then
    tail -n 30 "$LOGS/kube-scheduler.log" >&2 || true
    die "kube-scheduler not healthy after 60 s (log: $LOGS/kube-scheduler.log)"
  fi
fi

# ---------------------------------------------------------------- kubelet
cat >"$NODE/kubelet.yaml.tmp" <<EOF
# kubelet of the local one-node cluster (hack/cluster-node.sh).
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$SOCK
# No systemd here: cgroupfs; and this machine has cgroup v1 hierarchies only.
cgroupDriver: cgroupfs
failCgroupV1: false
# Loopback only: the API server reaches it by the node name (which resolves to 127.0.0.1)
# without a client certificate, hence anonymous access, allowed to everything.
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: AlwaysAllow}
registerNode: true
registerWithTaints:
- {key: $TAINT_KEY, value: "true", effect: NoSchedule}
podLogsDir: $NODE/pod-logs
volumePluginDir: $NODE/volume-plugins
resolvConf: /etc/resolv.conf
failSwapOn: false
# A machine shared with other work: no evictions or image garbage collection because its
# disk fills up (the agent image is imported, not pullable).
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 20
oomScoreAdj: $KUBELET_OOM_SCORE_ADJ
EOF
kubelet_config_changed=0
replace_if_changed "$NODE/kubelet.yaml.tmp" "$NODE/kubelet.yaml" && kubelet_config_changed=1
kubelet_healthy() {
  [ "$(curl -s --max-time 3 "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz" 2>/dev/null)" = ok ]
}
KUBELET_PID=$(pid_of "$RUN/kubelet.pid" kubelet)
[ -n "$KUBELET_PID" ] || KUBELET_PID=$(find_ours "$RUN/kubelet.pid" \
  "kubelet .*--config=$NODE/kubelet.yaml")
if [ -n "$KUBELET_PID" ] && { [ "$kubelet_config_changed" = 1 ] || [ "$config_changed" = 1 ] \
    || running_other_binary "$KUBELET_PID" "$KUBELET" || ! wait_for 30 "$KUBELET_PID" kubelet_healthy; }; then
  log "restarting kubelet (pid $KUBELET_PID): new config or build, or not answering"
  stop_pid kubelet "$KUBELET_PID"; rm -f "$RUN/kubelet.pid"; KUBELET_PID=
fi
if [ -z "$KUBELET_PID" ]; then
  ! port_busy "$KUBELET_PORT" || die "port $KUBELET_PORT is used by another process (see BLOCKCOPY_KUBELET_PORT)"
  log "starting kubelet $KUBE_VERSION as node $NODE_NAME ($NODE_IP)"
  mkdir -p "$NODE/kubelet" "$NODE/pod-logs" "$NODE/volume-plugins"
  start_bg kubelet "$KUBELET" \
    --config="$NODE/kubelet.yaml" \
    --kubeconfig="$NODE/kubelet.kubeconfig" \
    --root-dir="$NODE/kubelet" --cert-dir="$NODE/kubelet-pki" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    --node-labels="$TAINT_KEY=true"
  KUBELET_PID=$(cat "$RUN/kubelet.pid")
  if ! wait_for 60 "$KUBELET_PID" kubelet_healthy; then
    tail -n 40 "$LOGS/kubelet.log" >&2 || true
    die "kubelet not healthy after 60 s (log: $LOGS/kubelet.log)"
  fi
fi

# The taint and label, also on a Node object that existed before (registerWithTaints and
# --node-labels act only when the kubelet creates it).
deadline=$((SECONDS + 60))
until "${ADMIN[@]}" get node "$NODE_NAME" >/dev/null 2>&1; do
  [ "$SECONDS" -lt "$deadline" ] || die "node $NODE_NAME not registered after 60 s (log: $LOGS/kubelet.log)"
  sleep 1
done
"${ADMIN[@]}" taint node "$NODE_NAME" "$TAINT_KEY=true:NoSchedule" --overwrite >/dev/null
"${ADMIN[@]}" label node "$NODE_NAME" "$TAINT_KEY=true" --overwrite >/dev/null
if ! "${ADMIN[@]}" wait node "$NODE_NAME" --for=condition=Ready --timeout=120s >/dev/null; then
  "${ADMIN[@]}" describe node "$NODE_NAME" >&2 || true
  tail -n 40 "$LOGS/kubelet.log" >&2 || true
  die "node $NODE_NAME not Ready after 120 s (log: $LOGS/kubelet.log)"
fi

cat <<EOF
Node $NODE_NAME is Ready ($NODE_IP; kubelet $KUBE_VERSION, containerd, runc; state: $NODE).
  Tainted $TAINT_KEY=true:NoSchedule: pods need
    tolerations: [{key: $TAINT_KEY, operator: Exists, effect: NoSchedule}]
    nodeSelector: {$TAINT_KEY: "true"}
  Images: $PAUSE_IMAGE $NODE_IMAGES
  ctr --address $SOCK -n k8s.io images ls
Tear down with: $HACK/cluster-node-down.sh (hack/cluster-down.sh does it too)
EOF
