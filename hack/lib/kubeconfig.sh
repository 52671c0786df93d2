# The local environment's identities, sourced: the one kubeconfig writer (cluster-up: the
# admin's and kube-controller-manager's; cluster-node: the kubelet's and kube-scheduler's;
# cluster-nodes: each simulated node's agent), client certificates from the local CA (the
# API server trusts it: --client-ca-file) and kubeconfigs that use them. client_cert and
# kubeconfig_for need $PKI (the state dir's pki/) and $API_PORT.
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

# client_cert NAME SUBJECT: $PKI/NAME.crt/.key, made once.
client_cert() {
  local name=$1 subject=$2
  [ -s "$PKI/$name.crt" ] && [ -s "$PKI/$name.key" ] \
    && [ "$(openssl x509 -noout -subject -nameopt compat -in "$PKI/$name.crt")" = "subject=$subject" ] \
    && return 0
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
    >"$PKI/$name.ext"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -out "$PKI/$name.csr" \
    -subj "$subject" 2>/dev/null
  openssl x509 -req -sha256 -days 3650 -in "$PKI/$name.csr" -CA "$PKI/ca.crt" \
    -CAkey "$PKI/ca.key" -set_serial "0x$(openssl rand -hex 16)" -extfile "$PKI/$name.ext" \
    -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
  chmod 600 "$PKI/$name.key"
}

# kubeconfig_for FILE NAME: a kubeconfig with the client certificate NAME ($PKI/NAME.crt).
kubeconfig_for() {
  write_kubeconfig "$1" "https://127.0.0.1:$API_PORT" "$PKI/ca.crt" "$2" \
    --cert "$PKI/$2.crt" --key "$PKI/$2.key"
}
