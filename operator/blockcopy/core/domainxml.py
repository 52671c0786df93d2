"""libvirt's domain XML, read and written as plain data: which disk is which, where its
source and mirror are, and the ``<disk>`` element a block copy takes. Pure: the hypervisor
module fetches the XML and passes it in, so this is unit-tested without libvirt."""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

from blockcopy.model.api import NBD_DEFAULT_PORT, NetworkDest
from blockcopy.model.observation import DiskInfo, Mirror, MirrorReady


def _source_path(elem: ET.Element | None) -> str | None:
    """A file's or block device's path; for an NBD source the URI it would be written as in
    spec.dest (so that "is this our destination" is one string comparison)."""
    if elem is None:
        return None
    if elem.get("protocol") == "nbd":
        host = elem.find("host")
        export = elem.get("name") or ""
        if host is not None and host.get("transport") == "unix":
            return NetworkDest(export=export, socket=host.get("socket")).uri
        name = host.get("name") if host is not None else None
        port = int(host.get("port") or NBD_DEFAULT_PORT) if host is not None else \
            NBD_DEFAULT_PORT
        return NetworkDest(export=export, host=name, port=port).uri
    return elem.get("file") or elem.get("dev") or elem.get("name")


def _format(elem: ET.Element) -> str | None:
    fmt = elem.find("format")
    return fmt.get("type") if fmt is not None else None


def _matches(disk_ref: str, target: str | None, source: str | None) -> bool:
    if disk_ref in (target, source):
        return True
    return bool(source and posixpath.isabs(disk_ref) and posixpath.normpath(disk_ref) == source)


# The namespace of the agent's own element in a domain's <metadata> (see blockcopy.core.policy).
POLICY_METADATA_NS = "https://blockcopy.dev/policy/v1"


def tenant_of(domain_xml: str) -> str | None:
    """The tenant a domain's ``<metadata>`` assigns it, e.g.
    ``<blockcopy:policy xmlns:blockcopy="https://blockcopy.dev/policy/v1" tenant="team-a"/>``."""
    metadata = ET.fromstring(domain_xml).find("metadata")
    if metadata is None:
        return None
    for elem in metadata:
        if elem.tag.startswith(f"{{{POLICY_METADATA_NS}}}") and elem.get("tenant"):
            return elem.get("tenant")
    return None


def parse_disk(domain_xml: str, disk_ref: str) -> DiskInfo | None:
    """The disk named by target (``vda``) or by source path, or None if the domain has none."""
    root = ET.fromstring(domain_xml)
    for disk in root.iterfind("./devices/disk"):
        target_elem = disk.find("target")
        target = target_elem.get("dev") if target_elem is not None else None
        source = _source_path(disk.find("source"))
        if _matches(disk_ref, target, source):
            return _disk_info(disk)
    return None


def parse_disks(domain_xml: str) -> list[DiskInfo]:
    """Every disk of a domain (disks, cdroms, floppies: every image it may open), in order."""
    return [_disk_info(disk) for disk in ET.fromstring(domain_xml).iterfind("./devices/disk")]


def typed_disks(domain_xml: str) -> list[tuple[str, str, DiskInfo]]:
    """Every ``<disk>`` as (device: disk, cdrom, floppy, lun; type: file, block, network,
    volume...; the disk as plain data)."""
    return [(disk.get("device") or "disk", disk.get("type") or "file", _disk_info(disk))
            for disk in ET.fromstring(domain_xml).iterfind("./devices/disk")]


