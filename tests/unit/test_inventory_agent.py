"""The node inventory's publisher (blockcopy.agent.inventory) on a fake clock (looptime) and
the fake hypervisor: published at start, looks coalesced (at most one per 2 s, one trailing
look for events during a look), a write only when the content changed (the resync refreshes
``updated``), stopped qcow2 disks' chains read with qemu-img (once per resync), failures
retried with back-off and logged once. And its pure parts (core.inventory)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
from collections.abc import AsyncIterator

import pytest

from blockcopy.agent.inventory import CHAIN_READS, InventoryPublisher
from blockcopy.core.inventory import LookTimer, block_stats_sizes, inventory_disks
from blockcopy.model.inventory import BackingImage, DiskType, parse_inventory
from blockcopy.model.observation import JobEvent
from support.fakes import FakeHypervisor, FakeImages, FakeKube

NODE = "hv-1"


def clock() -> dt.datetime:
    """A wall clock that follows the loop's (fake) time."""
    return dt.datetime(2026, 12, 4, tzinfo=dt.UTC) + dt.timedelta(
        seconds=asyncio.get_running_loop().time())


@pytest.fixture
def hv() -> FakeHypervisor:
    hv = FakeHypervisor()
    hv.add_domain("vm1", disks={"vda": "/images/vm1.qcow2", "vdb": "/images/vm1-data.raw"})
    hv.disk("vm1").chain, hv.disk("vm1").chain_formats = ("/images/base.raw",), ("raw",)
    hv.disk("vm1", "vdb").format = "raw"
    return hv


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def images() -> FakeImages:
    return FakeImages()


@contextlib.asynccontextmanager
async def running(hv: FakeHypervisor, kube: FakeKube, images: FakeImages,
                  resync: float = 300.0) -> AsyncIterator[InventoryPublisher]:
    """The publisher's loop, started inside the test (on looptime's fake clock)."""
    pub = InventoryPublisher(node_name=NODE, hv=hv, images=images, kube=kube,
                             resync_interval=resync, clock=clock)
    task = asyncio.create_task(pub.run())
    try:
        yield pub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def looks(hv: FakeHypervisor) -> list[float]:
    return hv.times("inventory")


def published(kube: FakeKube) -> dict:
    return kube.inventories[NODE]


