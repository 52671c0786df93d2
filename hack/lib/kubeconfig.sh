# Identities of the local environment's components (hack/cluster-node.sh's kubelet and
# scheduler, hack/cluster-nodes.sh's agents): client certificates from the local CA, which
# the API server trusts (--client-ca-file), and kubeconfigs that use them. One copy, sourced.
# The caller sets $PKI (the state dir's pki/) and $API_PORT. Runs in its shell, under
# set -euo pipefail.
# shellcheck shell=bash

# replace_if_changed TMP DEST: moves TMP over DEST when they differ; true when it did.
replace_if_changed() {
  if cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
  mv "$1" "$2"
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

# kubeconfig_for FILE CERT: a kubeconfig with that client certificate.
kubeconfig_for() {
  cat >"$1.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: blockcopy-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: $2
  context: {cluster: blockcopy-local, user: $2}
current-context: $2
EOF
  chmod 600 "$1.tmp"
  replace_if_changed "$1.tmp" "$1" || true
}
