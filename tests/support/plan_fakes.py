"""FAKES for the plan controller's orchestration tests: ``ports.PlanKube`` in memory, with the
nodes' DiskInventory objects in the shape the agents publish them (status{nodeName, updated,
domainCount, truncated, domains: [{name, uuid, state, disks: [{target, type, source, format,
virtualSize, allocation, backingChain}]}]}), and a stand-in for the agents that moves the
children's phases. Never a substitute for the e2e tests on real parts."""

from __future__ import annotations

import copy
import datetime as dt
from typing import TYPE_CHECKING, Any

from blockcopy.model.api import GROUP, KIND, VERSION
from blockcopy.model.kubeapi import ObjectRef
from blockcopy.model.plan import PLAN_KIND, PLAN_LABEL
from support.fakes import RecordedEvent, merge_patch

if TYPE_CHECKING:
    from blockcopy.model.kubeapi import PlanKube

NOW = dt.datetime(2026, 12, 4, 5, 0, 0, tzinfo=dt.UTC)


def inventory(node: str, domains: list[dict[str, Any]], *,
              updated: dt.datetime = NOW) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DiskInventory",
            "metadata": {"name": node},
            "status": {"nodeName": node, "updated": updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "domainCount": len(domains), "truncated": False, "domains": domains}}


def domain(name: str, disks: dict[str, str], *, uuid: str | None = None,
           state: str = "Running", size: int = 1 << 20) -> dict[str, Any]:
    """A domain of an inventory; ``disks``: target -> source path."""
    return {"name": name, "uuid": uuid or f"uuid-{name}", "state": state,
            "disks": [{"target": t, "type": "file", "source": s, "format": "qcow2",
                       "virtualSize": size, "allocation": size // 2, "backingChain": []}
                      for t, s in disks.items()]}


def plan(name: str = "p", *, namespace: str = "ns", generation: int = 1,
         **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": PLAN_KIND,
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "generation": generation},
            "spec": {"source": {"pathPrefix": "/src"}, "destination": {"pathPrefix": "/dst"},
                     **spec}}
    return body


class FakePlanKube:
    def __init__(self) -> None:
        self.inventory: dict[str, dict[str, Any]] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.copies: dict[tuple[str, str], dict[str, Any]] = {}
        self.plans: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[RecordedEvent] = []
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.active_seen: list[int] = []  # after every create: active children in total
        self.inventory_lists = 0
        self.status_writes = 0

    def add_plan(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        self.plans[(meta["namespace"], meta["name"])] = body
        return body

    def add_copy(self, namespace: str, name: str, spec: dict[str, Any], *,
                 status: dict[str, Any] | None = None,
                 labels: dict[str, str] | None = None) -> None:
        self.copies[(namespace, name)] = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"namespace": namespace, "name": name, "labels": labels or {}},
            "spec": spec, "status": status or {}}

    def set_phase(self, name: str, phase: str, namespace: str = "ns", **status: Any) -> None:
        self.copies[(namespace, name)].setdefault("status", {}).update(phase=phase, **status)

    def children_of(self, plan: str, namespace: str = "ns") -> dict[str, dict[str, Any]]:
        return {n: b for (ns, n), b in self.copies.items()
                if ns == namespace and b["metadata"]["labels"].get(PLAN_LABEL) == plan}

    def active(self, node: str | None = None) -> int:
        return sum(1 for b in self.copies.values()
                   if b["metadata"]["labels"].get(PLAN_LABEL)
                   and (b.get("status") or {}).get("phase") in (None, "Pending", "Queued",
                                                               "Preparing", "Copying")
                   and (node is None or b["spec"]["nodeName"] == node))

    # ------------------------------------------------------------ ports.PlanKube

    async def inventories(self) -> list[dict[str, Any]]:
        self.inventory_lists += 1
        return [copy.deepcopy(i) for i in self.inventory.values()]

    async def node_labels(self) -> dict[str, dict[str, str]]:
        return copy.deepcopy(self.labels)

    async def children(self, namespace: str, plan: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(b) for b in self.children_of(plan, namespace).values()]

    async def copies_of_domain(self, domain: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(b) for b in self.copies.values() if b["spec"]["domain"] == domain]

    async def create_copy(self, namespace: str, body: dict[str, Any]) -> bool:
        key = (namespace, body["metadata"]["name"])
        if key in self.copies:
            return False
        self.copies[key] = copy.deepcopy(body)
        self.created.append(key[1])
        self.active_seen.append(self.active())
        return True

    async def patch_copy(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        if (namespace, name) not in self.copies:
            return False
        patched = merge_patch(self.copies[(namespace, name)], patch)
        spec = patched.get("spec") or {}
        if spec.get("pivot") is True and spec.get("abort") is True:  # the CRD's CEL rule
            raise ValueError(f"422 {name}: spec.pivot and spec.abort cannot both be true")
        self.copies[(namespace, name)] = patched
        return True

    async def delete_copy(self, namespace: str, name: str) -> bool:
        self.deleted.append(name)
        return self.copies.pop((namespace, name), None) is not None

    async def patch_plan_status(self, namespace: str, name: str,
                                status: dict[str, Any]) -> bool:
        body = self.plans.get((namespace, name))
        if body is None:
            return False
        self.status_writes += 1
        body["status"] = merge_patch(body.get("status") or {}, status)
        return True

    async def post_event(self, ref: ObjectRef, *, type: str, reason: str, message: str) -> None:
        self.events.append(RecordedEvent(ref.namespace, ref.name, type, reason, message))


if TYPE_CHECKING:
    _plan_kube: PlanKube = FakePlanKube()
