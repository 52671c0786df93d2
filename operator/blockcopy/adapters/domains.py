"""Every image the node's domains use (``Hypervisor.image_users``), read from libvirt: the
live and persistent definitions of every domain, running or not, storage volumes resolved
to their paths. A stopped domain's definition shows no backing chain (libvirt finds it at
start): such an image is marked ``chain_known`` False for the caller to read its chain."""

from __future__ import annotations

import libvirt

from blockcopy.core.domainxml import parse_disks, tenant_of
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