def _disk_info(disk: ET.Element) -> DiskInfo:
    """One ``<disk>`` element as plain data."""
    target_elem = disk.find("target")
    target = target_elem.get("dev") if target_elem is not None else None
    source_elem = disk.find("source")
    source = _source_path(source_elem)
    volume = None
    if disk.get("type") == "volume" and source_elem is not None:
        volume = (source_elem.get("pool") or "", source_elem.get("volume") or "")
    driver = disk.find("driver")
    chain, formats = [], []
    chain_encrypted = False
    store = disk.find("backingStore")
    while store is not None and (path := _source_path(store.find("source"))):
        chain.append(path)
        formats.append(_format(store) or "")
        chain_encrypted |= _encryption(store, store.find("source")) is not None
        store = store.find("backingStore")
    mirror_elem = disk.find("mirror")
    mirror = None
    if mirror_elem is not None:
        dest = _source_path(mirror_elem.find("source")) or mirror_elem.get("file")
        mirror = Mirror(dest=dest or "", ready=MirrorReady(mirror_elem.get("ready", "")),
                        job=mirror_elem.get("job", "copy"))
    return DiskInfo(
        target=target,
        source=source,
        source_format=driver.get("type") if driver is not None else None,
        backing=chain[0] if chain else None,
        mirror=mirror,
        chain=tuple(chain),
        chain_formats=tuple(formats),
        volume=volume,
        encryption=_encryption(disk, source_elem),
        chain_encrypted=chain_encrypted,
    )


def _encryption(holder: ET.Element, source: ET.Element | None) -> str | None:
    """An image's ``<encryption>`` element as XML: libvirt takes (and keeps, as the user
    wrote it) either placement, inside ``<source>`` or directly in the ``<disk>``."""
    elem = source.find("encryption") if source is not None else None
    if elem is None:
        elem = holder.find("encryption")
    if elem is None:
        return None
    elem = ET.fromstring(ET.tostring(elem))  # a copy, without the parent's tail text
    elem.tail = None
    return ET.tostring(elem, encoding="unicode")


def node_index(domain_xml: str, target: str, *, mirror: bool
               ) -> tuple[int, str | None, str | None]:
    """(libvirt's index of the image, the disk's cache mode, its io mode): the index of the
    running mirror's destination (``mirror``), or of the disk's active image. QEMU's node
    names are ``libvirt-<index>-format`` and ``libvirt-<index>-storage``."""
    for disk in ET.fromstring(domain_xml).iterfind("./devices/disk"):
        target_elem = disk.find("target")
        if target_elem is None or target_elem.get("dev") != target:
            continue
        holder = disk.find("mirror") if mirror else disk
        source = holder.find("source") if holder is not None else None
        index = source.get("index") if source is not None else None
        if index is None or not index.isdigit():
            raise ValueError(f"disk {target} has no {'mirror ' if mirror else ''}source index")
        driver = disk.find("driver")
        return (int(index), driver.get("cache") if driver is not None else None,
                driver.get("io") if driver is not None else None)
    raise ValueError(f"no disk {target}")


def dest_disk_xml(dest: str, fmt: str, *, block_device: bool,
                  network: NetworkDest | None = None, encryption: str | None = None) -> str:
    """The ``<disk>`` element virDomainBlockCopy takes for a file, a block device or an NBD
    export. The format is always given: libvirt would otherwise probe it (a guest-controlled
    header), and it does not probe network targets at all. ``encryption``: the source's
    ``<encryption>`` element, inside ``<source>``: libvirt then makes (or, reused, QEMU
    opens only) a LUKS destination with the same secret; without it the copy of an
    encrypted disk is written in the clear."""
    inner = encryption or ""
    if network is not None:
        if network.socket:
            host = f"<host transport='unix' socket={quoteattr(network.socket)}/>"
        else:
            host = f"<host name={quoteattr(str(network.host))} port='{network.port}'/>"
        return (f"<disk type='network'><driver name='qemu' type={quoteattr(fmt)}/>"
                f"<source protocol='nbd' name={quoteattr(network.export)}>{host}{inner}"
                "</source></disk>")
    if block_device:
        return (f"<disk type='block'><source dev={quoteattr(dest)}>{inner}</source>"
                f"<driver type={quoteattr(fmt)}/></disk>")
    return (f"<disk type='file'><source file={quoteattr(dest)}>{inner}</source>"
            f"<driver type={quoteattr(fmt)}/></disk>")
