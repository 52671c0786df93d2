"""``kubectl blockcopy move`` from the node inventories (DiskInventory), without an API
server: a stand-in for the plugin's Cluster serves inventory objects as the API server
returns them, and the real Cluster's error mapping is fed the client's real ApiException
(missing CRD, missing object, forbidden). Against the real API server and agents:
tests/e2e/test_kubectl_plugin.py and tests/e2e/test_inventory.py."""

from __future__ import annotations

import json
from typing import Any

import kubernetes
import pytest
import yaml

from blockcopy.kubectl import errors, main
from blockcopy.kubectl.cluster import Cluster
from blockcopy.kubectl.errors import InventoryCannotTell
from blockcopy.model.inventory import (
    BackingImage,
    DiskType,
    DomainState,
    InventoryDisk,
    InventoryDomain,
    bounded,
)

UUID = "0b9ad1a2-56d4-4a4e-9c37-3d7a4f0c0001"


def inventory(node: str, *domains: InventoryDomain, truncated: bool = False) -> dict:
    status = bounded(node, "2026-12-04T05:00:00Z", domains).to_status()
    status["truncated"] = truncated or status["truncated"]
    return {"apiVersion": "blockcopy.dev/v1alpha1", "kind": "DiskInventory",
            "metadata": {"name": node}, "status": status}


def web(name: str = "web-1", uuid: str = UUID, state: DomainState = DomainState.RUNNING
        ) -> InventoryDomain:
    return InventoryDomain(name, uuid, state, (
        InventoryDisk("vda", DiskType.FILE, "/images/a/top.qcow2", "qcow2", 1 << 30, 1 << 20,
                      (BackingImage("/images/a/base.qcow2", "qcow2"),)),
        InventoryDisk("vdb", DiskType.BLOCK, "/dev/vg0/web-1-data", "raw", 1 << 30),
        InventoryDisk("vdc", DiskType.NETWORK, "nbd://10.0.0.5:10809/exp", "raw")))


class FakeCluster:
    """The plugin's Cluster with inventories instead of an API server (``objects`` for
    ``inventories``; ``refusal``: what reading them raises)."""

    objects: list[dict[str, Any]] = []
    refusal: InventoryCannotTell | None = None

    def __init__(self, kubeconfig: str | None, context: str | None):
        self.default_namespace = "default"

    def inventories(self, node: str | None) -> list[dict[str, Any]]:
        if self.refusal is not None:
            raise self.refusal
        return [o for o in self.objects if node is None or o["metadata"]["name"] == node]


@pytest.fixture
def cluster(monkeypatch) -> type[FakeCluster]:
    monkeypatch.setattr(main, "Cluster", FakeCluster)
    FakeCluster.objects, FakeCluster.refusal = [], None
    return FakeCluster


def move(*argv: str) -> list[str]:
    return ["move", *argv, "--to", "/fast", "-n", "vms", "--dry-run"]


def test_move_finds_the_vm_its_node_and_disks(cluster, capsys):
    cluster.objects = [inventory("hv-1", web("db-1", "u-2")), inventory("hv-2", web())]
    for ref in ("web-1", UUID.upper()):
        assert main.main(move(ref)) == errors.OK
        bodies = list(yaml.safe_load_all(capsys.readouterr().out))
        assert [(b["metadata"]["name"], b["spec"]["nodeName"], b["spec"]["domain"],
                 b["spec"]["disk"], b["spec"]["dest"]) for b in bodies] == [
            ("web-1-vda", "hv-2", "web-1", "vda", "/fast/top.qcow2"),
            ("web-1-vdb", "hv-2", "web-1", "vdb", "/fast/web-1-data"),
            ("web-1-vdc", "hv-2", "web-1", "vdc", "/fast/web-1-vdc.raw")]  # NBD: no file name


def test_a_name_on_two_nodes_needs_node(cluster, capsys):
    cluster.objects = [inventory("hv-1", web(uuid="u-1")), inventory("hv-2", web())]
    assert main.main(move("web-1")) == errors.USAGE
    assert "on several nodes (hv-1, hv-2): say which with --node" in capsys.readouterr().err
    assert main.main(move("web-1", "--node", "hv-1")) == errors.OK
    assert {b["spec"]["nodeName"] for b in yaml.safe_load_all(capsys.readouterr().out)} == \
        {"hv-1"}


