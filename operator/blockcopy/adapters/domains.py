"""What the node's domains hold, read from libvirt. Every image they use
(``Hypervisor.image_users``): the live and persistent definitions of every domain, running
or not, storage volumes resolved to their paths. A stopped domain's definition shows no
backing chain (libvirt finds it at start): such an image is marked ``chain_known`` False for
the caller to read its chain. And the node inventory (``Hypervisor.inventory``): domains,
their disks, sizes."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

import libvirt

from blockcopy.core.domainxml import parse_disks, tenant_of
from blockcopy.core.inventory import block_stats_sizes, inventory_disks
from blockcopy.model.inventory import DiskType, DomainState, InventoryDisk, InventoryDomain
from blockcopy.model.observation import ImageUser

log = logging.getLogger(__name__)


def image_users(conn: libvirt.virConnect) -> list[ImageUser]:
    users: list[ImageUser] = []
    for dom in conn.listAllDomains(0):
        try:
            running, persistent = bool(dom.isActive()), bool(dom.isPersistent())
            definitions = [("live" if running else "persistent", dom.XMLDesc(0))]
            if running and persistent:
                definitions.append(("persistent", dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
            name, uuid = dom.name(), dom.UUIDString()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # gone while we looked
            raise
        for definition, xml in definitions:
            tenant = tenant_of(xml)
            for disk in parse_disks(xml):
                source = disk.source or volume_path(conn, disk.volume)
                common = {"domain": name, "uuid": uuid, "target": disk.target,
                          "running": running, "definition": definition, "tenant": tenant}
                if source:
                    users.append(ImageUser(path=source, chain_known=definition == "live",
                                           **common))
                users.extend(ImageUser(path=p, backing=True, **common) for p in disk.chain)
    return users


def volume_path(conn: libvirt.virConnect, volume: tuple[str, str] | None) -> str | None:
    """The path of a storage volume; None where the pool or volume is not there."""
    if volume is None:
        return None
    try:
        return str(conn.storagePoolLookupByName(volume[0])
                   .storageVolLookupByName(volume[1]).path())
    except libvirt.libvirtError:
        return None


# -- the quiesce of a group's switch (Hypervisor.quiesce, unquiesce) ----------------------
def quiesce(dom: libvirt.virDomain) -> str:
    """Freeze the guest's file systems, or suspend it when its agent cannot: how it was done."""
    try:
        dom.agentSetResponseTimeout(5, 0)  # an agent that does not answer: 5 s at most
        dom.fsFreeze()
        return "frozen"
    except libvirt.libvirtError as exc:  # no guest agent, or it does not answer
        log.info("cannot freeze the file systems of %s (%s); suspending it", dom.name(),
                 exc.get_error_message())
    dom.suspend()
    return "suspended"


def unquiesce(dom: libvirt.virDomain, how: str) -> None:
    if how == "frozen":
        dom.fsThaw()
    elif how == "suspended" and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()


# -- pauses of the check at the switch (Hypervisor.pause, resume, resume_left_paused) -----
# The mark a pausing agent leaves in the domain's live metadata: <blockcopy:pause node=N/>.
PAUSE_NS = "https://blockcopy.dev/pause/v1"


def _pause_owner(dom: libvirt.virDomain) -> str | None:
    """The node named by the mark, from the live XML (``virDomainGetMetadata`` would report
    a missing element as an error, which libvirt also prints)."""
    metadata = ElementTree.fromstring(dom.XMLDesc(0)).find("metadata")
    mark = metadata.find(f"{{{PAUSE_NS}}}pause") if metadata is not None else None
    return mark.get("node") if mark is not None else None


def _mark(dom: libvirt.virDomain, owner: str | None) -> None:
    xml = None if owner is None else f"<pause node={quoteattr(owner)}/>"
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, "blockcopy" if xml else None,
                    PAUSE_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def _paused(dom: libvirt.virDomain) -> bool:
    return bool(dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED)


