"""What the node's domains hold, read from libvirt. Every image they use
(``Hypervisor.image_users``): the live and persistent definitions of every domain, running
or not, storage volumes resolved to their paths. A stopped domain's definition shows no
backing chain (libvirt finds it at start): such an image is marked ``chain_known`` False for
the caller to read its chain. And the node inventory (``Hypervisor.inventory``): domains,
their disks, sizes."""

from __future__ import annotations

import dataclasses

import libvirt

from blockcopy.core.domainxml import parse_disks, tenant_of
from blockcopy.core.inventory import inventory_disks
from blockcopy.model.inventory import DomainState, InventoryDomain
from blockcopy.model.observation import ImageUser


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


def inventory(conn: libvirt.virConnect, known: Sizes) -> tuple[list[InventoryDomain], Sizes]:
    """Every domain with its disks (``Hypervisor.inventory``): the live definition of a
    running domain, the persistent one of a stopped domain; sizes from virDomainGetBlockInfo
    (left out where libvirt cannot tell: a stopped domain's NBD disk, a missing image), read
    only for disks not in ``known``. Returns the sizes of this look too, for the next one.

    virDomainGetBlockInfo waits for the domain's job lock (a domain starting, stopping or busy
    with a monitor command holds it for a while): reading every disk's size on every look
    would make each look as slow as the busiest domain of the node."""
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
                    sizes[key] = known[key] if key in known else _size(dom, disk.target)
                    disk = dataclasses.replace(disk, virtual_size=sizes[key][0],
                                               allocation=sizes[key][1])
                disks.append(disk)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # gone while we looked
            raise
        out.append(InventoryDomain(name=name, uuid=uuid, state=state, disks=tuple(disks)))
    return out, sizes


def _size(dom: libvirt.virDomain, target: str) -> tuple[int | None, int | None]:
    try:
        capacity, allocation, _physical = dom.blockInfo(target)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return None, None
    return int(capacity), int(allocation)