@pytest.mark.asyncio
@pytest.mark.looptime
class TestPublisher:
    async def test_published_at_start_with_every_field(self, hv, kube, images, looptime):
        async with running(hv, kube, images):
            await asyncio.sleep(0.1)
            assert looks(hv) == [0.0] and len(kube.inventory_writes) == 1
            status = published(kube)
            assert (status["nodeName"], status["domainCount"], status["truncated"]) == \
                (NODE, 1, False)
            assert status["updated"] == "2026-12-04T00:00:00Z"
            inv = parse_inventory(status)
            (vm1,) = inv.domains
            assert (vm1.name, vm1.uuid, vm1.state) == ("vm1", hv.domains["vm1"].uuid, "Running")
            vda = vm1.disk("vda")
            assert vda is not None
            assert (vda.type, vda.source, vda.format, vda.virtual_size, vda.allocation) == \
                (DiskType.FILE, "/images/vm1.qcow2", "qcow2", 64 << 20, 1 << 20)
            assert vda.backing_chain == (BackingImage("/images/base.raw", "raw"),)

    async def test_events_are_coalesced_to_one_look_per_two_seconds(self, hv, kube, images,
                                                                     looptime):
        async with running(hv, kube, images):
            await asyncio.sleep(0.1)
            for i in range(30):  # 30 events over 3 s
                hv.add_domain(f"new{i}")
                hv.emit_domain(f"new{i}")
                await asyncio.sleep(0.1)
            await asyncio.sleep(5)
            times = looks(hv)
            assert all(b - a >= 2.0 for a, b in itertools.pairwise(times)), times
            assert times == pytest.approx([0.0, 2.0, 4.0])  # the last one trails the last event
            assert published(kube)["domainCount"] == 31
            assert len(kube.inventory_writes) == 3

    async def test_an_event_during_a_look_makes_one_trailing_look(self, hv, kube, images,
                                                                  looptime):
        async with running(hv, kube, images):
            await asyncio.sleep(10)
            hv.on_call["inventory"] = lambda: (hv.add_domain("late"), hv.emit_domain("late"),
                                               hv.emit_domain("late"))
            hv.emit_domain("vm1")
            await asyncio.sleep(0.1)
            del hv.on_call["inventory"]
            await asyncio.sleep(10)
            assert looks(hv) == pytest.approx([0.0, 10.0, 12.0])
            assert published(kube)["domainCount"] == 2

    async def test_nothing_is_written_when_nothing_changed_until_the_resync(
            self, hv, kube, images, looptime):
        async with running(hv, kube, images):
            await asyncio.sleep(1)
            for _ in range(5):
                hv.emit_domain("vm1")
                await asyncio.sleep(3)
            assert len(looks(hv)) == 6 and len(kube.inventory_writes) == 1
            await asyncio.sleep(300)  # the resync: written even if unchanged, `updated` refreshed
            assert len(kube.inventory_writes) == 2
            assert published(kube)["updated"] == "2026-12-04T00:05:00Z"
            # Sizes are read afresh at the start and at each resync only.
            fresh = [args for _, verb, args in hv.calls if verb == "inventory"]
            assert fresh == [(True,), *[(False,)] * 5, (True,)]

    async def test_a_failed_resync_is_owed_until_it_succeeds(self, hv, kube, images, looptime):
        async with running(hv, kube, images, resync=60.0):
            await asyncio.sleep(1)
            kube.failing_inventory = 2  # the resync at 60 s and its first retry
            await asyncio.sleep(70)
            fresh = [(round(t), args) for t, verb, args in hv.calls if verb == "inventory"]
            assert fresh == [(0, (True,)), (60, (True,)), (62, (True,)), (67, (True,))]
            assert [round(t) for t, _ in kube.inventory_writes] == [0, 67]

    async def test_a_completed_block_job_is_looked_at(self, hv, kube, images, looptime):
        async with running(hv, kube, images):
            await asyncio.sleep(1)
            disk = hv.disk("vm1")
            disk.source, disk.chain, disk.chain_formats = "/fast/vm1.qcow2", (), ()
            hv.emit("vm1", "vda", JobEvent.READY)  # not a change of the disk
            await asyncio.sleep(3)
            assert len(looks(hv)) == 1
            hv.emit("vm1", "vda", JobEvent.COMPLETED)  # the pivot
            await asyncio.sleep(0.1)
            vda = parse_inventory(published(kube)).domains[0].disk("vda")
            assert vda is not None and (vda.source, vda.backing_chain) == ("/fast/vm1.qcow2", ())

    async def test_stopped_qcow2_chains_are_read_with_qemu_img_once_per_resync(
            self, hv, kube, images, looptime):
        hv.add_domain("off", running=False, disks={"vda": "/images/off.qcow2",
                                                    "vdb": "/images/off.raw"})
        hv.disk("off", "vdb").format = "raw"
        images.chains["/images/off.qcow2"] = ["/images/off-base.qcow2"]
        async with running(hv, kube, images, resync=60.0):
            await asyncio.sleep(1)
            off = parse_inventory(published(kube)).find("off")
            assert off is not None and off.state == "Stopped"
            assert off.disk("vda").backing_chain == (  # type: ignore[union-attr]
                BackingImage("/images/off-base.qcow2", "qcow2"),)
            for _ in range(3):
                hv.emit_domain("vm1")
                await asyncio.sleep(3)
            # Raw disks and running domains are not asked about; the stopped image once.
            assert images.calls == [("backing_images", ("/images/off.qcow2",))]
            await asyncio.sleep(60)
            assert len(images.calls) == 2  # asked again at the resync

    async def test_chains_are_read_a_few_at_once_and_an_unreadable_image_has_none(
            self, hv, kube, images, looptime, caplog):
        caplog.set_level(logging.INFO, logger="blockcopy.agent.inventory")
        for i in range(10):
            hv.add_domain(f"off{i}", running=False)
        images.fail["backing_images"] = "Could not open '/images/off0.qcow2'"
        running_now, most = 0, 0
        real = images.backing_images

        async def slow(path: str) -> list[BackingImage]:
            nonlocal running_now, most
            running_now += 1
            most = max(most, running_now)
            await asyncio.sleep(2)  # qemu-img takes its time
            running_now -= 1
            return await real(path)
        images.backing_images = slow  # type: ignore[method-assign]
        async with running(hv, kube, images):
            await asyncio.sleep(8)
        assert most == CHAIN_READS
        assert float(kube.inventory_writes[0][0]) == pytest.approx(6.0)  # 10 images, 4 at once
        # A slow look is logged (what delays the inventory after an event).
        assert any("look of node hv-1 took 6.0 s (11 domains)" in r.getMessage()
                   for r in caplog.records)
        off = parse_inventory(published(kube)).find("off3")
        assert off is not None and off.disks[0].backing_chain == ()  # listed, without a chain

    async def test_failures_are_retried_with_back_off_and_logged_once(
            self, hv, kube, images, looptime, caplog):
        async with running(hv, kube, images):
            caplog.set_level(logging.DEBUG, logger="blockcopy.agent.inventory")
            await asyncio.sleep(1)
            hv.unreachable = True
            hv.emit_domain("vm1")
            await asyncio.sleep(60)
            failed = looks(hv)[1:]
            assert failed == pytest.approx([2.0, 4.0, 9.0, 19.0, 49.0])  # then 2, 5, 10, 30 s
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1 and "cannot publish the inventory of node hv-1" in \
                warnings[0].getMessage()
            hv.unreachable = False
            hv.add_domain("vm2")
            kube.failing_inventory = 1  # the API server too, once
            await asyncio.sleep(200)
            assert published(kube)["domainCount"] == 2
            assert sum("published again" in r.getMessage() for r in caplog.records) == 1
            # One streak of failures (libvirt, then the API server): one warning.
            assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_look_timer_schedule():
    t = LookTimer(min_gap=2.0, resync=300.0)
    assert t.next_look() == 0.0
    assert t.looking(0.0) is True  # the first look is a resync (written in any case)
    assert t.next_look() == 300.0
    t.event()
    assert t.next_look() == 2.0
    assert t.looking(2.5) is False
    assert t.next_look() == 300.0
    assert t.looking(300.0) is True and t.next_look() == 600.0


