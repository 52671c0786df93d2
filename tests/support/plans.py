"""BlockCopyPlans in the e2e tests: creating, reading and deleting plans, the nodes' disk
inventories (published by the agents; where this checkout's agents do not publish them yet,
the test publishes them itself from the nodes' libvirt, in the same shape), and a sampler of the
plan's children (how many are active, cluster-wide and per node)."""

from __future__ import annotations

import datetime as dt
import pathlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from typing import Any

import kubernetes
import libvirt
from kubernetes.client.exceptions import ApiException

from blockcopy.model.api import GROUP, PLURAL, VERSION
from blockcopy.model.inventory import INVENTORY_KIND, INVENTORY_PLURAL
from blockcopy.model.plan import PLAN_KIND, PLAN_LABEL, PLAN_PLURAL
from support.cluster import Kubectl, apply_crd
from support.images import qemu_img_compare
from support.libvirt_probes import live_disk_source
from support.multinode import Node
from support.paths import PLAN_CRD
from support.vms import VM, destroy_vm
from support.waits import wait_for

# Children not yet Mirrored (none may exceed the plan's limits).
ALLOWED_ROOT = pathlib.Path("/var/lib/libvirt/images")  # the simulated nodes' allowed root
ACTIVE = (None, "Pending", "Queued", "Preparing", "Copying")


class Plans:
    def __init__(self, api: kubernetes.client.CustomObjectsApi, namespace: str):
        self.api, self.namespace = api, namespace
        self.made: list[str] = []

    def create(self, name: str, spec: dict[str, Any]) -> str:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": PLAN_KIND,
                "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}
        self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLAN_PLURAL,
                                                 body)
        self.made.append(name)
        return name

    def get(self, name: str) -> dict[str, Any]:
        got: Any = self.api.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLAN_PLURAL, name)
        return dict(got)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def wait_phase(self, name: str, *phases: str, timeout: float = 300) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") in phases else None
        found: dict[str, Any] = wait_for(reached, timeout,
                                         what=f"plan {name} in phase {'/'.join(phases)}")
        return found

    def children(self, name: str) -> list[dict[str, Any]]:
        listed: Any = self.api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, label_selector=f"{PLAN_LABEL}={name}")
        return list(listed.get("items") or [])

    def delete(self, name: str, *, wait: float = 120) -> None:
        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace,
                                                     PLAN_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        if wait:
            wait_for(lambda: not self.exists(name) and not self.children(name), wait,
                     what=f"plan {name} and its children gone")

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True


class Sampler:
    """Every ``period`` seconds: the plan's children not yet Mirrored, in all and per node
    (the most seen of each), and the plan's own status.active."""

    def __init__(self, plans: Plans, name: str, period: float = 0.2):
        self.plans, self.name, self.period = plans, name, period
        self.max_total = 0
        self.max_per_node: dict[str, int] = {}
        self.max_status_active = 0
        self.samples = 0
        self.copying_seen = 0  # samples with a child Copying
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler:{name}", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                children = self.plans.children(self.name)
                active: dict[str, int] = {}
                for child in children:
                    phase = (child.get("status") or {}).get("phase")
                    if phase in ACTIVE:
                        node = child["spec"]["nodeName"]
                        active[node] = active.get(node, 0) + 1
                if any((c.get("status") or {}).get("phase") == "Copying" for c in children):
                    self.copying_seen += 1
                self.max_total = max(self.max_total, sum(active.values()))
                for node, n in active.items():
                    self.max_per_node[node] = max(self.max_per_node.get(node, 0), n)
                status = self.plans.status(self.name) if self.plans.exists(self.name) else {}
                self.max_status_active = max(self.max_status_active, status.get("active") or 0)
                self.samples += 1
            except Exception as exc:  # reported by the test, not lost in the thread
                self.error = exc
            self._stop.wait(self.period)


# ------------------------------------------------------------------ inventories


def apply_crds(kubectl: Kubectl) -> None:
    """This checkout's CRDs (BlockCopy with spec.createDirectories, the plan's), again right
    before a plan starts: on the shared API server, a test of another checkout may have
    applied an older BlockCopy CRD, whose schema would prune the children's new field."""
    apply_crd(kubectl)
    kubectl("apply", "-f", str(PLAN_CRD))
    kubectl("wait", "--for=condition=Established", "crd/blockcopyplans.blockcopy.dev",
            "--timeout=60s")


