"""The agent's two external clients, as interfaces: the hypervisor (libvirt) and the
Kubernetes API. The agent's logic (claimer, follower, recorder) knows only these; the real
clients live in ``hypervisor`` and ``kube``, fakes for orchestration tests in
``tests/support/fakes.py``. Also the plain data and errors that cross these seams.
Pure: no I/O, no framework imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from blockcopy.api import Flag
from blockcopy.observation import DiskState, JobEvent

# ------------------------------------------------------------------ hypervisor


class HypervisorError(Exception):
    """libvirt refused or failed an operation; ``str()`` is libvirt's message."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class HypervisorUnavailable(HypervisorError):
    """libvirtd cannot be reached (the connection is down); worth retrying later."""


@dataclasses.dataclass(frozen=True)
class CopyRequest:
    """One virDomainBlockCopy call."""

    domain: str
    target: str
    dest: str
    format: str
    flags: frozenset[Flag]
    block_device: bool = False  # the destination is a block device (<disk type='block'>)
    bandwidth: int = 0  # bytes/s, 0 = unlimited
    granularity: int = 0
    buf_size: int = 0


JobListener = Callable[[str, str, JobEvent], None]  # (domain uuid, disk target, event)


class Hypervisor(Protocol):
    """What the agent asks of libvirt. Every call may raise HypervisorUnavailable (cannot
    reach libvirtd) or HypervisorError (libvirt refused, with its message)."""

    def add_listener(self, listener: JobListener) -> None:
        """Call ``listener`` on the event loop for every block-job event."""

    async def version(self) -> str: ...

    async def has_running_domain(self, domain: str) -> bool: ...

    async def observe(self, domain: str, disk: str) -> DiskState:
        """The domain and the disk (by target or source path) as libvirt shows them now."""

    async def start_copy(self, request: CopyRequest) -> None: ...

    async def pivot(self, domain: str, target: str) -> None:
        """Switch the VM to the mirror (refused by libvirt before it is ready)."""

    async def cancel(self, domain: str, target: str) -> None:
        """End the job, the VM stays on its source."""

    async def set_bandwidth(self, domain: str, target: str, bandwidth: int) -> None: ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------ Kubernetes API


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

    def unclaimed(self, namespace: str | None, *, timeout: int) -> AsyncIterator[dict[str, Any]]:
        """List, then watch for ``timeout`` seconds, the objects without the claim label
        (filtered by the API server). Raises on API errors."""
