"""The node inventory (``DiskInventory``, cluster-scoped, one object per node named after it):
the domains of a node's hypervisor and, for each of their disks, target, source, format,
sizes and backing chain. The agent publishes it (``blockcopy.agent.inventory``), the plugin
reads it (``kubectl blockcopy move``). Everything is in ``status``; the bounds below keep it
well inside etcd's object limit. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

INVENTORY_KIND = "DiskInventory"
INVENTORY_PLURAL = "diskinventories"

# Bounds (also the CRD schema's maxItems: tests/unit/test_inventory.py keeps them in step).
MAX_DOMAINS = 2000
MAX_DISKS = 64  # per domain
MAX_CHAIN = 64  # backing images per disk
MAX_STATUS_BYTES = 1024 * 1024  # the status as JSON; domains past it are cut

_E = TypeVar("_E", bound=enum.StrEnum)


class DomainState(enum.StrEnum):
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPED = "Stopped"
    OTHER = "Other"


class DiskType(enum.StrEnum):
    FILE = "file"
    BLOCK = "block"
    NETWORK = "network"
    VOLUME = "volume"


@dataclasses.dataclass(frozen=True)
class BackingImage:
    path: str
    format: str | None = None

    def to_status(self) -> dict[str, Any]:
        return _without_none({"path": self.path, "format": self.format})


@dataclasses.dataclass(frozen=True)
class InventoryDisk:
    target: str
    type: DiskType
    source: str | None = None  # path, or the NBD URI as spec.dest writes it; None: empty drive
    format: str | None = None
    virtual_size: int | None = None  # bytes, guest-visible
    allocation: int | None = None  # bytes the active image occupies
    backing_chain: tuple[BackingImage, ...] = ()  # below the active image, nearest first

    def to_status(self) -> dict[str, Any]:
        out = _without_none({"target": self.target, "type": str(self.type),
                             "source": self.source, "format": self.format,
                             "virtualSize": self.virtual_size, "allocation": self.allocation})
        out["backingChain"] = [b.to_status() for b in self.backing_chain]
        return out


@dataclasses.dataclass(frozen=True)
class InventoryDomain:
    name: str
    uuid: str
    state: DomainState
    disks: tuple[InventoryDisk, ...] = ()

    def to_status(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "state": str(self.state),
                "disks": [d.to_status() for d in self.disks]}

    def disk(self, target: str) -> InventoryDisk | None:
        return next((d for d in self.disks if d.target == target), None)


@dataclasses.dataclass(frozen=True)
class NodeInventory:
    node_name: str
    updated: str  # RFC 3339
    domains: tuple[InventoryDomain, ...] = ()
    domain_count: int = 0  # every domain of the node, those cut from ``domains`` too
    truncated: bool = False

    def to_status(self) -> dict[str, Any]:
        return {"nodeName": self.node_name, "updated": self.updated,
                "domainCount": self.domain_count, "truncated": self.truncated,
                "domains": [d.to_status() for d in self.domains]}

    def content(self) -> dict[str, Any]:
        """The status without ``updated``: what tells whether anything changed."""
        status = self.to_status()
        del status["updated"]
        return status

    def find(self, domain: str) -> InventoryDomain | None:
        """The domain named ``domain``, or whose UUID it is."""
        wanted = domain.lower()
        return next((d for d in self.domains
                     if d.name == domain or d.uuid.lower() == wanted), None)


def bounded(node_name: str, updated: str, domains: Iterable[InventoryDomain]) -> NodeInventory:
    """The inventory of ``domains`` (sorted by name), cut to the bounds: at most MAX_DOMAINS
    domains of MAX_DISKS disks with MAX_CHAIN backing images each, and no more domains than
    fit in MAX_STATUS_BYTES of JSON. ``truncated`` says whether anything was left out."""
    every = sorted(domains, key=lambda d: (d.name, d.uuid))
    truncated = False
    kept: list[InventoryDomain] = []
    size = _encoded_size(NodeInventory(node_name, updated, (), len(every), True).to_status())
    for domain in every:
        disks = domain.disks[:MAX_DISKS]
        cut = [dataclasses.replace(d, backing_chain=d.backing_chain[:MAX_CHAIN]) for d in disks]
        if len(disks) < len(domain.disks) or any(
                len(d.backing_chain) > MAX_CHAIN for d in domain.disks):
            truncated = True
        domain = dataclasses.replace(domain, disks=tuple(cut))
        size += _encoded_size(domain.to_status()) + 1  # and its comma
        if len(kept) >= MAX_DOMAINS or size > MAX_STATUS_BYTES:
            truncated = True
            break
        kept.append(domain)
    return NodeInventory(node_name, updated, tuple(kept), len(every), truncated)


def parse_inventory(status: Mapping[str, Any]) -> NodeInventory:
    """A DiskInventory's ``status`` as the API server returns it (tolerant: what is missing
    or malformed is left out, never raised)."""
    domains = []
    for raw in _dicts(status.get("domains")):
        name, uuid = raw.get("name"), raw.get("uuid")
        if not isinstance(name, str) or not isinstance(uuid, str):
            continue
        disks = []
        for d in _dicts(raw.get("disks")):
            target = d.get("target")
            if not isinstance(target, str):
                continue
            chain = tuple(BackingImage(b["path"], _str(b.get("format")))
                          for b in _dicts(d.get("backingChain"))
                          if isinstance(b.get("path"), str))
            disks.append(InventoryDisk(
                target=target, type=_enum(DiskType, d.get("type"), DiskType.FILE),
                source=_str(d.get("source")), format=_str(d.get("format")),
                virtual_size=_int(d.get("virtualSize")), allocation=_int(d.get("allocation")),
                backing_chain=chain))
        domains.append(InventoryDomain(
            name=name, uuid=uuid, state=_enum(DomainState, raw.get("state"), DomainState.OTHER),
            disks=tuple(disks)))
    count = _int(status.get("domainCount"))
    return NodeInventory(
        node_name=_str(status.get("nodeName")) or "", updated=_str(status.get("updated")) or "",
        domains=tuple(domains), domain_count=len(domains) if count is None else count,
        truncated=status.get("truncated") is True)


# ------------------------------------------------------------------ helpers


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _dicts(raw: object) -> list[Mapping[str, Any]]:
    return [x for x in raw if isinstance(x, Mapping)] if isinstance(raw, list) else []


def _str(raw: object) -> str | None:
    return raw if isinstance(raw, str) else None


def _int(raw: object) -> int | None:
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def _enum(kind: type[_E], raw: object, default: _E) -> _E:
    try:
        return kind(raw) if isinstance(raw, str) else default
    except ValueError:
        return default


def _encoded_size(value: object) -> int:
    """The length of ``value`` as compact JSON (strings counted in UTF-8 with their quotes,
    escapes not counted: the bound keeps a wide margin under etcd's 1.5 MiB)."""
    if isinstance(value, str):
        return len(value.encode()) + 2
    if isinstance(value, bool):
        return 5 if not value else 4
    if value is None:
        return 4
    if isinstance(value, int | float):
        return len(str(value))
    if isinstance(value, Mapping):
        return 1 + sum(_encoded_size(str(k)) + 1 + _encoded_size(v) + 1
                       for k, v in value.items()) + (0 if value else 1)
    if isinstance(value, list | tuple):
        return 1 + sum(_encoded_size(v) + 1 for v in value) + (0 if value else 1)
    return len(str(value))