def plans_on(api: kubernetes.client.CustomObjectsApi, nodes: list[Node], kubectl: Kubectl
             ) -> Iterator[Plans]:
    """A module's plans fixture: the CRDs applied, plans made in the first node's namespace,
    each deleted at the end (its children with it)."""
    apply_crds(kubectl)
    namespace = nodes[0].namespaces[0] if nodes[0].namespaces else "default"
    made = Plans(api, namespace)
    yield made
    for name in made.made:
        made.delete(name, wait=180)


def assert_moved(vms: Iterable[VM], src_prefix: str, dst_prefix: str) -> None:
    """Every disk of ``vms`` runs on its copy below ``dst_prefix`` (the live XML), whose guest
    view equals the old image's below ``src_prefix`` (qemu-img compare)."""
    for vm in vms:
        for target, chain in vm.disk_chains.items():
            dest = dst_prefix + chain[0][len(src_prefix):]
            assert live_disk_source(vm, target) == dest
            result = qemu_img_compare(chain[0], dest)
            assert result.returncode == 0, result.stdout + result.stderr


def destroy_vms_named(vms: list[VM], prefix: str) -> None:
    """Destroy (and drop from ``vms``) those whose name starts with ``prefix``."""
    for vm in list(vms):
        if vm.name.startswith(prefix):
            destroy_vm(vm)
            vms.remove(vm)


def _domain_entry(dom: libvirt.virDomain) -> dict[str, Any]:
    root = ET.fromstring(dom.XMLDesc(0))
    disks = []
    for disk in root.findall("./devices/disk[@device='disk']"):
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        if target is None:
            continue
        kind = disk.get("type", "file")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev")
        entry: dict[str, Any] = {"target": target.get("dev"), "type": kind,
                                 "backingChain": []}
        if path:
            entry["source"] = path
        if driver is not None and driver.get("type"):
            entry["format"] = driver.get("type")
        if dom.isActive() and path:
            capacity, allocation, _ = dom.blockInfo(target.get("dev"))
            entry["virtualSize"], entry["allocation"] = capacity, allocation
        disks.append(entry)
    state = "Running" if dom.isActive() else "Stopped"
    return {"name": dom.name(), "uuid": dom.UUIDString(), "state": state, "disks": disks}


def inventory_status(node: Node) -> dict[str, Any]:
    """The node's inventory as the agents publish it, read from its libvirt."""
    with libvirt.open(node.libvirt_uri) as conn:
        domains = sorted((_domain_entry(d) for d in conn.listAllDomains()),
                         key=lambda d: (d["name"], d["uuid"]))
    return {"nodeName": node.name,
            "updated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "domainCount": len(domains), "truncated": False, "domains": domains}


def inventory_domains(api: kubernetes.client.CustomObjectsApi, node: str) -> set[str]:
    try:
        obj: Any = api.get_cluster_custom_object(GROUP, VERSION, INVENTORY_PLURAL, node)
    except ApiException as exc:
        if exc.status == 404:
            return set()
        raise
    updated = (obj.get("status") or {}).get("updated")
    return {d.get("name") for d in (obj.get("status") or {}).get("domains") or []
            if updated}


def ensure_inventories(api: kubernetes.client.CustomObjectsApi, nodes: Iterable[Node],
                       domains: dict[str, set[str]], *, agent_wait: float = 10) -> list[str]:
    """Until each node's DiskInventory lists its ``domains``: the agents' publisher when it
    runs, else (after ``agent_wait`` s) the test publishes it from the node's libvirt. Returns
    the nodes whose inventory the test wrote (the caller deletes those objects)."""
    deadline = time.monotonic() + agent_wait
    pending = {n.name: n for n in nodes if not domains.get(n.name, set())
               <= inventory_domains(api, n.name)}
    while pending and time.monotonic() < deadline:
        time.sleep(1)
        pending = {k: n for k, n in pending.items()
                   if not domains.get(k, set()) <= inventory_domains(api, k)}
    written = []
    for name, node in pending.items():
        status = inventory_status(node)
        try:
            api.create_cluster_custom_object(GROUP, VERSION, INVENTORY_PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": INVENTORY_KIND,
                "metadata": {"name": name}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        api.patch_cluster_custom_object_status(GROUP, VERSION, INVENTORY_PLURAL, name,
                                               {"status": status})
        written.append(name)
    return written


def delete_inventories(api: kubernetes.client.CustomObjectsApi, names: Iterable[str]) -> None:
    for name in names:
        try:
            api.delete_cluster_custom_object(GROUP, VERSION, INVENTORY_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
