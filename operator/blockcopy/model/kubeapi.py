"""What the agent and the plan controller ask of the Kubernetes API, as interfaces (the real
clients are ``adapters.kube`` and ``adapters.plan_kube``, fakes in ``tests/support/fakes.py``),
and the plain data and errors that cross that seam. Pure: no I/O, no framework imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Protocol


class FieldSelectorUnsupported(Exception):
    """The API server refused a field selector on spec.nodeName (no selectableFields)."""


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    """What an Event needs to name its object."""

    namespace: str
    name: str
    uid: str | None = None
    api_version: str | None = None
    kind: str | None = None
    resource_version: str | None = None

    @classmethod
    def of(cls, body: Any) -> ObjectRef:
        meta = body["metadata"]
        return cls(namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid"),
                   api_version=body.get("apiVersion"), kind=body.get("kind"),
                   resource_version=meta.get("resourceVersion"))


class StatusStore(Protocol):
    async def patch_status(self, namespace: str, name: str, status: dict[str, Any], *,
                           resource_version: str | None = None) -> bool:
        """Merge-patch status; with ``resource_version``, only if nobody wrote since
        (False when the object changed or is gone)."""


class Kube(StatusStore, Protocol):
    """What the agent asks of the Kubernetes API."""

    async def post_event(self, ref: ObjectRef, *, type: str, reason: str,
                         message: str) -> None:
        """A core/v1 Event about the object; failures are logged, never raised."""

    async def claim(self, namespace: str, name: str, *, node: str, resource_version: str,
                    finalizers: list[str]) -> bool:
        """Label the object as this node's and set its finalizers, unless it changed since
        ``resource_version``."""

    async def list_namespace(self, namespace: str) -> list[dict[str, Any]]:
        """Every BlockCopy of a namespace, as the API server has them now (a disk group's
        members, including those no agent follows yet). Raises on API errors."""

    def unclaimed(self, namespace: str | None, *, node_name: str | None, timeout: int
                  ) -> AsyncIterator[dict[str, Any]]:
        """List, then watch for ``timeout`` seconds, the objects without the claim label whose
        spec.nodeName is ``node_name`` ("": none set), both filtered by the API server; None:
        whatever spec.nodeName. Raises FieldSelectorUnsupported when the server refuses the
        field selector (Kubernetes < 1.32), other exceptions on API errors."""

    async def publish_inventory(self, name: str, status: dict[str, Any]) -> None:
        """Write the status of the DiskInventory ``name`` (cluster-scoped), creating the
        object first if it is missing. Raises on API errors."""

class PlanKube(Protocol):
    """What the plan controller asks of the Kubernetes API. Listing calls raise on API
    errors; writes return False when the object is gone (or, for creates, already there)."""

    async def inventories(self) -> list[dict[str, Any]]:
        """Every DiskInventory object (cluster-scoped, one per node)."""

    async def node_labels(self) -> dict[str, dict[str, str]]:
        """Every Node's labels, by node name."""

    async def children(self, namespace: str, plan: str) -> list[dict[str, Any]]:
        """The BlockCopies of the namespace labelled as the plan's."""

    async def copies_of_domain(self, domain: str) -> list[dict[str, Any]]:
        """Every BlockCopy (all namespaces) whose spec.domain is ``domain``."""

    async def create_copy(self, namespace: str, body: dict[str, Any]) -> bool: ...

    async def patch_copy(self, namespace: str, name: str, patch: dict[str, Any]) -> bool: ...

    async def delete_copy(self, namespace: str, name: str) -> bool: ...

    async def patch_plan_status(self, namespace: str, name: str,
                                status: dict[str, Any]) -> bool: ...

    async def post_event(self, ref: ObjectRef, *, type: str, reason: str,
                         message: str) -> None: ...
