# The local environment's settings that more than one of its scripts uses (cluster-up,
# cluster-down, cluster-node, cluster-node-down): one copy, sourced once HACK is set.
# Script-specific settings (the ports of the daemons each one starts) stay in the script.
# shellcheck shell=bash disable=SC2034  # used by the scripts that source it
set -o pipefail

REPO=$(dirname "$HACK")
CACHE=${BLOCKCOPY_CACHE_DIR:-/var/cache/blockcopy-operator}
STATE=${BLOCKCOPY_STATE_DIR:-$REPO/.local}
API_PORT=${BLOCKCOPY_API_PORT:-16443}
PKI="$STATE/pki"
RUN="$STATE/run"
LOGS="$STATE/log"
# The one-node cluster (cluster-node.sh): the node's name, its state and its containerd.
NODE_NAME=${BLOCKCOPY_NODE_NAME:-$(hostname)}
NODE="$STATE/node"
SOCK="$NODE/containerd/containerd.sock"
CTR=(ctr --address "$SOCK" --namespace k8s.io)
# The local OCI registry (hack/registry.sh): releases are pushed there in tests, and the
# node's containerd pulls from it over plain HTTP (hack/cluster-node.sh: certs.d/hosts.toml).
REGISTRY_PORT=${BLOCKCOPY_REGISTRY_PORT:-15000}
REGISTRY_ADDRESS="127.0.0.1:$REGISTRY_PORT"
