# The one kubeconfig writer of the local environment's scripts (cluster-up: the admin's and
# kube-controller-manager's; cluster-node: the kubelet's and kube-scheduler's), sourced.
# shellcheck shell=bash
set -o pipefail
# shellcheck source-path=SCRIPTDIR source=files.sh
source "$(dirname "${BASH_SOURCE[0]}")/files.sh"

# write_kubeconfig FILE SERVER CA USER (--token TOKEN | --cert CERT --key KEY) [--context NAME]
#   A kubeconfig for USER of the local cluster (cluster entry blockcopy-local) at SERVER
#   (https://127.0.0.1:PORT), trusting the CA certificate file CA, embedded
#   (certificate-authority-data: a copy of FILE works anywhere). USER authenticates with a
#   bearer TOKEN or with a client certificate and key (files, referred to by path). The
#   context is named NAME (default: USER) and is the current one. Mode 600; FILE is replaced
#   only when its content changes (a re-run leaves it and its mtime alone). Returns 0 when
#   FILE holds that kubeconfig, whether or not it changed; 2 on a wrong call.
write_kubeconfig() {
  [ $# -ge 4 ] || { echo "write_kubeconfig: FILE SERVER CA USER expected" >&2; return 2; }
  local file=$1 server=$2 ca=$3 user=$4 context=$4 token="" cert="" key="" credentials
  shift 4
  while [ $# -gt 0 ]; do
    case "$1" in
      --token|--cert|--key|--context)
        [ $# -ge 2 ] || { echo "write_kubeconfig: $1 needs a value" >&2; return 2; } ;;&
      --token) token=$2 ;;
      --cert) cert=$2 ;;
      --key) key=$2 ;;
      --context) context=$2 ;;
      *) echo "write_kubeconfig: unknown argument $1" >&2; return 2 ;;
    esac
    shift 2
  done
  if [ -n "$token" ] && [ -z "$cert$key" ]; then
    credentials="    token: $token"
  elif [ -z "$token" ] && [ -n "$cert" ] && [ -n "$key" ]; then
    credentials=$(printf '    client-certificate: %s\n    client-key: %s' "$cert" "$key")
  else
    echo "write_kubeconfig: either --token TOKEN or --cert CERT --key KEY" >&2
    return 2
  fi
  [ -s "$ca" ] || { echo "write_kubeconfig: no CA certificate $ca" >&2; return 2; }
  (umask 077 && cat >"$file.tmp" <<EOC
apiVersion: v1
kind: Config
clusters:
- name: blockcopy-local
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$ca")
users:
- name: $user
  user:
$credentials
contexts:
- name: $context
  context:
    cluster: blockcopy-local
    user: $user
current-context: $context
EOC
  )
  chmod 600 "$file.tmp"
  replace_if_changed "$file.tmp" "$file" || true
}
