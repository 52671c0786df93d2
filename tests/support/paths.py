"""Where things are: the repository, the local environment's state dir (BLOCKCOPY_STATE_DIR,
so that a second environment such as `make test-k8s-oldest` is found the same way) and the
binaries hack/install-kube-tools.sh links into it. One place, so no test retypes a path."""

from __future__ import annotations

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
HACK = ROOT / "hack"
CRDS = ROOT / "crds"  # every CRD of the API: BlockCopy, DiskInventory
CRD = CRDS / "blockcopy.yaml"
INVENTORY_CRD = CRDS / "diskinventory.yaml"
PLAN_CRD = CRDS / "blockcopyplan.yaml"
CHART = ROOT / "charts" / "blockcopy-operator"
EXAMPLES = ROOT / "examples"

STATE = pathlib.Path(os.environ.get("BLOCKCOPY_STATE_DIR", ROOT / ".local"))
KUBECONFIG = STATE / "kubeconfig"
CACHE = pathlib.Path(os.environ.get("BLOCKCOPY_CACHE_DIR", "/var/cache/blockcopy-operator"))
# The local server's release of kubectl, and helm (hack/install-kube-tools.sh links both here).
BIN = STATE / "bin"
KUBECTL = BIN / "kubectl"
HELM = BIN / "helm"
# The nodes of `make cluster-nodes` (hack/cluster-nodes.sh): [{"name", "libvirtUri",
# "imagesDir", ...}], one per libvirt session daemon; see support.multinode.
NODES_JSON = STATE / "nodes.json"
