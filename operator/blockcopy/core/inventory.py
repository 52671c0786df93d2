"""The node inventory's pure parts: a domain's disks as the inventory shows them (from its
XML), which stopped disks need their backing chain read with qemu-img, and when the
publisher looks again (events coalesced, a minimum gap, a slow resync). Pure: no I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from blockcopy.core.domainxml import typed_disks
from blockcopy.model.inventory import (
    BackingImage,
    DiskType,
    DomainState,
    InventoryDisk,
    InventoryDomain,
)

# Which disks the inventory lists: those the guest sees as disks (no cdrom, floppy, lun:
# nothing to move), of the types a BlockCopy can name.
_TYPES = {t.value: t for t in DiskType}


def inventory_disks(domain_xml: str) -> list[tuple[InventoryDisk, tuple[str, str] | None]]:
    """The domain's disks (device='disk' only), sizes not set, each with the (pool, volume)
    of a type='volume' disk (its path is for the caller to resolve) or None. The backing
    chain is the one the XML shows (a running domain's, or one written in a definition)."""
    out: list[tuple[InventoryDisk, tuple[str, str] | None]] = []
    for device, kind, info in typed_disks(domain_xml):
        if device != "disk" or kind not in _TYPES or not info.target:
            continue
        chain = tuple(BackingImage(path, fmt or None)
                      for path, fmt in zip(info.chain, info.chain_formats, strict=False))
        disk = InventoryDisk(target=info.target, type=_TYPES[kind], source=info.source,
                             format=info.source_format, backing_chain=chain)
        out.append((disk, info.volume))
    return out


def chain_unknown(domain: InventoryDomain, disk: InventoryDisk) -> bool:
    """A stopped domain's qcow2 image whose definition names no backing chain: libvirt finds
    the chain only when it starts the domain, so qemu-img reads it from the image."""
    return (domain.state is DomainState.STOPPED and disk.format == "qcow2"
            and not disk.backing_chain and bool(disk.source)
            and disk.type is not DiskType.NETWORK)


def with_chains(domain: InventoryDomain,
                chains: dict[str, tuple[BackingImage, ...]]) -> InventoryDomain:
    """``domain`` with the chains read for its images (by source path) filled in."""
    disks = tuple(dataclasses.replace(d, backing_chain=chains.get(d.source or "", ()))
                  if chain_unknown(domain, d) else d for d in domain.disks)
    return dataclasses.replace(domain, disks=disks)


@dataclasses.dataclass
class LookTimer:
    """When the publisher looks at libvirt again: at once for the first look and for an event,
    but never sooner than ``min_gap`` after the previous look started (events during a look
    or the gap make one trailing look), and at the latest ``resync`` seconds after the last
    resync. Times are the caller's monotonic clock."""

    min_gap: float
    resync: float
    last_look: float | None = None
    last_resync: float | None = None
    pending: bool = True  # an event since the last look started (the start counts as one)

    def event(self) -> None:
        self.pending = True

    def next_look(self) -> float | None:
        """When the next look is due (None: only when an event comes)."""
        if self.last_look is None:
            return 0.0
        due = [self.last_resync + self.resync] if self.last_resync is not None else []
        if self.pending:
            due.append(self.last_look + self.min_gap)
        return max(min(due), self.last_look + self.min_gap) if due else None

    def looking(self, now: float) -> bool:
        """A look starts at ``now``; True when it is a resync (the first look is one)."""
        resync = self.last_resync is None or now >= self.last_resync + self.resync
        self.last_look, self.pending = now, False
        if resync:
            self.last_resync = now
        return resync


def block_stats_sizes(stats: Mapping[str, Any], target: str, source: str, *, active: bool,
                      file: bool) -> tuple[int, int | None] | None:
    """(capacity, allocation) of the disk ``target`` (whose active image is ``source``) from
    libvirt's domain stats (virConnectGetAllDomainStats, VIR_DOMAIN_STATS_BLOCK), with
    allocation meaning what virDomainGetBlockInfo returns: for a running domain's file, the
    bytes it occupies on the host (QEMU's actual size: the stats' ``physical``), else the
    stats' ``allocation`` (a running domain's block device: the highest offset written; a
    stopped domain's image: what its storage allocates). None when the stats have no size
    for the disk (NOWAIT: a domain busy with a job is reported without its sizes). A disk in
    a block job is listed twice (its mirror too): the entry of ``source`` is taken."""
    entries = []
    for i in range(_int(stats.get("block.count")) or 0):
        if stats.get(f"block.{i}.name") == target:
            entries.append(i)
    chosen = next((i for i in entries if stats.get(f"block.{i}.path") == source),
                  entries[0] if entries else None)
    if chosen is None:
        return None
    capacity = _int(stats.get(f"block.{chosen}.capacity"))
    if capacity is None:
        return None
    key = "physical" if active and file else "allocation"
    return capacity, _int(stats.get(f"block.{chosen}.{key}"))


def _int(raw: object) -> int | None:
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None