def test_not_found_stopped_and_truncated(cluster, capsys):
    cluster.objects = [inventory("hv-1", web("off-1", "u-3", DomainState.STOPPED)),
                       inventory("hv-2", web("x", "u-4"), truncated=True)]
    assert main.main(move("web-9")) == errors.NOT_FOUND
    err = capsys.readouterr().err
    assert "no domain 'web-9' in the node inventory of 2 nodes" in err
    assert "inventory of hv-2 is truncated" in err and "name the disks with --disk" in err
    assert main.main(move("off-1")) == errors.NOT_FOUND
    assert "'off-1' on node 'hv-1' is stopped" in capsys.readouterr().err
    assert main.main(move("web-9", "--node", "hv-1")) == errors.NOT_FOUND
    assert "in the node inventory of node 'hv-1'" in capsys.readouterr().err


def test_named_disks_are_checked_against_the_inventory(cluster, capsys):
    cluster.objects = [inventory("hv-2", web())]
    argv = ["move", "web-1", "--to", "/fast", "--disk", "vdb", "--dry-run"]
    assert main.main(argv) == errors.OK  # no -n: the inventory is read
    (body,) = yaml.safe_load_all(capsys.readouterr().out)
    assert body["spec"]["nodeName"] == "hv-2" and body["spec"]["dest"] == "/fast/web-1-data"
    assert main.main(["move", "web-1", "--to", "/fast", "--disk", "vdz", "--dry-run"]) == \
        errors.NOT_FOUND
    assert "has no disk 'vdz' (its disks: vda, vdb, vdc)" in capsys.readouterr().err
    # Not readable: named disks still work, with a note; without --disk it is an error.
    cluster.refusal = InventoryCannotTell("listing the node inventories: forbidden: reading "
                                          "the node inventories needs the blockcopy-admin "
                                          "ClusterRole")
    assert main.main(argv) == errors.OK
    captured = capsys.readouterr()
    assert "blockcopy-admin" in captured.err and "named web-1-<disk>.qcow2" in captured.err
    assert "nodeName" not in yaml.safe_load(captured.out)["spec"]
    assert main.main(["move", "web-1", "--to", "/fast", "--dry-run"]) == errors.FAILURE
    err = capsys.readouterr().err
    assert "blockcopy-admin" in err and "name the disks with --disk" in err


def test_offline_dry_run_with_named_disks_reads_no_inventory(cluster, capsys):
    cluster.objects = [inventory("hv-2", web())]
    assert main.main(move("web-1", "--disk", "vda")) == errors.OK
    captured = capsys.readouterr()
    assert "were not read" in captured.err
    assert yaml.safe_load(captured.out)["spec"]["dest"] == "/fast/web-1-vda.qcow2"


# ------------------------------------------------------------------ the real Cluster's errors


class RefusingApi:
    """CustomObjectsApi that answers like an API server that refuses."""

    def __init__(self, status: int, message: str, items: list[dict] | None = None):
        self.status, self.message, self.items = status, message, items

    def _answer(self) -> dict:
        if self.items is not None:
            return {"items": self.items}
        exc = kubernetes.client.exceptions.ApiException(status=self.status, reason="x")
        exc.body = json.dumps({"message": self.message})
        raise exc

    def get_cluster_custom_object(self, *args: object) -> dict:
        return self._answer()

    def list_cluster_custom_object(self, *args: object) -> dict:
        return self._answer()


def real_cluster(api: RefusingApi) -> Cluster:
    cluster = object.__new__(Cluster)
    cluster._kubernetes, cluster.api, cluster.host = kubernetes, api, "https://x"  # type: ignore[assignment]
    return cluster


@pytest.mark.parametrize(("api", "node", "code", "message"), [
    (RefusingApi(404, "the server could not find the requested resource"), None,
     errors.FAILURE, "does not know node inventories (diskinventories.blockcopy.dev)"),
    (RefusingApi(404, 'diskinventories "hv-3" not found'), "hv-3", errors.NOT_FOUND,
     "node 'hv-3' has no node inventory (its agent is not running"),
    (RefusingApi(403, 'diskinventories.blockcopy.dev is forbidden: User "bob" cannot list'),
     None, errors.FAILURE, "User \"bob\" cannot list: reading the node inventories (they "
     "name every tenant's VMs) needs the blockcopy-admin ClusterRole"),
    (RefusingApi(200, "", items=[]), None, errors.FAILURE, "no node inventory in the API"),
])
def test_why_the_inventory_cannot_be_read(api, node, code, message):
    with pytest.raises(InventoryCannotTell) as raised:
        real_cluster(api).inventories(node)
    assert raised.value.code == code and message in str(raised.value), str(raised.value)
