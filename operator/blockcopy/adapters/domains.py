"""Every image the node's domains use (``Hypervisor.image_users``), read from libvirt: the
live and persistent definitions of every domain, running or not, storage volumes resolved
to their paths. A stopped domain's definition shows no backing chain (libvirt finds it at
start): such an image is marked ``chain_known`` False for the caller to read its chain."""

from __future__ import annotations

from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

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