def pause(dom: libvirt.virDomain, owner: str) -> bool:
    """Suspend ``dom``, marked first (an agent that dies between the two leaves a mark on
    a running VM: its next start drops it). False: paused by someone else, left alone."""
    if _paused(dom):
        return _pause_owner(dom) == owner  # ours: a resume that failed before
    _mark(dom, owner)
    dom.suspend()
    return True


def resume(dom: libvirt.virDomain, owner: str) -> None:
    if _pause_owner(dom) != owner:
        return  # not ours to resume
    try:
        dom.resume()  # first: the guest waits; the mark goes after
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not paused
            raise
    _mark(dom, None)


def resume_left_paused(conn: libvirt.virConnect, owner: str) -> list[str]:
    resumed = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            if _pause_owner(dom) == owner:
                if _paused(dom):
                    resumed.append(dom.name())
                resume(dom, owner)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return resumed
# libvirt's domain states as the inventory names them (blocked: running, waiting on I/O).
_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.STOPPED,
}


# Sizes already read, by (domain UUID, state, target, source): (capacity, allocation), None
# each where libvirt could not tell.
SizeKey = tuple[str, DomainState, str, str]
Sizes = dict[SizeKey, tuple[int | None, int | None]]
# Domain stats without waiting: a domain busy with a job (starting, stopping, a monitor
# command, a block job's completion) is reported without the sizes that need QEMU.
_STATS_FLAGS = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


def inventory(conn: libvirt.virConnect, known: Sizes) -> tuple[list[InventoryDomain], Sizes]:
    """Every domain with its disks (``Hypervisor.inventory``): the live definition of a
    running domain, the persistent one of a stopped domain. Sizes as virDomainGetBlockInfo
    gives them, for the disks not in ``known`` (new, or another source or state), taken from
    one call for all domains that never waits (virConnectGetAllDomainStats, NOWAIT): a
    domain's job lock can be held for many seconds (22 s seen here during another session's
    block job), and virDomainGetBlockInfo waits for it. Where the stats have no size (a busy
    domain, a stopped domain's NBD disk, a missing image) it is left out and asked again on
    the next look. A driver without block stats (test://) is asked with
    virDomainGetBlockInfo. Returns the sizes of this look too, for the next one."""
    stats = {dom.UUIDString(): st for dom, st in
             conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_BLOCK, _STATS_FLAGS)}
    out: list[InventoryDomain] = []
    sizes: Sizes = {}
    for dom in conn.listAllDomains(0):
        try:
            state = _STATES.get(dom.state()[0], DomainState.OTHER)
            name, uuid, xml = dom.name(), dom.UUIDString(), dom.XMLDesc(0)
            disks = []
            for disk, volume in inventory_disks(xml):
                if volume is not None and not disk.source:
                    disk = dataclasses.replace(disk, source=volume_path(conn, volume))
                if disk.source:  # not an empty drive
                    key = (uuid, state, disk.target, disk.source)
                    size = known.get(key) or _size(dom, disk, state, stats.get(uuid))
                    if size is not None:
                        sizes[key] = size
                        disk = dataclasses.replace(disk, virtual_size=size[0],
                                                   allocation=size[1])
                disks.append(disk)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # gone while we looked
            raise
        out.append(InventoryDomain(name=name, uuid=uuid, state=state, disks=tuple(disks)))
    return out, sizes


def _size(dom: libvirt.virDomain, disk: InventoryDisk, state: DomainState,
          stats: dict[str, Any] | None) -> tuple[int | None, int | None] | None:
    """From the domain's stats; from virDomainGetBlockInfo where the driver reports no block
    stats at all. None: not known now (ask again next time)."""
    assert disk.source
    if stats is not None and "block.count" in stats:
        return block_stats_sizes(stats, disk.target, disk.source,
                                 active=state is not DomainState.STOPPED,
                                 file=disk.type is DiskType.FILE)
    try:
        capacity, allocation, _physical = dom.blockInfo(disk.target)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return None, None  # libvirt cannot tell (asked once per source and state)
    return int(capacity), int(allocation)