def test_inventory_disks_from_the_domain_xml():
    xml = """<domain><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/images/a.qcow2'/>
        <backingStore type='file'><format type='qcow2'/><source file='/images/b.qcow2'/>
          <backingStore type='block'><format type='raw'/><source dev='/dev/vg/base'/>
          <backingStore/></backingStore></backingStore>
        <target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/></disk>
      <disk type='block' device='lun'><source dev='/dev/sdz'/><target dev='sdb'/></disk>
      <disk type='network' device='disk'><driver name='qemu' type='raw'/>
        <source protocol='nbd' name='exp'><host name='10.0.0.5' port='10809'/></source>
        <target dev='vdb'/></disk>
      <disk type='network' device='disk'><driver name='qemu' type='raw'/>
        <source protocol='nbd' name='e2'><host transport='unix' socket='/run/n.sock'/></source>
        <target dev='vdc'/></disk>
      <disk type='volume' device='disk'><driver name='qemu' type='raw'/>
        <source pool='default' volume='v1'/><target dev='vdd'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='raw'/><target dev='vde'/></disk>
      <disk type='dir' device='disk'><source dir='/srv'/><target dev='vdf'/></disk>
    </devices></domain>"""
    disks = {d.target: (d, volume) for d, volume in inventory_disks(xml)}
    assert list(disks) == ["vda", "vdb", "vdc", "vdd", "vde"]
    vda = disks["vda"][0]
    assert (vda.type, vda.source, vda.format) == (DiskType.FILE, "/images/a.qcow2", "qcow2")
    assert vda.backing_chain == (BackingImage("/images/b.qcow2", "qcow2"),
                                 BackingImage("/dev/vg/base", "raw"))
    assert disks["vdb"][0].source == "nbd://10.0.0.5:10809/exp"  # as spec.dest writes it
    assert disks["vdc"][0].source == "nbd+unix:///e2?socket=/run/n.sock"
    assert disks["vdd"][0].type == DiskType.VOLUME and disks["vdd"][1] == ("default", "v1")
    assert disks["vde"][0].source is None  # an empty drive


# What libvirt 9.0 reported here (virConnectGetAllDomainStats, BLOCK), next to what
# virDomainGetBlockInfo said for the same disks: running file (6561792 allocated), stopped
# file (6557696), a running disk in a block copy (its mirror listed as a second vda).
RUNNING = {"block.count": 1, "block.0.name": "vda", "block.0.path": "/i/top.qcow2",
           "block.0.backingIndex": 1, "block.0.allocation": 0, "block.0.capacity": 67108864,
           "block.0.physical": 6561792}
STOPPED = {"block.count": 1, "block.0.name": "vda", "block.0.path": "/i/off.qcow2",
           "block.0.allocation": 6557696, "block.0.capacity": 67108864,
           "block.0.physical": 6619136}
MIRRORING = {"block.count": 2, "block.0.name": "vda", "block.0.path": "/i/base.qcow2",
             "block.0.allocation": 0, "block.0.capacity": 67108864,
             "block.0.physical": 10760192, "block.1.name": "vda",
             "block.1.path": "/fast/copy.qcow2", "block.1.allocation": 10813440,
             "block.1.capacity": 67108864, "block.1.physical": 10752000}


def test_sizes_from_the_domain_stats_mean_what_block_info_says():
    assert block_stats_sizes(RUNNING, "vda", "/i/top.qcow2", active=True, file=True) == \
        (67108864, 6561792)
    assert block_stats_sizes(STOPPED, "vda", "/i/off.qcow2", active=False, file=True) == \
        (67108864, 6557696)
    # A running block device: the highest offset written, as virDomainGetBlockInfo says.
    assert block_stats_sizes(RUNNING, "vda", "/i/top.qcow2", active=True, file=False) == \
        (67108864, 0)
    # In a block copy: the source's entry, not the mirror's.
    assert block_stats_sizes(MIRRORING, "vda", "/i/base.qcow2", active=True, file=True) == \
        (67108864, 10760192)
    assert block_stats_sizes(MIRRORING, "vda", "/fast/copy.qcow2", active=True,
                             file=True) == (67108864, 10752000)
    # Busy (NOWAIT: no capacity), another disk, no block stats: not known.
    busy = {k: v for k, v in RUNNING.items() if not k.endswith(("capacity", "physical"))}
    assert block_stats_sizes(busy, "vda", "/i/top.qcow2", active=True, file=True) is None
    assert block_stats_sizes(RUNNING, "vdb", "/i/b.qcow2", active=True, file=True) is None
    assert block_stats_sizes({}, "vda", "/i/top.qcow2", active=True, file=True) is None
