#!/usr/bin/env bash
# Brings up a local, real environment for blockcopy-operator on a machine with no container
# engine and no init system: etcd, kube-apiserver and kube-controller-manager of a current
# Kubernetes release (built from Go modules by hack/build-kube.sh and hack/build-etcd.sh,
# cached by version) as plain background processes, plus the system libvirtd. See
# ../shared/reference/local-kube-apiserver.md for the background.
#
#   KUBE_VERSION   Kubernetes release to run (default: hack/kube/go.mod's, the newest)
#
# Idempotent: a component whose pid file names a live process that answers is left alone, so
# running this again while everything is up changes nothing and returns in about a second.
# Tear down with hack/cluster-down.sh.
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/env.sh
source "$HACK/lib/env.sh"   # REPO CACHE STATE API_PORT PKI RUN LOGS
ETCD_PORT=${BLOCKCOPY_ETCD_PORT:-23790}
ETCD_PEER_PORT=${BLOCKCOPY_ETCD_PEER_PORT:-23800}
KCM_PORT=${BLOCKCOPY_KCM_PORT:-16257}
ADMIN_TOKEN=admin-token
VIRSH=(virsh -c qemu:///system)

log() { echo "[cluster-up] $*" >&2; }
die() { echo "[cluster-up] ERROR: $*" >&2; exit 1; }

mkdir -p "$PKI" "$RUN" "$LOGS"
# One cluster-up/cluster-down at a time per state dir.
exec 9>"$STATE/.lock"
flock 9

# ---------------------------------------------------------------- binaries
# The build scripts print the cached paths (and build only what is missing).
KUBE_BIN=$(BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/build-kube.sh" kube-apiserver \
           kube-controller-manager kubectl)
APISERVER="$KUBE_BIN/kube-apiserver"
CONTROLLER_MANAGER="$KUBE_BIN/kube-controller-manager"
ETCD=$(BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/build-etcd.sh")
# kubectl of the server's release (linked into $CACHE/bin, which Makefile puts in PATH), helm.
BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/install-kube-tools.sh"
KUBECTL="$STATE/bin/kubectl"

# ---------------------------------------------------------------- helpers
source "$HACK/lib/processes.sh"
source "$HACK/lib/kubeconfig.sh"   # write_kubeconfig, replace_if_changed

etcd_healthy() {
  curl -s --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep '"health":"true"' >/dev/null
}

api_ready() {
  [ "$(curl -s --max-time 3 --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
        "https://127.0.0.1:$API_PORT/readyz" 2>/dev/null)" = ok ]
}

# ---------------------------------------------------------------- PKI
# Each piece is made only when missing, so a re-run never invalidates issued tokens or the
# kubeconfig someone already copied.
if [ ! -s "$PKI/ca.crt" ] || [ ! -s "$PKI/ca.key" ]; then
  log "creating CA"
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -subj "/CN=blockcopy-local-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  rm -f "$PKI/apiserver.crt"   # a new CA invalidates the old serving cert
fi
if [ ! -s "$PKI/apiserver.crt" ] || [ ! -s "$PKI/apiserver.key" ]; then
  log "creating apiserver serving certificate"
  # Go clients ignore the CN: the SANs must name what kubeconfig/curl dial (127.0.0.1).
  # The in-cluster names are there too in case a client uses the service IP/name.
  cat >"$PKI/apiserver.ext" <<'EOF'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
EOF
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/apiserver.key" \
    -out "$PKI/apiserver.csr" -subj "/CN=kube-apiserver" 2>/dev/null
  openssl x509 -req -sha256 -days 3650 -in "$PKI/apiserver.csr" \
    -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -extfile "$PKI/apiserver.ext" -out "$PKI/apiserver.crt" 2>/dev/null
  rm -f "$PKI/apiserver.csr"
fi
if [ ! -s "$PKI/sa.key" ] || [ ! -s "$PKI/sa.pub" ]; then
  log "creating service-account signing key"
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
fi
# Tests may append users to this file, so it is created once and never rewritten.
if [ ! -f "$PKI/tokens.csv" ]; then
  echo "$ADMIN_TOKEN,admin,admin,\"system:masters\"" >"$PKI/tokens.csv"
fi
# kube-controller-manager's own identity (bound by the API server's bootstrap RBAC); its
# controllers then act with ServiceAccount tokens of their own, as in kubeadm clusters.
if ! grep -q '^kcm-token,' "$PKI/tokens.csv"; then
  echo "kcm-token,system:kube-controller-manager,kcm" >>"$PKI/tokens.csv"
fi
chmod 600 "$PKI"/*.key "$PKI/tokens.csv"

# Audit log of what happens to BlockCopies and their Events (who, which verb, which object):
# `make bench` counts the agent's requests per copy from it. Nothing else is logged.
cat >"$STATE/audit-policy.yaml.tmp" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    resources:
      - group: blockcopy.dev
      - group: ""
        resources: [events]
  - level: None
EOF
replace_if_changed "$STATE/audit-policy.yaml.tmp" "$STATE/audit-policy.yaml" || true

# ---------------------------------------------------------------- etcd
ETCD_PID=$(pid_of "$RUN/etcd.pid" etcd)
[ -n "$ETCD_PID" ] || ETCD_PID=$(find_ours "$RUN/etcd.pid" "etcd .*--data-dir $STATE/etcd( |\$)")
if [ -n "$ETCD_PID" ] && running_other_binary "$ETCD_PID" "$ETCD"; then
  log "etcd (pid $ETCD_PID) runs another build; replacing it"
  stop_pid etcd "$ETCD_PID"; rm -f "$RUN/etcd.pid"; ETCD_PID=
fi
if [ -n "$ETCD_PID" ] && ! wait_for 15 "$ETCD_PID" etcd_healthy; then
  log "etcd (pid $ETCD_PID) does not answer; restarting it"
  stop_pid etcd "$ETCD_PID"; rm -f "$RUN/etcd.pid"; ETCD_PID=
fi
if [ -z "$ETCD_PID" ]; then
  for port in "$ETCD_PORT" "$ETCD_PEER_PORT"; do
    ! port_busy "$port" || die "port $port is used by another process (see BLOCKCOPY_ETCD_PORT/BLOCKCOPY_ETCD_PEER_PORT)"
  done
  # The data is throwaway test state; a data dir of another etcd release (an older checkout
  # ran Debian's 3.4) cannot always be upgraded in place, so it is started afresh.
  if [ -d "$STATE/etcd" ] && [ "$(cat "$STATE/etcd.binary" 2>/dev/null)" != "$ETCD" ]; then
    log "removing etcd data of another etcd build"
    rm -rf "$STATE/etcd"
  fi
  echo "$ETCD" >"$STATE/etcd.binary"
  log "starting etcd $("$ETCD" --version | sed -n 's/^etcd Version: //p') on 127.0.0.1:$ETCD_PORT"
  # Everything on 127.0.0.1 and non-default ports so a system etcd (2379/2380) cannot clash.
  start_bg etcd "$ETCD" --name blockcopy-local --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "blockcopy-local=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "" --quota-backend-bytes 2147483648
  ETCD_PID=$(cat "$RUN/etcd.pid")
  if ! wait_for 30 "$ETCD_PID" etcd_healthy; then
    tail -n 30 "$LOGS/etcd.log" >&2 || true
    kill -0 "$ETCD_PID" 2>/dev/null || die "etcd exited (log: $LOGS/etcd.log)"
    die "etcd not healthy after 30 s (log: $LOGS/etcd.log)"
  fi
fi

# ---------------------------------------------------------------- kube-apiserver
API_PID=$(pid_of "$RUN/kube-apiserver.pid" kube-apiserver)
[ -n "$API_PID" ] || API_PID=$(find_ours "$RUN/kube-apiserver.pid" \
  "kube-apiserver .*--token-auth-file=$PKI/tokens.csv")
if [ -n "$API_PID" ] && running_other_binary "$API_PID" "$APISERVER"; then
  log "kube-apiserver (pid $API_PID) runs another release; replacing it"
  stop_pid kube-apiserver "$API_PID"; rm -f "$RUN/kube-apiserver.pid"; API_PID=
fi
if [ -n "$API_PID" ] && ! wait_for 30 "$API_PID" api_ready; then
  log "kube-apiserver (pid $API_PID) does not answer; restarting it"
  stop_pid kube-apiserver "$API_PID"; rm -f "$RUN/kube-apiserver.pid"; API_PID=
fi
if [ -z "$API_PID" ]; then
  ! port_busy "$API_PORT" || die "port $API_PORT is used by another process (see BLOCKCOPY_API_PORT)"
  log "starting kube-apiserver $("$APISERVER" --version) on https://127.0.0.1:$API_PORT"
  # RBAC + static tokens: admin-token is system:masters, extra tokens without groups let tests
  # exercise RBAC for real. The SA key/issuer enable ServiceAccount tokens (TokenRequest).
  # Loopback only: current releases refuse to publish a loopback address as the `kubernetes`
  # Service's endpoint, so that reconciler is off (nothing here routes Service IPs anyway).
  start_bg kube-apiserver "$APISERVER" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --secure-port="$API_PORT" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --cert-dir="$PKI/apiserver-certs" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --token-auth-file="$PKI/tokens.csv" \
    --authorization-mode=RBAC \
    --service-cluster-ip-range=10.0.0.0/24 \
    --endpoint-reconciler-type=none \
    --audit-policy-file="$STATE/audit-policy.yaml" \
    --audit-log-path="$LOGS/audit.log" --audit-log-maxsize=200 --audit-log-maxbackup=1
  API_PID=$(cat "$RUN/kube-apiserver.pid")
  if ! wait_for 90 "$API_PID" api_ready; then
    tail -n 40 "$LOGS/kube-apiserver.log" >&2 || true
    kill -0 "$API_PID" 2>/dev/null || die "kube-apiserver exited (log: $LOGS/kube-apiserver.log)"
    die "kube-apiserver not ready after 90 s (log: $LOGS/kube-apiserver.log)"
  fi
fi

# ---------------------------------------------------------------- kubeconfig
# Left untouched (and its mtime too) by a re-run, as long as nothing in it changed.
write_kubeconfig "$STATE/kubeconfig" "https://127.0.0.1:$API_PORT" "$PKI/ca.crt" admin \
  --token "$ADMIN_TOKEN" --context blockcopy-local

# ---------------------------------------------------------------- kube-controller-manager
# Namespace deletion, garbage collection, ServiceAccount tokens, DaemonSet bookkeeping...
write_kubeconfig "$STATE/kcm.kubeconfig" "https://127.0.0.1:$API_PORT" "$PKI/ca.crt" kcm \
  --token kcm-token
kcm_healthy() {
  [ "$(curl -sk --max-time 3 "https://127.0.0.1:$KCM_PORT/healthz" 2>/dev/null)" = ok ]
}
KCM_PID=$(pid_of "$RUN/kube-controller-manager.pid" kube-controller-manager)
[ -n "$KCM_PID" ] || KCM_PID=$(find_ours "$RUN/kube-controller-manager.pid" \
  "kube-controller-manager .*--kubeconfig=$STATE/kcm.kubeconfig")
if [ -n "$KCM_PID" ] && running_other_binary "$KCM_PID" "$CONTROLLER_MANAGER"; then
  log "kube-controller-manager (pid $KCM_PID) runs another release; replacing it"
  stop_pid kube-controller-manager "$KCM_PID"; rm -f "$RUN/kube-controller-manager.pid"; KCM_PID=
fi
if [ -n "$KCM_PID" ] && ! wait_for 30 "$KCM_PID" kcm_healthy; then
  log "kube-controller-manager (pid $KCM_PID) does not answer; restarting it"
  stop_pid kube-controller-manager "$KCM_PID"; rm -f "$RUN/kube-controller-manager.pid"; KCM_PID=
fi
if [ -z "$KCM_PID" ]; then
  ! port_busy "$KCM_PORT" || die "port $KCM_PORT is used by another process (see BLOCKCOPY_KCM_PORT)"
  log "starting kube-controller-manager"
  start_bg kube-controller-manager "$CONTROLLER_MANAGER" \
    --kubeconfig="$STATE/kcm.kubeconfig" \
    --authentication-kubeconfig="$STATE/kcm.kubeconfig" \
    --authorization-kubeconfig="$STATE/kcm.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
    --cert-dir="$PKI/kcm-certs" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --service-cluster-ip-range=10.0.0.0/24
  KCM_PID=$(cat "$RUN/kube-controller-manager.pid")
  if ! wait_for 60 "$KCM_PID" kcm_healthy; then
    tail -n 40 "$LOGS/kube-controller-manager.log" >&2 || true
    kill -0 "$KCM_PID" 2>/dev/null || die "kube-controller-manager exited (log: $LOGS/kube-controller-manager.log)"
    die "kube-controller-manager not healthy after 60 s (log: $LOGS/kube-controller-manager.log)"
  fi
fi

# ---------------------------------------------------------------- libvirt
# No init system starts libvirtd here. Start what is missing (each daemon on its own: virtlogd
# may be alive while libvirtd is not), and leave a marker so cluster-down stops only what we
# started.
virsh_ok() { timeout 10 "${VIRSH[@]}" version >/dev/null 2>&1; }
# daemon_pid NAME: the pid in /run/NAME.pid if that process is alive and is NAME.
# A zombie (exited, not yet reaped by pid 1) is not alive.
not_zombie() { local st; st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) && [ "$st" != Z ]; }
daemon_pid() {
  local pid
  pid=$(cat "/run/$1.pid" 2>/dev/null || true)
  if [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] \
     && not_zombie "$pid"; then
    echo "$pid"
  fi
}
# any_running NAME: a live process of that exact name run by root (started by anyone),
# zombies aside. Root's only: the session daemons of hack/cluster-nodes.sh's users have the
# same names and are not the system's.
any_running() {
  local pid
  for pid in $(pgrep -x -u 0 "$1" || true); do not_zombie "$pid" && return 0; done
  return 1
}
# virtlogd too, even when libvirtd answers: QEMU's log goes through it, and a new domain
# does not start without it.
if [ -z "$(daemon_pid virtlogd)" ] && [ "$(id -u)" -eq 0 ] && ! any_running virtlogd; then
  log "starting virtlogd"
  virtlogd -d </dev/null >>"$LOGS/virtlogd.log" 2>&1 9>&-
  touch "$RUN/libvirt-started-by-us"
fi
if ! virsh_ok; then
  [ "$(id -u)" -eq 0 ] || die "libvirtd does not answer and starting it needs root"
  LIBVIRTD_PID=$(daemon_pid libvirtd)
  if [ -n "$LIBVIRTD_PID" ] && ! wait_for 30 "$LIBVIRTD_PID" virsh_ok; then
    log "libvirtd (pid $LIBVIRTD_PID) does not answer; restarting it"
    stop_pid libvirtd "$LIBVIRTD_PID"; LIBVIRTD_PID=
  fi
  if [ -z "$LIBVIRTD_PID" ]; then
    log "starting libvirtd"
    # libvirtd -d reuses /run/libvirtd.pid; it refuses to start while another instance holds it.
    libvirtd -d </dev/null >>"$LOGS/libvirtd.log" 2>&1 9>&-
    touch "$RUN/libvirt-started-by-us"
  fi
  deadline=$((SECONDS + 30))
  until virsh_ok; do
    [ "$SECONDS" -lt "$deadline" ] || die "libvirtd did not answer within 30 s (log: $LOGS/libvirtd.log)"
    sleep 0.5
  done
fi

# ---------------------------------------------------------------- done
cat <<EOF
Local environment is up (state: $STATE).
  export KUBECONFIG=$STATE/kubeconfig
  export PATH=$STATE/bin:\$PATH     # kubectl $("$KUBECTL" version --client | sed -n 's/Client Version: //p'), helm
  kubectl get ns
libvirt: virsh -c qemu:///system list --all
Tear down with: $HACK/cluster-down.sh
EOF
