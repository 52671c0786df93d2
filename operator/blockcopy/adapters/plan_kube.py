"""The Kubernetes API client of the plan controller (``ports.PlanKube``): the nodes'
inventories and labels, a plan's children, the BlockCopies of a domain, child writes and the
plan's status. The kubernetes client library blocks, so each call runs in a worker thread.
No decisions here."""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from blockcopy.adapters.kube import KubeClient
from blockcopy.model.api import GROUP, PLURAL, VERSION
from blockcopy.model.inventory import INVENTORY_PLURAL
from blockcopy.model.plan import PLAN_LABEL, PLAN_PLURAL

# Every request is bounded: a call stuck on a connection the API server dropped would hold a
# worker thread (and its plan's round) forever.
TIMEOUT = 30


class PlanKubeClient:
    def __init__(self) -> None:
        self._api = kubernetes.client.CustomObjectsApi()
        self._core = kubernetes.client.CoreV1Api()
        self._events = KubeClient()

    async def inventories(self) -> list[dict[str, Any]]:
        try:
            listed: Any = await asyncio.to_thread(
                self._api.list_cluster_custom_object, GROUP, VERSION, INVENTORY_PLURAL,
                _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:  # the DiskInventory CRD is not installed: no inventory
                return []
            raise
        return list(listed.get("items") or [])

    async def node_labels(self) -> dict[str, dict[str, str]]:
        nodes: Any = await asyncio.to_thread(self._core.list_node, _request_timeout=TIMEOUT)
        return {n.metadata.name: dict(n.metadata.labels or {}) for n in nodes.items}

    async def children(self, namespace: str, plan: str) -> list[dict[str, Any]]:
        listed: Any = await asyncio.to_thread(
            lambda: self._api.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, label_selector=f"{PLAN_LABEL}={plan}",
                _request_timeout=TIMEOUT))
        return list(listed.get("items") or [])

    async def copies_of_domain(self, domain: str) -> list[dict[str, Any]]:
        try:
            listed: Any = await asyncio.to_thread(
                lambda: self._api.list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, field_selector=f"spec.domain={domain}",
                    _request_timeout=TIMEOUT))
        except ApiException as exc:
            if exc.status != 400:
                raise
            # A server without the CRD's selectableFields (< 1.32): filtered here.
            listed = await asyncio.to_thread(
                self._api.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                _request_timeout=TIMEOUT)
        return [o for o in listed.get("items") or []
                if (o.get("spec") or {}).get("domain") == domain]

    async def create_copy(self, namespace: str, body: dict[str, Any]) -> bool:
        try:
            await asyncio.to_thread(self._api.create_namespaced_custom_object,
                                    GROUP, VERSION, namespace, PLURAL, body,
                                    _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 409:  # made in an earlier round (its watch event not seen yet)
                return False
            raise
        return True

    async def patch_copy(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        try:
            await asyncio.to_thread(self._api.patch_namespaced_custom_object,
                                    GROUP, VERSION, namespace, PLURAL, name, patch,
                                    _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def delete_copy(self, namespace: str, name: str) -> bool:
        try:
            await asyncio.to_thread(self._api.delete_namespaced_custom_object,
                                    GROUP, VERSION, namespace, PLURAL, name,
                                    _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_plan_status(self, namespace: str, name: str,
                                status: dict[str, Any]) -> bool:
        # status.disks and status.nodes are whole lists: a merge patch replaces them.
        try:
            await asyncio.to_thread(self._api.patch_namespaced_custom_object_status,
                                    GROUP, VERSION, namespace, PLAN_PLURAL, name,
                                    {"status": status}, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def post_event(self, ref: Any, *, type: str, reason: str, message: str) -> None:
        await self._events.post_event(ref, type=type, reason=reason, message=message)
