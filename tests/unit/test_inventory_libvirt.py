"""The libvirt side of the node inventory (adapters.domains.inventory through
LibvirtHypervisor) on libvirt's own ``test://`` driver: a running domain with a qcow2-over-raw
disk and a cdrom, a shut-off one with an NBD disk, a paused one; sizes from
virDomainGetBlockInfo where the driver answers; domains defined and undefined seen on the next
look; lifecycle and device events handed to the domain listeners."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt
import pytest
import pytest_asyncio

from blockcopy.adapters import connection
from blockcopy.adapters.hypervisor import LibvirtHypervisor
from blockcopy.model.inventory import BackingImage, DiskType, DomainState, bounded

pytestmark = pytest.mark.asyncio
libvirt.registerErrorHandler(lambda *_: None, None)

RUNNING_UUID = "6f0c7ad4-6b3e-4d6e-9c1a-2f1d2c7a0101"
NODE_XML = f"""<node>
  <domain type='test'>
    <name>inv-running</name><uuid>{RUNNING_UUID}</uuid>
    <memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/><source file='/images/running.qcow2'/>
        <backingStore type='file'><format type='raw'/><source file='/images/base.raw'/>
          <backingStore/></backingStore>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type='file' device='cdrom'>
        <source file='/iso/install.iso'/><target dev='sda' bus='sata'/>
      </disk>
    </devices>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>inv-off</name><uuid>6f0c7ad4-6b3e-4d6e-9c1a-2f1d2c7a0102</uuid>
    <memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>
    <devices>
      <disk type='network' device='disk'>
        <driver name='qemu' type='raw'/>
        <source protocol='nbd' name='export1'><host name='192.0.2.7' port='10809'/></source>
        <target dev='vdb' bus='virtio'/>
      </disk>
    </devices>
    <test:runstate>5</test:runstate>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>inv-paused</name><uuid>6f0c7ad4-6b3e-4d6e-9c1a-2f1d2c7a0103</uuid>
    <memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>
    <devices/>
    <test:runstate>3</test:runstate>
  </domain>
</node>
"""

NEW_XML = """<domain type='test'><name>inv-new</name><memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os><devices>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/>
    <source dev='/dev/vg/new'/><target dev='vdc' bus='virtio'/></disk>
  </devices></domain>"""


@pytest_asyncio.fixture
async def hv(tmp_path: Path) -> AsyncIterator[LibvirtHypervisor]:
    path = tmp_path / "node.xml"
    path.write_text(NODE_XML)
    opened: list[libvirt.virConnect] = []

    def opener(uri: str) -> libvirt.virConnect:
        opened.append(libvirt.open(uri))
        return opened[-1]

    driver = LibvirtHypervisor(f"test://{path}", open_connection=opener)
    driver.opened = opened  # type: ignore[attr-defined]
    yield driver
    await driver.close()


async def test_the_inventory_of_a_node(hv: LibvirtHypervisor) -> None:
    domains = {d.name: d for d in await hv.inventory()}
    assert set(domains) == {"inv-running", "inv-off", "inv-paused"}
    running, off, paused = domains["inv-running"], domains["inv-off"], domains["inv-paused"]
    assert (running.uuid, running.state) == (RUNNING_UUID, DomainState.RUNNING)
    assert (off.state, paused.state) == (DomainState.STOPPED, DomainState.PAUSED)
    (vda,) = running.disks  # the cdrom is not listed
    assert (vda.target, vda.type, vda.source, vda.format) == \
        ("vda", DiskType.FILE, "/images/running.qcow2", "qcow2")
    assert vda.backing_chain == (BackingImage("/images/base.raw", "raw"),)
    # The test driver answers virDomainGetBlockInfo with sizes of its own.
    assert vda.virtual_size is not None and vda.virtual_size > 0
    assert vda.allocation is not None and vda.allocation > 0
    (vdb,) = off.disks
    assert (vdb.type, vdb.source, vdb.format) == \
        (DiskType.NETWORK, "nbd://192.0.2.7:10809/export1", "raw")
    assert paused.disks == ()
    # What the publisher writes of it is valid for the CRD's shape (names, states).
    status = bounded("hv", "2026-12-04T00:00:00Z", domains.values()).to_status()
    assert [d["state"] for d in status["domains"]] == ["Stopped", "Paused", "Running"]


async def test_sizes_are_read_for_new_or_changed_disks_or_when_asked(
        hv: LibvirtHypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test driver reports no block stats: sizes come from virDomainGetBlockInfo (which
    waits for a busy domain's job lock), asked only about disks not sized yet (a new domain,
    another state, another source), or about every disk with fresh_sizes (the resync)."""
    asked: list[tuple[str, str]] = []
    real = libvirt.virDomain.blockInfo

    def counting(dom: libvirt.virDomain, target: str, flags: int = 0) -> list[int]:
        asked.append((dom.name(), target))
        return real(dom, target, flags)  # type: ignore[no-any-return]
    monkeypatch.setattr(libvirt.virDomain, "blockInfo", counting)
    first = await hv.inventory()
    assert sorted(asked) == [("inv-off", "vdb"), ("inv-running", "vda")]
    asked.clear()
    assert await hv.inventory() == first and asked == []  # nothing new: the sizes known
    hv.opened[0].lookupByName("inv-running").suspend()  # type: ignore[attr-defined]
    await hv.inventory()
    assert asked == [("inv-running", "vda")]  # another state
    asked.clear()
    await hv.inventory(fresh_sizes=True)
    assert sorted(asked) == [("inv-off", "vdb"), ("inv-running", "vda")]


async def test_domains_defined_and_undefined_are_seen_on_the_next_look(
        hv: LibvirtHypervisor) -> None:
    await hv.inventory()
    conn = hv.opened[0]  # type: ignore[attr-defined]  # the test node lives in it
    conn.defineXML(NEW_XML)
    new = next(d for d in await hv.inventory() if d.name == "inv-new")
    assert new.state == DomainState.STOPPED
    assert [(d.type, d.source) for d in new.disks] == [(DiskType.BLOCK, "/dev/vg/new")]
    conn.lookupByName("inv-off").undefine()
    assert {d.name for d in await hv.inventory()} == {"inv-running", "inv-paused", "inv-new"}


async def test_lifecycle_and_device_events_reach_the_domain_listeners(
        hv: LibvirtHypervisor) -> None:
    seen: list[str] = []
    hv.add_domain_listener(seen.append)
    await hv.inventory()
    # Where libvirt's event loop is registered (by an earlier test of this process, as in
    # `make test`), opening the connection also announces "look again" ('') on that loop,
    # which may be another thread's (support.libvirt_probes.libvirt_event_loop): let that
    # loop run what it was handed before counting (its callbacks run in order).
    events_loop = connection._event_impl_loop
    if events_loop is not None and events_loop is not asyncio.get_running_loop():
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(asyncio.sleep(0),
                                                                   events_loop))
    await asyncio.sleep(0)
    seen.clear()
    dom = hv.opened[0].lookupByName("inv-running")  # type: ignore[attr-defined]
    # As libvirt calls the callbacks registered in LibvirtConnection.get (libvirtaio's loop).
    conn = hv.opened[0]  # type: ignore[attr-defined]
    hv.connection._on_lifecycle(conn, dom, libvirt.VIR_DOMAIN_EVENT_STOPPED, 0, None)
    hv.connection._on_device(conn, dom, "virtio-disk1", None)
    hv.connection._on_domain(None)  # after a reconnection
    assert seen == [RUNNING_UUID, RUNNING_UUID, ""]
